#!/usr/bin/env python3
"""ModelGate: one OpenAI-compatible endpoint and one token in front of Ollama and, if you want, OpenAI.

All in this one file; it needs uvicorn and httpcore[asyncio] at run time and nothing else.

    python modelgate.py               # reads ./.env if present, serves on HOST:PORT (0.0.0.0:8010)
    uvicorn modelgate:app --port 8010 --no-proxy-headers

Routes (every one but /health and preflights wants `Authorization: Bearer <MODELGATE_TOKEN>`):

    POST /v1/chat/completions   plain or `"stream": true` (SSE relayed chunk by chunk)
    POST /v1/embeddings
    GET  /v1/models             Ollama's models as `ollama/<name>`, OpenAI's as `openai/<name>`
    GET  /v1/models/{id}
    GET  /health                liveness, no upstream call
    OPTIONS <any route>         CORS preflight

`model: "ollama/<name>"` goes to Ollama and `"openai/<name>"` to OpenAI with the prefix removed; any other
model goes to DEFAULT_PROVIDER unchanged. Environment (read once at start-up):

    MODELGATE_TOKEN          required; comma-separated for several apps or for rotation
    DEFAULT_PROVIDER         ollama | openai                       (ollama)
    OLLAMA_BASE_URL          Ollama's OpenAI-compatible base URL   (http://127.0.0.1:11434/v1)
    OLLAMA_API_KEY           Bearer token sent to Ollama, if set   (empty)
    OPENAI_API_KEY           enables the openai provider           (empty: nothing goes to OpenAI)
    OPENAI_BASE_URL          any OpenAI-compatible base URL        (https://api.openai.com/v1)
    TIMEOUT_SECONDS          longest wait for the next upstream bytes (120)
    CONNECT_TIMEOUT_SECONDS  longest wait to open an upstream connection (10)
    MAX_BODY_BYTES           larger request bodies get 413         (16777216)
    CORS_ALLOW_ORIGINS       comma-separated origins, * for any    (*)
    HOST, PORT               where `python modelgate.py` listens   (0.0.0.0, 8010)
"""

from __future__ import annotations

import asyncio
import hmac
import json
import json.decoder
import json.scanner
import logging
import math
import os
import random
import re
import ssl
import sys
import time
from collections import deque
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Awaitable, Callable, Mapping, MutableMapping
from urllib.parse import urlsplit

import h11  # comes with httpcore and uvicorn; only its error class is named here
import httpcore

__version__ = "1.0.0"
__license__ = "MIT"
__all__ = ["app"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

log = logging.getLogger("modelgate")


###############################################################################
# Configuration ###############################################################
###############################################################################

PROVIDERS = ("ollama", "openai")

# Where each provider's settings live, so that messages can name the variable to check.
URL_VARIABLE = {"ollama": "OLLAMA_BASE_URL", "openai": "OPENAI_BASE_URL"}
KEY_VARIABLE = {"ollama": "OLLAMA_API_KEY", "openai": "OPENAI_API_KEY"}

DEFAULTS = {
    "DEFAULT_PROVIDER": "ollama",
    "OLLAMA_BASE_URL": "http://127.0.0.1:11434/v1",
    "OPENAI_BASE_URL": "https://api.openai.com/v1",
    # Long enough for Ollama to load a model from disk before it sends the first byte (its own
    # OLLAMA_LOAD_TIMEOUT is 5 minutes; cline raised a 30 s limit to 5 min for the same reason).
    "TIMEOUT_SECONDS": "120",
    "CONNECT_TIMEOUT_SECONDS": "10",
    # A chat with a few base64 images fits; OpenAI itself takes up to 20 MB per image request.
    "MAX_BODY_BYTES": str(16 * 1024 * 1024),
    "CORS_ALLOW_ORIGINS": "*",
    "HOST": "0.0.0.0",
    "PORT": "8010",
}

TOKEN_HELP = 'generate one with: python -c "import secrets; print(secrets.token_urlsafe(32))"'


class ConfigError(Exception):
    """A setting is missing or wrong; the message names the variable."""


@dataclass(frozen=True)
class Config:
    tokens: tuple[bytes, ...]
    default_provider: str
    ollama_base_url: str
    ollama_api_key: str
    openai_base_url: str
    openai_api_key: str
    timeout: float
    connect_timeout: float
    max_body_bytes: int
    cors_allow_origins: frozenset[str]  # {"*"} allows any origin
    host: str
    port: int


def load_config(environ: Mapping[str, str] = os.environ) -> Config:
    """Read and check every setting once; raise ConfigError naming the first bad one."""

    def get(name: str) -> str:
        # Spaces, tabs and the CR of a .env saved on Windows; not str.strip()'s control characters.
        return environ.get(name, DEFAULTS.get(name, "")).strip(" \t\r\n")

    tokens = tuple(t.strip() for t in get("MODELGATE_TOKEN").split(",") if t.strip())
    if not tokens:
        raise ConfigError(f"MODELGATE_TOKEN is empty: set it to the token clients must send; {TOKEN_HELP}")
    for token in tokens:
        if not all("!" <= c <= "~" for c in token):
            raise ConfigError("MODELGATE_TOKEN may only hold printable ASCII without spaces; " + TOKEN_HELP)
    default_provider = get("DEFAULT_PROVIDER").lower()
    if default_provider not in PROVIDERS:
        raise ConfigError(f"DEFAULT_PROVIDER must be ollama or openai, not {default_provider!r}")
    openai_api_key = get("OPENAI_API_KEY")
    if default_provider == "openai" and not openai_api_key:
        raise ConfigError("DEFAULT_PROVIDER is openai but OPENAI_API_KEY is empty: set the key or use ollama")
    return Config(
        tokens=tuple(t.encode() for t in tokens),
        default_provider=default_provider,
        ollama_base_url=_base_url("OLLAMA_BASE_URL", get("OLLAMA_BASE_URL")),
        ollama_api_key=_header_value("OLLAMA_API_KEY", get("OLLAMA_API_KEY")),
        openai_base_url=_base_url("OPENAI_BASE_URL", get("OPENAI_BASE_URL")),
        openai_api_key=_header_value("OPENAI_API_KEY", openai_api_key),
        timeout=_seconds("TIMEOUT_SECONDS", get("TIMEOUT_SECONDS")),
        connect_timeout=_seconds("CONNECT_TIMEOUT_SECONDS", get("CONNECT_TIMEOUT_SECONDS")),
        max_body_bytes=_positive_int("MAX_BODY_BYTES", get("MAX_BODY_BYTES")),
        cors_allow_origins=frozenset(o.strip() for o in get("CORS_ALLOW_ORIGINS").split(",") if o.strip()),
        host=get("HOST"),
        port=_port(get("PORT")),
    )


def _base_url(name: str, value: str) -> str:
    try:
        url = urlsplit(value)
        _ = url.port  # raises ValueError for a port that is not a number or out of range
    except ValueError:
        raise ConfigError(f"{name} is not a valid URL: {value!r}") from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(f"{name} must look like http://host:port/v1, not {value!r}")
    if url.username is not None or url.password is not None:
        raise ConfigError(f"{name} must not hold credentials; put the key in {name[:-8]}API_KEY")
    if url.query or url.fragment:
        raise ConfigError(f"{name} must not have a query or fragment: {value!r}")
    return value.rstrip("/")


def _header_value(name: str, value: str) -> str:
    if not all(" " <= c <= "~" for c in value):
        raise ConfigError(f"{name} may only hold printable ASCII")
    return value


def _seconds(name: str, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, not {value!r}") from None
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ConfigError(f"{name} must be more than 0 seconds, not {value!r}")
    return seconds


def _positive_int(name: str, value: str) -> int:
    if not value.isdigit() or int(value) == 0:
        raise ConfigError(f"{name} must be a whole number above 0, not {value!r}")
    return int(value)


def _port(value: str) -> int:
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise ConfigError(f"PORT must be a number from 1 to 65535, not {value!r}")
    return int(value)


def read_dotenv(path: str, environ: MutableMapping[str, str]) -> None:
    """Add KEY=VALUE lines of a .env file to environ; variables already set win."""
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.removeprefix("export ").partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not key.isidentifier():
                raise ConfigError(f"{path} line {number}: expected KEY=VALUE")
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            else:
                value = re.split(r"\s+#", value, maxsplit=1)[0]
            environ.setdefault(key, value)


###############################################################################
# Errors ######################################################################
###############################################################################

# Every status ModelGate chooses itself is chosen here: situation -> (status, OpenAI error type, code).
# Besides these, an upstream's own error status is passed through unchanged (see upstream_error), and a
# client that leaves early is logged as 499, as nginx and Caddy do; it is never sent.
ERRORS: dict[str, tuple[int, str, str | None]] = {
    "invalid_request": (400, "invalid_request_error", "invalid_request"),
    "provider_not_configured": (400, "invalid_request_error", "provider_not_configured"),
    "unauthorized": (401, "authentication_error", "invalid_api_key"),
    "not_found": (404, "invalid_request_error", "not_found"),
    "model_not_found": (404, "invalid_request_error", "model_not_found"),
    "method_not_allowed": (405, "invalid_request_error", "method_not_allowed"),
    "body_too_large": (413, "invalid_request_error", "request_too_large"),
    "internal": (500, "api_error", "internal_error"),
    "upstream_unavailable": (502, "api_error", "upstream_unavailable"),
    # Our own pool to that upstream is full: we are the ones who are busy, so 503, not a gateway timeout.
    "gateway_busy": (503, "api_error", "gateway_busy"),
    "upstream_timeout": (504, "api_error", "upstream_timeout"),
}

# How an httpcore failure before the response started is told to the client, first match wins
# (httpcore's map_exceptions, Caddy's statusError). {name} is the provider, {url} its URL variable.
UPSTREAM_FAILURES: tuple[tuple[type[Exception], str, str], ...] = (
    (httpcore.PoolTimeout, "gateway_busy", "All connections to {name} are in use; try again shortly."),
    (httpcore.ConnectTimeout, "upstream_timeout",
     "Could not connect to {name} within CONNECT_TIMEOUT_SECONDS. Check that it is running and {url} is right."),
    (httpcore.TimeoutException, "upstream_timeout",
     "{name} did not answer within TIMEOUT_SECONDS. The model may still be loading: try again, "
     "or raise TIMEOUT_SECONDS."),
    (httpcore.ConnectError, "upstream_unavailable",
     "Could not connect to {name}: refused or unreachable. Check that it is running and {url} is right."),
    (httpcore.RemoteProtocolError, "upstream_unavailable",
     "{name} closed the connection or did not answer with HTTP. Check that {url} points at its API."),
    (httpcore.NetworkError, "upstream_unavailable", "The connection to {name} broke before it answered."),
)

# The reason phrase for a status, for messages only ("503 Service Unavailable").
PHRASES = {status.value: status.phrase for status in HTTPStatus}


class GatewayError(Exception):
    """A failure answered before the response started; `situation` is a key of ERRORS."""

    def __init__(self, situation: str, message: str, headers: Headers | None = None) -> None:
        super().__init__(message)
        self.situation = situation
        self.message = message
        self.headers = headers or []


def error_body(message: str, type_: str, code: str | None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


def upstream_failure(exc: Exception, name: str, in_status_line: bool = False) -> GatewayError:
    """Translate an httpcore exception into the error the client gets."""
    for exc_type, situation, message in UPSTREAM_FAILURES:
        if isinstance(exc, exc_type):
            headers = []
            # A status line that h11 rejects is not HTTP at all (an SSH port, say): a retry gets the same.
            if in_status_line and isinstance(exc.__cause__, h11.RemoteProtocolError):
                headers = [(b"x-should-retry", b"false")]
            return GatewayError(situation, message.format(name=name, url=URL_VARIABLE[name]), headers)
    raise exc  # not an upstream failure: answered as 500


# The httpcore exceptions that mean "the upstream failed", as opposed to a bug of ours.
UPSTREAM_EXCEPTIONS = tuple(exc_type for exc_type, _, _ in UPSTREAM_FAILURES)


###############################################################################
# Auth ########################################################################
###############################################################################


def authorized(authorization: bytes, tokens: tuple[bytes, ...]) -> bool:
    """True when the header is `Bearer <one of the tokens>`, compared in constant time."""
    scheme, _, token = authorization.partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    token = token.strip()
    match = False
    for expected in tokens:  # no early exit: the time taken does not tell which token matched
        match |= hmac.compare_digest(token, expected)
    return match


###############################################################################
# Routing #####################################################################
###############################################################################


def route_model(model: str, config: Config) -> tuple[str, str]:
    """(provider, upstream model name): only the first `/` decides."""
    prefix, slash, name = model.partition("/")
    if not slash or prefix not in PROVIDERS:
        return config.default_provider, model
    if prefix == "openai" and not config.openai_api_key:
        raise GatewayError(
            "provider_not_configured",
            f"Model {model!r} asks for OpenAI, but this gateway has no OPENAI_API_KEY. "
            "Use an ollama/ model, or ask the gateway's owner to set OPENAI_API_KEY.",
        )
    if not name:
        raise GatewayError("invalid_request", f"Model {model!r} names no model after {prefix}/.")
    return prefix, name


_WHITESPACE = re.compile(r"[ \t\n\r]*")
_scan_value = json.scanner.make_scanner(json.JSONDecoder())


def replace_model(text: str, prefix: str, name: str) -> str:
    """Put `name` in place of the top-level "model" string of a JSON object, all else byte for byte.

    The text has already been parsed by json.loads, so it is well formed. Like json.loads, the last
    "model" key wins. Nested "model" keys (in a json_schema, say) are left alone.
    """
    ws = _WHITESPACE.match
    at, span = ws(text, 0).end() + 1, (0, 0)
    while (at := ws(text, at).end()) < len(text) and text[at] != "}":
        key, at = json.decoder.scanstring(text, at + 1)
        at = ws(text, ws(text, at).end() + 1).end()  # past the ':'
        _, end = _scan_value(text, at)
        if key == "model":
            span = (at, end)
        at = ws(text, end).end()
        at += text[at] == ","
    start, end = span
    value = text[start:end]
    if value.startswith(f'"{prefix}/'):  # the usual case: cut the prefix, keep the rest as sent
        value = '"' + value[len(prefix) + 2:]
    else:  # the prefix was written with escapes, such as "ollama\/x"
        value = json.dumps(name, ensure_ascii=False)
    return text[:start] + value + text[end:]


###############################################################################
# Upstream forwarding #########################################################
###############################################################################

# Hop-by-hop headers (RFC 9110 §7.6.1, with the RFC 2616 §13.5.1 names Go's reverse proxy keeps for
# backward compatibility, including the non-standard Proxy-Connection that libcurl still sends).
# They describe one connection and never cross the gateway, in either direction, nor does any header
# that a Connection header names.
HOP_BY_HOP = frozenset({
    b"connection", b"proxy-connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
    b"te", b"trailer", b"transfer-encoding", b"upgrade",
})

# What of the client's request reaches an upstream: nothing but these (Go's ProxyRequest, one-api's
# fresh request). Authorization is the gateway's own token, Cookie/Origin/Referer are the browser's,
# Host is ours (Ollama answers a foreign Origin or Host with an empty 403), X-Forwarded-* are unchecked.
FORWARDED_REQUEST_HEADERS = frozenset({b"content-type", b"accept", b"user-agent"})

# What of an upstream's response does not reach the client, besides hop-by-hop headers:
# uvicorn writes its own Date (and Server, if enabled), we compute Content-Length, CORS is ours,
# and an upstream's cookies belong to its domain, not ours.
DROPPED_RESPONSE_HEADERS = frozenset({b"content-length", b"date", b"server", b"set-cookie", b"alt-svc"})

# The most of an upstream error body that we read; the message shown to people is cut much shorter.
MAX_ERROR_BODY = 64 * 1024
MAX_ERROR_TEXT = 400

# 512 is the depth of Ollama's own queue (OLLAMA_MAX_QUEUE): more connections could only wait there.
POOL_CONNECTIONS = 512
# An idle upstream connection is dropped after 4 s, before the 5 s idle limit of uvicorn and Node
# servers, so that we never send a request on a connection the server is closing at that moment.
KEEPALIVE_SECONDS = 4.0


def connection_named(headers: Headers) -> frozenset[bytes]:
    """The hop-by-hop set plus every header a Connection header names (RFC 9110 §7.6.1)."""
    named = [
        token.strip().lower()
        for name, value in headers if name.lower() == b"connection"
        for token in value.split(b",")
    ]
    return HOP_BY_HOP.union(named) if named else HOP_BY_HOP


def response_headers(headers: Headers) -> Headers:
    """An upstream's response headers as the client may see them, order and duplicates kept."""
    drop = connection_named(headers)
    kept = []
    for name, value in headers:
        name = name.lower()
        if name not in drop and name not in DROPPED_RESPONSE_HEADERS and not name.startswith(b"access-control-"):
            kept.append((name, value))
    return kept


class Stream(asyncio.Protocol, httpcore.AsyncNetworkStream):
    """One TCP (or TLS) connection as httpcore's HTTP/1.1 code uses it: read, write, close, with timeouts.

    httpcore's own backend goes through anyio, whose cancel scope around every read and write costs
    more than the read itself. This is the same contract on asyncio's protocol callbacks: incoming
    data waits in a list, a reader waits on one future, and a timeout is one timer.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.received: list[bytes] = []
        self.eof = False
        self.waiter: asyncio.Future | None = None  # a read waiting for data, or a write for the buffer to drain
        self.paused = False

    @classmethod
    async def connect(cls, host: str, port: int, tls: ssl.SSLContext | None, timeout: float) -> Stream:
        loop = asyncio.get_running_loop()
        try:
            _, stream = await asyncio.wait_for(loop.create_connection(cls, host, port, ssl=tls), timeout)
        except asyncio.TimeoutError:
            raise httpcore.ConnectTimeout(f"no connection within {timeout} s") from None
        except OSError as exc:  # refused, unreachable, unknown host, TLS failure (ssl.SSLError)
            raise httpcore.ConnectError(str(exc)) from exc
        return stream

    # asyncio.Protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received.append(data)
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self._wake()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def _wait(self, timeout: float | None, timeout_error: type[Exception]) -> None:
        loop = asyncio.get_running_loop()
        self.waiter = waiter = loop.create_future()
        timer = None
        if timeout is not None:
            timer = loop.call_later(timeout, lambda: waiter.done() or waiter.set_exception(
                timeout_error(f"nothing for {timeout} s")))
        try:
            await waiter
        finally:
            self.waiter = None
            if timer is not None:
                timer.cancel()

    # httpcore.AsyncNetworkStream

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if not self.received and not self.eof:
            await self._wait(timeout, httpcore.ReadTimeout)
        if not self.received:
            return b""  # end of stream
        data = self.received.pop(0)
        if len(data) > max_bytes:
            self.received.insert(0, data[max_bytes:])
            data = data[:max_bytes]
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if self.transport.is_closing():
            raise httpcore.WriteError("the connection is closed")
        self.transport.write(buffer)
        if self.paused:
            await self._wait(timeout, httpcore.WriteTimeout)

    async def aclose(self) -> None:
        self.transport.close()

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":  # asked of an idle connection: anything to read means the server hung up
            return bool(self.received) or self.eof
        return self.transport.get_extra_info(info)


class Connection(httpcore.AsyncHTTP11Connection):
    """httpcore's HTTP/1.1 connection, without the lock around its state.

    The lock guards a connection shared by concurrent requests, as in httpcore's pool. Ours hands a
    connection to one request at a time, and anyio's lock costs a trip through the event loop on
    every acquire, twice per request. Should httpcore rename the attribute, this only gets slower.
    """

    def __init__(self, origin: httpcore.Origin, stream: Stream, keepalive_expiry: float) -> None:
        super().__init__(origin, stream, keepalive_expiry)
        self._state_lock = NO_LOCK


class NoLock:
    async def __aenter__(self) -> None:
        pass

    async def __aexit__(self, *exc_info: Any) -> None:
        pass


NO_LOCK = NoLock()


class PooledStream:
    """A response body that gives its connection back to the pool when it is closed."""

    def __init__(self, pool: Pool, connection: Connection, stream: Any) -> None:
        self.pool, self.connection, self.stream = pool, connection, stream

    def __aiter__(self) -> Any:
        return self.stream.__aiter__()

    async def aclose(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            try:
                await self.stream.aclose()  # h11 decides: ready for the next request, or closed
            finally:
                pool.checkin(self.connection)


class Pool:
    """Keep-alive HTTP/1.1 connections to one upstream: a stack of idle ones and a cap on the total.

    httpcore's AsyncConnectionPool serves any origin and HTTP/2, and so re-examines every connection it
    holds on every request; with a few hundred connections most of the gateway's time went there. One
    origin and HTTP/1.1 need less: the idle connection used last is the one most likely still open.
    A request owns its connection from checkout until its response is closed, so a cancellation at
    any point, even while the connection opens, leaves nothing half-done in shared state (the trap
    of httpcore PRs #1094/#1099). httpcore's AsyncHTTP11Connection still speaks the protocol.
    """

    def __init__(self, scheme: bytes, host: bytes, port: int, limit: int) -> None:
        self.origin = httpcore.Origin(scheme, host, port)
        self.host, self.port = host.decode("ascii"), port
        self.tls = ssl.create_default_context() if scheme == b"https" else None
        self.idle: deque[Connection] = deque()  # oldest first
        self.slots = asyncio.Semaphore(limit)
        self.in_use = 0

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        timeouts = request.extensions["timeout"]
        if self.slots.locked():  # all in use: wait for one, as long as for a connection
            try:
                await asyncio.wait_for(self.slots.acquire(), timeouts["pool"])
            except asyncio.TimeoutError:
                raise httpcore.PoolTimeout("every connection is in use") from None
        else:
            await self.slots.acquire()
        self.in_use += 1
        try:
            connection = self.checkout()
            if connection is None:
                stream = await Stream.connect(self.host, self.port, self.tls, timeouts["connect"])
                connection = Connection(self.origin, stream, KEEPALIVE_SECONDS)
            response = await connection.handle_async_request(request)
        except BaseException:
            self.release()  # httpcore has closed the connection, or it never opened
            raise
        response.stream = PooledStream(self, connection, response.stream)
        return response

    def checkout(self) -> Connection | None:
        while self.idle:
            connection = self.idle.pop()
            if not connection.has_expired():
                return connection
            connection._network_stream.transport.close()
        return None

    def checkin(self, connection: Connection) -> None:
        self.release()
        if connection.is_idle():
            self.idle.append(connection)
        while self.idle and self.idle[0].has_expired():  # the oldest first: close what outlived keep-alive
            self.idle.popleft()._network_stream.transport.close()

    def release(self) -> None:
        self.in_use -= 1
        self.slots.release()

    async def aclose(self) -> None:
        while self.idle:
            await self.idle.pop().aclose()


class Upstream:
    """One provider: where it lives, the key it wants, and its connection pool."""

    def __init__(self, name: str, base_url: str, api_key: str, config: Config) -> None:
        url = urlsplit(base_url)
        self.name = name
        self.scheme = url.scheme.encode()
        self.host = url.hostname.encode("idna")
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.path = url.path.rstrip("/").encode()
        self.authority = url.netloc.encode("idna")
        self.auth = [(b"authorization", b"Bearer " + api_key.encode())] if api_key else []
        self.extensions = {"timeout": {
            "connect": config.connect_timeout, "pool": config.connect_timeout,
            "read": config.timeout, "write": config.timeout,
        }}
        self.pool = Pool(self.scheme, self.host, self.port, POOL_CONNECTIONS)

    def request(self, method: bytes, path: bytes, client_headers: Headers, body: bytes = b"") -> httpcore.Request:
        """Build the outbound request explicitly from the few client headers that may travel."""
        drop = connection_named(client_headers)
        headers = [(b"host", self.authority), (b"accept-encoding", b"identity")]
        for name, value in client_headers:
            name = name.lower()
            if name in FORWARDED_REQUEST_HEADERS and name not in drop:
                headers.append((name, value))
        headers += self.auth
        if method == b"POST":
            headers.append((b"content-length", b"%d" % len(body)))
        url = httpcore.URL(scheme=self.scheme, host=self.host, port=self.port, target=self.path + path)
        return httpcore.Request(method, url, headers=headers, content=body, extensions=self.extensions)

    async def send(self, request: httpcore.Request) -> httpcore.Response:
        try:
            return await self.pool.handle_async_request(request)
        except UPSTREAM_EXCEPTIONS as exc:
            raise upstream_failure(exc, self.name, in_status_line=True) from exc

    async def read(self, response: httpcore.Response, limit: int | None = None) -> bytes:
        """The whole body (or its first `limit` bytes); failures as in send()."""
        chunks, size = [], 0
        try:
            async for chunk in response.stream:
                chunks.append(chunk)
                size += len(chunk)
                if limit is not None and size >= limit:
                    break
        except UPSTREAM_EXCEPTIONS as exc:
            raise upstream_failure(exc, self.name) from exc
        return b"".join(chunks)

    async def get_json(self, path: bytes, client_headers: Headers) -> Any:
        """GET a JSON document; an error status raises UpstreamStatus."""
        response = await self.send(self.request(b"GET", path, client_headers))
        try:
            body = await self.read(response, None if response.status < 400 else MAX_ERROR_BODY)
        finally:
            await response.aclose()
        if response.status >= 400:
            raise UpstreamStatus(*upstream_error(self.name, response.status, response.headers, body))
        try:
            return json.loads(body)
        except ValueError:
            raise GatewayError("upstream_unavailable", f"{self.name} answered {path.decode()} with something "
                               f"that is not JSON. Check that {URL_VARIABLE[self.name]} points at its API.") from None


class UpstreamStatus(Exception):
    """An upstream answered with an error status; carries the response to pass on."""

    def __init__(self, status: int, headers: Headers, body: bytes) -> None:
        super().__init__(status)
        self.status, self.headers, self.body = status, headers, body


# The OpenAI error type for an upstream error status whose body we had to wrap ourselves.
UPSTREAM_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                        404: "not_found_error", 429: "rate_limit_error"}


def upstream_error(name: str, status: int, headers: Headers, body: bytes) -> tuple[int, Headers, bytes]:
    """An upstream error response as the client gets it: same status, OpenAI-shaped JSON body.

    A body that already is `{"error": {...}}` passes unchanged; anything else is wrapped, its text as
    the message, so that tools which show `error.message` (FluentRead) or parse JSON (openai-translator)
    tell the user what the upstream said.
    """
    kept = response_headers(headers)
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if isinstance(document, dict) and isinstance(document.get("error"), dict):
        return status, kept, body
    text = ""
    if isinstance(document, dict):  # Ollama's native {"error": "..."}, FastAPI's {"detail": "..."}
        text = next((document[k] for k in ("error", "message", "detail") if isinstance(document.get(k), str)), "")
    if not text and document is None:
        text = body.decode("utf-8", "replace")
    text = " ".join(text.split())
    if len(text) > MAX_ERROR_TEXT:
        text = text[:MAX_ERROR_TEXT] + "…"
    phrase = f"{status} {PHRASES.get(status, '')}".strip()
    message = f"{name} answered {phrase}: {text}" if text else f"{name} answered {phrase} with an empty body."
    if status in (401, 403):
        message += f" Check {KEY_VARIABLE[name]}."
    kept = [(k, v) for k, v in kept if k not in (b"content-type", b"content-encoding")]
    kept.append((b"content-type", b"application/json"))
    return status, kept, error_body(message, UPSTREAM_ERROR_TYPES.get(status, "api_error"), None)


def ends_with_done(tail: bytes) -> bool:
    """True when the last SSE event of a stream is `data: [DONE]`."""
    events = tail.replace(b"\r\n", b"\n").rstrip(b"\n").rsplit(b"\n\n", 1)
    return events[-1].strip() in (b"data: [DONE]", b"data:[DONE]")


def is_event_stream(headers: Headers) -> bool:
    for name, value in headers:
        if name.lower() == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"text/event-stream"
    return False


###############################################################################
# The ASGI application ########################################################
###############################################################################

JSON = (b"content-type", b"application/json")
CORS_METHODS = b"GET, POST, OPTIONS"
# Headers the openai SDKs and translation tools send; echoed requests are checked against this shape.
CORS_DEFAULT_HEADERS = b"authorization, content-type, user-agent, accept, x-requested-with, openai-beta"
HEADER_LIST = re.compile(rb"[A-Za-z0-9!#$%&'*+.^_`|~, -]*")
# Chromium caps a preflight cache at two hours; asking for more is ignored.
CORS_MAX_AGE = b"7200"
PUBLIC_PATHS = frozenset({"/health"})
SSE_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
SSE_HEADER_NAMES = frozenset(name for name, _ in SSE_HEADERS)


class Exchange:
    """One request and its answer: what the handlers need and what the log line says."""

    __slots__ = ("method", "path", "headers", "body", "receive", "send", "cors", "request_id",
                 "status", "provider", "model", "bytes_out", "ttfb", "started", "error", "t0")

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.headers: Headers = scope["headers"]
        self.body = b""
        self.receive, self.send = receive, send
        self.cors: Headers = []
        self.request_id = b"%024x" % random.getrandbits(96)  # for finding a request in logs, not a secret
        self.status = 0
        self.provider = self.model = "-"
        self.bytes_out = 0
        self.ttfb: float | None = None
        self.started = False  # http.response.start has been sent
        self.error = ""
        self.t0 = time.perf_counter()

    def header(self, name: bytes) -> bytes:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return b""

    async def start(self, status: int, headers: Headers) -> None:
        self.status, self.started = status, True
        upstream_id = next((v for k, v in headers if k == b"x-request-id"), None)
        if upstream_id is None:
            headers.append((b"x-request-id", self.request_id))
        else:
            self.request_id = upstream_id
        await self.send({"type": "http.response.start", "status": status, "headers": headers + self.cors})

    async def body_chunk(self, chunk: bytes, more: bool = True) -> None:
        self.bytes_out += len(chunk)
        await self.send({"type": "http.response.body", "body": chunk, "more_body": more})

    async def respond(self, status: int, headers: Headers, body: bytes) -> None:
        headers.append((b"content-length", b"%d" % len(body)))
        await self.start(status, headers)
        await self.body_chunk(body, more=False)

    async def fail(self, error: GatewayError) -> None:
        status, type_, code = ERRORS[error.situation]
        self.error = error.situation
        await self.respond(status, [JSON, *error.headers], error_body(error.message, type_, code))


class ClientGone(Exception):
    """The client disconnected before its answer was complete."""


class DisconnectWatch:
    """Cancels the handler's task when the client disconnects, until stop() is called.

    uvicorn's send() does not raise once the client is gone; only receive() says so. So while we wait
    on an upstream we also wait on receive(), and stop the upstream request the moment the client
    leaves, so that Ollama stops generating for nobody.
    """

    def __init__(self, receive: Receive) -> None:
        self.task = asyncio.current_task()
        self.gone = self.stopped = False
        self.watcher = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not self.stopped:
            self.gone = True
            self.task.cancel()

    def stop(self) -> None:
        self.stopped = True
        self.watcher.cancel()

    def __enter__(self) -> DisconnectWatch:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.stop()
        if self.gone and exc_type is asyncio.CancelledError:
            if sys.version_info >= (3, 11):
                self.task.uncancel()  # the cancellation was ours, and it is handled here
            raise ClientGone from None


class Gateway:
    """The ASGI application. Config and pools are set by lifespan startup and never changed after."""

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        self.environ = environ
        self.config: Config | None = None
        self.upstreams: dict[str, Upstream] = {}
        self.routes: dict[str, dict[str, Callable[[Exchange], Awaitable[None]]]] = {
            "/v1/chat/completions": {"POST": self.completions},
            "/v1/embeddings": {"POST": self.completions},
            "/v1/models": {"GET": self.models},
            "/v1/models/": {"GET": self.model},  # prefix: /v1/models/{id}
            "/health": {"GET": self.health},
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self.lifespan(receive, send)

    # Lifespan ------------------------------------------------------------------

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self.startup()
                except ConfigError as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for upstream in self.upstreams.values():
                    await upstream.pool.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def startup(self) -> None:
        config = load_config(self.environ)
        if not log.handlers:  # under a bare `uvicorn modelgate:app`; main() sets it up itself
            setup_logging()
        self.upstreams = {"ollama": Upstream("ollama", config.ollama_base_url, config.ollama_api_key, config)}
        if config.openai_api_key:
            self.upstreams["openai"] = Upstream("openai", config.openai_base_url, config.openai_api_key, config)
        self.config = config
        log.info("ModelGate %s: default provider %s; providers: %s", __version__, config.default_provider,
                 ", ".join(self.upstreams))

    # HTTP ----------------------------------------------------------------------

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        ex = Exchange(scope, receive, send)
        try:
            try:
                await self.dispatch(ex)
            except GatewayError as error:
                await ex.fail(error)
            except UpstreamStatus as error:
                ex.error = "upstream_status"
                await ex.respond(error.status, error.headers, error.body)
            except ClientGone:
                ex.status = 499
        except Exception:
            log.exception("unexpected error in %s %s", ex.method, ex.path)
            if ex.started:
                raise  # all we can do is abort the response: uvicorn closes the connection
            ex.error = "internal"
            await ex.fail(GatewayError("internal", "ModelGate failed unexpectedly; its log says why."))
        finally:
            log_exchange(ex)

    async def dispatch(self, ex: Exchange) -> None:
        config = self.config
        if config is None:
            raise GatewayError("internal", "ModelGate was started without the ASGI lifespan; run it with "
                               "`python modelgate.py` or uvicorn's default --lifespan auto.")
        origin = ex.header(b"origin")
        if origin:
            ex.cors = cors_headers(config, origin)
        methods = self.routes.get(ex.path)
        if methods is None and ex.path.startswith("/v1/models/"):
            methods = self.routes["/v1/models/"]
        if methods is None:
            raise GatewayError("not_found", not_found_message(ex.path))
        if ex.method == "OPTIONS":
            return await self.preflight(ex, methods)
        handler = methods.get(ex.method)
        if handler is None:
            allow = ", ".join([*methods, "OPTIONS"])
            raise GatewayError("method_not_allowed", f"{ex.path} takes {allow}, not {ex.method}.",
                               [(b"allow", allow.encode())])
        if ex.path not in PUBLIC_PATHS and not authorized(ex.header(b"authorization"), config.tokens):
            raise GatewayError("unauthorized", "Missing or wrong token. Send the gateway's token as "
                               "`Authorization: Bearer <token>` (the API key field of your app).")
        await handler(ex)

    async def preflight(self, ex: Exchange, methods: dict) -> None:
        headers = [(b"allow", ", ".join([*methods, "OPTIONS"]).encode())]
        if ex.cors and ex.header(b"access-control-request-method"):
            requested = ex.header(b"access-control-request-headers")
            if not requested or not HEADER_LIST.fullmatch(requested):
                requested = CORS_DEFAULT_HEADERS
            headers += [(b"access-control-allow-methods", CORS_METHODS),
                        (b"access-control-allow-headers", requested),
                        (b"access-control-max-age", CORS_MAX_AGE)]
        await ex.start(204, headers)
        await ex.body_chunk(b"", more=False)

    async def read_body(self, ex: Exchange) -> None:
        limit = self.config.max_body_bytes
        too_large = GatewayError("body_too_large", f"The request body is larger than this gateway accepts "
                                 f"({limit} bytes, MAX_BODY_BYTES).")
        length = ex.header(b"content-length")
        if length.isdigit() and int(length) > limit:
            raise too_large  # without reading it
        chunks, size, more = [], 0, True
        while more:
            message = await ex.receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
            more = message.get("more_body", False)
        ex.body = b"".join(chunks)

    # Handlers ------------------------------------------------------------------

    async def health(self, ex: Exchange) -> None:
        await ex.respond(200, [JSON], b'{"status":"ok"}')

    async def completions(self, ex: Exchange) -> None:
        """POST /v1/chat/completions and /v1/embeddings: route by model, relay the answer."""
        await self.read_body(ex)
        try:
            text = ex.body.decode("utf-8")
            document = json.loads(text)
        except ValueError as exc:  # UnicodeDecodeError is a ValueError too
            raise GatewayError("invalid_request", f"The request body is not valid JSON ({exc}).") from None
        if not isinstance(document, dict):
            raise GatewayError("invalid_request", "The request body must be a JSON object.")
        model = document.get("model")
        if not isinstance(model, str) or not model:
            raise GatewayError("invalid_request", "The request body needs a `model` string, "
                               "such as \"ollama/qwen2.5:7b\".")
        ex.model = model
        ex.provider, name = route_model(model, self.config)
        body = ex.body
        if name != model:
            body = replace_model(text, ex.provider, name).encode()
        upstream = self.upstreams[ex.provider]
        path = ex.path.removeprefix("/v1").encode()
        request = upstream.request(b"POST", path, ex.headers, body)
        await self.relay(ex, upstream, request, stream=document.get("stream") is True)

    async def relay(self, ex: Exchange, upstream: Upstream, request: httpcore.Request, stream: bool) -> None:
        """Send one request upstream and its answer back, watching for the client to leave.

        1. Until the upstream's status line and headers arrive, a failure is an error answer (502/504).
        2. An upstream error status is answered with that status and an OpenAI-shaped body.
        3. A stream request answered with an event stream is relayed chunk by chunk (relay_events).
        4. Anything else is read whole and sent with its Content-Length.
        """
        with DisconnectWatch(ex.receive) as watch:
            response = await upstream.send(request)
            try:
                if response.status >= 400:
                    body = await upstream.read(response, MAX_ERROR_BODY)
                    status, headers, body = upstream_error(upstream.name, response.status, response.headers, body)
                    ex.error = "upstream_status"
                elif stream and is_event_stream(response.headers):
                    return await self.relay_events(ex, upstream, response, watch)
                else:
                    status, headers, body = response.status, response_headers(response.headers), \
                        await upstream.read(response)
            finally:
                await response.aclose()
        await ex.respond(status, headers, body)

    async def relay_events(self, ex: Exchange, upstream: Upstream, response: httpcore.Response,
                           watch: DisconnectWatch) -> None:
        """Relay an SSE stream as it arrives: one ASGI body message per upstream chunk, nothing held back.

        A stream that breaks off, or ends without `data: [DONE]`, gets one error event instead of
        [DONE], so that no client takes a cut answer for a whole one.
        """
        headers = [h for h in response_headers(response.headers) if h[0] not in SSE_HEADER_NAMES]
        await ex.start(response.status, headers + SSE_HEADERS)
        tail, failure = b"", ""
        try:
            async for chunk in response.stream:
                if ex.ttfb is None:
                    ex.ttfb = time.perf_counter() - ex.t0
                await ex.body_chunk(chunk)
                tail = (tail + chunk)[-64:]
        except UPSTREAM_EXCEPTIONS as exc:
            failure = "went silent for TIMEOUT_SECONDS" if isinstance(exc, httpcore.TimeoutException) else "broke off"
            ex.error = f"upstream_stream_error ({type(exc).__name__}: {exc})"
        else:
            if not ends_with_done(tail):
                failure = "ended without data: [DONE]"
                ex.error = "upstream_stream_error (no [DONE])"
        watch.stop()
        if failure:
            event = error_body(f"The answer was cut off: the stream from {upstream.name} {failure}. Try again.",
                               "api_error", "upstream_stream_error")
            await ex.body_chunk(b"data: " + event + b"\n\n")
        await ex.body_chunk(b"", more=False)

    async def models(self, ex: Exchange) -> None:
        """GET /v1/models: every provider's list, ids prefixed; a provider that fails is left out."""
        ex.provider = "+".join(self.upstreams)
        with DisconnectWatch(ex.receive):
            results = await asyncio.gather(*(self.list_models(u, ex.headers) for u in self.upstreams.values()),
                                           return_exceptions=True)
        data, failures = [], []
        for result in results:
            if isinstance(result, list):
                data += result
            elif isinstance(result, (GatewayError, UpstreamStatus)):
                failures.append(result)
            else:
                raise result
        if len(failures) == len(results):  # all down: say why, rather than list nothing
            raise failures[0]
        await ex.respond(200, [JSON], json.dumps({"object": "list", "data": data}).encode())

    async def list_models(self, upstream: Upstream, headers: Headers) -> list[dict]:
        document = await upstream.get_json(b"/models", headers)
        items = document.get("data") if isinstance(document, dict) else None
        return [{**item, "id": f"{upstream.name}/{item['id']}"} for item in items or ()
                if isinstance(item, dict) and isinstance(item.get("id"), str)]

    async def model(self, ex: Exchange) -> None:
        """GET /v1/models/{id}: one model of the provider the id routes to, or 404."""
        ex.model = ex.path.removeprefix("/v1/models/")
        ex.provider, name = route_model(ex.model, self.config)
        upstream = self.upstreams[ex.provider]
        with DisconnectWatch(ex.receive):
            models = await self.list_models(upstream, ex.headers)
        wanted = f"{upstream.name}/{name}"
        for item in models:
            if item["id"] == wanted:
                return await ex.respond(200, [JSON], json.dumps(item).encode())
        raise GatewayError("model_not_found", f"Model {ex.model!r} was not found on {upstream.name}. "
                           "GET /v1/models lists the models you can use.")


def cors_headers(config: Config, origin: bytes) -> Headers:
    """Access-Control-Allow-Origin for an allowed origin; nothing (but no refusal) for another."""
    if "*" in config.cors_allow_origins:
        return [(b"access-control-allow-origin", b"*"), (b"access-control-expose-headers", b"x-request-id")]
    if origin.decode("latin-1") in config.cors_allow_origins:
        return [(b"access-control-allow-origin", origin), (b"access-control-expose-headers", b"x-request-id"),
                (b"vary", b"origin")]
    return []


def not_found_message(path: str) -> str:
    hint = ""
    if path.startswith("/api/"):
        hint = " ModelGate speaks the OpenAI API under /v1, not Ollama's native /api."
    elif not path.startswith("/v1/") and path in ("/chat/completions", "/embeddings", "/models"):
        hint = f" Did you mean /v1{path}? Base URLs end in /v1."
    return f"There is no {path} here.{hint} Routes: /v1/chat/completions, /v1/embeddings, /v1/models."


def log_exchange(ex: Exchange) -> None:
    # log: one line per request; never bodies, tokens, keys or the Authorization header.
    ms = (time.perf_counter() - ex.t0) * 1000
    ttfb = f" ttfb={ex.ttfb * 1000:.0f}ms" if ex.ttfb is not None else ""
    error = f" error={ex.error}" if ex.error else ""
    log.info("%s %s %d %s %s %.0fms %dB%s%s id=%s", ex.method, ex.path, ex.status, ex.provider, ex.model,
             ms, ex.bytes_out, ttfb, error, ex.request_id.decode() or "-")


def setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


app = Gateway()


###############################################################################
# Command line ################################################################
###############################################################################


def main() -> None:
    """python modelgate.py: read ./.env, check the settings, serve with uvicorn."""
    try:
        if os.path.exists(".env"):
            read_dotenv(".env", os.environ)
        config = load_config(os.environ)
    except (ConfigError, OSError, UnicodeDecodeError) as exc:
        sys.exit(f"modelgate: {exc}")
    import uvicorn  # only the command line needs it; `uvicorn modelgate:app` brings its own

    setup_logging()
    uvicorn.run(
        app, host=config.host, port=config.port,
        access_log=False,  # we log one line per request ourselves
        server_header=False,
        proxy_headers=False,  # X-Forwarded-For is not trusted: the client address is the peer's
    )


if __name__ == "__main__":
    main()
