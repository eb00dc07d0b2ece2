"""What the UI asks of the model, kept apart from the layout: sessions and one handler per action.

- Each browser session (``Session``) has its own model and settings, stored validated when
  the settings panel writes them, and at most one suggestion request in flight: a newer
  request, or a cancel from the editor (typing, Esc), stops the older one between two tokens.
- While the writer pauses, the editor asks for the suggestions at the caret in advance
  (``prefetch``); the Tab that follows is answered from that result, or waits for it.
- Rows finished so far are kept in the session's ``progress``, which the editor polls to
  show the shortest suggestion before the longer ones are done (server functions cannot stream).
- Backends (models/core.py's Backend: a local SuggestionEngine per loaded model, or a model
  server) are created once and shared by all sessions; each press goes to its backend's queue.

The editor's server functions and the API endpoints (editor/ui.py) call the same handlers
here: ``suggest``/``suggest_for_session``, ``score``, ``save``, ``load``. A handler never raises:
a failure comes back as {"error": one line}, which the API turns into its error answer.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from editor.documents import DocumentError, DocumentStore
from models.core import Backend, EngineError, SuggestResult
from models.registry import ModelLoadError, ModelNotFound
from models.settings import Settings, validate

MAX_SESSIONS = 1000


@dataclass(eq=False)
class Session:
    """One browser session's state.

    Written by the thread running its press and read by its progress polls: every field is
    replaced whole (never changed in place), so a poll sees the old value or the new one.
    """

    model: str
    settings: Settings = field(default_factory=Settings)  # as validated when stored
    latest: int = 0  # id of the newest request; an older request sees it is no longer current and stops
    progress: dict = field(default_factory=dict)  # rows the request in flight has finished so far
    score_progress: float | None = None  # how far the perplexity view's scoring is (0..1)
    last: dict | None = None  # how its last press ended (the progress poll shows it; tests read it)
    prefetching: tuple | None = None  # (key, threading.Event set when done) of the pause's pre-computation
    precomputed: tuple | None = None  # (key, payload) that pre-computation's answer, for the Tab that follows


class SuggestService:
    def __init__(self, default_model: str, backend=None):
        self.default_model = default_model
        # A model server (models/remote.py's OpenAICompletionsBackend) that runs the models instead of this process.
        self.backend = backend
        self._engines: dict[int, Backend] = {}
        self._engines_lock = threading.Lock()
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._counter = itertools.count(1)
        self._lock = threading.Lock()

    # -- models

    def engine(self, model: str | None = None) -> Backend:
        """The backend for ``model`` (loads it on first use; raises ModelNotFound/ModelLoadError)."""
        if self.backend is not None:
            return self.backend.for_model(model or self.default_model)
        from models import loading  # torch: only where models run in this process
        from models.engine import SuggestionEngine

        loaded = loading.load(model or self.default_model)
        with self._engines_lock:
            engine = self._engines.get(id(loaded))
            if engine is None or engine.loaded is not loaded:
                # Forget engines of models the loader has since dropped from memory.
                alive = {id(m) for m in loading.loaded_models()}
                self._engines = {k: e for k, e in self._engines.items() if k in alive}
                engine = self._engines[id(loaded)] = SuggestionEngine(loaded)
            return engine

    # -- sessions

    def session(self, session_id: str) -> Session:
        with self._lock:
            key = session_id or ""
            session = self._sessions.get(key)
            if session is None:
                session = self._sessions[key] = Session(self.default_model)
            self._sessions.move_to_end(key)
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
            return session

    def update_settings(self, session_id: str, model: str, raw: dict) -> tuple[Settings, list[str]]:
        """Store a session's settings; returns them as validated, with notes about clamped values."""
        settings, notes = validate(raw)
        session = self.session(session_id)
        session.settings = settings
        session.model = model or self.default_model
        return settings, notes

    # A session's newest request id lives in the session (so it goes when the session does);
    # an older request sees it is no longer current and stops.

    def begin(self, session_id: str) -> int:
        session = self.session(session_id)
        with self._lock:
            session.latest = request_id = next(self._counter)
            return request_id

    def cancel(self, session_id: str) -> None:
        session = self.session(session_id)
        with self._lock:
            session.latest = next(self._counter)

    def is_current(self, session_id: str, request_id: int) -> bool:
        with self._lock:
            session = self._sessions.get(session_id or "")
        return session is not None and session.latest == request_id

    # -- suggest

    def suggest(self, text: str, settings: Settings, model: str | None = None) -> tuple[Backend, SuggestResult]:
        """One stateless request (the API): no session, no cancellation. Raises as the backend does."""
        engine = self.engine(model)
        return engine, engine.suggest(text, settings)

    def suggest_for_session(
        self, session_id: str, text: str, round_: int = 0, prefetch: bool = False, client_gone=None
    ) -> dict:
        """The editor's Tab press (or, with ``prefetch``, the work done while the writer pauses).

        Never raises: errors come back as {"error": message}. A Tab on exactly the text that
        was pre-computed during a pause is answered from that result at once; a Tab while that
        pre-computation is still running waits for it instead of starting over. ``client_gone``
        (asked now and then from this thread) says the browser has disconnected: the press is
        cancelled and the model freed for others.
        """
        started = time.perf_counter()
        session = self.session(session_id)
        settings = session.settings
        key = (session.model, text, repr(settings))
        if prefetch and not settings.prefetch:
            return {"skipped": True}
        if round_ == 0 and not prefetch:
            pending = session.prefetching
            if pending is not None and pending[0] == key:
                pending[1].wait(timeout=settings.max_time + 5)
            hit, session.precomputed = session.precomputed, None
            if hit is not None and hit[0] == key:
                return dict(hit[1], from_cache=True, elapsed_ms=round((time.perf_counter() - started) * 1000))
        done = threading.Event()
        if prefetch:
            session.prefetching = (key, done)
        session.progress = {"text": text, "round": round_, "suggestions": []}
        try:
            return self._run(session_id, session, text, round_, prefetch, key, started, client_gone)
        finally:
            done.set()  # after the result is stored, so a waiting Tab finds it

    def _run(self, session_id, session: Session, text, round_, prefetch, key, started, client_gone=None) -> dict:
        def on_update(found):
            session.progress = {"text": text, "round": round_, "suggestions": _plain(found)}

        try:
            engine = self.engine(session.model)
            request_id = self.begin(session_id)
            result = engine.suggest(
                text, session.settings, round_, is_cancelled=lambda: not self.is_current(session_id, request_id),
                on_update=on_update, caller_gone=client_gone,
            )
        except (ModelNotFound, ModelLoadError, EngineError) as e:
            return {"error": str(e)}
        except Exception as e:  # never a traceback in the page, and the text is untouched
            return {"error": f"The model failed: {type(e).__name__}: {str(e)[:200]}"}
        payload = {
            "suggestions": _plain(result.suggestions),
            "message": result.message,
            "model": engine.name,
            "device": engine.device.type,
            "elapsed_ms": round((time.perf_counter() - started) * 1000),
            "tokens": sum(s.tokens for s in result.suggestions),
            "truncated": result.truncated,
            "timed_out": result.timed_out,
            "cancelled": result.cancelled,
            "round": round_,
            "from_cache": False,
            "peak_batch": result.peak_batch,  # presses of other writers that shared its forward passes, plus one
        }
        # How the session's last press ended, for the progress poll (and tests): a press whose
        # browser went away ends cancelled, long before its time budget.
        session.last = {"prefetch": prefetch, "cancelled": result.cancelled, "timed_out": result.timed_out}
        if prefetch and not result.cancelled and result.suggestions:
            session.precomputed = (key, payload)
        return payload

    def progress(self, session_id: str) -> dict:
        """Suggestions finished so far by the session's request in flight (the editor polls this)."""
        session = self.session(session_id)
        return dict(session.progress, score_progress=session.score_progress, last=session.last)

    # -- score

    def score(self, text: str, model: str | None = None, session_id: str | None = None) -> dict:
        """The perplexity view: under ``model``, or the session's model (whose progress polls then
        show how far it is). Never raises."""
        on_progress = None
        if session_id is not None:
            session = self.session(session_id)
            model = model or session.model

            def on_progress(fraction: float) -> None:
                session.score_progress = fraction

            session.score_progress = 0.0
        try:
            return self.engine(model or None).score(text or "", on_progress=on_progress)
        except (ModelNotFound, ModelLoadError, EngineError) as e:
            return {"error": str(e)}
        except Exception as e:
            return {"error": f"Scoring failed: {type(e).__name__}: {str(e)[:200]}"}


# ---------------------------------------------------------------- documents


def save(store: DocumentStore, text, marks=None, doc_id=None, owner_key=None) -> dict:
    """Save a document (and the ranges of machine-written text): its id and owner key. Never raises."""
    try:
        return store.save(str(text or ""), marks, doc_id or None, owner_key or None)
    except DocumentError as e:
        return {"error": f"Not saved: {e}."}


def load(store: DocumentStore, doc_id) -> dict:
    """A saved document's text and marks, by id. Never raises."""
    try:
        return store.load(str(doc_id or ""))
    except DocumentError as e:
        return {"error": f"Cannot open: {e}."}


def _plain(found) -> list[dict]:
    # A server that reports no log-probabilities gives nan: no confidence bar then.
    return [{"text": s.text, "logprob": round(s.mean_logprob, 3) if math.isfinite(s.mean_logprob) else None} for s in found]
