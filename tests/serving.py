"""Starting and stopping the servers the tests run on 127.0.0.1 (the app, llama-cpp-python's server)."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest


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
