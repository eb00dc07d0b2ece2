"""What the service keeps per session, and how it shares scoring among visitors (issue 11).

The service (editor/service.py) is what is under test; a small model stands in for the real
one: it answers each press with one row at once and records what it was given.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

from editor import service as service_module
from editor.service import MAX_PROMPT_CHARS, MAX_SESSIONS, SCORE_BUSY, SESSIONS_PER_VISITOR, SuggestService
from models import textcut
from models.core import Suggestion, SuggestResult
from tests.serving import wait_for


class Model:
    """Stands in for a model: one row per press (" row1", " row2", ...); a scoring waits for ``release``."""

    name = "m"
    device = SimpleNamespace(type="cpu")

    def __init__(self):
        self.texts: list[str] = []
        self.avoided: list[tuple] = []
        self.scoring: list[str] = []
        self.release = threading.Event()

    def describe(self) -> str:
        return "a stand-in"

    def suggest(self, text, settings, round_=0, is_cancelled=lambda: False, seed=None, on_update=None, caller_gone=None,
                after="", avoid=()):
        self.texts.append(text)
        self.avoided.append(tuple(avoid))
        return SuggestResult(suggestions=[Suggestion(f" row{len(self.texts)}", 2, -0.5)])

    def score(self, text, alternatives=10, on_progress=None, caller_gone=None):
        self.scoring.append(text)
        self.release.wait(30)
        return {"perplexity": 2.0, "text": text}


class Server:
    """The backend the service asks for models by name (as models/remote.py's does)."""

    def __init__(self, model: Model):
        self.model, self.models = model, ["m"]

    def for_model(self, name):
        return self.model


def held_chars(value) -> int:
    """Characters (and bytes) of every string inside ``value``: what it keeps alive of the texts."""
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, dict):
        return sum(held_chars(k) + held_chars(v) for k, v in value.items())
    if isinstance(value, (tuple, list)):
        return sum(held_chars(v) for v in value)
    return 0


def test_a_session_keeps_no_more_of_a_huge_text_than_a_press_reads():
    model = Model()
    service = SuggestService("m", backend=Server(model))
    text = "word " * 600_000 + "and then"  # 3 MB: what one request may carry
    pre = service.suggest_for_session("v|tab", text, prefetch=True)
    assert model.texts[-1] == textcut.tail(text, MAX_PROMPT_CHARS)  # what the model reads, as before
    session = service.session("v|tab")
    kept = held_chars((session.shown, session.precomputed, session.prefetching))
    # The whole text was kept (in the key of what was shown and pre-computed): 3,000,008 characters.
    assert kept <= MAX_PROMPT_CHARS, kept
    # And the pause's pre-computation still answers the Tab that follows, and Tab again still
    # knows what was shown on this text.
    tab = service.suggest_for_session("v|tab", text)
    assert tab["from_cache"] is True and tab["suggestions"] == pre["suggestions"]
    service.suggest_for_session("v|tab", text, round_=1)
    assert model.avoided[-1] == (" row1",)
    # A text that differs only before the cut reads the same: the same key.
    service.suggest_for_session("v|tab", "x" + text[1:], prefetch=True)
    assert service.suggest_for_session("v|tab", "x" + text[1:])["from_cache"] is True
    # A text that differs where the model reads does not.
    service.suggest_for_session("v|tab", text, prefetch=True)
    assert service.suggest_for_session("v|tab", text + " more")["from_cache"] is False


def test_a_visitor_holds_at_most_one_scoring_place():
    model = Model()
    service = SuggestService("m", backend=Server(model))
    answers: dict = {}
    first = threading.Thread(target=lambda: answers.setdefault("a", service.score("first", visitor="198.51.100.1")))
    first.start()
    try:
        wait_for(lambda: model.scoring == ["first"], "the first scoring")
        # The same visitor again, by the API or from a page (a session of theirs): busy at once.
        assert service.score("second", visitor="198.51.100.1") == {"error": SCORE_BUSY}
        assert service.score("third", session_id="198.51.100.1|other-tab") == {"error": SCORE_BUSY}
        assert model.scoring == ["first"]
        # Another visitor's scoring goes on to the model (its own limiter is the model's business).
        other = threading.Thread(target=lambda: answers.setdefault("b", service.score("yours", session_id="192.0.2.7|tab")))
        other.start()
        wait_for(lambda: "yours" in model.scoring, "the other visitor's scoring")
    finally:
        model.release.set()
        first.join(10)
    other.join(10)
    assert answers["a"]["text"] == "first" and answers["b"]["text"] == "yours"
    # Once theirs is done, the visitor scores again.
    assert service.score("again", visitor="198.51.100.1")["text"] == "again"


def test_a_visitor_opening_sessions_by_the_thousand_pushes_out_only_their_own():
    # Through HTTP (tests/security/test_public.py) the request rate lets one address open only
    # ~100 sessions in that test, far from MAX_SESSIONS; here the service alone gets them all.
    service = SuggestService("m", backend=Server(Model()))
    service.update_settings("192.0.2.1|writer", "m", {"temperature": 0.3})
    flood = [f"198.51.100.66|flood-{n}" for n in range(MAX_SESSIONS + 200)]
    for key in flood:
        service.session(key)
    writer = service.session("192.0.2.1|writer", create=False)
    assert writer is not None and writer.settings.temperature == 0.3
    # The flooder keeps their newest SESSIONS_PER_VISITOR sessions, no more.
    kept = [key for key in flood if service.session(key, create=False) is not None]
    assert kept == flood[-SESSIONS_PER_VISITOR:]


def test_a_full_table_loses_sessions_of_the_visitors_holding_the_most_first(monkeypatch):
    monkeypatch.setattr(service_module, "MAX_SESSIONS", 40)
    service = SuggestService("m", backend=Server(Model()))
    # Writers who paused long ago: the least recently used sessions of the table.
    writers = ["192.0.2.1|tab", "192.0.2.2|tab", "192.0.2.2|other-tab", "192.0.2.3|tab"]
    for key in writers:
        service.update_settings(key, "m", {"temperature": 0.3})
    # A crowd of ten IPv6 hosts (a /64 each: one visitor each) opening sessions by the dozen,
    # four times what the table holds.
    crowd = [f"2001:db8:{a:x}:1::/64|s{n}" for a in range(10) for n in range(SESSIONS_PER_VISITOR)]
    for key in crowd:
        service.session(key)
    for key in writers:  # by least recently used alone, these went first
        assert service.session(key, create=False).settings.temperature == 0.3, key
    assert service.session(crowd[-1], create=False) is not None  # the crowd's newest are still there
    assert len(service._sessions) == 40
    # A crowd of as many hosts as the table has places, one session each, still pushes the
    # writers out, oldest first (see SuggestService.session).
    for a in range(40):
        service.session(f"2001:db8:{a:x}:2::/64|one")
    assert service.session("192.0.2.1|tab", create=False) is None


def test_a_session_with_a_press_in_flight_is_never_pushed_out(monkeypatch):
    monkeypatch.setattr(service_module, "SESSIONS_PER_VISITOR", 3)
    model = Model()
    gate = threading.Event()
    answers = {}

    def slow(text, settings, round_=0, **kwargs):
        gate.wait(10)
        return SuggestResult(suggestions=[Suggestion(" slow", 1, -0.5)])

    model.suggest = slow
    service = SuggestService("m", backend=Server(model))
    press = threading.Thread(target=lambda: answers.setdefault("a", service.suggest_for_session("198.51.100.9|busy", "Hello")))
    press.start()
    try:
        wait_for(lambda: service.session("198.51.100.9|busy", create=False).in_flight == 1, "the press")
        for n in range(10):  # the same visitor's newer sessions push out their others, not the busy one
            service.session(f"198.51.100.9|more-{n}")
        assert service.session("198.51.100.9|busy", create=False) is not None
        assert service.session("198.51.100.9|more-7", create=False) is None
    finally:
        gate.set()
        press.join(10)
    assert answers["a"]["suggestions"][0]["text"] == " slow"
