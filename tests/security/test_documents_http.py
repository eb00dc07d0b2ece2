"""Documents through real HTTP against a running `python app.py` on 127.0.0.1 (issue 11, item 5
and the document limits of item 4): the API (/save, /load through gradio_client and the plain
/gradio_api/call/ routes) and the editor's own server functions (/gradio_api/component_server/).

On the code before: the second of two tabs saving one document silently replaced the first's
text; an integer or non-ASCII owner key or a dict id raised a TypeError (a 500 from the editor's
route, an error without a message from the API); a 1.2 MB document of Chinese text was saved
(the limit was 2,000,000 characters); the database file was 0644 and held the owner keys as
given; nothing limited how often one document, or the server, could be saved.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import sqlite3
import stat
import urllib.parse
import urllib.request

import pytest

from tests.serving import running_app

gradio_client = pytest.importorskip("gradio_client")

STARTUP_TIMEOUT_S = 600
SAVES_PER_DOC = 5
NEW_DOCS = 40
NEW_DOCS_PER_VISITOR = 15
BYTES_PER_VISITOR = 1_500_000  # a full-size document (1 MB) fits, two do not
OLD_ID, OLD_KEY = "oldDocumentId_12345678", "oldOwnerKey_abcdefghijklmnopqrstuvw"
CONFLICT = re.compile(
    r"^Not saved: this document was changed in another tab or window since you opened it \(version (\d+), yours is (\d+)\);"
    r" copy your text, reload it, or save it as a new document\.$"
)


def make_old_database(path) -> None:
    """A database as tabwrite wrote it before this change: plaintext owner keys, no versions."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(
        "CREATE TABLE documents (id TEXT PRIMARY KEY, owner_key TEXT NOT NULL, text TEXT NOT NULL,"
        " marks TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL)"
    )
    db.execute("INSERT INTO documents VALUES (?, ?, 'saved before the upgrade', '[]', 1.0, 1.0)", (OLD_ID, OLD_KEY))
    db.close()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """Our own app (its database, holding one document from before, is ours to inspect), with
    small rate limits so that reaching them takes a few calls."""
    folder = tmp_path_factory.mktemp("app_documents")
    db = folder / "documents.sqlite3"  # where tests/serving.py points $TABWRITE_DB
    make_old_database(db)
    with contextlib.ExitStack() as stack:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("TABWRITE_SAVES_PER_DOC_PER_MIN", str(SAVES_PER_DOC))
            env.setenv("TABWRITE_NEW_DOCS_PER_MIN", str(NEW_DOCS))
            env.setenv("TABWRITE_NEW_DOCS_PER_VISITOR_PER_MIN", str(NEW_DOCS_PER_VISITOR))
            env.setenv("TABWRITE_DOC_BYTES_PER_VISITOR_PER_HOUR", str(BYTES_PER_VISITOR))
            # Visitors told apart by the address a proxy says it saw, so one test can be several.
            env.setenv("TABWRITE_TRUST_PROXY", "1")
            env.delenv("TABWRITE_MAX_DOC_BYTES", raising=False)  # the default: 1 MB
            url = stack.enter_context(running_app([], folder, STARTUP_TIMEOUT_S, "app.py", poll_s=1))
        yield url, db


@pytest.fixture(scope="module")
def client(app):
    return gradio_client.Client(app[0], verbose=False)


def call_api(url: str, api_name: str, data: list, timeout: float = 120) -> tuple[str, object]:
    """POST /gradio_api/call/NAME, then read its event stream: (last event, its data)."""
    request = urllib.request.Request(
        f"{url}gradio_api/call/{api_name}", data=json.dumps({"data": data}).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as r:
        assert r.status == 200
        event_id = json.load(r)["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/{api_name}/{event_id}", timeout=timeout) as r:
        body = r.read().decode()
    events = [(e, d) for e, d in re.findall(r"event: (\w+)\ndata: (.*)\n", body) if e != "heartbeat"]
    assert events, body
    return events[-1][0], json.loads(events[-1][1])


def editor_call(url: str, name: str, data: dict, session: str = "documents-test", headers: dict | None = None) -> tuple[int, object]:
    """One of the editor's server functions, as the page calls it: (HTTP status, answer)."""
    with urllib.request.urlopen(url + "config", timeout=30) as r:
        config = json.load(r)
    editor_id = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "editor")
    parts = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    body = json.dumps({"session_hash": session, "component_id": editor_id, "fn_name": name, "data": data})
    conn.request("POST", "/gradio_api/component_server/", body=body, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    raw = response.read()
    conn.close()
    try:
        return response.status, json.loads(raw)
    except ValueError:
        return response.status, raw.decode(errors="replace")


def test_two_tabs_saving_one_document_the_second_is_told_and_the_first_text_stays(client):
    first = client.predict("The start.", None, api_name="/save")
    assert first["version"] == 1
    tab_a = client.predict(
        text="Tab A's text.", marks=None, doc_id=first["id"], owner_key=first["owner_key"], version=1, api_name="/save"
    )
    assert tab_a["id"] == first["id"] and tab_a["version"] == 2
    with pytest.raises(Exception) as info:  # tab B's copy is still based on version 1
        client.predict(text="Tab B's text.", marks=None, doc_id=first["id"], owner_key=first["owner_key"], version=1, api_name="/save")
    assert CONFLICT.match(str(info.value)).groups() == ("2", "1"), str(info.value)
    loaded = client.predict(first["id"], api_name="/load")
    assert loaded["text"] == "Tab A's text." and loaded["version"] == 2


def test_two_editor_tabs_the_second_gets_the_conflict_and_keeps_its_text_to_save_anew(app):
    url, _ = app
    status, saved = editor_call(url, "save_document", {"text": "Opened in two tabs.", "marks": [], "id": None, "owner_key": None, "version": None})
    assert status == 200 and "error" not in saved, saved
    doc = {"id": saved["id"], "owner_key": saved["owner_key"], "version": 1}  # both tabs opened version 1
    status, a = editor_call(url, "save_document", dict(doc, text="Tab A wrote this.", marks=[[0, 5]]), session="tab-a")
    assert status == 200 and a["id"] == doc["id"], a
    status, b = editor_call(url, "save_document", dict(doc, text="Tab B wrote that.", marks=[]), session="tab-b")
    assert status == 200 and CONFLICT.match(b.get("error", "")) and b["conflict"] is True and b["version"] == 2, b
    assert saved["version"] == 1 and a["version"] == 2
    status, loaded = editor_call(url, "load_document", {"id": doc["id"]}, session="tab-b")
    assert loaded["text"] == "Tab A wrote this." and loaded["marks"] == [[0, 5]] and loaded["version"] == 2
    # What the editor does on "Save again": tab B's text becomes a document of its own.
    status, copy = editor_call(url, "save_document", {"text": "Tab B wrote that.", "marks": [], "id": None, "owner_key": None, "version": None})
    assert status == 200 and copy["id"] != doc["id"] and copy["version"] == 1


@pytest.mark.parametrize(
    "doc_id, owner_key, expected",
    [
        ("EXISTING", 12345, "Not saved: the owner key is not one this app gives out"),
        ("EXISTING", "ключ-владельца", "Not saved: the owner key is not one this app gives out"),
        ("EXISTING", "k" * 5000, "Not saved: the owner key is not one this app gives out"),
        ({"id": "x"}, "some-key", "Not saved: the document id is not one this app gives out"),
    ],
    ids=["int-key", "non-ascii-key", "long-key", "dict-id"],
)
def test_ids_and_keys_of_the_wrong_kind_get_a_clear_error_not_a_500(app, client, doc_id, owner_key, expected):
    url, _ = app
    existing = client.predict("Someone's document.", None, api_name="/save")
    doc_id = existing["id"] if doc_id == "EXISTING" else doc_id
    # The API: an error event carrying the line (an uncaught exception carries {"error": null}).
    event, data = call_api(url, "save", ["Overwrite?", None, doc_id, owner_key, 1])
    assert event == "error" and isinstance(data, dict) and str(data.get("error")).startswith(expected), (event, data)
    # The editor's route: 200 with {"error": line}, not a 500.
    status, answer = editor_call(url, "save_document", {"text": "Overwrite?", "id": doc_id, "owner_key": owner_key, "version": 1})
    assert status == 200 and isinstance(answer, dict) and answer.get("error", "").startswith(expected), (status, answer)
    assert client.predict(existing["id"], api_name="/load")["text"] == "Someone's document."


def test_a_document_over_1_mb_of_utf8_is_refused_clearly(client):
    text = "你" * 400_000  # 400,000 characters, 1,200,000 bytes in UTF-8
    with pytest.raises(Exception, match=r"Not saved: the document is too long to save \(1,200,000 bytes in UTF-8; the limit is 1,000,000\)"):
        client.predict(text, None, api_name="/save")
    with pytest.raises(Exception, match="too many marks"):
        client.predict("short", [[0, 1]] * 10_001, api_name="/save")


def test_database_file_is_0600_and_holds_no_owner_key(app, client):
    _, db = app
    saved = client.predict("A private document.", None, api_name="/save")
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o600
    for suffix in ("-wal", "-shm"):
        if os.path.exists(f"{db}{suffix}"):
            assert stat.S_IMODE(os.stat(f"{db}{suffix}").st_mode) == 0o600, suffix
    assert stat.S_IMODE(os.stat(db.parent).st_mode) & 0o077 == 0  # pytest's own folder: 0700
    stored = dict(sqlite3.connect(f"file:{db}?mode=ro", uri=True).execute("SELECT id, owner_key FROM documents").fetchall())
    assert stored[saved["id"]] == hashlib.sha256(saved["owner_key"].encode()).hexdigest()
    for path in (db, f"{db}-wal"):
        if os.path.exists(path):
            assert saved["owner_key"].encode() not in open(path, "rb").read()


def test_a_database_from_before_keeps_working_with_its_keys_now_hashed(app, client):
    _, db = app
    assert client.predict(OLD_ID, api_name="/load")["text"] == "saved before the upgrade"
    # The key its writer's browser kept from before still saves over it (no version: as a script from before would).
    saved = client.predict("Edited after the upgrade.", None, OLD_ID, OLD_KEY, api_name="/save")
    assert saved["id"] == OLD_ID
    stored = sqlite3.connect(f"file:{db}?mode=ro", uri=True).execute("SELECT owner_key FROM documents WHERE id = ?", (OLD_ID,)).fetchone()[0]
    assert stored == hashlib.sha256(OLD_KEY.encode()).hexdigest()
    assert saved["version"] == 2 and client.predict(OLD_ID, api_name="/load")["text"] == "Edited after the upgrade."


def test_too_many_saves_of_one_document_are_refused_clearly(client):
    doc = client.predict("Saved often.", None, api_name="/save")
    for i in range(SAVES_PER_DOC):
        assert client.predict(f"Saved often ({i}).", None, doc["id"], doc["owner_key"], api_name="/save")["id"] == doc["id"]
    with pytest.raises(Exception, match=r"^Not saved: too many saves; try again in a minute\.$"):
        client.predict("Once more.", None, doc["id"], doc["owner_key"], api_name="/save")
    assert client.predict(doc["id"], api_name="/load")["text"] == f"Saved often ({SAVES_PER_DOC - 1})."


def test_one_visitor_cannot_fill_the_store_and_others_still_save(app):
    # Each new document was bounded (1 MB) and so was their number (10 a minute per visitor),
    # not their bytes: one address could add 10 MB a minute, the default store (1 GB) full in
    # 100 minutes, and then nobody could save. Now the bytes a visitor's saves add are budgeted.
    hog_address = "203.0.113.50"
    hog = gradio_client.Client(app[0], verbose=False, headers={"X-Forwarded-For": hog_address})
    first = hog.predict("a" * 900_000, None, api_name="/save")
    # Saving over it again and again adds nothing to the store, so it never runs out.
    for i in range(3):
        again = hog.predict(f"{i}" * 900_000, None, first["id"], first["owner_key"], api_name="/save")
        assert again["id"] == first["id"]
    line = f"Not saved: too much new text saved from your address (at most {BYTES_PER_VISITOR / 1e6:g} MB an hour); try again later."
    with pytest.raises(Exception) as refused:
        hog.predict("b" * 700_000, None, api_name="/save")  # 900,000 + 700,000 > 1,500,000
    assert str(refused.value) == line
    # Growing a document counts what it adds (100,000 bytes fit; 600,000 more do not), and the
    # editor's own route gets the same line.
    grown = hog.predict("c" * 1_000_000, None, first["id"], first["owner_key"], api_name="/save")
    assert grown["version"] == 5
    status, answer = editor_call(
        app[0], "save_document", {"text": "d" * 600_000, "marks": [], "id": None, "owner_key": None, "version": None},
        headers={"X-Forwarded-For": hog_address},
    )
    assert status == 200 and answer == {"error": line}, (status, str(answer)[:300])
    assert hog.predict(first["id"], api_name="/load")["text"] == "c" * 1_000_000
    # Another visitor has a budget of their own.
    other = gradio_client.Client(app[0], verbose=False, headers={"X-Forwarded-For": "203.0.113.51"})
    assert other.predict("e" * 700_000, None, api_name="/save")["version"] == 1


def test_too_many_new_documents_are_refused_per_visitor_then_on_the_whole_server(app):
    # Last in this file: it uses up the minute's new documents of this app.
    def visitor(n: int):
        return gradio_client.Client(app[0], verbose=False, headers={"X-Forwarded-For": f"203.0.113.{n}"})

    def save_until_refused(client) -> tuple[int, str]:
        for i in range(NEW_DOCS + 1):
            try:
                client.predict(f"New document {i}.", None, api_name="/save")
            except Exception as e:
                return i, str(e)
        return NEW_DOCS + 1, ""

    saved, refused = save_until_refused(visitor(1))
    assert (saved, refused) == (NEW_DOCS_PER_VISITOR, "Not saved: too many new documents from you; try again in a minute.")
    # Others still save, until the server's own limit, which holds for everybody together.
    total = saved
    for n in range(2, 2 + NEW_DOCS // NEW_DOCS_PER_VISITOR + 1):
        count, refused = save_until_refused(visitor(n))
        total += count
        if refused != "Not saved: too many new documents from you; try again in a minute.":
            break
    assert refused == "Not saved: too many saves of new documents on this server; try again in a minute.", refused
    assert total <= NEW_DOCS
