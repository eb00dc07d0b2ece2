"""Scoring through real HTTP: many /score calls at once on a long text keep the app's memory
bounded and answer each either with a score or a clear "busy, try again" (issue 11, item 2).

On the code before (a [T, V] fp32 logits tensor and copies of it per 576-token window, every
call at once), six calls on "word " * 5000 took the process from 1.46 GB to 7.5 GB of peak RSS
and 250-400 s each.
"""

from __future__ import annotations

import os
import re
import threading
import time
from urllib.parse import urlparse

import pytest

from models import scoring
from tests.serving import running_app

psutil = pytest.importorskip("psutil")
gradio_client = pytest.importorskip("gradio_client")

STARTUP_TIMEOUT_S = 600
CALLS = 6
TEXT = "word " * 5000
CALL_TIMEOUT_S = 900  # generous: a call must answer, not hang
PEAK_RSS_LIMIT = 3 * 2**30
BUSY_WORDS = re.compile(r"busy|try again", re.IGNORECASE)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """Our own `python app.py` (default limits), with its URL and its process."""
    saved = {name: os.environ.pop(name, None) for name in (scoring.CONCURRENCY_ENV, scoring.QUEUE_ENV, scoring.WAIT_ENV)}
    # Each call from an address of its own (as a proxy would say): one visitor holds at most one
    # scoring place (editor/service.py), and this is about the model's limit.
    saved["TABWRITE_TRUST_PROXY"] = os.environ.get("TABWRITE_TRUST_PROXY")
    os.environ["TABWRITE_TRUST_PROXY"] = "1"
    try:
        with running_app([], tmp_path_factory.mktemp("app_scoring"), STARTUP_TIMEOUT_S, "app.py", poll_s=1) as url:
            yield url, app_process(url)
    finally:
        os.environ.pop("TABWRITE_TRUST_PROXY", None)
        os.environ.update({k: v for k, v in saved.items() if v is not None})


def app_process(url: str):
    """The child process of this test run that serves ``url`` (started with --port PORT)."""
    port = str(urlparse(url).port)
    for child in psutil.Process().children(recursive=True):
        try:
            cmdline = child.cmdline()
        except psutil.Error:
            continue
        if "app.py" in " ".join(cmdline) and port in cmdline:
            return child
    pytest.fail(f"no app process serving port {port}")


def peak_rss(proc) -> int:
    """The process's peak resident set (VmHWM) in bytes."""
    with open(f"/proc/{proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def reset_peak_rss(proc) -> bool:
    """Start VmHWM again from the current RSS (Linux: 5 > /proc/PID/clear_refs); False where not allowed."""
    try:
        with open(f"/proc/{proc.pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc (Linux)")
def test_concurrent_long_scorings_are_bounded_and_answer_busy(app):
    url, proc = app
    client = gradio_client.Client(url, verbose=False)
    # Sampled as well, in case clear_refs is not allowed here (then VmHWM includes start-up).
    sampled = [proc.memory_info().rss]
    start_rss = sampled[0]
    reset = reset_peak_rss(proc)
    done = threading.Event()

    def sample():
        while not done.wait(0.05):
            try:
                sampled.append(proc.memory_info().rss)
            except psutil.Error:
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    visitors = [gradio_client.Client(url, verbose=False, headers={"X-Forwarded-For": f"198.51.100.{n}"}) for n in range(CALLS)]
    jobs = [visitor.submit(TEXT, "", api_name="/score") for visitor in visitors]
    answers, seconds = [], []
    try:
        for job in jobs:
            try:
                answers.append(job.result(timeout=max(1.0, CALL_TIMEOUT_S - (time.monotonic() - started))))
            except TimeoutError:
                pytest.fail(f"a /score call did not answer in {CALL_TIMEOUT_S} s")
            except Exception as e:  # the API's error answer: gradio_client raises it
                answers.append(e)
            seconds.append(time.monotonic() - started)
    finally:
        done.set()
        sampler.join(timeout=5)
    peak = peak_rss(proc) if reset else max(sampled)
    scored = [a for a in answers if isinstance(a, dict) and a.get("perplexity")]
    refused = [a for a in answers if isinstance(a, Exception) and BUSY_WORDS.search(str(a))]
    other = [a for a in answers if a not in scored and not any(a is r for r in refused)]
    report = (
        f"{len(scored)} scored, {len(refused)} busy, answers after {[round(s) for s in seconds]} s; "
        f"RSS {start_rss / 2**30:.2f} GB before, peak {peak / 2**30:.2f} GB (sampled max {max(sampled) / 2**30:.2f})"
    )
    print(report)
    assert not other, f"neither a score nor a clear busy answer: {other!r} ({report})"
    assert scored, report
    assert refused, report
    for result in scored:  # the end of the document, scored whole
        assert result["truncated"] and result["token_count"] <= scoring.MAX_TOKENS + 1
        assert 0 < result["bits_per_char"] < 10
    assert peak < PEAK_RSS_LIMIT, report
    # And the app is still there for the next writer.
    assert client.predict("The quick brown fox.", "", api_name="/score")["perplexity"] > 1
