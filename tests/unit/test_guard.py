"""The per-visitor request bucket (editor/guard.py RequestRate), on its own clock."""

from __future__ import annotations

from editor import guard
from editor.guard import RequestRate


def test_a_visitor_gets_the_burst_then_the_rate_and_others_are_not_touched():
    rate = RequestRate(app=None, rate=2.0, burst=5.0)
    assert [rate.allow("a", now=100.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert rate.allow("b", now=100.0)  # another visitor has a bucket of their own
    assert rate.allow("a", now=100.5) and not rate.allow("a", now=100.5)  # 2 a second: one more after 0.5 s
    assert [rate.allow("a", now=110.0) for _ in range(6)] == [True] * 5 + [False]  # full again, never more than the burst


def test_the_table_of_visitors_is_bounded(monkeypatch):
    monkeypatch.setattr(guard, "MAX_VISITORS_TRACKED", 100)
    rate = RequestRate(app=None, rate=1.0, burst=1.0)
    for n in range(1000):
        rate.allow(f"10.0.{n // 256}.{n % 256}", now=1.0)
    assert len(rate._buckets) == 100


def test_the_visitor_is_the_proxy_s_last_entry_only_when_a_proxy_is_trusted(monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("TABWRITE_TRUST_PROXY", raising=False)
    assert guard.visitor_address("127.0.0.1", "6.6.6.6") == "127.0.0.1"  # a client cannot name itself
    monkeypatch.setenv("TABWRITE_TRUST_PROXY", "1")
    assert guard.visitor_address("127.0.0.1", "6.6.6.6, 203.0.113.9") == "203.0.113.9"
    assert guard.visitor_address("", "") == "unknown"
    # Two proxies (a load balancer in front of the one next to the app): the outer one's entry.
    monkeypatch.setenv("TABWRITE_TRUST_PROXY", "2")
    assert guard.visitor_address("127.0.0.1", "6.6.6.6, 203.0.113.9, 10.0.0.5") == "203.0.113.9"
    assert guard.visitor_address("127.0.0.1", "10.0.0.5") == "10.0.0.5"  # fewer entries than proxies: the first
    monkeypatch.setenv("TABWRITE_TRUST_PROXY", "0")  # off, even on a Space
    monkeypatch.setenv("SPACE_ID", "someone/tabwrite")
    assert guard.visitor_address("127.0.0.1", "6.6.6.6") == "127.0.0.1"
    monkeypatch.delenv("TABWRITE_TRUST_PROXY")  # a Space without the setting: one proxy
    assert guard.visitor_address("127.0.0.1", "6.6.6.6, 203.0.113.9") == "203.0.113.9"
    monkeypatch.setenv("TABWRITE_TRUST_PROXY", "yes")  # not a count: as if unset
    assert guard.visitor_address("127.0.0.1", "6.6.6.6, 203.0.113.9") == "203.0.113.9"


def test_an_ipv6_host_is_one_visitor_whatever_address_of_its_64_it_uses(monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("TABWRITE_TRUST_PROXY", raising=False)
    one = {guard.visitor_address(f"2001:db8:aa:bb:{n:x}::{n + 1:x}", "") for n in range(1000)}
    assert one == {"2001:db8:aa:bb::/64"}
    assert guard.visitor_address("2001:db8:aa:bc::1", "") == "2001:db8:aa:bc::/64"  # the next /64: somebody else
    assert guard.visitor_address("::ffff:192.0.2.8", "") == "192.0.2.8"  # IPv4 written as IPv6
    assert guard.visitor_address("fe80::1%eth0", "") == "fe80::/64"
    assert guard.visitor_address("203.0.113.9", "") == "203.0.113.9"  # IPv4: each address, as before
    monkeypatch.setenv("TABWRITE_TRUST_PROXY", "1")  # the proxy's entry is grouped the same way
    assert guard.visitor_address("127.0.0.1", "1.1.1.1, 2001:DB8:aa:bb:ffff:ffff:ffff:ffff") == "2001:db8:aa:bb::/64"
    assert guard.visitor_address("127.0.0.1", "[2001:db8:aa:bb::7]:443") == "2001:db8:aa:bb::/64"
    assert guard.visitor_address("127.0.0.1", "not-an-address:at:all") == "not-an-address:at:all"
    # So one host cycling through its addresses draws on one request bucket.
    rate = RequestRate(app=None, rate=1.0, burst=5.0)
    monkeypatch.delenv("TABWRITE_TRUST_PROXY")
    allowed = [rate.allow(guard._scope_visitor({"client": (f"2001:db8:aa:bb::{n + 1:x}", 1)}), now=1.0) for n in range(20)]
    assert allowed == [True] * 5 + [False] * 15


# -- uploads (editor/guard.py UploadLimit) and bodies that do not say their length

import asyncio  # noqa: E402
import json  # noqa: E402
import threading  # noqa: E402

from editor.guard import BodyLimit, UploadLimit  # noqa: E402


def test_upload_budgets_per_visitor_and_for_the_server_refill_over_the_keeping_time():
    limit = UploadLimit(app=None, enabled=True, per_visitor=1000.0, total=2500.0, keep_s=100.0)
    assert limit.room("a", now=0.0)[0] == 1000
    limit.charge("a", 900, now=0.0)
    room, line = limit.room("a", now=0.0)
    assert room == 100 and line.startswith("Too much uploaded from your address")
    assert limit.room("a", now=50.0)[0] == 600  # 1000 bytes per 100 s come back
    assert limit.room("b", now=0.0)[0] == 1000  # another visitor has a budget of their own
    limit.charge("b", 1000, now=0.0)
    limit.charge("c", 500, now=0.0)
    room, line = limit.room("d", now=0.0)  # the server's 2500 are spent (900 + 1000 + 500): 100 left
    assert room == 100 and line.startswith("Too much uploaded to this server")
    limit.charge("a", -900, now=0.0)  # an upload that did not use what it reserved gives it back
    assert limit.room("a", now=0.0)[0] == 1000


def _call(middleware, path: str, chunks: list[bytes], headers: list | None = None) -> tuple[int, dict]:
    """One POST through ``middleware`` (ASGI, as uvicorn calls it): its status and JSON answer."""
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list[dict] = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": headers or [], "client": ("203.0.113.5", 1)}
    # On a thread of its own: where other tests left an event loop running on this one (the
    # browser tests' Playwright), asyncio.run refuses.
    runner = threading.Thread(target=lambda: asyncio.run(middleware(scope, receive, send)))
    runner.start()
    runner.join(30)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body)


async def _reads_its_body_like_fastapi(scope, receive, send):
    """An app that reads the whole body and answers 400 when reading fails (FastAPI's
    "There was an error parsing the body"), else 200 with its length."""
    size = 0
    try:
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        status, body = 200, {"size": size}
    except Exception:
        status, body = 400, {"detail": "There was an error parsing the body"}
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": data})


def test_a_chunked_body_past_the_limit_gets_413_whatever_the_app_makes_of_it():
    guard = BodyLimit(_reads_its_body_like_fastapi, max_bytes=1000)
    assert _call(guard, "/gradio_api/call/score", [b"x" * 400] * 2) == (200, {"size": 800})
    status, answer = _call(guard, "/gradio_api/call/score", [b"x" * 400] * 5)
    assert status == 413 and answer["error"].startswith("Request too large")


def test_uploads_are_refused_where_off_and_cut_off_past_the_budget():
    off = UploadLimit(_reads_its_body_like_fastapi, enabled=False)
    status, answer = _call(off, "/gradio_api/upload", [b"x" * 10])
    assert status == 403 and answer["error"].startswith("Uploads are off") and "\n" not in answer["error"]
    assert _call(off, "/gradio_api/queue/join", [b"{}"]) == (200, {"size": 2})  # nothing else is touched
    on = UploadLimit(_reads_its_body_like_fastapi, enabled=True, per_visitor=1000.0, total=10_000.0, keep_s=3600.0)
    assert _call(on, "/gradio_api/upload", [b"x" * 600]) == (200, {"size": 600})  # chunked: 600 of 1000 used
    status, answer = _call(on, "/gradio_api/upload/", [b"x" * 300] * 2)  # 600 more, unannounced: cut off at 400
    assert status == 429 and answer["error"].startswith("Too much uploaded from your address")
    status, _ = _call(on, "/gradio_api/upload", [b"x" * 500], headers=[(b"content-length", b"500")])
    assert status == 429  # refused before reading: it says more than is left
