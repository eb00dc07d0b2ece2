"""Suggestions from a model that runs on a serving engine: any OpenAI-compatible completions server.

    python app.py --backend openai --endpoint http://gpu-box:8000   # vLLM, TGI, llama.cpp's server

``OpenAICompletionsBackend`` is a Backend (models/core.py) like models/engine.py's
``SuggestionEngine``: the start and the end of a press, the rows and their rules are the same
code (models/core.py); only where the tokens come from differs. So the editor's features stay
what they are:

- **increasing lengths**: the rows are sampled with the press's temperature, top-k and top-p and
  cut into suggestions exactly as the local engine cuts them (a newline ends a row; a row stops
  at a word / CJK boundary once it has its target number of tokens, or at its hard cap);
- **one request or one per row**: a server that returns ``n`` choices for one request (vLLM,
  OpenAI) samples all rows together; one that ignores or refuses ``n`` (llama.cpp's servers,
  TGI) gets one request per row, shortest first, each with its own ``max_tokens``;
- **streaming**: the answer is read as server-sent events and ``on_update`` gets the rows done so far;
- **time budget and cancel**: the connection is closed when the budget is spent or the writer
  typed on (checked between chunks and every 50 ms); closing it frees the server's slot;
- **errors**: refused connections, HTTP errors and malformed answers become one-line
  ``EngineError``s that name the endpoint;
- **the API key** ($TABWRITE_API_KEY) goes as ``Authorization: Bearer`` with every request,
  ``/v1/models`` and the start-up probes included, and never into a message: one a header
  cannot carry (a line break, a space, non-ASCII) is refused before any request, and a server
  that echoes it back in an error has it replaced by ``[API key]``.

What a server supports is learnt once, at start, from a few 8-token requests (``probe``): whether it
honours ``n``, whether it accepts the non-standard sampling fields ``top_k`` and ``min_tokens``,
and whether it returns log-probabilities at little cost (llama-cpp-python's server sorts the
whole vocabulary in Python for each token it reports them for: 20x slower on Gemma's 262k
tokens, so there suggestions come without the confidence bar and the perplexity view says why).

Only the standard library is used (http.client, one reader thread per request): importing
this module imports no torch (scoring's server half is models/scoring.py ``score_remote``).
"""

from __future__ import annotations

import http.client
import json
import math
import queue
import re
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Callable

from models import scoring, textcut
from models.core import MARKUP, Ask, Backend, EngineError, Row, SuggestResult, collect, repeats
from models.registry import ModelNotFound
from models.settings import Settings

_CHARS_PER_TOKEN = 4  # for cutting the prompt without the server's tokenizer (a CJK character counts 1 token)
_POLL_S = 0.05  # how often a waiting request checks the time budget and cancellation
_CONNECT_TIMEOUT_S = 10.0
_SCORE_TIMEOUT_S = 120.0  # per scoring window


def cut_prompt(text: str, context_tokens: int) -> tuple[str, bool]:
    """The end of ``text`` worth about ``context_tokens`` tokens, and whether anything was cut.

    Without the server's tokenizer a token is taken to be 4 characters, or one CJK character.
    Like the engine's window, the start moves in quarter-window steps (the server's prefix
    cache then keeps hitting while the writer types) and then on to the next word.
    """
    cost, i = 0.0, len(text)
    while i > 0:
        step = 1.0 if textcut.is_cjk(text[i - 1]) else 1.0 / _CHARS_PER_TOKEN
        if cost + step > context_tokens:
            break
        cost, i = cost + step, i - 1
    if i == 0:
        return text, False
    max_chars = len(text) - i
    step_chars = max(1, max_chars // 4)
    start = min(len(text), math.ceil(i / step_chars) * step_chars)
    space = re.search(r"\s", text[start : start + 64])
    if space is not None:
        start += space.end()  # do not begin with half a word
    return text[start:], True


def _split_blanks(prompt: str) -> tuple[str, str]:
    """The prompt without the writer's trailing blanks, and those blanks.

    A model writes the space before a word itself (" lazy"); a prompt that ends in a space makes
    it start oddly (a second space, a split word). The local engine heals the last token; here
    the blanks are taken off the prompt and off the start of each continuation instead.
    """
    stripped = prompt.rstrip(" \t")
    if not stripped or stripped.endswith("\n"):
        return prompt, ""
    return stripped, prompt[len(stripped):]


class ServerRow(Row):
    """A row read from a server's stream: text arrives as pieces, with the writer's trailing blanks to skip."""

    def __init__(self, target: int, blanks: str):
        super().__init__(target)
        self.blanks, self.raw = blanks, ""

    def take(self, piece: str, tokens: int, logprobs: list) -> None:
        """The next ``piece`` of text the server sent, ``tokens`` tokens long."""
        self.raw += piece
        raw = self.raw.lstrip(" \t") if self.blanks else self.raw  # the writer already typed the blank
        text = textcut.clean_control(textcut.utf8_safe(raw))
        control = MARKUP.search(text)
        if control is not None:
            text = text[: control.start()]
            final = text  # like the engine's stop tokens: the row ends before it
        else:
            final = self.ending(text, self.tokens + tokens)
        self.add(text, tokens, logprobs)
        self.final = final


class ServerAnswerError(EngineError):
    """The server answered with an HTTP error (as opposed to not answering at all)."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


_KEY_VAR = "$TABWRITE_API_KEY"
_KEY_SHOWN = "[API key]"
_BEARER = re.compile(r"(bearer\s+)(?!\[API key\])[^\s\"',;]+", re.IGNORECASE)


def check_api_key(api_key: str | None) -> str | None:
    """The key to send (surrounding blanks taken off; None for none), or EngineError, which never shows it.

    A header value is one line of visible ASCII: http.client refuses anything else with a
    ValueError whose message holds the whole header, and a line break would start a header of
    its own (the key's second line sent as a header of the writer's choosing).
    """
    key = (api_key or "").strip(" \t\r\n")
    if not key:
        return None
    if all("!" <= c <= "~" for c in key):
        return key
    if any(c in "\r\n" for c in key):
        what = "a line break"
    elif any(c in " \t" for c in key):
        what = "a space or tab" + (" (give the key alone, without 'Bearer ')" if key.lower().startswith("bearer ") else "")
    elif any(ord(c) > 126 for c in key):
        what = "a non-ASCII character"
    else:
        what = "a control character"
    raise EngineError(f"the API key in {_KEY_VAR} has characters an HTTP header cannot carry ({what}); set it to the key alone")


@dataclass(frozen=True)
class RemoteDevice:
    """What the status line shows where a local engine shows "cpu" or "cuda": the server's host."""

    type: str


@dataclass
class ServerFeatures:
    """What the server does with the request fields beyond the basic ones (learnt by ``probe``)."""

    choices: bool = True  # honours n > 1 in one request
    sampling_extras: bool = True  # accepts top_k and min_tokens
    logprobs: bool = True  # returns logprobs, and at little cost
    note: str = ""  # why logprobs are off, for the start-up line

    def describe(self) -> str:
        parts = [
            "n choices per request" if self.choices else "one request per suggestion",
            "top_k" if self.sampling_extras else "no top_k",
            "logprobs" if self.logprobs else f"no logprobs{f' ({self.note})' if self.note else ''}",
        ]
        return ", ".join(parts)


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _server_message(status: int, body: bytes, redact: Callable[[str], str] = lambda text: text) -> str:
    """The error message in a server's JSON error answer (OpenAI, vLLM, TGI, FastAPI shapes).

    ``redact`` runs on the whole message before it is cut to one line, so that no part of a
    secret the server echoes back (the API key) survives the cut.
    """
    try:
        data = json.loads(body.decode("utf-8", "replace"))
    except ValueError:
        data = None
    message = None
    if isinstance(data, dict):
        error = data.get("error")
        message = (error.get("message") if isinstance(error, dict) else error) or data.get("message") or data.get("detail")
    if not message:
        message = body.decode("utf-8", "replace").strip() or http.client.responses.get(status, "")
    message = redact(str(message)).strip()
    # Servers put stack traces after the message (llama-cpp-python): the first line is the message.
    return _one_line(message.splitlines()[0] if message else "")


class _Stream:
    """One streaming POST, read by a thread into ``events``.

    Events: ("chunk", dict), ("done", None) after ``data: [DONE]``, ("eof", None) when the
    connection ends without it, ("error", EngineError).
    """

    def __init__(self, backend: "OpenAICompletionsBackend", path: str, body: dict, timeout: float):
        self.events: queue.Queue = queue.Queue()
        self._backend = backend
        self._closed = False
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, args=(path, body, timeout), daemon=True)
        self._thread.start()

    def _run(self, path: str, body: dict, timeout: float) -> None:
        backend = self._backend
        conn = None
        try:
            conn = backend._connection(timeout)
            conn.connect()
            with self._lock:
                if self._closed:
                    return
                self._sock = conn.sock
            conn.request("POST", path, body=json.dumps(body).encode("utf-8"), headers=backend._headers(stream=True))
            response = conn.getresponse()
            if response.status >= 400:
                message = _server_message(response.status, response.read(4000), backend._redact)
                self._put("error", backend._http_error(path, response.status, message))
                return
            data: list[bytes] = []
            while True:
                line = response.readline()
                if not line:
                    if not (data and self._dispatch(b"\n".join(data))):
                        self._put("eof", None)  # closed without [DONE]: the server failed mid-stream
                    return
                line = line.rstrip(b"\r\n")
                if line.startswith(b"data:"):
                    data.append(line[5:].lstrip(b" "))
                elif not line and data:
                    if self._dispatch(b"\n".join(data)):
                        return
                    data = []
                # anything else (": ping", "event: ...") is not data
        except EngineError as e:
            self._put("error", e)
        except Exception as e:  # OSError, HTTPException, ...: one line for the writer
            self._put("error", backend._connection_error(e))
        finally:
            if conn is not None:
                conn.close()

    def _dispatch(self, data: bytes) -> bool:
        """Queue one event; True when the stream is over."""
        if data.strip() == b"[DONE]":
            self._put("done", None)
            return True
        try:
            chunk = json.loads(data.decode("utf-8"))
        except ValueError:
            self._put("error", self._backend._malformed())
            return True
        if not isinstance(chunk, dict) or "error" in chunk:
            error = chunk.get("error") if isinstance(chunk, dict) else None
            message = error.get("message") if isinstance(error, dict) else error
            if message:
                message = _one_line(self._backend._redact(str(message)))
                self._put("error", EngineError(f"the model server at {self._backend.endpoint} failed: {message}"))
            else:
                self._put("error", self._backend._malformed())
            return True
        self._put("chunk", chunk)
        return False

    def _put(self, kind: str, payload) -> None:
        if not self._closed:
            self.events.put((kind, payload))

    def close(self) -> None:
        """Stop reading and drop the connection (the server then stops generating for it)."""
        with self._lock:
            self._closed = True
            sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the reader thread at once
            except OSError:
                pass


class OpenAICompletionsBackend(Backend):
    """A model served by an OpenAI-compatible ``/v1/completions`` endpoint."""

    def __init__(
        self,
        endpoint: str,
        model: str,
        models: list[str] | None = None,
        api_key: str | None = None,
        features: ServerFeatures | None = None,
    ):
        self.endpoint, self._scheme, self._host, self._port, self._base = self.parse_endpoint(endpoint)
        self.model = model
        self.models = list(models or [model])
        self._api_key = check_api_key(api_key)  # before any request: EngineError without the key
        self.features = features or ServerFeatures()
        self.device = RemoteDevice(f"{self._host}:{self._port}")
        self._siblings: dict[str, OpenAICompletionsBackend] = {model: self}

    # -- what the service and the page use

    @property
    def name(self) -> str:
        return self.model

    def __repr__(self) -> str:  # never shows the API key
        return f"OpenAICompletionsBackend({self.endpoint!r}, model={self.model!r})"

    def describe(self) -> str:
        return self.device.type  # the server's host:port

    def serve(self, stop: threading.Event | None = None) -> None:
        """Nothing runs here between requests: the calling thread only waits for ``stop``."""
        stop = stop or threading.Event()
        while not stop.wait(timeout=0.5):  # in slices, so Ctrl-C reaches the main thread
            pass

    def score(
        self, text: str, alternatives: int = scoring.ALTERNATIVES, on_progress: Callable[[float], None] | None = None,
        caller_gone: Callable[[], bool] | None = None,
    ) -> dict:
        return scoring.score_remote(self, text, alternatives, on_progress, caller_gone)

    def echo_logprobs(self, prompt: str, top: int) -> dict | None:
        """The server's ``logprobs`` of ``prompt`` read back (echo), with the ``top`` likeliest at each token."""
        _, data = self._request_json(
            "POST",
            "/v1/completions",
            {"model": self.model, "prompt": prompt, "max_tokens": 1, "echo": True, "logprobs": top, "temperature": 0.0},
            timeout=_SCORE_TIMEOUT_S,
        )
        try:
            return data["choices"][0]["logprobs"]
        except (KeyError, IndexError, TypeError):
            return None

    @classmethod
    def connect(
        cls, endpoint: str, model: str | None = None, api_key: str | None = None, logprobs: bool | None = None
    ) -> "OpenAICompletionsBackend":
        """Ask the server which models it serves, pick one, and learn what it supports.

        ``model``: the server's model id to use (default: the first it lists). ``logprobs``:
        None decides by measuring (on where they cost little), True / False forces them.
        Raises EngineError with one line when the server cannot be used.
        """
        backend = cls(endpoint, model or "", api_key=api_key)  # the key goes with /v1/models too
        served = backend.list_models()
        if model:
            if served and model not in served:
                raise EngineError(
                    f"the model server at {backend.endpoint} serves {', '.join(served)}, not '{model}' (see --model)"
                )
        elif served:
            model = served[0]
        else:
            raise EngineError(f"the model server at {backend.endpoint} lists no model; name one with --model")
        backend = cls(endpoint, model, served or [model], api_key)
        backend.features = backend.probe(logprobs)
        return backend

    def for_model(self, model: str | None) -> "OpenAICompletionsBackend":
        """The backend for another model on the same server (the settings panel's model box)."""
        model = (model or "").strip() or self.model
        if model not in self._siblings:
            if model not in self.models:
                raise ModelNotFound(f"the model server at {self.endpoint} serves {', '.join(self.models)}, not '{model}'")
            sibling = OpenAICompletionsBackend(self.endpoint, model, self.models, self._api_key, self.features)
            sibling._siblings = self._siblings
            self._siblings[model] = sibling
        return self._siblings[model]

    # -- HTTP

    @staticmethod
    def parse_endpoint(endpoint: str) -> tuple[str, str, str, int, str]:
        """(shown endpoint, scheme, host, port, base path) of a URL given with or without /v1."""
        raw = (endpoint or "").strip()
        if not raw:
            raise EngineError("no model server endpoint given (--endpoint URL or $TABWRITE_ENDPOINT)")
        if "://" not in raw:
            raw = "http://" + raw
        parts = urllib.parse.urlsplit(raw)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise EngineError(f"the endpoint must be an http:// or https:// URL, not {_one_line(endpoint, 80)!r}")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise EngineError(f"the endpoint {_one_line(endpoint, 80)!r} has an invalid port") from None
        base = parts.path.rstrip("/")
        if base.endswith("/v1"):
            base = base[: -len("/v1")]
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        shown = f"{parts.scheme}://{host}:{port}{base}"  # no user:password@, no query
        return shown, parts.scheme, parts.hostname, port, base

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._scheme == "https":
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=ssl.create_default_context())
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _headers(self, stream: bool = False) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream" if stream else "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _redact(self, text: str) -> str:
        """``text`` without the API key (a server may echo the Authorization header back)."""
        if not self._api_key:
            return text  # nothing secret was sent
        escaped = json.dumps(self._api_key)[1:-1]  # as a JSON string spells it
        for form in (self._api_key, escaped, escaped.replace("/", "\\/")):
            text = text.replace(form, _KEY_SHOWN)
        return _BEARER.sub(lambda m: m.group(1) + _KEY_SHOWN, text)  # "Bearer <what we sent>", also cut or changed

    def _connection_error(self, e: Exception) -> EngineError:
        if isinstance(e, ConnectionRefusedError):
            why = "connection refused"
        elif isinstance(e, socket.gaierror):
            why = "unknown host"
        elif isinstance(e, (socket.timeout, TimeoutError)):
            why = "no answer in time"
        elif isinstance(e, OSError):
            why = e.strerror or type(e).__name__
        else:
            why = f"{type(e).__name__}: {_one_line(self._redact(str(e)), 120)}"
        return EngineError(f"cannot reach the model server at {self.endpoint} ({why})")

    def _http_error(self, path: str, status: int, message: str) -> EngineError:
        if status in (401, 403):  # say which setting to look at
            message += f" ({'check' if self._api_key else 'no API key was sent: set'} {_KEY_VAR})"
        return ServerAnswerError(f"the model server at {self.endpoint} answered {status} to {path}: {message}", status)

    def _malformed(self) -> EngineError:
        return EngineError(f"the model server at {self.endpoint} sent an answer that is not an OpenAI completions stream")

    def _request_json(self, method: str, path: str, body: dict | None = None, timeout: float = _CONNECT_TIMEOUT_S):
        """One plain request; returns (status, decoded JSON or None)."""
        conn = self._connection(timeout)
        try:
            conn.request(
                method, self._base + path, body=None if body is None else json.dumps(body).encode("utf-8"), headers=self._headers()
            )
            response = conn.getresponse()
            payload = response.read()
        except Exception as e:
            raise self._connection_error(e) from None
        finally:
            conn.close()
        if response.status >= 400:
            if response.status == 404 and method == "GET":
                return response.status, None
            raise self._http_error(path, response.status, _server_message(response.status, payload, self._redact))
        try:
            return response.status, json.loads(payload.decode("utf-8"))
        except ValueError:
            raise EngineError(f"the model server at {self.endpoint} sent an answer to {path} that is not JSON") from None

    def list_models(self) -> list[str]:
        """Model ids from GET /v1/models ([] where the server has no such route)."""
        status, data = self._request_json("GET", "/v1/models")
        if data is None:
            return []
        entries = data.get("data") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise EngineError(f"the model server at {self.endpoint} sent a /v1/models answer without a model list")
        return [str(e["id"]) for e in entries if isinstance(e, dict) and e.get("id")]

    # -- requests

    def _body(self, prompt: str, settings: Settings, n: int, max_tokens: int, seed: int | None, logprobs: bool) -> dict:
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": int(max_tokens),
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if n > 1:
            body["n"] = n
        if self.features.sampling_extras:
            body["top_k"] = settings.top_k
            body["min_tokens"] = 1  # an empty suggestion is no suggestion (the engine forbids an early stop too)
        if logprobs:
            body["logprobs"] = 1
        if seed is not None:
            body["seed"] = int(seed)
        return body

    def _open(self, body: dict, timeout: float) -> _Stream:
        return _Stream(self, self._base + "/v1/completions", body, timeout)

    def probe(self, logprobs: bool | None = None) -> ServerFeatures:
        """Learn what the server supports from a few 8-token requests (about 4 s on llama-cpp-python's server)."""
        features = ServerFeatures()
        settings = Settings(temperature=1.0)
        attempts = [(True, 2), (True, 1), (False, 2), (False, 1)]  # (top_k and min_tokens, n)
        last_error: EngineError | None = None
        for extras, n in attempts:
            features.sampling_extras = extras
            self.features = features
            try:
                seen, _, _ = self._probe_once(settings, n, False)  # also warms the server up
            except ServerAnswerError as e:  # perhaps a field it refuses: try with fewer
                if e.status in (401, 403):  # not a field: the key
                    raise
                last_error = e
                continue
            features.choices = n > 1 and seen > 1
            break
        else:
            raise last_error  # type: ignore[misc]
        n = 2 if features.choices else 1
        if logprobs is not None:
            features.logprobs = logprobs
        else:
            try:
                _, costly, returned = self._probe_once(settings, n, True)
            except ServerAnswerError:
                costly, returned = 0.0, False
            if not returned:
                features.logprobs, features.note = False, "the server returns none"
            else:
                _, plain, _ = self._probe_once(settings, n, False)
                # llama-cpp-python sorts the whole vocabulary for every token it reports logprobs for.
                if costly > 2 * plain + 0.02:
                    features.logprobs = False
                    features.note = f"they cost {costly * 1000:.0f} ms per token on this server instead of {plain * 1000:.0f}"
        self.features = features
        return features

    def _probe_once(self, settings: Settings, n: int, logprobs: bool) -> tuple[int, float, bool]:
        """(choices seen, seconds per token after the first, whether logprobs came back)."""
        stream = self._open(self._body("The", settings, n, 8, 0, logprobs), _CONNECT_TIMEOUT_S + 30)
        indices: set[int] = set()
        times: list[float] = []
        got_logprobs = False
        try:
            while True:
                try:
                    kind, payload = stream.events.get(timeout=_CONNECT_TIMEOUT_S + 30)
                except queue.Empty:
                    raise EngineError(f"the model server at {self.endpoint} did not answer a test request in time") from None
                if kind == "error":
                    raise payload
                if kind in ("done", "eof"):
                    break
                for choice in payload.get("choices") or []:
                    if not isinstance(choice, dict):
                        raise self._malformed()
                    index = int(choice.get("index") or 0)
                    indices.add(index)
                    lp = choice.get("logprobs")
                    got_logprobs = got_logprobs or bool(isinstance(lp, dict) and lp.get("token_logprobs"))
                    if index == 0 and choice.get("text"):
                        times.append(time.perf_counter())
        finally:
            stream.close()
        if not indices:
            raise EngineError(f"the model server at {self.endpoint} returned no completion for a test request")
        gaps = sorted(b - a for a, b in zip(times, times[1:]))
        per_token = gaps[len(gaps) // 2] if gaps else 0.0  # the median: one stall does not count
        return len(indices), per_token, got_logprobs

    # -- one Tab press (models/core.py's Backend.suggest calls this)

    def produce(self, ask: Ask) -> None:
        """The rows from the server: one streamed request, or one per row; the connection is
        closed when the press runs out of time or is cancelled (checked every 50 ms)."""
        watch, result, settings = ask.watch, ask.result, ask.settings
        if watch.cancelled():
            result.cancelled = True
            return
        prompt, result.truncated = cut_prompt(ask.text, settings.context_tokens)
        prompt, blanks = _split_blanks(prompt)
        rows = [ServerRow(t, blanks) for t in ask.wanted]
        # All rows in one request where the server honours n, else one request per row, shortest first.
        groups = [list(range(len(rows)))] if self.features.choices else [[i] for i in range(len(rows))]
        for group in groups:
            body = self._body(
                prompt,
                settings,
                n=len(group),
                max_tokens=max(rows[i].cap for i in group),
                seed=None if ask.seed is None else int(ask.seed) + group[0],
                logprobs=self.features.logprobs,
            )
            if self._stream_rows(body, [rows[i] for i in group], rows, ask):
                break
        for row in rows:
            row.end()  # rows cut short by time or cancel end on a whole word
        result.suggestions = collect(rows)
        result.steps = max(row.tokens for row in rows)

    def _stream_rows(self, body: dict, group: list[ServerRow], rows: list[ServerRow], ask: Ask) -> bool:
        """Read one request's stream into ``group``'s rows. True when the press must stop (time, cancel)."""
        watch, result = ask.watch, ask.result
        stream = self._open(body, max(1.0, watch.left()) + _CONNECT_TIMEOUT_S)
        answered = False
        try:
            while True:
                if watch.cancelled() or watch.ask_caller():
                    result.cancelled = True
                    return True
                remaining = watch.left()
                if remaining <= 0:
                    result.timed_out = True
                    return True
                try:
                    kind, payload = stream.events.get(timeout=min(remaining, _POLL_S))
                except queue.Empty:
                    continue
                if kind == "error":
                    raise payload
                if kind == "eof" and not answered:
                    # llama-cpp-python fails this way after its 200, e.g. for a prompt longer than its context.
                    raise EngineError(
                        f"the model server at {self.endpoint} closed the connection without an answer (its log says why)"
                    )
                if kind in ("done", "eof"):
                    return False
                answered = True
                finished_now = self._read_chunk(payload, group, rows, result)
                result.steps = max(row.tokens for row in rows)
                if finished_now:
                    if result.first_ready_s is None:
                        result.first_ready_s = time.perf_counter() - watch.started
                    if ask.on_update is not None:
                        ask.on_update(collect(rows))  # for streaming: rows done so far
                if all(row.final is not None for row in group):
                    return False
        finally:
            stream.close()

    def _read_chunk(self, chunk: dict, group: list[ServerRow], rows: list[ServerRow], result: SuggestResult) -> bool:
        """Apply one streamed chunk; True when a row finished with it."""
        usage = chunk.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
            result.prompt_tokens = result.new_prompt_tokens = usage["prompt_tokens"]
        finished_now = False
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or not isinstance(choice.get("text", ""), str):
                raise self._malformed()
            index = choice.get("index") or 0
            if not isinstance(index, int) or not 0 <= index < len(group) or group[index].final is not None:
                continue  # a row already cut keeps streaming until the others are done
            row = group[index]
            piece = choice.get("text") or ""
            lp = choice.get("logprobs") if isinstance(choice.get("logprobs"), dict) else {}
            tokens = lp.get("tokens") if isinstance(lp.get("tokens"), list) else []
            values = lp.get("token_logprobs") if isinstance(lp.get("token_logprobs"), list) else []
            if piece or tokens:
                row.take(piece, len(tokens) or 1, values)
                if row.final is not None and repeats(rows, row, row.final, row.tokens < row.cap):
                    row.final = None  # the same as another suggestion: go on until it says something else
            if row.final is None and choice.get("finish_reason"):
                row.end(choice["finish_reason"])
            finished_now = finished_now or row.final is not None
        return finished_now
