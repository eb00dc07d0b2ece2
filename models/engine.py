"""The suggestion engine: one Tab press -> several sampled continuations of increasing length.

The loop is written out by hand (the model steps are in models/steps.py) instead of calling
``model.generate(num_return_sequences=3)``, because on a 2-core CPU that is 3-4x slower:
- the prompt is prefilled once, as a batch of one, and its KV cache is kept: the next
  Tab press on the same (or extended) text only prefills the tokens that are new;
- the continuations are sampled together as one batch that shares that prefix;
- sampling looks at the top-k logits only (a full softmax over Gemma's 262k-token
  vocabulary costs ~24 ms a step here);
- each row stops on its own at its target length (on a word boundary), at end of text
  or at a newline; the press stops when its time budget is spent or it is cancelled.

Presses from many writers share the model through one queue per engine (models/scheduler.py)
and its one worker: a press that arrives while others are decoding joins their batch at the
next step (continuous batching, models/batching.py), and every press in flight advances one
token per step, so nobody waits for somebody else's long suggestion to finish.

The path of a press: ``suggest`` (models/core.py, shared with the remote backend) cleans the
text and calls ``produce`` here, which posts the press to the queue and waits; the queue's
worker runs ``round_``: ``admit`` (prefill the prompt, join a batch) and ``advance`` (sample
one token for every row, run one decode step), flat functions below; the rows themselves,
when they end and what comes back are models/core.py's.
"""

from __future__ import annotations

import bisect
import copy
import functools
import math
import threading
import time
from dataclasses import dataclass, field

import torch

from models import openings, scoring, textcut
from models.batching import BatchKV, PrefixStore
from models.core import (  # noqa: F401  (EngineError, Suggestion, SuggestResult, clean_prompt: imported from here too)
    BUSY,
    OUT_OF_MEMORY,
    Ask,
    Backend,
    EngineError,
    Row,
    Suggestion,
    SuggestResult,
    clean_prompt,
    collect,
    repeats,
)
from models.loading import LoadedModel
from models.scheduler import Scheduler
from models.settings import Settings
from models.steps import follow_logprobs, forbid_unlikely_stop, logprobs_of, sample
from models.textcache import TextCache

# How many prompt tokens are decoded alongside a continuation to turn it into text
# (SentencePiece drops a leading space when a piece is decoded on its own).
_DECODE_CONTEXT = 6
_MAX_PROMPT_CHARS_PER_TOKEN = 12  # only this many chars per context token are tokenized
_ADMIT_TOKENS = 256  # prompt tokens prefilled per worker round, at most (one press always gets in)
# Kept from every budget for the answer's way back (HTTP, Gradio's queue): at 20 writers the
# answers cut at the budget reached the writer 0.3-0.5 s after it (bench.load p95 4.49 s of 4).
_RESERVE_S = 0.25
_MARGIN = 1.3  # admission expects this much more time than measured: steps slow as others join
_FOLLOW_TOKENS = 8  # tokens of the text after the caret that candidate openings are ranked by
_FOLLOW_OPENINGS = 8  # openings read with the text after the caret (one forward of 8 rows)
_OPENINGS_BUSY_ROWS = 9  # rows in flight from which a new press samples its openings instead of choosing them


# ---------------------------------------------------------------- tokens <-> text helpers


class VocabIndex:
    """Token pieces sorted as strings, to find every token that starts with a given piece.

    Used for token healing: the prompt's last token is taken back and the first sampled
    token must start with it, so "I went to the " or "The quick bro" continue the way the
    model would have tokenized them, instead of after an unusual split.
    """

    def __init__(self, tokenizer):
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        special = set(getattr(tokenizer, "all_special_ids", []) or []) | control_token_ids(tokenizer)
        entries = [
            (p, i)
            for i, p in enumerate(pieces)
            if isinstance(p, str) and p and i not in special and not (p.startswith("<0x") and p.endswith(">"))
        ]
        entries.sort()
        # "\n" in SentencePiece vocabularies, "Ċ" in GPT-2's byte-level one, <0x0A> as a byte piece.
        self.newline_ids = {
            i for i, p in enumerate(pieces) if isinstance(p, str) and ("\n" in p or "Ċ" in p or p == "<0x0A>")
        }
        self.pieces = [p for p, _ in entries]
        # A tensor, so that a lookup is a slice: after a trailing space the healed piece is "▁" and
        # ~137k of Gemma's tokens start with it; turning that list into a tensor took 35 ms a press.
        self.ids = torch.tensor([i for _, i in entries], dtype=torch.long)
        self.piece_of = {i: p for p, i in entries}
        # Which tokens go on an unfinished word (models/openings.py): Latin, Chinese.
        self.extends_latin, self.extends_cjk = openings.extends_masks(pieces)

    def starting_with(self, piece: str) -> torch.Tensor:
        """Ids of the tokens whose piece starts with ``piece`` (a LongTensor, sorted by piece)."""
        lo = bisect.bisect_left(self.pieces, piece)
        hi = bisect.bisect_left(self.pieces, piece + "\U0010ffff")
        return self.ids[lo:hi]


def control_token_ids(tokenizer) -> set[int]:
    """Added tokens that look like markup (<...>, [...]) rather than text; byte tokens excluded."""
    found = set()
    for token_id, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        content = str(getattr(token, "content", token))
        if (content[:1], content[-1:]) in (("<", ">"), ("[", "]")) and not content.startswith("<0x"):
            found.add(int(token_id))
    return found


# ---------------------------------------------------------------- one press in flight


@dataclass(eq=False)  # compared and hashed by identity
class Press:
    """What the worker knows about one Tab press while it runs."""

    ask: Ask
    generator: torch.Generator | None
    ids: list[int]  # the prompt's tokens (tokenized by the caller's thread, not the worker)
    new_tokens: int  # of those, how many a prefill would run (the rest is in a cached prefix): an estimate
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    # Filled in when the press joins a batch:
    context: list[int] = field(default_factory=list)  # the prompt's last tokens, to decode the rows with
    healed_text: str = ""  # the text of the prompt's last token, taken back (token healing)
    max_steps: int = 0
    rows: list[Row] = field(default_factory=list)
    # Distinct openings (models/openings.py): "first" (each batch row is one candidate first
    # token), "choose" (their next step is read, the openings chosen), then "rows".
    phase: str = "rows"
    candidates: list[openings.Candidate] = field(default_factory=list)
    then: list[int] = field(default_factory=list)  # the first tokens of the text after the caret
    prefix: object = None  # the prompt's cache (batch 1), while the openings are chosen, when ``then``

    @property
    def result(self) -> SuggestResult:
        return self.ask.result

    def remaining(self) -> int:
        return max(0, self.max_steps - self.result.steps)


class Batch:
    """One decoding batch: its cache, the logits of its next step, and which press owns each row."""

    def __init__(self, config, limit: int):
        self.kv = BatchKV(config, limit)
        self.logits: torch.Tensor | None = None
        self.owners: list[tuple[Press, int]] = []  # (press, index of the row in press.rows) per batch row
        self.cycle_s = 0.0  # time between its last two steps (other batches' steps and admissions included)
        self.last_step_at: float | None = None

    def presses(self) -> list[Press]:
        return list(dict.fromkeys(p for p, _ in self.owners))


class Pace:
    """How fast this machine prefills and steps, as last measured: what admission control expects.

    Both are moving averages over what the worker did: seconds per prompt token prefilled (large
    prefills only; small ones are mostly overhead) and seconds between two steps of a batch
    (other batches' steps and admissions included, which is what a row waits per token: the
    decode step's own time let in presses that then got nothing, 11 of 60 at 20 writers).
    Estimates only refuse where others are there (``crowded``), so one that says "slow" after a
    slow spell is corrected by the next press, which runs alone.
    """

    def __init__(self, prefill_s_per_token: float = 0.002, step_s: float = 0.05):
        self.prefill_s_per_token, self.step_s = prefill_s_per_token, step_s
        self.backlog_tokens = 0  # prompt tokens posted and not yet prefilled
        self.lock = threading.Lock()

    def prefilled(self, tokens: int, seconds: float) -> None:
        if tokens >= 16:
            self.prefill_s_per_token += 0.3 * (seconds / tokens - self.prefill_s_per_token)

    def stepped(self, seconds: float) -> None:
        self.step_s += 0.3 * (seconds - self.step_s)

    def queue(self, tokens: int) -> None:
        with self.lock:
            self.backlog_tokens = max(0, self.backlog_tokens + tokens)

    def wait_s(self) -> float:
        """Until a press posted now is admitted: the prefills ahead, and a step of every batch per round."""
        tokens = self.backlog_tokens
        return tokens * self.prefill_s_per_token + (tokens / _ADMIT_TOKENS) * self.step_s

    def need_s(self, new_tokens: int, shortest: int) -> float:
        """From admission to a press's shortest row: its prefill, then a step per token (and two to end on a word)."""
        return _MARGIN * (new_tokens * self.prefill_s_per_token + (shortest + 2) * self.step_s) + _RESERVE_S


# ---------------------------------------------------------------- the engine


class SuggestionEngine(Backend):
    """Holds a loaded model, its prefix caches, its batches, and the queue every press goes through.

    ``lock`` is held for each forward pass (the worker's rounds, scoring), so at most one
    runs at a time; on 2 cores two at once would only slow each other down.
    """

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.lock = threading.Lock()
        self.vocab = VocabIndex(self.tokenizer)
        eos = {self.tokenizer.eos_token_id}
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        eos.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
        eos.update(getattr(self.tokenizer, "all_special_ids", []) or [])
        # Markup tokens such as Gemma's <start_of_image> are not "special" to the tokenizer but
        # end the text all the same; a suggestion must never show them.
        eos.update(control_token_ids(self.tokenizer))
        self.stop_ids = torch.tensor(sorted(i for i in eos if i is not None), device=self.device)
        self.stop_set = set(self.stop_ids.tolist())
        # Tokens that end a suggestion: the stop tokens, and any piece with a line break in it.
        self.ending_set = self.stop_set | self.vocab.newline_ids
        self.ending_ids = torch.tensor(sorted(self.ending_set), device=self.device)
        bos = self.tokenizer.bos_token_id
        probe = self.tokenizer("a").input_ids
        self.bos_id = bos if bos is not None and probe and probe[0] == bos else None
        window = getattr(self.model.config, "sliding_window", None)
        self.cache_limit = min(loaded.context_length, window or loaded.context_length)
        self.prefixes = PrefixStore(self.model, self.model.config, self.cache_limit)
        self.batches: list[Batch] = []  # touched by the queue's worker only
        self.pace = Pace()
        # Rows start with the likeliest distinct openings (issue 12); off: plain sampling (bench.quality's baseline).
        self.distinct_openings = True
        # A learned style's cache of the writer's own text (models/textcache.py), blended into
        # every next-token distribution a press samples from and scoring reads; None: the model alone.
        self.text_cache: TextCache | None = None
        self.queue: Scheduler[Press] = Scheduler(self.name, self.round_, lambda: bool(self.batches))

    @property
    def name(self) -> str:
        return self.loaded.name

    def describe(self) -> str:
        # On a CPU: how its matmuls run, as chosen for this machine (models/tuning.py).
        return self.device.type + (f" · {self.loaded.weights}" if self.loaded.weights else "")

    def serve(self, stop: threading.Event | None = None) -> None:
        """Be the worker of this engine's queue in the calling thread (Scheduler.serve_here)."""
        self.queue.serve_here(stop)

    def score(self, text: str, alternatives: int = scoring.ALTERNATIVES, on_progress=None, caller_gone=None) -> dict:
        return scoring.score_local(self, text, alternatives, on_progress, caller_gone)

    # -- prompt

    def prompt_ids(self, text: str, context_tokens: int) -> tuple[list[int], bool]:
        """Token ids the model sees: the end of the document, at most ``context_tokens`` long.

        The window's start moves in steps of a quarter window rather than one token at a
        time, so that while the writer types the start stays put and the cached prefix can
        be reused.
        """
        context_tokens = max(8, min(context_tokens, self.loaded.context_length - 260))
        max_chars = context_tokens * _MAX_PROMPT_CHARS_PER_TOKEN
        cut_chars = len(text) > max_chars
        if cut_chars:
            # The character cut moves in quarter steps too: cutting at len(text) - max_chars
            # would shift the tokens (and so the window) on every keystroke.
            step_chars = max(1, max_chars // 4)
            text = text[math.ceil((len(text) - max_chars) / step_chars) * step_chars :]
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if cut_chars and ids:
            ids = ids[1:]  # the first token may be a piece of a word cut in half
        truncated = cut_chars
        if len(ids) > context_tokens:
            step = max(1, context_tokens // 4)
            start = math.ceil((len(ids) - context_tokens) / step) * step
            ids = ids[start:]
            truncated = True
        if self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids, truncated

    def row_text(self, context: list[int], healed: str, row: list[int]) -> str:
        """The text of the tokens ``row`` after the prompt's last tokens ``context``."""
        base = self.tokenizer.decode(context, skip_special_tokens=True)
        full = self.tokenizer.decode(context + row, skip_special_tokens=True)
        text = full[len(base):] if full.startswith(base) else self.tokenizer.decode(row, skip_special_tokens=True)
        if healed:
            # The first token re-typed the healed piece, which is already in the document.
            text = text[len(healed):] if text.startswith(healed) else text
        # A byte piece that never completes a character leaves U+FFFD inside the text, not only at its end.
        return textcut.clean_control(textcut.utf8_safe(text))

    # -- one Tab press: handed to the queue; this thread waits (and asks whether its caller is still there)

    def produce(self, ask: Ask) -> None:
        generator = None
        if ask.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(ask.seed))
        ids, ask.result.truncated = self.prompt_ids(ask.text, ask.settings.context_tokens)
        press = Press(ask, generator, ids, len(ids) - self.prefixes.reusable(ids))
        # Admission control, early: a press that could not get even its shortest row within its
        # budget behind the work already queued is refused now, with a clear "busy", rather than
        # after waiting its whole budget for nothing (issue 11: 46 of 60 presses at 20 writers).
        # Only where others are there: a press alone on the machine is always tried (its budget
        # still cuts it), so a wrong estimate can never refuse everybody for good.
        crowded = bool(self.batches) or self.pace.backlog_tokens > 0
        if crowded and self.pace.wait_s() + self.pace.need_s(press.new_tokens, min(ask.wanted)) > ask.watch.left():
            refuse(press)
            return
        self.pace.queue(press.new_tokens)
        self.queue.post(press)
        ask.watch.wait(press.done, on_gone=lambda: self.queue.cancel(press))
        if press.error is not None:
            if isinstance(press.error, torch.OutOfMemoryError):  # type: ignore[attr-defined]
                raise EngineError(OUT_OF_MEMORY) from press.error
            raise press.error

    # -- the worker's round (models/scheduler.py calls it, on the worker's thread)

    def round_(self, posted: list[Press], cancels: list[Press]) -> list[Press]:
        """Admit waiting presses into batches, then advance every batch one token. Returns the
        presses left waiting for the next round."""
        for press in cancels:
            press.ask.watch.abandoned = True  # seen by admit, or by the press's next step
        waiting = []
        for press in posted:
            if press.ask.watch.abandoned:  # called off while it waited: no model work at all
                self.pace.queue(-press.new_tokens)
                press.result.cancelled = True
                press.done.set()
            else:
                waiting.append(press)
        with self.lock:
            # Admit presses until this round has prefilled about _ADMIT_TOKENS new prompt tokens,
            # fewer when a press in flight is near its deadline: a burst of writers must not
            # stall the presses already decoding.
            # The room is measured again before each admission (it was once a round): the press
            # just admitted is in flight now, and the next prompt's prefill delays its first
            # step too.
            prefilled = 0
            while waiting and (not self.batches or (prefilled < _ADMIT_TOKENS and self.admission_room() > 0)):
                press = waiting.pop(0)
                try:
                    admit(self, press, alone=not waiting and not self.queue.pending())
                except Exception as e:  # handed to the waiting caller, who raises it
                    fail(self, [press], e)
                prefilled += press.result.new_prompt_tokens
            for batch in list(self.batches):
                try:
                    advance(self, batch)
                except Exception as e:  # the batch's presses fail; the worker and other batches go on
                    if batch in self.batches:
                        self.batches.remove(batch)
                    fail(self, batch.presses(), e)
        return waiting

    def admission_room(self) -> float:
        """Prompt tokens this round may prefill without making a press in flight miss its budget.

        A round's prefill delays every row's next token: a press a few steps from its deadline
        must not be pushed past it by others' prompts (prefill work shared fairly).
        """
        lefts = [p.ask.watch.left() for batch in self.batches for p in batch.presses()]
        if not lefts:
            return float("inf")
        slack = min(lefts) - _RESERVE_S - 2 * _MARGIN * self.pace.step_s
        return max(0.0, slack / max(self.pace.prefill_s_per_token, 1e-6))


# ---------------------------------------------------------------- admit, advance (the worker's, flat)


def fail(engine: SuggestionEngine, presses: list[Press], error: BaseException) -> None:
    """End ``presses`` with ``error``, which their callers raise."""
    if isinstance(error, torch.OutOfMemoryError):  # type: ignore[attr-defined]
        engine.prefixes.clear()
    for press in presses:
        if not press.done.is_set():
            press.error = error
            press.done.set()


def refuse(press: Press) -> None:
    """End a press before any work: it could not be answered within its budget."""
    press.result.busy = True
    press.result.message = BUSY.format(budget=press.ask.settings.max_time)
    press.done.set()


def heal(engine: SuggestionEngine, ids: list[int]) -> tuple[list[int], str | None, str]:
    """Token healing: the prompt's last token taken back when it is an ordinary piece.

    Returns the ids without it, its piece (the first sampled token must start with it; None:
    nothing taken back) and its text (already in the document, so not part of a row's text).
    """
    last = ids[-1]
    if len(ids) > 1 and last in engine.vocab.piece_of:
        text = engine.row_text(ids[-_DECODE_CONTEXT - 1 : -1], "", [last])
        if text:
            return ids[:-1], engine.vocab.piece_of[last], text
    return ids, None, ""


def blended(engine: SuggestionEngine, logits: torch.Tensor, contexts: list[list[int]]) -> torch.Tensor:
    """``logits`` [B, V] with the engine's text cache blended in (each row after the tokens
    ``contexts[b]``); as they are without one."""
    return logits if engine.text_cache is None else engine.text_cache.blend(logits, contexts)


def healed(engine: SuggestionEngine, logits: torch.Tensor, piece: str) -> torch.Tensor:
    """``logits`` [1, V] where only tokens starting with the healed ``piece`` may come."""
    allowed = engine.vocab.starting_with(piece).to(engine.device)
    masked = torch.full_like(logits, float("-inf"))
    masked[:, allowed] = logits[:, allowed]
    return masked


def admit(engine: SuggestionEngine, press: Press, alone: bool) -> None:
    """Prefill a press's prompt (reusing a cached prefix) and add its rows to a batch.

    ``alone``: no other press waits to be admitted, in this round or posted since."""
    ask, result = press.ask, press.result
    engine.pace.queue(-press.new_tokens)
    if ask.watch.cancelled():
        result.cancelled = True
        press.done.set()
        return
    ids = press.ids
    # Never admitted past what its budget allows: were its shortest row not to come in time,
    # its prefill would only delay everybody else's. (press.new_tokens was estimated when it was
    # posted; looking the prefix up again here would walk every cached prompt a second time.)
    # Checked wherever others are there: in a batch, or waiting to be admitted. Only a press
    # alone is tried whatever the estimate says; before, one that had waited behind others was
    # let in the moment the batches ran empty, however little of its budget was left, and
    # could end at its budget with nothing (1 of 60 presses at 20 writers, 2026-12-04).
    if (engine.batches or not alone) and engine.pace.need_s(press.new_tokens, min(ask.wanted)) > ask.watch.left():
        refuse(press)
        return
    result.prompt_tokens = len(ids)
    ids, healed_piece, press.healed_text = heal(engine, ids)
    press.context = ids[-_DECODE_CONTEXT:]
    started = time.perf_counter()
    cache, logits, result.new_prompt_tokens = engine.prefixes.prefill(ids, engine.device)
    engine.pace.prefilled(result.new_prompt_tokens, time.perf_counter() - started)
    logits = blended(engine, logits, [ids])  # before healing's mask: the mask has the last word
    n = len(ask.wanted)
    if healed_piece is not None:  # on the one row of the prompt, before it is copied for each suggestion
        logits = healed(engine, logits, healed_piece)
    # Every step feeds one token: stay inside the model's positions (GPT-2 has no more).
    press.max_steps = max(1, min(textcut.hard_cap(max(ask.wanted)), engine.loaded.context_length - len(ids)))
    press.rows = [Row(target) for target in ask.wanted]
    result.row_tokens = [0] * n
    # Under load the openings' wider first steps (6 rows a press) slow every row in the batch: at
    # 20 writers 2 of 60 presses ran out of time before their openings were chosen. With three
    # presses' rows in flight already, a press samples its rows as before (degrade, not fail).
    in_flight = sum(batch.kv.rows for batch in engine.batches)
    if engine.distinct_openings and n > 1 and press.max_steps > 2 and in_flight < _OPENINGS_BUSY_ROWS:
        start_openings(engine, press, logits, cache, len(ids))
    rows = len(press.candidates) or n
    logits = logits.expand(rows, -1).clone()
    # Join a batch that has room for this prompt and its longest row (padding included).
    for batch in engine.batches:
        steps = max([press.max_steps] + [p.remaining() for p in batch.presses()])
        if batch.kv.fits(len(ids), steps):
            break
    else:
        batch = Batch(engine.model.config, engine.cache_limit - 1)
        engine.batches.append(batch)
    batch.kv.add(cache, len(ids), rows, max([press.max_steps] + [p.remaining() for p in batch.presses()]))
    batch.logits = logits if batch.logits is None else torch.cat([batch.logits, logits.to(batch.logits.dtype)])
    batch.owners += [(press, r) for r in range(rows)]


def start_openings(engine: SuggestionEngine, press: Press, logits: torch.Tensor, cache, length: int) -> None:
    """Make the press's first batch rows its candidate first tokens (models/openings.py).

    With text after the caret, the prompt's cache is kept until the openings are chosen, to
    read how well the text after the caret follows each of them.
    """
    if int(logits[0].argmax()) in engine.ending_set:
        return  # the model's first choice is to end here: sampled as before (an empty row may say so)
    text_of = lambda ids: engine.row_text(press.context, press.healed_text, ids)  # noqa: E731
    press.candidates = openings.first_candidates(logits[0], text_of, exclude=engine.ending_ids)  # a row never starts by ending
    if not press.candidates:
        return
    press.phase = "first"
    press.rows = [Row(0) for _ in press.candidates]
    press.then = following_ids(engine, press.ask.after)
    if press.then:  # kept for the choose step, which reads how the text after the caret follows each opening
        press.prefix = copy.deepcopy(cache)


@torch.inference_mode()
def likeliest_openings(engine: SuggestionEngine, text: str, first: int = openings.FIRST, after: str = "") -> list[openings.Opening]:
    """The openings of a press on ``text`` ranked as a press ranks them, computed directly (one
    prefill, one step over the candidates): bench/quality.py's ceiling, and the tests' check that
    the batched path chooses the same. ``first``: candidate first tokens looked at."""
    ids, _ = engine.prompt_ids(text, Settings().context_tokens)
    with engine.lock:
        ids, piece, healed_text = heal(engine, ids)
        cache, logits, _ = engine.prefixes.prefill(ids, engine.device)
        logits = blended(engine, logits, [ids])
        if piece is not None:
            logits = healed(engine, logits, piece)
        context = ids[-_DECODE_CONTEXT:]
        text_of = lambda row: engine.row_text(context, healed_text, row)  # noqa: E731
        candidates = openings.first_candidates(logits[0], text_of, first, exclude=engine.ending_ids)
        kv = BatchKV(engine.model.config, engine.cache_limit - 1)
        kv.add(cache, len(ids), len(candidates))
        following = kv.step(engine.model, torch.tensor([c.ids[0] for c in candidates], device=engine.device))
        following = blended(engine, following, [context + c.ids[:1] for c in candidates])
        ranked = openings.rank(candidates, following, text_of, engine.vocab.extends_latin, engine.vocab.extends_cjk, ending=engine.ending_ids)
        rank_by_following(engine, ranked, cache, following_ids(engine, after), context)
    return ranked


def rank_by_following(engine: SuggestionEngine, ranked: list[openings.Opening], cache, then: list[int],
                      context: list[int]) -> None:
    """Writing in the middle: score ``ranked`` by p(opening | before) p(after | before, opening),
    the second read for the likeliest openings, as spelled (one forward over them, on copies of
    the prompt's ``cache``, whose last tokens are ``context``; a style's text cache blended in as
    everywhere else); those not read score 0, after those that were. No ``then``: as ranked."""
    if not then or not ranked:
        return
    scored = [o for o in ranked if o.unit][:_FOLLOW_OPENINGS]
    blend = functools.partial(blended, engine)
    follows = follow_logprobs(engine.model, cache, [o.best.ids for o in scored], then, blend, context).tolist() if scored else []
    for opening in ranked:
        opening.score = 0.0
    for opening, value in zip(scored, follows):
        opening.score = opening.prob * math.exp(value - max(follows))


def following_ids(engine: SuggestionEngine, after: str) -> list[int]:
    """The first few tokens of the text after the caret (its line only), to rank openings by."""
    line = after.split("\n", 1)[0]
    if not line.strip():
        return []
    words = line.split()
    head = line[: len(line) - len(line.lstrip())] + " ".join(words[:4]) if not textcut.is_cjk(line.strip()[0]) else line[:6]
    return engine.tokenizer(head, add_special_tokens=False).input_ids[:_FOLLOW_TOKENS]


def advance(engine: SuggestionEngine, batch: Batch) -> None:
    """Sample one token for every row of ``batch``, finish what is done, run one decode step."""
    now = time.perf_counter()
    if batch.last_step_at is not None:
        batch.cycle_s = now - batch.last_step_at
        engine.pace.stepped(batch.cycle_s)
    batch.last_step_at = now
    presses = batch.presses()
    keep, owners, fed = [], [], []
    for press in presses:
        index = [i for i, (p, _) in enumerate(batch.owners) if p is press]
        for i, r, token in sample_rows(engine, press, batch, index, len(presses)):
            keep.append(i)
            owners.append((press, r))
            fed.append(token)
    batch.kv.keep(keep)
    batch.owners = owners
    if not keep:
        engine.batches.remove(batch)
        return
    batch.logits = batch.kv.step(engine.model, torch.tensor(fed, dtype=torch.long, device=engine.device))


def choose_openings(engine: SuggestionEngine, press: Press, logits: torch.Tensor, numbers: list[int]):
    """The "choose" step: read each candidate's next step, pick the distinct openings, make
    the press's rows start with them.

    Returns, for each new row: which of ``numbers`` (candidate rows) it continues, its logits
    for this step (only tokens that end the word, where its opening must end here), and the
    token it must take (its opening's second token) or None.
    """
    ask = press.ask
    candidates = [press.candidates[r] for r in numbers]
    text_of = lambda ids: engine.row_text(press.context, press.healed_text, ids)  # noqa: E731
    ranked = openings.rank(candidates, logits, text_of, engine.vocab.extends_latin, engine.vocab.extends_cjk, ending=engine.ending_ids)
    rank_by_following(engine, ranked, press.prefix, press.then, press.context)
    press.prefix = None
    avoid = {openings.unit_key(openings.unit_of(text)[0]) for text in ask.avoid}
    following = openings.unit_of(ask.after.split("\n", 1)[0])[0]
    if following:  # an opening that says what follows the caret would say it twice
        avoid.add(openings.unit_key(following))
    chosen = openings.choose(ranked, len(ask.wanted), avoid)
    chosen += openings.choose(ranked, len(ask.wanted) - len(chosen))  # too few: repeat the likeliest (the repeat rule parts them)
    if not chosen:
        chosen = [None] * len(ask.wanted)
    plan, rows = [], []
    for target, opening in zip(ask.wanted, chosen * len(ask.wanted)):
        first = opening.best.ids[0] if opening is not None else candidates[0].ids[0]
        k = next(k for k, c in enumerate(candidates) if c.ids[0] == first)
        source = press.rows[numbers[k]]
        row = Row(target)
        row.ids, row.text, row.tokens, row.logprob, row.scored = list(source.ids), source.text, source.tokens, source.logprob, source.scored
        row_logits, forced = logits[k], None
        if opening is not None and len(opening.best.ids) > 1:
            forced = opening.best.ids[1]
        elif opening is not None and opening.ends_word:
            mask = engine.vocab.extends_cjk if openings._is_cjk_letter(opening.unit[0]) else engine.vocab.extends_latin
            row_logits = row_logits.masked_fill(mask.to(row_logits.device), float("-inf"))
            if not bool(torch.isfinite(row_logits).any()):
                row_logits = logits[k]
        plan.append((k, row_logits, forced))
        rows.append(row)
    press.rows = rows
    press.result.row_tokens = [1] * len(rows)
    press.phase = "rows"
    return plan


def sample_rows(engine: SuggestionEngine, press: Press, batch: Batch, index: list[int], sharing: int) -> list[tuple[int, int, int]]:
    """One step of one press (batch rows ``index``): sample a token for each of its rows.

    Returns the rows that go on: (batch row, the press's row, the token it feeds). Empty once
    the press is done. A candidate row of the "choose" step may go on as several rows (two
    openings that start with the same token) or none.
    """
    ask, result, settings = press.ask, press.result, press.ask.settings
    result.peak_batch = max(result.peak_batch, sharing)
    numbers = [batch.owners[i][1] for i in index]
    logits = batch.logits[index] if len(index) != len(batch.owners) else batch.logits
    if press.phase == "first":  # each candidate row takes its own first token
        fed = []
        for i, r in zip(index, numbers):
            candidate, row = press.candidates[r], press.rows[r]
            row.ids.append(candidate.ids[0])
            row.add(candidate.text, 1, [candidate.logprob])
            fed.append((i, r, candidate.ids[0]))
        press.phase = "choose"
        result.steps += 1
        return [] if finish(engine, press, batch) else fed
    logits = blended(engine, logits, [press.context + press.rows[r].ids for r in numbers])
    forced: list[int | None] = [None] * len(index)
    if press.phase == "choose":
        plan = choose_openings(engine, press, logits, numbers)
        index = [index[k] for k, _, _ in plan]
        logits = torch.stack([row_logits for _, row_logits, _ in plan])
        forced = [f for _, _, f in plan]
        numbers = list(range(len(plan)))
    silent = [k for k, r in enumerate(numbers) if not press.rows[r].text.strip()]
    if silent:
        logits = forbid_unlikely_stop(logits, silent, engine.stop_ids)
    sampled, logprobs = sample(logits, settings.temperature, settings.top_k, settings.top_p, press.generator)
    chosen, chosen_logp = sampled.tolist(), logprobs.tolist()
    for k, token in enumerate(forced):
        if token is not None:
            chosen[k] = token
            chosen_logp[k] = float(logprobs_of(logits[k : k + 1], torch.tensor([token], device=logits.device)))
    finished_now = False
    for k, r in enumerate(numbers):
        row = press.rows[r]
        result.row_tokens[r] += 1
        can_go_on = len(row.ids) + 1 < press.max_steps
        final, text = with_token(engine, press, row, chosen[k])
        if final is not None and repeats(press.rows, row, final, can_go_on):
            if chosen[k] in engine.ending_set:
                # It would end here word for word like another suggestion, and a row that
                # has ended cannot go on to say something else: take another token instead.
                masked = logits[k : k + 1].index_fill(1, engine.ending_ids, float("-inf"))
                if bool(torch.isfinite(masked).any()):
                    token, logprob = sample(masked, settings.temperature, settings.top_k, settings.top_p, press.generator)
                    chosen[k], chosen_logp[k] = int(token), float(logprob)
                    final, text = with_token(engine, press, row, chosen[k])
            if final is not None and repeats(press.rows, row, final, can_go_on):
                final = None  # the same as another suggestion: go on until it says something else
        if chosen[k] not in engine.stop_set:
            row.ids.append(chosen[k])
            row.add(text, 1, [chosen_logp[k]])
        row.final = final
        finished_now = finished_now or final is not None
    result.steps += 1
    if result.first_ready_s is None and any(row.final is not None for row in press.rows):
        result.first_ready_s = time.perf_counter() - ask.watch.started
    if ask.on_update is not None and finished_now:
        ask.on_update(collect(press.rows))  # for streaming: rows done so far
    if finish(engine, press, batch):
        return []
    return [(i, r, chosen[k]) for k, (i, r) in enumerate(zip(index, numbers)) if press.rows[r].final is None]


def finish(engine: SuggestionEngine, press: Press, batch: Batch) -> bool:
    """End the press if it is done, out of steps, cancelled or out of time (then True)."""
    ask, result = press.ask, press.result
    if result.steps >= press.max_steps or (press.phase == "rows" and all(row.final is not None for row in press.rows)):
        pass
    elif ask.watch.cancelled():
        result.cancelled = True
    # Stop early enough that the next round (about as long as the last one, or longer when
    # presses are being admitted) fits the budget, with the answer's way back.
    elif time.perf_counter() + _MARGIN * batch.cycle_s + _RESERVE_S >= ask.watch.deadline:
        result.timed_out = True
    else:
        return False
    if press.phase != "rows":  # ended before its openings were chosen: the likeliest candidates, as far as they got
        likeliest = sorted(range(len(press.candidates)), key=lambda i: -press.candidates[i].logprob)
        press.rows, press.prefix = [press.rows[i] for i in likeliest[: len(ask.wanted)]], None
    for row in press.rows:
        row.end()  # rows cut short by their cap, time or cancel end on a whole word
    result.suggestions = collect(press.rows)
    press.done.set()
    return True


def with_token(engine: SuggestionEngine, press: Press, row: Row, token: int) -> tuple[str | None, str]:
    """``row``'s final text (None: not done) and its text, were ``token`` added to it."""
    if token in engine.stop_set:
        return row.text, row.text
    text = engine.row_text(press.context, press.healed_text, row.ids + [token])
    return row.ending(text, len(row.ids) + 1), text
