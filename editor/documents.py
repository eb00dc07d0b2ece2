"""Saved documents: a small SQLite store (WAL mode) with unguessable ids.

A document is its text plus the "marks": character ranges [start, end) that were inserted
from a suggestion, so machine-written text stays recognisable after a save and load.
Saving again under an id needs the owner key returned by the first save (kept by the
browser that saved it); anyone with the id can read, which is what a share link is.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
import time
from pathlib import Path

DB_ENV = "TABWRITE_DB"
MAX_TEXT_CHARS = 2_000_000


class DocumentError(Exception):
    """A clear one-line reason a document could not be saved or loaded."""


def default_path() -> Path:
    if os.environ.get(DB_ENV):
        return Path(os.environ[DB_ENV]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "tabwrite" / "documents.sqlite3"


def clean_marks(marks, length: int) -> list[list[int]]:
    """Sorted, merged, in-bounds [start, end) ranges; anything malformed is dropped."""
    spans = []
    for mark in marks or []:
        try:
            start, end = int(mark[0]), int(mark[1])
        except (TypeError, ValueError, IndexError):
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


class DocumentStore:
    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else default_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS documents ("
            " id TEXT PRIMARY KEY, owner_key TEXT NOT NULL, text TEXT NOT NULL, marks TEXT NOT NULL,"
            " created REAL NOT NULL, updated REAL NOT NULL)"
        )

    def save(self, text: str, marks=None, doc_id: str | None = None, owner_key: str | None = None) -> dict:
        text = (text or "").encode("utf-8", "replace").decode("utf-8")
        if len(text) > MAX_TEXT_CHARS:
            raise DocumentError(f"the document is too long to save ({len(text):,} characters; the limit is {MAX_TEXT_CHARS:,})")
        marks_json = json.dumps(clean_marks(marks, len(text)))
        now = time.time()
        with self._lock:
            if doc_id:
                row = self._db.execute("SELECT owner_key FROM documents WHERE id = ?", (doc_id,)).fetchone()
                if row is not None and owner_key and secrets.compare_digest(row[0], owner_key):
                    self._db.execute(
                        "UPDATE documents SET text = ?, marks = ?, updated = ? WHERE id = ?", (text, marks_json, now, doc_id)
                    )
                    return {"id": doc_id, "owner_key": owner_key, "updated": now}
            # New document (or someone else's id: saving makes this writer's own copy).
            doc_id, owner_key = secrets.token_urlsafe(16), secrets.token_urlsafe(24)
            self._db.execute(
                "INSERT INTO documents (id, owner_key, text, marks, created, updated) VALUES (?, ?, ?, ?, ?, ?)",
                (doc_id, owner_key, text, marks_json, now, now),
            )
            return {"id": doc_id, "owner_key": owner_key, "updated": now}

    def load(self, doc_id: str) -> dict:
        with self._lock:
            row = self._db.execute(
                "SELECT text, marks, created, updated FROM documents WHERE id = ?", (str(doc_id or ""),)
            ).fetchone()
        if row is None:
            raise DocumentError(f"no saved document has the id '{str(doc_id)[:64]}'")
        return {"id": doc_id, "text": row[0], "marks": json.loads(row[1]), "created": row[2], "updated": row[3]}

    def summaries(self, ids: list[str]) -> list[dict]:
        """Title (first line) and time of each known id, newest first; unknown ids are skipped."""
        ids = [str(i) for i in (ids or [])][:200]
        if not ids:
            return []
        with self._lock:
            rows = self._db.execute(
                f"SELECT id, substr(text, 1, 200), updated FROM documents WHERE id IN ({','.join('?' * len(ids))})"
                " ORDER BY updated DESC",
                ids,
            ).fetchall()
        return [{"id": r[0], "title": (r[1].strip().splitlines() or ["(empty)"])[0][:80], "updated": r[2]} for r in rows]
