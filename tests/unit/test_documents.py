"""The SQLite document store: ids, owner keys (stored hashed), marks, WAL mode, file modes,
versions, bounds, rate limits, clear errors."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat

import pytest

from editor import service as handlers
from editor.documents import (
    DEFAULT_MAX_DOC_BYTES,
    MAX_MARKS,
    DocumentError,
    DocumentStore,
    VersionConflict,
    clean_marks,
    key_hash,
)


@pytest.fixture()
def store(tmp_path):
    return DocumentStore(tmp_path / "docs.sqlite3")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_save_and_load_round_trip_with_marks(store):
    saved = store.save("Hello <script>x</script> 你好 👩‍💻", [[6, 14], [0, 2]])
    loaded = store.load(saved["id"])
    assert loaded["text"] == "Hello <script>x</script> 你好 👩‍💻"
    assert loaded["marks"] == [[0, 2], [6, 14]]


def test_ids_are_unguessable_and_distinct(store):
    ids = {store.save(f"doc {i}")["id"] for i in range(50)}
    assert len(ids) == 50 and all(len(i) >= 20 for i in ids)


def test_saving_again_needs_the_owner_key(store):
    first = store.save("v1")
    again = store.save("v2", doc_id=first["id"], owner_key=first["owner_key"])
    assert again["id"] == first["id"] and store.load(first["id"])["text"] == "v2"
    # Someone with only the (shared) id gets their own copy; the original is untouched.
    other = store.save("hijack", doc_id=first["id"], owner_key="wrong")
    assert other["id"] != first["id"] and store.load(first["id"])["text"] == "v2"


def test_unknown_id_is_a_clear_error(store):
    with pytest.raises(DocumentError, match="no saved document"):
        store.load("does-not-exist")


def test_wal_mode(store):
    mode_ = sqlite3.connect(store.path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode_ == "wal"


def test_clean_marks_sorts_merges_clamps_and_drops_garbage():
    assert clean_marks([[5, 9], [0, 3], [2, 4], [8, 20], ["x", 1], [7], None, [30, 40]], 12) == [[0, 4], [5, 12]]
    # Values json may carry that int() refuses in other ways: dropped, never an exception.
    assert clean_marks([[float("inf"), 3], ["9" * 5000, 1], {"a": 1}, [float("nan"), 2], [1, 2]], 5) == [[1, 2]]


def test_summaries_list_only_known_ids(store):
    a = store.save("First line\nsecond")
    store.save("other")
    listed = store.summaries([a["id"], "unknown"])
    assert [d["title"] for d in listed] == ["First line"]


def test_summaries_skip_malformed_ids_and_read_at_most_200(store):
    a = store.save("mine")
    assert store.summaries([{"x": 1}, 5, None, "é", a["id"]])[0]["id"] == a["id"]
    assert store.summaries(["unknown"] * 200 + [a["id"]]) == []  # only the first 200 are looked up
    assert store.summaries("not a list") == [] and store.summaries(None) == []


# ---------------------------------------------------------------- owner keys: stored hashed


def test_owner_keys_are_stored_as_their_sha256_never_as_given(store):
    saved = store.save("secret text")
    stored = sqlite3.connect(store.path).execute("SELECT owner_key FROM documents").fetchone()[0]
    assert stored == hashlib.sha256(saved["owner_key"].encode()).hexdigest() == key_hash(saved["owner_key"])
    store.save("again", doc_id=saved["id"], owner_key=saved["owner_key"], version=1)
    for suffix in ("", "-wal"):  # not in the database file, not in the log beside it
        path = f"{store.path}{suffix}"
        if os.path.exists(path):
            assert saved["owner_key"].encode() not in open(path, "rb").read()
    # The hash itself is not a key: it does not open the document for writing.
    copy = store.save("x", doc_id=saved["id"], owner_key=stored[:64])
    assert copy["id"] != saved["id"] and store.load(saved["id"])["text"] == "again"


OLD_SCHEMA = (
    "CREATE TABLE documents ("
    " id TEXT PRIMARY KEY, owner_key TEXT NOT NULL, text TEXT NOT NULL, marks TEXT NOT NULL,"
    " created REAL NOT NULL, updated REAL NOT NULL)"
)


def make_old_database(path, rows) -> None:
    """A database as the first version wrote it: plaintext keys, no version column, user_version 0."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(OLD_SCHEMA)
    for doc_id, key, text in rows:
        db.execute("INSERT INTO documents VALUES (?, ?, ?, '[[0, 3]]', 1.0, 2.0)", (doc_id, key, text))
    db.close()


def test_a_database_with_plaintext_keys_is_migrated_when_opened(tmp_path):
    path = tmp_path / "old.sqlite3"
    make_old_database(path, [("oldDocId_1234567890ab", "oldOwnerKey-abcdefghijklmnopqrstuv", "old text"), ("other-id", "k2", "b")])
    store = DocumentStore(path)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    keys = dict(db.execute("SELECT id, owner_key FROM documents").fetchall())
    assert keys == {"oldDocId_1234567890ab": key_hash("oldOwnerKey-abcdefghijklmnopqrstuv"), "other-id": key_hash("k2")}
    loaded = store.load("oldDocId_1234567890ab")
    assert loaded["text"] == "old text" and loaded["marks"] == [[0, 3]] and loaded["version"] == 1
    # The key the writer's browser kept from before still saves over its document.
    saved = store.save("new text", doc_id="oldDocId_1234567890ab", owner_key="oldOwnerKey-abcdefghijklmnopqrstuv", version=1)
    assert saved["id"] == "oldDocId_1234567890ab" and saved["version"] == 2
    # Opening it again does not hash the hashes: the key still works.
    again = DocumentStore(path)
    assert again.save("third", doc_id="other-id", owner_key="k2")["id"] == "other-id"
    assert again.load("oldDocId_1234567890ab")["text"] == "new text"


def test_a_database_from_a_newer_schema_is_refused_clearly(tmp_path):
    path = tmp_path / "new.sqlite3"
    DocumentStore(path)
    sqlite3.connect(path, isolation_level=None).execute("PRAGMA user_version = 99")
    with pytest.raises(DocumentError, match="newer tabwrite"):
        DocumentStore(path)


# ---------------------------------------------------------------- file modes


def test_database_file_is_0600_and_a_folder_it_creates_is_0700(tmp_path):
    folder = tmp_path / "made" / "by-the-store"
    old_umask = os.umask(0o022)  # the usual umask, which alone would give 0644 / 0755
    try:
        store = DocumentStore(folder / "docs.sqlite3")
        store.save("something")
    finally:
        os.umask(old_umask)
    assert mode(folder) == 0o700
    assert mode(store.path) == 0o600
    for suffix in ("-wal", "-shm"):
        assert os.path.exists(f"{store.path}{suffix}"), suffix
        assert mode(f"{store.path}{suffix}") == 0o600, suffix


def test_an_existing_database_is_made_0600_and_an_operators_folder_is_left_alone(tmp_path):
    folder = tmp_path / "operator"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    path = folder / "docs.sqlite3"
    make_old_database(path, [])
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(f"{path}{suffix}"):
            os.chmod(f"{path}{suffix}", 0o644)
    DocumentStore(path).save("x")
    assert mode(path) == 0o600
    assert all(mode(f"{path}{s}") == 0o600 for s in ("-wal", "-shm") if os.path.exists(f"{path}{s}"))
    assert mode(folder) == 0o755  # $TABWRITE_DB may name any folder (/data, the working directory): not ours to change


def test_the_default_folder_is_made_0700(tmp_path, monkeypatch):
    monkeypatch.delenv("TABWRITE_DB", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    (tmp_path / "tabwrite").mkdir(mode=0o755)  # as an older version left it
    os.chmod(tmp_path / "tabwrite", 0o755)
    store = DocumentStore()
    assert store.path == tmp_path / "tabwrite" / "documents.sqlite3"
    assert mode(tmp_path / "tabwrite") == 0o700 and mode(store.path) == 0o600


# ---------------------------------------------------------------- versions


def test_versions_start_at_one_and_count_saves(store):
    saved = store.save("v1")
    assert saved["version"] == 1 and store.load(saved["id"])["version"] == 1
    for expected in (2, 3, 4):
        saved = store.save(f"v{expected}", doc_id=saved["id"], owner_key=saved["owner_key"], version=saved["version"])
        assert saved["version"] == expected
    assert store.load(saved["id"])["version"] == 4 and store.load(saved["id"])["text"] == "v4"


def test_a_save_based_on_an_older_version_is_refused_and_nothing_is_lost(store):
    first = store.save("the start")
    key = first["owner_key"]
    tab_a = store.save("tab A's text", doc_id=first["id"], owner_key=key, version=1)
    assert tab_a["version"] == 2
    with pytest.raises(VersionConflict) as info:
        store.save("tab B's text", doc_id=first["id"], owner_key=key, version=1)
    assert str(info.value) == (
        "this document was changed in another tab or window since you opened it (version 2, yours is 1);"
        " copy your text, reload it, or save it as a new document"
    )
    assert info.value.stored == 2
    loaded = store.load(first["id"])
    assert loaded["text"] == "tab A's text" and loaded["version"] == 2
    # Tab B, having reloaded, saves on top of version 2.
    assert store.save("tab B's text", doc_id=first["id"], owner_key=key, version=2)["version"] == 3


def test_the_handler_says_conflict_in_one_line_and_never_raises(store):
    first = store.save("start")
    store.save("A", doc_id=first["id"], owner_key=first["owner_key"], version=1)
    answer = handlers.save(store, "B", None, first["id"], first["owner_key"], 1)
    assert answer["conflict"] is True and answer["version"] == 2
    assert answer["error"].startswith("Not saved: this document was changed in another tab or window") and "\n" not in answer["error"]
    assert handlers.load(store, first["id"])["text"] == "A"


def test_two_stores_on_one_file_check_versions_too(tmp_path):
    one, two = DocumentStore(tmp_path / "shared.sqlite3"), DocumentStore(tmp_path / "shared.sqlite3")
    first = one.save("start")
    two.save("from the second process", doc_id=first["id"], owner_key=first["owner_key"], version=1)
    with pytest.raises(VersionConflict):
        one.save("stale", doc_id=first["id"], owner_key=first["owner_key"], version=1)
    assert one.load(first["id"])["text"] == "from the second process"


def test_a_save_without_a_version_overwrites_as_before(store):
    # The API from before versions: doc_id and owner_key only. The editor always sends a version.
    first = store.save("start")
    store.save("A", doc_id=first["id"], owner_key=first["owner_key"], version=1)
    saved = store.save("old script", doc_id=first["id"], owner_key=first["owner_key"])
    assert saved["version"] == 3 and store.load(first["id"])["text"] == "old script"


@pytest.mark.parametrize("version", [True, "abc", -1, 1.5, [1], {"v": 1}, "1" * 40])
def test_a_version_that_is_not_a_whole_number_is_a_clear_error(store, version):
    first = store.save("start")
    with pytest.raises(DocumentError, match="version must be a whole number"):
        store.save("x", doc_id=first["id"], owner_key=first["owner_key"], version=version)
    assert store.load(first["id"])["text"] == "start"


def test_a_version_may_come_as_text_or_a_float(store):
    first = store.save("start")
    assert store.save("x", doc_id=first["id"], owner_key=first["owner_key"], version="1")["version"] == 2
    assert store.save("y", doc_id=first["id"], owner_key=first["owner_key"], version=2.0)["version"] == 3


# ---------------------------------------------------------------- bounds and types


def test_the_text_limit_counts_utf8_bytes(tmp_path):
    store = DocumentStore(tmp_path / "d.sqlite3", max_doc_bytes=9)
    assert store.save("你好你")["version"] == 1  # 3 characters, 9 bytes
    with pytest.raises(DocumentError, match=r"too long to save \(12 bytes in UTF-8; the limit is 9\)"):
        store.save("你好你好")  # 4 characters, 12 bytes
    assert store.save("123456789")["version"] == 1


def test_the_text_limit_comes_from_the_environment(tmp_path, monkeypatch):
    assert DocumentStore(tmp_path / "a.sqlite3").max_doc_bytes == DEFAULT_MAX_DOC_BYTES == 1_000_000
    monkeypatch.setenv("TABWRITE_MAX_DOC_BYTES", "2048")
    assert DocumentStore(tmp_path / "b.sqlite3").max_doc_bytes == 2048
    monkeypatch.setenv("TABWRITE_MAX_DOC_BYTES", "lots")
    assert DocumentStore(tmp_path / "c.sqlite3").max_doc_bytes == DEFAULT_MAX_DOC_BYTES


def test_a_default_sized_store_refuses_a_document_over_1_mb(store):
    store.save("a" * 1_000_000)
    with pytest.raises(DocumentError, match="too long"):
        store.save("é" * 500_001)  # 500,001 characters, 1,000,002 bytes


def test_marks_are_bounded(store):
    text = "x" * 30_000
    saved = store.save(text, [[i * 2, i * 2 + 1] for i in range(MAX_MARKS)])
    assert len(store.load(saved["id"])["marks"]) == MAX_MARKS
    with pytest.raises(DocumentError, match="too many marks"):
        store.save(text, [[i * 2, i * 2 + 1] for i in range(MAX_MARKS + 1)])
    with pytest.raises(DocumentError, match="marks must be a list"):
        store.save(text, "[[0, 1]]")


@pytest.mark.parametrize("owner_key", [12345, "ключ-владельца", "k" * 65, {"a": 1}, ["key"], "key with spaces", "key\n"])
def test_an_owner_key_that_is_not_one_we_give_out_is_a_clear_error(store, owner_key):
    first = store.save("start")
    with pytest.raises(DocumentError, match="the owner key is not one this app gives out"):
        store.save("x", doc_id=first["id"], owner_key=owner_key)
    answer = handlers.save(store, "x", None, first["id"], owner_key)
    assert answer == {"error": "Not saved: the owner key is not one this app gives out (up to 64 letters, digits, '-' and '_')."}


@pytest.mark.parametrize("doc_id", [{"a": 1}, 5, ["id"], "../../etc/passwd", "ü" * 10, "i" * 65])
def test_a_document_id_that_is_not_one_we_give_out_is_a_clear_error(store, doc_id):
    with pytest.raises(DocumentError, match="document id"):
        store.save("x", doc_id=doc_id, owner_key="some-key")
    with pytest.raises(DocumentError, match="not a document id|a document id is text"):
        store.load(doc_id)
    assert handlers.load(store, doc_id)["error"].startswith("Cannot open: ")
    assert handlers.save(store, "x", None, doc_id, "k")["error"].startswith("Not saved: the document id")


def test_text_that_is_not_a_string_is_a_clear_error(store):
    assert handlers.save(store, {"text": 1}) == {"error": "Not saved: the text must be a string."}
    assert handlers.save(store, None)["version"] == 1  # nothing: an empty document, as before


def test_empty_id_and_key_mean_a_new_document(store):
    saved = handlers.save(store, "text", None, "", "", None)
    assert saved["version"] == 1 and handlers.load(store, saved["id"])["text"] == "text"


# ---------------------------------------------------------------- rate limits


def test_saves_per_document_per_minute_are_limited(tmp_path):
    clock = Clock()
    store = DocumentStore(tmp_path / "d.sqlite3", saves_per_doc_per_min=3, clock=clock)
    doc = store.save("v1")  # creating it is counted among new documents, not here
    for _ in range(3):
        doc = store.save("again", doc_id=doc["id"], owner_key=doc["owner_key"], version=doc["version"])
    with pytest.raises(DocumentError, match=r"^too many saves; try again in a minute$"):
        store.save("one more", doc_id=doc["id"], owner_key=doc["owner_key"], version=doc["version"])
    assert handlers.save(store, "one more", None, doc["id"], doc["owner_key"], doc["version"]) == {
        "error": "Not saved: too many saves; try again in a minute."
    }
    assert store.load(doc["id"])["text"] == "again" and store.load(doc["id"])["version"] == 4
    other = store.save("another document")  # other documents are not held back
    store.save("its update", doc_id=other["id"], owner_key=other["owner_key"], version=1)
    clock.now += 61
    assert store.save("later", doc_id=doc["id"], owner_key=doc["owner_key"], version=doc["version"])["version"] == 5


def test_new_documents_per_minute_are_limited_on_the_whole_server(tmp_path):
    clock = Clock()
    store = DocumentStore(tmp_path / "d.sqlite3", new_docs_per_min=2, clock=clock)
    first = store.save("one")
    store.save("two")
    with pytest.raises(DocumentError, match="too many saves of new documents on this server; try again in a minute"):
        store.save("three")
    with pytest.raises(DocumentError, match="too many saves"):  # a wrong key makes a new copy: counted too
        store.save("copy", doc_id=first["id"], owner_key="wrong")
    # Saving over one's own documents goes on.
    assert store.save("one, edited", doc_id=first["id"], owner_key=first["owner_key"], version=1)["version"] == 2
    clock.now += 30
    with pytest.raises(DocumentError, match="too many saves"):
        store.save("three")
    clock.now += 31
    assert store.save("three")["version"] == 1


def test_rate_limits_come_from_the_environment_and_zero_means_none(tmp_path, monkeypatch):
    monkeypatch.setenv("TABWRITE_NEW_DOCS_PER_MIN", "1")
    store = DocumentStore(tmp_path / "a.sqlite3")
    store.save("one")
    with pytest.raises(DocumentError, match="too many saves"):
        store.save("two")
    monkeypatch.setenv("TABWRITE_NEW_DOCS_PER_MIN", "0")
    monkeypatch.setenv("TABWRITE_SAVES_PER_DOC_PER_MIN", "0")
    store = DocumentStore(tmp_path / "b.sqlite3")
    doc = store.save("x")
    for i in range(100):
        store.save(f"x{i}")
        doc = store.save(f"y{i}", doc_id=doc["id"], owner_key=doc["owner_key"], version=doc["version"])
    assert doc["version"] == 101


def test_a_refused_save_is_not_counted(tmp_path):
    store = DocumentStore(tmp_path / "d.sqlite3", saves_per_doc_per_min=2, clock=Clock())
    doc = store.save("v1")
    for _ in range(5):  # conflicts write nothing and use none of the minute's saves
        with pytest.raises(VersionConflict):
            store.save("stale", doc_id=doc["id"], owner_key=doc["owner_key"], version=0)
    doc = store.save("v2", doc_id=doc["id"], owner_key=doc["owner_key"], version=1)
    assert store.save("v3", doc_id=doc["id"], owner_key=doc["owner_key"], version=2)["version"] == 3


def test_new_documents_are_limited_per_visitor_before_the_server(tmp_path):
    now = [0.0]
    store = DocumentStore(tmp_path / "v.sqlite3", new_docs_per_min=5, new_docs_per_visitor_per_min=2, clock=lambda: now[0])
    for _ in range(2):
        store.save("mine", visitor="1.2.3.4")
    with pytest.raises(DocumentError, match="from you"):
        store.save("mine", visitor="1.2.3.4")
    # Somebody else still saves; the server's limit still holds for everybody together.
    for n in range(3):
        store.save("theirs", visitor=f"5.6.7.{n}")
    with pytest.raises(DocumentError, match="on this server"):
        store.save("theirs", visitor="9.9.9.9")
    now[0] += 61  # a minute later, the first visitor saves again
    store.save("mine", visitor="1.2.3.4")


def test_a_full_store_refuses_new_and_longer_documents_and_keeps_what_it_has(tmp_path):
    store = DocumentStore(tmp_path / "full.sqlite3", max_store_bytes=400_000)
    saved = store.save("a" * 100_000)
    kept = store.save("b" * 50_000)
    filled = 0
    with pytest.raises(DocumentError, match="store is full"):
        while True:
            store.save("c" * 100_000)
            filled += 1
    assert filled < 4
    with pytest.raises(DocumentError, match="store is full"):
        store.save("b" * 200_000, doc_id=kept["id"], owner_key=kept["owner_key"])
    # A save that does not make a document longer still works, and nothing was lost.
    store.save("a" * 90_000, doc_id=saved["id"], owner_key=saved["owner_key"])
    assert store.load(kept["id"])["text"] == "b" * 50_000
    assert store.load(saved["id"])["text"] == "a" * 90_000


def test_the_bytes_a_visitor_adds_are_budgeted_and_come_back_over_the_hour(tmp_path, monkeypatch):
    clock = Clock()
    store = DocumentStore(tmp_path / "b.sqlite3", doc_bytes_per_visitor_per_hour=1000, saves_per_doc_per_min=0, clock=clock)
    doc = store.save("a" * 600, visitor="1.2.3.4")  # 600 + 2 ("[]", its marks) of 1000
    for _ in range(20):  # saving over it without growing it adds nothing
        doc = store.save("b" * 600, doc_id=doc["id"], owner_key=doc["owner_key"], visitor="1.2.3.4")
    doc = store.save("c" * 900, doc_id=doc["id"], owner_key=doc["owner_key"], visitor="1.2.3.4")  # 300 more: 98 left
    line = r"^too much new text saved from your address \(at most 0\.001 MB an hour\); try again later$"
    with pytest.raises(DocumentError, match=line):
        store.save("d" * 100, visitor="1.2.3.4")
    with pytest.raises(DocumentError, match=line):  # growing a document by more than is left, too
        store.save("c" * 1000, doc_id=doc["id"], owner_key=doc["owner_key"], visitor="1.2.3.4")
    assert store.load(doc["id"])["text"] == "c" * 900
    assert handlers.save(store, "d" * 100, visitor="1.2.3.4")["error"].startswith("Not saved: too much new text")
    store.save("d" * 500, visitor="5.6.7.8")  # somebody else's budget is their own
    store.save("d" * 5000)  # a caller that is not a visitor: only the server's limits
    clock.now += 360  # a tenth of the hour: 100 bytes back
    store.save("e" * 150, visitor="1.2.3.4")
    monkeypatch.setenv("TABWRITE_DOC_BYTES_PER_VISITOR_PER_HOUR", "0")  # 0: no limit
    unlimited = DocumentStore(tmp_path / "u.sqlite3", new_docs_per_visitor_per_min=0)
    for _ in range(12):
        unlimited.save("x" * 1_000_000, visitor="1.2.3.4")
