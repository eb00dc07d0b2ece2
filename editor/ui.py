"""The Gradio page: the editor, the settings panel, and the API endpoints.

Layout only; what happens on a Tab press lives in editor/service.py and models/.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from pathlib import Path

import anyio
import gradio as gr

from editor import service as handlers
from editor import styles
from editor.documents import DocumentStore
from editor.guard import upload_sweep, visitor_address
from editor.service import MAX_AFTER_CHARS, SuggestService
from models.core import EngineError
from models.registry import EMBEDDED, ModelLoadError, ModelNotFound
from models.settings import LIMITS, Settings, validate

HERE = Path(__file__).parent
# API presses running at once (/suggest; more wait in Gradio's queue), on threads of their own:
# more than bench.load's 20 writers, fewer than the 40 places of Gradio's queue.
API_PRESSES = 24
DEFAULTS = Settings()
# "Learn my style" sends what only the browser has: the editor's text, the ids of the documents
# saved from this browser (editor.js keeps them in local storage), and this browser's styles' key.
_GATHER_JS = """(name, pasted, files, useEditor, useDocs, _text, _ids, _key, model) => {
  const area = document.querySelector('#editor textarea');
  let docs = [];
  try { docs = JSON.parse(window.localStorage.getItem('tabwrite:docs') || '[]').map((d) => d && d.id).filter(Boolean); } catch (e) {}
  return [name, pasted, files, useEditor, useDocs, area ? area.value : '', JSON.stringify(docs),
          window.localStorage.getItem('tabwrite:style-key') || '', model];
}"""


def _read(name: str) -> str:
    return (HERE / name).read_text(encoding="utf-8")


def _one_dict(args) -> dict:
    """A server function's arguments arrive as one value: the dict the editor passed, or a list of them."""
    if isinstance(args, list) and args:
        args = args[0]
    return args if isinstance(args, dict) else {}


def _visitor_of(request) -> str:
    """Who is calling: the client's address, or behind proxies that say so (Hugging Face Spaces,
    or $TABWRITE_TRUST_PROXY=N), the address the outermost one saw (editor/guard.py visitor_address)."""
    client = getattr(request, "client", None)
    headers = getattr(request, "headers", None) or {}
    return visitor_address(str(getattr(client, "host", "") or ""), str(headers.get("x-forwarded-for", "")))


def _session_of(request) -> str:
    """The browser session a call belongs to, as "visitor|session".

    Queued events get a gr.Request with ``session_hash``; server functions (gradio 6.31) get
    the raw Starlette request, whose already-parsed JSON body carries the same hash. The hash
    is the client's to choose, so the session is also the visitor's: another visitor sending
    the same hash reaches a session of their own, never this one.
    """
    session = getattr(request, "session_hash", None)
    if session is None:
        body = getattr(request, "_json", None)
        session = body.get("session_hash") if isinstance(body, dict) else None
    return f"{_visitor_of(request)}|{str(session or '')[:64]}"


def _disconnect_check(request):
    """A callable that says whether the browser behind ``request`` has gone away.

    Server functions run in a worker thread of anyio (gradio 6.31 routes.component_server), so
    Starlette's async ``is_disconnected`` can be asked from there; anywhere else it says no.
    """
    is_disconnected = getattr(request, "is_disconnected", None)
    if is_disconnected is None:
        return None

    def gone() -> bool:
        try:
            return bool(anyio.from_thread.run(is_disconnected))
        except Exception:  # not in an anyio worker thread, or the loop is closing
            return False

    return gone


def _event_gone(demo: gr.Blocks, request):
    """For a queued API call: whether its caller went away (Gradio marks the event not alive when
    the client's event stream closes, gradio/queueing.py clean_events). None where that cannot be known."""
    session = getattr(request, "session_hash", None)
    if session is None:
        return None

    def gone() -> bool:
        try:
            for jobs in demo._queue.active_jobs:
                for job in jobs or []:
                    if job.session_hash == session:
                        return not job.alive
        except Exception:  # Gradio's internals moved: the press then runs to its budget
            pass
        return False

    return gone


def _style_report(answer: dict) -> str:
    """What the page says when a style is learned: the gain on held-out text, and examples side by side."""
    before, after = answer["bits_per_char_before"], answer["bits_per_char_after"]
    change = (after / before - 1) * 100 if before else 0.0
    lines = [
        f"✅ **{literal(answer['model'].rpartition('@')[0])}** is ready ({answer['seconds']:.0f} s) and selected above.",
        f"On your last {answer['heldout_chars']:,} characters, which it never saw: **{before:.3f} → {after:.3f} bits per "
        f"character** ({change:+.1f} %; perplexity per character {answer['perplexity_per_char_before']:.2f} → "
        f"{answer['perplexity_per_char_after']:.2f}).",
    ]
    held_back, kept = answer.get("held_back_chars"), answer.get("kept_step")
    if held_back:
        chosen = (f"kept after step {kept} of {answer.get('training_steps', kept)}, where it read them best." if kept else
                  "the base model read them best, so this style is the base model as it was.")
        lines.append(f"How long to train was chosen on the {held_back:,} characters before those: {chosen}")
    weight = answer.get("text_cache_weight")
    if weight:
        lines.append(f"It also draws on your text itself (the names and phrases you use again): "
                     f"{weight:.0%} of each guess comes from counts of it, as the training text's end read best.")
    if answer.get("examples"):
        lines += ["", "| your text | you wrote | base model | your style |", "|---|---|---|---|"]
        # one line each, cut before escaping (a cut never halves an escape): the writer's text's
        # last 40 characters, the rest's first 80
        cell = lambda t, cut=slice(80): literal(" ".join(str(t).split())[cut])  # noqa: E731
        for e in answer["examples"]:
            lines.append(f"| …{cell(e['text'], slice(-40, None))} | {cell(e['actual'])} | {cell(e['base'])} | {cell(e['style'])} |")
    return "\n".join(lines)


_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")


def literal(text: str) -> str:
    """``text`` as Markdown that shows it as written: every ASCII punctuation mark escaped with a
    backslash (CommonMark lets each be), so a writer's ``*``, ``_``, ``#``, ``[..](..)``, ``<b>``
    or ``|`` shows as typed instead of becoming emphasis, a heading, a link, markup or a cell."""
    return _PUNCTUATION.sub(r"\\\1", text)


def _or_raise(answer: dict) -> dict:
    """A handler's answer for the API: {"error": line} becomes the API's error answer."""
    if isinstance(answer, dict) and "error" in answer:
        raise gr.Error(answer["error"])
    return answer


# Gradio's queue loop looks for work every 1 ms while it has none (Linux; `Queue.sleep_when_free`),
# which costs ~2 % of a core even with the app idle, and each wake-up takes a core from one of
# the engine's two threads in the middle of a Tab press. Every 5 ms instead: interleaved in one
# app, 24 /suggest presses each way (AMD EPYC, 2 cores, greedy), 369 -> 361 ms a press (the
# engine's own clock 356 -> 346), a blank press 18.6 -> 20.3 ms; capped to AVX2, 462 -> 442 ms.
QUEUE_IDLE_SLEEP_S = 0.005


def calm_queue(demo: gr.Blocks) -> bool:
    """Make ``demo``'s queue (after ``demo.queue()``) look for work every QUEUE_IDLE_SLEEP_S while
    idle; whether this Gradio has the setting (else nothing changes)."""
    queue = getattr(demo, "_queue", None)
    if queue is None or not isinstance(getattr(queue, "sleep_when_free", None), (int, float)):
        return False
    queue.sleep_when_free = max(queue.sleep_when_free, QUEUE_IDLE_SLEEP_S)
    return True


def build_demo(service: SuggestService, store: DocumentStore | None = None) -> gr.Blocks:
    store = store or DocumentStore()

    def suggest_for_editor(args, request: gr.Request) -> dict:
        payload = _one_dict(args)
        try:
            round_ = max(0, min(int(payload.get("round", 0)), 8))
        except (TypeError, ValueError):
            round_ = 0
        try:
            seq = int(payload.get("seq", 0))
        except (TypeError, ValueError):
            seq = 0
        return service.suggest_for_session(
            _session_of(request),
            str(payload.get("text", "")),
            round_,
            prefetch=bool(payload.get("prefetch")),
            client_gone=_disconnect_check(request),
            seq=seq,
            # What follows the caret: only its start is read, and the body is the client's to write.
            after=str(payload.get("after") or "")[:MAX_AFTER_CHARS],
        )

    async def suggestion_progress(args, request: gr.Request) -> dict:
        # {"seq": n, "seen": rows, "wait": true}: answered when press n has more rows than that, or
        # has ended (at most PROGRESS_WAIT_S), on the event loop. Without "wait": at once.
        payload, session = _one_dict(args), _session_of(request)
        if payload.get("wait") is not True:
            return service.progress(session)
        try:
            seq, seen = int(payload.get("seq")), int(payload.get("seen", 0))
        except (TypeError, ValueError, OverflowError):
            return service.progress(session)
        return await service.next_progress(session, seq, seen)

    def score_for_editor(args, request: gr.Request) -> dict:
        return service.score(
            str(_one_dict(args).get("text", "")), session_id=_session_of(request), caller_gone=_disconnect_check(request)
        )

    def save_document(args, request: gr.Request) -> dict:
        # The editor sends the version its text is based on (null for a new document): a save over
        # another tab's newer one is refused with {"error", "conflict": True}, and the text stays.
        payload = _one_dict(args)
        return handlers.save(
            store, payload.get("text"), payload.get("marks"), payload.get("id"), payload.get("owner_key"), payload.get("version"),
            visitor=_visitor_of(request),
        )

    def load_document(args) -> dict:
        return handlers.load(store, _one_dict(args).get("id"))

    def list_documents(args) -> list:
        ids = _one_dict(args).get("ids")
        return store.summaries(ids if isinstance(ids, list) else [])

    # The API: the same handlers; a failure is the API's error answer (gr.Error) with the same line.

    def save(
        text: str,
        marks: list[list[int]] | None = None,
        doc_id: str = "",
        owner_key: str = "",
        version: int | None = None,
        request: gr.Request = None,
    ) -> dict:
        """Save a document (and the ranges of machine-written text); returns its id, owner key, version and share URL.

        To update, pass doc_id and owner_key, and version: the version your copy is based on (as
        the last /save or /load returned); if the document was saved since, nothing is written and
        the error says so. Without a version the stored text is overwritten.
        """
        saved = _or_raise(handlers.save(store, text, marks, doc_id, owner_key, version, visitor=_visitor_of(request)))
        headers = request.headers if request is not None else {}
        host = headers.get("host", "127.0.0.1:7860")
        scheme = headers.get("x-forwarded-proto", "http")  # https behind a proxy such as Spaces
        return dict(saved, share_url=f"{scheme}://{host}/?doc={saved['id']}")

    def load(doc_id: str) -> dict:
        """A saved document's text, marks and version, by id."""
        return _or_raise(handlers.load(store, doc_id))

    def score(text: str, model: str = "", request: gr.Request = None) -> dict:
        """Perplexity, bits per character and each token's probability, rank and top alternatives."""
        return _or_raise(
            service.score(text or "", model or None, caller_gone=_event_gone(demo, request), visitor=_visitor_of(request))
        )

    def cancel_suggestions(args, request: gr.Request) -> bool:
        service.cancel(_session_of(request))
        return True

    def apply_settings(
        model, temperature, top_k, top_p, lengths, max_time, context_tokens, prefetch, hide_below, request: gr.Request
    ):
        raw = {
            "prefetch": prefetch,
            "hide_below": hide_below,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "lengths": lengths,
            "max_time": max_time,
            "context_tokens": context_tokens,
        }
        model = (model or "").strip() or service.default_model
        try:
            engine = service.engine(model)  # loads (and converts once) if needed
        except (ModelNotFound, ModelLoadError) as e:
            current = service.session(_session_of(request)).model
            service.update_settings(_session_of(request), current, raw)
            return f"⚠️ {literal(str(e))}. Still using **{literal(current)}**."
        settings, notes = service.update_settings(_session_of(request), model, raw)
        text = (
            f"Model **{engine.name}** ready ({engine.describe()}). Temperature {settings.temperature:g} · top-k {settings.top_k}"
            f" · top-p {settings.top_p:g} · lengths {'/'.join(map(str, settings.lengths))} · ≤ {settings.max_time:g} s per Tab."
        )
        if notes:
            text += " " + "; ".join(notes) + "."
        return text

    # API presses run on threads of their own. Gradio runs every plain function (queued events,
    # and the editor's server functions: its presses, progress polls and cancels) on anyio's one
    # pool of 40 threads; with /suggest let in 64 at once, 20 addresses x 2 presses could hold
    # all 40 for their whole budget (up to 30 s): behind 30 addresses' 20-s presses a writer's
    # progress poll waited 8.8 s, now 0.01 s (tests/security/test_public.py).
    api_threads = anyio.CapacityLimiter(API_PRESSES)

    async def suggest(
        text: str,
        temperature: float = DEFAULTS.temperature,
        top_k: int = DEFAULTS.top_k,
        top_p: float = DEFAULTS.top_p,
        lengths: str = ", ".join(map(str, DEFAULTS.lengths)),
        max_time: float = DEFAULTS.max_time,
        model: str = "",
        after: str = "",
        request: gr.Request = None,
    ) -> list[str]:
        """Sampled continuations of `text`, shortest first (what Tab shows in the editor).

        after: text after the caret, if any: candidates that fit it are ranked first.
        """
        return await anyio.to_thread.run_sync(
            functools.partial(api_press, text, temperature, top_k, top_p, lengths, max_time, model, after, request),
            limiter=api_threads,
        )

    def api_press(text, temperature, top_k, top_p, lengths, max_time, model, after, request) -> list[str]:
        settings, _ = validate(
            {"temperature": temperature, "top_k": top_k, "top_p": top_p, "lengths": lengths, "max_time": max_time}
        )
        try:
            _, result = service.suggest(
                str(text or ""), settings, model or None, visitor=_visitor_of(request),
                caller_gone=_event_gone(demo, request), after=str(after or "")[:MAX_AFTER_CHARS],
            )
        except (ModelNotFound, ModelLoadError, EngineError) as e:
            raise gr.Error(str(e)) from None
        if not result.suggestions and result.message:
            raise gr.Error(result.message)
        return result.texts

    def personalize(text: str, name: str = "mine", model: str = "", owner_key: str = "", request: gr.Request = None) -> dict:
        """Learn a style from your writing (at least 2,000 characters): a LoRA adapter of `model` (default: the app's model).

        Returns when done (minutes): {model, bits_per_char_before, bits_per_char_after, heldout_chars, seconds,
        training_steps, kept_step, held_back_chars, training_precision, text_cache_weight, examples, owner_key}. Use the returned `model` in /suggest and /score; keep `owner_key` to list
        (/styles) or delete (/delete_style) your styles. The last ~10 % of the text is held out for the figures.
        """
        return _or_raise(service.personalize(text, name, model, owner_key or None, caller_gone=_event_gone(demo, request)))

    def list_styles(owner_key: str) -> list[dict]:
        """The styles learned under `owner_key`."""
        return service.my_styles(owner_key)

    def delete_style(model: str, owner_key: str) -> dict:
        """Delete one of your styles (its `model` name, with the owner key /personalize returned)."""
        return _or_raise(service.delete_style(model, owner_key))

    def style_choices(owner_key) -> list[tuple[str, str]]:
        return [(m["model"].rpartition("@")[0], m["model"]) for m in service.my_styles(owner_key)]

    def restore_styles(owner_key, current):
        """On page load: this browser's styles (its owner key is in local storage) join the model box."""
        choices = model_choices + style_choices(owner_key)
        return gr.update(choices=choices, value=current if current in [v for _, v in choices] else service.default_model)

    def learn_style(name, pasted, files, use_editor, use_documents, editor_text, doc_ids, owner_key, current,
                    request: gr.Request):
        """The "Learn my style" button: gather the text, learn (progress every second), offer the new model."""
        session = _session_of(request)
        text = _style_text(pasted, files, editor_text if use_editor else "", doc_ids if use_documents else "[]")
        box: dict = {}
        job = threading.Thread(
            target=lambda: box.setdefault("answer", service.personalize(text, name, current, owner_key or None, session_id=session)),
            name="tabwrite-style", daemon=True,
        )
        job.start()
        try:
            while job.is_alive():
                job.join(1.0)
                line = service.learning(session)
                if line:
                    yield f"⏳ {line}", gr.update(), gr.update()
        finally:
            if job.is_alive():  # the page went away, or Cancel: the job stops at its next layer
                service.styles.cancel(session)
        answer = box.get("answer") or {"error": "Stopped."}
        if "error" in answer:
            yield f"⚠️ {literal(answer['error'])}", gr.update(), gr.update()
            return
        key = answer["owner_key"]
        yield _style_report(answer), gr.update(choices=model_choices + style_choices(key), value=answer["model"]), key

    def cancel_style(request: gr.Request) -> str:
        return "Cancelling…" if service.styles.cancel(_session_of(request)) else "Nothing to cancel."

    def delete_selected(current, owner_key):
        answer = service.delete_style(current, owner_key)
        if "error" in answer:
            return f"⚠️ {literal(answer['error'])}", gr.update()
        return f"Deleted **{literal(current.rpartition('@')[0])}**.", gr.update(
            choices=model_choices + style_choices(owner_key), value=service.default_model)

    def _style_text(pasted, files, editor_text, doc_ids) -> str:
        """The writer's text for a style: what they pasted, their uploaded .txt/.md files, the
        editor's text and their saved documents (each once), up to what a style reads."""
        parts = [str(pasted or "")]
        for f in (files or [])[:20]:
            path = getattr(f, "name", f)
            try:  # a file's first MAX_CHARS characters, never more read
                with open(str(path), encoding="utf-8", errors="replace") as f:
                    parts.append(f.read(styles.MAX_CHARS))
            except OSError:
                pass
        parts.append(str(editor_text or ""))
        try:
            ids = json.loads(doc_ids or "[]")
        except ValueError:
            ids = []
        for doc_id in (ids if isinstance(ids, list) else [])[:50]:
            found = handlers.load(store, doc_id)
            if "text" in found:
                parts.append(found["text"])
        seen, kept = set(), []
        for part in (p.strip() for p in parts):
            if part and part not in seen:
                seen.add(part)
                kept.append(part)
        return "\n\n".join(kept)[-styles.MAX_CHARS:]

    if service.backend is not None:  # the models run on a server (app.py --backend openai)
        model_choices = [(name, name) for name in service.backend.models]
        model_info = f"A model on the server at {service.backend.endpoint}."
    else:
        model_choices = [(f"{name} — {EMBEDDED[name][0]}" if name in EMBEDDED else name, name) for name in service.models]
        model_info = "The models this app offers (its operator lists them: --models)."

    # Uploads (only "Learn my style" takes them) are deleted once TABWRITE_UPLOAD_KEEP_S old:
    # Gradio kept every one until the app stopped (editor/guard.py UploadLimit).
    with gr.Blocks(title="tabwrite", delete_cache=upload_sweep()) as demo:
        gr.Markdown("## tabwrite\nWrite, press **Tab**, pick a continuation with the arrows and **Enter**.")
        with gr.Row():
            with gr.Column(scale=3):
                gr.HTML(
                    value="",
                    html_template=_read("editor.html"),
                    css_template=_read("editor.css"),
                    js_on_load=_read("editor.js"),
                    server_functions=[
                        suggest_for_editor,
                        suggestion_progress,
                        cancel_suggestions,
                        score_for_editor,
                        save_document,
                        load_document,
                        list_documents,
                    ],
                    elem_id="editor",
                    apply_default_css=False,
                )
            with gr.Column(scale=1, min_width=260):
                with gr.Accordion("Settings", open=True):
                    model = gr.Dropdown(
                        choices=model_choices,
                        value=service.default_model,
                        allow_custom_value=False,
                        label="Model",
                        info=model_info,
                        elem_id="model",
                    )
                    temperature = gr.Slider(*LIMITS["temperature"], value=DEFAULTS.temperature, step=0.05, label="Temperature")
                    top_k = gr.Slider(*LIMITS["top_k"], value=DEFAULTS.top_k, step=1, label="Top-k")
                    top_p = gr.Slider(*LIMITS["top_p"], value=DEFAULTS.top_p, step=0.01, label="Top-p")
                    lengths = gr.Textbox(
                        value=", ".join(map(str, DEFAULTS.lengths)),
                        label="Suggestion lengths (tokens)",
                        info="Shortest to longest; Tab again doubles them.",
                    )
                    max_time = gr.Slider(*LIMITS["max_time"], value=DEFAULTS.max_time, step=0.1, label="Max time per Tab (s)")
                    context_tokens = gr.Slider(
                        *LIMITS["context_tokens"], value=DEFAULTS.context_tokens, step=16, label="Context (last N tokens)"
                    )
                    prefetch = gr.Checkbox(
                        value=DEFAULTS.prefetch,
                        label="Pre-compute while I pause",
                        info="Tab after a pause answers at once; uses the CPU while you think.",
                    )
                    hide_below = gr.Slider(
                        *LIMITS["hide_below"], value=DEFAULTS.hide_below, step=0.05,
                        label="Hide suggestions below this confidence",
                        info="0 shows all; the bar beside each suggestion is its confidence.",
                    )
                status = gr.Markdown(elem_id="settings-status")
                style_key = gr.Textbox(visible=False, elem_id="style-key")  # this browser's owner key of its styles
                if service.styles.enabled:
                    with gr.Accordion("Learn my style", open=False, elem_id="learn-style"):
                        gr.Markdown(
                            "Adapt the model to your writing (at least 2,000 characters; ~20,000 is good). "
                            "It trains here, on this computer's CPU, in minutes; Tab keeps working meanwhile. "
                            "The last ~10 % is held out to show what changed."
                        )
                        style_name = gr.Textbox(value="mine", label="Name", max_length=32, elem_id="style-name")
                        pasted = gr.Textbox(lines=4, label="Your writing (paste)", max_length=styles.MAX_CHARS,
                                            elem_id="style-text")
                        files = gr.File(file_count="multiple", file_types=[".txt", ".md"], label="…or .txt / .md files")
                        use_editor = gr.Checkbox(value=True, label="Include the text in the editor")
                        use_documents = gr.Checkbox(value=True, label="Include my saved documents")
                        with gr.Row():
                            learn = gr.Button("Learn my style", variant="primary", elem_id="learn-style-button")
                            stop = gr.Button("Cancel", elem_id="cancel-style-button")
                            remove = gr.Button("Delete selected style", elem_id="delete-style-button")
                        style_status = gr.Markdown(elem_id="style-status")
                        editor_text, doc_ids = gr.Textbox(visible=False), gr.Textbox(visible=False)
                        learning = learn.click(
                            learn_style,
                            [style_name, pasted, files, use_editor, use_documents, editor_text, doc_ids, style_key, model],
                            [style_status, model, style_key],
                            api_visibility="private",
                            # What only the browser knows: the editor's text, its saved documents, its styles' key.
                            js=_GATHER_JS,
                        )
                        stop.click(cancel_style, None, style_status, api_visibility="private", cancels=[learning])
                        remove.click(delete_selected, [model, style_key], [style_status, model], api_visibility="private",
                                     js="(model, key) => [model, window.localStorage.getItem('tabwrite:style-key') || '']")
        inputs = [model, temperature, top_k, top_p, lengths, max_time, context_tokens, prefetch, hide_below]
        for component in inputs:
            # Gradio shows its own progress on `status` while a new model loads.
            component.change(apply_settings, inputs, status, api_visibility="private", show_progress="minimal")
        demo.load(apply_settings, inputs, status, api_visibility="private")
        if service.styles.enabled:
            demo.load(restore_styles, [style_key, model], model, api_visibility="private",
                      js="(key, model) => [window.localStorage.getItem('tabwrite:style-key') || '', model]")
            style_key.change(None, style_key, None, js="(key) => { if (key) window.localStorage.setItem('tabwrite:style-key', key); }")
        # The engine batches presses that arrive together and keeps each within its time budget,
        # so let many in at once instead of queueing them behind Gradio's default limit; but
        # fewer than the queue's 40 places, so that the page's own events still find one.
        gr.api(suggest, api_name="suggest", concurrency_limit=API_PRESSES)
        gr.api(score, api_name="score")
        gr.api(save, api_name="save")
        gr.api(load, api_name="load")
        if service.styles.enabled:
            gr.api(personalize, api_name="personalize", concurrency_limit=2)  # a second is answered BUSY at once
            gr.api(list_styles, api_name="styles")
            gr.api(delete_style, api_name="delete_style")
    return demo
