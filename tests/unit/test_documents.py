"""The SQLite document store: ids, owner keys, marks, WAL mode, clear errors."""

from __future__ import annotations

import sqlite3

import pytest

from editor.documents import DocumentError, DocumentStore, clean_marks


@pytest.fixture()
def store(tmp_path):
    return DocumentStore(tmp_path / "docs.sqlite3")


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
    mode = sqlite3.connect(store.path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_clean_marks_sorts_merges_clamps_and_drops_garbage():
    assert clean_marks([[5, 9], [0, 3], [2, 4], [8, 20], ["x", 1], [7], None, [30, 40]], 12) == [[0, 4], [5, 12]]


def test_summaries_list_only_known_ids(store):
    a = store.save("First line\nsecond")
    store.save("other")
    listed = store.summaries([a["id"], "unknown"])
    assert [d["title"] for d in listed] == ["First line"]
