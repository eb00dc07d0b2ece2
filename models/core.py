"""What every backend of a Tab press shares: the answer's types, the rows, the rules, the interface.

A backend turns the writer's text into suggestions: models/engine.py runs a model in this
process, models/remote.py asks an OpenAI-compatible server. They differ only in where the
tokens come from; everything a press does with them is here, written once:

- ``Suggestion`` / ``SuggestResult``: what a press answers; ``EngineError``: a failure the
  writer is told about, in one line; the messages the writer sees;
- ``Row``: one suggestion being written (text so far, tokens, log-probability, final text),
  ending where models/textcut.py says (a word or CJK boundary once it has its target length,
  a newline, its hard cap);
- ``repeats``: a row that would end saying what another row says goes on instead;
- ``collect``: the finished rows as suggestions, shortest first;
- ``Watch``: a press's time budget and the two ways it is called off (the writer typed on,
  the caller went away);
- ``Backend``: the interface the service and the page call, with ``suggest`` written once
  (the start and the end of every press) around each backend's ``produce(Ask)``.

No torch here: the remote backend runs without it.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from models import textcut
from models.settings import Settings, targets

EMPTY_TEXT = "Type a few words first, then press Tab."
NOTHING_TO_ADD = "The model had nothing to add here; try Tab again or write a little more."
OUT_OF_MEMORY = "the model ran out of memory; try a shorter context or a smaller model"
UNSURE = "The model is unsure here (every suggestion below the {threshold:g} confidence you set); write a little more or lower it."
BUSY = "Busy: the model is serving other writers and could not answer within {budget:g} s; try Tab again in a moment."
# Markup a model may spell out as text (a server's answer): it ends a suggestion, as the local
# engine's control tokens do, and is never offered as an alternative in the perplexity view.
MARKUP = re.compile(r"<(?:start|end)_of_[a-z_]+>|<(?:bos|eos|pad|unk|mask)>|</s>|<\|[a-z_]+\|>")
CALLER_POLL_S = 0.2  # how often the caller is asked whether it is still there (it may cost a system call)


def time_limit_message(max_time: float) -> str:
    return f"Stopped at the {max_time:g} s time limit."


class EngineError(Exception):
    """A suggestion request failed in a way the user should be told about (one line)."""


@dataclass
class Suggestion:
    text: str
    tokens: int
    mean_logprob: float  # per token; how sure the model was (0 is certain; nan: a server that gave none)


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
    busy: bool = False  # refused before any work: the press could not have been answered within its budget
    truncated: bool = False  # the document was longer than the context window
    peak_batch: int = 1  # the most presses (this one included) that shared one forward pass
    row_tokens: list[int] = field(default_factory=list)  # tokens sampled for each row (the work done; benchmarks)

    @property
    def texts(self) -> list[str]:
        return [s.text for s in self.suggestions]


def clean_prompt(text: str) -> str:
    """What the model sees of the writer's text: valid UTF-8, no control characters."""
    text = text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates -> '?'
    return textcut.clean_control(text)


# ---------------------------------------------------------------- rows


class Row:
    """One suggestion being written: its text so far, tokens, log-probability, final text once done."""

    def __init__(self, target: int):
        self.target, self.cap = target, textcut.hard_cap(target)
        self.text = ""
        self.tokens = 0  # tokens in the text (a stop token ends a row without being one)
        self.logprob, self.scored = 0.0, 0  # summed over the tokens whose log-probability is known
        self.final: str | None = None
        self.ids: list[int] = []  # the tokens themselves, where the backend sees them (the local engine)

    def ending(self, text: str, tokens: int) -> str | None:
        """The row's final text were its text ``text`` after ``tokens`` tokens (None: it goes on)."""
        return textcut.row_final(self.text, text, tokens, self.target)

    def add(self, text: str, tokens: int = 1, logprobs=()) -> None:
        """The row now reads ``text``, ``tokens`` more tokens long."""
        self.text = text
        self.tokens += tokens
        for value in logprobs:
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.logprob, self.scored = self.logprob + value, self.scored + 1

    def end(self, reason: str | None = None) -> None:
        """The row ends as it is: "stop" (end of text) keeps its text, anything else (its
        length, the time budget, a cancel) cuts it back to its last whole word."""
        if self.final is None:
            self.final = self.text if reason == "stop" else (textcut.complete_prefix(self.text) or self.text)

    def suggestion(self) -> Suggestion:
        mean = self.logprob / self.scored if self.scored else float("nan")
        return Suggestion(self.final.rstrip(" \t"), self.tokens, mean)  # no trailing blanks


def repeats(rows: list[Row], row: Row, final: str, can_go_on: bool) -> bool:
    """Whether ``row`` ending as ``final`` would say what another row already says, and may go on instead.

    A repeat goes on past its own target up to the press's longest row: cut at its cap, a row
    ends on its last whole word ("the 5-year-old" -> "the"), which can be exactly what a
    shorter row says, while a few more tokens reach the next word boundary.
    """
    if not final.strip() or not can_go_on:
        return False  # nothing to repeat (an empty row is dropped), or no token left: it ends
    return any(q is not row and q.final is not None and q.final.strip() == final.strip() for q in rows)


def _squeeze(text: str) -> str:
    return " ".join(text.split()).lower()


def into(suggestion: Suggestion, after: str) -> Suggestion:
    """``suggestion`` cut where it starts to say what already follows the caret.

    Writing in the middle ("The cat sat on the | of the house."), a row "roof of the house"
    would put "of the house" twice: it is cut to "roof". Matched from a word (or CJK
    character) boundary, ignoring case and blanks, on the first 12 characters that follow
    (at least 4 of them, 2 in Chinese, or all the row has left: "roof of the" is cut too).
    """
    head = _squeeze(after)[:12]
    if not head:
        return suggestion
    need = min(2 if textcut.is_cjk(head[0]) else 4, len(head))  # two Chinese characters say as much as a short word
    text = suggestion.text
    for at in range(len(text)):
        boundary = at == 0 or not text[at - 1].isalnum() or textcut.is_cjk(text[at]) or textcut.is_cjk(text[at - 1])
        if not boundary or text[at].isspace():
            continue
        rest = _squeeze(text[at:])
        same = min(len(rest), len(head))
        if same >= need and rest[:same] == head[:same]:
            return Suggestion(text[:at].rstrip(" \t"), suggestion.tokens, suggestion.mean_logprob)
    return suggestion


def collect(rows: list[Row]) -> list[Suggestion]:
    """The finished, non-empty rows as suggestions, shortest first."""
    found = [row.suggestion() for row in rows if row.final is not None and row.final.strip()]
    return sorted(found, key=lambda s: len(s.text))


# ---------------------------------------------------------------- one press's budget and cancel


class Watch:
    """A press's time budget, and whether it has been called off.

    Two ways: ``is_cancelled`` (the writer typed on, pressed Esc, or a newer press came),
    cheap and asked from any thread; ``caller_gone`` (the HTTP client disconnected), which
    only the calling thread can ask and which may cost a system call, so at most every 0.2 s.
    """

    def __init__(
        self,
        max_time: float,
        is_cancelled: Callable[[], bool] | None = None,
        caller_gone: Callable[[], bool] | None = None,
    ):
        self.started = time.perf_counter()
        # Time spent waiting for other writers' presses counts against this budget too.
        self.deadline = self.started + max_time
        self._is_cancelled = is_cancelled or (lambda: False)
        self._caller_gone = caller_gone
        self._asked = float("-inf")
        self.abandoned = False  # the caller went away

    def ask_caller(self) -> bool:
        """From the calling thread: whether the caller went away (asked at most every 0.2 s)."""
        if not self.abandoned and self._caller_gone is not None:
            now = time.perf_counter()
            if now - self._asked >= CALLER_POLL_S:
                self._asked = now
                self.abandoned = bool(self._caller_gone())
        return self.abandoned

    def cancelled(self) -> bool:
        return self.abandoned or bool(self._is_cancelled())

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def wait(self, done: threading.Event, on_gone: Callable[[], None]) -> None:
        """Wait for ``done`` in the calling thread, asking the caller meanwhile; ``on_gone`` once it went."""
        told = False
        while not done.wait(timeout=CALLER_POLL_S):
            if not told and self.ask_caller():
                told = True
                on_gone()


@dataclass(eq=False)
class Ask:
    """One Tab press as a backend's ``produce`` gets it: the cleaned text and what came with it."""

    text: str
    settings: Settings
    wanted: list[int]  # each row's target length in tokens, shortest first (models/settings.py ``targets``)
    seed: int | None
    on_update: Callable[[list[Suggestion]], None] | None  # the rows done so far, each time one finishes
    watch: Watch
    result: SuggestResult  # filled in by ``produce``
    after: str = ""  # the text after the caret (writing in the middle), or ""
    avoid: tuple[str, ...] = ()  # suggestions already shown for this text (Tab again): start differently


# ---------------------------------------------------------------- the interface


class Device(Protocol):
    type: str  # "cpu", "cuda", or a server's host:port


class Backend(Protocol):
    """What the service and the page call: a local model (engine.py) or a model server (remote.py).

    Both subclass it: ``suggest`` is written here once (the start and the end of a press,
    which are the same for both) around the backend's ``produce``, where the tokens come from.
    """

    @property
    def name(self) -> str: ...

    device: Device

    def describe(self) -> str:
        """What the settings' status line says about where it runs ("cpu · fp16-fbgemm ...")."""
        ...

    def suggest(
        self,
        text: str,
        settings: Settings,
        round_: int = 0,
        is_cancelled: Callable[[], bool] = lambda: False,
        seed: int | None = None,
        on_update: Callable[[list[Suggestion]], None] | None = None,
        caller_gone: Callable[[], bool] | None = None,
        after: str = "",
        avoid: tuple[str, ...] | list[str] = (),
    ) -> SuggestResult:
        """Sample suggestions for the end of ``text``; blocks until they are ready.

        ``round_`` counts Tab presses on the same text (each asks for longer rows);
        ``is_cancelled`` is asked between tokens from any thread, ``caller_gone`` (e.g. whether
        the HTTP client is still connected) from this one, about every 0.2 s: either one
        cancels the press. ``on_update`` gets the rows done so far (for streaming). ``after``:
        the text after the caret, when writing in the middle: rows that fit it come first, and
        none runs on into it. ``avoid``: suggestions already shown for this text (Tab again),
        which new rows do not start like. Raises EngineError for what the writer is told about,
        in one line.
        """
        watch = Watch(settings.max_time, is_cancelled, caller_gone)
        result = SuggestResult()
        text = clean_prompt(text or "")
        if not text.strip():
            result.message = EMPTY_TEXT
            return result
        after = clean_prompt(after or "")

        def shown(found: list[Suggestion]) -> list[Suggestion]:
            """What the writer sees of finished rows: cut before the text after the caret, and
            none the model is less sure of than the writer's threshold (no confidence: shown)."""
            if after.strip():
                found = [s for s in (into(s, after) for s in found) if s.text.strip()]
            return [s for s in found if not math.exp(s.mean_logprob) < settings.hide_below]

        streamed = None if on_update is None else (lambda found: on_update(shown(found)))
        self.produce(Ask(text, settings, targets(settings, round_), seed, streamed, watch, result, after, tuple(avoid)))
        found, result.suggestions = result.suggestions, shown(result.suggestions)
        if found and not result.suggestions and not result.message and settings.hide_below > 0:
            result.message = UNSURE.format(threshold=settings.hide_below)
        result.elapsed_s = time.perf_counter() - watch.started
        if result.timed_out and not result.message:
            result.message = time_limit_message(settings.max_time)
        if not result.suggestions and not result.message and not result.cancelled:
            result.message = NOTHING_TO_ADD
        return result

    def produce(self, ask: Ask) -> None:
        """Fill in ``ask.result``: its rows (``collect``), steps, and whether it ran out of time
        or was cancelled (``ask.watch``)."""
        ...

    def score(
        self, text: str, alternatives: int = 5, on_progress: Callable[[float], None] | None = None,
        caller_gone: Callable[[], bool] | None = None,
    ) -> dict:
        """The perplexity view: models/scoring.py's result, or {"error": one line}. ``caller_gone``
        (asked between windows): the HTTP client went away, stop."""
        ...

    def serve(self, stop: threading.Event | None = None) -> None:
        """Give the calling thread to the backend until ``stop`` is set (app.py's main thread)."""
        ...


def dtype_name(dtype) -> str:
    """A torch dtype's short name, as files, logs and answers spell it: "float32", "bfloat16"."""
    return str(dtype).split(".")[-1]


def resident_mb() -> float:
    """This process's resident memory in MB (Linux's /proc/self/statm; elsewhere 0)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


def give_back_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing).

    glibc keeps chunks that large temporary tensors freed in the heap, under its (by then
    raised) mmap threshold: after tuning, which makes and drops weights in seven formats, ~300
    MB of resident memory nothing used; after making an adapted model (editor/styles.py), 2301
    MB of anonymous memory against 1490 MB once trimmed (Gemma 3 270M)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
