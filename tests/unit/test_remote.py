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
