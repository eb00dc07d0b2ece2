"""The OpenAI-compatible backend's text handling, on literal server chunks (no server needed).

tests/integration/test_openai_backend.py runs it against a real llama.cpp server, which returns
one choice per request; the chunks below are shaped like vLLM's answer to ``n=3``, where the
choices of one request arrive interleaved.
"""

from __future__ import annotations

import math

import pytest

from models.core import EngineError, SuggestResult, collect
from models.remote import OpenAICompletionsBackend, ServerRow, _split_blanks, cut_prompt


def test_endpoint_with_or_without_v1_and_without_credentials():
    for given in ("http://gpu:8000", "http://gpu:8000/", "http://gpu:8000/v1", "http://gpu:8000/v1/", "gpu:8000"):
        assert OpenAICompletionsBackend.parse_endpoint(given)[0] == "http://gpu:8000"
    shown, scheme, host, port, base = OpenAICompletionsBackend.parse_endpoint("https://user:pw@api.example.com/proxy/v1")
    assert (shown, scheme, host, port, base) == ("https://api.example.com:443/proxy", "https", "api.example.com", 443, "/proxy")
    for bad in ("", "ftp://x", "http://"):
        with pytest.raises(EngineError):
            OpenAICompletionsBackend.parse_endpoint(bad)


def test_api_key_is_sent_but_never_shown():
    backend = OpenAICompletionsBackend("http://gpu:8000", "m", api_key="sk-secret")
    assert backend._headers()["Authorization"] == "Bearer sk-secret"
    assert "sk-secret" not in repr(backend) + backend.endpoint + backend.device.type


def test_prompt_is_cut_to_about_the_context_on_a_word():
    text = "".join(f"word{i} " for i in range(2000))
    prompt, cut = cut_prompt(text, 100)
    assert cut and text.endswith(prompt) and prompt.startswith("word")
    assert 300 <= len(prompt) <= 400
    # The start moves in steps: typing a little more keeps the same start (the server's prefix cache hits).
    assert cut_prompt(text + "more", 100)[0].startswith(prompt[:50])
    assert cut_prompt("short text", 100) == ("short text", False)
    chinese, cut = cut_prompt("我们今天去公园散步。" * 100, 50)
    assert cut and len(chinese) <= 50


def test_trailing_blanks_are_the_writers():
    assert _split_blanks("bought some ") == ("bought some", " ")
    assert _split_blanks("line\n") == ("line\n", "")
    row = ServerRow(4, " ")
    row.take(" apples", 1, [])
    assert row.text == "apples"


def test_rows_are_cut_like_the_engine_cuts_them():
    row = ServerRow(3, "")
    for piece in [" the", " qu", "ick"]:
        row.take(piece, 1, [-1.0])
    assert row.final is None  # three tokens, but the third does not start a word: go on
    row.take(" fox", 1, [-1.0])
    assert row.final == " the quick"  # a new word after the target: stop before it
    assert row.suggestion().mean_logprob == pytest.approx(-1.0)

    line = ServerRow(32, "")
    line.take(" first line", 2, [])
    line.take("\nsecond", 2, [])
    assert line.final == " first line" and math.isnan(line.suggestion().mean_logprob)

    cut = ServerRow(32, "")
    cut.take(" a half-writ", 3, [])
    cut.end(None)  # time up: back to the last whole word
    assert cut.final == " a"
    stopped = ServerRow(32, "")
    stopped.take(" the end.", 3, [])
    stopped.end("stop")
    assert stopped.final == " the end."

    markup = ServerRow(8, "")
    markup.take(" hello<end_of_turn> more", 3, [])
    assert markup.final == " hello"


def test_interleaved_choices_of_one_request():
    backend = OpenAICompletionsBackend("http://gpu:8000", "m")
    rows = [ServerRow(t, "") for t in (2, 2, 8)]
    result = SuggestResult()

    def chunk(index, text, finish=None):
        lp = {"tokens": [text], "token_logprobs": [-0.5], "text_offset": [0], "top_logprobs": [{text: -0.5}]}
        return {"choices": [{"index": index, "text": text, "logprobs": lp, "finish_reason": finish}]}

    words = [" one", " two", " three", " four", " five", " six", " seven", " eight", " nine", " ten"]
    done_after = []
    for step, word in enumerate(words):
        for index in range(3):
            if backend._read_chunk(chunk(index, word), rows, rows, result):
                done_after.append((step, index))
    # Row 1 said the same as row 0 when it reached its target: like the engine, it went on
    # until it said something else.
    assert [r.final for r in rows] == [" one", " one two", " one two three four five six seven"]
    assert done_after[:3] == [(1, 0), (2, 1), (7, 2)]
    assert [s.text for s in collect(rows)] == [" one", " one two", " one two three four five six seven"]
    assert all(s.mean_logprob == pytest.approx(-0.5) for s in collect(rows))
    assert backend._read_chunk({"usage": {"prompt_tokens": 7}, "choices": []}, rows, rows, result) is False
    assert result.prompt_tokens == 7
    with pytest.raises(EngineError):
        backend._read_chunk({"choices": [{"index": 0, "text": 5}]}, rows, rows, result)


def test_the_remote_backend_imports_without_torch():
    """A machine that only talks to a model server needs neither torch nor transformers."""
    import subprocess
    import sys
    from pathlib import Path

    code = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError("no " + name + " on this machine")
sys.meta_path.insert(0, NoTorch())
import models.remote, models.scoring, editor.service
assert "torch" not in sys.modules and "transformers" not in sys.modules
try:
    import torch
except ImportError:
    print("ok")
"""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# -- the API key: sent with every request, shown in no message (issue 11, item 6)

import io  # noqa: E402
import json  # noqa: E402

from models.remote import _server_message  # noqa: E402

KEY = "sk-unit-7f3a9c2e/b41d+e8"


class _FakeResponse:
    def __init__(self, status: int, body: bytes):
        self.status, self._body = status, io.BytesIO(body)

    def read(self, n: int = -1) -> bytes:
        return self._body.read(n)

    def readline(self) -> bytes:
        return self._body.readline()


class _FakeConnection:
    """Stands in for http.client's connection: records what was sent, answers with ``server``."""

    def __init__(self, server):
        self.server, self.sock = server, None

    def connect(self):
        pass

    def request(self, method, path, body=None, headers=None):
        headers = dict(headers or {})
        self.server.seen.append((method, path, headers))
        self.response = self.server.answer(method, path, json.loads(body) if body else None, headers)

    def getresponse(self):
        return self.response

    def close(self):
        pass


class _FakeServer:
    """An OpenAI-compatible server that wants ``Authorization: Bearer <key>`` on every route and
    echoes the header it got in its errors (as some proxies do)."""

    def __init__(self, key: str, fail_completions: str | None = None):
        self.key, self.fail_completions, self.seen = key, fail_completions, []

    def answer(self, method, path, body, headers):
        auth = headers.get("Authorization")
        if auth != f"Bearer {self.key}":
            text = json.dumps({"error": {"message": f"invalid Authorization header: {auth}"}})
            return _FakeResponse(401, text.encode())
        if method == "GET" and path == "/v1/models":
            return _FakeResponse(200, json.dumps({"data": [{"id": "m"}]}).encode())
        if self.fail_completions == "http":
            # The key straddles the 200-character cut of a one-line message.
            return _FakeResponse(500, ("x" * 160 + f" upstream refused {auth}\ntraceback").encode())
        if self.fail_completions == "stream":
            chunk = {"error": {"message": f"upstream refused {auth}"}}
            return _FakeResponse(200, f"data: {json.dumps(chunk)}\n\n".encode())
        chunks = [{"choices": [{"index": i, "text": f" word{t}", "finish_reason": None}]} for t in range(8) for i in range(body.get("n", 1))]
        sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return _FakeResponse(200, sse.encode())


@pytest.fixture
def fake_server(monkeypatch):
    servers = []

    def make(key=KEY, fail_completions=None):
        server = _FakeServer(key, fail_completions)
        servers.append(server)
        monkeypatch.setattr(OpenAICompletionsBackend, "_connection", lambda self, timeout: _FakeConnection(server))
        return server

    return make


def test_the_key_goes_with_every_request_models_list_included(fake_server):
    server = fake_server()
    backend = OpenAICompletionsBackend.connect("http://gpu:8000", api_key=KEY, logprobs=False)
    assert backend.model == "m" and backend.features.choices
    assert [p for _, p, _ in server.seen][:2] == ["/v1/models", "/v1/completions"]
    assert all(h.get("Authorization") == f"Bearer {KEY}" for _, _, h in server.seen)
    assert backend.for_model("m")._headers()["Authorization"] == f"Bearer {KEY}"


def test_a_key_a_header_cannot_carry_is_refused_before_any_request_and_not_shown(fake_server):
    server = fake_server()
    for bad, why in [
        ("sk-first\r\nX-Injected: 1", "line break"),
        ("sk-first\nsecond", "line break"),
        ("Bearer sk-first", "without 'Bearer '"),
        ("sk-first second", "space"),
        ("sk-first\u00e9", "non-ASCII"),
        ("sk-first\x00", "control"),
    ]:
        with pytest.raises(EngineError) as caught:
            OpenAICompletionsBackend.connect("http://gpu:8000", api_key=bad)
        message = str(caught.value)
        assert "$TABWRITE_API_KEY" in message and why in message, message
        assert "sk-first" not in message and "Injected" not in message and "second" not in message
        assert "\n" not in message and "\r" not in message
    assert server.seen == []
    # Blanks around the key (a pasted secret's line break) are not part of it; no key, no header.
    assert OpenAICompletionsBackend("http://gpu:8000", "m", api_key=f"  {KEY}\n")._headers()["Authorization"] == f"Bearer {KEY}"
    assert "Authorization" not in OpenAICompletionsBackend("http://gpu:8000", "m", api_key=" \n")._headers()


def test_a_server_that_echoes_the_key_has_it_taken_out_of_every_message(fake_server):
    # The wrong key: 401 to /v1/models, with the header echoed back.
    fake_server(key="sk-the-right-one")
    with pytest.raises(EngineError) as caught:
        OpenAICompletionsBackend.connect("http://gpu:8000", api_key=KEY)
    message = str(caught.value)
    assert "401 to /v1/models" in message and "[API key]" in message and "check $TABWRITE_API_KEY" in message
    assert KEY not in message and "sk-unit" not in message
    # No key at all: the message says to set one, and the probes are not retried.
    server = fake_server(key="sk-the-right-one")
    backend = OpenAICompletionsBackend("http://gpu:8000", "m")
    with pytest.raises(EngineError, match=r"no API key was sent: set \$TABWRITE_API_KEY"):
        backend.probe()
    assert len(server.seen) == 1
    # An error answer mid-session, with the key where the one-line cut would halve it.
    for how in ("http", "stream"):
        fake_server(fail_completions=how)
        backend = OpenAICompletionsBackend("http://gpu:8000", "m", api_key=KEY)
        stream = backend._open({"model": "m", "prompt": "x", "stream": True}, 5.0)
        kind, error = stream.events.get(timeout=5)
        assert kind == "error" and "upstream refused Bearer [API key]" in str(error), str(error)
        assert "sk-unit" not in str(error)


def test_key_is_redacted_in_every_form_a_message_may_hold_it():
    backend = OpenAICompletionsBackend("http://gpu:8000", "m", api_key=KEY)
    escaped = KEY.replace("/", "\\/")  # as some JSON encoders write "/"
    for body in (
        json.dumps({"error": {"message": f"bad key {KEY}"}}).encode(),
        json.dumps({"detail": f"bad key {KEY}"}).encode(),
        f'{{"error": "bad key {escaped}"'.encode(),  # not JSON (cut off): the raw text
        f"bad key Bearer {KEY[:10]}".encode(),  # a server that shortens what it echoes
    ):
        message = _server_message(401, body, backend._redact)
        assert "[API key]" in message and KEY[:8] not in message, message
    # http.client's ValueError for a header value holds the whole header.
    error = backend._connection_error(ValueError(f"Invalid header value b'Bearer {KEY}\\r\\nX: 1'"))
    assert KEY[:8] not in str(error) and "ValueError" in str(error)
    # Without a key, nothing is secret and server messages stay as they are.
    assert OpenAICompletionsBackend("http://gpu:8000", "m")._redact("missing Bearer token") == "missing Bearer token"
