"""What the UI asks of the model, kept apart from the layout.

- Each browser session has its own settings (the settings panel writes them here) and at
  most one suggestion request in flight: a newer request, or a cancel from the editor
  (typing, Esc), stops the older one between two decode steps.
- Engines are created once per loaded model and shared by all sessions; the engine's
  lock serialises forward passes (Gradio server functions bypass the queue).
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict

from models import loading
from models.engine import EngineError, SuggestionEngine, SuggestResult
from models.registry import ModelNotFound
from models.settings import Settings, validate

MAX_SESSIONS = 1000


class SuggestService:
    def __init__(self, default_model: str):
        self.default_model = default_model
        self._engines: dict[int, SuggestionEngine] = {}
        self._engines_lock = threading.Lock()
        self._sessions: OrderedDict[str, dict] = OrderedDict()
        self._latest: dict[str, int] = {}
        self._counter = itertools.count(1)
        self._lock = threading.Lock()

    # -- models

    def engine(self, model: str | None = None) -> SuggestionEngine:
        """The engine for ``model`` (loads it on first use; raises ModelNotFound/ModelLoadError)."""
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

    def update_settings(self, session_id: str, model: str, raw: dict) -> list[str]:
        """Store a session's settings; returns notes about clamped values."""
        settings, notes = validate(raw)
        entry = self.session(session_id)
        entry["settings"] = settings.to_dict()
        entry["model"] = model or self.default_model
        return notes

    # -- requests

    def begin(self, session_id: str) -> int:
        with self._lock:
            request_id = next(self._counter)
            self._latest[session_id] = request_id
            return request_id

    def cancel(self, session_id: str) -> None:
        with self._lock:
            self._latest[session_id] = next(self._counter)

    def is_current(self, session_id: str, request_id: int) -> bool:
        return self._latest.get(session_id) == request_id

    def suggest(
        self, text: str, settings: Settings, model: str | None = None, round_: int = 0, session_id: str | None = None
    ) -> tuple[SuggestionEngine, SuggestResult]:
        engine = self.engine(model)
        if session_id is None:
            return engine, engine.suggest(text, settings, round_)
        request_id = self.begin(session_id)
        result = engine.suggest(text, settings, round_, is_cancelled=lambda: not self.is_current(session_id, request_id))
        return engine, result

    def suggest_for_session(self, session_id: str, text: str, round_: int = 0) -> dict:
        """The editor's Tab press. Never raises: errors come back as {"error": message}."""
        entry = self.session(session_id)
        settings, _ = validate(entry["settings"])
        try:
            engine, result = self.suggest(text, settings, entry["model"], round_, session_id)
        except (ModelNotFound, loading.ModelLoadError, EngineError) as e:
            return {"error": str(e)}
        except Exception as e:  # never a traceback in the page, and the text is untouched
            return {"error": f"The model failed: {type(e).__name__}: {str(e)[:200]}"}
        return {
            "suggestions": [{"text": s.text, "logprob": round(s.mean_logprob, 3)} for s in result.suggestions],
            "message": result.message,
            "model": engine.name,
            "elapsed_ms": round(result.elapsed_s * 1000),
            "truncated": result.truncated,
            "timed_out": result.timed_out,
            "cancelled": result.cancelled,
            "round": round_,
        }
