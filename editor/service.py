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

import asyncio
import hashlib
import itertools
import math
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from editor import styles
from editor.documents import DocumentError, DocumentStore
from editor.styles import Styles
from models import textcut
from models.core import Backend, EngineError, SuggestResult
from models.registry import Catalog, ModelLoadError, ModelNotFound
from models.settings import Settings, validate

MAX_SESSIONS = 1000
SESSIONS_PER_VISITOR = 16  # a visitor opening more sessions pushes out their own oldest, nobody else's
# (a visitor is an address, an IPv6 host's whole /64: editor/guard.py visitor_address)
PRESSES_PER_VISITOR = 2  # presses of one visitor in flight at once (two tabs, or API calls); more are refused at once
# (and one pre-computation of theirs besides: see suggest_for_session)
MAX_PROMPT_CHARS = 65536  # text a press reads, from its end (the model sees at most ~2048 tokens of it)
MAX_AFTER_CHARS = 2000  # text after the caret a press reads, from its start (it ranks candidates by a few words of it)
BUSY = "Busy: you have {n} suggestion requests running; wait for them or press Esc."
SCORINGS_PER_VISITOR = 1  # scorings of one visitor running or waiting at once (the perplexity view and /score)
SCORE_BUSY = "Busy: your other scoring is still running; try again when it is done."
# A progress poll that asks to wait is answered when the press's next row is ready, when the
# press ends, or after this long. Polled every 120 ms instead, a row reached the page ~60 ms
# (up to 120 + a round trip) after it was ready: 264 against the engine's 194 ms for the first.
PROGRESS_WAIT_S = 1.5
WAITING_POLLS_PER_SESSION = 2  # more waiting polls of one session are answered at once


def _wake(session: Session) -> None:
    """Wake the session's waiting progress polls (from any thread; they check what changed)."""
    for loop, event in session.waiting:
        try:
            loop.call_soon_threadsafe(event.set)
        except RuntimeError:  # that loop has closed (the server is stopping)
            pass


def visitor_of(session_id: str) -> str:
    """The visitor part of a session key "visitor|session" (editor/ui.py makes them)."""
    return session_id.rpartition("|")[0]


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
    in_flight: int = 0  # its presses running now (a session with one is never pushed out)
    prefetching: tuple | None = None  # (key, threading.Event set when done) of the pause's pre-computation
    # What this text's earlier Tab presses showed, (key, texts): Tab again starts its rows differently.
    shown: tuple = ((), ())
    precomputed: tuple | None = None  # (key, payload) that pre-computation's answer, for the Tab that follows
    ended: int = -1  # the editor's number (seq) of its press that ended last
    # Progress polls waiting for news, (event loop, asyncio.Event) each: woken from the press's thread.
    waiting: tuple = ()


class SuggestService:
    def __init__(self, default_model: str, backend=None, catalog: Catalog | None = None, personalize: bool = True,
                 styles_folder=None):
        self.default_model = default_model
        # A model server (models/remote.py's OpenAICompletionsBackend) that runs the models instead of this process.
        self.backend = backend
        # The models offered, by name (app.py: --model, --models); nothing else is ever loaded.
        self.catalog = catalog or Catalog.for_app(default_model)
        self._engines: dict[str, Backend] = {}  # by offered name
        self._engines_lock = threading.Lock()
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # by "visitor|session", least recently used first
        self._held: Counter[str] = Counter()  # sessions per visitor
        self._presses: dict[str, int] = {}  # presses in flight per visitor
        self._counter = itertools.count(1)
        self._lock = threading.Lock()
        # Learned styles (editor/styles.py): a model of its own each, named "<base>+<name>@<id>".
        self.styles = Styles(self.engine, styles_folder, enabled=personalize and backend is None)

    # -- models

    @property
    def models(self) -> list[str]:
        """The names a visitor may choose among."""
        return list(self.backend.models) if self.backend is not None else self.catalog.names

    def engine(self, model: str | None = None) -> Backend:
        """The backend for the offered model ``model`` (loads it on first use).

        Raises ModelNotFound for a name that is not offered (one line, nothing about the
        server's files) and ModelLoadError when an offered model cannot be loaded.
        """
        name = (model or "").strip() or self.default_model
        if self.backend is not None:
            return self.backend.for_model(name)
        if styles.parse(name) is not None:
            return self.styles.engine(name)
        spec = self.catalog.spec(name)
        from models import loading  # torch: only where models run in this process
        from models.engine import SuggestionEngine

        engine = self._engines.get(name)
        if engine is not None and loading.is_loaded(engine.loaded):
            return engine  # no lock: a press never waits for another model that is loading
        loaded = loading.load(spec)
        with self._engines_lock:
            engine = self._engines.get(name)
            if engine is None or engine.loaded is not loaded:
                # Forget engines of models the loader has since dropped from memory.
                alive = {id(m) for m in loading.loaded_models()}
                self._engines = {k: e for k, e in self._engines.items() if id(e.loaded) in alive}
                engine = self._engines[name] = SuggestionEngine(loaded)
            return engine

    # -- sessions

    def session(self, session_id: str, create: bool = True) -> Session | None:
        """The session ``session_id`` ("visitor|session"), made if ``create``.

        A visitor's new session pushes out that visitor's own least recently used one once
        they have SESSIONS_PER_VISITOR; so one visitor opening sessions by the thousand never
        pushes out anybody else's. When all MAX_SESSIONS are taken (by 63 visitors or more), a
        session goes of the visitor holding the most (their least recently used one with no
        press in flight; between visitors holding as many, the least recently used of those).
        By least recently used alone, a crowd of addresses (cheap with IPv6, though one /64 is
        one visitor) opening 16 sessions each pushed out the writers who had paused longest;
        now the crowd's addresses lose theirs first, down to as few as a writer holds. Simulated
        with 50 writers holding one session each: 60 addresses opening 16 sessions each pushed
        10 of them out; now it takes 960 (a crowd of as many addresses as the table has places
        still pushes out, oldest first, writers holding one).
        """
        key = session_id or ""
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                if not create:
                    return None
                visitor = visitor_of(key)
                if self._held[visitor] >= SESSIONS_PER_VISITOR:
                    self._drop([k for k in self._sessions if visitor_of(k) == visitor])
                elif len(self._sessions) >= MAX_SESSIONS:
                    self._drop(self._of_the_most_held())
                session = self._sessions[key] = Session(self.default_model)
                self._held[visitor] += 1
            self._sessions.move_to_end(key)
            return session

    def _of_the_most_held(self) -> list[str]:
        """The idle sessions of the visitors holding the most sessions among those with an idle
        one, least recently used first; every session when none is idle (holding _lock). A walk
        over the table: 0.36 ms at 1000 sessions, only when it is full (least recently used
        alone: 0.11 ms)."""
        idle = [k for k, s in self._sessions.items() if s.in_flight == 0]
        if not idle:
            return list(self._sessions)
        most = max(self._held[visitor_of(k)] for k in idle)
        return [k for k in idle if self._held[visitor_of(k)] == most]

    def _drop(self, keys: list[str]) -> None:
        """Forget the least recently used of ``keys`` (in that order) with no press in flight (holding _lock)."""
        idle = [k for k in keys if self._sessions[k].in_flight == 0]
        key = (idle or keys)[0]
        self._sessions.pop(key)
        visitor = visitor_of(key)
        self._held[visitor] -= 1
        if self._held[visitor] <= 0:
            del self._held[visitor]

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
        session = self.session(session_id, create=False)
        if session is not None:
            with self._lock:
                session.latest = next(self._counter)

    def is_current(self, session_id: str, request_id: int) -> bool:
        with self._lock:
            session = self._sessions.get(session_id or "")
        return session is not None and session.latest == request_id

    # -- suggest

    def suggest(
        self, text: str, settings: Settings, model: str | None = None, visitor: str = "", caller_gone=None, after: str = ""
    ) -> tuple[Backend, SuggestResult]:
        """One stateless request (the API): no session; cancelled when the caller goes away.
        Raises as the backend does, and EngineError with the busy line past the visitor's limit."""
        engine = self.engine(model)
        busy = self._enter(visitor)
        if busy is not None:
            raise EngineError(busy)
        try:
            return engine, engine.suggest(
                textcut.tail(text, MAX_PROMPT_CHARS), settings, caller_gone=caller_gone, after=str(after or "")[:MAX_AFTER_CHARS]
            )
        finally:
            self._leave(visitor)

    def suggest_for_session(
        self, session_id: str, text: str, round_: int = 0, prefetch: bool = False, client_gone=None, seq: int = 0,
        after: str = "",
    ) -> dict:
        """The editor's Tab press (or, with ``prefetch``, the work done while the writer pauses).

        Never raises: errors come back as {"error": message}. A Tab on exactly the text that
        was pre-computed during a pause is answered from that result at once; a Tab while that
        pre-computation is still running waits for it instead of starting over. ``client_gone``
        (asked now and then from this thread) says the browser has disconnected: the press is
        cancelled and the model freed for others. ``seq``: the editor's number for the request,
        which its progress polls carry back (not the text: a poll must not send the document back).
        ``after``: the text after the caret (candidates that fit it are ranked first).
        """
        session = self.session(session_id)
        try:
            return self._press(session_id, session, text, round_, prefetch, client_gone, seq, after)
        finally:
            if not prefetch:
                session.ended = max(session.ended, seq)
                _wake(session)  # a poll waiting for this press's rows: there are no more

    def _press(self, session_id, session: Session, text, round_, prefetch, client_gone, seq, after) -> dict:
        started = time.perf_counter()
        settings = session.settings
        after = str(after or "")[:MAX_AFTER_CHARS]
        # Cut before anything keeps it: what a press reads is all it can depend on (the key of
        # two texts that differ only before the cut is rightly the same). The session keeps the
        # key in ``shown``, ``prefetching`` and ``precomputed``, so the key holds the cut text's
        # digest, not the text: with the whole text, each of MAX_SESSIONS sessions held up to two
        # 3 MB bodies; with the cut text, still two of 65,536 characters (up to 4 bytes each in a
        # str: 0.5 GB over 1000 sessions).
        text = textcut.tail(text, MAX_PROMPT_CHARS)
        key = (session.model, len(text), _digest(text), after, repr(settings))
        if prefetch and not settings.prefetch:
            return {"skipped": True}
        if round_ == 0 and not prefetch:
            pending = session.prefetching
            if pending is not None and pending[0] == key:
                pending[1].wait(timeout=settings.max_time + 5)
            hit, session.precomputed = session.precomputed, None
            if hit is not None and hit[0] == key:
                return dict(hit[1], from_cache=True, elapsed_ms=round((time.perf_counter() - started) * 1000))
        # Pre-computations count apart (one in flight per visitor): one cancelled by typing may
        # still be winding down when the writer presses Tab elsewhere, and must not make it "busy".
        counted = visitor_of(session_id) + ("#prefetch" if prefetch else "")
        busy = self._enter(counted, 1 if prefetch else PRESSES_PER_VISITOR)
        if busy is not None:
            return {"error": busy, "busy": True}
        done = threading.Event()
        if prefetch:
            session.prefetching = (key, done)
        session.progress = {"seq": seq, "round": round_, "suggestions": []}
        session.in_flight += 1
        try:
            return self._run(session_id, session, text, round_, prefetch, key, started, client_gone, seq, after)
        finally:
            session.in_flight -= 1
            self._leave(counted)
            done.set()  # after the result is stored, so a waiting Tab finds it

    def _run(self, session_id, session: Session, text, round_, prefetch, key, started, client_gone=None, seq=0, after="") -> dict:
        def on_update(found):
            session.progress = {"seq": seq, "round": round_, "suggestions": _plain(found)}
            _wake(session)

        # Tab again on the same text: the new rows start differently from those already shown.
        shown = session.shown[1] if round_ > 0 and session.shown[0] == key else ()
        try:
            engine = self.engine(session.model)
            request_id = self.begin(session_id)
            result = engine.suggest(
                text, session.settings, round_, is_cancelled=lambda: not self.is_current(session_id, request_id),
                on_update=on_update, caller_gone=client_gone, after=after, avoid=shown,
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
            "busy": result.busy,  # refused before any work: the model could not answer within the budget
            "round": round_,
            "from_cache": False,
            "peak_batch": result.peak_batch,  # presses of other writers that shared its forward passes, plus one
        }
        # How the session's last press ended, for the progress poll (and tests): a press whose
        # browser went away ends cancelled, long before its time budget.
        session.last = {"prefetch": prefetch, "cancelled": result.cancelled, "timed_out": result.timed_out}
        if not result.cancelled:
            session.shown = (key, tuple(shown) + tuple(result.texts))
        if prefetch and not result.cancelled and result.suggestions:
            session.precomputed = (key, payload)
        return payload

    def progress(self, session_id: str) -> dict:
        """Suggestions finished so far by the session's request in flight (the editor polls this)."""
        session = self.session(session_id, create=False)  # a poll never makes a session
        if session is None:
            return {"score_progress": None, "last": None}
        return dict(session.progress, score_progress=session.score_progress, last=session.last)

    async def next_progress(self, session_id: str, seq: int, seen: int) -> dict:
        """``progress`` once the editor's press ``seq`` has more than ``seen`` rows, or has ended,
        or after PROGRESS_WAIT_S: the editor's poll, answered when there is news for it.

        Waits on the event loop (no thread is held); a session's polls beyond
        WAITING_POLLS_PER_SESSION are answered at once.
        """
        session = self.session(session_id, create=False)
        if session is None or len(session.waiting) >= WAITING_POLLS_PER_SESSION:
            return self.progress(session_id)
        loop = asyncio.get_running_loop()
        me = (loop, asyncio.Event())
        session.waiting = session.waiting + (me,)
        deadline = loop.time() + PROGRESS_WAIT_S
        try:
            while True:
                # Cleared before looking: a row that arrives from here on sets it again.
                me[1].clear()
                progress = session.progress
                if session.ended >= seq or (progress.get("seq") == seq and len(progress.get("suggestions", ())) > seen):
                    break
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    await asyncio.wait_for(me[1].wait(), left)
                except TimeoutError:
                    break
        finally:
            session.waiting = tuple(w for w in session.waiting if w is not me)
        return self.progress(session_id)

    # -- presses in flight per visitor

    def _enter(self, visitor: str, limit: int = PRESSES_PER_VISITOR) -> str | None:
        """Count a press of ``visitor`` in; the busy line instead when they have ``limit`` running."""
        with self._lock:
            n = self._presses.get(visitor, 0)
            if n >= limit:
                return BUSY.format(n=n)
            self._presses[visitor] = n + 1
            return None

    def _leave(self, visitor: str) -> None:
        with self._lock:
            n = self._presses.get(visitor, 1) - 1
            if n > 0:
                self._presses[visitor] = n
            else:
                self._presses.pop(visitor, None)

    # -- score

    def score(
        self, text: str, model: str | None = None, session_id: str | None = None, caller_gone=None, visitor: str | None = None
    ) -> dict:
        """The perplexity view: under ``model``, or the session's model (whose progress polls then
        show how far it is). ``caller_gone``: the HTTP client went away (scoring stops). ``visitor``:
        who asks (by default the session's visitor). Never raises."""
        if visitor is None:
            visitor = visitor_of(session_id or "")
        # A model has few scoring places (models/scoring.py: 1 running, 2 waiting); one visitor
        # sending three /score calls at once held all of them, and everybody else's perplexity
        # view was "busy" until theirs were done. So a visitor holds at most one of them.
        counted = visitor + "#score"
        if self._enter(counted, SCORINGS_PER_VISITOR) is not None:
            return {"error": SCORE_BUSY}
        try:
            return self._score(text, model, session_id, caller_gone)
        finally:
            self._leave(counted)

    def _score(self, text, model, session_id, caller_gone) -> dict:
        on_progress = None
        if session_id is not None:
            session = self.session(session_id)
            model = model or session.model

            def on_progress(fraction: float) -> None:
                session.score_progress = fraction

            session.score_progress = 0.0
        try:
            return self.engine(model or None).score(text or "", on_progress=on_progress, caller_gone=caller_gone)
        except (ModelNotFound, ModelLoadError, EngineError) as e:
            return {"error": str(e)}
        except Exception as e:
            return {"error": f"Scoring failed: {type(e).__name__}: {str(e)[:200]}"}


    # -- learned styles

    def personalize(self, text, name="mine", model=None, owner_key=None, caller_gone=None, session_id=None) -> dict:
        """Learn a style of ``model`` (an offered base model; a style's base for a style) from
        ``text``: the new model's name and the before/after figures, or {"error": line}. Never raises."""
        base = (model or "").strip() if isinstance(model, str) else ""
        found = styles.parse(base)
        base = found["base"] if found else (base or self.default_model)
        if self.backend is None:
            try:
                self.catalog.spec(base)  # an offered model, or the one-line refusal
            except ModelNotFound as e:
                return {"error": str(e)}
        return self.styles.learn(text, name, base, owner_key, caller_gone=caller_gone, owner=session_id)

    def learning(self, session_id: str) -> str | None:
        """A line on the style being learned, when ``session_id`` started it."""
        progress = self.styles.progress
        return progress.line() if progress is not None and self.styles.owned_by(session_id) else None

    def my_styles(self, owner_key) -> list[dict]:
        """The styles of ``owner_key`` (none for a key this app did not give out)."""
        if not isinstance(owner_key, str) or not styles.TOKEN.fullmatch(owner_key):
            return []
        return self.styles.store.mine(owner_key)

    def delete_style(self, model, owner_key) -> dict:
        found = styles.parse(model if isinstance(model, str) else "")
        if found is None or not isinstance(owner_key, str) or not styles.TOKEN.fullmatch(owner_key):
            return {"error": "Not deleted: that is not one of your styles."}
        if not self.styles.store.delete(found["id"], owner_key):
            return {"error": "Not deleted: that is not one of your styles."}
        self.styles.forget(found["id"])
        return {"deleted": model}


# ---------------------------------------------------------------- documents


def save(store: DocumentStore, text, marks=None, doc_id=None, owner_key=None, version=None, visitor: str = "") -> dict:
    """Save a document (and the ranges of machine-written text): its id, owner key and new version. Never raises.

    ``version``: the version the writer's copy is based on (from the last save or load); when
    another tab saved meanwhile, the answer is {"error": line, "conflict": True, "version": the
    stored one} and nothing is written. None overwrites (API callers from before versions).
    ``visitor``: who saves, for the limit on new documents per visitor.
    """
    try:
        return store.save("" if text is None else text, marks, doc_id, owner_key, version, visitor=visitor)
    except DocumentError as e:
        if getattr(e, "stored", None) is not None:  # a VersionConflict: the editor keeps the writer's text and says so
            return {"error": f"Not saved: {e}.", "conflict": True, "version": e.stored}
        return {"error": f"Not saved: {e}."}
    except Exception as e:  # the disk, the database: one line, never a traceback
        return {"error": f"Not saved: the document store failed ({type(e).__name__}: {str(e)[:200]})."}


def load(store: DocumentStore, doc_id) -> dict:
    """A saved document's text, marks and version, by id. Never raises."""
    try:
        return store.load(doc_id)
    except DocumentError as e:
        return {"error": f"Cannot open: {e}."}
    except Exception as e:
        return {"error": f"Cannot open: the document store failed ({type(e).__name__}: {str(e)[:200]})."}


def _digest(text: str) -> bytes:
    """What a session keeps of a text to know it again (65,536 characters: 0.05 ms ASCII, 0.24 ms Chinese)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _plain(found) -> list[dict]:
    # A server that reports no log-probabilities gives nan: no confidence bar then.
    return [{"text": s.text, "logprob": round(s.mean_logprob, 3) if math.isfinite(s.mean_logprob) else None} for s in found]
