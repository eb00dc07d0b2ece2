"""Limits at the HTTP layer, before Gradio parses anything: the size of a request's body.

Gradio puts no limit on a request body: a 500 MB JSON text would be read, parsed and handed
to a handler. Every route here (server functions, the API, the queue, uploads) goes through
``BodyLimit`` first; a body over the limit gets 413 and one line, and is never read whole.
"""

from __future__ import annotations

import json
import os

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
