"""Starting and stopping the servers the tests run on 127.0.0.1 (the app, llama-cpp-python's server)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def wait_for(condition, what: str = "the condition", timeout: float = 10.0, poll_s: float = 0.005) -> None:
    """Poll ``condition`` until it holds; the timeout only guards against a hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen in {timeout} s"
        time.sleep(poll_s)


def post(url: str, path: str, body, headers: dict | None = None, timeout: float = 120) -> tuple[int, bytes]:
    """POST ``body`` (JSON, or bytes as they are) to the app; (status, the answer's bytes)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def app_config(url: str) -> dict:
    """The page's Gradio config: its components and events."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("GET", "/config")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def component(url: str, **props) -> dict:
    """The page's component whose props include ``props`` (e.g. elem_id="editor", label="...")."""
    return next(c for c in app_config(url)["components"] if all(c.get("props", {}).get(k) == v for k, v in props.items()))


def panel_change(url: str, box: int, data: list, visitor: str, timeout: float = 120) -> str:
    """A change of the settings panel's box ``box`` with the panel's values ``data``, as the page
    sends it (Gradio's queue), from ``visitor``: the panel's line, or Gradio's error."""
    event = next(d for d in app_config(url)["dependencies"] if [box, "change"] in d["targets"])
    session = secrets.token_hex(8)
    status, payload = post(url, "/gradio_api/queue/join", {"data": data, "fn_index": event["id"], "session_hash": session,
                                                          "event_data": None, "trigger_id": box}, {"X-Forwarded-For": visitor})
    assert status == 200, payload[:300]
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    conn.request("GET", f"/gradio_api/queue/data?session_hash={session}", headers={"X-Forwarded-For": visitor})
    try:
        for line in conn.getresponse():
            if line.startswith(b"data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    return message["output"]["data"][0] if message.get("success") else message["output"]["error"]
    finally:
        conn.close()
    raise AssertionError("the settings panel did not answer")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(url: str, proc: subprocess.Popen, log_path: Path, timeout: float, what: str, poll_s: float = 0.5) -> None:
    """Return once ``url`` answers 200; fail the test with the end of the log if ``proc`` exits or ``timeout`` passes."""
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.time() > deadline:
            pytest.fail(f"{what} did not start in {timeout} s:\n{log_path.read_text()[-3000:]}")
        time.sleep(poll_s)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@contextlib.contextmanager
def running_app(args: list[str], log_dir: Path, timeout: float, what: str, poll_s: float = 0.5):
    """`python app.py ARGS` on 127.0.0.1 and a free port, logging to ``log_dir``; yields its URL.

    HF_HUB_OFFLINE: a model name that is not embedded must fail without any network use.
    """
    port = free_port()
    log_path = log_dir / "app.log"
    env = dict(
        os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
        TABWRITE_DB=str(log_dir / "documents.sqlite3"),
    )
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "app.py", *args, "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_serving(url, proc, log_path, timeout, what, poll_s=poll_s)
        yield url
    finally:
        stop(proc)
