"""Limits at the HTTP layer, before Gradio parses anything: the size of a request's body, how
many requests one visitor sends, and uploads (``UploadLimit``, at the end).

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

import ipaddress
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


def _declared_length(scope) -> int | None:
    """The body's length as the request says it (Content-Length), or None (chunked, or nonsense)."""
    length = dict(scope.get("headers") or []).get(b"content-length")
    try:
        return int(length) if length is not None else None
    except ValueError:
        return None


async def _answer(send, status: int, line: str, headers: tuple = ()) -> None:
    """A JSON answer {"error": line}."""
    body = json.dumps({"error": line}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _bounded(app, scope, receive, send, max_bytes: int, refuse) -> int:
    """Run ``app`` with its request body cut off past ``max_bytes``; then the client gets
    ``refuse(send)``, whatever the app made of the cut (FastAPI answers a body it could not read
    with its own 400 "error parsing the body", so a chunked 8 MB body got 400, not 413).
    Returns the body's bytes received."""
    received = 0
    over = started = refused = False

    async def counted_receive():
        nonlocal received, over
        message = await receive()
        if message.get("type") == "http.request":
            received += len(message.get("body", b""))
            if received > max_bytes:
                over = True
                raise _TooLarge
        return message

    async def watched_send(message):
        nonlocal started, refused
        if over and not started:  # the app's answer to a body it did not get whole: ours instead
            started = refused = True
            await refuse(send)
        if refused:
            return
        if message.get("type") == "http.response.start":
            started = True
        await send(message)

    try:
        await app(scope, counted_receive, watched_send)
    except _TooLarge:
        pass
    if over and not started:
        await refuse(send)
    return received


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413, whether it says its length
    (Content-Length, refused before reading) or not (chunked, refused once past the limit)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _declared_length(scope)
        if declared is not None and declared > self.max_bytes:
            return await self._refuse(send)
        await _bounded(self.app, scope, receive, send, self.max_bytes, self._refuse)

    async def _refuse(self, send) -> None:
        await _answer(send, 413, f"Request too large: the limit is {self.max_bytes // 1024} KB (TABWRITE_MAX_REQUEST_BYTES).")


# A writer's editor sends at most ~9 POSTs a second (a Tab press, then a progress poll every
# 120 ms until it is done); opening the page, a few dozen at once.
DEFAULT_REQUESTS_PER_S = 15.0
DEFAULT_REQUEST_BURST = 60.0
MAX_VISITORS_TRACKED = 10_000  # buckets kept (least recently seen dropped: a full bucket again)
TOO_MANY = "Too many requests from your address: at most {rate:g} a second. Wait a moment and try again."


def trust_proxy() -> int:
    """How many proxies in front append to X-Forwarded-For, each the address it saw: 0 for none
    (the default), $TABWRITE_TRUST_PROXY (1 to 9: a proxy behind another one is 2), or 1 on a
    Hugging Face Space when that is not set."""
    value = os.environ.get("TABWRITE_TRUST_PROXY", "").strip()
    if value.isdigit():
        return min(int(value), 9)
    return 1 if os.environ.get("SPACE_ID") else 0


def visitor_address(host: str, forwarded: str) -> str:
    """Who is calling: the client's address, or behind N trusted proxies the address the
    outermost one saw (the Nth X-Forwarded-For entry from the end: those before it are whatever
    the client wrote; with fewer entries than that, the first).

    An IPv6 address counts as its /64: that is what one customer's line or one server usually
    gets (RFC 6177; hosting providers hand out a /64 per machine), and one host picks any
    address in it at will (privacy extensions change it daily), so per address, one host would
    be 2^64 visitors, each with its own request rate, presses, sessions and save budgets. An
    IPv4 address written as IPv6 (::ffff:a.b.c.d) is that IPv4 address. (Parsing an IPv6
    address costs ~15 us a request, against the few ms Gradio spends on one.)
    """
    hops = trust_proxy()
    if hops:
        entries = [h.strip() for h in forwarded.split(",") if h.strip()]
        host = entries[-min(hops, len(entries))] if entries else host
    return _grouped(host.strip()[:64]) or "unknown"


def _grouped(host: str) -> str:
    """An IPv6 address as its /64 network ("2001:db8:1:2::/64"); anything else as given."""
    if ":" not in host:
        return host
    try:
        bare = host[1:].partition("]")[0] if host.startswith("[") else host  # "[addr]:port"
        address = ipaddress.IPv6Address(bare.partition("%")[0])  # a zone (fe80::1%eth0) is the same host
    except ValueError:
        return host
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((address, 64), strict=False))


def _scope_visitor(scope) -> str:
    """visitor_address for an ASGI request."""
    headers = dict(scope.get("headers") or [])
    client = scope.get("client") or ("", 0)
    return visitor_address(str(client[0] or ""), headers.get(b"x-forwarded-for", b"").decode("latin-1"))


def _env_float(name: str, default: float) -> float:
    try:
        return max(0.0, float(os.environ.get(name, default)))
    except ValueError:
        return default


class _Buckets:
    """Token buckets by key: each holds up to ``capacity`` and refills ``capacity`` per ``refill_s``
    seconds; a key not seen has a full one. At most MAX_VISITORS_TRACKED are kept, the least
    recently used dropped (a full bucket again). ASGI runs on one event loop thread: no lock."""

    def __init__(self, capacity: float, refill_s: float):
        self.capacity, self.per_s = capacity, capacity / refill_s
        self._levels: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (level, when)

    def __len__(self) -> int:
        return len(self._levels)

    def left(self, key: str, now: float) -> float:
        level, then = self._levels.get(key, (self.capacity, now))
        return min(self.capacity, level + (now - then) * self.per_s)

    def take(self, key: str, n: float, now: float) -> None:
        """Take ``n`` from ``key``'s bucket (negative: give back)."""
        level = self.left(key, now) - n
        self._levels.pop(key, None)
        self._levels[key] = (level, now)
        while len(self._levels) > MAX_VISITORS_TRACKED:
            self._levels.popitem(last=False)


class RequestRate:
    """ASGI middleware: a token bucket of POST requests per visitor (``rate`` a second, ``burst``
    at once; rate 0 turns it off). Past it: 429 with one line and Retry-After, nothing read."""

    def __init__(self, app, rate: float | None = None, burst: float | None = None):
        self.app = app
        self.rate = _env_float("TABWRITE_REQUESTS_PER_S", DEFAULT_REQUESTS_PER_S) if rate is None else rate
        self.burst = max(1.0, _env_float("TABWRITE_REQUEST_BURST", DEFAULT_REQUEST_BURST) if burst is None else burst)
        self._buckets = _Buckets(self.burst, self.burst / self.rate if self.rate > 0 else float("inf"))

    def allow(self, visitor: str, now: float | None = None) -> bool:
        """Take one request from ``visitor``'s bucket; False when it is empty."""
        now = time.monotonic() if now is None else now
        allowed = self._buckets.left(visitor, now) >= 1.0
        self._buckets.take(visitor, 1.0 if allowed else 0.0, now)
        return allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or self.rate <= 0:
            return await self.app(scope, receive, send)
        if self.allow(_scope_visitor(scope)):
            return await self.app(scope, receive, send)
        await _answer(send, 429, TOO_MANY.format(rate=self.rate), ((b"retry-after", b"1"),))


# ---------------------------------------------------------------- uploads
# Gradio's upload route is open on every app, whether or not its page has a file box; it
# stores what it gets and answers with the server path, and nothing removed it: one address at
# the request rate (15 a second of 3 MB) fills 45 MB of disk a second. The only user of uploads
# is "Learn my style" (its .txt/.md box, editor/ui.py), so where that is off the route is
# refused; where it is on, each visitor, and the whole server, get a budget of bytes that
# refills over $TABWRITE_UPLOAD_KEEP_S, and Gradio deletes each upload once it is that old
# (editor/ui.py, gr.Blocks(delete_cache=upload_sweep())): at most about twice
# $TABWRITE_UPLOAD_BYTES on disk.

UPLOAD_PATHS = ("/gradio_api/upload", "/gradio_api/process_recording")  # every route that takes files
DEFAULT_UPLOAD_KEEP_S = 3600.0  # an upload is read when "Learn my style" is pressed, minutes after
DEFAULT_UPLOAD_BYTES_PER_VISITOR = 8 * 2**20  # a style reads 60,000 characters, of at most 20 files
DEFAULT_UPLOAD_BYTES = 256 * 2**20  # the whole server's
UPLOADS_OFF = "Uploads are off on this server: only Learn my style takes files, and it is off here (--personalize)."
UPLOADED_TOO_MUCH = "Too much uploaded from your address: at most {mb:.3g} MB {span}. Try again later."
SERVER_UPLOADED_TOO_MUCH = "Too much uploaded to this server: at most {mb:.3g} MB {span} from everyone. Try again later."


def upload_keep_s() -> float:
    return max(1.0, _env_float("TABWRITE_UPLOAD_KEEP_S", DEFAULT_UPLOAD_KEEP_S))


def upload_sweep() -> tuple[int, int]:
    """gr.Blocks' delete_cache: (how often to look, how old an upload may get), in seconds."""
    keep = int(upload_keep_s())
    return max(1, min(600, keep // 6)), keep


def is_upload(path: str) -> bool:
    return path.rstrip("/").endswith(UPLOAD_PATHS)


def _span(seconds: float) -> str:
    return "an hour" if seconds == 3600 else f"every {seconds:g} s"


class UploadLimit:
    """ASGI middleware for the routes that take files (UPLOAD_PATHS): refused (403, one line)
    unless ``enabled``; then each visitor may upload ``per_visitor`` bytes and everybody together
    ``total`` bytes, each budget refilling over ``keep_s``; past it, 429 and one line."""

    def __init__(self, app, enabled: bool, per_visitor: float | None = None, total: float | None = None,
                 keep_s: float | None = None):
        self.app, self.enabled = app, enabled
        self.per_visitor = (
            _env_float("TABWRITE_UPLOAD_BYTES_PER_VISITOR", DEFAULT_UPLOAD_BYTES_PER_VISITOR) if per_visitor is None else per_visitor
        )
        self.total = _env_float("TABWRITE_UPLOAD_BYTES", DEFAULT_UPLOAD_BYTES) if total is None else total
        self.keep_s = upload_keep_s() if keep_s is None else keep_s
        self._visitors = _Buckets(self.per_visitor, self.keep_s)  # bytes each visitor has left
        self._server = _Buckets(self.total, self.keep_s)  # everybody's, under the key ""

    def room(self, visitor: str, now: float | None = None) -> tuple[float, str]:
        """Bytes ``visitor`` may upload now, and the line to refuse with past them."""
        now = time.monotonic() if now is None else now
        mine, everyone = self._visitors.left(visitor, now), self._server.left("", now)
        if everyone < mine:
            return everyone, SERVER_UPLOADED_TOO_MUCH.format(mb=self.total / 2**20, span=_span(self.keep_s))
        return mine, UPLOADED_TOO_MUCH.format(mb=self.per_visitor / 2**20, span=_span(self.keep_s))

    def charge(self, visitor: str, n: float, now: float | None = None) -> None:
        """Take ``n`` bytes from ``visitor``'s budget and the server's (negative: give them back)."""
        now = time.monotonic() if now is None else now
        self._visitors.take(visitor, n, now)
        self._server.take("", n, now)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or not is_upload(scope.get("path", "")):
            return await self.app(scope, receive, send)
        if not self.enabled:
            return await _answer(send, 403, UPLOADS_OFF)
        visitor = _scope_visitor(scope)
        room, line = self.room(visitor)
        declared = _declared_length(scope)

        async def refuse(send):
            await _answer(send, 429, line, ((b"retry-after", b"60"),))

        if room < 1 or (declared is not None and declared > room):
            return await refuse(send)
        # Taken before it is read, so that uploads at once cannot each spend the same budget; a
        # body that did not say its length gives back what it did not use.
        reserved = declared if declared is not None else room
        self.charge(visitor, reserved)
        received = 0
        try:
            received = await _bounded(self.app, scope, receive, send, int(reserved), refuse)
        finally:
            if declared is None:
                self.charge(visitor, min(received, reserved) - reserved)
