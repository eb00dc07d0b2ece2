"""Perplexity and per-token ranks on a tiny random-weight model, checked against a direct computation."""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch

from models import scoring
from models.scoring import score, token_spans
from tests.unit.test_engine_logic import build_tokenizer, tiny_llama_engine
from tests.serving import wait_for

TEXT = "The quick brown fox jumps over the lazy dog.\n我们今天去公园散步。 👩‍💻 <b>bold</b>"


@pytest.fixture(scope="module")
def engine():
    return tiny_llama_engine(build_tokenizer(), seed=1, context_length=2048)


def test_token_spans_tile_the_text():
    text = "ab cd 👩"
    spans = token_spans(text, [(0, 2), (2, 5), (6, 7), (6, 7), (6, 7)])
    assert "".join(text[s:e] for s, e in spans) == text
    assert spans[0] == (0, 2) and spans[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_tokens_cover_the_text_and_match_a_direct_computation(engine):
    result = score(engine, TEXT)
    tokens = result["tokens"]
    assert "".join(t["text"] for t in tokens) == TEXT
    # Direct: one forward pass over BOS + ids, log-softmax, the targets' log-probs.
    ids = engine.tokenizer(TEXT, add_special_tokens=False).input_ids
    with torch.inference_mode():
        logits = engine.model(input_ids=torch.tensor([[engine.bos_id] + ids])).logits[0, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids)[:, None]).squeeze(1)
    assert [t["prob"] for t in tokens] == pytest.approx(logp.exp().tolist(), rel=1e-4)
    nll = -logp.sum().item()
    assert result["perplexity"] == pytest.approx(math.exp(nll / len(ids)), rel=1e-4)
    assert result["bits_per_char"] == pytest.approx(nll / math.log(2) / len(TEXT), rel=1e-4)


def test_ranks_and_alternatives_are_consistent(engine):
    for token in score(engine, TEXT, alternatives=4)["tokens"]:
        probs = [a["prob"] for a in token["alternatives"]]
        assert len(probs) == 4 and probs == sorted(probs, reverse=True)
        assert token["rank"] >= 1
        # Rank 1 means no alternative is more likely than the token itself.
        assert (token["rank"] == 1) == (token["prob"] >= probs[0] - 1e-6)


def test_long_text_is_scored_in_windows_with_progress(engine, monkeypatch):
    monkeypatch.setattr(scoring, "WINDOW", 16)
    monkeypatch.setattr(scoring, "OVERLAP", 4)
    progress: list[float] = []
    long_text = TEXT * 4
    result = score(engine, long_text, on_progress=progress.append)
    assert "".join(t["text"] for t in result["tokens"]) == long_text
    assert len(progress) > 2 and progress == sorted(progress) and progress[-1] == 1.0
    assert all(t["prob"] is not None and 0 < t["prob"] <= 1 for t in result["tokens"])


def test_very_long_text_keeps_the_end(engine, monkeypatch):
    monkeypatch.setattr(scoring, "MAX_TOKENS", 40)
    result = score(engine, TEXT * 5)
    assert result["truncated"] and result["token_count"] == 40
    assert (TEXT * 5)[result["text_offset"]:] == "".join(t["text"] for t in result["tokens"])


def test_empty_text_is_a_clear_error(engine):
    assert "empty" in score(engine, "  \n ")["error"]


# ---------------------------------------------------------------- bounded memory: the output layer in chunks


def reference_score(engine, text: str, alternatives: int = scoring.ALTERNATIVES) -> list[dict]:
    """The unchunked computation (what scoring did before): each window's full [T, V] logits, log-softmax, gather."""
    ids = engine.tokenizer(text, add_special_tokens=False).input_ids
    bos = [engine.bos_id] if engine.bos_id is not None else []
    out = []
    for start in range(0 if bos else 1, len(ids), scoring.WINDOW):
        end = min(start + scoring.WINDOW, len(ids))
        context_start = max(0, start - scoring.OVERLAP)
        feed = bos + ids[context_start:end]  # every window starts with BOS, as a document does
        with torch.inference_mode():
            logits = engine.model(input_ids=torch.tensor([feed])).logits[0].float()
            offset = len(feed) - (end - start) - 1
            logp = torch.log_softmax(logits[offset : offset + (end - start)], dim=-1)
            target = logp.gather(1, torch.tensor(ids[start:end])[:, None]).squeeze(1)
            ranks = (logp > target[:, None]).sum(dim=1) + 1
            top_logp, top_ids = logp.index_fill(1, engine.stop_ids, float("-inf")).topk(alternatives, dim=-1)
        for k in range(end - start):
            out.append({"logp": float(target[k]), "rank": int(ranks[k]), "top": top_ids[k].tolist(), "top_logp": top_logp[k].tolist()})
    return out


def tiny_engine(kind: str, tok, softcap: float | None = None):
    import transformers

    from tests.unit.test_engine_logic import wrap

    torch.manual_seed(3)
    common = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if kind == "llama":
        config = transformers.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, **common,
        )
        model = transformers.LlamaForCausalLM(config)
    elif kind == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=2048, **common)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.Gemma3TextConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=1, head_dim=32, sliding_window=48, max_position_embeddings=2048,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            final_logit_softcapping=softcap, **common,
        )
        model = transformers.Gemma3ForCausalLM(config)
    with torch.no_grad():  # sharper than a random init, so ranks and alternatives are spread out
        model.get_output_embeddings().weight.mul_(8.0)
    return wrap(model, tok, 2048)


def assert_same_as_reference(result: dict, expected: list[dict]) -> None:
    scored = [t for t in result["tokens"] if t["prob"] is not None]
    assert len(scored) == len(expected)
    for token, want in zip(scored, expected):
        assert math.log(token["prob"]) == pytest.approx(want["logp"], rel=1e-5, abs=1e-5)
        assert token["rank"] == want["rank"]
        assert [a["prob"] for a in token["alternatives"]] == pytest.approx([math.exp(v) for v in want["top_logp"]], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("kind,softcap", [("llama", None), ("gpt2", None), ("gemma3", None), ("gemma3", 3.0)])
def test_chunked_scoring_equals_full_logits(kind, softcap, monkeypatch):
    """Windows of 24 tokens, 8 of context, output layer 16 rows at a time: chunks start mid-window
    and end past it, and no [T, V] tensor of a whole window is ever made (read_all is not called)."""
    from models import steps

    tok = build_tokenizer()
    engine = tiny_engine(kind, tok, softcap)
    monkeypatch.setattr(scoring, "WINDOW", 24)
    monkeypatch.setattr(scoring, "OVERLAP", 8)
    monkeypatch.setattr(scoring, "SCORE_CHUNK", 16)
    text = TEXT * 3
    expected = reference_score(engine, text, alternatives=4)
    rows: list[int] = []
    read_logits = steps.read_logits

    def spy(model, hidden):
        rows.append(hidden.shape[0])
        return read_logits(model, hidden)

    scoring._split_head_works(engine)  # checked once per model (the check itself reads a few tokens whole)
    monkeypatch.setattr(steps, "read_logits", spy)
    monkeypatch.setattr(steps, "read_all", lambda *a: pytest.fail("read_all: full-vocabulary logits of a whole window"))
    result = score(engine, text, alternatives=4)
    assert "".join(t["text"] for t in result["tokens"]) == text
    assert_same_as_reference(result, expected)
    assert rows and max(rows) <= 16


def test_softcapping_is_applied_like_transformers():
    tok = build_tokenizer()
    engine = tiny_engine("gemma3", tok, softcap=3.0)
    from models.steps import read_hidden, read_logits

    ids = torch.tensor([[1, 5, 9, 30, 31]])
    with torch.inference_mode():
        whole = engine.model(input_ids=ids).logits[0]
        parts = read_logits(engine.model, read_hidden(engine.model, ids)[2:4])
    assert whole.abs().max() <= 3.0
    assert torch.allclose(parts, whole[2:4], atol=1e-6)


def test_tuned_output_layer_gives_the_same_scores(monkeypatch):
    """With the output layer replaced by a tuned kernel (int8-screen quantizes rows in groups), the
    chunks are aligned as one pass over the window would have them: the same numbers as read_all."""
    from models import kernels
    from models.steps import read_all

    assert scoring.SCORE_ALIGN == kernels.SCREEN_ROWS and scoring.SCORE_CHUNK % scoring.SCORE_ALIGN == 0
    way = kernels.KERNELS["int8-screen"] if kernels.KERNELS["int8-screen"].available() else kernels.KERNELS["fp32"]
    tok = build_tokenizer()
    engine = tiny_engine("llama", tok)
    head = engine.model.lm_head
    prepared = way.prepare(head.weight.detach().float(), None)
    engine.model.lm_head = kernels.TunedLinear(head, (way.name, prepared), (way.name, prepared), few_rows=4)
    monkeypatch.setattr(scoring, "WINDOW", 100)
    monkeypatch.setattr(scoring, "OVERLAP", 40)
    text = TEXT * 4
    expected = []
    ids = tok(text, add_special_tokens=False).input_ids
    for start in range(0, len(ids), 100):  # the reference through read_all (the tuned layer, all rows at once)
        end = min(start + 100, len(ids))
        feed = [engine.bos_id] + ids[max(0, start - 40) : end]  # BOS first in every window
        offset = len(feed) - (end - start) - 1
        logp = torch.log_softmax(read_all(engine.model, torch.tensor([feed]))[offset : offset + end - start], -1)
        target = logp.gather(1, torch.tensor(ids[start:end])[:, None]).squeeze(1)
        expected += [float(v) for v in target]
    got = [math.log(t["prob"]) for t in score(engine, text)["tokens"]]
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_text_is_cut_before_it_is_tokenized(engine, monkeypatch):
    monkeypatch.setattr(scoring, "MAX_TOKENS", 40)
    seen: list[int] = []
    tokenizer = engine.tokenizer

    class Spy:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, text, **kw):
            seen.append(len(text))
            return tokenizer(text, **kw)

    monkeypatch.setattr(engine, "tokenizer", Spy())
    huge = TEXT * 100_000  # ~8 MB
    result = score(engine, huge)
    assert max(seen) <= 40 * scoring.MAX_CHARS_PER_TOKEN
    assert result["truncated"] and result["token_count"] == 40
    assert huge[result["text_offset"]:] == "".join(t["text"] for t in result["tokens"])


# ---------------------------------------------------------------- at most a few at a time


def test_busy_beyond_the_queue(engine, monkeypatch):
    """One scoring runs (held on the engine's lock), two wait; a fourth is told at once to try again."""
    for name in (scoring.CONCURRENCY_ENV, scoring.QUEUE_ENV, scoring.WAIT_ENV):
        monkeypatch.delenv(name, raising=False)
    limiter = scoring._limiter(engine)
    results: list[dict] = []
    threads = [threading.Thread(target=lambda: results.append(score(engine, TEXT))) for _ in range(3)]
    engine.lock.acquire()
    try:
        threads[0].start()
        wait_for(lambda: limiter.running == 1)
        for t in threads[1:]:
            t.start()
        wait_for(lambda: limiter.waiting == 2)
        started = time.monotonic()
        assert score(engine, TEXT) == {"error": scoring.BUSY}
        assert time.monotonic() - started < 1.0
    finally:
        engine.lock.release()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 3 and all("perplexity" in r for r in results)
    assert limiter.running == 0 and limiter.waiting == 0
    assert "perplexity" in score(engine, TEXT)  # free again


def test_a_waiting_scoring_gives_up_after_a_bounded_wait(engine, monkeypatch):
    monkeypatch.setenv(scoring.WAIT_ENV, "0.3")
    limiter = scoring._limiter(engine)
    results: list[dict] = []
    first = threading.Thread(target=lambda: results.append(score(engine, TEXT)))
    engine.lock.acquire()
    try:
        first.start()
        wait_for(lambda: limiter.running == 1)
        started = time.monotonic()
        assert score(engine, TEXT) == {"error": scoring.BUSY}
        assert 0.25 < time.monotonic() - started < 5
    finally:
        engine.lock.release()
    first.join(timeout=60)
    assert "perplexity" in results[0]


def test_configured_concurrency_and_no_queue(engine, monkeypatch):
    monkeypatch.setenv(scoring.CONCURRENCY_ENV, "2")
    monkeypatch.setenv(scoring.QUEUE_ENV, "0")
    limiter = scoring._limiter(engine)
    results: list[dict] = []
    threads = [threading.Thread(target=lambda: results.append(score(engine, TEXT))) for _ in range(2)]
    engine.lock.acquire()
    try:
        for t in threads:
            t.start()
        wait_for(lambda: limiter.running == 2)
        assert score(engine, TEXT) == {"error": scoring.BUSY}
    finally:
        engine.lock.release()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 2 and all("perplexity" in r for r in results)


def test_each_engine_has_its_own_limit(engine, monkeypatch):
    monkeypatch.setenv(scoring.QUEUE_ENV, "0")
    other = tiny_llama_engine(build_tokenizer(), seed=2, context_length=2048)
    results: list[dict] = []
    first = threading.Thread(target=lambda: results.append(score(engine, TEXT)))
    engine.lock.acquire()
    try:
        first.start()
        wait_for(lambda: scoring._limiter(engine).running == 1)
        assert score(engine, TEXT) == {"error": scoring.BUSY}
        assert "perplexity" in score(other, TEXT)
    finally:
        engine.lock.release()
    first.join(timeout=60)
    assert "perplexity" in results[0]


def test_scoring_stops_when_the_caller_goes_away(engine, monkeypatch):
    monkeypatch.setattr(scoring, "WINDOW", 16)
    monkeypatch.setattr(scoring, "OVERLAP", 4)
    progress: list[float] = []

    def gone() -> bool:  # the HTTP client disconnects once the first window is done
        return bool(progress)

    result = score(engine, "the quick brown fox jumps over the lazy dog " * 12, on_progress=progress.append, caller_gone=gone)
    assert result == {"error": scoring.GONE}
    assert progress and progress[-1] < 0.5  # stopped after the first window, far from the end
    # The slot is free again: the next scoring runs to the end.
    full = score(engine, "the quick brown fox jumps over the lazy dog " * 12, caller_gone=lambda: False)
    assert "error" not in full and full["tokens"]


def test_a_scoring_steps_aside_for_a_tab_press_within_its_window():
    # A press that comes while a scoring window is being read runs before that window ends
    # (the scoring lets go of the model at the next layer), not after it.
    from models.settings import Settings

    engine = tiny_llama_engine(build_tokenizer(), seed=3, context_length=2048)
    inside, go = threading.Event(), threading.Event()
    scorer: list[threading.Thread] = []

    def window(hidden: torch.Tensor) -> bool:  # the scoring's window, not its 8-token check of the model
        return threading.current_thread() in scorer and hidden.shape[1] > 8

    def hold_first_layer(module, args):  # in the scoring's first window, once: wait there for the test
        if window(args[0]) and not inside.is_set():
            inside.set()
            go.wait(10)

    results: dict[str, object] = {}
    read: list[str] = []  # whose pass went through every layer, in order

    def body_read(module, args, output):
        if threading.current_thread() not in scorer:
            read.append("press")
        elif window(args[0]):
            read.append("scoring")

    engine.model.model.layers[0].register_forward_pre_hook(hold_first_layer)
    engine.model.model.norm.register_forward_hook(body_read)
    scorer.append(threading.Thread(target=lambda: results.update(score=score(engine, TEXT * 3))))
    scorer[0].start()
    assert inside.wait(10)

    def press() -> None:
        results["press"] = engine.suggest("The quick brown", Settings(lengths=[4], num_suggestions=1, max_time=30), seed=0)

    presser = threading.Thread(target=press)
    presser.start()
    from models.scheduler import FOREGROUND
    wait_for(FOREGROUND.busy)
    go.set()
    presser.join(30)
    scorer[0].join(30)
    assert results["press"].texts and "perplexity" in results["score"]
    assert read[0] == "press", f"the press waited for the scoring's window: {read}"
