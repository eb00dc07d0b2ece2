"""The model on a real OpenAI-compatible server: llama-cpp-python's server, started here on 127.0.0.1.

It serves the embedded Gemma GGUF; tabwrite talks to it only through HTTP (``--backend openai``).
llama-cpp-python comes from tests/requirements.txt (a source build the first time, ~15 min).
"""

from __future__ import annotations

import http.server
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from editor.service import SuggestService
from models.engine import EngineError
from models.registry import resolve
from models.remote import OpenAICompletionsBackend
from models.settings import Settings
from tests.serving import free_port, running_app, stop, wait_until_serving

ROOT = Path(__file__).resolve().parents[2]
SERVER_STARTUP_S = 120
APP_STARTUP_S = 300
ALIAS = "gemma-3-270m-q4"  # the id the server lists for the GGUF
CONTROL = re.compile(r"<(start|end)_of_|<bos>|<eos>|<pad>")


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    """A llama-cpp-python server on the embedded Gemma GGUF (what a team would run on a bigger machine)."""
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError as e:
        pytest.fail(f"llama-cpp-python's server is not installed ({e}); pip install -r tests/requirements.txt")
    gguf = resolve("gemma-3-270m").location
    port = free_port()
    log_path = tmp_path_factory.mktemp("llama_server") / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--model_alias", ALIAS,
                "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "2",
                # Requests from different writers queue up instead of cutting each other off.
                "--interrupt_requests", "False",
            ],
            env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(f"{url}/v1/models", proc, log_path, SERVER_STARTUP_S, "llama_cpp.server")
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def backend(server_url):
    # The endpoint may be given with /v1, as vLLM's docs write it.
    return OpenAICompletionsBackend.connect(server_url + "/v1")


def check_suggestions(result, n=3):
    texts = result.texts
    assert 1 <= len(texts) <= n
    assert all(t.strip() for t in texts)
    assert [len(t) for t in texts] == sorted(len(t) for t in texts)
    assert "\ufffd" not in "".join(texts)
    assert not CONTROL.search("".join(texts))
    return texts


def test_connect_names_the_server_model_and_what_it_supports(backend, server_url):
    assert backend.model == ALIAS and backend.name == ALIAS
    assert backend.device.type == server_url.removeprefix("http://")
    # llama-cpp-python's server returns one choice whatever n asks: one request per suggestion.
    assert backend.features.choices is False
    assert backend.features.sampling_extras is True


def test_suggestions_come_shortest_first_and_stream(backend):
    updates: list[list[str]] = []
    result = backend.suggest(
        "The most important thing about writing well is", Settings(max_time=20), seed=1,
        on_update=lambda found: updates.append([s.text for s in found]),
    )
    texts = check_suggestions(result)
    assert len(texts) == 3
    assert all(t[0].isspace() or not t[0].isalnum() for t in texts)  # nothing glued onto "is"
    assert len(texts[-1].split()) > len(texts[0].split())
    # Rows were handed to the editor as they finished, shortest first, before the press ended.
    assert [len(u) for u in updates] == sorted(len(u) for u in updates) and len(updates[0]) < 3
    assert updates[-1] == texts
    assert 0 < result.first_ready_s < result.elapsed_s
    assert result.steps >= 1 and not result.timed_out and not result.cancelled


def test_chinese_and_a_trailing_space(backend):
    texts = check_suggestions(backend.suggest("我们今天去公园散步，", Settings(max_time=20), seed=2))
    assert any(re.search(r"[\u4e00-\u9fff]", t) for t in texts)
    # The writer typed the space: the suggestions do not add a second one.
    texts = check_suggestions(backend.suggest("I went to the market and bought some ", Settings(max_time=20), seed=3))
    assert not any(t.startswith(" ") for t in texts)


def test_time_budget_returns_what_is_ready(backend):
    # Rows of 64, 128 and 256 tokens cannot all be done in 1 s here; the budget, not the rows, ends the press.
    settings = Settings(max_time=1.0, lengths=[64, 128, 256])
    updates: list[list[str]] = []
    result = backend.suggest(
        "In the summer of that year, the whole family moved to a small town where", settings,
        on_update=lambda found: updates.append([s.text for s in found]),
    )
    assert result.timed_out and not result.cancelled
    assert result.message == "Stopped at the 1 s time limit."
    # What was ready is returned: every row that finished before the limit (streamed to the
    # editor as it did), and what the cut rows had.
    assert all(t.strip() and "\ufffd" not in t for t in result.texts)
    assert all(u in result.texts for u in (updates[-1] if updates else []))
    assert result.steps < max(settings.lengths)  # the longest row was cut, not waited for
    # The press closed its connection, so the server is not still writing 256 tokens for it:
    # the next press is answered in full within its own budget.
    after = backend.suggest("The weather today is", Settings(max_time=20), seed=5)
    check_suggestions(after)
    assert not after.timed_out


def test_cancel_stops_the_request_and_frees_the_server(backend):
    cancelled = threading.Event()
    threading.Timer(0.3, cancelled.set).start()
    started = time.perf_counter()
    result = backend.suggest(
        "Once upon a time, in a village by the sea,", Settings(max_time=30, lengths=[256]), is_cancelled=cancelled.is_set
    )
    assert result.cancelled and time.perf_counter() - started < 30
    # The connection was closed, so the server stopped generating those ~380 tokens: the next
    # press gets its suggestions within its own budget.
    check_suggestions(backend.suggest("The weather today is", Settings(max_time=10), seed=4))


def test_a_caller_that_went_away_cancels_too(backend):
    gone_at = time.perf_counter() + 0.3
    result = backend.suggest(
        "Once upon a time, in a village by the sea,", Settings(max_time=30, lengths=[256]),
        caller_gone=lambda: time.perf_counter() > gone_at,
    )
    assert result.cancelled and not result.timed_out


def test_empty_text_needs_no_server():
    nowhere = OpenAICompletionsBackend("http://127.0.0.1:1", "any")
    assert nowhere.suggest("  \n ", Settings()).message == "Type a few words first, then press Tab."


def one_line_error(call, *needles):
    with pytest.raises(EngineError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and all(n in message for n in needles), message
    return message


def test_errors_are_one_line_naming_the_endpoint(server_url, backend):
    one_line_error(lambda: OpenAICompletionsBackend.connect("http://127.0.0.1:1"), "http://127.0.0.1:1", "refused")
    gone = OpenAICompletionsBackend("http://127.0.0.1:1", ALIAS)
    one_line_error(lambda: gone.suggest("Hello there", Settings()), "http://127.0.0.1:1")
    one_line_error(lambda: OpenAICompletionsBackend.connect(server_url, model="no-such-model"), server_url, ALIAS)
    # A prompt longer than the server's 2048-token context: llama-cpp-python fails after its 200.
    long_text = "7 " * 8000  # about a token per character, where the prompt cut assumes four
    one_line_error(lambda: backend.suggest(long_text, Settings(context_tokens=2048)), server_url, "without an answer")


def test_a_server_that_is_not_openai_compatible_is_named():
    class Plain(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = b'{"models": "none here"}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Plain)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        one_line_error(lambda: OpenAICompletionsBackend.connect(url), url, "model list")
        # POST is not implemented there: 501, with the endpoint named.
        one_line_error(lambda: OpenAICompletionsBackend(url, "m").suggest("Hello there", Settings()), url, "501")
    finally:
        server.shutdown()


def test_perplexity_from_prompt_logprobs(server_url):
    # Forced on: llama-cpp-python's server computes logprobs slowly (a full-vocabulary sort in
    # Python per token), which is why connect() turns them off there by itself. A short text.
    scorer = OpenAICompletionsBackend.connect(server_url, logprobs=True)
    text = "The cat sat on the mat. 我们今天很好。"
    progress: list[float] = []
    result = scorer.score(text, on_progress=progress.append)
    assert "error" not in result, result
    tokens = result["tokens"]
    assert "".join(t["text"] for t in tokens) == text
    assert tokens[0]["prob"] is None  # the first token has no context
    assert all(0 < t["prob"] <= 1 and t["alternatives"] for t in tokens[1:])
    assert all(t["rank"] >= 1 if t["rank"] is not None else t["rank_above"] >= 1 for t in tokens[1:])
    assert any(t["rank"] == 1 for t in tokens)  # " the" after "sat on"
    assert result["perplexity"] > 1 and 0 < result["bits_per_char"] < 20
    assert progress[-1] == 1.0
    # With logprobs off the perplexity view says what it needs.
    plain = OpenAICompletionsBackend.connect(server_url, logprobs=False)
    assert "needs a local model or a server that returns prompt logprobs" in plain.score(text)["error"]


def test_service_on_the_server(backend, server_url):
    service = SuggestService(backend.model, backend=backend)
    answer = service.suggest_for_session("writer-r", "After a long day at work, the first thing I do is")
    assert answer["model"] == ALIAS and answer["device"] == server_url.removeprefix("http://")
    assert 1 <= len(answer["suggestions"]) <= 3
    assert all(s["logprob"] is None for s in answer["suggestions"])  # this server's logprobs are off
    service.update_settings("writer-s", "no-such-model", {})
    assert "serves" in service.suggest_for_session("writer-s", "Hello there")["error"]


@pytest.fixture(scope="module")
def remote_app_url(server_url, tmp_path_factory):
    """`python app.py --backend openai --endpoint ...` (the README's scale-out command)."""
    args = ["--backend", "openai", "--endpoint", server_url]
    with running_app(args, tmp_path_factory.mktemp("remote_app"), APP_STARTUP_S, "app.py --backend openai") as url:
        yield url


def test_app_serves_suggest_through_the_server(remote_app_url):
    from gradio_client import Client

    client = Client(remote_app_url, verbose=False)
    texts = client.predict("The weather today is", api_name="/suggest")
    assert isinstance(texts, list) and 1 <= len(texts) <= 3
    assert all(isinstance(t, str) and t.strip() for t in texts)
    assert [len(t) for t in texts] == sorted(len(t) for t in texts)
    with pytest.raises(Exception, match="Type a few words"):
        client.predict("   ", api_name="/suggest")
    with pytest.raises(Exception, match="serves"):
        client.predict("Hi", model="no-such-model", api_name="/suggest")


def test_app_exits_with_one_line_when_the_server_is_unreachable():
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", TABWRITE_API_KEY="secret-key-never-shown")
    proc = subprocess.run(
        [sys.executable, "app.py", "--backend", "openai", "--endpoint", "http://127.0.0.1:1", "--port", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "secret-key" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.startswith("tabwrite:")]
    assert len(lines) == 1 and "http://127.0.0.1:1" in lines[0], proc.stderr

