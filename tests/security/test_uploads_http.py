"""Uploads where "Learn my style" is on (--personalize), through real HTTP on 127.0.0.1 (issue 11).

Gradio's upload route stored every file until the app stopped, as often as a visitor could
send one. Here each visitor has a budget of bytes (1 MB in this app, 8 MB by default) and an
upload is deleted once TABWRITE_UPLOAD_KEEP_S old (3 s here, an hour by default).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.security.test_public import upload
from tests.serving import running_app

STARTUP_TIMEOUT_S = 600
SETTINGS = {"TABWRITE_TRUST_PROXY": "1", "TABWRITE_UPLOAD_BYTES_PER_VISITOR": "1000000", "TABWRITE_UPLOAD_KEEP_S": "3"}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    saved = {name: os.environ.get(name) for name in SETTINGS}
    os.environ.update(SETTINGS)  # read by the app's process, which inherits them
    try:
        with running_app(["--personalize"], tmp_path_factory.mktemp("uploads"), STARTUP_TIMEOUT_S, "app.py", poll_s=1) as url:
            yield url
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def test_uploads_are_bounded_per_visitor_and_deleted_once_old(app):
    status, body = upload(app, "198.51.100.30", b"a" * 600_000)
    assert status == 200, body[:300]
    stored = Path(json.loads(body)[0])
    assert stored.exists()
    # 600 KB more from the same address is past its 1 MB: refused before it is read, one line.
    status, body = upload(app, "198.51.100.30", b"b" * 600_000)
    assert status == 429, body[:300]
    line = json.loads(body)["error"]
    assert line.startswith("Too much uploaded from your address: at most 0.954 MB every 3 s.") and "\n" not in line
    # Another visitor's budget is their own.
    status, body = upload(app, "192.0.2.30", b"my own writing " * 100)
    assert status == 200, body[:300]
    # The stored file goes once older than TABWRITE_UPLOAD_KEEP_S (3 s; Gradio looks every second).
    deadline = time.monotonic() + 20
    while stored.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not stored.exists(), f"{stored} is still there 20 s after it was uploaded"
