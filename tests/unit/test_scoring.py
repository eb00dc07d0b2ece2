"""Perplexity and per-token ranks on a tiny random-weight model, checked against a direct computation."""

from __future__ import annotations

import math

import pytest
import torch

from models import scoring
from models.scoring import score, token_spans
from tests.unit.test_engine_logic import build_tokenizer, tiny_llama_engine

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
