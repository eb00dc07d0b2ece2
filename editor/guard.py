"""Limits at the HTTP layer, before Gradio parses anything: the size of a request's body, and
how many requests one visitor sends.

Gradio puts no limit on a request body: a 500 MB JSON text would be read, parsed and handed
to a handler. Every route here (server functions, the API, the queue, uploads) goes through
``BodyLimit`` first; a body over the limit gets 413 and one line, and is never read whole.

Nor on how often a visitor calls: each call costs the app's Python a few milliseconds before
any handler can refuse it, in the process whose one worker thread runs every Tab press. One
visitor opening 200 blank sessions at a time, ~90 requests a second, took the five normal
writers' p50 from 1.5 to 2.8 s (bench.load --hostile, the flood alone, 2-core EPYC). So
``RequestRate`` gives each visitor a bucket of POST requests (every API call, server function,
upload and queue join is one): $TABWRITE_REQUESTS_PER_S a second, $TABWRITE_REQUEST_BURST at
once; past it, 429 and one line, before Gradio reads the request.
"""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict

DEFAULT_MAX_REQUEST_BYTES = 3 * 2**20  # a saved document (1 MB of text by default) and its marks, JSON-escaped


def max_request_bytes() -> int:
    try:
        return max(64 * 1024, int(os.environ.get("TABWRITE_MAX_REQUEST_BYTES", DEFAULT_MAX_REQUEST_BYTES)))
    except ValueError:
        return DEFAULT_MAX_REQUEST_BYTES


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413, whether it says its length
    (Content-Length, refused before reading) or not (chunked, refused once past the limit)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        try:
            declared = int(length) if length is not None else None
        except ValueError:
            declared = None
        if declared is not None and declared > self.max_bytes:
            return await self._refuse(send)
        received = 0
        started = False

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message.get("type") == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge
            return message

        async def watched_send(message):
            nonlocal started
            if message.get("type") == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send) -> None:
        body = json.dumps(
            {"error": f"Request too large: the limit is {self.max_bytes // 1024} KB (TABWRITE_MAX_REQUEST_BYTES)."}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


# A writer's editor sends at most ~9 POSTs a second (a Tab press, then a progress poll every
# 120 ms until it is done); opening the page, a few dozen at once.
DEFAULT_REQUESTS_PER_S = 15.0
DEFAULT_REQUEST_BURST = 60.0
MAX_VISITORS_TRACKED = 10_000  # buckets kept (least recently seen dropped: a full bucket again)
TOO_MANY = "Too many requests from your address: at most {rate:g} a second. Wait a moment and try again."


def trust_proxy() -> bool:
    """Whether a proxy in front says who the client is (Hugging Face Spaces, or $TABWRITE_TRUST_PROXY=1)."""
    return bool(os.environ.get("SPACE_ID")) or os.environ.get("TABWRITE_TRUST_PROXY") == "1"


def visitor_address(host: str, forwarded: str) -> str:
    """Who is calling: the client's address, or behind a trusted proxy the address the proxy saw
    (the last X-Forwarded-For entry: the ones before it are whatever the client wrote)."""
    if trust_proxy():
        entries = [h.strip() for h in forwarded.split(",") if h.strip()]
        host = entries[-1] if entries else host
    return host[:64] or "unknown"


def _env_float(name: str, default: float) -> float:
    try:
        return max(0.0, float(os.environ.get(name, default)))
    except ValueError:
        return default


class RequestRate:
    """ASGI middleware: a token bucket of POST requests per visitor (``rate`` a second, ``burst``
    at once; rate 0 turns it off). Past it: 429 with one line and Retry-After, nothing read."""

    def __init__(self, app, rate: float | None = None, burst: float | None = None):
        self.app = app
        self.rate = _env_float("TABWRITE_REQUESTS_PER_S", DEFAULT_REQUESTS_PER_S) if rate is None else rate
        self.burst = max(1.0, _env_float("TABWRITE_REQUEST_BURST", DEFAULT_REQUEST_BURST) if burst is None else burst)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # visitor -> (tokens, when)

    def allow(self, visitor: str, now: float | None = None) -> bool:
        """Take one request from ``visitor``'s bucket; False when it is empty. (ASGI runs on one
        event loop thread: no lock needed.)"""
        now = time.monotonic() if now is None else now
        tokens, then = self._buckets.pop(visitor, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[visitor] = (tokens - 1.0 if allowed else tokens, now)
        while len(self._buckets) > MAX_VISITORS_TRACKED:
            self._buckets.popitem(last=False)
        return allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or self.rate <= 0:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        client = scope.get("client") or ("", 0)
        visitor = visitor_address(str(client[0] or ""), headers.get(b"x-forwarded-for", b"").decode("latin-1"))
        if self.allow(visitor):
            return await self.app(scope, receive, send)
        body = json.dumps({"error": TOO_MANY.format(rate=self.rate)}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 429,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"retry-after", b"1")],
            }
        )
        await send({"type": "http.response.body", "body": body})
