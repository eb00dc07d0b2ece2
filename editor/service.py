"""What the UI asks of the model, kept apart from the layout.

- Each browser session has its own settings (the settings panel writes them here) and at
  most one suggestion request in flight: a newer request, or a cancel from the editor
  (typing, Esc), stops the older one between two decode steps.
- While the writer pauses, the editor asks for the suggestions at the caret in advance
  (``prefetch``); the Tab that follows is answered from that result, or waits for it.
- Rows finished so far are kept in the session's ``progress``, which the editor polls to
  show the shortest suggestion before the longer ones are done (server functions cannot stream).
- Engines are created once per loaded model and shared by all sessions; the engine's
  lock serialises forward passes (Gradio server functions bypass the queue).
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import OrderedDict

from models import loading, scoring
from models.engine import EngineError, SuggestionEngine, SuggestResult
from models.registry import ModelNotFound
from models.settings import Settings, validate

MAX_SESSIONS = 1000


class SuggestService:
    def __init__(self, default_model: str, backend=None):
        self.default_model = default_model
        # A model server (models/remote.py's OpenAICompletionsBackend) that runs the models instead of this process.
        self.backend = backend
        self._engines: dict[int, SuggestionEngine] = {}
        self._engines_lock = threading.Lock()
        self._sessions: OrderedDict[str, dict] = OrderedDict()
        self._counter = itertools.count(1)
        self._lock = threading.Lock()

    # -- models

    def engine(self, model: str | None = None) -> SuggestionEngine:
        """The engine for ``model`` (loads it on first use; raises ModelNotFound/ModelLoadError)."""
        if self.backend is not None:
            return self.backend.for_model(model or self.default_model)
        loaded = loading.load(model or self.default_model)
        with self._engines_lock:
            engine = self._engines.get(id(loaded))
            if engine is None or engine.loaded is not loaded:
                # Forget engines of models the loader has since dropped from memory.
                alive = {id(m) for m in loading.loaded_models()}
                self._engines = {k: e for k, e in self._engines.items() if k in alive}
                engine = self._engines[id(loaded)] = SuggestionEngine(loaded)
            return engine

    # -- per-session settings

    def session(self, session_id: str) -> dict:
        with self._lock:
            entry = self._sessions.setdefault(session_id or "", {"model": self.default_model, "settings": {}})
            self._sessions.move_to_end(session_id or "")
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
            return entry

    def update_settings(self, session_id: str, model: str, raw: dict) -> tuple[Settings, list[str]]:
        """Store a session's settings; returns them as validated, with notes about clamped values."""
        settings, notes = validate(raw)
        entry = self.session(session_id)
        entry["settings"] = settings.to_dict()
        entry["model"] = model or self.default_model
        return settings, notes

    # -- requests

    # A session's newest request id lives in its entry (so it goes when the session does);
    # an older request sees it is no longer current and stops.

    def begin(self, session_id: str) -> int:
        entry = self.session(session_id)
        with self._lock:
            entry["latest"] = request_id = next(self._counter)
            return request_id

    def cancel(self, session_id: str) -> None:
        entry = self.session(session_id)
        with self._lock:
            entry["latest"] = next(self._counter)

    def is_current(self, session_id: str, request_id: int) -> bool:
        with self._lock:
            entry = self._sessions.get(session_id or "")
        return entry is not None and entry.get("latest") == request_id

    def suggest(self, text: str, settings: Settings, model: str | None = None) -> tuple[SuggestionEngine, SuggestResult]:
        """One stateless request (the API): no session, no cancellation."""
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
        entry = self.session(session_id)
        settings, _ = validate(entry["settings"])
        key = (entry["model"], text, repr(settings))
        if prefetch and not settings.prefetch:
            return {"skipped": True}
        if round_ == 0 and not prefetch:
            pending = entry.get("prefetching")
            if pending is not None and pending[0] == key:
                pending[1].wait(timeout=settings.max_time + 5)
            hit = entry.pop("precomputed", None)
            if hit is not None and hit[0] == key:
                return dict(hit[1], from_cache=True, elapsed_ms=round((time.perf_counter() - started) * 1000))
        done = threading.Event()
        if prefetch:
            entry["prefetching"] = (key, done)
        entry["progress"] = {"text": text, "round": round_, "suggestions": []}
        try:
            return self._run(session_id, entry, text, settings, round_, prefetch, key, started, client_gone)
        finally:
            done.set()  # after the result is stored, so a waiting Tab finds it

    def _run(self, session_id, entry, text, settings, round_, prefetch, key, started, client_gone=None) -> dict:
        def on_update(found):
            entry["progress"] = {"text": text, "round": round_, "suggestions": _plain(found)}

        try:
            engine = self.engine(entry["model"])
            request_id = self.begin(session_id)
            result = engine.suggest(
                text, settings, round_, is_cancelled=lambda: not self.is_current(session_id, request_id), on_update=on_update,
                caller_gone=client_gone,
            )
        except (ModelNotFound, loading.ModelLoadError, EngineError) as e:
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
        entry["last"] = {"prefetch": prefetch, "cancelled": result.cancelled, "timed_out": result.timed_out}
        if prefetch and not result.cancelled and result.suggestions:
            entry["precomputed"] = (key, payload)
        return payload

    def score_for_session(self, session_id: str, text: str) -> dict:
        """The perplexity view's request. Never raises."""
        entry = self.session(session_id)

        def on_progress(fraction: float) -> None:
            entry["score_progress"] = fraction

        entry["score_progress"] = 0.0
        try:
            return scoring.score(self.engine(entry["model"]), text, on_progress=on_progress)
        except (ModelNotFound, loading.ModelLoadError) as e:
            return {"error": str(e)}
        except Exception as e:
            return {"error": f"Scoring failed: {type(e).__name__}: {str(e)[:200]}"}

    def progress(self, session_id: str) -> dict:
        """Suggestions finished so far by the session's request in flight (the editor polls this)."""
        entry = self.session(session_id)
        return dict(entry.get("progress") or {}, score_progress=entry.get("score_progress"), last=entry.get("last"))


def _plain(found) -> list[dict]:
    # A server that reports no log-probabilities gives nan: no confidence bar then.
    return [{"text": s.text, "logprob": round(s.mean_logprob, 3) if math.isfinite(s.mean_logprob) else None} for s in found]
