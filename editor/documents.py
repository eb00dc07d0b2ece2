"""Saved documents: a small SQLite store (WAL mode) with unguessable ids.

A document is its text plus the "marks": character ranges [start, end) that were inserted
from a suggestion, so machine-written text stays recognisable after a save and load.
Saving again under an id needs the owner key returned by the first save (kept by the
browser that saved it); anyone with the id can read, which is what a share link is.

Made to be hosted in public (issue 11):

- Owner keys are stored as their SHA-256, never as given; a database written by an older
  version (plaintext keys, schema version 0) is migrated in place when it is opened.
- The database file (and SQLite's -wal/-shm files beside it) is 0600; a folder the store
  creates, and its own default folder, is 0700.
- Every document has a version (1 at the first save, +1 per save). A save says which version
  the writer's copy is based on; if the stored one is another (another tab or window saved
  meanwhile), the save is refused with one line and nothing is written: the store keeps the
  other text, the writer keeps theirs. A save without a version overwrites (the API before
  versions existed); the editor always sends one.
- Bounds: the text in UTF-8 bytes (``$TABWRITE_MAX_DOC_BYTES``, default 1 MB), the marks
  (10,000 ranges), ids and keys (short ASCII text); saves per document per minute
  (``$TABWRITE_SAVES_PER_DOC_PER_MIN``, default 60) and new documents per minute on the whole
  server (``$TABWRITE_NEW_DOCS_PER_MIN``, default 60) and per visitor
  (``$TABWRITE_NEW_DOCS_PER_VISITOR_PER_MIN``, default 10: one visitor cannot use up everybody's);
  the bytes one visitor's saves add to the store (``$TABWRITE_DOC_BYTES_PER_VISITOR_PER_HOUR``,
  default 10 MB, refilling over the hour: see ``_ByteBudget``);
  the whole store (``$TABWRITE_MAX_STORE_BYTES``, default 1 GB of database file: new documents,
  and saves that make one longer, are refused past it; a save that does not grow still works).
  Anything else gets a clear one-line ``DocumentError``, never a TypeError.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import secrets
import sqlite3
import sys
import threading
import time
from pathlib import Path

DB_ENV = "TABWRITE_DB"
MAX_DOC_BYTES_ENV = "TABWRITE_MAX_DOC_BYTES"
SAVES_PER_DOC_ENV = "TABWRITE_SAVES_PER_DOC_PER_MIN"
NEW_DOCS_ENV = "TABWRITE_NEW_DOCS_PER_MIN"
NEW_DOCS_PER_VISITOR_ENV = "TABWRITE_NEW_DOCS_PER_VISITOR_PER_MIN"
MAX_STORE_BYTES_ENV = "TABWRITE_MAX_STORE_BYTES"
DOC_BYTES_PER_VISITOR_ENV = "TABWRITE_DOC_BYTES_PER_VISITOR_PER_HOUR"
DEFAULT_MAX_DOC_BYTES = 1_000_000  # 1 MB of UTF-8: a long novel; the editor's textarea is the limit well before
DEFAULT_SAVES_PER_DOC_PER_MIN = 60
DEFAULT_NEW_DOCS_PER_MIN = 60
DEFAULT_NEW_DOCS_PER_VISITOR_PER_MIN = 10
DEFAULT_MAX_STORE_BYTES = 1_000_000_000  # a small Space's disk is 50 GB; a store that fills it takes the app down
# Ten full-size documents an hour from one address: more than a writer types or pastes, and one
# address needs 100 hours to fill the default store (at the new-documents rate alone, 10 a minute
# of 1 MB, it took 100 minutes).
DEFAULT_DOC_BYTES_PER_VISITOR_PER_HOUR = 10_000_000
BYTES_WINDOW_S = 3600.0
STORE_FULL = "the document store is full; nothing was saved (the operator can raise TABWRITE_MAX_STORE_BYTES)"
MAX_MARKS = 10_000  # ranges of machine-written text per document
MAX_IDS = 200  # ids listed in one summaries() call ("my documents")
SCHEMA_VERSION = 2  # PRAGMA user_version: 0 = the first schema (plaintext keys, no version column)
WINDOW_S = 60.0  # the rate limits count saves in the last minute
TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what secrets.token_urlsafe gives out, ids and keys alike
TOO_MANY_SAVES = "too many saves; try again in a minute"
TOO_MANY_NEW = "too many saves of new documents on this server; try again in a minute"
TOO_MANY_NEW_YOURS = "too many new documents from you; try again in a minute"
TOO_MANY_BYTES_YOURS = "too much new text saved from your address (at most {mb:g} MB an hour); try again later"


class DocumentError(Exception):
    """A clear one-line reason a document could not be saved or loaded."""


class VersionConflict(DocumentError):
    """The stored document is not the version the writer's copy is based on."""

    def __init__(self, stored: int, yours: int):
        self.stored, self.yours = stored, yours
        super().__init__(
            f"this document was changed in another tab or window since you opened it (version {stored}, yours is"
            f" {yours}); copy your text, reload it, or save it as a new document"
        )


def default_path() -> Path:
    if os.environ.get(DB_ENV):
        return Path(os.environ[DB_ENV]).expanduser()
    return _default_folder() / "documents.sqlite3"


def _default_folder() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "tabwrite"


def key_hash(owner_key: str) -> str:
    """What is stored for an owner key: its SHA-256, in hex.

    No salt and no slow KDF: those protect guessable secrets (passwords) against a stolen
    database. Owner keys are secrets.token_urlsafe(24), 192 random bits, so no dictionary or
    brute force can find a key from its hash, and a fast hash loses nothing.
    """
    return hashlib.sha256(owner_key.encode("utf-8")).hexdigest()


def _env_limit(name: str, default: int) -> int:
    """A whole number >= 0 from the environment (0: no limit); a bad value falls back, with one line on stderr."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw.replace("_", ""))
        if value < 0:
            raise ValueError
        return value
    except ValueError:
        print(f"[tabwrite] ${name}={raw[:40]!r} is not a whole number >= 0; using {default}", file=sys.stderr)
        return default


def _token(value, what: str) -> str | None:
    """An id or owner key as given out by this store (None or "" for none), or a clear error."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not TOKEN.fullmatch(value):
        raise DocumentError(f"{what} is not one this app gives out (up to 64 letters, digits, '-' and '_')")
    return value


def _version(value) -> int | None:
    """The version a writer's copy is based on: a whole number >= 0, or None (no check)."""
    if value is None or value == "":
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, str) and value.strip().isdigit() and len(value.strip()) <= 18:
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**62:
        raise DocumentError("the version must be a whole number (the version the last save or load returned)")
    return value


def clean_marks(marks, length: int) -> list[list[int]]:
    """Sorted, merged, in-bounds [start, end) ranges; anything malformed is dropped."""
    spans = []
    for mark in marks or []:
        try:
            start, end = int(mark[0]), int(mark[1])
        except (TypeError, ValueError, IndexError, KeyError, OverflowError):
            continue
        start, end = max(0, start), min(length, end)
        if start < end:
            spans.append([start, end])
    spans.sort()
    merged: list[list[int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


class _RateLimit:
    """At most ``limit`` events per key in any WINDOW_S seconds (0: no limit). Callers hold the store's lock."""

    def __init__(self, limit: int, clock):
        self.limit, self.clock = limit, clock
        self._events: dict[str, collections.deque] = {}

    def _recent(self, key: str, now: float) -> collections.deque | None:
        events = self._events.get(key)
        while events and events[0] <= now - WINDOW_S:
            events.popleft()
        return events

    def allows(self, key: str) -> bool:
        if not self.limit:
            return True
        events = self._recent(key, self.clock())
        return not events or len(events) < self.limit

    def record(self, key: str) -> None:
        if not self.limit:
            return
        now = self.clock()
        if len(self._events) > 10_000:  # forget documents not saved in the last minute
            self._events = {k: v for k, v in self._events.items() if self._recent(k, now)}
        self._events.setdefault(key, collections.deque()).append(now)


class _ByteBudget:
    """Bytes each key (a visitor) may add to the store: ``limit`` at once, refilling at ``limit``
    per BYTES_WINDOW_S (0: no limit). Callers hold the store's lock.

    What counts is what a save adds to the store: a new document's text and marks, and what a
    save over a document adds to it (nothing when it does not grow). Not every byte written:
    the editor saves the whole text each time, so a writer saving a 500 KB manuscript now and
    then would run out while taking no room. And not the bytes of the documents a visitor owns:
    documents belong to an owner key, not to an address (addresses change, and many writers
    share one behind a NAT), the store would have to keep every writer's address beside their
    text, and a budget that never refills locks a writer out for good. So this bounds how fast
    one address fills the store; TABWRITE_MAX_STORE_BYTES bounds how full it gets.
    """

    def __init__(self, limit: int, clock):
        self.limit, self.clock = limit, clock
        self._left: dict[str, tuple[float, float]] = {}  # key -> (bytes left, when)

    def left(self, key: str) -> float:
        if not self.limit:
            return float("inf")
        now = self.clock()
        left, then = self._left.get(key, (self.limit, now))
        return min(self.limit, left + (now - then) * self.limit / BYTES_WINDOW_S)

    def take(self, key: str, n: int) -> None:
        if not self.limit or n <= 0:
            return
        left = self.left(key) - n
        if len(self._left) > 10_000:  # forget visitors whose budget is whole again (the same as none)
            self._left = {k: v for k, v in self._left.items() if self.left(k) < self.limit}
        self._left[key] = (left, self.clock())


class DocumentStore:
    def __init__(
        self,
        path: str | Path | None = None,
        *,
        max_doc_bytes: int | None = None,
        saves_per_doc_per_min: int | None = None,
        new_docs_per_min: int | None = None,
        new_docs_per_visitor_per_min: int | None = None,
        max_store_bytes: int | None = None,
        doc_bytes_per_visitor_per_hour: int | None = None,
        clock=time.monotonic,
    ):
        """The limits default to the environment's ($TABWRITE_MAX_DOC_BYTES, ...), then to the defaults above."""
        self.path = Path(path) if path else default_path()
        self.max_doc_bytes = max_doc_bytes if max_doc_bytes is not None else _env_limit(MAX_DOC_BYTES_ENV, DEFAULT_MAX_DOC_BYTES)
        self._per_doc = _RateLimit(
            saves_per_doc_per_min if saves_per_doc_per_min is not None
            else _env_limit(SAVES_PER_DOC_ENV, DEFAULT_SAVES_PER_DOC_PER_MIN),
            clock,
        )
        self._new = _RateLimit(
            new_docs_per_min if new_docs_per_min is not None else _env_limit(NEW_DOCS_ENV, DEFAULT_NEW_DOCS_PER_MIN), clock
        )
        self._new_per_visitor = _RateLimit(
            new_docs_per_visitor_per_min if new_docs_per_visitor_per_min is not None
            else _env_limit(NEW_DOCS_PER_VISITOR_ENV, DEFAULT_NEW_DOCS_PER_VISITOR_PER_MIN),
            clock,
        )
        self.max_store_bytes = max_store_bytes if max_store_bytes is not None else _env_limit(MAX_STORE_BYTES_ENV, DEFAULT_MAX_STORE_BYTES)
        self._bytes_per_visitor = _ByteBudget(
            doc_bytes_per_visitor_per_hour if doc_bytes_per_visitor_per_hour is not None
            else _env_limit(DOC_BYTES_PER_VISITOR_ENV, DEFAULT_DOC_BYTES_PER_VISITOR_PER_HOUR),
            clock,
        )
        self._lock = threading.Lock()
        self._make_private_file()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.create_function("tabwrite_key_hash", 1, key_hash, deterministic=True)
        self._db.execute("PRAGMA busy_timeout = 5000")  # another process migrating or writing the same file
        self._db.execute("PRAGMA journal_mode=WAL")
        self._migrate()
        self._make_private_side_files()

    # -- the file: private to this user

    def _make_private_file(self) -> None:
        folder = self.path.parent
        if not folder.exists():
            folder.mkdir(parents=True, mode=0o700)
            os.chmod(folder, 0o700)  # mkdir's mode is filtered by the umask
        elif folder.resolve() == _default_folder().resolve():
            os.chmod(folder, 0o700)  # our own folder (an older version made it 0755); an operator's folder is left as is
        # Created 0600 before SQLite opens it (SQLite gives its -wal and -shm files the same mode);
        # an existing file, from an older version, is tightened to 0600.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(self.path, 0o600)

    def _make_private_side_files(self) -> None:
        for suffix in ("-wal", "-shm", "-journal"):
            side = Path(f"{self.path}{suffix}")
            try:
                os.chmod(side, 0o600)
            except FileNotFoundError:
                pass

    # -- the schema: created, or migrated in one transaction

    def _migrate(self) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")  # one process migrates; another waits, then sees the new schema version
        try:
            db.execute(
                "CREATE TABLE IF NOT EXISTS documents ("
                " id TEXT PRIMARY KEY, owner_key TEXT NOT NULL, text TEXT NOT NULL, marks TEXT NOT NULL,"
                " created REAL NOT NULL, updated REAL NOT NULL, version INTEGER NOT NULL DEFAULT 1)"
            )
            schema = db.execute("PRAGMA user_version").fetchone()[0]
            if schema > SCHEMA_VERSION:
                raise DocumentError(
                    f"{self.path} was written by a newer tabwrite (schema {schema}; this one knows {SCHEMA_VERSION})"
                )
            if schema < SCHEMA_VERSION:
                columns = {row[1] for row in db.execute("PRAGMA table_info(documents)")}
                if "version" not in columns:
                    db.execute("ALTER TABLE documents ADD COLUMN version INTEGER NOT NULL DEFAULT 1")
                # Schema 0 stored owner keys as given: replace each by its hash, in the same transaction
                # as the schema version, so no key is ever hashed twice or left in plaintext.
                db.execute("UPDATE documents SET owner_key = tabwrite_key_hash(owner_key)")
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- documents

    def _full(self, adding: int) -> bool:
        """Whether ``adding`` more bytes would take the database file (with its WAL) past the limit."""
        if not self.max_store_bytes:
            return False
        size = sum(os.path.getsize(p) for p in (self.path, Path(f"{self.path}-wal")) if os.path.exists(p))
        return size + adding > self.max_store_bytes

    def save(
        self, text: str, marks=None, doc_id: str | None = None, owner_key: str | None = None, version=None, visitor: str = ""
    ) -> dict:
        """Save ``text`` (and ``marks``) as a new document, or over ``doc_id`` with its ``owner_key``.

        ``version``: the version the writer's copy is based on (as the last save or load of it
        returned); if the stored document is at another version, nothing is written and
        VersionConflict says so. None: no check (the stored text is overwritten). A wrong key
        or an unknown id saves a new document (a reader of a shared id gets their own copy).
        Returns ``id``, ``owner_key`` (as given, or the new one), ``version`` and ``updated``.
        ``visitor``: who saves (editor/ui.py: their address), for the limits per visitor on new
        documents and on the bytes their saves add ("": the caller is not a visitor, only the
        server's limits count).
        """
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise DocumentError("the text must be a string")
        doc_id, owner_key = _token(doc_id, "the document id"), _token(owner_key, "the owner key")
        version = _version(version)
        if marks is not None and not isinstance(marks, (list, tuple)):
            raise DocumentError("the marks must be a list of [start, end] character ranges")
        if marks is not None and len(marks) > MAX_MARKS:
            raise DocumentError(f"too many marks ({len(marks):,} ranges; the limit is {MAX_MARKS:,})")
        encoded = text.encode("utf-8", "replace")  # a lone surrogate becomes "?"
        if self.max_doc_bytes and len(encoded) > self.max_doc_bytes:
            raise DocumentError(
                f"the document is too long to save ({len(encoded):,} bytes in UTF-8; the limit is {self.max_doc_bytes:,})"
            )
        text = encoded.decode("utf-8")
        marks_json = json.dumps(clean_marks(marks, len(text)))
        now = time.time()
        visitor = str(visitor or "")[:200]
        with self._lock:
            if doc_id and owner_key:
                row = self._db.execute("SELECT owner_key, version FROM documents WHERE id = ?", (doc_id,)).fetchone()
                if row is not None and secrets.compare_digest(row[0], key_hash(owner_key)):
                    return self._update(doc_id, owner_key, row[1], version, text, marks_json, now, visitor)
            # A new document (or someone else's id: saving makes this writer's own copy).
            if visitor and not self._new_per_visitor.allows(visitor):
                raise DocumentError(TOO_MANY_NEW_YOURS)
            if not self._new.allows(""):
                raise DocumentError(TOO_MANY_NEW)
            adds = len(encoded) + len(marks_json)
            self._check_bytes(visitor, adds)
            if self._full(adds):
                raise DocumentError(STORE_FULL)
            doc_id, owner_key = secrets.token_urlsafe(16), secrets.token_urlsafe(24)
            self._db.execute(
                "INSERT INTO documents (id, owner_key, text, marks, created, updated, version) VALUES (?, ?, ?, ?, ?, ?, 1)",
                (doc_id, key_hash(owner_key), text, marks_json, now, now),
            )
            self._new.record("")
            if visitor:
                self._new_per_visitor.record(visitor)
                self._bytes_per_visitor.take(visitor, adds)
            return {"id": doc_id, "owner_key": owner_key, "version": 1, "updated": now}

    def _check_bytes(self, visitor: str, adds: int) -> None:
        """Refuse a save of ``visitor`` that would add more to the store than their budget has left."""
        if visitor and adds > 0 and self._bytes_per_visitor.left(visitor) < adds:
            raise DocumentError(TOO_MANY_BYTES_YOURS.format(mb=self._bytes_per_visitor.limit / 1e6))

    def _update(
        self, doc_id: str, owner_key: str, stored: int, version, text: str, marks_json: str, now: float, visitor: str = ""
    ) -> dict:
        if version is not None and version != stored:
            raise VersionConflict(stored, version)
        if not self._per_doc.allows(doc_id):
            raise DocumentError(TOO_MANY_SAVES)
        grows = len(text.encode("utf-8")) + len(marks_json) - self._db.execute(
            "SELECT length(CAST(text AS BLOB)) + length(marks) FROM documents WHERE id = ?", (doc_id,)
        ).fetchone()[0]
        self._check_bytes(visitor, grows)
        if grows > 0 and self._full(grows):
            raise DocumentError(STORE_FULL)
        # The version in the WHERE clause: another process sharing the file cannot slip a save in between.
        done = self._db.execute(
            "UPDATE documents SET text = ?, marks = ?, updated = ?, version = version + 1 WHERE id = ? AND version = ?",
            (text, marks_json, now, doc_id, stored),
        ).rowcount
        if not done:
            row = self._db.execute("SELECT version FROM documents WHERE id = ?", (doc_id,)).fetchone()
            raise VersionConflict(row[0] if row else stored + 1, stored if version is None else version)
        self._per_doc.record(doc_id)
        if visitor:
            self._bytes_per_visitor.take(visitor, grows)
        return {"id": doc_id, "owner_key": owner_key, "version": stored + 1, "updated": now}

    def load(self, doc_id: str) -> dict:
        """Text, marks, times and version of a saved document."""
        try:
            doc_id = _token(doc_id, "the document id")
        except DocumentError:
            if not isinstance(doc_id, str):
                raise DocumentError(f"a document id is text, not {type(doc_id).__name__}") from None
            shown = "".join(c if c.isprintable() else "?" for c in doc_id[:40])  # one line, whatever was sent
            raise DocumentError(f"'{shown}' is not a document id (up to 64 letters, digits, '-' and '_')") from None
        with self._lock:
            row = self._db.execute(
                "SELECT text, marks, created, updated, version FROM documents WHERE id = ?", (doc_id or "",)
            ).fetchone()
        if row is None:
            raise DocumentError(f"no saved document has the id '{doc_id or ''}'")
        return {"id": doc_id, "text": row[0], "marks": json.loads(row[1]), "created": row[2], "updated": row[3], "version": row[4]}

    def summaries(self, ids: list[str]) -> list[dict]:
        """Title (first line) and time of each known id, newest first; unknown or malformed ids are skipped."""
        if not isinstance(ids, (list, tuple)):
            return []
        ids = [i for i in ids[:MAX_IDS] if isinstance(i, str) and TOKEN.fullmatch(i)]
        if not ids:
            return []
        with self._lock:
            rows = self._db.execute(
                f"SELECT id, substr(text, 1, 200), updated, version FROM documents WHERE id IN ({','.join('?' * len(ids))})"
                " ORDER BY updated DESC",
                ids,
            ).fetchall()
        return [
            {"id": r[0], "title": (r[1].strip().splitlines() or ["(empty)"])[0][:80], "updated": r[2], "version": r[3]}
            for r in rows
        ]
