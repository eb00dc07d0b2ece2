"""How likely the model finds a text: perplexity, bits per character, and per-token ranks.

Perplexity is exp(mean negative log-likelihood per token), the N-th root of 1/P(text).
Bits per character divides the same total by ln 2 and by the number of characters, so it
compares across tokenizers. Each token also gets its rank under the model (1 = the model's
first choice), which GLTR colours in buckets: top 10, top 100, top 1000, beyond.

Long documents are scored in windows: each window re-reads a little of the previous one
as context, so no token is scored without any context but the first.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from models.engine import SuggestionEngine, clean_prompt

WINDOW = 512  # tokens scored per forward pass
OVERLAP = 64  # tokens of the previous window re-read as context
MAX_TOKENS = 4096  # longer documents: the last MAX_TOKENS tokens are scored
ALTERNATIVES = 5


def token_spans(text: str, offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Character span of each token such that the spans tile ``text`` exactly, in order.

    Byte-level tokenizers map several tokens to one character (an emoji is 4 byte tokens):
    the first gets the character, the others an empty span.
    """
    spans, position = [], 0
    for start, end in offsets:
        start = position  # any gap (a space the tokenizer folded in) joins this token
        end = max(end, start)
        spans.append((start, end))
        position = end
    if spans and position < len(text):
        spans[-1] = (spans[-1][0], len(text))
    return spans


@torch.inference_mode()
def score(
    engine: SuggestionEngine,
    text: str,
    alternatives: int = ALTERNATIVES,
    on_progress: Callable[[float], None] | None = None,
) -> dict:
    if hasattr(engine, "score"):  # a model behind a server (models/remote.py) scores through its API
        return engine.score(text, alternatives=alternatives, on_progress=on_progress)
    text = clean_prompt(text or "")
    if not text.strip():
        return {"error": "Nothing to score: the document is empty."}
    tokenizer, model = engine.tokenizer, engine.model
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc.input_ids), [tuple(o) for o in enc.offset_mapping]
    truncated = len(ids) > MAX_TOKENS
    cut = 0
    if truncated:
        ids, offsets = ids[-MAX_TOKENS:], offsets[-MAX_TOKENS:]
        cut = offsets[0][0]
        text, offsets = text[cut:], [(s - cut, e - cut) for s, e in offsets]
    spans = token_spans(text, offsets)
    bos = [engine.bos_id] if engine.bos_id is not None else []
    results: list[dict] = []
    total_nll, scored_chars = 0.0, 0
    first = 0 if bos else 1  # without a BOS token the first token has nothing to be predicted from
    if not bos and ids:
        s, e = spans[0]
        results.append({"text": text[s:e], "start": s, "end": e, "prob": None, "rank": None, "alternatives": []})
    windows = list(range(first, len(ids), WINDOW))
    for n, start in enumerate(windows):
        end = min(start + WINDOW, len(ids))
        context_start = max(0, start - OVERLAP)
        feed = (bos if context_start == 0 else []) + ids[context_start:end]
        with engine.lock:  # one window at a time, so Tab presses of other writers go on in between
            logits = model(input_ids=torch.tensor([feed], device=engine.device)).logits[0].float()
        # logits[k] predicts feed[k + 1]; the targets are ids[start:end].
        offset = len(feed) - (end - start) - 1
        logp = torch.log_softmax(logits[offset : offset + (end - start)], dim=-1)
        targets = torch.tensor(ids[start:end], device=logp.device)
        target_logp = logp.gather(1, targets[:, None]).squeeze(1)
        ranks = (logp > target_logp[:, None]).sum(dim=1) + 1
        # Alternatives are text the writer could use: no control tokens such as <start_of_image>.
        top_logp, top_ids = logp.index_fill(1, engine.stop_ids, float("-inf")).topk(alternatives, dim=-1)
        for k, token_index in enumerate(range(start, end)):
            s, e = spans[token_index]
            nll = -target_logp[k].item()
            total_nll += nll
            scored_chars += e - s
            results.append(
                {
                    "text": text[s:e],
                    "start": s,
                    "end": e,
                    "prob": math.exp(-nll),
                    "rank": int(ranks[k]),
                    "alternatives": [
                        {"text": tokenizer.decode([int(i)]), "prob": math.exp(float(lp))}
                        for lp, i in zip(top_logp[k].tolist(), top_ids[k].tolist())
                    ],
                }
            )
        if on_progress is not None:
            on_progress((n + 1) / len(windows))
    return summary(engine.name, results, total_nll, scored_chars, truncated, cut)


def summary(model: str, tokens: list[dict], total_nll: float, scored_chars: int, truncated: bool, text_offset: int) -> dict:
    """The score of a text from its scored tokens (a token with ``prob`` None had nothing to be predicted from).

    Used for a local model here and for a model on a server (models/remote.py).
    """
    count = sum(1 for t in tokens if t["prob"] is not None)
    return {
        "model": model,
        "perplexity": math.exp(total_nll / count) if count else None,
        "bits_per_char": total_nll / math.log(2) / max(1, scored_chars) if count else None,
        "token_count": len(tokens),
        "truncated": truncated,
        "text_offset": text_offset,  # token spans are relative to this character of the (cleaned) text
        "tokens": tokens,
    }
