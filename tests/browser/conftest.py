"""Debian Chromium driven by Playwright (never `playwright install`: it downloads)."""

from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM = os.environ.get("TABWRITE_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture(scope="session")
def browser():
    if not shutil.which(CHROMIUM) and not os.path.exists(CHROMIUM):
        pytest.fail(f"Chromium not found at {CHROMIUM} (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, app_url):
    """A fresh page on the app; records every request the page makes."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.requested_urls = []
    page.on("request", lambda request: page.requested_urls.append(request.url))
    page.goto(app_url)
    page.wait_for_selector("#editor textarea", timeout=60_000)
    # The settings are applied on load (demo.load); wait until the status says the model is ready.
    page.wait_for_selector("#settings-status :text('ready')", timeout=120_000)
    yield page
    context.close()
