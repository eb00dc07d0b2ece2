"""The real embedded models, end to end: loading and caching, suggestions in English and Chinese, the API."""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from models import loading
from models.engine import SuggestionEngine
from models.registry import DEFAULT_MODEL
from models.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
CJK = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def engine():
    return SuggestionEngine(loading.load(DEFAULT_MODEL))


def check_suggestions(result, n=3):
    texts = result.texts
    assert 1 <= len(texts) <= n
    assert all(t.strip() for t in texts)
    assert [len(t) for t in texts] == sorted(len(t) for t in texts)
    joined = "".join(texts)
    assert "\ufffd" not in joined
    assert not re.search(r"<(start|end)_of_|<bos>|<eos>|<pad>", joined)
    return texts


def test_default_model_is_cached_on_disk_and_in_process(engine):
    cached = [p for p in loading.cache_root().glob("gemma-3-270m*") if (p / "config.json").is_file()]
    assert cached, "the converted model should be cached on disk"
    # ... and its fp32 read of the probe text, which every machine's choice of formats checks against.
    assert list((loading.cache_root() / "tuning").glob(f"{cached[0].name}-probe-*.pt")), "the probe read should be kept"
    started = time.perf_counter()
    again = loading.load(DEFAULT_MODEL)
    assert again is engine.loaded
    assert time.perf_counter() - started < 1.0  # in-process cache, no reload


def test_english_suggestions_continue_the_text(engine):
    result = engine.suggest("The most important thing about writing well is", Settings(), seed=1)
    texts = check_suggestions(result)
    assert len(texts) == 3
    # Continuations of a finished word start with a space: nothing glued onto "is".
    assert all(t[0].isspace() or not t[0].isalnum() for t in texts)
    # Increasing lengths: the longest is a sentence-ish run, the shortest a few words.
    assert len(texts[-1].split()) > len(texts[0].split())


def test_trailing_space_and_partial_word(engine):
    texts = check_suggestions(engine.suggest("I went to the market and bought some ", Settings(), seed=2))
    assert all(not t.startswith(" ") for t in texts)  # the writer's space is not doubled
    texts = check_suggestions(engine.suggest("The quick brown fox jumps over the la", Settings(), seed=3))
    assert all(t[0].isalpha() for t in texts)  # completes the word being typed


def test_chinese_suggestions(engine):
    result = engine.suggest("我最喜欢的季节是秋天，因为", Settings(), seed=4)
    texts = check_suggestions(result)
    assert sum(bool(CJK.search(t)) for t in texts) >= 2
    assert all(not t.startswith(" ") for t in texts)


def test_prefix_cache_makes_typing_cheap(engine):
    text = "Writing every day is a habit that"
    engine.suggest(text, Settings(), seed=5)
    result = engine.suggest(text + " slowly changes", Settings(), seed=5)
    assert 0 < result.new_prompt_tokens <= 4


def test_document_longer_than_context(engine):
    long_text = ("The river runs through the valley and the town. " * 2500)[:100_000]
    settings = Settings()
    result = engine.suggest(long_text, settings, seed=6)
    assert result.truncated
    assert result.prompt_tokens <= settings.context_tokens + 1
    check_suggestions(result)
    assert result.elapsed_s < settings.max_time * 1.5 + 5  # answered within (about) the budget


def test_odd_unicode_and_control_characters(engine):
    text = "Hello\x00 world \u202eolleh\u202c 👩‍💻 e\u0301 مرحبا 你好 \ud800 and then"
    check_suggestions(engine.suggest(text, Settings(), seed=7))


def test_second_embedded_model_through_the_same_option():
    small = SuggestionEngine(loading.load("smollm2-135m"))
    check_suggestions(small.suggest("The capital of France is", Settings(), seed=8))


def test_api_endpoint_returns_suggestions_shortest_first(app_url):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    texts = client.predict("Good morning! Today I would like to", api_name="/suggest")
    assert isinstance(texts, list) and len(texts) == 3
    assert all(isinstance(t, str) and t.strip() for t in texts)
    assert [len(t) for t in texts] == sorted(len(t) for t in texts)
    with pytest.raises(Exception, match="Type a few words"):
        client.predict("   ", api_name="/suggest")
    with pytest.raises(Exception, match="not a model this app offers"):
        client.predict("Hi", model="no such model", api_name="/suggest")
    assert "suggest" in client.view_api(print_info=False, return_format="dict")["named_endpoints"].__repr__()


def test_app_exits_with_one_line_for_unknown_model():
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    proc = subprocess.run(
        [sys.executable, "app.py", "--model", "no-such-model-xyz", "--port", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr  # README, "Bad input": one line and exit 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("tabwrite:")]
    assert len(lines) == 1 and "no-such-model-xyz" in lines[0]


def test_score_endpoint(app_url):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    text = "The quick brown fox jumps over the lazy dog. 今天天气很好。"
    result = client.predict(text, api_name="/score")
    assert result["perplexity"] > 1 and 0 < result["bits_per_char"] < 10
    tokens = result["tokens"]
    assert "".join(t["text"] for t in tokens) == text
    assert all(0 < t["prob"] <= 1 and t["rank"] >= 1 and t["alternatives"] for t in tokens)
    # A well-known phrase: the model ranks most of its words first.
    fox = [t for t in tokens if t["text"] in (" jumps", " over", " lazy", " dog")]
    assert fox and sum(t["rank"] == 1 for t in fox) >= 2
    assert math.exp(-sum(math.log(t["prob"]) for t in tokens) / len(tokens)) == pytest.approx(result["perplexity"], rel=1e-3)
    with pytest.raises(Exception, match="empty"):
        client.predict("", api_name="/score")


def test_save_and_load_endpoints(app_url):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    saved = client.predict("A saved text", [[0, 1]], api_name="/save")
    assert saved["id"] and saved["share_url"].startswith("http://127.0.0.1") and saved["id"] in saved["share_url"]
    loaded = client.predict(saved["id"], api_name="/load")
    assert loaded["text"] == "A saved text" and loaded["marks"] == [[0, 1]]
    with pytest.raises(Exception, match="no saved document"):
        client.predict("not-an-id", api_name="/load")


def _server_function(url: str, session: str, name: str, data: dict, timeout: float = 60):
    """Call one of the editor's server functions the way the page does (POST /gradio_api/component_server/)."""
    with urllib.request.urlopen(url + "config", timeout=30) as r:
        config = json.load(r)
    editor_id = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "editor")
    parts = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    body = json.dumps({"session_hash": session, "component_id": editor_id, "fn_name": name, "data": data})
    conn.request("POST", "/gradio_api/component_server/", body=body, headers={"Content-Type": "application/json"})
    return conn


def test_browser_that_disconnects_mid_press_frees_the_model(app_url):
    session = "disconnect-test"
    # Round 6 asks for very long suggestions: left alone, the press would run into its 4 s budget.
    conn = _server_function(app_url, session, "suggest_for_editor", {"text": "The history of the city began when", "round": 6}, timeout=0.8)
    with pytest.raises((TimeoutError, socket.timeout)):
        conn.getresponse()
    conn.sock.shutdown(socket.SHUT_RDWR)  # the browser tab is closed
    conn.close()
    last = None
    for _ in range(120):  # bounded wait for the press to end, whichever way it ends
        poll = _server_function(app_url, session, "suggestion_progress", {})
        last = json.loads(poll.getresponse().read()).get("last")
        poll.close()
        if last is not None:
            break
        time.sleep(0.25)
    assert last is not None and last["cancelled"] and not last["timed_out"], last


def test_a_waiting_progress_poll_brings_the_first_row_while_the_press_runs(app_url):
    """The editor's poll ({"seq", "seen", "wait": true}) is answered when a row is ready, through real HTTP."""
    session = "waiting-poll-test"
    # Round 6: long rows, seconds of work; the shortest is ready long before the press ends.
    press = _server_function(app_url, session, "suggest_for_editor", {"text": "The history of the city began when", "round": 6, "seq": 41})
    try:
        rows = []
        for _ in range(40):  # each poll comes back with news or after at most 1.5 s
            poll = _server_function(app_url, session, "suggestion_progress", {"seq": 41, "seen": 0, "wait": True})
            answer = json.loads(poll.getresponse().read())
            poll.close()
            if answer.get("seq") == 41 and answer.get("suggestions"):
                rows = answer["suggestions"]
                break
        assert rows and rows[0]["text"]
        press.sock.settimeout(0.0)  # the press has not answered yet: its rows were not all ready
        with pytest.raises(BlockingIOError):
            press.sock.recv(1, socket.MSG_PEEK)
        press.sock.settimeout(60)
        final = json.loads(press.getresponse().read())
        assert rows[0]["text"] in [s["text"] for s in final["suggestions"]]
    finally:
        press.close()


