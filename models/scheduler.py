"""The queue every Tab press of one model goes through, and the loop that serves it.

After llama.cpp's server queue (``server-queue.cpp``): callers ``post`` tasks and may
``cancel`` them; one thread runs ``loop``, which takes what was posted and hands it to the
engine a round at a time. Cancel is a task too: posted like a press, applied before the
next round, so a press still waiting for its turn ends at once instead of after the
presses ahead of it.

What a round does (admit waiting presses into batches, advance every batch one token) is
the engine's (models/engine.py ``round_``); this file only decides *when* and *on which
thread* it runs:

- the thread that calls ``serve_here`` (app.py's main thread, which loaded the model) is the
  resident worker until its ``stop`` is set;
- without one, the first post starts a worker thread of the queue's own, which ends after
  30 s with nothing to do (the next post starts another).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

from models.core import give_back_memory, resident_mb

WORKER_IDLE_S = 30.0  # a worker thread of the queue's own ends after this long with nothing to do
# The heap's free pages go back to the system once the queue has had nothing to do this long.
# A Tab press leaves ~150 MB of freed temporaries (the prompt's activations, the batch's keys
# and values: 6 rows, then 3, 2, 1) that glibc keeps; given back at once after every press, the
# next press faulted them in anew: 375 against 341 ms a press, presses 0.3 s apart alternating
# the two (Gemma, AMD EPYC 2 cores, 2026-12-07), for 1082 against 1231 MB resident. A writer at
# work presses again within seconds; an app nobody uses gives the memory back. A process already
# holding more than TRIM_AT_ONCE_ABOVE_MB gives it back at once, as before: the app is to stay
# within 1.5 GB (Gemma under the AVX2 cap, whose formats take more memory, held 1641 MB kept).
TRIM_AFTER_IDLE_S = 30.0
TRIM_AT_ONCE_ABOVE_MB = 1400.0
_RESIDENT_POLL_S = 0.5  # how often an idle resident worker looks at its stop event

Task = TypeVar("Task")


class Foreground:
    """Which queues have presses to serve now. Work in the background (learning a style,
    models/style.py) waits while any has: Tab presses keep the CPU."""

    def __init__(self):
        self._busy: set[int] = set()
        self._idle = threading.Condition()

    def mark(self, queue: object, busy: bool) -> None:
        with self._idle:
            if busy:
                self._busy.add(id(queue))
            else:
                self._busy.discard(id(queue))
                if not self._busy:
                    self._idle.notify_all()

    def busy(self) -> bool:
        return bool(self._busy)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no queue has presses (at most ``timeout`` s); whether none has."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._busy, timeout)


FOREGROUND = Foreground()


@dataclass(eq=False)
class Cancel(Generic[Task]):
    """A task that calls off ``task``, posted earlier."""

    task: Task


class Scheduler(Generic[Task]):
    """A named queue of tasks and the one worker that serves them.

    ``round_(tasks, cancels) -> tasks left``: one round of work on the tasks posted since the
    last round (and those it left over), given the ones called off meanwhile; what it leaves
    waits for the next round, first in line. ``busy()``: whether work is in flight with no
    task waiting (a batch still decoding), so the loop keeps going.
    """

    def __init__(self, name: str, round_: Callable[[list, list], list], busy: Callable[[], bool]):
        self.name = name
        self._round, self._busy = round_, busy
        self._wakeup = threading.Condition()
        self._waiting: list = []
        self.posted = 0  # tasks posted so far, cancels included
        self._worker: threading.Thread | None = None
        self._resident = False  # a thread has given itself to this queue for good (serve_here)

    # -- what callers do

    def post(self, task: Task) -> None:
        with self._wakeup:
            self._waiting.append(task)
            self.posted += 1
            FOREGROUND.mark(self, True)
            if self._worker is None and not self._resident:
                self._start_worker()
            self._wakeup.notify()

    def cancel(self, task: Task) -> None:
        self.post(Cancel(task))

    def pending(self) -> int:
        """Tasks posted and not yet taken by a round."""
        with self._wakeup:
            return sum(1 for t in self._waiting if not isinstance(t, Cancel))

    @property
    def worker(self) -> threading.Thread | None:
        """The queue's own worker thread, if one runs (None while a resident worker serves)."""
        return self._worker

    # -- who serves

    def serve_here(self, stop: threading.Event | None = None) -> None:
        """Be the worker in the calling thread until ``stop`` is set.

        app.py gives it the main thread, which loaded the model. A thread that was not the
        first to use PyTorch runs it slower: its OpenMP team comes on top of the first one's,
        more threads than cores (a decode step took ~35 % longer, 54 vs 40 ms for Gemma, batch 3).
        Remeasured 2026-12-07 (Gemma, 200-token prompt, 4/12/32, AMD EPYC 2 cores), a thread of
        the queue's own against the main thread: 22.0 against 13.9 ms a token with OpenMP's
        default wait policy, 14.9 against 12.7 with the one models/__init__.py sets.
        """
        stop = stop or threading.Event()
        with self._wakeup:
            self._resident = True
            self._wakeup.notify_all()  # a worker thread of the queue's own, if any, leaves the work to this one
        try:
            self.loop(stop)
        finally:
            with self._wakeup:
                self._resident = False
                if self._has_work() and self._worker is None:  # hand over what is left
                    self._start_worker()

    def _has_work(self) -> bool:
        """Tasks posted, or the round function still busy (called holding ``_wakeup``)."""
        return bool(self._waiting) or self._busy()

    def _start_worker(self) -> None:
        """A worker thread of the queue's own (called holding ``_wakeup``); it ends when idle."""
        self._worker = threading.Thread(target=self.loop, name=f"tabwrite-{self.name}", daemon=True)
        self._worker.start()

    def _leaving(self, stop: threading.Event | None) -> bool:
        """Whether this worker ends now (called holding ``_wakeup``): a resident one when ``stop`` is
        set, a thread of the queue's own when a resident worker has taken over."""
        if stop is not None:
            return stop.is_set()
        if self._resident:
            self._worker = None
            return True
        return False

    def loop(self, stop: threading.Event | None = None) -> None:
        """Take what was posted and run rounds until there is nothing to do.

        A resident worker (``stop`` given) runs until ``stop`` is set; a worker thread of the
        queue's own until it has had nothing to do for WORKER_IDLE_S.
        """
        trim_at: float | None = None  # after work: when the heap goes back if nothing comes first
        weighed = True  # whether the memory held was looked at since the last round
        while True:
            with self._wakeup:
                trim = False
                while not self._has_work():
                    FOREGROUND.mark(self, False)
                    now = time.monotonic()
                    if not weighed:  # going idle: over the line, give back at once (even when leaving)
                        weighed = True
                        if resident_mb() > TRIM_AT_ONCE_ABOVE_MB:
                            trim_at = now
                    if trim_at is not None and now >= trim_at:
                        trim = True  # outside the lock, below: posting a press never waits for it
                        break
                    if self._leaving(stop):
                        return
                    timeout = _RESIDENT_POLL_S if stop is not None else WORKER_IDLE_S
                    woken = self._wakeup.wait(timeout=timeout if trim_at is None else min(timeout, trim_at - now))
                    if stop is None and not woken and not self._waiting and trim_at is None:
                        self._worker = None
                        return
                if not trim:
                    if self._leaving(stop):
                        return
                    posted, self._waiting = self._waiting, []
            if trim:
                give_back_memory()
                trim_at = None
                continue
            tasks = [t for t in posted if not isinstance(t, Cancel)]
            cancels = [t.task for t in posted if isinstance(t, Cancel)]
            left = self._round(tasks, cancels)
            trim_at, weighed = time.monotonic() + TRIM_AFTER_IDLE_S, False
            if left:
                with self._wakeup:
                    self._waiting[:0] = left  # first in line next round
