"""The cache of a writer's text (models/textcache.py): its counts against a plain recount, the
blend against the mixture it stands for, the weight's choice, and the engine's and scoring's use
of it on a tiny random-weight Llama."""

from __future__ import annotations

import collections
import math
import random

import pytest
import torch

from models import scoring
from models.settings import Settings
from models.textcache import WEIGHTS, TextCache, choose_weight
from tests.unit.test_engine_logic import build_tokenizer, tiny_llama_engine


def recount(text: list[int], context: list[int], token: int, order: int = 3) -> float:
    """Witten-Bell interpolation written out with dicts: unigram relative counts, then each longer
    context seen in the text: (c(h, w) + kinds(h) * p_shorter) / (c(h) + kinds(h))."""
    counts = [collections.defaultdict(collections.Counter) for _ in range(order + 1)]
    for i in range(len(text)):
        for n in range(order + 1):
            if i - n >= 0:
                counts[n][tuple(text[i - n:i])][text[i]] += 1
    p = counts[0][()][token] / len(text)
    for n in range(1, order + 1):
        seen = counts[n].get(tuple(context[len(context) - n:])) if len(context) >= n else None
        if not seen:
            break
        total, kinds = sum(seen.values()), len(seen)
        p = (seen[token] + kinds * p) / (total + kinds)
    return p


def test_the_cache_counts_as_a_plain_recount():
    rng = random.Random(0)
    text = [rng.choice([1, 2, 3, 5, 8, 13, 100000, 262143]) for _ in range(2000)]
    cache = TextCache(text, 262144)
    assert cache.order == 3 and cache.tokens.tolist() == sorted(set(text))
    for context in ([], [1], [1, 2], [5, 8, 13], [7, 7, 7], [262143, 1, 2], text[-5:]):
        q = cache.distribution(context)
        assert abs(float(q.sum()) - 1) < 1e-5 and bool((q > 0).all())
        for token in (1, 2, 13, 100000, 262143):
            assert abs(cache.probability(context, token) - recount(text, context, token)) < 1e-6
        assert cache.probability(context, 4) == 0.0  # never in the text
    assert cache.probabilities(text[10:14], before=text[:10]) == [cache.probability(text[:10 + i][-3:], t)
                                                                  for i, t in enumerate(text[10:14])]


def test_a_large_vocabulary_keeps_the_contexts_that_fit_a_key():
    assert TextCache([1, 2, 3], 2**21).order == 2  # 21 bits a token: three do not fit in 63
    assert TextCache([1, 2, 3], 50000).order == 3


def test_the_blend_is_the_mixture_of_the_two_distributions():
    torch.manual_seed(0)
    text = [3, 4, 5, 3, 4, 6, 3, 4, 5, 9]
    cache = TextCache(text, 16, weight=0.25)
    logits = torch.randn(3, 16) * 3
    logits[2, 5] = float("-inf")  # a token masked before the blend gets only the cache's share
    contexts = [[3, 4], [9], []]
    got = cache.blend(logits, contexts).softmax(-1)
    want = 0.75 * logits.softmax(-1)
    for row, context in enumerate(contexts):
        want[row, cache.tokens] += 0.25 * cache.distribution(context)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(TextCache(text, 16, weight=0.0).blend(logits, contexts), logits)


def test_the_weight_is_the_one_that_reads_best_and_none_where_the_cache_does_not_help():
    # A cache that gives the text's tokens more than the model does: some weight reads it better.
    model, cache = [0.05, 0.2, 0.1, 0.4] * 20, [0.6, 0.3, 0.5, 0.2] * 20
    weight, nats = choose_weight(model, cache)
    assert weight > 0 and nats[weight] == min(nats.values()) and set(nats) == set(WEIGHTS)
    # A cache that never saw these tokens: every blend reads them worse.
    assert choose_weight(model, [0.0] * len(model))[0] == 0.0
    assert choose_weight([0.9] * 10, [0.01] * 10)[0] == 0.0


def test_the_engine_samples_from_the_blend_and_scoring_reads_it():
    tok = build_tokenizer()
    engine = tiny_llama_engine(tok, seed=3)
    sentence = "The quick brown fox jumps over the lazy dog."
    ids = tok(" ".join([sentence] * 6), add_special_tokens=False).input_ids
    settings = Settings(num_suggestions=1, lengths=[6], temperature=0.05, top_k=5)
    prompt = "I said it again: The quick brown fox jumps"
    plain = engine.suggest(prompt, settings, seed=0).texts
    engine.text_cache = TextCache(ids, engine.model.config.vocab_size, weight=0.98)
    try:
        drawn = engine.suggest(prompt, settings, seed=0).texts
        assert drawn and " over the lazy dog.".startswith(drawn[0]) and len(drawn[0].strip()) >= 4, drawn
        assert plain != drawn  # the random model alone says something else
        # Scoring: each token's probability is the mixture of the model's and the cache's.
        text = "The lazy dog. The quick brown fox"
        engine.text_cache = None
        alone = scoring.score_local(engine, text, alternatives=0)
        engine.text_cache = TextCache(ids, engine.model.config.vocab_size, weight=0.3)
        mixed = scoring.score_local(engine, text, alternatives=0)
        text_ids = tok(text, add_special_tokens=False).input_ids
        q = engine.text_cache.probabilities(text_ids)
        for a, m, qi in zip(alone["tokens"], mixed["tokens"], q):
            assert math.isclose(m["prob"], 0.7 * a["prob"] + 0.3 * qi, rel_tol=1e-4)
        assert mixed["bits_per_char"] < alone["bits_per_char"]
    finally:
        engine.text_cache = None


def test_writing_in_the_middle_reads_the_text_after_the_caret_through_the_blend():
    """follow_logprobs (how the text after the caret follows each opening) with a style's cache:
    each token of it read from the mixture, its context the prompt's tokens, then the row's."""
    from models.batching import PrefixStore
    from models.steps import follow_logprobs, read_all

    tok = build_tokenizer()
    engine = tiny_llama_engine(tok, seed=3)
    sentence = "The quick brown fox jumps over the lazy dog."
    cache = TextCache(tok(" ".join([sentence] * 6), add_special_tokens=False).input_ids, engine.model.config.vocab_size, weight=0.3)
    prompt = tok("I said it again: The quick brown", add_special_tokens=False).input_ids
    heads = [tok(" fox", add_special_tokens=False).input_ids, [5, 9], [7]]
    then = tok(" jumps over", add_special_tokens=False).input_ids
    with torch.inference_mode():
        kv, _, _ = PrefixStore(engine.model, engine.model.config, engine.cache_limit).prefill(prompt, engine.device)
        plain = follow_logprobs(engine.model, kv, heads, then)
        mixed = follow_logprobs(engine.model, kv, heads, then, cache.blend, prompt)
        for head, p_value, m_value in zip(heads, plain.tolist(), mixed.tolist()):
            ids = prompt + head + then
            probs = torch.softmax(read_all(engine.model, torch.tensor([ids])), dim=-1)
            start = len(prompt) + len(head)  # then[0]'s position
            model_p = [float(probs[start + j - 1, t]) for j, t in enumerate(then)]
            cache_q = [cache.probability(ids[: start + j], t) for j, t in enumerate(then)]
            assert p_value == pytest.approx(sum(math.log(p) for p in model_p), abs=1e-3)
            assert m_value == pytest.approx(sum(math.log(0.7 * p + 0.3 * q) for p, q in zip(model_p, cache_q)), abs=1e-3)
        assert mixed[0] > plain[0]  # " fox jumps over" is the cached sentence's
