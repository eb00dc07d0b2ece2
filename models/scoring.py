"""How likely the model finds a text: perplexity, bits per character, and per-token ranks.

Perplexity is exp(mean negative log-likelihood per token), the N-th root of 1/P(text).
Bits per character divides the same total by ln 2 and by the number of characters, so it
compares across tokenizers. Each token also gets its rank under the model (1 = the model's
first choice), which GLTR colours in buckets: top 10, top 100, top 1000, beyond.

Long documents are scored in windows: each window re-reads a little of the previous one
as context, so no token is scored without any context but the first.

A local model's scoring is bounded whatever the text: the text is cut to what MAX_TOKENS
tokens could cover before it is tokenized, a window's full-vocabulary logits exist SCORE_ALIGN
positions at a time (Gemma 3's 262144 tokens: 16 MiB, not 576 MiB per window and as much
again for each copy), and few scorings run at once per model: $TABWRITE_SCORE_CONCURRENCY
(default 1), with $TABWRITE_SCORE_QUEUE (default 2) waiting at most $TABWRITE_SCORE_WAIT_S
(default 60) seconds; any more are answered BUSY at once.

Both backends score here, side by side: ``score_local`` runs the model in this process
(models/engine.py), ``score_remote`` reads the log-probabilities a server returns for the
echoed text (models/remote.py). torch is imported by the first only, so the remote backend
runs without it.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
import weakref
from typing import TYPE_CHECKING, Callable

from models.core import MARKUP, EngineError, clean_prompt
from models.scheduler import FOREGROUND

if TYPE_CHECKING:
    from models.engine import SuggestionEngine
    from models.remote import OpenAICompletionsBackend

WINDOW = 512  # tokens scored per forward pass
OVERLAP = 64  # tokens of the previous window re-read as context
MAX_TOKENS = 4096  # longer documents: the last MAX_TOKENS tokens are scored
ALTERNATIVES = 5
EMPTY = "Nothing to score: the document is empty."
MAX_CHARS_PER_TOKEN = 12  # only the last MAX_TOKENS * this characters are read (tokenized) at all
SCORE_CHUNK = 64  # rows read per hold of the model's lock, in pieces of SCORE_ALIGN (the logits of one piece exist at once)
SCORE_ALIGN = 16  # chunks start at a multiple of this row (models/kernels.py SCREEN_ROWS; SCORE_CHUNK a multiple)
GONE = "Not scored: the caller went away."  # nobody reads it; said for logs and tests
BUSY = "Busy: the perplexity view is scoring other documents; try again in a few seconds."
CONCURRENCY_ENV = "TABWRITE_SCORE_CONCURRENCY"  # scorings that run at once per model (default 1)
QUEUE_ENV = "TABWRITE_SCORE_QUEUE"  # scorings that wait for one of those places (default 2); more are BUSY
WAIT_ENV = "TABWRITE_SCORE_WAIT_S"  # how long one waits before it is BUSY after all (default 60)

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


def score(
    backend, text: str, alternatives: int = ALTERNATIVES, on_progress: Callable[[float], None] | None = None,
    caller_gone: Callable[[], bool] | None = None,
) -> dict:
    """The perplexity view's result for ``text`` under ``backend`` (models/core.py's Backend), or {"error": ...}."""
    return backend.score(text, alternatives=alternatives, on_progress=on_progress, caller_gone=caller_gone)


def score_local(
    engine: "SuggestionEngine",
    text: str,
    alternatives: int = ALTERNATIVES,
    on_progress: Callable[[float], None] | None = None,
    caller_gone: Callable[[], bool] | None = None,
) -> dict:
    """The perplexity view's result for ``text`` under the engine's model, or {"error": ...}.

    Bounded whatever the text: only its last MAX_TOKENS * MAX_CHARS_PER_TOKEN characters are
    read at all; full-vocabulary logits exist for SCORE_CHUNK positions at a time; at most
    $TABWRITE_SCORE_CONCURRENCY scorings run per engine and $TABWRITE_SCORE_QUEUE wait (at
    most $TABWRITE_SCORE_WAIT_S seconds), the others are answered BUSY at once. ``caller_gone``
    (the HTTP client went away) is asked before each window and each chunk of the output layer:
    nobody is left to read the result, so it stops there.
    """
    text = text or ""
    # What MAX_TOKENS tokens could cover, starting at a space (a whole token) where one is near.
    precut = max(0, len(text) - MAX_TOKENS * MAX_CHARS_PER_TOKEN)
    if precut:
        space = re.search(r"\s", text[precut : precut + 64])
        precut += space.start() if space else 0
    text = clean_prompt(text[precut:])
    if not text.strip() and not (precut and text):
        return {"error": EMPTY}
    limiter = _limiter(engine)
    if not limiter.enter(
        _env_number(CONCURRENCY_ENV, 1, 1, int), _env_number(QUEUE_ENV, 2, 0, int), _env_number(WAIT_ENV, 60.0, 0.0, float)
    ):
        return {"error": BUSY}
    try:
        return _score_local(engine, text, alternatives, on_progress, precut, caller_gone or (lambda: False))
    finally:
        limiter.leave()


def _score_local(engine, text: str, alternatives: int, on_progress, precut: int, caller_gone) -> dict:
    import torch

    from models.steps import read_all, read_hidden, read_logits

    tokenizer = engine.tokenizer
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc.input_ids), [tuple(o) for o in enc.offset_mapping]
    truncated = precut > 0 or len(ids) > MAX_TOKENS
    cut = 0
    if len(ids) > MAX_TOKENS:
        ids, offsets = ids[-MAX_TOKENS:], offsets[-MAX_TOKENS:]
        cut = offsets[0][0]
        text, offsets = text[cut:], [(s - cut, e - cut) for s, e in offsets]
    spans = token_spans(text, offsets)
    bos = [engine.bos_id] if engine.bos_id is not None else []
    split = _split_head_works(engine)
    text_cache = getattr(engine, "text_cache", None)
    decoded: dict[int, str] = {}
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
        # Every window starts with BOS, as a document does: Gemma 3 read from a mid-text token
        # with no BOS before it is far off (the windows after the first of "A Scandal in
        # Bohemia", 12,000 characters: 1.40 bits per character with BOS only in the first
        # window, against 1.20 for its first 1,500 characters alone).
        feed = bos + ids[context_start:end]
        # Row k of the window predicts feed[k + 1]; the targets ids[start:end] are predicted by
        # rows offset .. offset + count - 1.
        count = end - start
        offset = len(feed) - count - 1
        targets = torch.tensor(ids[start:end], device=engine.device)
        if caller_gone():
            return {"error": GONE}
        _after_presses()
        try:
            with engine.lock, _stepping_aside(engine, caller_gone):  # one forward pass at a time
                states = (read_hidden if split else read_all)(engine.model, torch.tensor([feed], device=engine.device))
        except _Gone:
            return {"error": GONE}
        # Rows in pieces aligned as one pass over the window would have them (an output layer
        # may quantize SCORE_ALIGN rows together): their logits are the ones read_all gives.
        # A piece's logits and what is read from them (log-softmax, ranks, alternatives: passes
        # over 16 x 262144 values for Gemma) are made under the lock, stepping aside for Tab
        # presses between pieces; made beside a press, those passes took the CPU from it.
        pieces = list(range(offset // SCORE_ALIGN * SCORE_ALIGN, offset + count, SCORE_ALIGN))
        per_lock = max(1, SCORE_CHUNK // SCORE_ALIGN)
        for first_piece in range(0, len(pieces), per_lock):
            if caller_gone():
                return {"error": GONE}
            _after_presses()
            try:
                with engine.lock, _stepping_aside(engine, caller_gone):
                    for j, a in enumerate(pieces[first_piece : first_piece + per_lock]):
                        if j:
                            _step_aside()
                        b = min(a + SCORE_ALIGN, len(feed))
                        logits = read_logits(engine.model, states[a:b]) if split else states[a:b]
                        lo, hi = max(a, offset), min(b, offset + count)  # the rows of this piece that predict targets
                        if hi <= lo:
                            continue
                        with torch.inference_mode():
                            rows = logits[lo - a : hi - a]
                            if text_cache is not None:  # a learned style's cache of the writer's text
                                first_target = start + lo - offset
                                rows = text_cache.blend(rows, [ids[max(0, t - text_cache.order): t]
                                                               for t in range(first_target, first_target + hi - lo)])
                            logp = torch.log_softmax(rows, dim=-1)
                            del rows, logits
                            target_logp = logp.gather(1, targets[lo - offset : hi - offset, None]).squeeze(1)
                            ranks = (logp > target_logp[:, None]).sum(dim=1) + 1
                            # Alternatives are text the writer could use: no control tokens such as <start_of_image>.
                            top_logp, top_ids = logp.index_fill_(1, engine.stop_ids, float("-inf")).topk(alternatives, dim=-1)
                            del logp
                        for k, value, rank, tops, top_id in zip(
                            range(lo - offset, hi - offset), target_logp.tolist(), ranks.tolist(), top_logp.tolist(),
                            top_ids.tolist(),
                        ):
                            s, e = spans[start + k]
                            total_nll -= value
                            scored_chars += e - s
                            alternatives_of = []
                            for lp, i in zip(tops, top_id):
                                if i not in decoded:
                                    decoded[i] = tokenizer.decode([i])
                                alternatives_of.append({"text": decoded[i], "prob": math.exp(lp)})
                            results.append(
                                {"text": text[s:e], "start": s, "end": e, "prob": math.exp(value), "rank": rank,
                                 "alternatives": alternatives_of}
                            )
            except _Gone:
                return {"error": GONE}
        del states
        if on_progress is not None:
            on_progress((n + 1) / len(windows))
    return summary(engine.name, results, total_nll, scored_chars, truncated, precut + cut)


# The model's output layer is run apart from the rest (read_hidden -> read_logits) where that
# gives the model's own logits, checked once per model on a few tokens; else (an architecture
# that does more after its output layer) each window's logits come whole from read_all.
_SPLIT_CHECKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_PROBE_TEXT = "The perplexity view reads a text"


PRESS_PRIORITY_S = 2.0  # the longest a scoring step waits for Tab presses to finish before it goes anyway


def _after_presses() -> None:
    """Let Tab presses go first: wait (at most PRESS_PRIORITY_S) while presses of any model are
    waiting or decoding (scheduler.FOREGROUND: set when a press is posted, cleared when its
    queue's worker has nothing left, so a press between being taken and being admitted counts).
    The lock is not fair, so without this a writer's Tab waited behind a whole document's
    windows (bench.load --hostile: the writers' p95 1.83x with three 25k-character scorings)."""
    FOREGROUND.wait_idle(PRESS_PRIORITY_S)


class _Gone(Exception):
    """The caller of a scoring went away while it stepped aside."""


_aside = threading.local()  # in a scoring's thread, while it holds its engine's lock: (engine, caller_gone)
_HOOKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # models whose layers call _step_aside


class _stepping_aside:
    """Within it (the engine's lock held), the scoring's forward pass steps aside for Tab presses
    before every decoder layer: a window of 576 tokens held the model ~0.5 s at a time, and a
    press that came meanwhile waited for all of it (bench.load --hostile: writers' p95 1.45-1.72x
    calm with scorings running); now it waits for one layer (~30 ms). The hooks are put on a
    model once, under the lock (no forward pass runs while they are added), and do nothing in
    any thread but a scoring's, so the engine's own passes through the same layers go on as before."""

    def __init__(self, engine, caller_gone):
        self.engine, self.caller_gone = engine, caller_gone

    def __enter__(self):
        model = self.engine.model
        if model not in _HOOKED:
            layers = getattr(getattr(model, "model", None), "layers", None)
            for layer in layers if layers is not None else []:
                layer.register_forward_pre_hook(lambda module, args: _step_aside())
            _HOOKED[model] = True
        _aside.current = (self.engine, self.caller_gone)
        return self

    def __exit__(self, *exc):
        _aside.current = None
        return False


def _step_aside() -> None:
    """In a scoring's thread holding its engine's lock: while Tab presses are waiting or decoding,
    let go of the lock and wait for them (at most PRESS_PRIORITY_S), then take it again; raise
    _Gone if the caller went away meanwhile. Elsewhere, nothing."""
    current = getattr(_aside, "current", None)
    if current is None or not FOREGROUND.busy():
        return
    engine, caller_gone = current
    engine.lock.release()
    try:
        FOREGROUND.wait_idle(PRESS_PRIORITY_S)
    finally:
        engine.lock.acquire()
    if caller_gone():
        raise _Gone()


def _split_head_works(engine) -> bool:
    import torch

    from models.steps import read_all, read_hidden, read_logits

    model = engine.model
    known = _SPLIT_CHECKED.get(model)
    if known is not None:
        return known
    bos = [engine.bos_id] if engine.bos_id is not None else []
    probe = torch.tensor([(bos + list(engine.tokenizer(_PROBE_TEXT, add_special_tokens=False).input_ids))[:8]], device=engine.device)
    with engine.lock:
        whole = read_all(model, probe)
        try:
            parts = read_logits(model, read_hidden(model, probe))
        except Exception:  # no base_model / output layer where transformers puts them
            parts = None
    works = (
        parts is not None
        and parts.shape == whole.shape
        and bool(torch.allclose(parts, whole, rtol=1e-4, atol=1e-4 * float(whole.abs().max())))
    )
    _SPLIT_CHECKED[model] = works
    return works


# ---------------------------------------------------------------- how many score at once


class _Limiter:
    """At most ``running`` scorings of one engine at a time and ``waiting`` queued behind them."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.running = 0
        self.waiting = 0

    def enter(self, running: int, waiting: int, wait_s: float) -> bool:
        """Take a place (True), waiting at most ``wait_s`` for one; False when none is free in time."""
        with self._changed:
            if self.running < running and self.waiting == 0:
                self.running += 1
                return True
            if self.waiting >= waiting:
                return False
            self.waiting += 1
            try:
                deadline = time.monotonic() + wait_s
                while self.running >= running:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._changed.wait(left)
                self.running += 1
                return True
            finally:
                self.waiting -= 1

    def leave(self) -> None:
        with self._changed:
            self.running -= 1
            self._changed.notify()


_LIMITERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LIMITERS_LOCK = threading.Lock()


def _limiter(engine) -> _Limiter:
    with _LIMITERS_LOCK:
        limiter = _LIMITERS.get(engine)
        if limiter is None:
            limiter = _LIMITERS[engine] = _Limiter()
        return limiter


def _env_number(name: str, default, minimum, kind):
    try:
        return max(minimum, kind(os.environ.get(name, default)))
    except (TypeError, ValueError):
        return default


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
    caller_gone: Callable[[], bool] | None = None,
) -> dict:
    """The same result from the server's log-probabilities of the echoed text.

    The text is scored in windows of about 500 tokens that re-read the end of the previous
    one as context. Ranks are exact up to 10 (the top log-probabilities asked for); a token
    the model ranks lower gets ``rank`` None and ``rank_above``: how many tokens are known to
    be more likely.
    """
    try:
        return _score_remote(backend, clean_prompt(text or ""), alternatives, on_progress, caller_gone or (lambda: False))
    except EngineError as e:
        return {"error": f"Not scored: {e}."}


def _score_remote(backend, text: str, alternatives: int, on_progress, caller_gone) -> dict:
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
        if caller_gone():
            return {"error": GONE}
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
