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

Presses from many writers share the model through one worker thread per engine: a press
that arrives while others are decoding joins their batch at the next step (continuous
batching, models/batching.py), and every press in flight advances one token per step, so
nobody waits for somebody else's long suggestion to finish.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from models import textcut
from models.batching import BatchKV, PrefixStore
from models.loading import LoadedModel
from models.settings import Settings, targets
from models.steps import forbid_unlikely_stop, sample

# How many prompt tokens are decoded alongside a continuation to turn it into text
# (SentencePiece drops a leading space when a piece is decoded on its own).
_DECODE_CONTEXT = 6
_MAX_PROMPT_CHARS_PER_TOKEN = 12  # only this many chars per context token are tokenized
_WORKER_IDLE_S = 30.0  # the worker thread ends after this long with nothing to do (a new press restarts it)
_ADMIT_TOKENS = 256  # prompt tokens prefilled per worker round, at most (one press always gets in)


class EngineError(Exception):
    """A suggestion request failed in a way the user should be told about (one line)."""


@dataclass
class Suggestion:
    text: str
    tokens: int
    mean_logprob: float  # per token; how sure the model was (0 is certain)


@dataclass
class SuggestResult:
    suggestions: list[Suggestion] = field(default_factory=list)
    message: str = ""  # for the user, when something is worth saying (empty text, time up, ...)
    prompt_tokens: int = 0
    new_prompt_tokens: int = 0  # tokens prefilled for this press (the rest came from the cache)
    elapsed_s: float = 0.0
    steps: int = 0
    first_ready_s: float | None = None  # when the first suggestion was final (for streaming / benchmarks)
    timed_out: bool = False
    cancelled: bool = False
    truncated: bool = False  # the document was longer than the context window
    peak_batch: int = 1  # the most presses (this one included) that shared one forward pass
    row_tokens: list[int] = field(default_factory=list)  # tokens sampled for each row (the work done; benchmarks)

    @property
    def texts(self) -> list[str]:
        return [s.text for s in self.suggestions]


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


def clean_prompt(text: str) -> str:
    """What the model sees of the writer's text: valid UTF-8, no control characters."""
    text = text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates -> '?'
    return textcut.clean_control(text)


# ---------------------------------------------------------------- one press in flight


@dataclass(eq=False)  # compared and hashed by identity
class _Press:
    """What the worker knows about one Tab press while it runs."""

    text: str
    settings: Settings
    wanted: list[int]
    started: float
    deadline: float
    is_cancelled: Callable[[], bool]
    on_update: Callable[[list[Suggestion]], None] | None
    generator: torch.Generator | None
    result: SuggestResult
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    abandoned: bool = False  # the caller went away (e.g. the browser disconnected)
    # Filled in when the press joins a batch:
    context: list[int] = field(default_factory=list)
    healed_text: str = ""
    max_steps: int = 0
    rows: list[list[int]] = field(default_factory=list)
    logp: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    finals: list[str | None] = field(default_factory=list)

    def remaining(self) -> int:
        return max(0, self.max_steps - self.result.steps)


class _Group:
    """One decoding batch: its cache, the logits of its next step, and which press owns each row."""

    def __init__(self, config, limit: int):
        self.kv = BatchKV(config, limit)
        self.logits: torch.Tensor | None = None
        self.owners: list[tuple[_Press, int]] = []
        self.cycle_s = 0.0  # time between its last two steps (other batches' steps and admissions included)
        self.last_step_at: float | None = None

    def presses(self) -> list[_Press]:
        return list(dict.fromkeys(p for p, _ in self.owners))


# ---------------------------------------------------------------- the engine


class SuggestionEngine:
    """Holds a loaded model, its prefix caches, and the worker that runs every press on it.

    ``lock`` is held for each forward pass (the worker's steps, scoring), so at most one
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
        # Presses waiting to join a batch, the batches decoding, and the worker thread.
        self._wakeup = threading.Condition()
        self._waiting: list[_Press] = []
        self._groups: list[_Group] = []
        self._worker: threading.Thread | None = None
        self._resident = False  # a thread has given itself to this engine for good (serve_here)

    @property
    def name(self) -> str:
        return self.loaded.name

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

    def _row_text(self, context: list[int], healed: str, row: list[int]) -> str:
        base = self.tokenizer.decode(context, skip_special_tokens=True)
        full = self.tokenizer.decode(context + row, skip_special_tokens=True)
        text = full[len(base):] if full.startswith(base) else self.tokenizer.decode(row, skip_special_tokens=True)
        if healed:
            # The first token re-typed the healed piece, which is already in the document.
            text = text[len(healed):] if text.startswith(healed) else text
        # A byte piece that never completes a character leaves U+FFFD inside the text, not only at its end.
        return textcut.clean_control(textcut.utf8_safe(text))

    # -- one Tab press (called from any thread; the worker does the work)

    def suggest(
        self,
        text: str,
        settings: Settings,
        round_: int = 0,
        is_cancelled: Callable[[], bool] = lambda: False,
        seed: int | None = None,
        on_update: Callable[[list[Suggestion]], None] | None = None,
        caller_gone: Callable[[], bool] | None = None,
    ) -> SuggestResult:
        """Sample suggestions for the end of ``text``; blocks until they are ready.

        ``is_cancelled`` is asked by the worker between steps; ``caller_gone`` is asked from
        this (the calling) thread about every 0.2 s, for checks that only work here, such as
        whether the HTTP client is still connected. Either one cancels the press.
        """
        started = time.perf_counter()
        result = SuggestResult()
        text = clean_prompt(text or "")
        if not text.strip():
            result.message = "Type a few words first, then press Tab."
            return result
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(seed))
        press = _Press(
            text=text, settings=settings, wanted=targets(settings, round_), started=started,
            # Time spent waiting for other writers' presses counts against this budget too.
            deadline=started + settings.max_time, is_cancelled=is_cancelled, on_update=on_update,
            generator=generator, result=result,
        )
        with self._wakeup:
            self._waiting.append(press)
            if self._worker is None and not self._resident:
                self._start_worker()
            self._wakeup.notify()
        while not press.done.wait(timeout=0.2):
            if caller_gone is not None and not press.abandoned and caller_gone():
                press.abandoned = True  # the worker sees it before its next step
        if press.error is not None:
            if isinstance(press.error, torch.OutOfMemoryError):  # type: ignore[attr-defined]
                raise EngineError("the model ran out of memory; try a shorter context or a smaller model") from press.error
            raise press.error
        result.elapsed_s = time.perf_counter() - started
        if not result.suggestions and not result.message and not result.cancelled:
            result.message = "The model had nothing to add here; try Tab again or write a little more."
        return result

    # -- the worker

    def serve_here(self, stop: threading.Event | None = None) -> None:
        """Be this engine's worker in the calling thread, until ``stop`` is set.

        app.py gives it the main thread, which loaded the model. On these CPUs PyTorch's
        OpenMP runtime answers the thread that first used it faster than any later one: a
        decode step from another thread took ~35 % longer here (54 vs 40 ms for Gemma, batch 3).
        """
        with self._wakeup:
            self._resident = True
            self._wakeup.notify_all()  # a worker thread of its own, if any, leaves the work to this one
        try:
            self._serve(stop or threading.Event())
        finally:
            with self._wakeup:
                self._resident = False
                if (self._waiting or self._groups) and self._worker is None:  # hand over what is left
                    self._start_worker()

    def _start_worker(self) -> None:
        """A worker thread of the engine's own (called holding ``_wakeup``); it ends when idle."""
        self._worker = threading.Thread(target=self._serve, name=f"tabwrite-{self.name}", daemon=True)
        self._worker.start()

    def _leaving(self, stop: threading.Event | None) -> bool:
        """Whether this worker ends now (called holding ``_wakeup``): a resident one when ``stop`` is
        set, a thread one when a resident worker has taken over."""
        if stop is not None:
            return stop.is_set()
        if self._resident:
            self._worker = None
            return True
        return False

    def _serve(self, stop: threading.Event | None = None) -> None:
        """Admit waiting presses into batches and advance every batch one token.

        A resident worker (``stop`` given, see serve_here) runs until ``stop`` is set; a worker
        thread until it has had nothing to do for _WORKER_IDLE_S.
        """
        while True:
            with self._wakeup:
                while not self._waiting and not self._groups:
                    if self._leaving(stop):
                        return
                    woken = self._wakeup.wait(timeout=0.5 if stop is not None else _WORKER_IDLE_S)
                    if stop is None and not woken and not self._waiting:
                        self._worker = None
                        return
                if self._leaving(stop):
                    return
                waiting, self._waiting = self._waiting, []
            with self.lock:
                # Admit presses until this round has prefilled about _ADMIT_TOKENS new prompt
                # tokens: a burst of writers must not stall the presses already decoding.
                prefilled = 0
                while waiting and (prefilled < _ADMIT_TOKENS or not self._groups):
                    press = waiting.pop(0)
                    self._guarded(self._admit, press)
                    prefilled += press.result.new_prompt_tokens
                if waiting:
                    with self._wakeup:
                        self._waiting[:0] = waiting  # first in line next round
                for group in list(self._groups):
                    self._guarded(self._advance, group)

    def _guarded(self, work, arg) -> None:
        """Run one piece of the worker's work; a failure ends the presses it concerns, not the worker."""
        presses = arg.presses() if isinstance(arg, _Group) else [arg]
        try:
            work(arg)
        except Exception as e:  # handed to the waiting callers, who raise it
            if isinstance(arg, _Group) and arg in self._groups:
                self._groups.remove(arg)
            if isinstance(e, torch.OutOfMemoryError):  # type: ignore[attr-defined]
                self.prefixes.clear()
            for press in presses:
                if not press.done.is_set():
                    press.error = e
                    press.done.set()

    def _admit(self, press: _Press) -> None:
        """Prefill a press's prompt (reusing a cached prefix) and add its rows to a batch."""
        result, settings = press.result, press.settings
        if press.abandoned or press.is_cancelled():
            result.cancelled = True
            press.done.set()
            return
        ids, result.truncated = self.prompt_ids(press.text, settings.context_tokens)
        result.prompt_tokens = len(ids)
        # Token healing: take the last token back when it is an ordinary piece.
        healed_piece = None
        last = ids[-1]
        if len(ids) > 1 and last in self.vocab.piece_of:
            healed_piece = self.vocab.piece_of[last]
            press.healed_text = self._row_text(ids[-_DECODE_CONTEXT - 1 : -1], "", [last])
            if not press.healed_text:
                healed_piece = None
        if healed_piece is not None:
            ids = ids[:-1]
        press.context = ids[-_DECODE_CONTEXT:]
        cache, logits, result.new_prompt_tokens = self.prefixes.prefill(ids, self.device)
        n = len(press.wanted)
        if healed_piece is not None:  # on the one row of the prompt, before it is copied for each suggestion
            allowed = self.vocab.starting_with(healed_piece).to(self.device)
            masked = torch.full_like(logits, float("-inf"))
            masked[:, allowed] = logits[:, allowed]
            logits = masked
        logits = logits.expand(n, -1).clone()
        # Every step feeds one token: stay inside the model's positions (GPT-2 has no more).
        press.max_steps = max(1, min(textcut.hard_cap(max(press.wanted)), self.loaded.context_length - len(ids)))
        press.rows, press.logp = [[] for _ in range(n)], [0.0] * n
        press.texts, press.finals = [""] * n, [None] * n
        result.row_tokens = [0] * n
        # Join a batch that has room for this prompt and its longest row (padding included).
        for group in self._groups:
            steps = max([press.max_steps] + [p.remaining() for p in group.presses()])
            if group.kv.fits(len(ids), steps):
                break
        else:
            group = _Group(self.model.config, self.cache_limit - 1)
            self._groups.append(group)
        group.kv.add(cache, len(ids), n)
        group.logits = logits if group.logits is None else torch.cat([group.logits, logits.to(group.logits.dtype)])
        group.owners += [(press, r) for r in range(n)]

    def _advance(self, group: _Group) -> None:
        """Sample one token for every row of ``group``, finish what is done, run one decode step."""
        now = time.perf_counter()
        if group.last_step_at is not None:
            group.cycle_s = now - group.last_step_at
        group.last_step_at = now
        presses = group.presses()
        tokens = torch.empty(len(group.owners), dtype=torch.long, device=self.device)
        finished_rows: set[int] = set()
        for press in presses:
            index = [i for i, (p, _) in enumerate(group.owners) if p is press]
            if self._sample_press(press, group, index, tokens, len(presses)):
                finished_rows.update(index)
            else:
                finished_rows.update(i for i in index if press.finals[group.owners[i][1]] is not None)
        keep = [i for i in range(len(group.owners)) if i not in finished_rows]
        group.kv.keep(keep)
        group.owners = [group.owners[i] for i in keep]
        if not keep:
            self._groups.remove(group)
            return
        group.logits = group.kv.step(self.model, tokens[keep])

    def _sample_press(self, press: _Press, group: _Group, index: list[int], tokens: torch.Tensor, sharing: int) -> bool:
        """One step of one press: sample its rows, update its texts. True when the press is done."""
        result, settings = press.result, press.settings
        result.peak_batch = max(result.peak_batch, sharing)
        rows = [group.owners[i][1] for i in index]
        logits = group.logits[index] if len(index) != len(group.owners) else group.logits
        silent = [k for k, r in enumerate(rows) if not press.texts[r].strip()]
        if silent:
            logits = forbid_unlikely_stop(logits, silent, self.stop_ids)
        sampled, logprobs = sample(logits, settings.temperature, settings.top_k, settings.top_p, press.generator)
        chosen, chosen_logp = sampled.tolist(), logprobs.tolist()
        finished_now = False
        for k, r in enumerate(rows):
            result.row_tokens[r] += 1
            final, text = self._with_token(press, r, chosen[k])
            if final is not None and self._repeats_another(press, r, final):
                if chosen[k] in self.ending_set:
                    # It would end here word for word like another suggestion, and a row that
                    # has ended cannot go on to say something else: take another token instead.
                    masked = logits[k : k + 1].index_fill(1, self.ending_ids, float("-inf"))
                    if bool(torch.isfinite(masked).any()):
                        token, logprob = sample(masked, settings.temperature, settings.top_k, settings.top_p, press.generator)
                        chosen[k], chosen_logp[k] = int(token), float(logprob)
                        final, text = self._with_token(press, r, chosen[k])
                if final is not None and self._repeats_another(press, r, final):
                    final = None  # the same as another suggestion: go on until it says something else
            if chosen[k] not in self.stop_set:
                press.rows[r].append(chosen[k])
                press.logp[r] += chosen_logp[k]
                press.texts[r] = text
            press.finals[r] = final
            finished_now = finished_now or final is not None
        tokens[index] = torch.tensor(chosen, dtype=tokens.dtype, device=tokens.device)
        result.steps += 1
        if result.first_ready_s is None and any(f is not None for f in press.finals):
            result.first_ready_s = time.perf_counter() - press.started
        if press.on_update is not None and finished_now:
            press.on_update(self._collect(press.finals, press.rows, press.logp))  # for streaming: rows done so far
        if all(f is not None for f in press.finals) or result.steps >= press.max_steps:
            pass
        elif press.abandoned or press.is_cancelled():
            result.cancelled = True
        # Stop early enough that the next round (about as long as the last one) fits the budget.
        elif time.perf_counter() + group.cycle_s >= press.deadline:
            result.timed_out = True
        else:
            return False
        self._finish(press)
        return True

    def _with_token(self, press: _Press, r: int, token: int) -> tuple[str | None, str]:
        """Row ``r``'s final text (None: not done) and its text, were ``token`` added to it."""
        if token in self.stop_set:
            return press.texts[r], press.texts[r]
        text = self._row_text(press.context, press.healed_text, press.rows[r] + [token])
        return textcut.row_final(press.texts[r], text, len(press.rows[r]) + 1, press.wanted[r]), text

    @staticmethod
    def _repeats_another(press: _Press, r: int, final: str) -> bool:
        """Whether ``final`` says what another row of the press already says, and row ``r`` may still go on.

        A repeat goes on past its own hard cap, up to the press's longest row: at its cap a row
        is cut back to its last whole word ("the 5-year-old" -> "the"), which can be exactly
        what a shorter row says, while a few more tokens reach the next word boundary.
        """
        if not final.strip() or len(press.rows[r]) + 1 >= press.max_steps:
            return False  # nothing to repeat (an empty row is dropped), or no step left: it ends
        return any(q != r and f is not None and f.strip() == final.strip() for q, f in enumerate(press.finals))

    def _finish(self, press: _Press) -> None:
        for r, final in enumerate(press.finals):
            if final is None:
                press.finals[r] = textcut.complete_prefix(press.texts[r]) or press.texts[r]
        press.result.suggestions = self._collect(press.finals, press.rows, press.logp)
        if press.result.timed_out:
            press.result.message = f"Stopped at the {press.settings.max_time:g} s time limit."
        press.done.set()

    @staticmethod
    def _collect(finals, rows, logp) -> list[Suggestion]:
        """The finished, non-empty rows as suggestions, shortest first."""
        found = [
            Suggestion(f.rstrip(" \t"), len(rows[r]), logp[r] / max(1, len(rows[r])))  # no trailing blanks
            for r, f in enumerate(finals)
            if f is not None and f.strip()
        ]
        return sorted(found, key=lambda s: len(s.text))
