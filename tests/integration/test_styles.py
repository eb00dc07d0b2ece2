"""Learning a style on the real embedded model, through the running app's API (real HTTP).

A short text and the real training loop (a few steps): the new model answers /suggest and
/score, its bits per character differ from the base model's, its owner lists and deletes it,
and nobody else can. Bad requests get one clear line. (Its gain at full size: bench/personalize.py.)
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from models.textcache import WEIGHTS

gradio_client = pytest.importorskip("gradio_client")

TEXT = (Path(__file__).resolve().parents[2] / "bench" / "data" / "style_en.txt").read_text(encoding="utf-8")[:2600]


@pytest.fixture(scope="module")
def client(app_url):
    return gradio_client.Client(app_url, verbose=False)


def error_of(call) -> str:
    with pytest.raises(Exception) as info:
        call()
    return str(info.value)


def test_a_learned_style_is_a_model_of_its_own_for_its_owner(client):
    answer = client.predict(TEXT, "ci", "", "", api_name="/personalize")
    model, key = answer["model"], answer["owner_key"]
    assert model.startswith("gemma-3-270m+ci@") and len(model.rpartition("@")[2]) == 16
    assert answer["heldout_chars"] > 100 and answer["seconds"] > 0
    assert 0.3 < answer["bits_per_char_before"] < 3 and 0.3 < answer["bits_per_char_after"] < 3
    assert answer["bits_per_char_after"] != answer["bits_per_char_before"]
    assert answer["training_precision"] in ("float32", "bfloat16")  # whichever this CPU trains faster in
    assert answer["text_cache_weight"] in WEIGHTS  # as the training text's end read best
    assert answer["examples"] and all(e["base"] is not None and e["style"] is not None for e in answer["examples"])
    try:
        rows = client.predict("To Sherlock Holmes she is always", api_name="/suggest", model=model)
        assert len(rows) == 3 and all(r.strip() for r in rows)
        adapted = client.predict(TEXT[-600:], model, api_name="/score")
        base = client.predict(TEXT[-600:], "", api_name="/score")
        assert adapted["bits_per_char"] != base["bits_per_char"]
        assert [s["model"] for s in client.predict(key, api_name="/styles")] == [model]
        # Another owner key neither sees nor deletes it.
        other = "A" * 32
        assert client.predict(other, api_name="/styles") == []
        assert "not one of your styles" in error_of(lambda: client.predict(model, other, api_name="/delete_style"))
    finally:
        client.predict(model, key, api_name="/delete_style")
    assert "not a style this app has" in error_of(lambda: client.predict("Hello", api_name="/suggest", model=model))


def test_bad_requests_get_one_line(client):
    assert "Too little text" in error_of(lambda: client.predict("short", "ci", "", "", api_name="/personalize"))
    assert "1 to 32 letters" in error_of(lambda: client.predict(TEXT, "../../etc", "", "", api_name="/personalize"))
    line = error_of(lambda: client.predict(TEXT, "ci", "/etc/passwd", "", api_name="/personalize"))
    assert "not a model this app offers" in line and "No such file" not in line
    assert "owner key" in error_of(lambda: client.predict(TEXT, "ci", "", "x y", api_name="/personalize"))
    # A style name that was never given out is no model at all.
    assert "not a style this app has" in error_of(
        lambda: client.predict("Hello", api_name="/suggest", model="gemma-3-270m+ci@AAAAAAAAAAAAAAAA"))


def test_one_style_at_a_time(app_url):
    """Two requests at once: one learns, the other is told at once that the server is busy."""
    answers: dict = {}

    def ask(name: str) -> None:
        try:
            answers[name] = gradio_client.Client(app_url, verbose=False).predict(TEXT, name, "", "", api_name="/personalize")
        except Exception as e:  # noqa: BLE001 - the answer under test
            answers[name] = str(e)

    jobs = [threading.Thread(target=ask, args=(name,)) for name in ("first", "second")]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=600)
    learned = [a for a in answers.values() if isinstance(a, dict)]
    refused = [a for a in answers.values() if isinstance(a, str)]
    try:
        assert len(learned) == 1 and len(refused) == 1, answers
        assert "Busy: another style is being learned" in refused[0]
    finally:
        client = gradio_client.Client(app_url, verbose=False)
        for a in learned:
            client.predict(a["model"], a["owner_key"], api_name="/delete_style")
