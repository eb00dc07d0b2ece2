"""Starting and stopping the servers the tests run on 127.0.0.1 (the app, llama-cpp-python's server)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


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
