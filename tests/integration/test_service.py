"""The editor's service on the real default model: pre-computation, streaming progress, cancel."""

from __future__ import annotations

import threading
import time

import pytest

from editor.service import SuggestService
from models.registry import DEFAULT_MODEL
from tests.serving import wait_for


@pytest.fixture(scope="module")
def service():
    service = SuggestService(DEFAULT_MODEL)
    # Loaded here, not in a test's first press: a Tab waits for a pre-computation only as long
    # as its own time budget, which a first load on 2 cores can exceed.
    service.engine()
    return service


def test_tab_after_a_pause_is_answered_from_the_precomputed_result(service):
    text = "After a long day at work, the first thing I do at home is"
    pre = service.suggest_for_session("writer-a", text, prefetch=True)
    assert len(pre["suggestions"]) >= 1 and not pre["from_cache"]
    tab = service.suggest_for_session("writer-a", text)
    assert tab["from_cache"] is True
    assert tab["suggestions"] == pre["suggestions"]
    # It is used once: the next Tab on the same text samples afresh.
    assert service.suggest_for_session("writer-a", text)["from_cache"] is False
    # Another writer, or another text, does not see it.
    service.suggest_for_session("writer-a", text, prefetch=True)
    assert service.suggest_for_session("writer-b", text)["from_cache"] is False
    assert service.suggest_for_session("writer-a", text + " usually")["from_cache"] is False


def test_tab_during_precomputation_waits_for_it(service):
    text = "The train was late again, so we decided to"
    pre: dict = {}
    worker = threading.Thread(target=lambda: pre.update(service.suggest_for_session("writer-c", text, prefetch=True, seq=7)))
    worker.start()
    # The pre-computation has begun once the session's progress carries its number (it is registered
    # just before): the Tab then finds it running, or already stored; either way it must not start over.
    wait_for(lambda: service.progress("writer-c").get("seq") == 7 or not worker.is_alive(), "the pre-computation", timeout=60)
    tab = service.suggest_for_session("writer-c", text)
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert tab["from_cache"] is True and tab["suggestions"]
    # The Tab was answered with that pre-computation's own result: it did not cancel it and start over.
    assert pre.get("suggestions") and not pre.get("cancelled"), pre
    assert tab["suggestions"] == pre["suggestions"]
    assert service.progress("writer-c")["last"]["prefetch"] is True


def test_prefetch_can_be_switched_off(service):
    service.update_settings("writer-d", DEFAULT_MODEL, {"prefetch": False})
    assert service.suggest_for_session("writer-d", "Some text to", prefetch=True) == {"skipped": True}


def test_progress_streams_finished_rows_and_cancel_stops(service):
    text = "In the summer of that year, the whole family moved to a small town on the coast where"
    seen: list[int] = []
    service.update_settings("writer-e", DEFAULT_MODEL, {"lengths": "2, 40, 80", "max_time": 20})
    answer: dict = {}
    worker = threading.Thread(target=lambda: answer.update(service.suggest_for_session("writer-e", text, seq=3)))
    worker.start()
    deadline = time.time() + 30
    while worker.is_alive() and time.time() < deadline:
        progress = service.progress("writer-e")
        if progress.get("seq") == 3 and progress["suggestions"]:
            seen.append(len(progress["suggestions"]))
            break
        time.sleep(0.02)
    # The shortest row was visible before the press finished; now cancel the rest.
    service.cancel("writer-e")
    worker.join()
    assert seen and seen[0] < 3
    assert answer["cancelled"] is True
    assert all(s["text"] == s["text"].rstrip() for s in answer["suggestions"])


def _openings(answer: dict) -> list[str]:
    from models.openings import unit_key, unit_of

    return [unit_key(unit_of(s["text"])[0]) for s in answer["suggestions"]]


def test_rows_start_differently_and_tab_again_starts_differently_again(service):
    text = "When we got to the beach, the children ran straight into the"
    first = service.suggest_for_session("writer-f", text)
    assert len(set(_openings(first))) == len(first["suggestions"]) == 3, first
    again = service.suggest_for_session("writer-f", text, round_=1)
    assert again["suggestions"] and not set(_openings(again)) & set(_openings(first)), (first, again)
    # A fresh press on the same text (round 0) may offer the likeliest openings again.
    assert set(_openings(service.suggest_for_session("writer-f", text))) & set(_openings(first))


def test_writing_in_the_middle_never_says_the_text_after_the_caret_twice(service):
    from models.core import Suggestion, into

    after = " kettle on the stove and waited for the water to boil."
    for seed_text in ("She filled the", "Before breakfast he put the"):
        answer = service.suggest_for_session("writer-g", seed_text, after=after)
        assert answer["suggestions"], answer
        assert "kettle" not in _openings(answer)
        for s in answer["suggestions"]:
            assert into(Suggestion(s["text"], 1, 0.0), after).text == s["text"], s


def test_rows_the_model_is_unsure_of_can_be_hidden(service):
    import math

    text = "My favourite colour has always been"
    service.update_settings("writer-h", DEFAULT_MODEL, {"hide_below": 0.9})
    answer = service.suggest_for_session("writer-h", text)
    assert all(math.exp(s["logprob"]) >= 0.9 - 1e-3 for s in answer["suggestions"]), answer  # (rounded to 3 places)
    if not answer["suggestions"]:
        assert "unsure" in answer["message"]
    service.update_settings("writer-h", DEFAULT_MODEL, {"hide_below": 0})
    assert len(service.suggest_for_session("writer-h", text)["suggestions"]) == 3
