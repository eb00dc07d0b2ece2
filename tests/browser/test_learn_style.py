""""Learn my style" in a real browser, on the real embedded model (a short text: a few training steps)."""

from __future__ import annotations

from pathlib import Path

from tests.browser.test_editor import TEXTAREA, tab_and_wait, type_into_editor

TEXT = (Path(__file__).resolve().parents[2] / "bench" / "data" / "style_en.txt").read_text(encoding="utf-8")[:2600]
LEARN_TIMEOUT = 600_000  # ms: ~30 s here, more on a busy CI machine


def test_learn_my_style_from_the_editor_text_then_use_it_and_delete_it(page):
    # The writer's text is in the editor; nothing pasted, no files.
    type_into_editor(page, TEXT)
    page.click("#learn-style button, #learn-style .label-wrap")  # open the accordion
    _fill_name(page, "doyle")
    page.click("#learn-style-button")
    # Progress shows while it learns, then the figures and examples; the model box selects it.
    page.wait_for_selector("#style-status :text('⏳')", timeout=LEARN_TIMEOUT)
    page.wait_for_selector("#style-status :text('is ready')", timeout=LEARN_TIMEOUT)
    report = page.inner_text("#style-status")
    assert "bits per" in report and "→" in report and "your style" in report
    assert "gemma-3-270m+doyle" in report, f"learned under another name: {report[:120]!r}"
    _wait_for_model_box(page, "value.startsWith('gemma-3-270m+doyle')")
    page.wait_for_selector("#settings-status :text('gemma-3-270m+doyle')", timeout=120_000)
    key = page.evaluate("window.localStorage.getItem('tabwrite:style-key')")
    assert key and len(key) >= 16
    # Tab now suggests from the style, and the text is untouched.
    # At the end of the text: type_into_editor clicks, which puts the caret where the click lands.
    page.focus(TEXTAREA)
    page.keyboard.press("Control+End")
    page.keyboard.insert_text("\n\nI had seen little of Holmes lately. My")
    options = tab_and_wait(page)
    assert len(options) >= 3
    assert "gemma-3-270m+doyle" in page.inner_text("#editor .tw-status")
    assert page.input_value(TEXTAREA).startswith(TEXT[:200])
    # A reload finds the style again (this browser keeps its key), then it is deleted.
    page.reload()
    page.wait_for_selector("#settings-status :text('ready')", timeout=120_000)
    page.click("#learn-style button, #learn-style .label-wrap")
    page.click("#model input")
    assert page.locator("[role=option]:has-text('gemma-3-270m+doyle')").count() >= 1
    page.locator("[role=option]:has-text('gemma-3-270m+doyle')").first.click()
    page.wait_for_selector("#settings-status :text('gemma-3-270m+doyle')", timeout=120_000)
    page.click("#delete-style-button")
    page.wait_for_selector("#style-status :text('Deleted')", timeout=180_000)
    _wait_for_model_box(page, "!value.includes('+doyle')")


def _fill_name(page, name: str):
    """Type the style's name and let the page take it before the button is clicked. Filled and
    clicked at once after the accordion opened, the click sometimes sent the box's first value:
    the style was learned as gemma-3-270m+mine, and the wait for +doyle in the model box failed
    (CI on 2026-12-06, and likely 2026-12-05; 1 run in 8 here). With this wait and the blur: 12 of 12."""
    box = "#style-name input, #style-name textarea"
    page.wait_for_selector(box, state="visible")
    for _ in range(20):
        page.fill(box, name)
        page.wait_for_timeout(250)
        if page.input_value(box) == name:
            break
    page.locator(box).first.blur()  # Gradio's textbox hands its value on at input and blur
    assert page.input_value(box) == name


def _wait_for_model_box(page, condition: str, timeout_ms: int = 180_000):
    """Wait until the model box's shown text meets `condition` (JS, on `value`); if it never does,
    fail with what the page showed instead (this wait failed in CI twice with nothing else to go on)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(f"() => {{ const value = document.querySelector('#model input').value; return {condition}; }}",
                               timeout=timeout_ms)
    except PlaywrightTimeout:
        shown = page.evaluate("document.querySelector('#model input').value")
        focused = page.evaluate("document.activeElement && document.activeElement.closest('#model') !== null")
        raise AssertionError(
            f"model box shows {shown!r} (focused: {focused}); settings: {page.inner_text('#settings-status')!r}; "
            f"style: {page.inner_text('#style-status')[:300]!r}"
        ) from None


def test_the_style_report_shows_the_writers_text_as_written(browser):
    """The report is Markdown, and its examples are the writer's own text and the models' words:
    Gradio's page must show them as typed, not as emphasis, headings, links, markup or extra cells."""
    import gradio as gr

    from editor.ui import _style_report

    odd = ["*not bold* _nor this_ # no heading", "[a link](javascript:alert(1)) <b>bold?</b>", "a|b \\ `code` 1. ~x~", "贾宝玉道：「*好*」"]
    answer = {"model": "gemma-3-270m+my_own_style@abcdefghijklmnop", "seconds": 12.0, "heldout_chars": 2000,
              "bits_per_char_before": 1.2, "bits_per_char_after": 1.1, "perplexity_per_char_before": 2.3,
              "perplexity_per_char_after": 2.14,
              "examples": [{"text": odd[0], "actual": odd[1], "base": odd[2], "style": odd[3]}]}
    with gr.Blocks() as demo:
        gr.Markdown(_style_report(answer), elem_id="report")
    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(demo.local_url)
        page.wait_for_selector("#report table", timeout=60_000)
        cells = page.locator("#report td").all_inner_texts()
        assert cells == ["…" + odd[0], odd[1], odd[2], odd[3]], cells
        assert page.locator("#report td a, #report td b, #report td em, #report td code, #report h1").count() == 0
        assert "gemma-3-270m+my_own_style is ready" in page.inner_text("#report")
    finally:
        context.close()
        demo.close()
