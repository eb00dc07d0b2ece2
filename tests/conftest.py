"""Shared fixtures: the real app, started once per test run on 127.0.0.1 with the embedded model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.serving import free_port, stop, wait_until_serving  # noqa: E402 (needs ROOT on the path)

STARTUP_TIMEOUT_S = 600  # the first run converts the GGUF model (about a minute on 2 cores)


@pytest.fixture(scope="session")
def app_url(tmp_path_factory):
    """URL of a running `python app.py` (the README's command) on the default embedded model."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("app") / "app.log"
    # HF_HUB_OFFLINE: a model name that is not embedded must fail without any network use.
    env = dict(
        os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
        TABWRITE_DB=str(log_path.parent / "documents.sqlite3"),
    )
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_serving(url, proc, log_path, STARTUP_TIMEOUT_S, "app.py", poll_s=1)
        yield url
    finally:
        stop(proc)
