"""The editor in a real browser (Debian Chromium), on the real embedded model."""

from __future__ import annotations

import re
from urllib.parse import urlparse

OPTIONS = "#editor [role=option]"
POPUP = "#editor [role=listbox]"
TEXTAREA = "#editor textarea"
ANSWER_TIMEOUT = 60_000  # ms; a Tab press takes ~1-3 s here, more on a busy CI machine


def type_into_editor(page, text: str) -> None:
    page.click(TEXTAREA)
    page.keyboard.insert_text(text)


def wait_until_done(page) -> None:
    page.wait_for_function(
        "!document.querySelector('#editor .tw-popup-status').classList.contains('tw-busy')", timeout=ANSWER_TIMEOUT
    )


def tab_and_wait(page, minimum: int = 3) -> list[str]:
    """Press Tab and wait for the whole answer (suggestions stream in, then settle in order)."""
    page.keyboard.press("Tab")
    try:
        page.wait_for_function(
            "([sel, n]) => document.querySelectorAll(sel).length >= n", arg=[OPTIONS, minimum], timeout=ANSWER_TIMEOUT
        )
    except Exception as e:  # say what the page showed instead
        state = page.evaluate(
            "[document.querySelector('#editor .tw-popup-status').textContent,"
            " [...document.querySelectorAll('#editor [role=option]')].map(e => e.textContent),"
            " document.querySelector('#editor .tw-status').textContent, document.querySelector('#editor textarea').value]"
        )
        raise AssertionError(f"fewer than {minimum} options; popup status, options, status line, text: {state}") from e
    wait_until_done(page)
    return page.eval_on_selector_all(OPTIONS, "els => els.map(e => e.textContent)")


def focused_is_editor(page) -> bool:
    return page.evaluate("document.activeElement === document.querySelector('#editor textarea')")


def test_tab_shows_three_suggestions_in_a_listbox(page):
    type_into_editor(page, "The best way to learn a new language is")
    options = tab_and_wait(page)
    assert len(options) >= 3
    assert all(o.strip() for o in options)
    assert page.is_visible(POPUP)
    area = page.query_selector(TEXTAREA)
    assert area.get_attribute("aria-expanded") == "true"
    active = area.get_attribute("aria-activedescendant")
    assert active and page.query_selector(f"#{active}").get_attribute("role") == "option"
    assert focused_is_editor(page)
    assert "\ufffd" not in "".join(options)
    # Each option shows how likely the model found it.
    bars = page.eval_on_selector_all(
        f"{OPTIONS} .tw-conf", "els => els.map(e => [e.title, parseFloat(e.firstChild.style.width)])"
    )
    assert len(bars) == len(options)
    assert all(title.startswith("mean token probability") and 0 <= width <= 100 for title, width in bars)
    # The status line: model, device, latency, speed.
    status = page.inner_text("#editor .tw-status")
    assert "gemma-3-270m" in status and "(cpu)" in status and re.search(r"\d+ ms", status)
    page.screenshot(path="/tmp/tabwrite-popup.png")  # for a person to look at


def test_arrow_down_enter_inserts_at_caret_in_multiline_text(page):
    before = "Dear Anna,\nThank you for the lovely dinner. The soup was"
    after = "\nSee you soon,\nBen"
    type_into_editor(page, before + after)
    page.evaluate(f"(() => {{ const a = document.querySelector('{TEXTAREA}'); a.setSelectionRange({len(before)}, {len(before)}); }})()")
    tab_and_wait(page)
    chosen = page.eval_on_selector_all(OPTIONS, "els => els[1].querySelector('.tw-option-text').textContent")
    # The raw suggestion (with its leading space, if any) is what gets inserted.
    page.keyboard.press("ArrowDown")
    assert page.get_attribute(TEXTAREA, "aria-activedescendant") == "tw-option-1"
    page.keyboard.press("Enter")
    value = page.input_value(TEXTAREA)
    assert value.startswith(before) and value.endswith(after)
    inserted = value[len(before) : len(value) - len(after)]
    assert inserted.strip() == chosen.strip() and inserted.strip()
    caret = page.evaluate(f"document.querySelector('{TEXTAREA}').selectionStart")
    assert caret == len(before) + len(inserted)
    assert page.is_hidden(POPUP)
    assert focused_is_editor(page)
    # Ctrl+Z undoes the insertion as one step.
    page.keyboard.press("Control+z")
    assert page.input_value(TEXTAREA) == before + after


def test_click_inserts_and_escape_closes_without_change(page):
    text = "My favourite season is autumn because"
    type_into_editor(page, text)
    tab_and_wait(page)
    page.keyboard.press("Escape")
    assert page.is_hidden(POPUP)
    assert page.input_value(TEXTAREA) == text
    assert focused_is_editor(page)
    tab_and_wait(page)
    first = page.eval_on_selector_all(OPTIONS, "els => els[0].querySelector('.tw-option-text').textContent")
    page.click(f"{OPTIONS} >> nth=0")
    value = page.input_value(TEXTAREA)
    assert value.startswith(text) and value[len(text):].strip() == first.strip()
    assert focused_is_editor(page)


def set_max_time(page, seconds: int) -> None:
    box = page.locator('input[aria-label="number input for Max time per Tab (s)"]')
    box.fill(str(seconds))
    box.press("Enter")
    page.wait_for_selector(f"#settings-status :text('≤ {seconds} s per Tab')", timeout=20_000)


def set_greedy(page, lengths: str) -> None:
    """Top-k 1 (the model's most likely token each step, so the same text gives the same rows) and ``lengths``."""
    box = page.locator('input[aria-label="number input for Top-k"]')
    box.fill("1")
    box.press("Enter")
    page.wait_for_selector("#settings-status :text('top-k 1 ·')", timeout=20_000)
    box = page.get_by_label("Suggestion lengths (tokens)")
    box.fill(lengths)
    box.press("Enter")
    shown = "/".join(p.strip() for p in lengths.split(","))
    page.wait_for_selector(f"#settings-status :text('lengths {shown} ·')", timeout=20_000)


def server_calls(page, name: str) -> list[dict]:
    """The arguments of each call the page makes to server function ``name``, recorded from now on."""
    calls: list[dict] = []

    def record(request):
        if request.method == "POST" and re.search(r"/component_server/?$", request.url):
            body = request.post_data_json or {}
            if body.get("fn_name") == name:
                calls.append(body.get("data") or {})

    page.on("request", record)
    return calls


def test_tab_again_gives_more_and_longer(page):
    set_max_time(page, 30)  # so that a busy machine does not cut the long ones short
    # Greedy: each row is the model's one most likely continuation, cut at its target length,
    # so a round of the same lengths again adds nothing, and a round of doubled lengths must
    # add a row longer than any of the first round.
    set_greedy(page, "3, 6, 12")
    asked = server_calls(page, "suggest_for_editor")
    type_into_editor(page, "Once upon a time, in a small village by the sea, there lived")
    first = tab_and_wait(page, minimum=1)
    page.keyboard.press("Tab")
    try:
        page.wait_for_function(
            "([sel, n]) => document.querySelectorAll(sel).length > n", arg=[OPTIONS, len(first)], timeout=ANSWER_TIMEOUT
        )
    except Exception as e:
        raise AssertionError(f"Tab again added no suggestion to {first}; requests: {asked}") from e
    wait_until_done(page)
    options = page.eval_on_selector_all(OPTIONS, "els => els.map(e => e.textContent)")
    added = options[len(first):]
    assert added and options[: len(first)] == first
    # The second Tab asked for the next round (targets twice the first's: checked exactly in
    # the unit tests of settings.targets) ...
    rounds = [call.get("round") for call in asked if not call.get("prefetch")]
    assert rounds == [0, 1], asked
    # ... and what it added is longer: the longest row grew, in words and in characters.
    assert max(len(o.split()) for o in added) > max(len(o.split()) for o in first), (first, added)
    assert max(map(len, added)) > max(map(len, first)), (first, added)
    assert focused_is_editor(page)


def test_typing_closes_popup_and_shift_tab_leaves(page):
    type_into_editor(page, "Coffee or tea? I prefer")
    tab_and_wait(page)
    page.keyboard.type(" t")
    assert page.is_hidden(POPUP)
    assert page.input_value(TEXTAREA) == "Coffee or tea? I prefer t"
    page.keyboard.press("Shift+Tab")
    assert not focused_is_editor(page)
    assert page.input_value(TEXTAREA) == "Coffee or tea? I prefer t"


def test_chinese_suggestions(page):
    type_into_editor(page, "今天天气很好，我们一起去")
    options = tab_and_wait(page)
    assert any(re.search(r"[\u4e00-\u9fff]", o) for o in options)
    assert "\ufffd" not in "".join(options)


def test_empty_text_gives_message_and_unknown_model_keeps_text(page):
    page.click(TEXTAREA)
    page.keyboard.press("Tab")
    page.wait_for_selector("#editor .tw-popup-status.tw-error", timeout=ANSWER_TIMEOUT)
    assert "Type a few words" in page.inner_text("#editor .tw-popup-status")
    page.keyboard.press("Escape")
    text = "Nothing here should be lost."
    page.keyboard.insert_text(text)
    model_box = page.locator("#model input")
    model_box.fill("no-such-model-anywhere")
    model_box.press("Enter")
    # Only the models the app offers can be chosen (issue 11): the box goes back to the one in use.
    page.click(TEXTAREA)
    page.wait_for_function(
        "() => document.querySelector('#model input').value.startsWith('gemma-3-270m')", timeout=ANSWER_TIMEOUT
    )
    assert "gemma-3-270m" in page.inner_text("#settings-status")
    assert page.input_value(TEXTAREA) == text
    # The editor still works on the previous model.
    page.click(TEXTAREA)
    assert len(tab_and_wait(page)) >= 3


def test_page_talks_only_to_localhost(page):
    type_into_editor(page, "A short test of")
    tab_and_wait(page)
    outside = [
        u for u in page.requested_urls
        if not u.startswith(("data:", "blob:")) and urlparse(u).hostname not in ("127.0.0.1", "localhost")
    ]
    assert outside == []


def test_tab_after_pause_uses_precomputed_suggestions(page):
    type_into_editor(page, "The museum was quiet that morning, and")
    page.wait_for_timeout(1200)  # a pause: the editor asks for suggestions in the background
    options = tab_and_wait(page)
    assert len(options) >= 3
    page.wait_for_function("document.querySelector('#editor .tw-status').textContent.includes('ms')")
    assert "pre-computed" in page.inner_text("#editor .tw-status")


def test_suggestions_stream_in_shortest_first(page):
    # A long longest suggestion and a generous time budget: the shortest shows up first.
    box = page.get_by_label("Suggestion lengths (tokens)")
    box.fill("2, 60, 120")
    box.press("Enter")
    page.wait_for_selector("#settings-status :text('lengths 2/60/120')", timeout=20_000)
    page.get_by_label("Pre-compute while I pause").uncheck()
    page.wait_for_timeout(1000)
    page.click(TEXTAREA)
    page.keyboard.insert_text("Once there was a lighthouse keeper who")
    page.keyboard.press("Tab")
    page.wait_for_function("document.querySelectorAll('#editor [role=option]').length >= 1", timeout=ANSWER_TIMEOUT)
    early = page.evaluate(
        "[document.querySelectorAll('#editor [role=option]').length,"
        " document.querySelector('#editor .tw-popup-status').classList.contains('tw-busy')]"
    )
    assert early[0] < 3 and early[1], early  # the shortest is shown while the longer ones are still coming
    wait_until_done(page)
    assert page.eval_on_selector_all(OPTIONS, "els => els.length") >= 2


def test_perplexity_view_colours_tokens_and_replaces_one(page):
    text = "The quick brown fox jumps over the lazy dog. <img src=x onerror=alert(1)>"
    type_into_editor(page, text)
    page.click("#editor .tw-score-button")
    page.wait_for_selector("#editor .tw-score-view .tw-tok", timeout=ANSWER_TIMEOUT)
    summary = page.inner_text("#editor .tw-score-summary")
    assert "perplexity" in summary and "bits/char" in summary
    shown = page.eval_on_selector_all("#editor .tw-tok", "els => els.map(e => e.textContent).join('')")
    assert shown == text
    # HTML in the document is shown as text, never turned into elements.
    assert page.query_selector("#editor .tw-score-view img") is None
    classes = page.eval_on_selector_all("#editor .tw-tok", "els => els.map(e => e.className)")
    assert any("tw-r10" in c for c in classes)
    # Hover a token: its probability and alternatives; click one to replace the token.
    page.hover("#editor .tw-tok >> nth=2")
    page.wait_for_selector("#editor .tw-score-tip button", timeout=5000)
    assert "rank" in page.inner_text("#editor .tw-score-tip")
    old = page.eval_on_selector("#editor .tw-tok >> nth=2", "e => e.textContent")
    alternative = page.eval_on_selector("#editor .tw-score-tip button >> nth=0", "e => e.firstChild.textContent")
    page.click("#editor .tw-score-tip button >> nth=0")
    value = page.input_value(TEXTAREA)
    assert value != text or alternative == old
    assert value.startswith("The quick") and value.endswith("lazy dog. <img src=x onerror=alert(1)>")
    page.wait_for_function(
        "document.querySelector('#editor .tw-score-summary').textContent.includes('perplexity')", timeout=ANSWER_TIMEOUT
    )


def marked(page) -> list[str]:
    return page.eval_on_selector_all("#editor mark.tw-machine", "els => els.map(e => e.textContent)")


def test_inserted_text_is_marked_and_editing_inside_unmarks_that_part(page):
    before = "The garden was full of"
    type_into_editor(page, before)
    tab_and_wait(page)
    page.keyboard.press("ArrowDown")
    page.keyboard.press("Enter")
    value = page.input_value(TEXTAREA)
    inserted = value[len(before):]
    assert marked(page) == [inserted]
    page.keyboard.insert_text(" mine")  # typed after the suggestion: the writer's own
    assert marked(page) == [inserted]
    # Select two characters inside the machine text and type over them.
    inside = len(before) + len(inserted) // 2
    page.evaluate(f"document.querySelector('{TEXTAREA}').setSelectionRange({inside}, {inside + 2})")
    page.keyboard.insert_text("XY")
    parts = marked(page)
    assert "".join(parts) == inserted[: len(inserted) // 2] + inserted[len(inserted) // 2 + 2 :]
    assert all("XY" not in p for p in parts)
    # The marks survive saving and opening the document elsewhere.
    page.click("#editor .tw-share")
    link = page.wait_for_selector("#editor .tw-share-link", timeout=20_000).get_attribute("href")
    reader = page.context.new_page()
    reader.goto(link)
    reader.wait_for_selector("#editor .tw-readonly-banner:not([hidden])", timeout=60_000)
    assert marked(reader) == parts
    reader.close()


def test_ctrl_right_accepts_one_word_at_a_time(page):
    # Greedy, and rows of several words: the same suggestions every run, the rest always offered.
    set_greedy(page, "6, 10, 16")
    before = "On Monday morning I"
    type_into_editor(page, before)
    tab_and_wait(page)
    page.keyboard.press("End")  # closes; reopen to have a clean popup
    page.keyboard.press("Tab")
    page.wait_for_function("document.querySelectorAll('#editor [role=option]').length >= 1", timeout=ANSWER_TIMEOUT)
    wait_until_done(page)
    texts = page.eval_on_selector_all(OPTIONS, "els => els.map(e => e.querySelector('.tw-option-text').textContent)")
    # Highlight the suggestion with the most words (not the first one, when they tie).
    pick = max(range(len(texts)), key=lambda i: (len(texts[i].split()), i))
    full = texts[pick]
    assert len(full.split()) >= 3, texts
    for _ in range(pick):
        page.keyboard.press("ArrowDown")
    assert page.get_attribute(TEXTAREA, "aria-activedescendant") == f"tw-option-{pick}"
    page.keyboard.press("Control+ArrowRight")
    value = page.input_value(TEXTAREA)
    first_word = full.split()[0]
    assert value.startswith(before) and value[len(before):].strip() == first_word
    # The rest is still offered, highlighted, and Enter inserts it.
    assert page.is_visible(POPUP)
    assert page.get_attribute(TEXTAREA, "aria-activedescendant") == "tw-option-0"
    rest = page.eval_on_selector(f"{OPTIONS} >> nth=0", "e => e.querySelector('.tw-option-text').textContent")
    assert rest.strip() == full[full.index(first_word) + len(first_word):].strip()
    # A second word on its own, then the rest.
    second_word = full.split()[1]
    page.keyboard.press("Control+ArrowRight")
    assert page.input_value(TEXTAREA)[len(before):].split() == [first_word, second_word]
    assert page.is_visible(POPUP)
    page.keyboard.press("Enter")
    assert page.input_value(TEXTAREA)[len(before):].split() == full.split()
    assert page.is_hidden(POPUP)
    assert "".join(marked(page)).split() == full.split()


def test_save_share_read_only_and_reload(page, browser):
    text = "A letter to save <img src=x onerror=alert(1)>"
    type_into_editor(page, text)
    page.keyboard.press("Control+s")
    page.wait_for_selector("#editor .tw-doc-status:has-text('Saved')", timeout=20_000)
    page.click("#editor .tw-share")
    link = page.wait_for_selector("#editor .tw-share-link", timeout=20_000).get_attribute("href")
    assert "?doc=" in link and link.startswith(page.url.split("?")[0])
    # The shared link opens a read-only copy, text shown as text.
    reader = page.context.new_page()
    reader.goto(link)
    reader.wait_for_selector("#editor .tw-readonly-banner:not([hidden])", timeout=60_000)
    assert reader.input_value(TEXTAREA) == text
    assert reader.eval_on_selector(TEXTAREA, "e => e.readOnly")
    assert reader.query_selector("#editor img") is None
    reader.close()
    # The draft survives a reload, and "my documents" lists the saved one.
    page.reload()
    page.wait_for_selector(TEXTAREA)
    page.wait_for_function(f"document.querySelector('{TEXTAREA}').value.length > 0")
    assert page.input_value(TEXTAREA) == text
    page.click("#editor .tw-new")
    page.wait_for_function(f"document.querySelector('{TEXTAREA}').value === ''")
    page.focus("#editor .tw-mydocs")
    page.wait_for_function("document.querySelectorAll('#editor .tw-mydocs option').length >= 2", timeout=20_000)
    page.select_option("#editor .tw-mydocs", index=1)
    page.wait_for_function(f"document.querySelector('{TEXTAREA}').value.length > 0", timeout=20_000)
    assert page.input_value(TEXTAREA) == text


def test_export_txt(page):
    type_into_editor(page, "Export me\nsecond line")
    with page.expect_download() as download:
        page.click("#editor .tw-export-txt")
    path = download.value.path()
    assert open(path, encoding="utf-8").read() == "Export me\nsecond line"
    assert download.value.suggested_filename == "Export me.txt"


MARKUP_SUGGESTIONS = [
    " <b>bold</b> & <i>it</i>",
    ' <img src=x onerror="window.__pwned=1">',
    " <script>window.__pwned=2</script><svg onload=\"window.__pwned=3\"></svg>",
]
TAGS = "img, b, i, script, svg, iframe"


def test_html_in_the_text_and_in_suggestions_stays_text(page):
    # The model's answer is replaced (the page's call to the suggest_for_editor server function
    # is answered here) by suggestions full of markup; the editor's code that shows them is real.
    page.evaluate(
        """tags => {
            window.__created = [];
            new MutationObserver(records => {
                for (const r of records) for (const n of r.addedNodes) {
                    if (n.nodeType !== 1) continue;
                    for (const e of [n, ...n.querySelectorAll(tags)]) if (e.matches(tags)) window.__created.push(e.outerHTML);
                }
            }).observe(document.querySelector('#editor'), {childList: true, subtree: true});
        }""",
        TAGS,
    )
    answered: list[dict] = []

    def answer_with_markup(route):
        body = route.request.post_data_json or {}
        if body.get("fn_name") != "suggest_for_editor":
            route.continue_()
            return
        answered.append(body.get("data") or {})
        route.fulfill(json={
            "suggestions": [{"text": t, "logprob": -0.5} for t in MARKUP_SUGGESTIONS],
            "message": "", "model": "<b>model</b>", "device": "<i>cpu</i>", "elapsed_ms": 1, "tokens": 30,
            "truncated": False, "timed_out": False, "cancelled": False, "round": 0, "from_cache": False,
        })

    page.route(re.compile(r"/component_server/?$"), answer_with_markup)
    # Markup typed by the writer, too.
    text = 'Markup: <b>bold</b> <img src=x onerror="window.__pwned=4"> <img src=x'
    type_into_editor(page, text)
    options = tab_and_wait(page)
    assert any(not call.get("prefetch") for call in answered)  # the Tab's answer was the injected one
    shown = page.eval_on_selector_all(OPTIONS, "els => els.map(e => e.querySelector('.tw-option-text').textContent)")
    assert shown == [t.lstrip() for t in MARKUP_SUGGESTIONS], options
    assert "<b>model</b> (<i>cpu</i>)" in page.inner_text("#editor .tw-status")
    # Insert the one with the image: it goes in as text, and is marked as text.
    page.keyboard.press("ArrowDown")
    page.keyboard.press("Enter")
    value = page.input_value(TEXTAREA)
    assert value == text + MARKUP_SUGGESTIONS[1]
    assert marked(page) == [MARKUP_SUGGESTIONS[1]]
    # No element was ever made from the markup (not even for a moment), so no handler could run.
    assert page.evaluate("window.__created") == []
    assert page.evaluate(f"document.querySelectorAll('#editor :is({TAGS})').length") == 0
    assert page.evaluate("window.__pwned === undefined")


def is_prefetch(request) -> bool:
    """Whether ``request`` is the page's pre-computation: the suggest_for_editor server function
    (a POST to Gradio's /component_server, as server_calls records) with ``prefetch`` set."""
    if request.method != "POST" or not re.search(r"/component_server/?$", request.url):
        return False
    body = request.post_data_json or {}
    return body.get("fn_name") == "suggest_for_editor" and bool((body.get("data") or {}).get("prefetch"))


def set_caret(page, position: int) -> None:
    # setSelectionRange fires no input event: moving the caret alone starts no pause timer.
    page.evaluate(f"p => document.querySelector('{TEXTAREA}').setSelectionRange(p, p)", position)


PAUSE_WAIT_MS = 1500  # well past the editor's pause (PAUSE_MS = 600) before it pre-computes


def test_no_precomputation_while_an_ime_composes(page):
    asked = server_calls(page, "suggest_for_editor")
    page.evaluate(
        """sel => {
            window.__ime = [];
            const area = document.querySelector(sel);
            for (const type of ['compositionstart', 'compositionend', 'input'])
                area.addEventListener(type, e => window.__ime.push([type, !!e.isComposing, area.value]));
        }""",
        TEXTAREA,
    )
    start = "今天天气很好，我们"
    # Control: a pause after typing sends a pre-computation, and the observer sees it.
    with page.expect_request(is_prefetch, timeout=20_000):
        type_into_editor(page, start)
    seen = len(asked)
    # Compose pinyin through Chromium's own IME path (CDP), as an input method does: the page
    # gets real composition events and input events with isComposing (checked below, so the
    # test cannot pass on events that never fired).
    cdp = page.context.new_cdp_session(page)
    cdp.send("Input.imeSetComposition", {"text": "n", "selectionStart": 1, "selectionEnd": 1})
    cdp.send("Input.imeSetComposition", {"text": "ni", "selectionStart": 2, "selectionEnd": 2})
    assert page.input_value(TEXTAREA) == start + "ni"
    page.wait_for_timeout(PAUSE_WAIT_MS)
    assert asked[seen:] == [], "pre-computed on unfinished pinyin"
    # Tab meanwhile belongs to the IME. A trusted Tab during a composition already comes with
    # isComposing; this one is dispatched without it, so only the editor's own composition
    # state can keep it from opening the popup.
    prevented = page.evaluate(
        """sel => {
            const e = new KeyboardEvent('keydown', {key: 'Tab', bubbles: true, cancelable: true});
            document.querySelector(sel).dispatchEvent(e);
            return e.defaultPrevented;
        }""",
        TEXTAREA,
    )
    assert not prevented and page.is_hidden(POPUP) and asked[seen:] == []
    # Commit: what the IME puts in counts as typing, and a pause after it pre-computes again.
    with page.expect_request(is_prefetch, timeout=20_000) as committed:
        cdp.send("Input.insertText", {"text": "你"})
    assert page.input_value(TEXTAREA) == start + "你"
    events = page.evaluate("window.__ime")
    types = [e[0] for e in events]
    assert "compositionstart" in types and types[-1] == "compositionend", events
    composing = events[types.index("compositionstart") + 1 : -1]
    assert composing and all(kind == "input" and flag for kind, flag, _ in composing), events
    data = committed.value.post_data_json["data"]
    assert data["text"] == start + "你" and data["after"] == ""
    assert [call for call in asked[seen:] if call.get("prefetch")] == [data]


def test_no_precomputation_mid_line_but_tab_works_there(page):
    asked = server_calls(page, "suggest_for_editor")
    head = "Dear Anna,\nThe soup was"
    # Over 2000 characters follow the line: what follows the caret is sent cut at its end.
    text = head + " lovely and warm." + "\n" + "See you soon, and thank you again. " * 70
    # Control: with the caret at the end of the text, a pause pre-computes.
    with page.expect_request(is_prefetch, timeout=20_000) as first:
        type_into_editor(page, text)
    # Typing inside a line (" lovely and warm." follows the caret): a pause sends nothing.
    set_caret(page, len(head))
    seen = len(asked)
    page.keyboard.insert_text(" really")
    page.wait_for_timeout(PAUSE_WAIT_MS)
    assert asked[seen:] == [], "pre-computed with the caret inside a line"
    # Control: at the end of that line (only spaces, then other lines, follow), a pause
    # pre-computes, and sends the start of what follows.
    value = page.input_value(TEXTAREA)
    end_of_line = value.index("\n", len(head))
    set_caret(page, end_of_line)
    with page.expect_request(is_prefetch, timeout=20_000) as pre:
        page.keyboard.insert_text(" ")
    value = page.input_value(TEXTAREA)
    caret = end_of_line + 1
    data = pre.value.post_data_json["data"]
    assert data["text"] == value[:caret]
    assert data["after"] == value[caret : caret + 2000] and len(data["after"]) == 2000
    # Tab inside the line still asks, with the text after the caret. First both pre-computations
    # end (the first, cancelled by typing, can still be winding down): a visitor has at most 2
    # requests running (service.PRESSES_PER_VISITOR), and a Tab as the third is answered "Busy".
    first.value.response()
    pre.value.response()
    caret = len(head + " really")
    set_caret(page, caret)
    seen = len(asked)
    assert tab_and_wait(page, minimum=1)
    tabs = [call for call in asked[seen:] if not call.get("prefetch")]
    assert tabs and tabs[0]["text"] == value[:caret] and tabs[0]["after"] == value[caret : caret + 2000], tabs
    assert page.input_value(TEXTAREA) == value and focused_is_editor(page)
