"""Shared fixtures: the real app, started once per test run on 127.0.0.1 with the embedded model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.serving import running_app  # noqa: E402 (needs ROOT on the path)

STARTUP_TIMEOUT_S = 600  # the first run converts the GGUF model (about a minute on 2 cores)


@pytest.fixture(scope="session")
def app_url(tmp_path_factory):
    """URL of a running `python app.py` (the README's command) on the default embedded model."""
    with running_app([], tmp_path_factory.mktemp("app"), STARTUP_TIMEOUT_S, "app.py", poll_s=1) as url:
        yield url
