"""The remote backend's API key, through real HTTP (issue 11, item 6).

A small OpenAI-compatible server runs here on 127.0.0.1: it wants ``Authorization: Bearer <key>``
on every route, ``GET /v1/models`` included (401 otherwise, with the header it got echoed back
in the error, as some proxies do), and records what it saw. The real ``python app.py --backend
openai`` runs against it with the key in $TABWRITE_API_KEY. The key must go with every request
and appear in no message and no line of the app's log.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.serving import free_port, stop, wait_until_serving

ROOT = Path(__file__).resolve().parents[2]
APP_STARTUP_S = 240
KEY = "sk-tabwrite-" + secrets.token_hex(12)
WORDS = [" the", " quick", " brown", " fox", " jumps", " over", " a", " lazy", " dog", " and", " runs", " home"]


class FakeServer:
    """An OpenAI-compatible completions server on 127.0.0.1 that wants ``key``."""

    def __init__(self, key: str):
        self.key = key
        self.seen: list[tuple[str, str, dict]] = []  # (method, path, headers) of every request
        self.fail_completions = False  # answer 500 with the Authorization header echoed back
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _json(self, status: int, data: dict) -> None:
                payload = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _authorized(self) -> bool:
                auth = self.headers.get("Authorization")
                with server._lock:
                    server.seen.append((self.command, self.path, dict(self.headers.items())))
                if auth == f"Bearer {server.key}":
                    return True
                self._json(401, {"error": {"message": f"Incorrect API key in Authorization: {auth}", "code": 401}})
                return False

            def do_GET(self):
                if not self._authorized():
                    return
                if self.path == "/v1/models":
                    self._json(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
                else:
                    self._json(404, {"error": {"message": "not found"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                if not self._authorized():
                    return
                if self.path != "/v1/completions":
                    self._json(404, {"error": {"message": "not found"}})
                    return
                if server.fail_completions:
                    auth = self.headers.get("Authorization")
                    self._json(500, {"error": {"message": f"upstream refused the request with Authorization: {auth}"}})
                    return
                n, max_tokens = int(body.get("n", 1)), int(body.get("max_tokens", 16))
                if not body.get("stream"):
                    choices = [{"index": i, "text": "".join(WORDS[:max_tokens]), "finish_reason": "length"} for i in range(n)]
                    self._json(200, {"object": "text_completion", "choices": choices})
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()  # HTTP/1.0: the stream ends when the connection closes
                for t in range(max_tokens):
                    for i in range(n):
                        finish = "length" if t == max_tokens - 1 else None
                        chunk = {"choices": [{"index": i, "text": WORDS[(t + i) % len(WORDS)], "finish_reason": finish}]}
                        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': {'prompt_tokens': 3}})}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    fake = FakeServer(KEY)
    try:
        yield fake
    finally:
        fake.close()


def app_env(tmp_path: Path, key: str) -> dict:
    """The environment of the app: ours, without other TABWRITE_ settings, with ``key``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TABWRITE_")}
    env.update(
        GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
        TABWRITE_DB=str(tmp_path / "documents.sqlite3"), TABWRITE_API_KEY=key,
    )
    return env


def app_command(server: FakeServer, port: int) -> list[str]:
    return [sys.executable, "app.py", "--backend", "openai", "--endpoint", server.url, "--host", "127.0.0.1", "--port", str(port)]


def start_fails(server: FakeServer, tmp_path: Path, key: str) -> tuple[int, str]:
    """Run the app with ``key``; it must exit on its own: (exit code, all it printed)."""
    done = subprocess.run(
        app_command(server, free_port()), cwd=ROOT, env=app_env(tmp_path, key),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=APP_STARTUP_S,
    )
    return done.returncode, done.stdout


def test_the_key_goes_with_every_request_and_into_no_message_or_log(server, tmp_path):
    from gradio_client import Client

    port = free_port()
    log_path = tmp_path / "app.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            app_command(server, port), cwd=ROOT, env=app_env(tmp_path, KEY), stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        # Before the fix /v1/models went without the key: 401, and the app did not start.
        wait_until_serving(url, proc, log_path, APP_STARTUP_S, "app.py --backend openai")
        client = Client(url, verbose=False)
        texts = client.predict("Hello", api_name="/suggest")  # one Tab press, through the server
        assert texts and all(isinstance(t, str) and t.strip() for t in texts), texts
        # An error answer that echoes the header: the visitor's message has no key in it.
        server.fail_completions = True
        with pytest.raises(Exception) as caught:
            client.predict("Hello again", api_name="/suggest")
        assert KEY not in str(caught.value) and KEY[:16] not in str(caught.value)
    finally:
        stop(proc)
    paths = [path for _, path, _ in server.seen]
    assert "/v1/models" in paths and paths.count("/v1/completions") >= 3, paths
    missing = [(m, p, h.get("Authorization")) for m, p, h in server.seen if h.get("Authorization") != f"Bearer {KEY}"]
    assert not missing, f"requests without the key: {[(m, p) for m, p, _ in missing]}"
    log = log_path.read_text()
    assert KEY not in log and KEY[:16] not in log, "the key is in the app's log"
    assert "[tabwrite] model fake-model ready" in log


def test_a_wrong_key_stops_the_app_with_one_line_that_does_not_show_it(server, tmp_path):
    wrong = "sk-wrong-" + secrets.token_hex(12)
    code, output = start_fails(server, tmp_path, wrong)
    assert code == 2, output[-3000:]
    lines = [line for line in output.splitlines() if line.startswith("tabwrite:")]
    assert len(lines) == 1, output[-3000:]
    assert "401 to /v1/models" in lines[0] and "$TABWRITE_API_KEY" in lines[0], lines[0]
    assert wrong not in output and wrong[:12] not in output  # the server echoed it back: taken out
    # The key was sent (and refused): the models list was asked for with it.
    assert [(m, p, h.get("Authorization")) for m, p, h in server.seen] == [("GET", "/v1/models", f"Bearer {wrong}")]


def test_a_key_with_a_line_break_stops_the_app_before_any_request(server, tmp_path):
    injected = "sk-first-line-" + secrets.token_hex(6) + "\r\nX-Injected: yes"
    code, output = start_fails(server, tmp_path, injected)
    assert code == 2, output[-3000:]
    lines = [line for line in output.splitlines() if line.startswith("tabwrite:")]
    assert len(lines) == 1 and "line break" in lines[0] and "$TABWRITE_API_KEY" in lines[0], output[-3000:]
    assert "sk-first-line" not in output and "X-Injected" not in output
    assert not any("X-Injected" in h for _, _, h in server.seen)
    assert server.seen == []  # refused before anything was sent
