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
import math
import threading
import time
from dataclasses import dataclass, field

import torch

from models import scoring, textcut
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
from models.steps import forbid_unlikely_stop, sample

# How many prompt tokens are decoded alongside a continuation to turn it into text
# (SentencePiece drops a leading space when a piece is decoded on its own).
_DECODE_CONTEXT = 6
_MAX_PROMPT_CHARS_PER_TOKEN = 12  # only this many chars per context token are tokenized
_ADMIT_TOKENS = 256  # prompt tokens prefilled per worker round, at most (one press always gets in)
# Kept from every budget for the answer's way back (HTTP, Gradio's queue): at 20 writers the
# answers cut at the budget reached the writer 0.3-0.5 s after it (bench.load p95 4.49 s of 4).
_RESERVE_S = 0.25
_MARGIN = 1.3  # admission expects this much more time than measured: steps slow as others join


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

    def score(self, text: str, alternatives: int = scoring.ALTERNATIVES, on_progress=None) -> dict:
        return scoring.score_local(self, text, alternatives, on_progress)

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
            prefilled = 0
            allowed = min(_ADMIT_TOKENS, self.admission_room())
            while waiting and (prefilled < allowed or not self.batches):
                press = waiting.pop(0)
                try:
                    admit(self, press)
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


def admit(engine: SuggestionEngine, press: Press) -> None:
    """Prefill a press's prompt (reusing a cached prefix) and add its rows to a batch."""
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
    if engine.batches and engine.pace.need_s(press.new_tokens, min(ask.wanted)) > ask.watch.left():
        refuse(press)
        return
    result.prompt_tokens = len(ids)
    # Token healing: take the last token back when it is an ordinary piece.
    healed_piece = None
    last = ids[-1]
    if len(ids) > 1 and last in engine.vocab.piece_of:
        healed_piece = engine.vocab.piece_of[last]
        press.healed_text = engine.row_text(ids[-_DECODE_CONTEXT - 1 : -1], "", [last])
        if not press.healed_text:
            healed_piece = None
    if healed_piece is not None:
        ids = ids[:-1]
    press.context = ids[-_DECODE_CONTEXT:]
    started = time.perf_counter()
    cache, logits, result.new_prompt_tokens = engine.prefixes.prefill(ids, engine.device)
    engine.pace.prefilled(result.new_prompt_tokens, time.perf_counter() - started)
    n = len(ask.wanted)
    if healed_piece is not None:  # on the one row of the prompt, before it is copied for each suggestion
        allowed = engine.vocab.starting_with(healed_piece).to(engine.device)
        masked = torch.full_like(logits, float("-inf"))
        masked[:, allowed] = logits[:, allowed]
        logits = masked
    logits = logits.expand(n, -1).clone()
    # Every step feeds one token: stay inside the model's positions (GPT-2 has no more).
    press.max_steps = max(1, min(textcut.hard_cap(max(ask.wanted)), engine.loaded.context_length - len(ids)))
    press.rows = [Row(target) for target in ask.wanted]
    result.row_tokens = [0] * n
    # Join a batch that has room for this prompt and its longest row (padding included).
    for batch in engine.batches:
        steps = max([press.max_steps] + [p.remaining() for p in batch.presses()])
        if batch.kv.fits(len(ids), steps):
            break
    else:
        batch = Batch(engine.model.config, engine.cache_limit - 1)
        engine.batches.append(batch)
    batch.kv.add(cache, len(ids), n)
    batch.logits = logits if batch.logits is None else torch.cat([batch.logits, logits.to(batch.logits.dtype)])
    batch.owners += [(press, r) for r in range(n)]


def advance(engine: SuggestionEngine, batch: Batch) -> None:
    """Sample one token for every row of ``batch``, finish what is done, run one decode step."""
    now = time.perf_counter()
    if batch.last_step_at is not None:
        batch.cycle_s = now - batch.last_step_at
        engine.pace.stepped(batch.cycle_s)
    batch.last_step_at = now
    presses = batch.presses()
    tokens = torch.empty(len(batch.owners), dtype=torch.long, device=engine.device)
    finished_rows: set[int] = set()
    for press in presses:
        index = [i for i, (p, _) in enumerate(batch.owners) if p is press]
        if sample_rows(engine, press, batch, index, tokens, len(presses)):
            finished_rows.update(index)
        else:
            finished_rows.update(i for i in index if press.rows[batch.owners[i][1]].final is not None)
    keep = [i for i in range(len(batch.owners)) if i not in finished_rows]
    batch.kv.keep(keep)
    batch.owners = [batch.owners[i] for i in keep]
    if not keep:
        engine.batches.remove(batch)
        return
    batch.logits = batch.kv.step(engine.model, tokens[keep])


def sample_rows(engine: SuggestionEngine, press: Press, batch: Batch, index: list[int], tokens: torch.Tensor, sharing: int) -> bool:
    """One step of one press: sample its rows (batch rows ``index``) into ``tokens``. True when the press is done."""
    ask, result, settings = press.ask, press.result, press.ask.settings
    result.peak_batch = max(result.peak_batch, sharing)
    numbers = [batch.owners[i][1] for i in index]
    logits = batch.logits[index] if len(index) != len(batch.owners) else batch.logits
    silent = [k for k, r in enumerate(numbers) if not press.rows[r].text.strip()]
    if silent:
        logits = forbid_unlikely_stop(logits, silent, engine.stop_ids)
    sampled, logprobs = sample(logits, settings.temperature, settings.top_k, settings.top_p, press.generator)
    chosen, chosen_logp = sampled.tolist(), logprobs.tolist()
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
    tokens[index] = torch.tensor(chosen, dtype=tokens.dtype, device=tokens.device)
    result.steps += 1
    if result.first_ready_s is None and any(row.final is not None for row in press.rows):
        result.first_ready_s = time.perf_counter() - ask.watch.started
    if ask.on_update is not None and finished_now:
        ask.on_update(collect(press.rows))  # for streaming: rows done so far
    if all(row.final is not None for row in press.rows) or result.steps >= press.max_steps:
        pass
    elif ask.watch.cancelled():
        result.cancelled = True
    # Stop early enough that the next round (about as long as the last one, or longer when
    # presses are being admitted) fits the budget, with the answer's way back.
    elif time.perf_counter() + _MARGIN * batch.cycle_s + _RESERVE_S >= ask.watch.deadline:
        result.timed_out = True
    else:
        return False
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
