"""What the service keeps per session, and how it shares scoring among visitors (issue 11).

The service (editor/service.py) is what is under test; a small model stands in for the real
one: it answers each press with one row at once and records what it was given.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from editor.service import MAX_PROMPT_CHARS, SCORE_BUSY, SuggestService
from models import textcut
from models.core import Suggestion, SuggestResult


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


def wait_for(condition, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen in {timeout} s"
        time.sleep(0.005)


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
