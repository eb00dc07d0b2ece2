"""The suggestion engine on tiny random-weight models (no download, a few seconds in all).

The tokenizer is a byte-fallback BPE in the style of SentencePiece (▁ for spaces, <0xNN>
pieces for characters it has not seen), trained in memory on a few English, Chinese and
Japanese sentences, so that token healing, CJK text and broken UTF-8 all occur.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch
import transformers
from transformers import DynamicCache

from models import textcut
from models.core import Row, clean_prompt, repeats
from models.engine import SuggestionEngine, VocabIndex
from models.loading import LoadedModel
from models.settings import Settings, targets
from models.steps import decode_step, forbid_unlikely_stop, longest_common_prefix, prefill, sample

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "I went to the store to buy some bread and milk.",
    "She said that the weather would be nice tomorrow, so we planned a picnic.",
    "Writing is easier when the words come quickly.\nA new line starts here.",
    "我们今天去公园散步，天气很好。",
    "他说：“明天见！”然后就走了。",
    "日本語のテキストも少し入れます。",
    "Mixed text: hello 世界, and more words here!",
]
CONTEXT_LENGTH = 512


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tk.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tk.train_from_iterator(CORPUS, trainer)
    # Add the 256 byte pieces as ordinary vocabulary (as SentencePiece does), not as special tokens.
    spec = json.loads(tk.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tk = Tokenizer.from_str(json.dumps(spec))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


# The engine's logic on a GPU too, where there is one: TABWRITE_TEST_DEVICE=cuda (CPU by default).
TEST_DEVICE = torch.device(os.environ.get("TABWRITE_TEST_DEVICE", "cpu"))


def wrap(model, tok, context_length=CONTEXT_LENGTH) -> SuggestionEngine:
    loaded = LoadedModel(
        name="tiny", model=model.eval().to(TEST_DEVICE), tokenizer=tok, device=TEST_DEVICE,
        dtype=torch.float32, context_length=context_length,
    )
    return SuggestionEngine(loaded)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def tiny_llama_engine(tok, seed: int = 0, context_length: int = CONTEXT_LENGTH) -> SuggestionEngine:
    """An engine on a tiny random-weight Llama (2 layers, 64 wide) for ``tok``."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context_length,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    return wrap(transformers.LlamaForCausalLM(config), tok, context_length)


@pytest.fixture(scope="module")
def engine(tok):
    return tiny_llama_engine(tok)


def constant_engine(tok, token_id: int, n_positions: int = CONTEXT_LENGTH) -> SuggestionEngine:
    """A GPT-2 whose final layer norm outputs a constant, so it predicts ``token_id`` at every step."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=n_positions,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0  # hidden state is e_0 everywhere
        model.lm_head.weight[:, 0] = 0.0  # tied with the input embeddings; column 0 only
        model.lm_head.weight[token_id, 0] = 30.0
    return wrap(model, tok, n_positions)


def piece_id(tok, piece: str) -> int:
    i = tok.convert_tokens_to_ids(piece)
    assert i is not None and i != tok.unk_token_id, piece
    return i


SOME_TEXTS = ["The quick bro", "我们今天去", "hello 世界 and", "She said that the weather "]


# ---------------------------------------------------------------- sample()


def test_sample_top_k_1_is_argmax():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 300, generator=g)
    for temperature in (0.1, 1.0, 2.0):
        tokens, _ = sample(logits, temperature, 1, 1.0, g)
        assert torch.equal(tokens, logits.argmax(-1))


def test_sample_stays_inside_top_k():
    g = torch.Generator().manual_seed(2)
    row = torch.randn(200, generator=g) * 0.1  # nearly flat: every top-k token gets drawn
    logits = row.expand(4000, -1)
    k = 7
    allowed = set(torch.topk(row, k).indices.tolist())
    tokens, _ = sample(logits, 1.0, k, 1.0, g)
    drawn = set(tokens.tolist())
    assert drawn <= allowed
    assert drawn == allowed


def test_sample_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    perm = torch.tensor([2, 0, 3, 1])  # positions in the vocabulary should not matter
    logits = torch.full((4,), 0.0)
    logits[perm] = probs.log()
    logits = logits.expand(3000, -1)
    g = torch.Generator().manual_seed(3)
    first, second = perm[0].item(), perm[1].item()
    tokens, _ = sample(logits, 1.0, 4, 0.5, g)
    assert set(tokens.tolist()) == {first}
    tokens, _ = sample(logits, 1.0, 4, 0.7, g)
    assert set(tokens.tolist()) == {first, second}
    tokens, _ = sample(logits, 1.0, 4, 1.0, g)
    assert set(tokens.tolist()) == set(perm.tolist())


def test_sample_logprobs_are_untempered_and_not_positive():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(50, 120, generator=g) * 3
    for temperature, k, p in [(0.3, 10, 0.9), (1.5, 120, 1.0), (1.0, 1, 0.5)]:
        tokens, logprobs = sample(logits, temperature, k, p, g)
        assert (logprobs <= 0).all()
        expected = torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
        assert torch.allclose(logprobs, expected, atol=1e-5)


def test_sample_handles_large_top_k_bf16_and_masked_logits():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 50, generator=g).to(torch.bfloat16)
    tokens, logprobs = sample(logits, 0.7, 10_000, 0.95, g)
    assert tokens.shape == (3,) and logprobs.dtype == torch.float32
    masked = torch.full((3, 50), float("-inf"))
    masked[:, [4, 9]] = 0.0  # token healing leaves only a few finite logits
    tokens, logprobs = sample(masked, 1.0, 40, 0.95, g)
    assert set(tokens.tolist()) <= {4, 9}
    assert torch.isfinite(logprobs).all()


def test_sample_seed_reproducible():
    logits = torch.randn(16, 100)
    a, _ = sample(logits, 1.0, 50, 0.95, torch.Generator().manual_seed(7))
    b, _ = sample(logits, 1.0, 50, 0.95, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


# ---------------------------------------------------------------- VocabIndex and helpers


@pytest.mark.parametrize("prefix", ["▁", "▁th", "▁the", "▁quick", "公", "去", "t", "e", "<", "<0x", "zzzz", "▁我们"])
def test_vocab_index_starting_with_is_exact(tok, prefix):
    index = VocabIndex(tok)
    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    special = set(tok.all_special_ids)
    expected = {
        i for i, p in enumerate(pieces)
        if p.startswith(prefix) and i not in special and not (p.startswith("<0x") and p.endswith(">"))
    }
    got = index.starting_with(prefix).tolist()
    assert len(got) == len(set(got))
    assert set(got) == expected


def test_vocab_index_excludes_specials_and_bytes(tok):
    index = VocabIndex(tok)
    for i in tok.all_special_ids:
        assert i not in index.piece_of
    byte_id = piece_id(tok, "<0xE4>")
    assert byte_id not in index.piece_of
    the = piece_id(tok, "▁the")
    assert index.piece_of[the] == "▁the"
    assert the in index.starting_with("▁the")


def test_longest_common_prefix():
    assert longest_common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert longest_common_prefix([1, 2], [1, 2, 3]) == 2
    assert longest_common_prefix([], [1]) == 0
    assert longest_common_prefix([5], [6]) == 0


def test_clean_prompt_makes_valid_text():
    assert clean_prompt("a\x00b\ud800c\n") == "ab?c\n"
    assert clean_prompt("文字 😀") == "文字 😀"


# ---------------------------------------------------------------- suggest(): results


def test_suggest_basic_contract(engine):
    for num in (1, 2, 3, 6):
        settings = Settings(num_suggestions=num, temperature=1.0)
        for text in SOME_TEXTS:
            result = engine.suggest(text, settings, seed=0)
            assert len(result.suggestions) <= num
            lengths = [len(s.text) for s in result.suggestions]
            assert lengths == sorted(lengths)
            for s in result.suggestions:
                assert s.text.strip()
                assert textcut.REPLACEMENT_CHAR not in s.text
                assert "\x00" not in s.text
                assert s.mean_logprob <= 0
                assert 1 <= s.tokens <= max(targets(settings)) * 3 // 2 + 4
            assert result.prompt_tokens > 0 and result.steps >= 1
            assert not result.cancelled and not result.truncated
            assert result.elapsed_s > 0
            assert result.suggestions or result.message


def test_suggestions_never_hold_broken_utf8(engine):
    # High temperature and a wide top-k make the random model emit lone <0xNN> byte pieces
    # (continuation bytes, truncated characters) often: none may reach the writer.
    settings = Settings(temperature=2.0, top_k=1000, top_p=1.0, lengths=[3, 8, 16])
    seen = 0
    updates: list[list] = []
    for seed in range(25):
        result = engine.suggest("我们今天去", settings, seed=seed, on_update=updates.append)
        for s in result.suggestions:
            seen += 1
            assert textcut.REPLACEMENT_CHAR not in s.text, (seed, s.text)
    assert seen > 25
    # Streaming updates carry the rows finished so far: never more than asked, never broken text.
    assert updates and all(len(u) <= 3 for u in updates)
    assert not any(textcut.REPLACEMENT_CHAR in s.text for u in updates for s in u)


def test_empty_or_whitespace_text_gives_message_only(engine):
    for text in ("", "   ", "\n\t ", None, "\x00\x01"):
        result = engine.suggest(text, Settings(), seed=0)
        assert result.suggestions == []
        assert result.message
        assert result.steps == 0


def test_same_seed_same_suggestions(engine):
    settings = Settings(temperature=1.0)
    a = engine.suggest("She said that the weather", settings, seed=123)
    b = engine.suggest("She said that the weather", settings, seed=123)
    assert a.texts == b.texts and a.steps == b.steps


def test_text_far_longer_than_context_is_truncated(engine):
    text = ("The quick brown fox jumps over the lazy dog. 我们今天去公园散步，天气很好。 " * 2000)[:100_000]
    settings = Settings(context_tokens=64, lengths=[4, 8], num_suggestions=2)
    started = time.perf_counter()
    result = engine.suggest(text, settings, seed=0)
    assert time.perf_counter() - started < 10
    assert result.truncated
    assert 1 < result.prompt_tokens <= settings.context_tokens + 1
    assert result.suggestions or result.message
    # A context window larger than the model allows is reduced to what it can hold.
    result = engine.suggest(text, Settings(context_tokens=2048, lengths=[4], num_suggestions=1), seed=0)
    assert result.truncated and result.prompt_tokens <= CONTEXT_LENGTH


def test_prompt_window_is_the_end_of_the_text(engine, tok):
    text = " ".join(f"w{i}" for i in range(3000)) + " the quick brown fox"
    ids, truncated = engine.prompt_ids(text, 64)
    assert truncated and len(ids) <= 65
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True).endswith("the quick brown fox")
    short, truncated = engine.prompt_ids("the quick brown fox", 64)
    assert not truncated
    assert short == tok("the quick brown fox").input_ids


# ---------------------------------------------------------------- suggest(): lengths and stopping


def test_tab_again_gives_longer_suggestions(tok):
    # A model that always says " the": each suggestion is as long as its target allows.
    eng = constant_engine(tok, piece_id(tok, "▁the"))
    settings = Settings(lengths=[2, 4, 8], num_suggestions=3)
    first = eng.suggest("I went to the store", settings, round_=0, seed=0)
    again = eng.suggest("I went to the store", settings, round_=1, seed=0)
    assert len(first.suggestions) == len(again.suggestions) == 3
    for s, target in zip(first.suggestions, targets(settings, 0)):
        assert set(s.text.split()) == {"the"}
        assert s.tokens >= target
    assert all(len(b.text) > len(a.text) for a, b in zip(first.suggestions, again.suggestions))
    assert all(b.tokens > a.tokens for a, b in zip(first.suggestions, again.suggestions))


def test_model_that_only_ends_text_gives_a_message(tok):
    eng = constant_engine(tok, tok.eos_token_id)
    result = eng.suggest("The quick brown fox", Settings(), seed=0)
    # Token healing forces the first token (re-typing "fox"); the model ends the text next.
    assert result.suggestions == [] and result.message and result.steps <= 2


def test_forbid_unlikely_stop_only_where_a_stop_is_not_first_choice():
    stop_ids = torch.tensor([2, 5])
    logits = torch.zeros(3, 8)
    logits[:, 1] = 3.0  # an ordinary token leads in every row ...
    logits[:, 5] = 2.0  # ... a stop token is close behind
    logits[2, 2] = 4.0  # except in row 2, where the model is sure the text ends
    out = forbid_unlikely_stop(logits, [0, 2], stop_ids)
    assert torch.isinf(out[0, [2, 5]]).all() and out[0, 1] == 3.0
    assert torch.equal(out[1], logits[1])  # not a silent row: untouched
    assert torch.equal(out[2], logits[2])  # stop is its first choice: allowed
    assert logits[0, 5] == 2.0  # the input is not changed in place


def test_rare_end_of_text_never_leaves_a_suggestion_empty(tok):
    # A model that says " the" but gives end-of-text a fair chance (e^-1 : 1) at every step:
    # without a guard, about a quarter of the rows would end before saying anything.
    eng = constant_engine(tok, piece_id(tok, "▁the"))
    with torch.no_grad():
        eng.model.lm_head.weight[tok.eos_token_id, 0] = 29.0
    settings = Settings(lengths=[2, 4, 8], num_suggestions=3, temperature=1.0, top_k=40, top_p=1.0)
    ended_early = 0
    for seed in range(12):
        result = eng.suggest("I went to the store", settings, seed=seed)
        assert len(result.suggestions) == 3, (seed, result.texts, result.message)
        assert all(s.text.split() and set(s.text.split()) == {"the"} for s in result.suggestions)
        ended_early += sum(s.tokens < t for s, t in zip(result.suggestions, targets(settings, 0)))
    assert ended_early > 0  # end-of-text still ends a row that has said something


def test_rows_that_would_end_alike_say_something_else(tok):
    # A model torn between " the" and a line break: rows end after a "the" or two, and without
    # care two of them end on the very same words, so the writer sees fewer options than asked.
    eng = constant_engine(tok, piece_id(tok, "▁the"))
    with torch.no_grad():
        eng.model.lm_head.weight[piece_id(tok, "\n"), 0] = 30.0
    settings = Settings(lengths=[2, 4, 8], num_suggestions=3, temperature=1.0, top_k=2, top_p=1.0)
    distinct = []
    for seed in range(12):
        result = eng.suggest("I went to the store", settings, seed=seed)
        texts = [s.text.strip() for s in result.suggestions]
        assert all(set(t.split()) == {"the"} for t in texts), texts
        distinct.append(len(set(texts)))
    assert distinct.count(3) >= 10, distinct


def test_a_repeat_goes_on_past_its_own_hard_cap_while_the_press_has_steps():
    # Seen on Gemma: at its hard cap (8 tokens) the shortest row read " the 5-year-old", was cut
    # back to its last whole word, " the", and so said what another row said. The engine asks
    # repeats() with "a step is left" (len(row.ids) + 1 < the press's max_steps), not "below its own cap".
    short, long_ = Row(4), Row(12)
    long_.final = "the"
    rows = [short, long_]
    short.ids = [7] * textcut.hard_cap(4)  # at its own cap, with steps left in the press
    assert repeats(rows, short, " the", can_go_on=True)  # so it goes on
    assert not repeats(rows, short, " the 5-year-old", can_go_on=True)  # says something else: ends
    assert not repeats(rows, short, " ", can_go_on=True)  # empty: dropped, not a repeat
    assert not repeats(rows, short, " the", can_go_on=False)  # no step left: it ends as it is
    assert not repeats([short], short, " the", can_go_on=True)  # nobody else says it


def test_suggestion_stops_at_newline(tok):
    eng = constant_engine(tok, piece_id(tok, "\n"))
    result = eng.suggest("The quick brown fox", Settings(lengths=[8]), seed=0)
    assert result.suggestions == [] and result.message
    assert result.steps <= 8 * 3 // 2 + 4


def test_model_emitting_only_broken_bytes_does_not_crash_or_leak(tok):
    # A lone continuation byte never decodes to a character. The rows run to their longest
    # allowed length; with a long prompt that must still fit the model's position table.
    n_positions = 320
    eng = constant_engine(tok, piece_id(tok, "<0x80>"), n_positions=n_positions)
    text = "the quick brown fox jumps over the lazy dog " * 40
    result = eng.suggest(text, Settings(lengths=[256], num_suggestions=2, context_tokens=2048, max_time=30), seed=0)
    # Only the first token, forced by token healing, can give text; the bytes never do.
    assert len(result.suggestions) <= 2
    for s in result.suggestions:
        assert textcut.REPLACEMENT_CHAR not in s.text and len(s.text.split()) <= 1
    assert result.steps > 256  # it did run to the end ...
    assert result.prompt_tokens + result.steps <= n_positions + 1  # ... without passing the last position


# ---------------------------------------------------------------- cancel and time limit


def test_cancelled_before_start(engine):
    result = engine.suggest("The quick brown", Settings(), is_cancelled=lambda: True, seed=0)
    assert result.cancelled and result.suggestions == [] and result.steps == 0


def test_cancel_during_generation_stops_early(engine):
    calls = {"n": 0}

    def is_cancelled():
        calls["n"] += 1
        return calls["n"] > 2  # let the request start and run two steps

    settings = Settings(lengths=[200], num_suggestions=3, max_time=30)
    result = engine.suggest("The quick brown", settings, is_cancelled=is_cancelled, seed=0)
    assert result.cancelled
    assert result.steps == 2
    assert not result.timed_out


def test_tiny_time_budget_stops_after_one_step(engine):
    settings = Settings(lengths=[200], num_suggestions=3, max_time=0.0)
    saved = engine.pace.prefill_s_per_token, engine.pace.step_s
    # Admission control would refuse a budget of 0 outright; told that steps take no time, it admits
    # the press, and the budget then stops it after its first step.
    engine.pace.prefill_s_per_token, engine.pace.step_s = 0.0, -1.0
    try:
        started = time.perf_counter()
        result = engine.suggest("The quick brown", settings, seed=0)
    finally:
        engine.pace.prefill_s_per_token, engine.pace.step_s = saved
    assert time.perf_counter() - started < 5
    assert result.timed_out and result.steps == 1
    assert "time" in result.message
    for s in result.suggestions:
        assert textcut.REPLACEMENT_CHAR not in s.text


def test_a_press_that_cannot_be_answered_within_its_budget_is_refused_before_any_work(engine):
    saved = engine.pace.prefill_s_per_token, engine.pace.step_s
    engine.pace.step_s = 0.5  # as measured under load: 6 steps for a 4-token row take 3 s
    ahead = threading.Thread(target=engine.suggest, args=("Another writer's text, ahead in the queue", Settings(lengths=[4])))
    try:
        with engine.lock:  # the press ahead is posted and waits: the machine is not free
            posted = engine.queue.posted
            ahead.start()
            until = time.monotonic() + 10
            while engine.queue.posted == posted and time.monotonic() < until:
                time.sleep(0.001)
            refused = engine.suggest("The quick brown", Settings(lengths=[4, 8], max_time=2.0), seed=0)
        ahead.join(timeout=60)
        alone = engine.suggest("The quick brown", Settings(lengths=[4, 8], max_time=2.0), seed=0)
    finally:
        engine.pace.prefill_s_per_token, engine.pace.step_s = saved
    assert refused.busy and refused.steps == 0 and not refused.suggestions and refused.message.startswith("Busy")
    # Alone on the machine, the same press is tried whatever the estimate says (its budget still cuts it).
    assert not alone.busy and alone.steps > 0


def test_a_press_that_waited_behind_others_is_checked_against_its_budget_even_with_no_batch_running(engine):
    """Two presses wait while the machine is held; when it is free no batch runs yet, but the
    first is not alone (the second waits behind it): one that can no longer get its shortest
    row in time is refused "busy" rather than prefilled to end at its budget with nothing."""
    saved = engine.pace.prefill_s_per_token, engine.pace.step_s
    engine.pace.prefill_s_per_token, engine.pace.step_s = 0.0, 0.0  # both are let into the queue
    results = {}

    def press(name, text):
        results[name] = engine.suggest(text, Settings(lengths=[4], max_time=2.0), seed=0)

    first = threading.Thread(target=press, args=("first", "The quick brown fox"))
    second = threading.Thread(target=press, args=("second", "Another writer's text"))
    try:
        with engine.lock:  # the machine is busy: both wait
            posted = engine.queue.posted
            first.start()
            until = time.monotonic() + 10
            while engine.queue.posted == posted and time.monotonic() < until:
                time.sleep(0.001)
            second.start()
            while engine.queue.posted < posted + 2 and time.monotonic() < until:
                time.sleep(0.001)
            engine.pace.step_s = 0.5  # as measured meanwhile: a 4-token row now needs ~4 s
        first.join(timeout=60)
        second.join(timeout=60)
    finally:
        engine.pace.prefill_s_per_token, engine.pace.step_s = saved
    assert results["first"].busy and results["first"].steps == 0 and results["first"].message.startswith("Busy")
    # The second, alone by then, is tried whatever the estimate says (its budget still cuts it).
    assert not results["second"].busy and results["second"].steps > 0


# ---------------------------------------------------------------- the prefix KV cache


def _fresh_logits(engine, ids):
    cache = DynamicCache(config=engine.model.config)
    logits = prefill(engine.model, torch.tensor([ids], device=engine.device), cache)
    return logits, cache


def _assert_cache_matches_fresh(engine):
    """The engine's cached prefix gives the same logits and KV as prefilling it from scratch."""
    entry = engine.prefixes.latest()
    ids = entry.ids
    fresh_logits, fresh_cache = _fresh_logits(engine, ids)
    assert entry.cache.get_seq_length() == len(ids)
    assert torch.allclose(entry.logits, fresh_logits, atol=1e-5, rtol=1e-4)
    for ours, theirs in zip(entry.cache.layers, fresh_cache.layers):
        assert torch.allclose(ours.keys, theirs.keys, atol=1e-5)
        assert torch.allclose(ours.values, theirs.values, atol=1e-5)
    # And one more step from either cache agrees too.
    import copy

    token = torch.tensor([5], device=engine.device)
    a = decode_step(engine.model, token, copy.deepcopy(entry.cache))
    b = decode_step(engine.model, token, fresh_cache)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_same_text_reuses_the_whole_cache(engine):
    settings = Settings(lengths=[4, 8], num_suggestions=2)
    first = engine.suggest("The quick brown fox jumps over", settings, seed=1)
    again = engine.suggest("The quick brown fox jumps over", settings, seed=2)
    assert first.new_prompt_tokens > 0
    assert again.new_prompt_tokens == 0
    assert again.prompt_tokens == first.prompt_tokens
    _assert_cache_matches_fresh(engine)


@pytest.mark.parametrize(
    "before, after",
    [
        ("The quick brown fox", "The quick brown fox jumps over the lazy"),  # typed on
        ("I went to the store to buy some bread", "I went to the store"),  # deleted back
        ("I went to the store to buy milk", "I went to the park to buy milk"),  # edited inside
        ("我们今天去公园", "我们今天去公园散步，天气很好"),
        ("hello 世界", "hello 世界 😀 and more"),  # byte-fallback pieces in the new part
    ],
)
def test_changed_text_prefills_only_new_tokens_and_matches_fresh(engine, before, after):
    settings = Settings(lengths=[4, 8], num_suggestions=2)
    engine.prefixes.clear()  # only ``before`` is cached
    engine.suggest(before, settings, seed=0)
    old = list(engine.prefixes.latest().ids)
    result = engine.suggest(after, settings, seed=0)
    new = engine.prefixes.latest().ids
    common = min(longest_common_prefix(old, new), len(new) - 1)
    assert common >= 1
    assert result.new_prompt_tokens == len(new) - common
    assert result.new_prompt_tokens < len(new)
    _assert_cache_matches_fresh(engine)


def test_typing_on_reuses_cache_word_by_word(engine):
    settings = Settings(lengths=[4], num_suggestions=1)
    text = "She said that the weather would be nice"
    engine.suggest(text, settings, seed=0)
    for word in " tomorrow, so we planned a picnic".split(" ")[1:]:
        text += " " + word
        result = engine.suggest(text, settings, seed=0)
        assert 0 < result.new_prompt_tokens <= len(engine.prompt_ids(" " + word, 64)[0]) + 1
    _assert_cache_matches_fresh(engine)


def test_typing_at_the_end_of_a_long_document_reuses_cache(engine):
    # Beyond the context window, the window's start must stay put while the writer types,
    # or every Tab press prefills the whole window again.
    words = "the quick brown fox jumps over lazy dog we went to store and bought bread".split()
    text = " ".join(words[(i * 7) % len(words)] for i in range(4000))
    settings = Settings(context_tokens=64, lengths=[4], num_suggestions=1)
    engine.suggest(text, settings, seed=0)
    small = 0
    for word in ["and", "the", "fox", "went", "to", "store", "we", "bought"]:
        text += " " + word
        result = engine.suggest(text, settings, seed=0)
        assert result.truncated
        small += result.new_prompt_tokens <= 8
    assert small >= 6  # the window may move now and then, not on every word
    _assert_cache_matches_fresh(engine)


def test_generation_does_not_touch_the_prefix_cache(engine):
    settings = Settings(lengths=[16, 32], num_suggestions=2, max_time=30)
    engine.suggest("The quick brown fox jumps", settings, seed=3)
    ids = list(engine.prefixes.latest().ids)
    engine.suggest("The quick brown fox jumps", settings, seed=4)
    assert engine.prefixes.latest().ids == ids
    _assert_cache_matches_fresh(engine)
