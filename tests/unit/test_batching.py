"""Many presses in one forward pass: padded batches, kept prefixes, the engine's worker.

Tiny random-weight models built here (Llama, GPT-2, and a Gemma 3 with a short sliding
window), so a batch of rows from different prompts can be checked against each prompt run
alone: left padding, per-row positions and dropping rows must not change a single logit.
"""

from __future__ import annotations

import itertools
import threading
import time

import pytest
import torch
import transformers
from transformers import DynamicCache

from models.batching import BatchKV, PrefixStore
from models.settings import Settings
from models.steps import decode_step, prefill
from tests.unit.test_engine_logic import build_tokenizer, tiny_llama_engine

VOCAB = 300


def tiny(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        )
        return transformers.LlamaForCausalLM(config).eval()
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=256)
        return transformers.GPT2LMHeadModel(config).eval()
    config = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, sliding_window=48, max_position_embeddings=256,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    )
    return transformers.Gemma3ForCausalLM(config).eval()


def solo(model, prompt: list[int], fed: list[int]) -> list[torch.Tensor]:
    """Logits of ``prompt`` then each token of ``fed``, one prompt alone (no padding)."""
    cache = DynamicCache(config=model.config)
    out = [prefill(model, torch.tensor([prompt]), cache)[0]]
    for t in fed:
        out.append(decode_step(model, torch.tensor([t]), cache)[0])
    return out


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma3"])
def test_padded_batch_of_different_prompts_matches_each_alone(kind):
    model = tiny(kind)
    g = torch.Generator().manual_seed(1)
    short = torch.randint(3, VOCAB, (5,), generator=g).tolist()
    long = torch.randint(3, VOCAB, (13,), generator=g).tolist()
    fed = torch.randint(3, VOCAB, (3, 6), generator=g)  # tokens fed to rows 0, 1 (short) and 2 (long)
    kv = BatchKV(model.config, limit=40)
    caches = {}
    for prompt in (short, long):
        caches[len(prompt)] = DynamicCache(config=model.config)
        prefill(model, torch.tensor([prompt]), caches[len(prompt)])
    kv.add(caches[5], 5, 2)  # the short prompt starts the batch, the long one joins it
    assert kv.fits(13, 6)
    kv.add(caches[13], 13, 1)
    assert kv.width == 13 and kv.mask[:2].sum() == 10 and kv.mask[2].sum() == 13
    got = []
    for step in range(4):
        got.append(kv.step(model, fed[:, step]))
    # The long prompt's row leaves: its columns of padding in the short rows are trimmed away.
    kv.keep([0, 1])
    assert kv.width == 5 + 4 and bool(kv.mask.all())
    for step in range(4, 6):
        got.append(kv.step(model, fed[:2, step]))
    for row, prompt in [(0, short), (1, short), (2, long)]:
        expected = solo(model, prompt, fed[row].tolist())
        steps = range(6) if row < 2 else range(4)
        for step in steps:
            assert torch.allclose(got[step][row], expected[step + 1], atol=1e-4, rtol=1e-4), (kind, row, step)
    # The prompt caches the batch was built from are untouched.
    assert caches[5].get_seq_length() == 5 and caches[13].get_seq_length() == 13


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_rows_leaving_a_press_keep_their_buffers_and_give_what_each_row_alone_gives(kind):
    model = tiny(kind)
    prompt = [3, 5, 7, 9, 11, 13]
    g = torch.Generator().manual_seed(2)
    fed = torch.randint(3, 60, (6, 6), generator=g)
    kv = BatchKV(model.config, limit=40)
    cache = DynamicCache(config=model.config)
    prefill(model, torch.tensor([prompt]), cache)
    kv.add(cache, len(prompt), 6, 8)
    buffer = kv.cache.layers[0].keys.data_ptr()
    rows = list(range(6))
    for step in range(6):
        logits = kv.step(model, fed[step, rows])
        for i, row in enumerate(rows):  # each row as it would go alone
            expected = solo(model, prompt, fed[: step + 1, row].tolist())[-1]
            assert torch.allclose(logits[i], expected, atol=1e-4), (kind, step, row)
        if step in (0, 2, 3):  # a press's rows leave: 6 -> 3 -> 2 -> 1, in order
            keep = {0: [1, 3, 4], 2: [0, 2], 3: [1]}[step]
            rows = [rows[i] for i in keep]
            kv.keep(keep)
            assert kv.cache.layers[0].keys.data_ptr() == buffer  # moved up in place, no new buffers


def test_batch_refuses_to_grow_past_its_limit():
    model = tiny("gemma3")
    kv = BatchKV(model.config, limit=47)
    cache = DynamicCache(config=model.config)
    prefill(model, torch.tensor([list(range(3, 23))]), cache)
    assert kv.fits(60, 100)  # an empty batch takes anything (it is never padded)
    kv.add(cache, 20, 1)
    assert kv.fits(20, 27) and not kv.fits(20, 28) and not kv.fits(40, 8)


def test_prefix_store_keeps_each_writers_prefix():
    model = tiny("llama")
    store = PrefixStore(model, model.config, limit=200, size=3)
    a = list(range(10, 40))
    b = list(range(100, 130))
    _, _, n = store.prefill(a, "cpu")
    assert n == 30
    _, _, n = store.prefill(b, "cpu")
    assert n == 30
    _, _, n = store.prefill(a + [41, 42], "cpu")  # writer A typed on, after B's press
    assert n == 2
    _, _, n = store.prefill(b[:20] + [7, 8], "cpu")  # B edited further back: a copy, B's own entry stays
    assert n == 2
    _, logits, n = store.prefill(b, "cpu")
    assert n == 0
    fresh = DynamicCache(config=model.config)
    assert torch.allclose(logits, prefill(model, torch.tensor([b]), fresh), atol=1e-5)
    assert len(store) == 3
    store.prefill(list(range(200, 230)), "cpu")
    assert len(store) == 3  # least recently used entry dropped


# ---------------------------------------------------------------- the engine's worker


@pytest.fixture(scope="module")
def engine():
    return tiny_llama_engine(build_tokenizer())


TEXTS = ["The quick brown fox", "我们今天去公园散步，天气很好。然后", "She said that the weather would", "hello 世界 and"]


def test_presses_arriving_together_share_forward_passes_and_match_alone(engine):
    settings = Settings(lengths=[6, 12, 24], num_suggestions=3, max_time=30)
    alone = [engine.suggest(text, settings, seed=i).texts for i, text in enumerate(TEXTS)]
    results: dict[int, object] = {}

    def press(i: int) -> None:
        results[i] = engine.suggest(TEXTS[i], settings, seed=i)

    # Hold the model while all four presses queue up, so the worker takes them together.
    with engine.lock:
        threads = [threading.Thread(target=press, args=(i,)) for i in range(len(TEXTS))]
        for t in threads:
            t.start()
        until = time.monotonic() + 10
        while time.monotonic() < until and engine.queue.pending() + sum(len(b.presses()) for b in engine.batches) < 3:
            time.sleep(0.01)
    for t in threads:
        t.join(timeout=60)
    assert all(not t.is_alive() for t in threads)
    assert max(r.peak_batch for r in results.values()) >= 3
    # Sharing a batch (padding, other rows joining and leaving) changes nothing in what each gets.
    assert [results[i].texts for i in range(len(TEXTS))] == alone


def test_a_failing_press_does_not_stop_the_others(engine):
    settings = Settings(lengths=[4, 8], num_suggestions=2, max_time=30)

    def broken_cancel_check():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        engine.suggest("The quick brown fox", settings, is_cancelled=broken_cancel_check)
    result = engine.suggest("The quick brown fox", settings, seed=0)
    assert result.steps > 0 and not result.cancelled and engine.queue.worker is not None
    assert result.texts == engine.suggest("The quick brown fox", settings, seed=0).texts


def test_cancelled_press_leaves_the_batch_and_others_finish(engine):
    settings = Settings(lengths=[40], num_suggestions=2, max_time=30)
    short = Settings(lengths=[4], num_suggestions=1, max_time=30)
    alone = engine.suggest("I went to the store", short, seed=2)
    asked = itertools.count()

    def cancelled_after_two_steps() -> bool:  # asked when the press is admitted, then after each step
        return next(asked) >= 2

    results = {}

    def press(name, text, settings, **kwargs):
        results[name] = engine.suggest(text, settings, **kwargs)

    threads = [
        threading.Thread(target=press, args=("long", "The quick brown fox", settings), kwargs={"is_cancelled": cancelled_after_two_steps, "seed": 1}),
        threading.Thread(target=press, args=("other", "I went to the store", short), kwargs={"seed": 2}),
    ]
    posted = engine.queue.posted
    with engine.lock:  # both are posted before the first of them runs a step: they share a batch
        for n, t in enumerate(threads, 1):
            t.start()
            until = time.monotonic() + 10
            while engine.queue.posted < posted + n and time.monotonic() < until:
                time.sleep(0.001)
    for t in threads:
        t.join(timeout=60)
    long_, other = results["long"], results["other"]
    assert long_.cancelled and long_.steps == 2  # rows of 40 tokens: only the cancel ends it there
    assert other.peak_batch == 2 and not other.cancelled
    assert other.texts == alone.texts  # the cancelled rows left the batch without touching the others
    until = time.monotonic() + 10  # the worker drops the empty batch right after the last press's answer
    while engine.batches and time.monotonic() < until:
        time.sleep(0.001)
    assert not engine.batches


def test_press_whose_caller_went_away_is_cancelled(engine):
    settings = Settings(lengths=[200], num_suggestions=3, max_time=30)
    asked = []

    def gone() -> bool:  # asked from the calling thread while the press waits or runs
        asked.append(threading.current_thread())
        return True

    holder = threading.Thread(target=lambda: (engine.lock.acquire(), time.sleep(0.6), engine.lock.release()))
    holder.start()
    time.sleep(0.05)
    result = engine.suggest("The quick brown fox", settings, caller_gone=gone)
    holder.join()
    assert result.cancelled and result.steps == 0 and not result.suggestions
    assert asked and set(asked) == {threading.current_thread()}


def test_serve_here_runs_presses_on_the_given_thread_and_hands_over_when_stopped(engine):
    stop = threading.Event()
    served_by = []
    here = threading.Thread(target=engine.serve, args=(stop,), name="resident")
    here.start()
    time.sleep(0.1)
    result = engine.suggest("The quick brown fox", Settings(lengths=[4], num_suggestions=1), seed=0,
                            on_update=lambda found: served_by.append(threading.current_thread().name))
    assert result.steps > 0 and served_by and set(served_by) == {"resident"}
    stop.set()
    here.join(timeout=10)
    assert not here.is_alive()
    after = engine.suggest("The quick brown fox", Settings(lengths=[4], num_suggestions=1), seed=0)
    assert after.texts == result.texts  # a worker thread of its own takes over
