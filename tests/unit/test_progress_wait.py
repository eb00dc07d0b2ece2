"""The editor's waiting progress poll (editor/service.py ``next_progress``).

The service is what is under test; a small model stands in for the real one: it reports its
first row through ``on_update`` and then waits for the test to let it finish.
"""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest

from editor import service as service_module
from editor.service import WAITING_POLLS_PER_SESSION, SuggestService
from models.core import Suggestion, SuggestResult
from tests.serving import wait_for

SESSION = "198.51.100.7|page"


class Model:
    """One row reported at once, a second when ``finish`` is set, then the answer."""

    name = "m"
    device = SimpleNamespace(type="cpu")

    def __init__(self):
        self.begin = threading.Event()  # set by default; a test clears it to hold back the first row
        self.begin.set()
        self.finish = threading.Event()

    def describe(self) -> str:
        return "a stand-in"

    def suggest(self, text, settings, round_=0, is_cancelled=lambda: False, seed=None, on_update=None, caller_gone=None,
                after="", avoid=()):
        self.begin.wait(30)
        first = Suggestion(" one", 1, -0.5)
        on_update([first])
        self.finish.wait(30)
        rows = [first, Suggestion(" one two", 2, -0.7)]
        return SuggestResult(suggestions=rows)


class Server:
    def __init__(self, model):
        self.model, self.models = model, ["m"]

    def for_model(self, name):
        return self.model


@pytest.fixture
def pressing(monkeypatch):
    """A service with press number 3 of SESSION in flight, its first row reported."""
    monkeypatch.setattr(service_module, "PROGRESS_WAIT_S", 60.0)  # only news ends a wait in these tests
    model = Model()
    service = SuggestService("m", backend=Server(model))
    answers = {}
    press = threading.Thread(target=lambda: answers.setdefault("press", service.suggest_for_session(SESSION, "Hello", seq=3)))
    press.start()
    wait_for(lambda: (service.session(SESSION, create=False) or SimpleNamespace(progress={})).progress.get("seq") == 3, "the first row")
    yield service, model, answers
    model.finish.set()
    press.join(10)


def run(make):
    """``asyncio.run(make())`` in a thread of its own: the suite's browser tests leave an event
    loop running in this one (Playwright's)."""
    box = {}

    def target():
        try:
            box["value"] = asyncio.run(make())
        except BaseException as e:  # noqa: BLE001 - raised again below
            box["error"] = e

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(60)
    if "error" in box:
        raise box["error"]
    return box["value"]


def poll(service, seq, seen, limit=20.0):
    """One waiting poll, given ``limit`` s to come back (it must come back on news, not time)."""
    return run(lambda: asyncio.wait_for(service.next_progress(SESSION, seq, seen), limit))


def test_a_waiting_poll_is_answered_at_once_with_the_row_that_is_ready(pressing):
    service, model, answers = pressing
    progress = poll(service, 3, 0)
    assert [r["text"] for r in progress["suggestions"]] == [" one"]
    assert "press" not in answers  # the press is still running: the row came before the answer


def test_a_waiting_poll_is_woken_by_the_next_row_or_the_end_of_the_press(pressing):
    service, model, answers = pressing
    threading.Timer(0.3, model.finish.set).start()
    progress = poll(service, 3, 1)  # it has seen the first row: it waits for more, or the end
    assert service.session(SESSION, create=False).ended == 3
    assert answers["press"]["suggestions"][1]["text"] == " one two"
    assert progress["seq"] == 3


def test_a_poll_for_a_press_that_has_ended_is_answered_at_once(pressing):
    service, model, answers = pressing
    model.finish.set()
    wait_for(lambda: "press" in answers, "the press")
    assert poll(service, 3, 5, limit=5.0)["seq"] == 3


def test_a_session_has_few_waiting_polls_and_the_rest_are_answered_at_once(pressing):
    service, model, answers = pressing

    async def many():
        waiting = [asyncio.create_task(service.next_progress(SESSION, 3, 1)) for _ in range(WAITING_POLLS_PER_SESSION)]
        await asyncio.sleep(0.2)
        assert not any(t.done() for t in waiting)  # waiting for news
        assert len(service.session(SESSION, create=False).waiting) == WAITING_POLLS_PER_SESSION
        extra = await asyncio.wait_for(service.next_progress(SESSION, 3, 1), 5)  # answered at once
        model.finish.set()
        done = await asyncio.wait_for(asyncio.gather(*waiting), 20)
        return extra, done

    extra, done = run(many)
    assert extra["seq"] == 3 and all(d["seq"] == 3 for d in done)
    assert service.session(SESSION, create=False).waiting == ()  # none left behind


def test_a_poll_waiting_before_the_first_row_is_woken_by_it(monkeypatch):
    monkeypatch.setattr(service_module, "PROGRESS_WAIT_S", 60.0)
    model = Model()
    model.begin.clear()
    service = SuggestService("m", backend=Server(model))
    press = threading.Thread(target=lambda: service.suggest_for_session(SESSION, "Hello", seq=4))
    press.start()
    try:
        wait_for(lambda: (service.session(SESSION, create=False) or SimpleNamespace(in_flight=0)).in_flight == 1, "the press")
        threading.Timer(0.3, model.begin.set).start()
        progress = poll(service, 4, 0)
        assert [r["text"] for r in progress["suggestions"]] == [" one"] and press.is_alive()
    finally:
        model.begin.set()
        model.finish.set()
        press.join(10)


def test_a_poll_of_an_unknown_session_is_answered_at_once_and_makes_none():
    service = SuggestService("m", backend=Server(Model()))
    progress = run(lambda: asyncio.wait_for(service.next_progress("203.0.113.1|nobody", 1, 0), 5))
    assert progress["last"] is None
    assert service.session("203.0.113.1|nobody", create=False) is None
