"""How likely the model finds a text: perplexity, bits per character, and per-token ranks.

Perplexity is exp(mean negative log-likelihood per token), the N-th root of 1/P(text).
Bits per character divides the same total by ln 2 and by the number of characters, so it
compares across tokenizers. Each token also gets its rank under the model (1 = the model's
first choice), which GLTR colours in buckets: top 10, top 100, top 1000, beyond.

Long documents are scored in windows: each window re-reads a little of the previous one
as context, so no token is scored without any context but the first.

Both backends score here, side by side: ``score_local`` runs the model in this process
(models/engine.py), ``score_remote`` reads the log-probabilities a server returns for the
echoed text (models/remote.py). torch is imported by the first only, so the remote backend
runs without it.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Callable

from models.core import MARKUP, EngineError, clean_prompt

if TYPE_CHECKING:
    from models.engine import SuggestionEngine
    from models.remote import OpenAICompletionsBackend

WINDOW = 512  # tokens scored per forward pass
OVERLAP = 64  # tokens of the previous window re-read as context
MAX_TOKENS = 4096  # longer documents: the last MAX_TOKENS tokens are scored
ALTERNATIVES = 5
EMPTY = "Nothing to score: the document is empty."

# A model on a server: text instead of tokens.
NO_PROMPT_LOGPROBS = "The perplexity view needs a local model or a server that returns prompt logprobs"
REMOTE_WINDOW_CHARS = 2000  # text scored per request (about 500 tokens, like WINDOW)
REMOTE_CONTEXT_CHARS = 256  # text of the previous window re-read as context
REMOTE_MAX_CHARS = 16000  # longer documents: their end is scored (about MAX_TOKENS tokens)
RANKS_KNOWN = 10  # top log-probabilities asked per scored token: ranks up to this are exact


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


def score(backend, text: str, alternatives: int = ALTERNATIVES, on_progress: Callable[[float], None] | None = None) -> dict:
    """The perplexity view's result for ``text`` under ``backend`` (models/core.py's Backend), or {"error": ...}."""
    return backend.score(text, alternatives=alternatives, on_progress=on_progress)


def score_local(
    engine: "SuggestionEngine",
    text: str,
    alternatives: int = ALTERNATIVES,
    on_progress: Callable[[float], None] | None = None,
) -> dict:
    import torch

    from models.steps import read_all

    text = clean_prompt(text or "")
    if not text.strip():
        return {"error": EMPTY}
    tokenizer = engine.tokenizer
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
            logits = read_all(engine.model, torch.tensor([feed], device=engine.device))
        # logits[k] predicts feed[k + 1]; the targets are ids[start:end].
        offset = len(feed) - (end - start) - 1
        with torch.inference_mode():
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

    Used for a local model and for a model on a server.
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


# ---------------------------------------------------------------- a model on a server


def score_remote(
    backend: "OpenAICompletionsBackend",
    text: str,
    alternatives: int = ALTERNATIVES,
    on_progress: Callable[[float], None] | None = None,
) -> dict:
    """The same result from the server's log-probabilities of the echoed text.

    The text is scored in windows of about 500 tokens that re-read the end of the previous
    one as context. Ranks are exact up to 10 (the top log-probabilities asked for); a token
    the model ranks lower gets ``rank`` None and ``rank_above``: how many tokens are known to
    be more likely.
    """
    try:
        return _score_remote(backend, clean_prompt(text or ""), alternatives, on_progress)
    except EngineError as e:
        return {"error": f"Not scored: {e}."}


def _score_remote(backend, text: str, alternatives: int, on_progress) -> dict:
    if not text.strip():
        return {"error": EMPTY}
    if not backend.features.logprobs:
        return {"error": f"{NO_PROMPT_LOGPROBS} ({backend.features.note or 'this one does not'})."}
    truncated = len(text) > REMOTE_MAX_CHARS
    cut = 0
    if truncated:
        cut = len(text) - REMOTE_MAX_CHARS
        space = re.search(r"\s", text[cut : cut + 64])
        cut += space.end() if space else 0
        text = text[cut:]
    windows = _text_windows(text)
    asked = max(alternatives, RANKS_KNOWN)
    starts: list[int] = []
    scored: list[tuple[str, float | None, dict]] = []  # (server's token, log-probability, top log-probabilities)
    for n, (start, end) in enumerate(windows):
        context = _context_start(text, start)
        prompt = text[context:end]
        lp = backend.echo_logprobs(prompt, asked)
        try:
            tokens, offsets = lp["tokens"], lp["text_offset"]
            values, tops = lp["token_logprobs"], lp["top_logprobs"]
        except (KeyError, IndexError, TypeError):
            return {"error": f"{NO_PROMPT_LOGPROBS} ({backend.endpoint} did not)."}
        # The offsets must point at the tokens in the prompt (a server that counted a special
        # token's text would shift them all): most tokens are found where they are said to be.
        placed = [(str(t), o) for t, o in zip(tokens, offsets) if isinstance(o, int) and o < len(prompt)]
        if sum(1 for t, o in placed if t and prompt.startswith(t, o)) < 0.5 * len(placed):
            return {"error": f"{NO_PROMPT_LOGPROBS} ({backend.endpoint} sent token offsets that do not match the text)."}
        for token, offset, value, top in zip(tokens, offsets, values, tops):
            absolute = context + int(offset)
            if absolute < start or absolute >= end:
                continue  # context re-read, or the one generated token
            starts.append(absolute)
            scored.append((str(token), value, top if isinstance(top, dict) else {}))
        if on_progress is not None:
            on_progress((n + 1) / len(windows))
    if not starts:
        return {"error": f"{NO_PROMPT_LOGPROBS} ({backend.endpoint} returned none)."}
    starts[0] = 0
    spans = [(s, e) for s, e in zip(starts, starts[1:] + [len(text)])]
    results, total_nll, scored_chars = [], 0.0, 0
    for (s, e), (token, value, top) in zip(spans, scored):
        e = max(e, s)
        piece = text[s:e]
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            results.append({"text": piece, "start": s, "end": e, "prob": None, "rank": None, "alternatives": []})
            continue
        total_nll -= value
        scored_chars += e - s
        listed = {str(t): float(v) for t, v in top.items() if isinstance(v, (int, float))}
        better = sum(1 for t, v in listed.items() if v > value and t != token)
        # The server lists the top log-probabilities, plus the token itself where it is not
        # among them (llama.cpp, vLLM): then all that is known is that it ranks lower.
        known = token in listed and (len(listed) <= asked or better + 1 < len(listed))
        ranked = sorted(((t, v) for t, v in listed.items() if not MARKUP.fullmatch(t)), key=lambda item: -item[1])
        entry = {
            "text": piece, "start": s, "end": e, "prob": math.exp(value),
            "rank": better + 1 if known else None,
            "alternatives": [{"text": t, "prob": math.exp(v)} for t, v in ranked[:alternatives]],
        }
        if not known:
            entry["rank_above"] = better
        results.append(entry)
    return dict(summary(backend.name, results, total_nll, scored_chars, truncated, cut), rank_limit=RANKS_KNOWN)


def _text_windows(text: str) -> list[tuple[int, int]]:
    """Character windows of about REMOTE_WINDOW_CHARS, ending before a space where one is near."""
    windows, start = [], 0
    while start < len(text):
        end = min(len(text), start + REMOTE_WINDOW_CHARS)
        if end < len(text):
            space = text.rfind(" ", start + REMOTE_WINDOW_CHARS // 2, end)
            end = space if space > start else end  # a model's token starts with the space
        windows.append((start, end))
        start = end
    return windows


def _context_start(text: str, start: int) -> int:
    if start == 0:
        return 0
    context = max(0, start - REMOTE_CONTEXT_CHARS)
    space = text.find(" ", context, start)
    return space if space >= 0 else context
