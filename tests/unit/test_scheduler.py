"""The queue every press goes through (models/scheduler.py), on plain tasks: no model needed."""

from __future__ import annotations

import threading
import time

from models.scheduler import Scheduler


class Rounds:
    """A round that records what it was given and leaves the tasks named in ``leave`` for later."""

    def __init__(self, leave=()):
        self.seen: list[tuple[list, list, str]] = []
        self.leave = set(leave)
        self.done = threading.Event()

    def __call__(self, tasks, cancels):
        self.seen.append((list(tasks), list(cancels), threading.current_thread().name))
        left = [t for t in tasks if t in self.leave]
        self.leave -= set(left)
        if not left:
            self.done.set()
        return left


def test_cancel_is_a_task_and_leftovers_go_first():
    rounds = Rounds(leave={"b"})
    queue = Scheduler("test", rounds, busy=lambda: False)
    stop = threading.Event()
    runner = threading.Thread(target=queue.serve_here, args=(stop,), name="resident")
    runner.start()
    for _ in range(1000):
        if queue._resident:
            break
        stop.wait(0.01)
    with queue._wakeup:  # everything below is posted before the worker's first round
        queue.post("a")
        queue.post("b")
        queue.cancel("a")
        assert queue.posted == 3 and queue.pending() == 2
    assert rounds.done.wait(10)
    stop.set()
    runner.join(10)
    assert not runner.is_alive()
    assert rounds.seen[0][:2] == (["a", "b"], ["a"])  # the cancel reaches the round with the tasks
    assert rounds.seen[1][:2] == (["b"], [])  # what a round left comes back first
    assert {name for _, _, name in rounds.seen} == {"resident"}


def test_without_a_resident_worker_a_thread_of_its_own_serves_and_ends_when_stopped_being_needed():
    rounds = Rounds()
    queue = Scheduler("own", rounds, busy=lambda: False)
    queue.post("x")
    assert rounds.done.wait(10)
    assert rounds.seen[0][0] == ["x"] and rounds.seen[0][2] == "tabwrite-own"
    worker = queue.worker
    assert worker is not None
    # A resident worker takes over: the queue's own thread leaves.
    stop = threading.Event()
    runner = threading.Thread(target=queue.serve_here, args=(stop,), name="resident")
    runner.start()
    worker.join(10)
    assert not worker.is_alive() and queue.worker is None
    rounds.done.clear()
    queue.post("y")
    assert rounds.done.wait(10) and rounds.seen[-1] == (["y"], [], "resident")
    stop.set()
    runner.join(10)


def test_busy_keeps_the_loop_going_without_new_tasks():
    left = [3]
    calls = []

    def round_(tasks, cancels):
        calls.append(list(tasks))
        left[0] -= 1
        return []

    queue = Scheduler("busy", round_, busy=lambda: left[0] > 0)
    stop = threading.Event()
    queue.post("once")
    runner = threading.Thread(target=queue.serve_here, args=(stop,))
    runner.start()
    until = threading.Event()
    for _ in range(200):
        if left[0] <= 0:
            break
        until.wait(0.05)
    stop.set()
    runner.join(10)
    assert calls[0] == ["once"] and calls[1:] == [[], []]  # two more rounds while busy, then idle


def test_the_heap_is_trimmed_once_the_loop_has_been_idle_a_while_never_between_presses(monkeypatch):
    import models.scheduler as scheduler

    events: list = []
    monkeypatch.setattr(scheduler, "give_back_memory", lambda: events.append(("trim", time.monotonic())))
    monkeypatch.setattr(scheduler, "TRIM_AFTER_IDLE_S", 0.5)
    monkeypatch.setattr(scheduler, "TRIM_AT_ONCE_ABOVE_MB", float("inf"))  # whatever this process holds
    more = [0]  # rounds still busy after the one that took the press
    ended: list[float] = []

    def round_(tasks, cancels):
        events.append(("round", list(tasks)))
        more[0] = 2 if tasks else more[0] - 1
        ended.append(time.monotonic())
        return []

    queue = Scheduler("trim", round_, busy=lambda: more[0] > 0)
    stop = threading.Event()
    runner = threading.Thread(target=queue.serve_here, args=(stop,))
    runner.start()
    until = threading.Event()
    try:
        until.wait(0.7)
        assert events == []  # idle from the start: nothing to give back
        queue.post("press")
        until.wait(0.25)
        queue.post("again")  # within the delay: the next press finds the heap as the last left it
        for _ in range(100):
            if any(e[0] == "trim" for e in events):
                break
            until.wait(0.05)
        until.wait(1.2)  # idling on: no second trim
    finally:
        stop.set()
        runner.join(10)
    rounds = [e for e in events if e[0] == "round"]
    trims = [e[1] for e in events if e[0] == "trim"]
    assert [r[1] for r in rounds] == [["press"], [], [], ["again"], [], []]
    assert len(trims) == 1 and events[-1][0] == "trim"  # once, after the last round
    assert trims[0] - ended[-1] >= 0.5 - 0.01  # and only after the delay


def test_a_process_over_its_memory_line_gives_the_heap_back_as_soon_as_it_goes_idle(monkeypatch):
    import models.scheduler as scheduler

    events: list = []
    monkeypatch.setattr(scheduler, "give_back_memory", lambda: events.append("trim"))
    monkeypatch.setattr(scheduler, "TRIM_AFTER_IDLE_S", 60.0)
    monkeypatch.setattr(scheduler, "TRIM_AT_ONCE_ABOVE_MB", 0.0)  # any process is over it

    queue = Scheduler("over", lambda tasks, cancels: events.append(("round", list(tasks))) or [], busy=lambda: False)
    stop = threading.Event()
    runner = threading.Thread(target=queue.serve_here, args=(stop,))
    runner.start()
    until = threading.Event()
    try:
        queue.post("press")
        for _ in range(40):
            if "trim" in events:
                break
            until.wait(0.05)
    finally:
        stop.set()
        runner.join(10)
    assert events == [("round", ["press"]), "trim"]  # not after the 60 s
