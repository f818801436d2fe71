#!/usr/bin/env python3
"""ModelGate: one token in front of every door of Ollama (its OpenAI API, its own API, Anthropic Messages)
and, if you want, OpenAI.

All in this one file, for Python 3.10 or later; it needs uvicorn and httpcore[asyncio] at run time and nothing else.

    python modelgate.py               # reads ./.env if present, serves on HOST:PORT (0.0.0.0:8010)
    python modelgate.py --check       # prints the start-up summary, asks each upstream once, exits 0 or 1
    python modelgate.py --help        # and --version
    uvicorn modelgate:app --port 8010 --no-proxy-headers --no-server-header --timeout-keep-alive 75

Unlike that uvicorn command, `python modelgate.py` closes connections that send no request head within
CLIENT_TIMEOUT_SECONDS, raises its limit on open files and reloads .env on SIGHUP (docs/deploy.md: Under uvicorn).

The module reads in the order a request travels, a banner over each section. The trust boundary, from its banner
down to "The app", holds everything that decides who may do what and what crosses the gateway, in one section,
which Gateway.dispatch passes every request through before its handler runs.

Routes (OPTIONS to any is a CORS preflight; all else but /, /health and /ready wants a token of MODELGATE_TOKEN,
sent as `Authorization: Bearer <token>`, as `x-api-key: <token>` or as the password of HTTP Basic):

    POST /v1/chat/completions, /v1/completions, /v1/responses   plain or `"stream": true` (SSE relayed chunk by chunk)
    POST /v1/embeddings, /v1/audio/transcriptions (a multipart form, routed by its `model` field, relayed byte for byte)
    GET  /v1/models, /v1/models/{id}  `ollama/<name>`, `openai/<name>`, the aliases: those TOKEN_MODELS lets a token use
    GET|HEAD /health            liveness, no upstream call
    GET|HEAD /ready             200 when an upstream of DEFAULT_PROVIDER answers, else 503
    GET  /metrics               Prometheus text format (an admin's token; none with METRICS_PUBLIC=1)
    GET  /usage                 the counts in USAGE_DB, a page or JSON: a token's own, OLLAMA_ADMIN_TOKENS' everyone's

    POST /v1/messages           Anthropic Messages, to Ollama's own /v1/messages (SSE with "stream": true)
    GET|HEAD /                  `Ollama is running`, as Ollama answers; a browser (Accept: text/html) gets a page
    POST /api/chat, /api/generate   Ollama's native API (OLLAMA_BASE_URL without /v1), NDJSON unless "stream": false
    POST /api/embed, /api/embeddings, /api/show
    GET|HEAD /api/tags, GET /api/ps  the models of every Ollama host that answers
    GET|HEAD /api/version       the first Ollama host that answers
    GET  /api/status            whether Ollama's cloud is on
    POST /api/pull, /api/push, /api/create, /api/copy, DELETE /api/delete, HEAD|POST /api/blobs/<digest>,
         /api/me, /api/signout, DELETE /api/user/keys/<key>      for OLLAMA_ADMIN_TOKENS only; 403 for the others
    POST /api/experimental/web_search, /api/experimental/web_fetch   for OLLAMA_CLOUD_TOKENS only; 403 for the others

A body in Content-Encoding gzip is decoded (never past MAX_BODY_BYTES) and forwarded decoded; any other is a 415.

`model: "ollama/<name>"` goes to Ollama and `"openai/<name>"` to OpenAI with the prefix removed; any other model goes
to DEFAULT_PROVIDER unchanged. Ollama's native API and Anthropic Messages lead to Ollama only: an `ollama/` prefix is
removed there too, and `openai/...` is a 400. An alias (MODEL_ALIASES) is replaced by its target first; then the
token's scope is checked (TOKEN_MODELS: 403, nothing sent), missing fields are filled in (MODEL_DEFAULTS) and fields
set (MODEL_OVERRIDES). The tokens used are counted per token name, provider and model from the upstream's own figures;
every chat or completions stream is asked for its usage, and a client that did not ask for it gets no usage event.
Environment (read once at start-up; SETTINGS below is the table):

    MODELGATE_TOKEN          required; comma-separated, each `token` or `name:token`
    DEFAULT_PROVIDER         ollama | openai                       (ollama)
    OLLAMA_BASE_URL          Ollama's OpenAI-compatible base URL(s), comma-separated (http://127.0.0.1:11434/v1)
    OLLAMA_API_KEY           Bearer token sent to Ollama, if set   (empty)
    OLLAMA_ADMIN_TOKENS      token names that may pull, push, create, copy and delete Ollama's models (empty: nobody)
    OLLAMA_CLOUD_TOKENS      token names that may use Ollama's cloud models and web search and fetch (empty: nobody)
    OPENAI_API_KEY           enables the openai provider           (empty: nothing goes to OpenAI)
    OPENAI_BASE_URL          any OpenAI-compatible base URL        (https://api.openai.com/v1)
    TIMEOUT_SECONDS          longest wait for the next upstream bytes (120)
    CONNECT_TIMEOUT_SECONDS  longest wait to open an upstream connection (10)
    CLIENT_TIMEOUT_SECONDS   longest wait for a client's request head, and for the next bytes of its body (30)
    MAX_BODY_BYTES           larger request bodies get 413         (16777216)
    CORS_ALLOW_ORIGINS       comma-separated origins, * for any    (*)
    RATE_LIMIT_RPM           requests per minute per token         (0: off)
    MAX_CONCURRENT_PER_TOKEN requests and streams in flight per token (0: off)
    ALLOWED_IPS              client addresses and networks let in  (empty: everyone)
    TRUSTED_PROXIES          peers whose X-Forwarded-For is believed (empty: none)
    COALESCE                 identical plain requests in flight share one upstream request (on)
    METRICS_PUBLIC           1: GET /metrics needs no token        (0)
    LOG_FORMAT               text | json                           (text)
    SHUTDOWN_GRACE_SECONDS   how long streams may finish after SIGTERM (30)
    HOST                     where `python modelgate.py` listens   (0.0.0.0)
    PORT                     the port it listens on                (8010)
    TLS_CERT_FILE            `python modelgate.py` serves HTTPS with this certificate (empty: plain HTTP)
    TLS_KEY_FILE             and this key                          (empty)
    MODEL_ALIASES            alias=target,...: model names tools ship with, for models you have (empty)
    TOKEN_MODELS             name=pattern|pattern,...: the models a token name may use (empty: any)
    TOKEN_QUOTAS             name=N,...: tokens (prompt + completion) a name may use a day, then 429 (empty: no quota)
    MODEL_DEFAULTS           {"pattern": {"field": value}, ...}: request fields added where absent (empty)
    MODEL_OVERRIDES          {"pattern": {"field": value}, ...}: request fields set, replacing the client's (empty)
    OLLAMA_NUM_PARALLEL      requests each Ollama host runs at once per model, more wait their turn; 0: no queue (1)
    TOKEN_SHARES             name=weight,...: turns in proportion when apps wait for a model (empty: every name 1)
    QUEUE_TIMEOUT_SECONDS    longest wait in ModelGate's queue, then 503 queue_timeout (300)
    USAGE_DB                 SQLite file of the usage counts; set to nothing: in memory only (modelgate-usage.sqlite3)
"""

from __future__ import annotations

import sys

# Before anything that needs 3.10 runs (`X | Y` between types, below): one line instead of a TypeError.
if sys.version_info < (3, 10):
    sys.exit("modelgate: needs Python 3.10 or newer, and this is Python %d.%d (%s). Install a newer Python "
             "and make the venv with it, for example: python3.12 -m venv .venv"
             % (sys.version_info[0], sys.version_info[1], sys.executable))

import asyncio
import base64
import bisect
import codecs
import concurrent.futures
import contextlib
import fnmatch
import dataclasses
import datetime
import email.message
import email.parser
import email.utils
import difflib
import errno
import hashlib
import hmac
import html
import importlib.util
import ipaddress
import itertools
import json
import json.decoder
import json.scanner
import logging
import math
import os
import random
import re
import secrets
import signal
import socket
import sqlite3
import ssl
import time
import zlib
import zoneinfo
from collections import Counter, deque
from http import HTTPStatus
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, MutableMapping, NamedTuple
from urllib.parse import quote, urlsplit, urlunsplit

# `python3 modelgate.py` outside the venv: one line, not a traceback. Also when only uvicorn is missing (the openai
# SDK's httpx brings httpcore and h11 along): the command line imports it (uvicorn_server).
LACKING = ("modelgate: this Python ({python}) lacks what ModelGate needs ({name} is missing). Install uvicorn and "
           "httpcore into a venv with .venv/bin/pip install -r requirements.txt, and start it with that venv's "
           "Python: .venv/bin/python modelgate.py (README.md, Quick start)")
if importlib.util.find_spec("httpcore") is None:  # (h11 comes with it)
    sys.exit(LACKING.format(python=sys.executable, name="httpcore"))

import h11  # comes with httpcore and uvicorn; its error class and connection states are named here
import httpcore

__version__ = "1.0.0"
__license__ = "MIT"
__all__ = ["app"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]
Spent = tuple[int | None, int | None]  # (prompt, completion) tokens; None where an answer does not say

log = logging.getLogger("modelgate")


###############################################################################
# The tables ##################################################################
###############################################################################

class Setting(NamedTuple):
    name: str  # the environment variable
    field: str  # the Config attribute it becomes
    default: str  # as it would be written in .env; "" is empty
    kind: str  # how it is read and checked: a key of PARSERS (Configuration, below)


# Every setting, in the order the module docstring, README.md and .env.example list them and say what it is for.
SETTINGS: tuple[Setting, ...] = (
    Setting("MODELGATE_TOKEN", "tokens", "", "tokens"),
    Setting("DEFAULT_PROVIDER", "default_provider", "ollama", "provider"),
    Setting("OLLAMA_BASE_URL", "ollama_base_urls", "http://127.0.0.1:11434/v1", "urls"),
    Setting("OLLAMA_API_KEY", "ollama_api_key", "", "key"),
    # Nobody: a token in a browser extension must not be able to delete models or fill the disk. ParisNeo's
    # ollama_proxy_server also keeps pull, push, create, copy and delete from its keys by default.
    Setting("OLLAMA_ADMIN_TOKENS", "ollama_admin_tokens", "", "names"),
    # Nobody: Ollama runs its cloud models and web tools on ollama.com under the account its owner signed in
    # with (server/cloud_proxy.go), spending that account's quota; llama-swap #971 asks the same of its peers.
    Setting("OLLAMA_CLOUD_TOKENS", "ollama_cloud_tokens", "", "names"),
    Setting("OPENAI_API_KEY", "openai_api_key", "", "key"),
    Setting("OPENAI_BASE_URL", "openai_base_url", "https://api.openai.com/v1", "url"),
    # Long enough for Ollama to load a model from disk before it sends the first byte (its own
    # OLLAMA_LOAD_TIMEOUT is 5 minutes; cline raised a 30 s limit to 5 min for the same reason).
    Setting("TIMEOUT_SECONDS", "timeout", "120", "seconds"),
    Setting("CONNECT_TIMEOUT_SECONDS", "connect_timeout", "10", "seconds"),
    # A silent client holds its connection, a file descriptor: 1,100 of them made a gateway with systemd's file limit of
    # 1,024 unreachable (issue 17). nginx's client_header_timeout and client_body_timeout are 60 s, Apache's
    # RequestReadTimeout 20-40 s; a real client sends its head in one packet, its body as fast as its link allows.
    Setting("CLIENT_TIMEOUT_SECONDS", "client_timeout", "30", "seconds"),
    # A chat with a few base64 images fits; OpenAI itself takes up to 20 MB per image request.
    Setting("MAX_BODY_BYTES", "max_body_bytes", "16777216", "size"),
    Setting("CORS_ALLOW_ORIGINS", "cors_allow_origins", "*", "origins"),
    Setting("RATE_LIMIT_RPM", "rate_limit_rpm", "0", "limit"),
    Setting("MAX_CONCURRENT_PER_TOKEN", "max_concurrent_per_token", "0", "limit"),
    Setting("ALLOWED_IPS", "allowed_ips", "", "allowlist"),
    Setting("TRUSTED_PROXIES", "trusted_proxies", "", "networks"),
    # FluentRead sends the same request again after 45 s without cancelling the first (its translateApi.ts:
    # timeout = 45000, maxRetries = 3): sharing the one upstream answer is what a cold Ollama needs.
    Setting("COALESCE", "coalesce", "on", "flag"),
    Setting("METRICS_PUBLIC", "metrics_public", "0", "flag"),
    Setting("LOG_FORMAT", "log_format", "text", "log format"),
    # Docker waits 10 s before it kills, Kubernetes 30 s, systemd 90 s; streams end in seconds, a long chat in a minute.
    Setting("SHUTDOWN_GRACE_SECONDS", "shutdown_grace", "30", "seconds"),
    Setting("HOST", "host", "0.0.0.0", "text"),
    Setting("PORT", "port", "8010", "port"),
    Setting("TLS_CERT_FILE", "tls_cert_file", "", "text"),
    Setting("TLS_KEY_FILE", "tls_key_file", "", "text"),
    # One policy per app, each off when empty, so that today's configurations keep working unchanged.
    Setting("MODEL_ALIASES", "model_aliases", "", "aliases"),
    Setting("TOKEN_MODELS", "token_models", "", "scopes"),
    Setting("TOKEN_QUOTAS", "token_quotas", "", "quotas"),  # a day's tokens per app, as open-webui #1430 asks
    Setting("MODEL_DEFAULTS", "model_defaults", "", "defaults"),
    # What a model runs with is the owner's choice: Home Assistant sends keep_alive -1 and num_ctx 8192 every time
    # (home-assistant/core components/ollama/const.py), and Ollama reloads a model for another num_ctx (ollama #12783).
    Setting("MODEL_OVERRIDES", "model_overrides", "", "defaults"),
    # The queue (The queue, below). Ollama's own default: OLLAMA_NUM_PARALLEL is 1 since v0.10.0 (ollama
    # PR #11330); what ModelGate sends beyond it would only wait in Ollama's FIFO, where no app comes first.
    Setting("OLLAMA_NUM_PARALLEL", "ollama_num_parallel", "1", "limit"),
    Setting("TOKEN_SHARES", "token_shares", "", "shares"),
    # A request that waited longer than a model may take to load (OLLAMA_LOAD_TIMEOUT: 5 min) is better told to retry.
    Setting("QUEUE_TIMEOUT_SECONDS", "queue_timeout", "300", "seconds"),
    # Counts that survive restarts, beside the gateway; empty keeps them in memory only (Usage, below).
    Setting("USAGE_DB", "usage_db", "modelgate-usage.sqlite3", "text"),
)


def openai_error(status: int, message: str, type_: str, code: str | None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


def ollama_error(status: int, message: str, type_: str, code: str | None) -> bytes:
    return json.dumps({"error": message}).encode()  # docs/api/errors.mdx; ollama-python's ResponseError reads a str


# The OpenAI error type for an upstream error status whose body we had to wrap ourselves.
UPSTREAM_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                        404: "not_found_error", 429: "rate_limit_error"}
# Anthropic's error type for a status: OpenAI's, and more (docs.anthropic.com/en/api/errors; Ollama's anthropic.NewError
# maps 503 to overloaded_error too). "We may also use this error type for other 4XX status codes": so do we.
ANTHROPIC_ERROR_TYPES = {**UPSTREAM_ERROR_TYPES, 413: "request_too_large", 500: "api_error", 503: "overloaded_error",
                         529: "overloaded_error"}


def anthropic_error(status: int, message: str, type_: str, code: str | None) -> bytes:
    anthropic_type = ANTHROPIC_ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return json.dumps({"type": "error", "error": {"type": anthropic_type, "message": message}}).encode()


class Dialect(NamedTuple):
    """What differs between the APIs a client may speak (OpenAI's, Ollama's own, Anthropic's)."""
    name: str
    error: Callable[[int, str, str, str | None], bytes]  # (status, message, OpenAI type, code) -> body
    cut: tuple[bytes, bytes]  # what goes before and after its error body in the last chunk of a cut stream
    own_error: Callable[[Any], bool]  # a parsed upstream error body that passes unchanged
    stream_type: bytes = b"text/event-stream"  # the media type of its streams
    separator: bytes = b""  # what a cut stream must end with before the cut event (NDJSON: a line of its own)
    forwarded: frozenset[bytes] = frozenset()  # client request headers that travel besides FORWARDED_REQUEST_HEADERS
    native: bool = False  # at OLLAMA_BASE_URL without its /v1, rather than at the base URL itself
    provider: str | None = None  # None: routed by model (PROVIDERS); else the one provider that serves it
    door: str = ""  # what its messages call it

    def cut_event(self, message: str) -> bytes:
        return self.cut[0] + self.error(502, message, "api_error", "upstream_stream_error") + self.cut[1]


# Cut streams: openai-python raises APIError for any `data:` object with an "error" key (its src/openai/_streaming.py).
OPENAI = Dialect("openai", openai_error, (b"data: ", b"\n\n"),
                 lambda document: isinstance(document, dict) and isinstance(document.get("error"), dict))
# Cut streams end as Ollama ends one that fails (streamResponse); ollama-python raises ResponseError.
OLLAMA = Dialect("ollama", ollama_error, (b"", b"\n"),
                 lambda document: isinstance(document, dict) and isinstance(document.get("error"), str),
                 # Never a blank line between: ollama-python json.loads every line it reads.
                 stream_type=b"application/x-ndjson", separator=b"\n", native=True, provider="ollama",
                 door="Ollama's own API (/api/...)")
# Cut streams: Anthropic's documented mid-stream error event; the anthropic SDKs raise on `event: error`.
ANTHROPIC = Dialect("anthropic", anthropic_error, (b"event: error\ndata: ", b"\n\n"),
                    lambda document: (isinstance(document, dict) and document.get("type") == "error"
                                      and isinstance(document.get("error"), dict)),
                    forwarded=frozenset({b"anthropic-version", b"anthropic-beta"}),
                    provider="ollama", door="Anthropic Messages (/v1/messages, which OpenAI does not serve)")


class End(NamedTuple):
    """How a whole stream of a route ends: its last record (an SSE event or NDJSON line, as Frames splits them) has
    `key` set to one of `values`. "data" is an event's data ([DONE] is no JSON); "type" is an event's own name (its SSE
    `event:` field), else the "type" of its JSON; any other, a key of its JSON. A stream ending in the upstream's own
    error (Dialect.own_error) is whole too: its client was told why (issue 19: a failed Ollama pull)."""
    key: str
    values: tuple[Any, ...]

    @property
    def marker(self) -> str:  # as messages name it
        return f"data: {self.values[0]}" if self.key == "data" else f'"{self.key}": {json.dumps(self.values[0])}'


DONE = End("data", ("[DONE]",))  # chat and completions
RESPONSE_END = End("type", ("response.completed", "response.failed", "response.incomplete"))
MESSAGE_STOP = End("type", ("message_stop",))  # Anthropic's (Ollama writes its `event:` line and its "type")
DONE_LINE = End("done", (True,))  # Ollama's chat and generate
SUCCESS_LINE = End("status", ("success",))  # Ollama's pull, push and create


class Counts(NamedTuple):
    """Where a route's answers say what tokens they used (Route.usage), read by tokens_used (Usage) from an
    answer's start and end: the whole body twice for a plain answer, a stream's first and last TAIL_BYTES."""
    prompt: str  # the key of the prompt's tokens
    completion: str  # the key of the answer's tokens
    # Anthropic's: message_delta's usage is cumulative; Ollama's has input_tokens too (anthropic/anthropic.go,
    # DeltaUsage), Anthropic's may have output_tokens only: then input_tokens are message_start's, the first event.
    head: bool = False
    native: bool = False  # Ollama's own API: the counts are top-level keys of its last line (or whole answer)


OPENAI_COUNTS = Counts("prompt_tokens", "completion_tokens")  # chat, completions, embeddings
RESPONSES_COUNTS = Counts("input_tokens", "output_tokens")
ANTHROPIC_COUNTS = Counts("input_tokens", "output_tokens", head=True)
OLLAMA_COUNTS = Counts("prompt_eval_count", "eval_count", native=True)


class Route(NamedTuple):
    handlers: dict[str, str]  # method -> the Gateway method that answers it
    access: str = "token"  # "token", "public" (no token, no limits), or "metrics" (an admin's, unless METRICS_PUBLIC)
    end: End = DONE  # how a whole stream of this route ends
    limited: bool = True  # counted against RATE_LIMIT_RPM and MAX_CONCURRENT_PER_TOKEN
    screened: bool = True  # ALLOWED_IPS applies; liveness stays open to the local container healthcheck
    while_closing: bool = False  # still answered after SIGTERM (everything else gets 503 shutting_down)
    dialect: Dialect = OPENAI  # the shape of its errors and of a cut stream's last event
    # Ollama's native API streams unless the request says "stream": false (server/routes.go:
    # `req.Stream != nil && !*req.Stream`); everything else streams only when it says "stream": true.
    streams_unless_false: bool = False
    model_required: bool = True  # the body must name a model (else the upstream judges a body that names none)
    # The body fields naming a model, a tuple per model: of one tuple, Ollama takes the first set (not absent, null or
    # ""): ShowHandler reads `name` when `model` is empty, pull, push, create and delete `cmp.Or(req.Model, req.Name)`
    # (ollama server/routes.go, server/create.go). Each is routed, resolved and checked as `model` is (routed_body).
    models: tuple[tuple[str, ...], ...] = (("model",),)
    admin: bool = False  # changes what Ollama holds, or reads or ends its owner's ollama.com session: admins only
    cloud: bool = False  # runs on ollama.com (web search and fetch): only for the token names in OLLAMA_CLOUD_TOKENS
    login: bool = False  # a page for a person: its 401 asks the browser for the token (HTTP Basic's password)
    # Identical plain requests in flight share one answer (COALESCE). Not embeddings, whose answers can outgrow
    # MAX_HELD_ANSWER and are never sent twice by the tools served; not an admin's, which changes what Ollama holds.
    shared: bool = True
    usage: Counts | None = None  # where its answers say what tokens they used
    asks_usage: bool = False  # its streams carry usage only when asked (stream_options.include_usage)
    queued: bool = False  # runs a model: to Ollama, it waits for its turn (OLLAMA_NUM_PARALLEL, The queue)
    # What of its body the trust boundary reads, checks and edits (Gateway.dispatch): "json", an object routed by its
    # model fields (routed_body); "form", a multipart form by its `model` field (routed_form); "" none: relayed as is.
    reads: str = ""


MODEL_OR_NAME = ("model", "name")  # Route.models of Ollama's show, pull, push, create and delete
# What the rows that relay a JSON body naming a model share: those that run it wait for their turn (RUNS_MODEL);
# Ollama's that manage models are an admin's, take `model` or `name`, and share no answer (MANAGES_MODELS).
RUNS_MODEL = Route({"POST": "relay_request"}, queued=True, reads="json")
MANAGES_MODELS = Route({"POST": "relay_request"}, dialect=OLLAMA, model_required=False, admin=True, shared=False,
                       models=(MODEL_OR_NAME,), reads="json")

# A path ending in / (but / itself) is a prefix: /v1/models/{id}, /api/blobs/<digest>. Anything else is 404.
ROUTES: dict[str, Route] = {
    "/v1/chat/completions": RUNS_MODEL._replace(usage=OPENAI_COUNTS, asks_usage=True),
    "/v1/completions": RUNS_MODEL._replace(usage=OPENAI_COUNTS, asks_usage=True),
    "/v1/responses": RUNS_MODEL._replace(end=RESPONSE_END, usage=RESPONSES_COUNTS),
    "/v1/embeddings": RUNS_MODEL._replace(usage=OPENAI_COUNTS, shared=False),
    # Served by Ollama since v0.20 and OpenAI; gpt-4o-transcribe reports usage as the Responses API does, Ollama none.
    "/v1/audio/transcriptions": RUNS_MODEL._replace(usage=RESPONSES_COUNTS, shared=False, reads="form"),
    "/v1/models": Route({"GET": "models"}),
    "/v1/models/": Route({"GET": "model"}),
    # HEAD too: what a server that answers GET must answer (RFC 9110 §9.1), and what uptime monitors send.
    "/health": Route({"GET": "health", "HEAD": "health"}, access="public", limited=False, screened=False,
                     while_closing=True),
    "/ready": Route({"GET": "ready", "HEAD": "ready"}, access="public", limited=False),
    "/metrics": Route({"GET": "metrics_page"}, access="metrics", limited=False, while_closing=True),
    "/usage": Route({"GET": "usage_page"}, limited=False, login=True),
    # Anthropic Messages, which Ollama serves itself since v0.14 (ollama PR #13600).
    "/v1/messages": RUNS_MODEL._replace(end=MESSAGE_STOP, dialect=ANTHROPIC, usage=ANTHROPIC_COUNTS),
    # Ollama's native API at the root, as Ollama has it: a client given ModelGate as its Ollama URL just works. The root
    # answers as Ollama does to probing clients, and a browser (text/html) gets a page; neither tells the configuration.
    "/": Route({"GET": "home", "HEAD": "ollama_root", "POST": "posted_to_root"}, access="public", limited=False,
               dialect=OLLAMA),
    "/api/chat": RUNS_MODEL._replace(end=DONE_LINE, dialect=OLLAMA, streams_unless_false=True, usage=OLLAMA_COUNTS),
    "/api/generate": RUNS_MODEL._replace(end=DONE_LINE, dialect=OLLAMA, streams_unless_false=True, usage=OLLAMA_COUNTS),
    "/api/embed": RUNS_MODEL._replace(dialect=OLLAMA, usage=OLLAMA_COUNTS, shared=False),
    "/api/embeddings": RUNS_MODEL._replace(dialect=OLLAMA, shared=False),
    "/api/show": Route({"POST": "relay_request"}, dialect=OLLAMA, model_required=False, models=(MODEL_OR_NAME,),
                       reads="json"),
    "/api/tags": Route({"GET": "models", "HEAD": "models"}, dialect=OLLAMA),
    "/api/ps": Route({"GET": "models"}, dialect=OLLAMA),
    "/api/version": Route({"GET": "ollama_version", "HEAD": "ollama_version"}, dialect=OLLAMA),
    "/api/pull": MANAGES_MODELS._replace(end=SUCCESS_LINE, streams_unless_false=True),
    "/api/push": MANAGES_MODELS._replace(end=SUCCESS_LINE, streams_unless_false=True),
    "/api/create": MANAGES_MODELS._replace(end=SUCCESS_LINE, streams_unless_false=True,
                                           models=(MODEL_OR_NAME, ("from",))),
    "/api/copy": MANAGES_MODELS._replace(models=(("source",), ("destination",))),
    "/api/delete": MANAGES_MODELS._replace(handlers={"DELETE": "relay_request"}),
    "/api/blobs/": Route({"HEAD": "ollama_relay", "POST": "ollama_relay"}, dialect=OLLAMA, admin=True, shared=False),
    # Whether Ollama's cloud is on (OLLAMA_NO_CLOUD), for anyone; the owner's ollama.com account, for admins;
    # web search and fetch, run on ollama.com under that account (server/routes.go), for cloud tokens.
    "/api/status": Route({"GET": "ollama_relay"}, dialect=OLLAMA),
    "/api/me": Route({"POST": "ollama_relay"}, dialect=OLLAMA, admin=True, shared=False),
    "/api/signout": Route({"POST": "ollama_relay"}, dialect=OLLAMA, admin=True, shared=False),
    "/api/user/keys/": Route({"DELETE": "ollama_relay"}, dialect=OLLAMA, admin=True, shared=False),
    "/api/experimental/web_search": Route({"POST": "ollama_relay"}, dialect=OLLAMA, cloud=True, shared=False),
    "/api/experimental/web_fetch": Route({"POST": "ollama_relay"}, dialect=OLLAMA, cloud=True, shared=False),
}
PREFIX_ROUTES = tuple(path for path in ROUTES if path.endswith("/") and path != "/")
# The fields in which an OpenAI-compatible router that OPENAI_BASE_URL may name (its path is kept: /api/v1) runs
# models besides `model`: OpenRouter's `models`, tried in turn when one fails, a context too long for the first
# included (openrouter.ai/docs/guides/routing/model-fallbacks), and LiteLLM's `fallbacks` (client-side fallbacks,
# docs.litellm.ai/docs/proxy/reliability), with those its router tries for a context too long or content refused
# (router.py, async_function_with_fallbacks). Each is checked against TOKEN_MODELS as `model` is (check_fallbacks), as
# are OpenRouter's presets, which run the models stored in them (openrouter.ai/docs/features/presets): `preset`, or
# `@preset/<slug>` in a model's name, after another (`gpt-4o-mini@preset/<slug>`), each the model `@preset/<slug>`.
FALLBACK_FIELDS = ("models", "fallbacks", "context_window_fallbacks", "content_policy_fallbacks")
# Of a body, ModelGate reads only a few top-level values: the fields that name a model (Route.models), these (`tools`:
# for web tools, check_tools), and the objects MODEL_DEFAULTS and MODEL_OVERRIDES merge into (request_edits reads those
# by their spans). ROUTE_FIELDS has them per route, `model` always (Go would read "Model" as `model` on any route).
READ_FIELDS = frozenset({"stream", "stream_options", "tools", "background", "preset", *FALLBACK_FIELDS})
ROUTE_FIELDS = {path: frozenset({"model", *READ_FIELDS, *(field for fields in route.models for field in fields)})
                for path, route in ROUTES.items()}

# Every status ModelGate chooses itself: situation -> (status, OpenAI error type, code). Besides these, an upstream's
# own error status passes unchanged (upstream_error); a client gone early is logged as 499 (nginx, Caddy), never sent.
ERRORS: dict[str, tuple[int, str, str | None]] = {
    "invalid_request": (400, "invalid_request_error", "invalid_request"),
    # Content-Length and Transfer-Encoding both: answered with `connection: close` (RFC 9112 §6.1).
    "ambiguous_framing": (400, "invalid_request_error", "ambiguous_framing"),
    # Two different tokens in one request (Authorization twice, or with x-api-key): which one is meant is unclear.
    "ambiguous_credentials": (400, "invalid_request_error", "ambiguous_credentials"),
    "provider_not_configured": (400, "invalid_request_error", "provider_not_configured"),
    "unauthorized": (401, "authentication_error", "invalid_api_key"),
    "ip_not_allowed": (403, "permission_error", "ip_not_allowed"),  # ALLOWED_IPS, judged before the token is read
    # The Route.admin rows, and /metrics (unless METRICS_PUBLIC), for a token not named in OLLAMA_ADMIN_TOKENS.
    "admin_only": (403, "permission_error", "admin_only"),
    # Ollama's cloud models and web tools, and Route.cloud, for a token not in OLLAMA_CLOUD_TOKENS: nothing upstream.
    "cloud_not_allowed": (403, "permission_error", "cloud_not_allowed"),
    "model_not_allowed": (403, "permission_error", "model_not_allowed"),  # TOKEN_MODELS: outside the token's patterns
    "not_found": (404, "invalid_request_error", "not_found"),
    "model_not_found": (404, "invalid_request_error", "model_not_found"),
    "method_not_allowed": (405, "invalid_request_error", "method_not_allowed"),
    "body_too_large": (413, "invalid_request_error", "request_too_large"),
    # A request body in a Content-Encoding ModelGate cannot decode (it decodes gzip): its model could not be read.
    "unsupported_encoding": (415, "invalid_request_error", "unsupported_content_encoding"),
    # Nothing more of the request body came for CLIENT_TIMEOUT_SECONDS (nginx: client_body_timeout, 408).
    "body_timeout": (408, "invalid_request_error", "request_timeout"),
    # RATE_LIMIT_RPM (with Retry-After) and MAX_CONCURRENT_PER_TOKEN: the SDKs wait and retry a 429.
    "rate_limited": (429, "rate_limit_error", "rate_limit_exceeded"),
    "too_many_in_flight": (429, "rate_limit_error", "concurrency_limit_exceeded"),
    # TOKEN_QUOTAS used up for today (OpenAI's own type for it is insufficient_quota): Retry-After says when midnight
    # is, and NO_RETRY that no SDK should wait that long (anthropic-sdk-python and the Node SDKs sleep any Retry-After).
    "quota_exceeded": (429, "insufficient_quota", "quota_exceeded"),
    "internal": (500, "api_error", "internal_error"),
    "upstream_unavailable": (502, "api_error", "upstream_unavailable"),
    # An answer larger than MAX_HELD_ANSWER where it must be held whole (COALESCE, model lists).
    "answer_too_large": (502, "api_error", "upstream_answer_too_large"),
    "gateway_busy": (503, "api_error", "gateway_busy"),  # our own pool to that upstream is full: we are busy, not it
    "shutting_down": (503, "api_error", "shutting_down"),  # after SIGTERM: the SDKs retry a 503 on a gateway up again
    "not_ready": (503, "api_error", "not_ready"),
    # The queue (OLLAMA_NUM_PARALLEL): waited QUEUE_TIMEOUT_SECONDS, or MAX_QUEUED / MAX_QUEUED_BYTES reached.
    # Nothing was sent; with Retry-After, which the SDKs honour.
    "queue_timeout": (503, "api_error", "queue_timeout"),
    "queue_full": (503, "api_error", "queue_full"),
    "upstream_timeout": (504, "api_error", "upstream_timeout"),
    "loop_detected": (508, "api_error", "loop_detected"),  # OLLAMA_BASE_URL is ModelGate itself (VIA); RFC 5842 §7.2
}
# Added to a failure no retry mends (a loop, a redirect, a key refused, an https:// URL for plain HTTP, an answer
# that is not HTTP, none within TIMEOUT_SECONDS): the openai and anthropic SDKs retry a 5xx twice unless it says so
# (openai-python and anthropic-sdk-python _base_client.py, _should_retry).
NO_RETRY = (b"x-should-retry", b"false")


class TLSError(httpcore.ConnectError):
    """The TLS handshake with an upstream failed: most often an https:// URL for a plain-HTTP server."""


# How an httpcore failure before the response started is told to the client, first match wins
# (httpcore's map_exceptions, Caddy's statusError). {name} is the provider, {url} its URL variable.
UPSTREAM_FAILURES: tuple[tuple[type[Exception], str, str], ...] = (
    (httpcore.PoolTimeout, "gateway_busy", "All connections to {name} are in use; try again shortly."),
    (httpcore.ConnectTimeout, "upstream_timeout",
     "Could not connect to {name} within CONNECT_TIMEOUT_SECONDS. Check that it is running and {url} is right."),
    (httpcore.TimeoutException, "upstream_timeout",
     "{name} did not answer within TIMEOUT_SECONDS. The model may still be loading: try again, "
     "or raise TIMEOUT_SECONDS."),
    (TLSError, "upstream_unavailable",
     "The TLS handshake with {name} failed: is this upstream plain http? Then write http:// in {url}. "
     "If it does speak https, check its certificate."),
    (httpcore.ConnectError, "upstream_unavailable",
     "Could not connect to {name}: refused or unreachable. Check that it is running and {url} is right."),
    (httpcore.RemoteProtocolError, "upstream_unavailable",
     "{name} closed the connection or did not answer with HTTP. Check that {url} points at its API."),
    (httpcore.NetworkError, "upstream_unavailable", "The connection to {name} broke before it answered."),
)

UPSTREAM_EXCEPTIONS = tuple(exc_type for exc_type, _, _ in UPSTREAM_FAILURES)  # "the upstream failed", not our bug
# Of those, the ones no retry mends (NO_RETRY): no answer within TIMEOUT_SECONDS, where a retry would run the
# generation again as long, most often to the same end; a TLS handshake with an upstream that speaks plain HTTP.
NOT_RETRIED = (httpcore.ReadTimeout, TLSError)


class GatewayError(Exception):
    """A failure answered before the response started, with the status, type and code ERRORS gives its
    situation (as h11's ProtocolError carries its error_status_hint)."""

    def __init__(self, situation: str, message: str, headers: Headers | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.situation, self.message = situation, message
        self.status, self.type, self.code = ERRORS[situation]
        self.headers = headers or []
        self.detail = detail  # for the log line only: the cause, the host; never a secret


class Answer(NamedTuple):
    """A whole response: ours, or an upstream's (an error status included), as the client gets it."""
    status: int
    headers: Headers
    body: bytes
    ends: tuple[bytes, bytes] | None = None  # an upstream's: its start and end, where it says what tokens it used


PROVIDERS = ("ollama", "openai")

# Where each provider's settings live, so that messages can name the variable to check.
URL_VARIABLE = {"ollama": "OLLAMA_BASE_URL", "openai": "OPENAI_BASE_URL"}
KEY_VARIABLE = {"ollama": "OLLAMA_API_KEY", "openai": "OPENAI_API_KEY"}

PHRASES = {status.value: status.phrase for status in HTTPStatus}  # for messages only: "503 Service Unavailable"


###############################################################################
# Configuration ###############################################################
###############################################################################

class ConfigError(Exception):
    """A setting is missing or wrong; the message names the variable."""


Config = dataclasses.make_dataclass(  # read once at start-up: SETTINGS' fields, and the names tokens are shown by
    "Config", [(s.field, Any) for s in SETTINGS] + [("token_names", tuple)], frozen=True, slots=True)


def load_config(environ: Mapping[str, str] = os.environ) -> Config:
    """Read and check every setting once; raise ConfigError naming the first bad one."""
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        # Spaces, tabs and the CR of a .env saved on Windows; not str.strip()'s control characters.
        # A variable set to nothing (NAME= in .env) means its default, but where nothing is a choice.
        raw = environ.get(setting.name)
        text = (raw or "").strip(" \t\r\n")
        if not text and (raw is None or setting.name not in EMPTY_IS_A_VALUE):
            text = setting.default
        try:
            if setting.kind in NAME_KINDS:
                no_control_characters(setting.name, text)
            values[setting.field] = PARSERS[setting.kind](setting.name, text)
        except ConfigError as exc:
            exc.setting = setting.name  # read_config says where it came from
            raise
    values["tokens"], values["token_names"] = values["tokens"]
    # Each token name these list names a token of MODELGATE_TOKEN (a hash label for one given without a name).
    for setting in ("OLLAMA_ADMIN_TOKENS", "OLLAMA_CLOUD_TOKENS", "TOKEN_MODELS", "TOKEN_SHARES", "TOKEN_QUOTAS"):
        for entry in sorted(set(values[setting.lower()]) - set(values["token_names"])):
            if entry.encode() in values["tokens"]:  # never repeat a token in a message
                raise ConfigError(f"{setting} lists a token itself; list its name (`name:token` in "
                                  "MODELGATE_TOKEN gives it one)")
            raise ConfigError(f"{setting} names {entry!r}, but MODELGATE_TOKEN has no token of that name (it has "
                              f"{', '.join(sorted(set(values['token_names'])))}); write name:token there to name one")
    if values["default_provider"] == "openai" and not values["openai_api_key"]:
        raise ConfigError("DEFAULT_PROVIDER is openai but OPENAI_API_KEY is empty: set the key or use ollama")
    check_tls_files(values["tls_cert_file"], values["tls_key_file"])
    return Config(**values)


# Kinds that hold URLs, hosts and names (MODEL_DEFAULTS' patterns too: check_model_pattern): in request lines, headers
# and log lines, a control character forges what follows. A newline in OLLAMA_BASE_URL, which urlsplit drops silently,
# was sent as a path of its own and logged as two lines (issue 16); U+2028 and U+2029 end lines for str.splitlines.
NAME_KINDS = frozenset({"tokens", "url", "urls", "names", "origins", "text", "aliases", "scopes", "shares", "quotas"})
CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def no_control_characters(name: str, value: str) -> None:
    if found := CONTROL_CHARACTER.search(value):  # where and which, never the value: it may hold a token or a password
        raise ConfigError(f"{name} holds a control character ({found.group()!r}, character {found.start() + 1}), "
                          "which no URL, host or name may hold: retype the value on one line")


def comma_list(value: str) -> list[str]:
    return [entry.strip() for entry in value.split(",") if entry.strip()]


TOKEN_HELP = 'generate one with: python3 -c "import secrets; print(secrets.token_urlsafe(32))"'

# `name:token`: a name is this, up to the first ':'. Anything else before a ':' is part of the token,
# so a token that itself holds a ':' is written with a name in front (`app:to:ken`).
TOKEN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def parse_tokens(name: str, value: str) -> tuple[tuple[bytes, ...], tuple[str, ...]]:
    """MODELGATE_TOKEN: the tokens, and the name each is shown by (a hash label when it has none)."""
    named, tokens = {}, []  # name -> token; (token, name) in the order given
    for entry in comma_list(value):
        label, colon, token = entry.partition(":")
        if not (colon and TOKEN_NAME.fullmatch(label)):
            label, token = token_label(entry), entry  # never a part of the token: it must not help anyone guess it
        if not token:
            raise ConfigError(f"{name}: {entry!r} names a token but gives none after the ':'")
        if not all("!" <= c <= "~" for c in token) or token[0] + token[-1] == "<>":  # .env.example's <token one>
            raise ConfigError(f"{name} may only hold printable ASCII without spaces, no <> around tokens; {TOKEN_HELP}")
        if named.setdefault(label, token) != token:
            raise ConfigError(f"{name} names two different tokens {label!r}; give each its own name")
        tokens.append((token.encode(), label))
    if not tokens:
        raise ConfigError(f"{name} is empty: set it to the token clients must send; {TOKEN_HELP}")
    return tuple(token for token, _ in tokens), tuple(label for _, label in tokens)


def token_label(token: str) -> str:
    """A short stable name for a token given without one. Slow on purpose: the label appears in logs and
    metrics, and must not let anyone test guesses of a weak token quickly."""
    digest = hashlib.pbkdf2_hmac("sha256", token.encode(), b"modelgate token label", 10_000)
    return "token-" + digest.hex()[:8]


def accepting(wanted: str, convert: Callable[[str], Any]) -> Callable[[str, str], Any]:
    """A parser that refuses a value `convert` makes None, saying what it must be: `wanted`."""
    def parse(name: str, value: str) -> Any:
        converted = convert(value)
        if converted is None:
            raise ConfigError(f"{name} must be {wanted}, not {value!r}")
        return converted
    return parse


def one_of(*choices: str) -> Callable[[str, str], str]:
    return accepting(" or ".join(choices), lambda value: value.lower() if value.lower() in choices else None)


def parse_url(name: str, value: str) -> str:
    # Every message shows the URL through shown_url(): a start-up error ends up in logs and bug reports.
    no_credentials(name, value)
    shown = shown_url(value)
    try:
        url = urlsplit(value)
        _ = url.port  # raises ValueError for a port that is not a number or out of range
    except ValueError:
        raise ConfigError(f"{name} is not a valid URL: {shown!r}") from None
    if "://" not in value and value:  # 127.0.0.1:11434, localhost:11434/v1: the address, its scheme left out
        ollama = name == "OLLAMA_BASE_URL"  # Ollama speaks plain HTTP, and its base URL ends in /v1
        meant = ("http://" if ollama else "https://") + shown.lstrip("/")
        meant = with_v1(meant) if ollama and not urlsplit(meant).path.rstrip("/").endswith("/v1") else meant
        raise ConfigError(f"{name} must begin with http:// or https://, such as {meant}")
    # Two URLs joined by ; or a space (or a comma, where one URL goes): the path would hold the rest. A URL in the
    # path (a relay's https://relay.example/https://api.openai.com/v1) follows a /, and is no second base URL.
    if re.search(r"[;,\s]\s*https?://", value):
        several = ", or several separated by commas" if name == "OLLAMA_BASE_URL" else ""
        raise ConfigError(f"{name} holds more than one URL ({shown!r}): write one{several}")
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(f"{name} must look like http://host:port/v1, not {shown!r}")
    if url.query or url.fragment:
        raise ConfigError(f"{name} must not have a query or fragment: {shown!r}")
    try:
        url.hostname.encode("idna")
    except UnicodeError:
        raise ConfigError(f"{name} has a host name that is not valid: {url.hostname!r}") from None
    return value.rstrip("/")


def no_credentials(name: str, value: str) -> None:
    if "@" in value:  # user:password@ (an @ has no other place in a base URL)
        raise ConfigError(f"{name} must not hold credentials ({shown_url(value)}); put the key in {name[:-8]}API_KEY")


def shown_url(url: str) -> str:
    """A URL as a message may show it, the password (or a user name given alone, often a token), the query and
    the fragment replaced by ***: http://u:***@host/v1?***. Done on the text, not with urlsplit(), which refuses
    some of the very URLs a message is about (a port that is no number, a bracket left open); everything up to
    the last @ before the query is userinfo, so a password with a / in it still counts as one."""
    shown, rest = re.fullmatch(r"([^?#]*)(.*)", url, re.DOTALL).groups()  # rest: from the first ? or # on
    start = shown.find("//") + 2 if "//" in shown else 0
    at = shown.rfind("@")
    if at >= start:
        user, colon, _ = shown[start:at].partition(":")
        shown = shown[:start] + (f"{user}:***" if colon else "***") + shown[at:]
    return shown + (rest[:1] + "***" if rest else "")


def parse_urls(name: str, value: str) -> tuple[str, ...]:
    # Credentials first, in the whole value: a password may hold a comma, and the rest of it is no URL to show.
    no_credentials(name, value)
    urls = tuple(parse_url(name, url) for url in comma_list(value))
    if not urls:
        raise ConfigError(f"{name} is empty: set it to Ollama's base URL, such as http://127.0.0.1:11434/v1")
    return urls


def parse_key(name: str, value: str) -> str:
    if not all(" " <= c <= "~" for c in value):
        raise ConfigError(f"{name} may only hold printable ASCII")
    return value


def parse_seconds(name: str, value: str) -> float:
    try:
        float(value)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, not {value!r}") from None
    return accepting("more than 0 seconds", above_zero)(name, value)


def above_zero(text: str) -> float | None:
    with contextlib.suppress(ValueError):
        if 0 < float(text) < math.inf:
            return float(text)
    return None


def whole_number(low: int, high: float) -> Callable[[str], int | None]:
    # In ASCII digits (int() also reads '٣'), and at most 640 of them: int() reads that many whatever
    # sys.set_int_max_str_digits says, and raised ValueError on 5,000 before start-up could name the variable.
    return lambda text: (int(text) if text.isascii() and text.isdigit() and len(text) <= 640
                         and low <= int(text) <= high else None)


FLAGS = {"1": True, "true": True, "on": True, "yes": True, "0": False, "false": False, "off": False, "no": False}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(name: str, value: str) -> tuple[Network, ...]:
    """Comma-separated addresses and CIDR networks, IPv4 or IPv6 (an address is a network of one)."""
    networks = []
    for entry in comma_list(value):
        try:
            network = ipaddress.ip_network(entry)
        except ValueError as exc:  # also 10.0.0.1/24: host bits set, a typo more often than not
            raise ConfigError(f"{name}: {entry!r} is not an address or network ({exc})") from None
        # ::ffff:a.b.c.d, as a dual-stack socket shows an IPv4 client, is that IPv4 address to parse_ip.
        if network.version == 6 and network.prefixlen >= 96 and (mapped := network.network_address.ipv4_mapped):
            network = ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}")
        networks.append(network)
    return tuple(networks)


# One policy per app -------------------------------------------------------------------------------------
# MODEL_ALIASES maps names tools ship with to models (llama-swap `aliases`, LiteLLM `model_group_alias`); TOKEN_MODELS
# gives a token name the models it may use (as LiteLLM's and Bifrost's virtual keys do); MODEL_DEFAULTS fills in request
# fields per model (llama-swap `setParams`), MODEL_OVERRIDES sets them whatever the client sent. The patterns of the
# last three are globs (fnmatch, case-sensitive: `*` matches `/` and `:` too) over the model as routed: `provider/name`.

# Fields that no default or override may set: they decide where a request goes and what kind of answer the client
# gets, and stream_options is ModelGate's own (it asks for usage).
NOT_DEFAULTS = frozenset({"model", "stream", "stream_options"})


def entries(shape: str, twice: str, parse: Callable[[str, str, str], Any]) -> Callable[[str, str], dict[str, Any]]:
    """A parser of a `key=value,...` setting into a dict: `parse(name, entry, value)` checks an entry and converts its
    value ("" without a '='), or gives None for an entry that is not `shape` (nor is one without a key); a key written
    twice is refused, saying `twice`. load_config checks keys that are token names against MODELGATE_TOKEN's."""
    def parse_entries(name: str, value: str) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for entry in comma_list(value):
            key, _, rest = (part.strip() for part in entry.partition("="))
            parsed = parse(name, entry, rest) if key else None
            if parsed is None:
                raise ConfigError(f"{name}: {entry!r} is not {shape}")
            if key in found:
                raise ConfigError(f"{name} names {key!r} twice; {twice}")
            found[key] = parsed
        return found
    return parse_entries


def parse_aliases(name: str, value: str) -> dict[str, str]:
    """MODEL_ALIASES: `alias=target,...`, one level deep, so that a scope is checked on a real model."""
    def target_of(name: str, entry: str, target: str) -> str | None:
        if not target or "=" in target:
            return None
        if target.endswith("/") and target[:-1] in PROVIDERS:
            raise ConfigError(f"{name}: {entry!r} names no model after {target}")
        return target
    aliases = entries("alias=target, such as gpt-4o-mini=ollama/qwen2.5:7b", "give each alias one target",
                      target_of)(name, value)
    for alias, target in aliases.items():
        if target in aliases:
            raise ConfigError(f"{name}: the target of {alias}={target} is itself an alias; aliases go one level "
                              f"deep, so point {alias!r} at {aliases[target]!r} instead")
    return aliases


def parse_defaults(name: str, value: str) -> tuple[tuple[str, dict[str, Any]], ...]:
    """MODEL_DEFAULTS and MODEL_OVERRIDES: one JSON object, pattern -> fields. Returned longest pattern first
    (ties as written), each with its fields as read (fields_for merges them, request_edits writes them)."""
    if not value:
        return ()

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        if twice := [key for key in keys if keys.count(key) > 1]:
            raise ConfigError(f"{name} has {twice[0]!r} twice; write it once")
        return dict(pairs)
    try:
        document = json.loads(value, object_pairs_hook=unique)
    except ValueError as exc:
        raise ConfigError(f"{name} is not valid JSON ({exc}); it is one object on one line, such as "
                          '{"ollama/qwen3*": {"reasoning_effort": "none"}}') from None
    except RecursionError:
        raise ConfigError(f"{name} is nested too deeply to be read; request fields are a few levels deep") from None
    if not isinstance(document, dict):
        raise ConfigError(f'{name} must be a JSON object of patterns, such as {{"ollama/qwen3*": '
                          '{"reasoning_effort": "none"}}')
    for pattern, fields in document.items():  # the fields first: {"keep_alive": "30m"} is no pattern, no model
        if not isinstance(fields, dict) or not fields:
            raise ConfigError(f"{name}: the value for {pattern!r} must be an object of request fields: {name} maps "
                              'model patterns to fields, such as {"ollama/qwen3*": {"reasoning_effort": "none"}}')
        check_model_pattern(name, pattern)
        if reserved := sorted(NOT_DEFAULTS.intersection(fields)):
            raise ConfigError(f"{name}: {pattern!r} sets {reserved[0]!r}, which is the client's to choose "
                              "(model, stream) or ModelGate's own (stream_options)")
    return tuple(sorted(document.items(), key=lambda item: -len(item[0])))


def check_model_pattern(name: str, pattern: str) -> str:
    no_control_characters(name, pattern)  # MODEL_DEFAULTS' patterns may be written with JSON escapes
    # Patterns are matched against provider/name: one that starts otherwise (`qwen*`) could never match.
    if not pattern.startswith(tuple(f"{p}/" for p in PROVIDERS) + ("*", "?", "[")):
        raise ConfigError(f"{name}: the pattern {pattern!r} never matches: patterns are matched against "
                          f"provider/model, so write ollama/{pattern}")
    return pattern


def compact_json(value: Any) -> str:
    # ASCII, with \u escapes: a lone surrogate (a client's "\ud800", say) is written as it came; UTF-8 cannot encode it.
    return json.dumps(value, separators=(",", ":"))


PARSERS: dict[str, Callable[[str, str], Any]] = {
    "tokens": parse_tokens,
    "provider": one_of(*PROVIDERS),
    "url": parse_url,
    "urls": parse_urls,
    "key": parse_key,
    "seconds": parse_seconds,
    "size": accepting("a whole number above 0", whole_number(1, sys.maxsize)),
    "limit": accepting("a whole number (0 for no limit)", whole_number(0, sys.maxsize)),
    "port": accepting("a number from 1 to 65535", whole_number(1, 65535)),
    "flag": accepting("1 or 0 (on or off)", lambda value: FLAGS.get(value.lower())),
    "networks": parse_networks,
    "allowlist": lambda name, value: parse_networks(name, value) if value else None,  # None: everyone
    # {"*"}: any. Never a path (django-cors-headers' check E014) nor a glob (OLLAMA_ORIGINS' chrome-extension://*).
    "origins": accepting("origins as a browser sends them, scheme://host[:port] (no / at the end; * alone: any)",
                         lambda text: None if re.search(r"[^,\s]\*|://[^,]*/", text) else frozenset(comma_list(text))),
    "names": lambda name, value: frozenset(comma_list(value)),  # token names
    "log format": one_of("text", "json"),
    "text": lambda name, value: value,
    "aliases": parse_aliases,
    "scopes": entries("name=pattern|pattern, such as fluentread=ollama/qwen*|ollama/gemma*",
                      "list all its patterns in one entry, with |",
                      lambda name, entry, listed: tuple(check_model_pattern(name, pattern.strip())
                                                        for pattern in listed.split("|") if pattern.strip()) or None),
    "defaults": parse_defaults,
    "shares": entries("name=weight with a weight above 0, such as webui=4", "give each token name one weight",
                      lambda name, entry, weight: above_zero(weight)),
    "quotas": entries("name=tokens a day (a whole number above 0), such as fluentread=300000",
                      "give each token name one quota", lambda name, entry, tokens: whole_number(1, math.inf)(tokens)),
}

EMPTY_IS_A_VALUE = frozenset({"USAGE_DB"})  # where nothing is a choice (load_config): USAGE_DB= keeps counts in memory


def check_tls_files(cert: str, key: str) -> None:
    """TLS_CERT_FILE and TLS_KEY_FILE: both empty, or a readable PEM certificate and its key."""
    if bool(cert) != bool(key):
        missing = "TLS_KEY_FILE" if cert else "TLS_CERT_FILE"
        raise ConfigError(f"{missing} is empty: set TLS_CERT_FILE and TLS_KEY_FILE both, or neither")
    if not cert:
        return
    for name, path in (("TLS_CERT_FILE", cert), ("TLS_KEY_FILE", key)):
        try:
            open(path, "rb").close()
        except OSError as exc:
            raise ConfigError(f"{name} cannot be read: {exc.strerror}: {path!r}") from None
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ConfigError(f"TLS_CERT_FILE and TLS_KEY_FILE are not a PEM certificate and its key ({exc})") from None


def read_dotenv(path: str) -> tuple[dict[str, str], list[str]]:
    """The KEY=VALUE lines of a .env file, read as docker compose (1.29 and 2.x) reads it for its own variables and for
    env_file, and the warnings a person should see. A key given twice takes its last line (so `cp .env.example .env`
    plus an appended line works); `export `, blank lines, `#` comments and quotes are allowed; a line that is not
    KEY=VALUE or leaves a quote open is an error naming it."""
    values, lines_of, warnings = {}, {}, []  # key -> value, key -> its line number
    with open(path, encoding="utf-8-sig") as lines:  # -sig: a BOM (Windows' Notepad) is not part of the key
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.removeprefix("export ").partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not key.isidentifier():
                raise ConfigError(f"{path} line {number}: expected KEY=VALUE" + line.startswith(tuple('"{}[]')) * (
                    ", not a line of JSON: a value takes one line, MODEL_DEFAULTS' and MODEL_OVERRIDES' JSON too"))
            # `cp .env.example .env` and a line appended (README.md, docs/deploy.md) set the key twice, its first
            # line empty: a blank filled in, nothing lost, not a warning (which --check counts as a problem).
            if key in lines_of and values[key]:  # log: which line is ignored
                warnings.append(f"{path} line {lines_of[key]} is ignored: line {number} sets {key} again, "
                                "and the last one counts (as docker compose reads the file)")
            elif hint := misspelt(key):
                warnings.append(f"{path} line {number}: {hint}")
            values[key], lines_of[key] = dotenv_span(value, f"{path} line {number}")[0], number
    return values, warnings


def dotenv_span(value: str, where: str) -> tuple[str, int]:
    """A .env line's value from the text after its `=` (stripped), and where in that text the value ends:
    at its closing quote, or before a comment (--add-token writes there, keeping the rest of the line)."""
    if value[:1] not in ("'", '"'):
        value = re.split(r"\s+#", value, maxsplit=1)[0]  # `KEY=value # comment`, but `a#b` is a value
        return value, len(value)
    quote = value[0]
    end = value.find(quote, 1)
    while quote == '"' and end > 0 and value[end - 1] == "\\":  # in double quotes, \" is a quote inside the value
        end = value.find(quote, end + 1)
    if end < 0:
        raise ConfigError(f"{where}: the value opens a {quote} quote that is never closed; "
                          "close it on the same line, or write the value without quotes")
    rest = value[end + 1:].strip()
    if rest and not rest.startswith("#"):
        raise ConfigError(f"{where}: unexpected text after the closing {quote} quote")
    inside = value[1:end]
    return inside.replace('\\"', '"') if quote == '"' else inside, end


def misspelt(key: str) -> str:
    """What to say of a key that is not a setting ("did you mean" one close to it); "" for a setting. A typo
    such as TOKEN_MODEL= would otherwise leave a token without the limit it was meant to have (issue 20)."""
    names = [setting.name for setting in SETTINGS]
    # What docker compose itself reads from the same .env (docker-compose.yml, .env.example), and what else a .env
    # may rightly set for the gateway's process (TZ, the time zone of /usage's days): no "did you mean".
    if key in names or key in ("MODELGATE_PORT", "COMPOSE_PROFILES", "COMPOSE_PROJECT_NAME", "COMPOSE_FILE", "TZ"):
        return ""
    close = difflib.get_close_matches(key.upper(), names, n=2, cutoff=0.8)
    return (f"{key} is not a setting of ModelGate; did you mean {' or '.join(close)}?" if close
            else f"{key} is not a setting of ModelGate; it is ignored (README.md lists the settings)")


class Sources(NamedTuple):
    """Where `python modelgate.py` found its settings, for the start-up summary: names, never values."""
    directory: str  # where .env was looked for
    dotenv: str | None  # the .env read, or None when there was none
    from_environment: tuple[str, ...]  # settings set in the environment: these win over .env
    overridden: tuple[str, ...]  # of those, the ones .env sets too, to no effect
    warnings: tuple[str, ...]  # .env lines ignored, keys that look misspelt


def read_settings(directory: str, environ: MutableMapping[str, str]) -> Sources:
    """Add what `directory/.env` sets to environ, where the environment does not set it to something."""
    from_environment = tuple(s.name for s in SETTINGS if environ.get(s.name, "").strip(" \t\r\n"))
    quoted = [QUOTED.format(name=name) for name in from_environment if wrapped_in_quotes(environ[name])]
    path: str | None = os.path.join(directory, ".env")
    try:
        values, warnings = read_dotenv(path)
    except FileNotFoundError:
        path, values, warnings = None, {}, []
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text; save it as UTF-8") from None
    for key, value in values.items():
        if not environ.get(key, "").strip(" \t\r\n"):  # set to nothing counts as not set, as for a default
            environ[key] = value
    overridden = tuple(name for name in from_environment if name in values)
    return Sources(directory, path, from_environment, overridden,
                   tuple(quoted + warnings + unknown_zone(environ.get("TZ", ""))))


# A TZ that names no zone file (a typo) and is no POSIX rule (which holds an offset: a digit) is UTC to the C
# library (glibc's tzset), without a word: the usage days, TOKEN_QUOTAS' midnight and the log's times with it.
def unknown_zone(zone: str) -> list[str]:
    name = zone.removeprefix(":")
    if name in ("", "UTC", "GMT") or any(c.isdigit() for c in name) or not zoneinfo.TZPATH or \
            any(os.path.isfile(os.path.join(directory, name)) for directory in zoneinfo.TZPATH):
        return []
    return [f"TZ={zone} is no time zone this system has (no such file in {', '.join(zoneinfo.TZPATH)}), so its "
            "time is UTC, and so are the usage days and TOKEN_QUOTAS' midnight: write a zone as the time zone "
            "database names it, such as Europe/Berlin, or a POSIX rule such as CET-1CEST,M3.5.0,M10.5.0/3"]


# `docker run --env-file` passes a .env line's value as it is written, quotes and all, where docker compose
# and read_dotenv take them off: MODEL_DEFAULTS='{...}', as the docs write it, arrives as not JSON (issue 20).
QUOTED = ("{name} is set in the environment with quotes around its value, as `docker run --env-file` passes a "
          ".env line (docker compose and ModelGate's own reading of .env take them off): there the quotes are part "
          "of the value; write that line without them")


def wrapped_in_quotes(value: str) -> bool:
    value = value.strip(" \t\r\n")
    return len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""


def summary(config: Config, sources: Sources | None, listening: str | None,
            environ: Mapping[str, str] = os.environ) -> list[str]:
    """The start-up summary (also what --check prints): what runs, where, with which upstreams, and where
    each setting came from. Names and counts only: never a token or key."""
    lines = [f"ModelGate {__version__}"] + ([listening] if listening else [])
    default = {config.default_provider: " (default provider)"}
    for number, url in enumerate(config.ollama_base_urls, 1):
        name = "ollama" if len(config.ollama_base_urls) == 1 else f"ollama/{number}"
        lines.append(f"{name}: {shown_url(url)}{default.get('ollama', '')}")
    lines.append(f"openai: {shown_url(config.openai_base_url)}{default.get('openai', '')}" if config.openai_api_key
                 else "openai: off (no OPENAI_API_KEY)")
    if sources is None:
        lines.append(".env: not read under `uvicorn modelgate:app` (give uvicorn --env-file .env)")
        from_environment = [s.name for s in SETTINGS if environ.get(s.name, "").strip(" \t\r\n")]
    else:
        lines.append(f".env: {sources.dotenv}" if sources.dotenv else f"no .env in {sources.directory}")
        from_environment = list(sources.from_environment)
    lines.append(f"tokens: {len(config.tokens)} ({', '.join(config.token_names)})")
    cloud = ", ".join(sorted(config.ollama_cloud_tokens)) or "no token (OLLAMA_CLOUD_TOKENS is empty)"
    lines.append(f"Ollama's cloud models and web search, run on ollama.com: for {cloud}")
    if config.ollama_num_parallel:
        shares = ", ".join(f"{name} {config.token_shares.get(name, 1.0):g}"
                           for name in dict.fromkeys(config.token_names))
        lines.append(f"queue: {config.ollama_num_parallel} request(s) at a time per Ollama host and model "
                     f"(OLLAMA_NUM_PARALLEL), waiting at most {config.queue_timeout:g} s; shares: {shares}")
    else:
        lines.append("queue: off (OLLAMA_NUM_PARALLEL=0): every request is sent to Ollama at once")
    lines += [f"policy: {s.name}: {POLICY_SHOWN[s.name](getattr(config, s.field))}" for s in SETTINGS
              if s.name in POLICY_SHOWN and getattr(config, s.field) != PARSERS[s.kind](s.name, s.default)]
    if config.model_overrides:  # shown as MODEL_DEFAULTS is
        lines.append("overrides: " + POLICY_SHOWN["MODEL_DEFAULTS"](config.model_overrides))
    winning = ", winning over .env" * bool(from_environment and sources is not None and sources.dotenv)
    return lines + [f"from the environment{winning}: {', '.join(from_environment) or 'no setting'}"]


# The settings that decide who may do what, shown in the start-up summary when they are on (not at their
# default), one line each: what the owner set is what runs, a typo shows as a line missing (issue 20).
POLICY_SHOWN: dict[str, Callable[[Any], str]] = {
    "ALLOWED_IPS": lambda networks: ", ".join(map(str, networks)),
    "TRUSTED_PROXIES": lambda networks: ", ".join(map(str, networks)),
    "CORS_ALLOW_ORIGINS": lambda origins: ", ".join(sorted(origins)) or "none",
    "OLLAMA_ADMIN_TOKENS": lambda names: ", ".join(sorted(names)) + " may pull, push, create, copy and delete",
    "METRICS_PUBLIC": lambda on: "GET /metrics needs no token",
    "TOKEN_MODELS": lambda scopes: ", ".join(f"{name}={'|'.join(patterns)}" for name, patterns in scopes.items()),
    "TOKEN_QUOTAS": lambda quotas: ", ".join(f"{name}={quota}" for name, quota in quotas.items()) + " tokens a day",
    "RATE_LIMIT_RPM": lambda rpm: f"{rpm} requests a minute per token",
    "MAX_CONCURRENT_PER_TOKEN": lambda most: f"{most} requests in flight per token",
    "MODEL_ALIASES": lambda aliases: ", ".join(f"{alias}={target}" for alias, target in aliases.items()),
    "MODEL_DEFAULTS": lambda patterns: ", ".join(f"{pattern} ({', '.join(fields)})" for pattern, fields in patterns),
}


def config_warnings(config: Config, sources: Sources | None) -> list[str]:
    """What is allowed but most likely a mistake, each with what to do instead."""
    warnings = list(sources.warnings) if sources is not None else []
    for name in sources.overridden if sources is not None else ():
        warnings.append(f"{name} is set in the environment, so the {name} in {sources.dotenv} is not used; "
                        f"to use the file's, unset it (unset {name}) and start again")
    for name, token in zip(config.token_names, config.tokens):
        if len(token) < 16:  # token_urlsafe(32) makes 43 characters
            warnings.append(f"MODELGATE_TOKEN: the token {name} is shorter than 16 characters, "
                            f"easy to guess for anyone who can reach the gateway; {TOKEN_HELP}")
    for url in config.ollama_base_urls:
        if not urlsplit(url).path.rstrip("/").endswith("/v1"):
            warnings.append(f"OLLAMA_BASE_URL {shown_url(url)} does not end in /v1, where Ollama's "
                            f"OpenAI-compatible API is: write {with_v1(url)}")
        if not names_itself(url, config):
            continue
        if config.port == 11434:  # Ollama's port, taken for ModelGate's
            warnings.append(f"PORT=11434 is Ollama's port, where OLLAMA_BASE_URL {shown_url(url)} points: ModelGate "
                            "must listen on another; leave PORT unset for 8010")
        else:
            warnings.append(f"OLLAMA_BASE_URL {shown_url(url)} is ModelGate's own address (PORT={config.port}), not "
                            "Ollama's: requests would go round in a circle. Ollama listens on port 11434: "
                            "write http://127.0.0.1:11434/v1 if it runs here")
    return warnings


def is_loopback(name: str) -> bool:
    """localhost, or a loopback address (127.0.0.0/8, ::1, also as ::ffff:127.0.0.1)."""
    return name == "localhost" or getattr(parse_ip(name), "is_loopback", False)


def names_itself(url: str, config: Config) -> bool:
    """Whether a base URL names ModelGate itself: PORT on HOST, or on loopback when HOST is 0.0.0.0, :: or loopback."""
    parts = urlsplit(url)
    if (parts.port or (443 if parts.scheme == "https" else 80)) != config.port:
        return False
    return parts.hostname == config.host or is_loopback(parts.hostname or "") and (
        is_loopback(config.host) or config.host in ("0.0.0.0", "::"))


def with_v1(url: str) -> str:
    """Where a base URL without /v1 most likely meant to point: the /v1 under its origin, or under its path."""
    parts = urlsplit(shown_url(url))
    path = parts.path.rstrip("/")
    # The URL of an endpoint (.../v1/chat/completions) is cut at its /v1; Ollama's native API (.../api) loses /api.
    path = path[:path.index("/v1/")] if "/v1/" in path else path.removesuffix("/api")
    return urlunsplit(parts._replace(path=path + "/v1"))


###############################################################################
# The trust boundary ##########################################################
###############################################################################

# Everything that decides who may do what, and what crosses the gateway in either direction, is in this section and
# nowhere else, in the order a request meets it (Go's x/net/http/httpproxy holds its rules the same way):
#   1. the client's address: ALLOWED_IPS, found through TRUSTED_PROXIES (screen);
#   2. its credentials: a token of MODELGATE_TOKEN (authorized), an admin's for the routes that change what
#      Ollama holds, and that token within TOKEN_QUOTAS, MAX_CONCURRENT_PER_TOKEN and RATE_LIMIT_RPM (admit);
#   3. its body (Route.reads): read within MAX_BODY_BYTES, BODIES_HELD per token and CLIENT_TIMEOUT_SECONDS (read_body),
#      its JSON read at a bounded cost in memory (parse_body), each model it names routed (MODEL_ALIASES: route_model)
#      and checked against TOKEN_MODELS and OLLAMA_CLOUD_TOKENS, a few edits (the model's name, MODEL_DEFAULTS and
#      MODEL_OVERRIDES, a stream's usage: routed_body); every other byte goes as it came;
#   4. the headers: the few of the client's that travel, those of an upstream's answer that return (crossing_headers);
#   5. what the log line may hold: never a body, a token or a key (log_exchange).


def screen(ex: Exchange, config: Config) -> None:
    address = parse_ip(ex.client)
    if address is not None and in_networks(address, config.trusted_proxies):  # one of our reverse proxies
        address = forwarded_client(ex.headers, config.trusted_proxies, address)
        if ex.header(b"x-forwarded-proto") == b"https":  # it serves HTTPS (Caddy says so): the page's URLs say https
            ex.scheme = "https"
    ex.client = "-" if address is None else str(address)
    if config.allowed_ips is not None and (address is None or not in_networks(address, config.allowed_ips)):
        raise GatewayError("ip_not_allowed", f"Requests from {ex.client} are not allowed here: this gateway "
                           "only serves the addresses in its ALLOWED_IPS.")


def parse_ip(text: str) -> Address | None:
    """An address from `1.2.3.4`, `1.2.3.4:80`, `::1` or `[::1]:80`, IPv4-mapped IPv6 as IPv4; else None."""
    if text.startswith("[") and "]" in text:
        text = text[1:text.index("]")]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    # A dual-stack socket shows an IPv4 client as ::ffff:a.b.c.d; ALLOWED_IPS lists it as a.b.c.d.
    return getattr(address, "ipv4_mapped", None) or address


def in_networks(address: Address, networks: tuple[Network, ...]) -> bool:
    return any(address in network for network in networks)  # False across IPv4 and IPv6, never an error


def forwarded_client(headers: Headers, trusted: tuple[Network, ...], proxy: Address) -> Address | None:
    """Behind trusted proxies (the peer, `proxy`, is one), the nearest X-Forwarded-For hop that is not one; None if no
    IP address. Each proxy appends the address it saw, so only hops trusted proxies added are skipped, from the right
    (uvicorn's proxy_headers.py); the rest is the client's. Another peer's header is never read (screen): it cannot
    talk past ALLOWED_IPS."""
    forwarded = b",".join(value for name, value in headers if name.lower() == b"x-forwarded-for")
    hops = [hop.strip() for hop in forwarded.decode("latin-1").split(",")] if forwarded else []
    for hop in reversed(hops):
        address = parse_ip(hop)
        if address is None or not in_networks(address, trusted):
            return address
    return parse_ip(hops[0]) if hops else proxy  # every hop a trusted proxy: the first one is the client

# Why a request is refused with 401 (ERRORS' "unauthorized"), in words that tell the person what to fix and
# tell nothing about the tokens the gateway holds: not how many, nor how close the one sent came.
AUTH_FAILURES = {
    "no credentials": "No token was sent. Put the gateway's token in the API key field of your app; it is sent "
                      "as `Authorization: Bearer <token>` (or as `x-api-key`, or as the password of HTTP Basic).",
    "empty token": "The request names no token: `Bearer` (or `x-api-key`) with nothing after it. Put the "
                   "gateway's token in the API key field of your app.",
    "basic user only": "HTTP Basic came with a user name and no password: the gateway's token goes in as the "
                       "password, not the user name (http://anything:<token>@<server>:8010, curl -u anything:<token>).",
    "not Bearer": "The Authorization header is neither `Bearer <token>` nor HTTP Basic with the token as the password. "
                  "Send the gateway's token as `Authorization: Bearer <token>` (the API key field of your app).",
    # Said only when the token inside is right (bare_token), as for its name.
    "token with more around it": "The token sent has more around it than the token: a `Bearer ` that the app "
                                 "adds itself, `MODELGATE_TOKEN=`, quotes, <>, or spaces copied with it. Put the "
                                 "token alone in the API key field of your app.",
    "unknown token": "The token sent (as `Authorization: Bearer`, `x-api-key` or a Basic password) is not one this "
                     "gateway accepts. Check it for a typo, or for an old token; whoever runs the gateway has the "
                     "tokens (MODELGATE_TOKEN).",
    # `fluentread:<token>` pasted whole from MODELGATE_TOKEN (issue 20). Which of the two is said depends on
    # the token after the name only, never on whether the name exists.
    "token with its name": "The token was sent with its name in front (`name:token`, as MODELGATE_TOKEN writes "
                           "it). Send the token without its name: only the part after the first ':'.",
    "unknown token with a name": "The token sent is not one this gateway accepts. It has a `name:` in front: "
                                 "MODELGATE_TOKEN writes `name:token`, and apps send the token without its name, "
                                 "only the part after the first ':'. Check the rest for a typo, or for an old token.",
    # A browser logged in to /usage with Basic sends it with any request to the gateway, from a form on another site too
    # (cross-site request forgery): Basic counts only from the gateway's own pages and with no Origin (no browser).
    "basic from another site": "HTTP Basic credentials came with a request from another site's page (its Origin "
                               "is not this gateway): a browser sends them wherever the gateway is asked. Apps "
                               "send the token as `Authorization: Bearer <token>` or `x-api-key`.",
}


def presented(headers: Headers) -> tuple[list[bytes], str, bool]:
    """The tokens a client sends, in the three ways clients do: `Authorization: Bearer <token>` (OpenAI SDKs, the
    ollama libraries), `x-api-key: <token>` (Anthropic SDKs, FluentRead's and kiss-translator's Claude services),
    HTTP Basic with the token as the password (`http://anything:<token>@gateway`, for a client that only takes a
    URL; llama-swap accepts the same); if none, why (AUTH_FAILURES); whether HTTP Basic was sent."""
    found, problems, basic = [], set(), False
    for name, value in headers:
        name = name.lower()
        if name not in (b"authorization", b"x-api-key"):
            continue
        # (x-api-key holds the token alone, as Bearer does)
        scheme, _, credential = value.strip().partition(b" ") if name == b"authorization" else (b"bearer", b"", value)
        scheme, credential = scheme.lower(), credential.strip()
        if scheme == b"basic":
            basic = basic or bool(credential)  # `Basic` alone is no Basic credentials (`not Bearer`)
            try:
                pair = base64.b64decode(credential, validate=True)
            except ValueError:  # binascii.Error
                pair = b""
            user, colon, credential = pair.partition(b":")  # RFC 7617: the user name holds no ':'
            if not colon or (user and not credential):
                problems.add("not Bearer" if not colon else "basic user only")
                continue
        elif scheme != b"bearer":
            problems.add("not Bearer" if scheme else "no credentials")
            continue
        if credential:
            found.append(credential)
        else:
            problems.add("empty token")
    return found, ("not Bearer" if "not Bearer" in problems else "basic user only" if "basic user only" in problems
                   else "empty token" if "empty token" in problems else "no credentials"), basic


def authorized(credentials: list[bytes], failure: str, tokens: tuple[bytes, ...], names: tuple[str, ...]) -> str:
    if len(set(credentials)) > 1:  # the same one twice is fine (Anthropic's SDKs may send both headers)
        raise GatewayError("ambiguous_credentials", "The request carries two different tokens (two Authorization "
                           "headers, or Authorization and x-api-key): send the gateway's token once.",
                           detail="two different tokens")
    # Every credential against every token, no early exit: the time taken does not tell which one (nearly) matched.
    matches = list(itertools.starmap(hmac.compare_digest, itertools.product(credentials, tokens)))
    if True in matches:
        return names[matches.index(True) % len(tokens)]
    if credentials:  # an unknown token; one sent as `name:token` is told to leave out its name
        bare = [credential.partition(b":")[2] for credential in credentials
                if TOKEN_NAME.fullmatch(credential.partition(b":")[0].decode("latin-1")) and b":" in credential]
        named = [hmac.compare_digest(credential, expected) for credential in bare for expected in tokens]
        failure = ("unknown token" if not bare else "token with its name" if True in named
                   else "unknown token with a name")
        around = [hmac.compare_digest(bare_token(credential), expected) for credential in credentials
                  for expected in tokens if bare_token(credential) != credential]
        failure = "token with more around it" if True in around else failure
    raise GatewayError("unauthorized", AUTH_FAILURES[failure], detail=failure)


def bare_token(credential: bytes) -> bytes:
    """A credential without what is copied around a token: quotes, spaces, a no-break space (one byte of Latin-1,
    as a browser's fetch sends it), <> (the README's <token>), `MODELGATE_TOKEN=` (.env's line), `Bearer ` again."""
    credential = credential.strip(b" \t\xa0\"'<>").removeprefix(b"MODELGATE_TOKEN=").strip(b" \t\xa0\"'<>")
    return credential[7:].strip(b" \t\xa0\"'<>") if credential[:7].lower() == b"bearer " else credential


# What a token not named in OLLAMA_ADMIN_TOKENS is told, by Route.access. /metrics names every app and the
# models each used, those the asking token may not use too (issue 17, hole 6).
ADMIN_ONLY = {
    "token": "The token named {name!r} may not pull, push, create, copy or delete models, nor read or end the "
             "ollama.com session of Ollama's owner: only the tokens named in OLLAMA_ADMIN_TOKENS may.",
    "metrics": "The token named {name!r} may not read /metrics: only the tokens named in OLLAMA_ADMIN_TOKENS may, "
               "or anyone who can reach it when the gateway's owner sets METRICS_PUBLIC=1.",
}


def admit(ex: Exchange, route: Route, config: Config, limits: Limits | None, usage: Usage | None = None) -> None:
    if route.access == "token" or (route.access == "metrics" and not config.metrics_public):
        credentials, failure, basic = presented(ex.headers)
        origin = ex.header(b"origin") if basic else b""
        if origin and origin.partition(b"://")[2] != ex.header(b"host"):  # HTTP Basic from another site's page
            raise GatewayError("unauthorized", AUTH_FAILURES["basic from another site"],
                               detail="basic from another site")
        try:
            ex.token = name = authorized(credentials, failure, config.tokens, config.token_names)
        except GatewayError as refused:
            if route.login:  # a browser then asks for a user name (any) and a password (the token)
                refused.headers.append((b"www-authenticate", b'Basic realm="ModelGate", charset="UTF-8"'))
            raise
        if (route.admin or route.access == "metrics") and name not in config.ollama_admin_tokens:
            raise GatewayError("admin_only", ADMIN_ONLY[route.access].format(name=name))
        if name in config.token_quotas and route.limited:  # not /usage: an app over its quota may see why
            within_quota(name, config.token_quotas[name], usage)
        if route.cloud and name not in config.ollama_cloud_tokens:
            raise cloud_refusal(name, f"{printable(ex.path)} runs on ollama.com")
        if limits is not None and route.limited:  # not /metrics: a scraper is not an app
            ex.holds_slot = limits if limits.admit(ex.token) else None


def within_quota(name: str, quota: int, usage: Usage) -> None:
    """TOKEN_QUOTAS: a token name whose tokens of today (the upstreams' own figures, USAGE_DB's day) reach its
    quota gets 429 until the gateway's local midnight. A request already running goes on to its end."""
    used, midnight = usage.used_today(name)
    if used < quota:
        return
    seconds = max(1, math.ceil(midnight - usage.clock()))
    resets = time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(midnight))
    raise GatewayError("quota_exceeded", f"The token named {name!r} has used its quota of {quota:,} tokens a day "
                       f"(TOKEN_QUOTAS): {used:,} today. It resets at midnight, {resets}, in {seconds // 3600} h "
                       f"{seconds % 3600 // 60} min.", [(b"retry-after", b"%d" % seconds), NO_RETRY])


class TokenBucket:
    """RATE_LIMIT_RPM per token name: a burst of `rpm` requests, then one every 60/rpm seconds."""

    def __init__(self, rpm: int) -> None:
        self.capacity, self.rate = float(rpm), rpm / 60
        self.buckets: dict[str, tuple[float, float]] = {}  # token name -> (requests left, when)

    def take(self, name: str, now: float) -> float:
        """0 when a request may go now (and it is taken from the bucket), else the seconds until one may."""
        level, then = self.buckets.get(name, (self.capacity, now))
        level = min(self.capacity, level + (now - then) * self.rate)
        self.buckets[name] = (level - 1 if level >= 1 else level, now)
        return 0.0 if level >= 1 else (1 - level) / self.rate


class Limits:
    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.rpm, self.bucket, self.metrics = 0, None, metrics
        self.reconfigure(config)
        self.in_flight: dict[str, int] = {}  # token name -> requests in flight

    def reconfigure(self, config: Config) -> None:
        """New limits (SIGHUP); the requests in flight stay counted, a bucket of the same size stays as it is."""
        self.max_in_flight = config.max_concurrent_per_token
        if config.rate_limit_rpm != self.rpm:
            self.rpm = config.rate_limit_rpm
            self.bucket = TokenBucket(self.rpm) if self.rpm else None

    def admit(self, name: str) -> bool:
        """Let a request of this token in, or raise a 429; True when it holds an in-flight slot to release."""
        in_flight = self.in_flight.get(name, 0)
        if self.max_in_flight and in_flight >= self.max_in_flight:
            self.metrics.rate_limited[name, "concurrency"] += 1
            # When one will finish cannot be known: a second is the shortest wait worth asking for.
            raise GatewayError("too_many_in_flight", f"This token already has as many requests in flight as "
                               f"MAX_CONCURRENT_PER_TOKEN allows ({in_flight}). Wait for one to finish.",
                               [(b"retry-after", b"1")])
        if self.bucket is not None and (wait := self.bucket.take(name, time.monotonic())):
            self.metrics.rate_limited[name, "rpm"] += 1
            seconds = math.ceil(wait)  # the SDKs wait exactly Retry-After: by then the bucket has one
            raise GatewayError("rate_limited", f"This token has used up its RATE_LIMIT_RPM ({self.rpm} requests a "
                               f"minute). Try again in {seconds} s.", [(b"retry-after", b"%d" % seconds)])
        if self.max_in_flight:
            self.in_flight[name] = in_flight + 1
        return bool(self.max_in_flight)

    def release(self, name: str) -> None:
        self.in_flight[name] -= 1


async def read_body(ex: Exchange, config: Config, held: dict[str, int]) -> bytes | None:
    """The body, or None if the client left mid-body; 413 past MAX_BODY_BYTES, 408 after CLIENT_TIMEOUT_SECONDS without
    more (both end the connection: Gateway.deliver); 429 past BODIES_HELD bodies a token (`held`: name -> bytes)."""
    limit, wait, name = config.max_body_bytes, config.client_timeout, ex.token

    def too_large() -> GatewayError:  # the errors are worded only when they happen: this is the hot path
        return GatewayError("body_too_large", f"The request body is larger than this gateway accepts "
                            f"({limit} bytes, MAX_BODY_BYTES).")

    length = ex.header(b"content-length")
    counted = int(length) if length.isdigit() else 0  # counted as it comes when it has no Content-Length
    if counted > limit:
        raise too_large()  # without reading it
    total = held.get(name, 0) + counted
    if total > BODIES_HELD * limit:
        raise too_many_bodies(total - counted, limit)
    held[name] = total
    ex.body_held = (name, counted)  # given back when the exchange ends (Gateway.__call__)
    chunks, size, more = [], 0, True
    while more:
        try:
            message = await wait_at_most(wait, ex.receive(), TimeoutError())
        except TimeoutError:
            raise GatewayError("body_timeout", f"The request body stopped arriving: nothing more of it came "
                               f"for {wait:g} s (CLIENT_TIMEOUT_SECONDS). The connection is closed.") from None
        if message["type"] == "http.disconnect":
            ex.status = 499
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large()
        if size > counted:  # no Content-Length: counted as it comes
            held[name], ex.body_held, counted = held[name] + size - counted, (name, size), size
            if held[name] > BODIES_HELD * limit:
                raise too_many_bodies(held[name], limit)
        chunks.append(chunk)
        more = message.get("more_body", False)
    ex.body_read = True
    encoding = ex.header(b"content-encoding")
    if not encoding:
        return b"".join(chunks)
    body = decoded_body(b"".join(chunks), encoding, limit)  # held decoded from now on: counted so
    held[name], ex.body_held = held[name] + len(body) - counted, (name, len(body))
    if held[name] > BODIES_HELD * limit:
        raise too_many_bodies(held[name], limit)
    return body


# A body is held in memory from its first byte to its request's end: twenty of 16 MiB stalled before their last byte
# took 360 MiB, and one token could open as many as the file limit allows (1,024 x 16 MiB). A token's requests hold at
# most this many bodies of MAX_BODY_BYTES at once; apps send kilobytes (a chat, a page), an image chat megabytes.
BODIES_HELD = 4


def too_many_bodies(held: int, limit: int) -> GatewayError:
    return GatewayError("too_many_in_flight", f"This token's requests in flight hold {held:,} bytes of request "
                        f"bodies: ModelGate holds at most {BODIES_HELD} bodies of MAX_BODY_BYTES ({limit:,} bytes) for "
                        "one token at once. Wait for one to finish.", [(b"retry-after", b"1")])


async def wait_at_most(seconds: float, awaitable: Awaitable[Any], timeout_error: Exception) -> Any:
    """Await with a deadline, else raise `timeout_error`: asyncio.wait_for before Python 3.12 drops a cancellation that
    comes as its awaitable finishes, and the client watch cancels once: a client leaving then would go unnoticed."""
    task, expired = asyncio.current_task(), False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    timer = asyncio.get_running_loop().call_later(seconds, expire)
    try:
        return await awaitable
    except asyncio.CancelledError:
        if not expired:
            raise
        if sys.version_info >= (3, 11):
            task.uncancel()  # our own deadline: not a cancellation of the task
        raise timeout_error from None
    finally:
        timer.cancel()


# Encoded bodies ---------------------------------------------------------------------------------------------
# A request body is read before anything is decided, and forwarded as read: one with a Content-Encoding the standard
# library decodes (gzip, as HTTP clients send it) is decoded, never past MAX_BODY_BYTES (a gzip bomb gets 413), and
# forwarded decoded without the header (Ollama's routes read no encoded body; only its cloud passthrough decodes zstd:
# server/cloud_proxy.go). Any other encoding is refused (415): a body whose model could not be read is never forwarded.
# Clients write one gzip member (Python's gzip, Go's and Node's), `cat a.gz b.gz` two; zlib copies all that follows
# each member (unused_data): 16 MiB of empty 20-byte members held the event loop for many minutes.
GZIP_MEMBERS = 16


def decoded_body(body: bytes, encoding: bytes, limit: int) -> bytes:
    encoding = encoding.strip().lower()
    if encoding in (b"", b"identity"):
        return body
    if encoding not in (b"gzip", b"x-gzip"):
        raise GatewayError("unsupported_encoding", "The request body is encoded as "
                           f"{printable(encoding.decode('latin-1'))!r} (Content-Encoding), which ModelGate cannot "
                           "decode to read the model it names. Send it as it is, or gzip-encoded.")
    parts, size = [], 0
    while body:  # one gzip member after another, as Go's gzip reader reads them
        if len(parts) == GZIP_MEMBERS:
            raise GatewayError("invalid_request", f"The request body is more than {GZIP_MEMBERS} gzip members one "
                               "after another: compress it as one.")
        decoder = zlib.decompressobj(31)  # zlib's wbits for a gzip member: 16 + 15
        try:
            part = decoder.decompress(body, limit - size + 1)
        except zlib.error as exc:
            raise GatewayError("invalid_request", f"The request body is not valid gzip ({exc}).") from None
        size += len(part)
        if size > limit:
            raise GatewayError("body_too_large", f"The request body decodes to more than this gateway accepts "
                               f"({limit} bytes, MAX_BODY_BYTES).")
        if not decoder.eof:
            raise GatewayError("invalid_request", "The request body is gzip that ends before its end.")
        parts.append(part)
        body = decoder.unused_data
    return b"".join(parts)


def routed_body(ex: Exchange, body: bytes, config: Config, cloud: CloudModels) -> tuple[dict, bytes]:
    """The JSON object, and the body as it goes upstream: every byte as the client sent it but the edits below."""
    if len(body) >= MIN_COUNTED_BODY:  # smaller bodies cost little whatever their shape
        bounded(body)
    try:
        if not body.isascii():
            check_utf8(body)
        document, spans = parse_body(body, ROUTE_FIELDS[ex.route])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # (a byte order mark: Notepad's, PowerShell 5's)
        mark = " It begins with a byte order mark: send UTF-8 without one." * (body[:2] in (b"\xef\xbb", b"\xff\xfe"))
        raise GatewayError("invalid_request", f"The request body is not valid JSON ({exc}).{mark}") from None
    except ValueError:  # valid JSON, but an integer longer than Python turns into an int (CVE-2020-10735)
        raise GatewayError("invalid_request", f"The request body holds an integer of more than "
                           f"{sys.get_int_max_str_digits()} digits, the most ModelGate reads.") from None
    except RecursionError:
        raise GatewayError("invalid_request", "The request body is nested too deeply to be read.") from None
    if document is None:
        raise GatewayError("invalid_request", "The request body must be a JSON object.")
    # One character per byte: a body of any script is held once more at its own size (decoded as UTF-8,
    # one emoji would make every character of it four bytes), and a span in it is a span of the body.
    text, route, edits, first = body.decode("latin-1"), ROUTES[ex.route], {}, None
    for group in route.models:
        found = named_model(ex, document, group, config, edits, text, spans, cloud)
        if found is None and first is None and route.model_required:  # (no route that needs one names two)
            raise GatewayError("invalid_request", "The request body needs a `model` string, "
                               "such as \"ollama/qwen2.5:7b\".")
        first = first or found
    if first is not None:
        ex.model, ex.routed = first
        ex.provider, ex.upstream_model = ex.routed.provider, ex.routed.name
    else:  # Ollama's show, pull, ... naming nothing: Ollama answers that itself
        ex.provider = ex.dialect.provider
    if "tools" in document:
        ex.web_tool = web_tool(document["tools"])
        check_tools(config, ex.token, ex.provider, ex.web_tool)
    if ex.token in config.token_models and ex.provider == "openai":
        unchecked = next((field for field in UNCHECKED if field in spans  # (on /v1/completions, `prompt` is its text)
                          and (field != "prompt" or ex.route == "/v1/responses")), "")
        check_fallbacks(config, ex.token, document, ex.upstream_model, unchecked)
    if ex.provider == "openai" and document.get("background") is True and ex.token in config.token_quotas:
        # OpenAI's Responses API runs it on after its answer (or its stream, the client gone), and the usage comes
        # with GET /v1/responses/{id}, which ModelGate does not serve (platform.openai.com/docs/guides/background).
        raise GatewayError("invalid_request", f"The token {ex.token!r} has a daily quota (TOKEN_QUOTAS), and a "
                           "background response (\"background\": true) would use tokens that no answer through "
                           "ModelGate reports. Send it without \"background\".")
    # Defaults and overrides are for running a model, not for Ollama's show, pull, create, copy and delete.
    if (config.model_defaults or config.model_overrides) and route.model_required:
        request_edits(text, spans, fields_for(config.model_defaults, ex.routed.id),
                      fields_for(config.model_overrides, ex.routed.id), edits)
    if route.asks_usage and document.get("stream") is True:
        ex.hides_usage = asked_for_usage(document, edits)
    # keep_alive 0 with nothing to run: Ollama unloads the model at once, before any turn (server/routes.go,
    # GenerateHandler and ChatHandler: expireRunner), and so it waits for none here (relayed). As Ollama will read
    # it: the owner's keep_alive if set, and only keys in lower case (Go's decoder reads "Prompt" as prompt too).
    if route.end is DONE_LINE:
        said = {key: text[slice(*spans[key])] if key in spans else "" for key in ("keep_alive", "prompt", "messages")}
        keep_alive = edits.get("keep_alive", said["keep_alive"])  # seconds (ollama-python: 0.0), or "0s"
        ex.unloads = (re.fullmatch(r'"?0+(\.0*)?([mnu]?s|m|h)?"?', keep_alive) is not None
                      and all(said[key] in ("", '""', "[]", "null") for key in ("prompt", "messages"))
                      and not any(key.casefold() in said and key not in said for key in spans))
    if edits:
        body = spliced(text, spans, edits).encode("latin-1")
    return document, body


# What a value ModelGate skips (checked for being JSON only) may cost: json's scanner builds it but drops its objects
# and numbers once read (_skip_value), so its arrays and the strings in them stay until it ends. Those are counted in
# bytes of memory per byte of body (issue 17, hole 4: 16 MiB of [[],[],...] made 466 MiB of lists); a body that would
# cost more than twice its size is a 413, and a chat with images, a batch of texts or of token ids costs less than one.
# Only brackets and commas outside strings count: a page to translate may be all commas (a CSV table, a list, code).
ARRAY_COST, ELEMENT_COST, STRING_COST, MAX_SKIP_COST = 88, 8, 30, 2  # STRING_COST: per unescaped quote
MIN_COUNTED_BODY = 256 * 1024  # smaller bodies cost at most about 9 MiB whatever their shape
MAX_READ_VALUE = 64 * 1024  # a value that ModelGate reads (READ_FIELDS, a model's name) is parsed whole
SHAPE_WINDOW = 1024 * 1024  # the body is split into strings and the rest this much at a time
NOT_BACKSLASH = re.compile(rb"[^\\]")


def bounded(body: bytes) -> None:
    limit = MAX_SKIP_COST * len(body)
    arrays, values, quotes = body.count(b"["), body.count(b","), body.count(b'"')  # the text in strings too
    if ARRAY_COST * arrays + ELEMENT_COST * values + STRING_COST * quotes > limit:
        quotes -= body.count(b'\\"')  # no more than begin and end strings: enough to refuse
        if STRING_COST * quotes <= limit:
            arrays, values, quotes = outside_strings(body)
    if ARRAY_COST * arrays + ELEMENT_COST * values + STRING_COST * quotes > limit:
        raise GatewayError("body_too_large", f"The request body holds so many arrays, values and strings for its "
                           f"size ({arrays} '[', {values} ',', {quotes} '\"' in {len(body)} bytes) "
                           "that reading it would take more than twice its size in memory. Real requests of this "
                           "size carry images, texts or token ids; send the values in fewer, larger pieces.")


def outside_strings(body: bytes) -> tuple[int, int, int]:
    """The '[' and ',' of a JSON body outside its strings, and the quotes that begin and end them. An escaped
    backslash, then an escaped quote, are taken out (as json's scanner reads them, from the left); the quotes
    left alternate. A window at a time, so that the pieces split off take a window's memory, not the body's."""
    arrays = values = quotes = at = 0
    while at < len(body):
        end = at + SHAPE_WINDOW
        if body[end - 1:end] == b"\\":  # a run of backslashes is never cut: its pairs count from its start
            more = NOT_BACKSLASH.search(body, end)
            end = more.end() if more else len(body)
        parts = body[at:end].replace(b"\\\\", b"").replace(b'\\"', b"").split(b'"')
        outside = b"".join(parts[quotes % 2::2])  # parts[0] is in a string when an odd number of quotes came before
        arrays, values, quotes = arrays + outside.count(b"["), values + outside.count(b","), quotes + len(parts) - 1
        at = end
    return arrays, values, quotes


def check_utf8(body: bytes, piece: int = 1024 * 1024) -> None:
    """UnicodeDecodeError unless the body is UTF-8 (RFC 8259 §8.1), decoded a MiB at a time and let go."""
    decoder, view = codecs.getincrementaldecoder("utf-8")(), memoryview(body)
    for at in range(0, len(body), piece):
        decoder.decode(view[at:at + piece], final=at + piece >= len(body))


def _number(text: str) -> None:
    if len(text) > 640:  # the least sys.set_int_max_str_digits allows: refused as json.loads would (CVE-2020-10735)
        if 0 < sys.get_int_max_str_digits() < len(text.lstrip("-")):  # (0: no limit; the sign is no digit)
            raise ValueError("integer too long")


_WHITESPACE = re.compile(r"[ \t\n\r]*")
_scan_value = json.scanner.make_scanner(json.JSONDecoder())
# bool: a builtin that drops what it is given (an object's pairs, a number's text), with no Python call. _number, a
# Python call per integer (3.3 million held the event loop 1.2 s), only for a body with 641 digits in a row somewhere.
_skip_value = json.scanner.make_scanner(json.JSONDecoder(object_pairs_hook=bool, parse_float=bool, parse_int=bool,
                                                         parse_constant=bool))
_skip_checked = json.scanner.make_scanner(json.JSONDecoder(object_pairs_hook=bool, parse_float=bool,
                                                           parse_int=_number, parse_constant=bool))
DIGITS_AS_ZEROS = bytes(48 if 48 <= byte <= 57 else 32 for byte in range(256))  # "0" for a digit, " " for the rest


def parse_body(body: bytes, read: frozenset[str]) -> tuple[dict | None, dict[str, tuple[int, int]]]:
    """The values of the top-level keys in `read` of the JSON object `body`, each parsed from its own bytes as UTF-8,
    and where each key's value lies (a key written twice: the last, as json.loads); None and {} for JSON that is no
    object; json.JSONDecodeError for what is not JSON (json's scanner checks each value, the digits of a \\u escape
    in the values it reads). A key in `read` written twice, or not in lower case, is a 400: Go's encoding/json
    (Ollama's) takes "Model" or "NAME" for "model", the last winning, and a server keeping the first of two runs a
    model other than the one checked."""
    ws = _WHITESPACE.match
    # Read a character per byte, each \u made \/ (as long, in the same strings), keys and read values from `body`:
    # json's scanner keeps an array's strings to its end, and an escape beyond Latin-1 makes one 2 or 4 bytes a
    # character; skipped one by one in Python instead, a long array held the event loop for 20 s (3.3 million numbers).
    skip = _skip_checked if len(body) > 640 and any(b"0" * 641 in body[at:at + SHAPE_WINDOW + 640].translate(
        DIGITS_AS_ZEROS) for at in range(0, len(body), SHAPE_WINDOW)) else _skip_value  # (a window's memory at most)
    escaped = b"\\u" in body
    text = (body.replace(b"\\u", b"\\/") if escaped else body).decode("latin-1")
    at, spans = ws(text, 0).end(), {}
    document: dict[str, Any] | None = {}
    try:
        if text.startswith("{", at):
            at = ws(text, at + 1).end()
            more = text[at] != "}"
        else:  # valid JSON that is not an object, once its end is checked; `at` on its last character, as on a `}`
            document, at, more = None, skip(text, at)[1] - 1, False
        while more:
            if text[at] != '"':
                raise json.JSONDecodeError("Expecting property name enclosed in double quotes", text, at)
            key, end = json.decoder.scanstring(text, at + 1)
            if not key.isascii() or escaped and "/" in key:  # the key as the client wrote it, in UTF-8
                key = json.loads(body[at:end])
            at = ws(text, end).end()
            if text[at] != ":":
                raise json.JSONDecodeError("Expecting ':' delimiter", text, at)
            at = ws(text, at + 1).end()
            end = skip(text, at)[1]
            folded = key.casefold()  # also Go's folds: "ſ" (U+017F) is an "s" to it, "K" (U+212A) a "k"
            if folded in read:
                if key in spans:
                    raise GatewayError("invalid_request", f"The request body has the key `{key}` twice; servers "
                                       "differ on which one they read: write it once.")
                if key != folded:
                    raise GatewayError("invalid_request", f"The request body has a key {key!r}, which Ollama reads "
                                       f"as `{folded}` whatever its case: write it once, as `{folded}` in lower case.")
                if end - at > MAX_READ_VALUE:
                    raise GatewayError("invalid_request", f"`{key}` in the request body is {end - at} bytes long, "
                                       f"more than any model name or stream option ({MAX_READ_VALUE}).")
                document[key] = json.loads(body[at:end])
            spans[key] = (at, end)
            at = ws(text, end).end()
            more = text[at] == ","
            if more:
                at = ws(text, at + 1).end()
            elif text[at] != "}":
                raise json.JSONDecodeError("Expecting ',' delimiter", text, at)
        if ws(text, at + 1).end() != len(text):
            raise json.JSONDecodeError("Extra data", text, ws(text, at + 1).end())
    except StopIteration as exc:
        raise json.JSONDecodeError("Expecting value", text, exc.value) from None
    except IndexError:
        raise json.JSONDecodeError("Expecting value", text, len(text)) from None
    return document, spans


def named_model(ex: Exchange, document: dict, fields: tuple[str, ...], config: Config, edits: dict[str, str],
                text: str, spans: dict[str, tuple[int, int]], cloud: CloudModels) -> tuple[str, Routed] | None:
    """The model that one tuple of Route.models names, as (what was sent, where it goes), each field that is set
    routed, checked (TOKEN_MODELS, check_cloud) and its new value put in `edits`; None when none is set (absent,
    null or "", which Go leaves empty). 400 when two of them name different models."""
    found = None
    for field in fields:
        model = document.get(field)
        if model is None or model == "":
            continue
        if not isinstance(model, str):
            raise GatewayError("invalid_request", f"`{field}` in the request body must be a string naming a model, "
                               "such as \"ollama/qwen2.5:7b\".")
        try:
            model.encode("utf-8")
        except UnicodeEncodeError:  # JSON's \ud800 escapes can put a lone surrogate in a string
            raise GatewayError("invalid_request", f"The model name {model!r} cannot be sent on: it holds a lone "
                               "surrogate, a \\ud800-\\udfff escape that is half of a pair and no character.") from None
        # Pulling or deleting "gpt-4o" means that name, not what an alias makes of it.
        routed = route_model(model, config, ex.dialect, aliases=not ROUTES[ex.route].admin)
        if found is not None and found[1].id != routed.id:
            raise GatewayError("invalid_request", f"The request body names two models: {found[0]!r} as `{fields[0]}` "
                               f"and {model!r} as `{field}`. Ollama would run only one of them: name it once.")
        if config.token_models:
            check_scope(config, ex.token, routed.id, model)
        if check_cloud(config, ex.token, routed.provider, routed.name, model, cloud):
            ex.unlisted.append((routed.name, model))
        if routed.aliased:
            edits[field] = json.dumps(routed.name)  # the target, from MODEL_ALIASES: ASCII-safe, like compact_json
        elif routed.name != model:  # the provider prefix cut, the rest of the value as written
            value, prefix = text[spans[field][0]:spans[field][1]], f'"{routed.provider}/'
            # (a prefix written with escapes, such as "ollama\/x", is written anew)
            edits[field] = '"' + value[len(prefix):] if value.startswith(prefix) else json.dumps(routed.name)
        found = found or (model, routed)
    return found


class Routed(NamedTuple):
    provider: str  # one of PROVIDERS
    name: str  # its name there: an alias's target, the provider prefix cut
    aliased: bool  # MODEL_ALIASES replaced what the client sent
    defaulted: bool  # it had no provider prefix, and went to DEFAULT_PROVIDER for want of one

    @property
    def id(self) -> str:
        return f"{self.provider}/{self.name}"  # as TOKEN_MODELS, MODEL_DEFAULTS and the model lists see it


def route_model(model: str, config: Config, dialect: Dialect = OPENAI, aliases: bool = True) -> Routed:
    """Where a model goes: an alias's target (unless `aliases` is off), then only the first `/` decides: `ollama/`
    or `openai/` names the provider, and anything else goes to DEFAULT_PROVIDER or, on a door that leads to one
    provider only (Ollama's own API, Anthropic Messages), there; another provider's prefix is refused."""
    target = config.model_aliases.get(model) if aliases else None
    model = target or model
    prefix, slash, name = model.partition("/")
    only = dialect.provider
    if not slash or prefix not in PROVIDERS:
        return Routed(only or config.default_provider, model, target is not None, only is None and target is None)
    if only is not None and prefix != only:
        raise GatewayError("invalid_request", f"Model {model!r} goes to {prefix}, but {dialect.door} leads to "
                           f"{only} only: name a model of {only}, as `{only}/<name>` or just `<name>`.")
    if prefix == "openai" and not config.openai_api_key:
        raise GatewayError("provider_not_configured", f"Model {model!r} asks for OpenAI, but this gateway has no "
                           "OPENAI_API_KEY. Use an ollama/ model, or ask the gateway's owner to set OPENAI_API_KEY.")
    if not name:
        raise GatewayError("invalid_request", f"Model {model!r} names no model after {prefix}/.")
    return Routed(prefix, name, target is not None, False)


def spellings(model_id: str) -> tuple[str, ...]:
    """`provider/name` as a pattern may name it: Ollama adds the tag, so `tiny` and `tiny:latest` match as each
    other; it drops whatever comes before `://` as a scheme (ParseNameBare, types/model/name.go), so
    `qwen://registry.ollama.ai/library/llama3` runs llama3, not a model that `ollama/qwen*` allows; a cloud model
    matches with either source suffix, as ollama_name spells them (`x:7b:cloud` is `x:7b-cloud`)."""
    provider, _, name = model_id.partition("/")
    if provider != "ollama":
        return (model_id,)
    name = name.partition("://")[2] or name
    base, colon, tag = name.rpartition(":")
    cloud = colon and (tag == "cloud" or tag.endswith("-cloud") and "/" not in tag)
    # One suffix only: Ollama refuses a second (ParseRef: "use either :local or :cloud, not both").
    name = "ollama/" + ((base if tag == "cloud" else f"{base}:{tag[:-6]}") if cloud else name)
    names = ((name, name.removesuffix(":latest")) if name.endswith(":latest")
             else (name, name + ":latest") if ":" not in name.rpartition("/")[2] else (name,))
    if cloud:
        names = (*(n + ":cloud" for n in names), *(n + "-cloud" for n in names if ":" in n.rpartition("/")[2]))
    return names


def matches(model_id: str, pattern: str) -> bool:
    return any(fnmatch.fnmatchcase(spelling, pattern) for spelling in spellings(model_id))


def may_use(config: Config, token: str, model_id: str) -> bool:
    patterns = config.token_models.get(token)
    return patterns is None or any(matches(model_id, pattern) for pattern in patterns)


def check_scope(config: Config, token: str, model_id: str, asked: str) -> None:
    """403 model_not_allowed unless the token may use the model: never the token, but its name."""
    if not may_use(config, token, model_id):
        via = f" (asked for as {asked!r})" if asked != model_id else ""
        raise GatewayError("model_not_allowed", f"The token {token!r} may not use the model {model_id!r}{via}: "
                           f"TOKEN_MODELS lets it use {' | '.join(config.token_models[token])}. Use one of "
                           "those, or ask the gateway's owner to add the model to its TOKEN_MODELS entry.")


def listed_as(models: Mapping[str, dict], model_id: str) -> dict | None:
    """The entry of `provider/name` in a model list; an Ollama model under any name Ollama finds it by
    (ollama_name: `tiny` is `tiny:latest`, as Ollama's own /v1/models/tiny answers)."""
    item = models.get(model_id)
    if item is None and model_id.startswith("ollama/"):
        wanted = ollama_name(model_id[7:])
        item = next((entry for key, entry in models.items()
                     if key.startswith("ollama/") and ollama_name(key[7:]) == wanted), None)
    return item


# Ollama's cloud -----------------------------------------------------------------------------------------------
# Ollama runs some models on ollama.com, under its owner's account (server/cloud_proxy.go): a model with the source
# suffix `:cloud` or a tag ending in `-cloud`, on every door, and a cloud stub under any local name (with a remote_host:
# server/routes.go proxies its requests). Web search and fetch run there too. Only the token names in
# OLLAMA_CLOUD_TOKENS may use them; others get 403 cloud_not_allowed before anything is sent, and lists without them.

# A tool whose `type` or `name` is or begins with one of these runs on the web: OpenAI's {"type": "web_search"}
# (and web_search_preview), Anthropic's web_search_20250305, Ollama's own web_search and web_fetch.
WEB_TOOLS = ("web_search", "web_fetch")


def check_cloud(config: Config, token: str, provider: str, name: str, asked: str, cloud: CloudModels) -> bool:
    """403 cloud_not_allowed for a cloud model (see above); True when Ollama's list of models does not say (it lacks
    the name, or it is older than CLOUD_LIST_SECONDS): then the list is fetched again and the name looked up again."""
    if provider != "ollama" or token in config.ollama_cloud_tokens:
        return False
    if cloud_suffix(name):
        raise cloud_refusal(token, f"The model {asked!r} is one of Ollama's cloud models: it runs on ollama.com")
    if stub := cloud_stub(cloud, name):
        raise cloud_refusal(token, f"The model {asked!r} is a cloud model in Ollama (pulled from ollama.com, it "
                            "lists a remote_host): it runs on ollama.com")
    return stub is None


def cloud_suffix(name: str) -> bool:
    """Whether Ollama takes the name for a cloud model whatever it holds (parseSourceSuffix after ParseRef's TrimSpace,
    internal/modelref/modelref.go, v0.32.15): after the last `:`, in any case and stripped, `cloud` or a tag ending in
    `-cloud` without `/` (host:port/path is no tag): gpt-oss:120b:cloud, gpt-oss:120b-cloud, qwen3-coder:CLOUD."""
    _, colon, suffix = name.strip().rpartition(":")
    suffix = suffix.strip().lower()
    return bool(colon) and (suffix == "cloud" or (suffix.endswith("-cloud") and "/" not in suffix))


def cloud_stub(cloud: CloudModels, name: str) -> bool | None:
    """Whether Ollama's list of models (CloudModels) shows the name as a cloud stub: True, or as a local model:
    False; None when the list lacks the name or is older than CLOUD_LIST_SECONDS."""
    now = time.monotonic()
    if now - cloud.fetched >= CLOUD_LIST_SECONDS or cloud.passed_over and (
            any(host.down_until <= now for host in cloud.passed_over)
            or all(host.down_until > now for host in cloud.hosts)):
        return None  # (a host left out of the list takes requests when it is up again, or when every host is down,
        # as Upstream.by_preference then tries them all: its list is read first)
    key = ollama_name(name)
    return True if key in cloud.stubs else False if key in cloud.local or cloud.no_tags else None


def ollama_name(name: str) -> str:
    """One spelling of an Ollama model's name, as Ollama finds a model (types/model/name.go fills in its registry,
    namespace and the tag `latest`; getExistingName matches in any case, as Go's strings.EqualFold and casefold() fold,
    not lower(): ſ is s, the Kelvin sign k): `tiny`, `Tiny:latest` and `registry.ollama.ai/library/tiny:latest` are one
    model. Of the source suffix (cloud_suffix), `:local` is dropped (Ollama runs `tiny:7b:local` as tiny:7b), and it
    sends `x:7b:cloud` and `X:7b-Cloud` to ollama.com as x:7b: both are x:7b-cloud, `x:cloud` x:latest-cloud."""
    name = name.strip().casefold()
    base, colon, source = name.rpartition(":")
    source, cloud = source.strip(), cloud_suffix(name)
    if colon and source in ("local", "cloud"):
        name = base
    elif cloud:
        name = f"{base}:{source[:-6]}"
    name = name.partition("://")[2] or name  # Ollama's ParseNameBare drops any scheme
    name = name.removeprefix("registry.ollama.ai/")
    # (library/agent/x, three parts, is host/namespace/model to ParseNameBare: agent/x at a registry named library)
    name = name.removeprefix("library/") if name.count("/") == 1 else name
    name = name if ":" in name.rpartition("/")[2] else name + ":latest"
    return f"{name}-cloud" if cloud else name


def cloud_refusal(token: str, what: str) -> GatewayError:
    return GatewayError("cloud_not_allowed", f"{what}, under the ollama.com account of this Ollama's owner, and the "
                        f"token {token!r} may not use Ollama's cloud: only the token names in OLLAMA_CLOUD_TOKENS may. "
                        "Use a local model, or ask the gateway's owner to add the token's name to OLLAMA_CLOUD_TOKENS.")


def unplaced(token: str, asked: str, failure: GatewayError) -> GatewayError:
    """For a token outside OLLAMA_CLOUD_TOKENS and a model that Ollama's list, unreadable now, cannot place: the failure
    that kept the list (502 or 504, which the SDKs retry: Ollama stopped, say), then what was not done. Not a 403, which
    says it is a cloud model and is never retried (issue 19: nothing goes to ollama.com on a guess)."""
    return GatewayError(failure.situation, f"{failure.message} Nothing was sent: Ollama's list of models (GET "
                        f"/api/tags) tells whether the model {asked!r} runs on ollama.com under the account of this "
                        f"Ollama's owner, and could not be read, and the token {token!r} may not use Ollama's cloud "
                        "(only the token names in OLLAMA_CLOUD_TOKENS may).", list(failure.headers), failure.detail)


def web_tool(tools: Any) -> str | None:
    """The type or name of the first web tool (WEB_TOOLS), the key in any case: Go reads "TYPE" as `type`."""
    for tool in tools if isinstance(tools, list) else ():
        for key, value in tool.items() if isinstance(tool, dict) else ():
            if (key.casefold() in ("type", "name") and isinstance(value, str)
                    and value.strip().lower().startswith(WEB_TOOLS)):
                return value
    return None


def check_tools(config: Config, token: str, provider: str, tool: str | None) -> None:
    if tool is not None and provider == "ollama" and token not in config.ollama_cloud_tokens:
        raise cloud_refusal(token, f"The tool {tool!r} searches or fetches the web through Ollama's cloud: it runs on "
                            "ollama.com")


def check_fallbacks(config: Config, token: str, document: dict, model: str, unchecked: str) -> None:
    """TOKEN_MODELS for each model a request to OpenAI's base URL names besides `model`, as `openai/<name>` (a router's
    name: `anthropic/claude-opus-4`): in FALLBACK_FIELDS, a preset, its tools (tool_models). 400 where what runs cannot
    be told: a list not of names (or LiteLLM's {"model": name}), a MODEL_TOOLS tool naming none, an UNCHECKED field."""
    if unchecked:
        raise GatewayError("invalid_request", f"The token {token!r} may use only some models (TOKEN_MODELS), and "
                           f"`{unchecked}` {UNCHECKED[unchecked]}")
    named, preset = [("model", model)], document.get("preset")
    for field in FALLBACK_FIELDS:
        values = document.get(field)
        named += [(field, name) for name in (values if isinstance(values, list) else () if values is None else (None,))]
    if preset is not None:
        named.append(("preset", f"@preset/{preset}" if isinstance(preset, str) else None))
    named += [("tools", name) for name in tool_models(document.get("tools"))]
    for field, name in named:
        name = name.get("model") if isinstance(name, dict) else name
        if not isinstance(name, str):
            raise GatewayError("invalid_request", f"`{field}` in the request body must name its models (`models` and "
                               "the fallbacks as a list of names, such as [\"openai/gpt-4o-mini\"], a tool that runs "
                               "a model by its `model`) for a token that TOKEN_MODELS limits: what it would run cannot "
                               "be told.")
        check_scope(config, token, f"openai/{name}", name)  # (`model` again: what follows is for it too)
        for each in name.split(",") if "," in name else ():  # LiteLLM runs each model of a list (route_llm_request.py)
            check_scope(config, token, f"openai/{each.strip()}", name)
        _, at, slug = name.lower().partition("@preset/")
        if at:
            check_scope(config, token, f"openai/@preset/{slug}", name)


# The fields that run models ModelGate cannot tell: a prompt stored with OpenAI (platform.openai.com/docs/guides/
# prompting); LiteLLM's router made of the request's `user_config` (docs.litellm.ai/docs/proxy/clientside_auth), and
# its fallbacks in `router_settings_override`, which its proxy sets from a key's settings, when it has any, and else
# takes from the body (proxy/litellm_pre_call_utils.py, proxy/route_llm_request.py).
UNCHECKED = {"prompt": "runs a prompt stored with OpenAI, with the model and tools stored with it, which ModelGate "
                       "cannot check. Send the prompt's text as `instructions` or `input`.",
             "user_config": "gives LiteLLM a router of the request's own, whose models ModelGate cannot check. Send "
                            "the request without it.",
             "router_settings_override": "gives LiteLLM's router fallbacks, models that ModelGate cannot check. Send "
                                         "the request without it."}

# Tools that run a model of their own, chosen by OpenAI or OpenRouter unless the tool names it (by the start of its
# type): OpenAI's image_generation (platform.openai.com/docs/guides/tools-image-generation), OpenRouter's server tools
# that make images, consult an advisor (which the model may name) or a panel of models and a judge
# (openrouter.ai/docs/guides/features/server-tools), and Anthropic's `advisor_20260301` on /messages.
MODEL_TOOLS = ("image_generation", "openrouter:image_generation", "openrouter:advisor", "openrouter:fusion", "advisor_")


def tool_models(tools: Any) -> list[Any]:
    """The models the tools run, as they name them (a tool's `model` and `parameters.model`: OpenAI reads the one,
    OpenRouter's server tools the other); None for a model that a tool of MODEL_TOOLS runs without naming it."""
    named, pending = [], list(tools) if isinstance(tools, list) else []
    for tool in pending:  # (it grows by the tools an advisor runs)
        if not isinstance(tool, dict):
            continue
        kind, parameters = tool.get("type"), tool.get("parameters")
        parameters = parameters if isinstance(parameters, dict) else {}
        own = [name for name in (tool.get("model"), parameters.get("model")) if name is not None]
        named += own or ([None] if isinstance(kind, str) and kind.startswith(MODEL_TOOLS) else [])
        if kind == "openrouter:fusion":
            panel = parameters.get("analysis_models")
            named += panel if isinstance(panel, list) else [None]
        advisors = parameters.get("advisors")
        profiles = [profile for profile in advisors if isinstance(profile, dict)] if isinstance(advisors, list) else []
        named += [profile["model"] for profile in profiles if profile.get("model") is not None]
        for part in (parameters, *profiles):
            pending += part["tools"] if isinstance(part.get("tools"), list) else []
    return named


def fields_for(patterns: tuple[tuple[str, dict[str, Any]], ...], model_id: str) -> dict[str, Any]:
    """The fields of MODEL_DEFAULTS or MODEL_OVERRIDES for the model: those of every pattern that matches it,
    the longest pattern's value first, objects merged key by key. An Ollama model is matched as Ollama finds it
    too (ollama_name): `Qwen2.5:7B` and `library/qwen2.5:7b` run qwen2.5:7b, and do not escape its override."""
    provider, _, name = model_id.partition("/")
    runs = f"ollama/{ollama_name(name)}" if provider == "ollama" else model_id
    merged: dict[str, Any] = {}
    for pattern, fields in patterns:
        if matches(model_id, pattern) or matches(runs, pattern):
            merged = over(merged, fields)
    return merged


def over(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """`second`'s members under `first`'s: a key of both keeps first's value; two objects are merged so too."""
    result = dict(first)
    for key, value in second.items():
        if key not in result:
            result[key] = value
        elif isinstance(result[key], dict) and isinstance(value, dict):
            result[key] = over(result[key], value)
    return result


def request_edits(text: str, spans: dict[str, tuple[int, int]], defaults: dict[str, Any],
                  overrides: dict[str, Any], edits: dict[str, str]) -> None:
    """What MODEL_DEFAULTS and MODEL_OVERRIDES change in the object `text`, as edits for spliced(): an override
    replaces the client's value, a default fills in what it lacks, key by key where both are objects (Ollama's
    `options`). 400 for a key that Go's decoder reads as one they set, written otherwise ("KEEP_ALIVE", "Options",
    "EFFORT" in reasoning): Ollama takes the last of the two (objects merged), so an app's own keep_alive after the
    override's would win, as parse_body refuses for `model` (in a map, such as options, Go keeps both: refused too)."""
    fields = {**defaults, **overrides}  # each field's value as its override has it, else as its default
    folded = {field.casefold(): field for field in fields}
    for key in spans:
        field = folded.get(key.casefold())
        if field is not None and key != field:
            raise GatewayError("invalid_request", f"The request body has a key {key!r}, which Ollama would read "
                               f"as `{field}` whatever its case: write it once, as `{field}`.")
    for field, value in fields.items():
        default, override = defaults.get(field), overrides.get(field)
        if field not in spans:
            if isinstance(default, dict) and isinstance(override, dict):
                value = over(override, default)
            edits[field] = compact_json(value)
        elif text[spans[field][0]] == "{" and isinstance(value, dict):
            inner, inner_edits = text[slice(*spans[field])], {}
            _, inner_spans = parse_body(inner.encode("latin-1"), frozenset())
            request_edits(inner, inner_spans, default if isinstance(default, dict) else {},
                          override if isinstance(override, dict) else {}, inner_edits)
            if inner_edits:  # else the body goes as it came: spliced anew, 10 MiB cost 34 ms and 19 MiB more
                edits[field] = spliced(inner, inner_spans, inner_edits)
        elif field in overrides:
            edits[field] = compact_json(value)


def asked_for_usage(document: dict, edits: dict[str, str]) -> bool:
    """For a stream whose client did not ask for usage, stream_options with include_usage in place of the client's,
    or added; True then (the usage event is ModelGate's). False when the client asked (include_usage true, written
    once), or sent stream_options that are not an object (left for the upstream to judge)."""
    options = document.get("stream_options")
    if options is not None and not isinstance(options, dict):
        return False
    # Go's decoder reads "INCLUDE_USAGE" as include_usage, the last one winning: only the lower-case key goes on.
    others = {key: value for key, value in (options or {}).items() if key.casefold() != "include_usage"}
    asked = options is not None and options.get("include_usage") is True
    if asked and len(others) == len(options) - 1:
        return False
    edits["stream_options"] = compact_json({**others, "include_usage": True})
    return not asked


def spliced(text: str, spans: dict[str, tuple[int, int]], edits: dict[str, str]) -> str:
    """The client's JSON object with the values of `edits` in place of its own, or added; every other byte as sent."""
    places, members = [], ""
    for key, value in edits.items():
        if key in spans:
            places.append((*spans[key], value))
        else:
            members += f",{compact_json(key)}:{value}"
    if members:
        last = max((end for _, end in spans.values()), default=None)
        if last is None:  # {} or { }: the first member needs no comma
            last, members = text.index("{") + 1, members[1:]
        places.append((last, last, members))
    parts, at = [], 0
    for start, end, value in sorted(places):
        parts += [text[at:start], value]
        at = end
    parts.append(text[at:])
    return "".join(parts)


def models_seen(models: Mapping[str, dict], config: Config, token: str, dialect: Dialect = OPENAI,
                names: tuple[str, ...] = ("id",), aliases: bool = True,
                cloud: CloudModels | None = None) -> list[tuple[str, dict]]:
    """A model list (`provider/name` -> entry) as a token sees it, as (name a client uses, entry) pairs: the models
    TOKEN_MODELS lets it use, then each alias of them (its provider configured and behind the door of `dialect`), as an
    entry of its own named by the alias under `names` (OpenAI's id; Ollama's name and model). With `cloud`, Ollama's
    cloud models (and aliases of them) are shown to the tokens in OLLAMA_CLOUD_TOKENS only."""
    def shown(model_id: str, item: dict) -> bool:
        provider, _, name = model_id.partition("/")
        return may_use(config, token, model_id) and not (
            cloud is not None and provider == "ollama" and token not in config.ollama_cloud_tokens
            and (cloud_suffix(name) or "remote_host" in item or cloud_stub(cloud, name)))

    seen = [(model_id, item) for model_id, item in models.items() if shown(model_id, item)]
    for alias in config.model_aliases if aliases else ():
        try:
            routed = route_model(alias, config, dialect)
        except GatewayError:
            continue
        item = listed_as(models, routed.id)
        if item is not None and shown(routed.id, item):
            seen.append((alias, {**item, **dict.fromkeys(names, alias)}))
    return seen


# Multipart forms (/v1/audio/transcriptions) ----------------------------------------------------------------
# Only the form's `model` field is read, as Ollama reads it (middleware/openai.go TranscriptionMiddleware:
# FormValue("model"), the first field of that name that is no file; Go's mime/multipart); the audio and every
# other byte go as they came. A form read less surely than Go would read it is refused, never forwarded.

# A part's name in RFC 2231's form (name*=, name*0=, name*1*=), and any parameter in pieces: Go's mime.ParseMediaType
# and Python's email join pieces differently (one written twice, one missing), and email raises TypeError for one both
# whole and in pieces. No client writes a name so; .NET's filename*= beside filename= stays readable.
PIECES = re.compile(rb"(?<!file)name\*|;[\s\x1c-\x1f]*\w+\*[0-9]")
# What Go's mime.ParseMediaType reads as name=model in a part's header: after `;` and `=`, spaces as Go's
# unicode.IsSpace has them (UTF-8's are bytes over 0x7f) or a folded line, then `model` as a token or quoted. Python's
# email may read none there (after a quoted \\, a header name holding a space, a no-break space).
GO_MODEL_FIELD = re.compile(rb'(?i:;[\s\x80-\xff]*name[\s\x80-\xff]*=[\s\x80-\xff]*)'
                            rb'(?:"model"|model(?![-!#$%&\'*+.^_`|~0-9A-Za-z]))')


def form_model(body: bytes, content_type: bytes) -> tuple[str, tuple[int, int]]:
    """The form's one `model` value and where it lies in the body; 400 for what ModelGate cannot read."""
    def unreadable(why: str) -> GatewayError:
        return GatewayError("invalid_request", f"The request body is not a multipart form ModelGate can read: "
                            f"{why}. Send multipart/form-data with a `model` field, as the OpenAI SDKs do.")

    header = email.message.Message()
    header["content-type"] = content_type.decode("latin-1")
    boundary = header.get_param("boundary")
    if header.get_content_type() != "multipart/form-data" or not isinstance(boundary, str) or not boundary:
        raise unreadable("its Content-Type is not multipart/form-data with a boundary")
    if b"\\" in content_type:  # in a quoted boundary, Go's mime.ParseMediaType unescapes \=, Python's email does not
        raise unreadable("its boundary holds a backslash")
    if b"*" in content_type:  # boundary*0=: Go's mime.ParseMediaType takes it over a plain boundary=, Python's not
        raise unreadable("its boundary is written as RFC 2231 allows (boundary*=)")
    delimiter = b"--" + boundary.encode("latin-1")
    newline = next((nl for nl in (b"\r\n", b"\n") if body.startswith(delimiter + nl)), None)
    if newline is None:
        raise unreadable("it does not start with its boundary")
    at, found, parts = len(delimiter), [], 0
    while not body.startswith(b"--", at):  # the last boundary line ends with `--`
        if not body.startswith(newline, at):
            raise unreadable("a boundary line holds more than the boundary")
        parts += 1
        if parts > 1000:  # as Go's mime/multipart reads no more (multipartmaxparts); 2.6 MB of them took the loop 3 s
            raise unreadable("it has more than 1000 parts")
        at += len(newline)
        end = body.find(newline + delimiter, at)
        head_end = body.find(newline * 2, at, end)
        if end < 0 or head_end < 0:
            raise unreadable("a part of it has no end or no header")
        head = body[at:head_end + len(newline)]
        # Go's reader ends a line at LF (a CR before it or not), and the header at its first empty line; Python's email
        # at a CR too: a line end of another kind than the boundary line's and the two read other fields, other values.
        if re.search(rb"[\r\n]", head.replace(newline, b"")):
            raise unreadable("a part's header has line ends of two kinds")
        if PIECES.search(head.lower()):
            raise unreadable("a part's name is written as RFC 2231 allows (name*=), or a parameter in pieces (*0=)")
        part = email.parser.BytesHeaderParser().parsebytes(head)
        # Every part that Go's reader may take for the `model` value counts: with any filename (Go takes
        # filename="" for a value, Python's get_filename also reads a Content-Type name), and with its name
        # encoded as RFC 2231 allows (name*=, which Go decodes, over a plain name too; email gives a tuple).
        names = [value for key, value in part.get_params([], header="content-disposition") if key == "name"]
        if "model" in map(email.utils.collapse_rfc2231_value, names):
            if part["content-transfer-encoding"] is not None or names != ["model"]:
                raise unreadable("its `model` field is encoded")
            try:
                filename = part.get_filename()
            except ValueError:  # filename*= in a charset Python's codecs refuse to decode with (idna, a NUL in it)
                filename = ""
            if filename is not None:
                raise unreadable("its `model` field is a file")
            found.append((head_end + 2 * len(newline), end))
        elif GO_MODEL_FIELD.search(head):
            raise unreadable("a part's header names a `model` field that ModelGate cannot read as Go's reader does")
        at = end + len(newline) + len(delimiter)
    if len(found) != 1:
        raise unreadable("it has no `model` field" if not found else "it has two `model` fields")
    start, end = found[0]
    try:
        return body[start:end].decode("utf-8"), (start, end)
    except UnicodeDecodeError:
        raise unreadable("its `model` is not UTF-8 text") from None


def routed_form(ex: Exchange, body: bytes, config: Config, cloud: CloudModels) -> bytes:
    model, (start, end) = form_model(body, ex.header(b"content-type"))
    if not model:
        raise GatewayError("invalid_request", "The form's `model` field is empty: name a model, such as "
                           "\"ollama/whisper\".")
    routed = route_model(model, config, ex.dialect)
    check_scope(config, ex.token, routed.id, model)
    if check_cloud(config, ex.token, routed.provider, routed.name, model, cloud):
        ex.unlisted.append((routed.name, model))
    # Noted once it is let through, as routed_body notes a JSON body's: a refused request logs no model.
    ex.model, ex.routed, ex.provider, ex.upstream_model = model, routed, routed.provider, routed.name
    return body if routed.name == model else body[:start] + routed.name.encode() + body[end:]


# Hop-by-hop headers (RFC 9110 §7.6.1, and RFC 2616 §13.5.1's that Go's reverse proxy keeps: libcurl still sends
# Proxy-Connection) describe one connection: they never cross the gateway, nor does a header that Connection names.
HOP_BY_HOP = frozenset({b"connection", b"proxy-connection", b"keep-alive", b"proxy-authenticate",
                        b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade"})

# Only these of the client's headers reach an upstream (Go's ProxyRequest, one-api's fresh request): Authorization and
# x-api-key hold the gateway's token, Cookie/Origin/Referer are the browser's, Host is ours (Ollama answers a foreign
# Origin or Host with an empty 403), X-Forwarded-* are unchecked. A dialect adds its own (Anthropic's version, beta).
FORWARDED_REQUEST_HEADERS = frozenset({b"content-type", b"accept", b"user-agent"})
# With each dialect's own, made once rather than per request (Gateway.dispatch: Exchange.forward).
TRAVELLING = {dialect.name: FORWARDED_REQUEST_HEADERS | dialect.forwarded for dialect in (OPENAI, OLLAMA, ANTHROPIC)}

# What of an upstream's response does not reach the client, besides hop-by-hop headers: uvicorn writes its own Date
# (and Server, if enabled), we compute Content-Length, CORS is ours, and an upstream's cookies belong to its domain.
DROPPED_RESPONSE_HEADERS = frozenset({b"content-length", b"date", b"server", b"set-cookie", b"alt-svc"})

# A header value that h11 sends (its _abnf.py field_value): an ASGI server may hand on one it would refuse to
# send, a NUL or a line break, and the upstream's request would fail as ModelGate's own fault (a 500).
SENDABLE_VALUE = re.compile(rb"(?:[^\x00 \t\n\r\x0b\x0c]+(?:[ \t]+[^\x00 \t\n\r\x0b\x0c]+)*)?")


def crossing_headers(headers: Headers, travel: frozenset[bytes] | None = None) -> Headers:
    """The headers that cross the gateway, names lowercased, order and duplicates kept, never a hop-by-hop one: of a
    client's request those in `travel`; of an upstream's answer all but DROPPED_RESPONSE_HEADERS and CORS's (ours)."""
    drop, kept = HOP_BY_HOP, []
    for name, value in headers:  # and every header that a Connection header names (RFC 9110 §7.6.1)
        if name.lower() == b"connection":
            drop = drop.union(token.strip().lower() for token in value.split(b","))
    for name, value in headers:
        name = name.lower()
        if name not in drop and (name in travel if travel is not None else
                                 name not in DROPPED_RESPONSE_HEADERS and not name.startswith(b"access-control-")):
            if travel is not None and not SENDABLE_VALUE.fullmatch(value := value.strip(b" \t")):
                raise GatewayError("invalid_request", f"The request header {name.decode('latin-1')!r} holds a NUL "
                                   "or a line break (CR, LF, vertical tab or form feed), which no header value may.")
            kept.append((name, value))
    return kept


# What a page may read of an answer besides the CORS-safelisted headers: the request id to report, how long to wait
# after a 429 or 503 and whether to try again at all (the openai and anthropic SDKs for JavaScript read Retry-After
# and x-should-retry, in a browser too: without the latter, a 429 over TOKEN_QUOTAS was slept on until midnight).
EXPOSED = (b"access-control-expose-headers", b"x-request-id, request-id, retry-after, x-should-retry")


def cors_headers(config: Config, origin: bytes) -> Headers:
    """Access-Control-Allow-Origin for an allowed origin; nothing (but no refusal) for another."""
    if "*" in config.cors_allow_origins:
        return [(b"access-control-allow-origin", b"*"), EXPOSED]
    if origin.decode("latin-1") in config.cors_allow_origins:
        return [(b"access-control-allow-origin", origin), EXPOSED, (b"vary", b"origin")]
    return []


def printable(text: str) -> str:
    # A path or model with a line break would forge a log line of its own.
    return text if text.isprintable() else ascii(text)


def exchange_fields(ex: Exchange, seconds: float) -> dict[str, Any]:
    prompt, completion = ex.usage or (None, None)
    return {"method": ex.method, "path": printable(ex.path), "status": ex.status, "provider": ex.provider,
            "model": printable(ex.model), "ms": round(seconds * 1000), "bytes": ex.bytes_out,
            "ttfb_ms": None if ex.ttfb is None else round(ex.ttfb * 1000),
            "queued_ms": None if ex.queued is None else round(ex.queued * 1000), "prompt_tokens": prompt,
            "completion_tokens": completion, "token": ex.token, "client": ex.client, "coalesced": ex.coalesced,
            "error": ex.error or None, "id": ex.request_id.decode("latin-1") or "-"}


def log_exchange(ex: Exchange, seconds: float) -> None:
    # log: a line per request; never bodies, tokens, keys or the Authorization header (LOG_FORMAT=json: exchange_fields
    # as an object). The record goes to handlers directly: log.info() would look up its caller, a third of the cost.
    if not log.isEnabledFor(logging.INFO):
        return
    prompt, completion = ex.usage or (None, None)
    # Its fields are separated by spaces: one in a path, a model or an upstream's request id would forge one.
    path, model = printable(ex.path).replace(" ", "\\x20"), printable(ex.model).replace(" ", "\\x20")
    request_id = printable(ex.request_id.decode("latin-1")).replace(" ", "\\x20") or "-"
    line = (f"{ex.method} {path} {ex.status} {ex.provider} {model} {seconds * 1000:.0f}ms {ex.bytes_out}B"
            + (f" ttfb={ex.ttfb * 1000:.0f}ms" if ex.ttfb is not None else "")
            + (f" queued_ms={ex.queued * 1000:.0f}" if ex.queued is not None else "")
            + (f" prompt_tokens={prompt}" if prompt is not None else "")
            + (f" completion_tokens={completion}" if completion is not None else "")
            + f" token={ex.token} client={ex.client}" + (" coalesced" if ex.coalesced else "")
            + (f" error={ex.error}" if ex.error else "") + f" id={request_id}")
    log.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, line, None, None, extra={"exchange": (ex, seconds)}))


###############################################################################
# The app: one request, from arrival to answer ################################
###############################################################################

JSON = (b"content-type", b"application/json")
# Headers the openai SDKs and translation tools send; echoed requests are checked against this shape.
CORS_DEFAULT_HEADERS = (b"authorization, content-type, user-agent, accept, x-requested-with, openai-beta, "
                        # the Anthropic SDKs, and FluentRead's and kiss-translator's Claude services
                        b"x-api-key, anthropic-version, anthropic-beta, anthropic-dangerous-direct-browser-access")
HEADER_LIST = re.compile(rb"[A-Za-z0-9!#$%&'*+.^_`|~, -]*")

# The one path segment after an Ollama prefix route (ollama_relay), as Ollama takes it: a blob digest; a key as written,
# base64url (server/routes.go, SignoutHandler). `..%2f..%2fdelete`, which uvicorn decodes, would reach /api/delete past
# a proxy that resolves dot segments; a %3F makes a query string, a %20 or %0A an unsendable request line (a 500).
SEGMENTS = {"/api/blobs/": (re.compile(r"sha256[:-][0-9a-f]{64}"), "is not a blob digest (sha256:<64 hex>)."),
            "/api/user/keys/": (re.compile(r"[A-Za-z0-9_=-]+"),
                                "is not a key: one path segment of base64url (letters, digits, - and _), no '/'.")}

# GET /usage (and its page, PAGE_HEADERS): one token's counts are for that token only; a page differs from the JSON.
USAGE_HEADERS = [(b"cache-control", b"no-store"), (b"vary", b"accept, authorization")]

SHUTTING_DOWN = "ModelGate is shutting down and sends nothing more upstream. Try again in a moment."

# What a running gateway cannot change on SIGHUP: its sockets, their TLS, and the usage file it holds open.
RESTART_SETTINGS = frozenset({"HOST", "PORT", "TLS_CERT_FILE", "TLS_KEY_FILE", "USAGE_DB"})

# What the upstreams are made of (Gateway.make_upstreams): a reload that changes none keeps them and their pools.
UPSTREAM_FIELDS = ("ollama_base_urls", "ollama_api_key", "openai_base_url", "openai_api_key", "timeout",
                   "connect_timeout")


def reload_line(old: Config, new: Config, changed: list[str]) -> str:
    """What a reload changed: tokens by name, settings by name; never a token or a key."""
    before, after = dict(zip(old.token_names, old.tokens)), dict(zip(new.token_names, new.tokens))
    parts = [f"{what}: {', '.join(names)}" for what, names in (
        ("tokens added", [name for name in after if name not in before]),
        ("tokens removed", [name for name in before if name not in after]),
        ("tokens replaced", [name for name in after if name in before and after[name] != before[name]]),
        ("settings changed", [name for name in changed if name != "MODELGATE_TOKEN"])) if names]
    return "reloaded: " + ("; ".join(parts) if parts else "nothing changed")


# GET / in a browser. The page runs no script, loads nothing and may not be framed.
PAGE_HEADERS = [(b"content-type", b"text/html; charset=utf-8"), (b"x-content-type-options", b"nosniff"),
                (b"content-security-policy", b"default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'")]

HOME_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ModelGate is running</title>
<style>
body { font: 17px/1.55 system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 42rem; margin: 3rem auto;
       padding: 0 1.25rem; color: #1d1d1f; background: #fff; }
h1 { font-size: 1.8rem; margin-bottom: .2rem; }
.version { color: #6e6e73; margin-top: 0; }
.url { font: 1.3rem ui-monospace, Menlo, Consolas, monospace; background: #f2f2f5; border-radius: 6px;
       padding: .6rem .9rem; user-select: all; overflow-wrap: anywhere; }
code { font-family: ui-monospace, Menlo, Consolas, monospace; background: #f2f2f5; border-radius: 4px;
       padding: .05rem .3rem; overflow-wrap: anywhere; }
</style>
</head>
<body>
<h1>ModelGate is running</h1>
<p class="version">Version {version}</p>
<p>This is an OpenAI-compatible gateway. Your apps talk to it at this base URL:</p>
<p class="url">{origin}/v1</p>
<p>Paste it where an app asks for the OpenAI base URL or API address, with the gateway's token as the API
key, and pick a model such as <code>ollama/qwen2.5:7b</code>. Apps that want the whole address of the
chat API (FluentRead, kiss-translator, Immersive Translate) take <code>{origin}/v1/chat/completions</code>;
apps that speak Ollama's own API (Open WebUI, Home Assistant, the ollama libraries) or Anthropic's take
<code>{origin}</code>.</p>
<p>How to set up each app: see <code>README.md</code>, beside <code>modelgate.py</code> where ModelGate was
installed, under "Point your tools at it".</p>
</body>
</html>
"""


def preflight(ex: Exchange, route: Route | None) -> Answer:
    """OPTIONS: no token needed; the CORS headers only for an allowed origin that asks for them. A path that is no
    route (None) passes too: a failed preflight is all a page would see of the 404 that says what to write instead."""
    handlers = route.handlers if route is not None else {}
    headers = [(b"allow", ", ".join([*handlers, "OPTIONS"]).encode())]
    if ex.cors and ex.header(b"access-control-request-method"):
        requested = ex.header(b"access-control-request-headers")
        if not requested or not HEADER_LIST.fullmatch(requested):
            requested = CORS_DEFAULT_HEADERS
        methods = b"GET, POST, OPTIONS, DELETE" if "DELETE" in handlers else b"GET, POST, OPTIONS"  # /api/delete
        headers += [(b"access-control-allow-methods", methods), (b"access-control-allow-headers", requested),
                    (b"access-control-max-age", b"7200")]  # Chromium caps a preflight cache at two hours
    return Answer(204, headers, b"")


def unrouted_dialect(path: str) -> Dialect:
    """The dialect of a path no route has: that of the routes around it. Ollama's under /api and /v1/api (the ollama
    client given a base URL with /v1), unless an OpenAI or Anthropic route follows /api (client_under_api); that of
    /v1/messages for /v1/v1/messages and /v1/messages/count_tokens (the anthropic SDK's, which Ollama lacks)."""
    path = re.sub("//+", "/", path)  # //api/chat, from a base URL with a / at its end: Ollama's, as /api/chat is
    path = path.removeprefix("/v1") if path.startswith(("/v1/api", "/v1/v1/")) else path
    if path == "/api" or path.startswith("/api/"):
        route = client_under_api(path)
        return ROUTES[route].dialect if route else OLLAMA
    route = ROUTES.get(path) or ROUTES.get(path[:path.rfind("/")] if path.startswith("/v1/") else path) or \
        next((ROUTES[endpoint] for endpoint in ENDPOINTS if path.startswith(endpoint + "/")), None)
    return route.dialect if route is not None else OPENAI


def client_under_api(path: str) -> str | None:
    """The route an OpenAI or Anthropic client given .../api (where Ollama's own API is) as its base URL asks for
    there: /api/chat/completions, /api/v1/chat/completions, /api/v1/messages; None for anything else under /api.
    Its 404 is then in that client's shape: the openai SDK shows no message of an "error" that is no object."""
    route = "/v1" + path.removeprefix("/api").removeprefix("/v1")
    return route if path.startswith("/api/") and route in ROUTES and ROUTES[route].dialect is not OLLAMA else None


# The whole URLs of the /v1 routes, which an app that wants the whole URL (FluentRead) takes, and a client that
# adds the route itself (the openai and anthropic SDKs, openai-translator) is given by mistake.
ENDPOINTS = tuple(path for path in ROUTES if path.startswith("/v1/") and not path.endswith("/"))


def not_found_message(path: str) -> str:
    for prefix, message in WRONG_BASE_URLS:
        if path.startswith(prefix):
            return message.format(path=path)
    for endpoint in ENDPOINTS:  # /v1/chat/completions/chat/completions, .../v1/chat/completions, .../models
        added = path.removeprefix(endpoint)
        if added != path and (added.startswith("/v1/") or f"/v1{added}" in ROUTES):
            base = "http://<server>:8010" + "/v1" * (not added.startswith("/v1/"))
            return (f"There is no {path} here: the client adds {added} itself, and its URL already ends in "
                    f"{endpoint}. Give it the base URL {base}; only an app that wants the whole URL (FluentRead) "
                    f"takes http://<server>:8010{endpoint}.")
    if route := client_under_api(path):  # OpenAI's clients add the route after /v1, Anthropic's with it
        added = route.removeprefix("/v1") if ROUTES[route].dialect is OPENAI else route
        return (f"There is no {path} here: the client adds {added} itself, and its base URL ends in "
                f"{path.removesuffix(added)}, where Ollama's own API is. Give it the base URL http://<server>:8010"
                + "/v1" * (ROUTES[route].dialect is OPENAI) + ".")
    if "//" in path and (single := re.sub("//+", "/", path)) in ROUTES:  # a script's base_url + "/chat/completions"
        return (f"There is no {path} here: it has // where one / belongs, as when a client that adds its own / is "
                f"given a base URL with a / at its end. Give it the base URL without that /, so that it asks for "
                f"{single}.")
    # Ollama's router redirects such a path to the route (gin's New: RedirectTrailingSlash is true): it worked there.
    if path.endswith("/") and path.rstrip("/") in ROUTES:
        return f"There is no {path} here: write it without the / at its end: {path.rstrip('/')}."
    if path in ("/v1", "/v1/"):
        return ("There is nothing at /v1 itself: it is the base URL, to which clients add /chat/completions, "
                "/models, /messages, ... An app that wants the whole URL (FluentRead) takes "
                "http://<server>:8010/v1/chat/completions.")
    if unrouted_dialect(path) is OLLAMA:
        return (f"There is no {path} here. Ollama's API here: /api/chat, /api/generate, /api/embed, "
                "/api/embeddings, /api/show, /api/tags, /api/ps, /api/version; for the tokens named in "
                "OLLAMA_ADMIN_TOKENS also /api/pull, /api/push, /api/create, /api/copy, /api/delete, /api/blobs.")
    unversioned = path in ("/chat/completions", "/completions", "/responses", "/embeddings", "/models")
    hint = f" Did you mean /v1{path}? Base URLs end in /v1." if unversioned else ""
    return (f"There is no {path} here.{hint} Routes: /v1/chat/completions, /v1/completions, /v1/responses, "
            "/v1/embeddings, /v1/models, /v1/messages, and Ollama's own under /api.")


def error_answer(error: GatewayError, ex: Exchange) -> Answer:
    body = ex.dialect.error(error.status, error.message, error.type, error.code)
    return Answer(error.status, [JSON, *error.headers], body)


class Gateway:
    """The ASGI application. Lifespan startup makes the config, the upstreams and the state below, a reload
    (SIGHUP) makes them anew for the requests that follow, and this object holds all the mutable state there is."""

    def __init__(self, environ: Mapping[str, str] = os.environ, *, ready_timeout: float = 2.0,
                 queue_bounds: tuple[int, int] | None = None, slot_clock: Callable[[], float] = time.monotonic,
                 clock: Callable[[], float] = time.time) -> None:
        self.environ = environ
        self.queue_bounds = queue_bounds or (MAX_QUEUED, MAX_QUEUED_BYTES)  # the queue's, unless told
        self.slot_clock = slot_clock  # what the queue measures slot time with
        self.clock = clock  # what the usage's days and TOKEN_QUOTAS' midnight are told by
        self.config: Config | None = None
        self.upstreams: dict[str, Upstream] = {}
        self.handlers = {path: {method: getattr(self, name) for method, name in route.handlers.items()}
                         for path, route in ROUTES.items()}
        # The mutable state, made afresh by startup where it depends on the config.
        self.metrics = Metrics()
        self.limits: Limits | None = None  # None: neither limit is set
        self.coalescer: Coalescer | None = None  # None: COALESCE=off
        self.queue: Queue | None = None  # None: OLLAMA_NUM_PARALLEL=0
        self.usage: Usage | None = None  # made at start-up
        self.readiness = Readiness(ready_timeout)
        self.cloud = CloudModels()
        self.cloud_report: asyncio.Task | None = None  # under `python modelgate.py`: the start-up log's cloud line
        self.watches: set[ClientWatch] = set()  # requests waiting on an upstream, for the shutdown grace
        self.bodies: dict[str, int] = {}  # token name -> bytes of request bodies its requests hold (read_body)
        self.closing = self.grace_over = False  # after SIGTERM; after SHUTDOWN_GRACE_SECONDS more
        self.grace_timer: asyncio.TimerHandle | None = None
        self.screening = False  # ALLOWED_IPS or TRUSTED_PROXIES is set
        # Set by `python modelgate.py`, for the start-up summary: where the settings came from, where it listens.
        self.sources: Sources | None = None
        self.listening: str | None = None

    # Handlers: ROUTES names them ----------------------------------------------

    async def looked_up(self, ex: Exchange) -> bool:
        """Ollama's list of models fetched again, for the models it lacked (or was old for), and each looked up
        once more: a cloud stub pulled or copied since is refused. False when the client left meanwhile."""
        config = self.config
        if await self.watched(ex, self.cloud.refresh(self.upstreams["ollama"])) is None:
            return False
        if self.config is not config and await self.watched(ex, self.readmit(ex)) is None:
            return False  # a reload came while Ollama listed its models: the settings of now decide
        self.placed(ex)
        return True

    def placed(self, ex: Exchange) -> None:
        for name, asked in ex.unlisted:
            unread = self.cloud.unread  # (the list could not be read: a name it lacks may be a stub there)
            if check_cloud(self.config, ex.token, "ollama", name, asked, self.cloud) and unread is not None:
                raise unplaced(ex.token, asked, unread)

    async def models(self, ex: Exchange) -> Answer | None:
        """GET /v1/models: every provider's models; /api/tags, /api/ps: every Ollama host's. Each once, as the token
        sees them (models_seen; no aliases on /api/ps); a provider or host that fails is left out."""
        ollama, native = self.upstreams["ollama"], ex.dialect is OLLAMA
        ex.provider = "ollama" if native else "+".join(self.upstreams)
        lists = ((ollama.get_json(ex.route.encode(), ex.forward, host, OLLAMA) for host in ollama.hosts) if native
                 else (upstream.list_models(ex.forward) for upstream in self.upstreams.values()))
        listed = await self.watched(ex, gather_answers(lists))
        if listed is None or isinstance(listed, Answer):
            return listed
        config = self.config
        if not native:
            models = {item["id"]: item for items in listed for item in items}
        else:
            models = {}
            for item in model_entries(listed, "models"):
                key = item.get("model", item.get("name")) if isinstance(item, dict) else None
                if isinstance(key, str):
                    models.setdefault(f"ollama/{key}", item)
        if ex.route == "/api/tags" and len(listed) == len(ollama.hosts):
            self.cloud.remember(listed)  # every host's list: as good as a fetch of the cloud list
        elif ex.token not in config.ollama_cloud_tokens and not await self.watched(ex, self.cloud.current(ollama)):
            return None
        names = ("name", "model") if native else ("id",)  # where an alias names its entry
        seen = models_seen(models, config, ex.token, ex.dialect, names, ex.route != "/api/ps", self.cloud)
        items = [item for _, item in seen]
        document = {"models": items} if native else {"object": "list", "data": items}
        return Answer(200, [JSON], json.dumps(document).encode())

    async def ollama_version(self, ex: Exchange) -> Answer | None:
        """GET and HEAD /api/version: the first Ollama host that answers (a host that refuses is passed over).
        HEAD is asked as GET and answered with its length, as Ollama's own HEAD route answers."""
        ex.provider = "ollama"
        return await self.watched(ex, relay(self, ex, self.upstreams["ollama"], b"/api/version", b"", stream=False,
                                            shared=True, method="GET"))

    async def ollama_relay(self, ex: Exchange) -> Answer | None:
        """A route of Ollama's that names no model, relayed as it is: /api/status, the account routes and blobs
        (admins only), web search and fetch (cloud tokens only); admit() has decided who may."""
        if ex.route in SEGMENTS:  # /api/blobs/<digest>, /api/user/keys/<key>
            pattern, not_one = SEGMENTS[ex.route]
            segment = ex.path.removeprefix(ex.route)
            if not pattern.fullmatch(segment):
                raise GatewayError("invalid_request", f"{printable(segment)!r} {not_one}")
        config = self.config
        body = await read_body(ex, config, self.bodies) if ex.method in ("POST", "DELETE") else b""
        if body is None:
            return None
        if self.config is not config:  # a reload came while the body did: the settings of now decide
            await self.readmit(ex)
        ex.provider = "ollama"
        return await self.watched(ex, relay(self, ex, self.upstreams["ollama"], ex.path.encode(), body, stream=False))

    async def ollama_root(self, ex: Exchange) -> Answer:
        """GET and HEAD /: what Ollama answers there, for the clients that probe it."""
        return Answer(200, [(b"content-type", b"text/plain; charset=utf-8"), (b"vary", b"accept")],
                      b"Ollama is running")  # Vary: a browser gets the page of home() at the same address

    async def model(self, ex: Exchange) -> Answer | None:
        """GET /v1/models/{id}: one model of the provider the id routes to (an alias: its target's entry, as the
        alias), or 404; outside the token's TOKEN_MODELS, 403 without asking the upstream."""
        ex.model = ex.path.removeprefix("/v1/models/")
        config = self.config
        try:
            routed = route_model(ex.model, config)
        except GatewayError as error:  # openai/... without OpenAI: no such model here
            raise GatewayError("model_not_found", error.message) from None
        ex.provider, wanted, name = routed.provider, routed.id, routed.name
        check_scope(config, ex.token, wanted, ex.model)
        if check_cloud(config, ex.token, ex.provider, name, ex.model, self.cloud):
            ex.unlisted.append((name, ex.model))
            if not await self.looked_up(ex):
                return None
        upstream = self.upstreams[ex.provider]
        if ex.provider == "ollama" and cloud_suffix(name):  # a cloud token's: Ollama asks ollama.com, as it is
            path = b"/models/" + quote(name, safe=":").encode()  # (cloudModelPathPassthroughMiddleware)
            return await self.watched(ex, relay(self, ex, upstream, path, b"", stream=False))
        listed = await self.watched(ex, upstream.list_models(ex.forward))
        if listed is None or isinstance(listed, Answer):
            return listed
        models = {item["id"]: item for item in listed}
        named = ex.model if routed.aliased else wanted
        # The last of that name: an alias (listed after the models) is routed before a model of its name.
        item = next((item for name, item in reversed(models_seen(models, config, ex.token)) if name == named), None)
        if item is not None:
            return Answer(200, [JSON], json.dumps(item).encode())
        if routed.aliased:
            raise GatewayError("model_not_found", f"Model {ex.model!r} stands for {wanted!r} (MODEL_ALIASES), "
                               f"which {upstream.name} does not have. GET /v1/models lists the models you can use.")
        item = listed_as(models, wanted)
        if item is not None:  # by another of its names (`tiny` for `tiny:latest`): as asked, as Ollama answers
            return Answer(200, [JSON], json.dumps({**item, "id": ex.model}).encode())
        raise GatewayError("model_not_found", f"Model {ex.model!r} was not found on {upstream.name}. "
                           "GET /v1/models lists the models you can use.")

    async def health(self, ex: Exchange) -> Answer:
        return Answer(200, [JSON], b'{"status":"ok"}')

    async def home(self, ex: Exchange) -> Answer:
        """GET /: a page for a person who opens the gateway's address in a browser (which asks for
        text/html); what Ollama answers for any other client. Nothing about the configuration or upstreams."""
        if b"text/html" not in ex.header(b"accept").lower():
            return await self.ollama_root(ex)
        host = ex.header(b"host").decode("latin-1")
        if not host and ex.server:  # HTTP/1.0 without Host: the address the request came in on (IPv6 in brackets)
            address, port = ex.server
            host = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        origin = html.escape(f"{ex.scheme}://{host}")  # the Host header is whatever the client wrote
        # The Host header is filled in last, so that nothing it holds is read as a placeholder.
        page = HOME_PAGE.replace("{version}", html.escape(__version__)).replace("{origin}", origin)
        return Answer(200, [*PAGE_HEADERS, (b"vary", b"accept")], page.encode())

    async def posted_to_root(self, ex: Exchange) -> Answer | None:
        """POST /: an app given the gateway's address as its whole URL (FluentRead's Claude service, issue 20): a 404
        saying what to write, in the shape of the API its headers are of; nothing goes upstream. Only the body's first
        part is looked at, the rest never waited for (the answer ends the connection): a client without a token that
        sent it a byte at a time, each within CLIENT_TIMEOUT_SECONDS, held a connection at will (issue 17)."""
        try:
            message = await wait_at_most(self.config.client_timeout, ex.receive(), TimeoutError())
        except TimeoutError:
            message = {"type": "http.request"}  # nothing came: the headers decide
        if message["type"] == "http.disconnect":
            ex.status = 499
            return None
        body = message.get("body", b"")
        # Anthropic's API requires anthropic-version, and its clients send the key as x-api-key.
        if ex.header(b"anthropic-version") or ex.header(b"x-api-key"):
            ex.dialect = ANTHROPIC
        elif any(field in body for field in (b'"messages"', b'"prompt"', b'"input"')):  # chat, completions, ...
            ex.dialect = OPENAI
        where = f"{ex.scheme}://{ex.header(b'host').decode('latin-1') or '<server>:8010'}"
        raise GatewayError("not_found", "POST / is not an API: this app was given the gateway's address as its whole "
                           "URL. " + ROOT_POSTED[ex.dialect.name].format(where=where))

    async def ready(self, ex: Exchange) -> Answer | None:
        """GET /ready: 200 when a host of the default provider lists its models, else 503 naming the failures."""
        upstream = self.upstreams[self.config.default_provider]
        ex.provider = upstream.name
        hosts = await self.watched(ex, self.readiness.check(upstream))
        if hosts is None:
            return None
        if "ok" not in hosts.values():
            failed = ", ".join(f"{host} {result}" for host, result in hosts.items())
            raise GatewayError("not_ready", f"Not ready: no {upstream.name} host listed its models within "
                               f"{self.readiness.timeout:g} s ({failed}).")
        return Answer(200, [JSON], json.dumps({"status": "ready", "upstreams": hosts}).encode())

    async def metrics_page(self, ex: Exchange) -> Answer:
        return Answer(200, [(b"content-type", METRICS_CONTENT_TYPE)], self.metrics.render(self.upstreams.values()))

    async def usage_page(self, ex: Exchange) -> Answer:
        """GET /usage: a token's own usage (an admin's: everyone's) of today and the last USAGE_DAYS days."""
        config, counts = self.config, self.usage.counts()
        names = {ex.token}
        if ex.token in config.ollama_admin_tokens:  # and the names that are gone from MODELGATE_TOKEN since
            names.update(config.token_names, (key[1] for key in counts))
        report = usage_report(counts, self.usage.today, USAGE_DAYS, names, config.token_quotas)
        if b"text/html" in ex.header(b"accept").lower():  # a browser
            return Answer(200, [*PAGE_HEADERS, *USAGE_HEADERS], usage_page(report))
        return Answer(200, [JSON, *USAGE_HEADERS], json.dumps(report).encode())

    # Lifespan and shutdown ------------------------------------------------------

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self.startup()
                except ConfigError as exc:
                    return await send({"type": "lifespan.startup.failed", "message": str(exc)})
                except Exception as exc:  # a bug of ours: fail start-up loudly rather than serve 500s
                    log.exception("start-up failed")
                    return await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for pending in (self.grace_timer, self.cloud_report):
                    if pending is not None:
                        pending.cancel()
                self.readiness.stop()
                self.cloud.stop()
                for upstream in self.upstreams.values():
                    upstream.retire()
                await self.usage.close()  # (made by startup, which came first: else this lifespan has returned)
                return await send({"type": "lifespan.shutdown.complete"})

    def startup(self) -> None:
        config = load_config(self.environ)
        if not log.handlers:  # under a bare `uvicorn modelgate:app`; main() sets it up itself
            setup_logging(config.log_format)
        # uvicorn's access log writes each request line with its query string, where a client may have put
        # a key (?api_key=...); ours (log_exchange) has the path only. Off however uvicorn was started.
        logging.getLogger("uvicorn.access").disabled = True
        logging.getLogger("asyncio").addFilter(departed_writes)  # once: addFilter keeps a filter once
        self.metrics = Metrics()
        self.upstreams = self.make_upstreams(config, self.metrics)
        self.limits = self.coalescer = self.queue = None
        self.apply(config)
        self.usage = Usage(config.usage_db, self.clock)
        self.usage.start()
        self.config = config
        for line in summary(config, self.sources, self.listening, self.environ):  # log: the start-up summary
            log.info("%s", line)
        if self.sources is not None:  # `python modelgate.py`: what Ollama's cloud offers, once it answers
            self.cloud_report = asyncio.ensure_future(self.report_cloud())
        for warning in config_warnings(config, self.sources):
            log.warning("%s", warning)

    async def report_cloud(self) -> None:
        try:  # log: whether Ollama's cloud is on, its cloud models, the tokens that may use them
            log.info("%s", await cloud_summary(self.config, self.upstreams["ollama"], self.cloud))
        except Exception:
            log.exception("could not ask Ollama about its cloud")

    @staticmethod
    def make_upstreams(config: Config, metrics: Metrics) -> dict[str, Upstream]:
        upstreams = {"ollama": Upstream("ollama", config.ollama_base_urls, config.ollama_api_key, config, metrics)}
        if config.openai_api_key:
            upstreams["openai"] = Upstream("openai", (config.openai_base_url,), config.openai_api_key, config, metrics)
        return upstreams

    def apply(self, config: Config) -> None:
        """The state that follows the settings, made or changed for `config`; what runs keeps what it holds."""
        self.cloud.forget(self.upstreams["ollama"])  # OLLAMA_BASE_URL may name other hosts: read their list anew
        # A feature that is off costs the request path one `if`.
        self.screening = config.allowed_ips is not None or bool(config.trusted_proxies)
        if not (config.rate_limit_rpm or config.max_concurrent_per_token):
            self.limits = None  # a request counted in the old Limits is released there (Exchange.holds_slot)
        elif self.limits is None:
            self.limits = Limits(config, self.metrics)
        else:
            self.limits.reconfigure(config)
        self.coalescer = (self.coalescer or Coalescer()) if config.coalesce else None
        if not config.ollama_num_parallel:
            if self.queue is not None:  # what waits there goes now, as what comes next does; slots go back to it
                self.queue.reconfigure(dataclasses.replace(config, ollama_num_parallel=self.queue.max_waiting))
            self.queue = None
        elif self.queue is None:
            self.queue = Queue(config, self.metrics, self.queue_bounds, self.slot_clock)
        else:
            self.queue.reconfigure(config)

    def reload(self, config: Config, sources: Sources | None) -> None:
        """SIGHUP: new requests get `config`; connections, streams, queued requests and counts carry on. What
        a running process cannot change (RESTART_SETTINGS) stays as it is, and the log says it needs a restart."""
        old = self.config
        kept = {s.field: getattr(old, s.field) for s in SETTINGS if s.name in RESTART_SETTINGS}
        changed = [s.name for s in SETTINGS if getattr(old, s.field) != getattr(config, s.field)]
        config = dataclasses.replace(config, **kept)
        if any(getattr(old, field) != getattr(config, field) for field in UPSTREAM_FIELDS):
            for upstream in self.upstreams.values():
                upstream.retire()  # the requests running through it keep it to their end; then nothing holds it
            self.upstreams = self.make_upstreams(config, self.metrics)
            self.readiness.expires = 0.0  # what the old hosts answered /ready says nothing of the new ones
        self.apply(config)
        if config.log_format != old.log_format:
            for logger in (log, logging.getLogger("uvicorn")):
                for handler in logger.handlers:
                    handler.setFormatter(log_formatter(config.log_format))
        self.sources, self.config = sources, config
        line = reload_line(old, config, changed)
        if not changed and sources is not None and sources.dotenv is None:  # Docker's env_file: `compose up -d`
            line += (f" (no .env in {sources.directory}: the settings are this process's environment, which a reload "
                     "cannot change; in a container made with an env_file, a changed .env takes docker compose up -d)")
        log.info("%s", line)  # log: what the reload changed, names only
        if restart := [name for name in changed if name in RESTART_SETTINGS]:
            log.warning("%s changed: that takes a restart; until then the gateway keeps the old value%s",
                        ", ".join(restart), "s" * (len(restart) > 1))
        for warning in config_warnings(config, sources):
            log.warning("%s", warning)

    async def readmit(self, ex: Exchange) -> Config:
        """Who may ask, judged again by the settings of now, for a request whose body came across a reload, whose model
        was looked up in Ollama's list across one (looked_up), or whose turn in the queue came after one or any wait
        (relayed). A body may come for as long as the client likes, a turn up to QUEUE_TIMEOUT_SECONDS later: judged by
        the settings of its head, a token revoked, off OLLAMA_CLOUD_TOKENS or OLLAMA_ADMIN_TOKENS, narrowed by
        TOKEN_MODELS, or an OPENAI_API_KEY removed (a 500) would still pass. Its MAX_CONCURRENT_PER_TOKEN slot stays."""
        config, route, name = self.config, ROUTES[ex.route], ex.token
        if self.screening and route.screened:
            screen(ex, config)
        try:
            admit(ex, route, config, None, self.usage)
        finally:  # (admit names the exchange by its new name before it refuses: not an admin now, over its quota)
            if ex.holds_slot is not None and ex.token != name:  # counted under its old name: given back under it
                ex.holds_slot.release(name)
                ex.holds_slot = None
        check_tools(config, ex.token, ex.provider, ex.web_tool)  # (None until its body is read: routed_body)
        if ex.routed is not None:  # its turn came in the queue after the reload (relayed): its model as routed then
            check_scope(config, ex.token, ex.routed.id, ex.model)
            if check_cloud(config, ex.token, ex.routed.provider, ex.routed.name, ex.model, self.cloud):
                ex.unlisted.append((ex.routed.name, ex.model))  # the reload forgot Ollama's list: read it again,
                await self.cloud.refresh(self.upstreams["ollama"])  # unwatched: a coalesced one's task is no client's
                self.placed(ex)
        return config

    def shut_down(self) -> None:
        """SIGTERM: send nothing new upstream, and cancel what still runs after SHUTDOWN_GRACE_SECONDS. main() calls
        this as the signal arrives: uvicorn waits for the open connections before the lifespan hears of it."""
        if self.config is None or self.closing:
            return
        self.closing = True
        log.info("shutting down: %d requests in flight (%d streams) get %g s to finish", self.metrics.in_flight,
                 self.metrics.streams, self.config.shutdown_grace)  # log: how much is left to finish
        self.grace_timer = asyncio.get_running_loop().call_later(self.config.shutdown_grace, self.end_grace)
        if self.queue is not None:
            self.queue.close()

    def end_grace(self) -> None:
        self.grace_over = True
        for watch in list(self.watches):
            watch.cancel("shutdown")  # streams end with an error event, requests still waiting get 503

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The one place where a request's outcome becomes its response, and its record is kept."""
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self.lifespan(receive, send)
            return
        ex = Exchange(scope, receive, send)
        self.metrics.in_flight += 1
        try:
            try:
                answer = await self.dispatch(ex)
            except GatewayError as error:
                ex.error = f"{error.situation} ({error.detail})" if error.detail else error.situation
                answer = error_answer(error, ex)
            if answer is not None:  # None: streamed already, or nobody is left to answer
                if answer.status >= 400 and not ex.error:
                    ex.error = "upstream_status"
                await self.deliver(ex, answer)
        except h11.LocalProtocolError:
            # uvicorn's h11 answered the request itself (400: a chunked body that is not chunked) as ours went out, and
            # closes the connection: nothing failed here. Over once it is closed, or uvicorn logs ours as unfinished.
            ex.status, ex.error = 400, "invalid_request (unreadable framing)"
            while (await ex.receive())["type"] != "http.disconnect":
                pass
        except Exception:
            log.exception("unexpected error in %s %s", ex.method, printable(ex.path))
            if ex.started:
                raise  # all we can do is abort the response: uvicorn closes the connection
            ex.error = "internal"
            await self.deliver(ex, error_answer(GatewayError("internal", "ModelGate failed unexpectedly; "
                                                             "its log says why."), ex))
        finally:
            self.metrics.in_flight -= 1
            if ex.holds_slot is not None:  # where it was counted: a reload may have changed self.limits since
                ex.holds_slot.release(ex.token)
            if ex.body_held is not None:  # under the name it was counted by: a reload may have renamed the token
                self.bodies[ex.body_held[0]] -= ex.body_held[1]
            seconds = time.perf_counter() - ex.t0
            if ex.ends is not None:  # what a plain answer says it used, read once, now
                ex.usage = tokens_used(ROUTES[ex.route].usage, *ex.ends)
            if ex.token != "-":
                self.usage.record(ex)
            self.metrics.record(ex, seconds)
            log_exchange(ex, seconds)

    async def dispatch(self, ex: Exchange) -> Answer | None:
        """Find the route, then decide who may ask (allowlist, token, limits), then hand over to its handler."""
        key = ex.path if ex.path in ROUTES else next(filter(ex.path.startswith, PREFIX_ROUTES), None)
        route = ROUTES.get(key)
        ex.dialect = route.dialect if route is not None else unrouted_dialect(ex.path)  # first: errors use it
        config = self.config
        if config is None:
            raise GatewayError("internal", "ModelGate was started without the ASGI lifespan; run it with "
                               "`python modelgate.py` or uvicorn's default --lifespan auto.")
        if origin := ex.header(b"origin"):
            ex.cors = cors_headers(config, origin)
        if ex.header(b"transfer-encoding") and ex.header(b"content-length"):
            # uvicorn's h11 reads it by its chunks; a front proxy going by Content-Length would count what follows them
            # as body, which we would run as the next request (request smuggling). RFC 9112 §6.1: an error, then close.
            raise GatewayError("ambiguous_framing", "The request has both Content-Length and Transfer-Encoding, "
                               "so where it ends is ambiguous; send one of them. The connection is closed.")
        if VIA[1] in ex.header(b"via"):  # before the token: our own request has none (Upstream.send)
            raise GatewayError("loop_detected", "This request came from this ModelGate itself: "
                               + LOOPED.format(url="OLLAMA_BASE_URL or OPENAI_BASE_URL"), [VIA])
        if self.screening and (route is None or route.screened):
            screen(ex, config)
        if route is None:  # a page's preflight passes, so that the request it clears reads the 404's hint
            if ex.method == "OPTIONS" and ex.header(b"access-control-request-method"):
                return preflight(ex, None)
            raise GatewayError("not_found", not_found_message(ex.path))
        ex.route = key
        if ex.method == "OPTIONS":
            return preflight(ex, route)
        handler = self.handlers[key].get(ex.method)
        if handler is None:
            allow = ", ".join([*route.handlers, "OPTIONS"])
            raise GatewayError("method_not_allowed", f"{ex.path} takes {allow}, not {ex.method}.",
                               [(b"allow", allow.encode())])
        if self.closing and not route.while_closing:
            raise GatewayError("shutting_down", SHUTTING_DOWN)
        admit(ex, route, config, self.limits, self.usage)
        if route.queued and self.queue is not None:  # its wait in the queue, shown also when it is refused
            ex.queued = 0.0
        crossed: tuple = ()  # what the boundary made of the body (Route.reads), for the handler
        if route.reads:
            body = await read_body(ex, config, self.bodies)
            if body is None:
                return None
            if self.config is not config:  # a reload came while the body did: the settings of now decide
                config = await self.readmit(ex)
            crossed = ({}, routed_form(ex, body, config, self.cloud)) if route.reads == "form" else \
                routed_body(ex, body, config, self.cloud)
            del body  # the body as read: an edited one goes upstream as a copy, and this one is no longer held
        ex.forward = crossing_headers(ex.headers, TRAVELLING[ex.dialect.name])
        return await handler(ex, *crossed)

    async def relay_request(self, ex: Exchange, document: dict, body: bytes) -> Answer | None:
        """The ROUTES rows that read a body: the body as the boundary made it (a form: no document), relayed."""
        route = ROUTES[ex.route]
        if ex.unlisted and not await self.looked_up(ex):
            return None
        upstream = self.upstreams[ex.provider]
        # /v1 routes live at the base URL (/v1/messages at its /messages), Ollama's own under its native base.
        path = (ex.path if ex.dialect.native else ex.path.removeprefix("/v1")).encode()
        stream = document.get("stream") is not False if route.streams_unless_false else document.get("stream") is True
        if not stream and self.coalescer is not None and route.shared:
            return await self.watched(ex, self.coalescer.answer(self, ex, upstream, path, body))
        try:
            answer = await self.watched(ex, relayed(self, ex, upstream, path, body, stream))
        finally:
            if route.admin:  # a model pulled, copied, created or deleted: a stub may now bear a local model's name
                self.cloud.forget()
        if answer is not None:  # (a stream relayed as it came has noted its usage itself)
            ex.ends = answer.ends
        return answer

    async def watched(self, ex: Exchange, awaitable: Awaitable[Any]) -> Any:
        """What `awaitable` returns, while a ClientWatch cancels it when the client leaves (then None, and
        the exchange is logged as 499) or when the shutdown grace is over (then 503 shutting_down)."""
        if self.grace_over:  # a request that got in just before SIGTERM and is only now ready to go upstream
            raise GatewayError("shutting_down", SHUTTING_DOWN)
        watch = ex.watch = ClientWatch(ex.receive, self.watches)
        try:
            result = await awaitable
        except BaseException as exc:
            reason = watch.claim(exc)
            if reason == "gone":  # whatever the awaitable ended with: nobody is left to answer
                ex.status = 499
                return None
            if reason == "shutdown" and isinstance(exc, asyncio.CancelledError):
                raise GatewayError("shutting_down", SHUTTING_DOWN) from None
            raise
        finally:
            watch.stop()
        if watch.reason == "gone":  # it left as the answer came: nobody to send it to
            ex.status = 499
            return None
        return result

    async def deliver(self, ex: Exchange, answer: Answer) -> None:
        """Write an answer held whole (plain or shared, a model list, an error) as a stream is written (issue 17): one
        larger than WRITE_PIECE in pieces, each sent once the client has taken the one before (uvicorn's send() waits
        so); a client that takes nothing for TIMEOUT_SECONDS is let go (499), the answer's memory with it. Until then it
        counts against MAX_CONCURRENT_PER_TOKEN; uvicorn alone would hold the rest as long as the client likes."""
        body = b"" if ex.method == "HEAD" else answer.body  # HEAD: its length only
        headers = [*answer.headers, (b"content-length", b"%d" % len(answer.body))]
        if not ex.body_read and (ex.header(b"content-length") not in (b"", b"0") or ex.header(b"transfer-encoding")):
            # An answer before the body is read (a refusal, most often) ends the connection: uvicorn's idle timer stops
            # at the first body byte for good, so a client that sent one and went silent held it for ever (issue 17).
            headers.append((b"connection", b"close"))
        if len(body) <= WRITE_PIECE:
            await ex.start(answer.status, headers)
            ex.bytes_out += len(body)
            return await ex.send({"type": "http.response.body", "body": body, "more_body": False})
        watch = ex.watch = ClientWatch(ex.receive, self.watches)
        watch.guard_sends(self.config.timeout)
        try:
            await ex.start(answer.status, headers)
            for at in range(0, len(body), WRITE_PIECE):
                await ex.write(body[at:at + WRITE_PIECE])
            await ex.write(b"", more=False)  # sent once the client has taken all but what the socket holds
        except asyncio.CancelledError as exc:
            reason = watch.claim(exc)
            if not reason:
                raise
            if reason == "gone":
                ex.status = 499
            else:
                ex.error = "shutting_down"  # cut: uvicorn closes the connection of an answer left unfinished
        finally:
            watch.stop()


class Exchange:
    """One request and its answer, grouped as uvicorn groups a request-response cycle."""

    __slots__ = ("method", "path", "scheme", "server", "headers", "receive", "route", "dialect", "client", "token",
                 "holds_slot", "hides_usage", "body_read", "unlisted", "send", "cors", "started", "status", "bytes_out",
                 "watch", "request_id", "forward", "ends", "provider", "model", "routed", "upstream_model", "usage",
                 "ttfb", "coalesced", "error", "t0", "host", "queued", "upstream_seconds", "spent", "web_tool",
                 "body_held", "unloads")

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The request
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.scheme: str = scope.get("scheme", "http")
        self.server: tuple[str, int] | None = scope.get("server")
        self.headers: Headers = scope["headers"]
        self.receive = receive
        self.route = "other"  # the route table's key, for metrics: never the raw path
        self.dialect = OPENAI  # the API it speaks: its route's
        peer = scope.get("client")
        self.client: str = peer[0] if peer else "-"  # the peer, or who it forwards for (TRUSTED_PROXIES)
        self.token = "-"  # the name of the client's token, once authorized
        self.forward: Headers = []  # its headers that may travel upstream, once admitted (crossing_headers)
        self.holds_slot: Limits | None = None  # counted there against MAX_CONCURRENT_PER_TOKEN until it ends
        self.hides_usage = False  # ModelGate asked for the stream's usage: the usage event is not the client's
        self.body_read = False  # read_body has read the request body to its end
        self.body_held: tuple[str, int] | None = None  # (token name, bytes) its body counts in Gateway.bodies
        self.unlisted: list[tuple[str, str]] = []  # Ollama models its list lacked: (name, as asked) (check_cloud)
        self.web_tool: str | None = None  # a tool in its body that runs on the web (check_tools)
        self.unloads = False  # it asks Ollama to unload its model, and runs nothing (routed_body)
        # The response
        self.send = send
        self.cors: Headers = []
        self.started = False  # http.response.start has been sent
        self.status = 0  # 499: the client left first
        self.bytes_out = 0
        self.watch: ClientWatch | None = None  # while it waits on an upstream
        # The log record
        self.request_id = b"%024x" % random.getrandbits(96)  # for finding a request in logs, not a secret
        self.provider = self.model = "-"
        self.upstream_model = "-"  # the model's name as it went upstream: an alias resolved, the prefix cut
        self.routed: Routed | None = None  # where the model it named went (route_model)
        self.usage: Spent | None = None  # what the upstream said the answer used (counted per token name)
        self.spent = False  # its usage was added to its token name's of today (TOKEN_QUOTAS): Usage.spend
        self.ends: tuple[bytes, bytes] | None = None  # a plain answer's start and end, where it says so (Answer)
        self.ttfb: float | None = None  # streams: seconds to the first chunk
        self.upstream_seconds = 0.0  # from sending upstream to the answer's end (a shared one: its first asker's)
        self.coalesced = False  # answered with an identical request's upstream answer
        self.error = ""  # the situation of an error answered, or what cut a stream
        self.t0 = time.perf_counter()
        # The queue
        self.host: Host | None = None  # the Ollama host it waited for its turn at
        self.queued: float | None = None  # seconds it waited for its turn, on a route that waits (Route.queued)

    def header(self, name: bytes) -> bytes:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return b""

    async def start(self, status: int, headers: Headers) -> None:
        self.status, self.started = status, True
        for name, value in headers:
            if name == b"x-request-id":  # the upstream's
                self.request_id = value
                break
        else:
            headers = [*headers, (b"x-request-id", self.request_id)]
        if self.dialect is ANTHROPIC:  # where the anthropic SDKs read an error's request_id from, as Anthropic sends it
            headers = [*headers, (b"request-id", self.request_id)]
        if self.queued is not None:  # browsers' developer tools show it with the request's timing
            headers = [*headers, (b"server-timing", b"queue;dur=%.1f" % (self.queued * 1000))]
        await self.send({"type": "http.response.start", "status": status, "headers": headers + self.cors})

    async def write(self, chunk: bytes, more: bool = True) -> None:
        """A chunk sent under the send guard of the exchange's watch (ClientWatch.guard_sends)."""
        watch = self.watch
        watch.sending_since = watch.loop.time()
        self.bytes_out += len(chunk)
        await self.send({"type": "http.response.body", "body": chunk, "more_body": more})
        watch.sending_since = None


class ClientWatch:
    """Cancels the request's task when the client disconnects (or stops reading: guard_sends), or when the shutdown
    grace is over, until stop(). uvicorn's send() does not raise once the client is gone, only receive() says so: while
    we wait on an upstream we also wait on receive() (from LISTEN_AFTER_SECONDS on), and stop the upstream request the
    moment the client leaves, so that Ollama stops generating for nobody. Each watch is in its gateway's `watches`
    while it runs: there the end of the shutdown grace finds what still waits on an upstream."""

    def __init__(self, receive: Receive, watches: set[ClientWatch]) -> None:
        self.task = asyncio.current_task()
        self.loop = asyncio.get_running_loop()
        self.reason = ""  # why this watch cancelled the task: "gone" or "shutdown"
        self.stopped = False
        self.watches = watches
        watches.add(self)
        self.listener: asyncio.Task | None = None
        self.listen_later = self.loop.call_later(LISTEN_AFTER_SECONDS, self._start, receive)
        self.sending_since: float | None = None  # loop time a chunk began to be sent, while it is
        self.send_check: asyncio.TimerHandle | None = None

    def _start(self, receive: Receive) -> None:
        self.listener = asyncio.ensure_future(self._listen(receive))

    async def _listen(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.cancel("gone")

    def cancel(self, reason: str) -> None:
        if not self.stopped and not self.reason:
            self.reason = reason
            self.task.cancel()

    def claim(self, exc: BaseException) -> str:
        """Why this watch cancelled the task, if it did ("" otherwise): the cancellation `exc` is then ours,
        handled by the caller, and no longer counts against the task (Python 3.11's uncancel)."""
        reason, self.reason = self.reason, ""
        if reason and isinstance(exc, asyncio.CancelledError) and sys.version_info >= (3, 11):
            self.task.uncancel()
        return reason

    def guard_sends(self, timeout: float) -> None:
        """A client that takes `timeout` to accept one chunk has stopped reading: count it as gone. uvicorn's send()
        waits while the client's socket is full, and meanwhile a stream would hold its upstream connection, an answer
        held whole its memory. One timer per answer looks every `timeout` seconds, or sooner for a send seen waiting."""
        loop = self.loop

        def check() -> None:
            if self.sending_since is not None and loop.time() - self.sending_since >= timeout:
                self.cancel("gone")
            elif not self.stopped:  # (`timeout` from now would let a send that began just after it wait twice that)
                since = loop.time() if self.sending_since is None else self.sending_since
                self.send_check = loop.call_later(since + timeout - loop.time(), check)

        self.send_check = loop.call_later(timeout, check)

    def stop(self) -> None:
        self.stopped = True
        for pending in (self.listen_later, self.listener, self.send_check):
            if pending is not None:
                pending.cancel()
        self.watches.discard(self)


# A client given a base URL that ends in /v1 where it adds /v1 (the Anthropic SDKs) or /api (the ollama
# libraries) itself, or one ending in /api where it adds /api: what to write instead.
WRONG_BASE_URLS = (
    ("/v1/v1/", "There is no {path} here: the client adds /v1 itself (the Anthropic SDKs do), and its base URL ends "
                "in /v1 too. Give it the base URL without /v1, such as http://<server>:8010."),
    ("/v1/api", "There is no {path} here: the ollama client adds /api itself, and its base URL ends in /v1. Give it "
                "the base URL without /v1, such as http://<server>:8010."),
    ("/api/api/", "There is no {path} here: the ollama client adds /api itself, and its base URL ends in /api too. "
                  "Give it the base URL without /api, such as http://<server>:8010."),
)

ROOT_POSTED = {
    "anthropic": "Anthropic clients take the base URL {where} and add /v1/messages; an app that wants the whole URL "
                 "takes {where}/v1/messages.",
    "openai": "OpenAI clients take the base URL {where}/v1; an app that wants the whole URL (FluentRead) takes "
              "{where}/v1/chat/completions.",
    "ollama": "OpenAI clients take {where}/v1, Anthropic and Ollama clients {where}, and add their own paths.",
}

# Ollama stops generating when its connection closes; 50 ms of it for nobody costs nothing worth a task: a task per
# request was an eighth of a plain request's whole cost (instructions counted under callgrind), and an answer that
# comes sooner has nothing to cancel. A client that left before the listener starts is seen at once (receive()).
LISTEN_AFTER_SECONDS = 0.05


###############################################################################
# Coalescing identical requests in flight #####################################
###############################################################################

@dataclasses.dataclass(slots=True, eq=False)
class Flight:
    """One upstream request that identical requests share (COALESCE): its task, and how many wait for it."""
    task: asyncio.Task
    owner: Exchange  # the request it runs for: its wait in the queue is everyone's
    config: Config  # the settings it was let in by: a reload may give its token's name to another token
    waiters: int = 0
    counted: bool = False  # a waiter has taken the answer's usage: tokens used once are counted once


class Coalescer:
    """COALESCE: a request that is not streamed shares the upstream answer of an identical one in flight: the same
    token, provider, path, body and forwarded headers (an anthropic-beta may change the answer), let in by the same
    settings (a reload may give a token's name to another token). The upstream request runs in a task of its own, so
    that one client leaving does not end it for the others; the last to leave cancels it. Done, it is forgotten."""

    def __init__(self) -> None:
        self.flights: dict[tuple, Flight] = {}

    async def answer(self, gw: Gateway, ex: Exchange, upstream: Upstream, path: bytes, body: bytes) -> Answer:
        key = (ex.token, upstream.name, path, body, tuple(ex.forward))
        flight = self.flights.get(key)
        if flight is None or flight.config is not gw.config:  # (its owner is judged again when its turn comes)
            flight = self.flights[key] = Flight(asyncio.ensure_future(
                self.flown(key, relayed(gw, ex, upstream, path, body, stream=False, shared=True))), ex, gw.config)
        else:
            ex.coalesced = True
            gw.metrics.coalesced[(ex.token,)] += 1
        flight.waiters += 1
        try:
            answer = await asyncio.shield(flight.task)
        finally:
            flight.waiters -= 1
            if not flight.waiters and not flight.task.done():
                flight.task.cancel()  # nobody is left to answer: none joins it from now on
                # asyncio.shield reads its failure no more: read here, or asyncio logs it as never retrieved
                flight.task.add_done_callback(lambda task: task.cancelled() or task.exception())
                if self.flights.get(key) is flight:
                    del self.flights[key]
                await asyncio.wait((flight.task,))  # its wait for a turn and upstream: noted before its log line
        if ex is not flight.owner and flight.owner.queued is not None:
            ex.queued = flight.owner.queued
        if not flight.counted:  # the first to get the answer counts its tokens, even when the asker has left
            flight.counted, ex.ends, ex.spent = True, answer.ends, flight.owner.spent  # (spent: for its quota)
        return answer

    async def flown(self, key: tuple, answer: Awaitable[Answer]) -> Answer:
        """A flight's task: the answer, and the flight forgotten as soon as it is done (answer() reads its failure)."""
        try:
            return await answer
        finally:
            flight = self.flights.get(key)
            if flight is not None and flight.task is asyncio.current_task():
                del self.flights[key]


###############################################################################
# The queue ###################################################################
###############################################################################

# Ollama runs OLLAMA_NUM_PARALLEL requests per model at once and keeps the rest in one FIFO that knows nothing
# of who sent them (server/sched.go, useLoadedRunner; ollama #1956), so a translation extension's burst of
# paragraphs holds up a chat for as long as it lasts. ModelGate knows the app behind each request: it holds
# the queue itself. Per Ollama host and model (the name as sent, `name` and `name:latest` one model, as
# Ollama has them), at most OLLAMA_NUM_PARALLEL inference requests are upstream at once; the others wait
# here, and a slot that frees goes to the token name whose turn it is:
#
# Turns. Each token name waiting or running at a host and model has had some slot time there, divided by its share
# (TOKEN_SHARES, 1 unless set), since it last had nothing waiting or running there. A free slot goes to the name that
# has had the least (a running request counts the time it has run so far); within a name, requests go in the order they
# came. A name that comes back after it had nothing there starts from the least that any name now there has had, neither
# owing for its past turns nor owed for its absence: the virtual time of start-time fair queuing (Goyal, Vin and Cheng,
# "Start-time Fair Queuing", SIGCOMM 1996), with service measured once it is done rather than guessed from a packet's
# length, as a generation's length is not known. So an app that had been idle goes next, and two that keep waiting get
# turns in proportion to their shares. A slot is never left free while a request that could use it waits: with several
# hosts, one whose slot frees with nothing waiting for it takes the next turn of its model at another (Queue.lend).
#
# What waits holds its body. The whole queue holds at most MAX_QUEUED requests and MAX_QUEUED_BYTES of bodies;
# beyond either, 503 queue_full. 1,000 is five of Read Frog's bursts of 200 (read-frog constants/translate.ts)
# and far more than a household's apps send at once; 256 MiB is sixteen bodies of MAX_BODY_BYTES' default. One app
# may fill it, but not keep the others out: a request of a name that holds less of it than another takes the place
# of that name's last request, which gets the 503 (longest queue drop: Suter, Lakshman, Stiliadis and Choudhury,
# "Design considerations for supporting TCP with per-flow queueing", INFOCOM 1998).
MAX_QUEUED = 1000
MAX_QUEUED_BYTES = 256 * 1024 * 1024

# Retry-After of queue_full and queue_timeout: how long the wait for a slot will last cannot be known; the
# openai SDKs wait what it says (up to 60 s) and try again.
QUEUE_RETRY_AFTER = b"10"


async def relayed(gw: Gateway, ex: Exchange, upstream: Upstream, path: bytes, body: bytes, stream: bool,
                  shared: bool = False) -> Answer | None:
    """relay(), in its turn: to Ollama, on a route that runs a model, the request waits for a slot of
    the host chosen now and its model (The queue), and gives it back when the relay has ended."""
    queue = gw.queue
    if queue is None or upstream.name != "ollama" or not ROUTES[ex.route].queued or ex.unloads:
        return await relay(gw, ex, upstream, path, body, stream, shared)
    ex.host = upstream.hosts[0] if len(upstream.hosts) == 1 else upstream.by_preference()[0]  # Upstream.send's choice
    config, since, ticket = gw.config, time.perf_counter(), None
    try:
        ticket = await queue.turn(ex.token, ex.host, ex.upstream_model, len(body))
        # It goes to the host whose slot it got (another's: Queue.lend), unless that one is gone (a reload) or passed
        # over (it refused a connection): then it waits again, in its place, for the slots of the host it goes to now,
        # beside whose OLLAMA_NUM_PARALLEL it would otherwise run (Upstream.send).
        while ticket.waited:
            ex.host = gw.upstreams[upstream.name].by_preference(ticket.key[0])[0]
            if ex.host.base_url == ticket.key[0]:
                break
            queue.release(ticket, lend=False)  # (a slot there lent to another would come back here)
            number, ticket = ticket.waited, None
            ticket = await queue.turn(ex.token, ex.host, ex.upstream_model, len(body), number)
    finally:  # how long it waited (or was refused after): none when a slot was free
        if ticket is None or ticket.waited:
            ex.queued = time.perf_counter() - since
        observe(gw.metrics.queue_waits, (ex.token,), ex.queued or 0.0, QUEUE_BUCKETS)
    answer = None
    try:
        # A reload came while it waited, or the answers it waited behind used its app's quota, or a host came back or
        # went down (one Ollama's list of models was read without may take it now): it is judged again, by now.
        if gw.config is not config or ticket.waited:
            await gw.readmit(ex)
            if gw.upstreams[upstream.name] is not upstream:  # and where it goes: the hosts whose list judged it
                upstream = gw.upstreams[upstream.name]
                ex.host = next((host for host in upstream.hosts if host.base_url == ex.host.base_url), None)
        answer = await relay(gw, ex, upstream, path, body, stream, shared)
        return answer
    finally:
        if ex.token in gw.config.token_quotas:  # its tokens count before the slot goes to the next turn, its app's too
            ends = answer.ends if answer is not None else None  # a plain answer's; a stream has noted them
            gw.usage.spend(ex, ex.usage if ends is None else tokens_used(ROUTES[ex.route].usage, *ends))
        queue.release(ticket)


class Waiter:
    """One request waiting for a slot; its future is given a Ticket when its turn comes."""

    __slots__ = ("share", "size", "number", "future", "host", "timer")

    def __init__(self, share: Share, size: int, number: int, future: asyncio.Future, host: Host) -> None:
        self.share, self.size, self.number, self.future, self.host = share, size, number, future, host
        self.timer: asyncio.TimerHandle | None = None


@dataclasses.dataclass(slots=True, eq=False)
class Share:
    """One token name at one host and model, while it has something waiting or running there."""
    token: str
    weight: float
    since: float  # where it started from (the least any other name there had had then)
    waiters: deque[Waiter] = dataclasses.field(default_factory=deque)
    running: list[float] = dataclasses.field(default_factory=list)  # when each running request got its slot
    used: float = 0.0  # slot time of its finished requests since; divided by weight only when compared, so
    # that equal turns compare equal (six turns of a third are not quite two in floating point)

    def had(self, now: float) -> float:
        return self.since + (self.used + sum(now - started for started in self.running)) / self.weight


@dataclasses.dataclass(slots=True, eq=False)
class Slots:
    """One host and model: how many requests it runs and has waiting, and the token names there."""
    running: int = 0
    waiting: int = 0
    shares: dict[str, Share] = dataclasses.field(default_factory=dict)


class Ticket(NamedTuple):
    """A slot taken, to be given back with Queue.release."""
    key: tuple
    slots: Slots
    share: Share
    started: float
    waited: int  # its turn came in the queue: its number in the order of arrival (Waiter); 0: a slot was free at once


class Queue:
    """OLLAMA_NUM_PARALLEL slots per Ollama host and model, and the requests that wait for one, in turns.

    turn() returns a Ticket at once while a slot is free, else when the request's turn comes, or raises GatewayError
    queue_full, queue_timeout or shutting_down; when the waiting task is cancelled (the client left) the request leaves
    the queue. release() gives the slot to the next turn. Slots and names with nothing waiting or running are
    forgotten, so that the clients' model names cannot make it grow."""

    def __init__(self, config: Config, metrics: Metrics, bounds: tuple[int, int], clock: Callable[[], float]) -> None:
        self.max_waiting, self.max_bytes = bounds
        self.clock = clock  # what slot time is measured with
        self.slots: dict[tuple, Slots] = {}
        self.waiting = self.bytes = 0  # in the whole queue
        self.arrivals = 0  # numbers the waiters in the order they came
        # token name -> [bytes of its waiters' bodies, its waiters in the order they came -> (key, slots)]: the room
        # check_room makes costs a look at each name, not at each waiter (a refused request of the app that fills it)
        self.names: dict[str, list] = {}
        self.closed = False
        self.metrics = metrics
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """New settings (SIGHUP) for the requests waiting and to come: more slots give turns now, and a new
        share decides the next turns of a name already there. What it has had so far stays as it was counted:
        only the slot time from now on is divided by the new weight."""
        self.parallel, self.timeout = config.ollama_num_parallel, config.queue_timeout
        self.weights, now = config.token_shares, self.clock()
        for key, slots in list(self.slots.items()):
            for share in slots.shares.values():
                weight = self.weights.get(share.token, 1.0)
                share.since += (share.had(now) - share.since) * (1 - share.weight / weight)
                share.weight = weight
            self.give_turns(key, slots, now)

    async def turn(self, token: str, host: Host, model: str, size: int, number: int = 0) -> Ticket:
        """A slot for a request of `size` bytes: at once while one is free, with no task switch (the cost of
        the queue when it is not full), else when its turn comes; `number`: its place in the order of arrival,
        kept from a wait for another host (relayed)."""
        # The host by its URL: a reload that makes new upstreams (Gateway.reload) keeps its queue and its slots. The
        # model as Ollama finds it (ollama_name): `Tiny`, `tiny:latest` and `library/tiny` are one model and one queue.
        key = (host.base_url, ollama_name(model))
        slots = self.slots.get(key) or self.slots.setdefault(key, Slots())
        share = slots.shares.get(token)
        if share is None:
            shares = slots.shares
            since = min(s.had(self.clock()) for s in shares.values()) if shares else 0.0
            share = shares[token] = Share(token, self.weights.get(token, 1.0), since)
        if slots.running < self.parallel:
            return self.start(key, slots, share, number)
        try:
            self.check_room(size, token)
        except GatewayError:
            self.forget(key, slots, share)
            raise
        return await self.wait(key, slots, share, size, host, number)

    def start(self, key: tuple, slots: Slots, share: Share, waited: int = 0) -> Ticket:
        started = self.clock()
        slots.running += 1
        share.running.append(started)
        return Ticket(key, slots, share, started, waited)

    def release(self, ticket: Ticket, lend: bool = True) -> None:
        key, slots, share, started, _ = ticket
        now = self.clock()
        slots.running -= 1
        share.running.remove(started)
        share.used += now - started
        if slots.waiting:
            self.give_turns(key, slots, now)
        elif self.waiting and lend and slots.running < self.parallel:  # (a reload may have lowered parallel)
            self.lend(key, slots, now)
        self.forget(key, slots, share)

    def forget(self, key: tuple, slots: Slots, share: Share) -> None:
        if not share.waiters and not share.running:
            slots.shares.pop(share.token, None)
            if not slots.shares:
                self.slots.pop(key, None)

    def lend(self, key: tuple, slots: Slots, now: float) -> None:
        """A slot freed with nothing waiting for it: the next turn of its model at another host runs here (the hosts
        hold the same models: docs/deploy.md), rather than wait there behind a long answer while this host idles."""
        while other := next(((k, s) for k, s in self.slots.items() if k[1] == key[1] and s.waiting), None):
            turn = self.next_turn(other[1], now)
            waiter = turn.waiters[0]
            self.leave(*other, waiter)
            if not waiter.future.cancelled():  # (one that left just now is taken out here, as many as there are)
                shares = slots.shares  # its token name here, as it would be had it come here (turn)
                share = shares.get(turn.token) or shares.setdefault(turn.token, Share(
                    turn.token, turn.weight, min((s.had(now) for s in shares.values()), default=0.0)))
                return waiter.future.set_result(self.start(key, slots, share, waiter.number))

    def check_room(self, size: int, token: str) -> None:
        """Room for a request of `size` bytes of the name `token`: made, when the queue is full, by taking out the
        last request of the name that holds the most of it, as long as that is more than `token` would, and only when
        that makes room (else one would be pushed out and its place left empty); else queue_full."""
        if self.closed:
            raise GatewayError("shutting_down", SHUTTING_DOWN)
        waiting, queued, out = self.waiting, self.bytes, []  # the queue as it would be without `out`
        held = {name: [len(waiters), size_] for name, (size_, waiters) in self.names.items()}
        lasts: dict[str, Iterator[Waiter]] = {}  # each name's waiters, the last first
        while waiting >= self.max_waiting or queued + size > self.max_bytes:
            by = 0 if waiting >= self.max_waiting else 1  # requests, else bytes
            most = max(held, key=lambda name: held[name][by], default=token)
            if held.get(most, (0, 0))[by] <= held.get(token, (0, 0))[by] + (1, size)[by]:  # (`token` itself too)
                raise self.full()
            last = next(lasts.setdefault(most, reversed(self.names[most][1])))
            out.append((last, self.names[most][1][last]))
            held[most][0] -= 1
            held[most][1] -= last.size
            waiting, queued = waiting - 1, queued - last.size
        for last, (key, slots) in out:
            self.leave(key, slots, last, self.full())

    def full(self) -> GatewayError:
        return GatewayError("queue_full", f"ModelGate's queue is full ({self.waiting} requests, {self.bytes >> 20} "
                            "MiB waiting for Ollama); try again shortly.", [(b"retry-after", QUEUE_RETRY_AFTER)])

    async def wait(self, key: tuple, slots: Slots, share: Share, size: int, host: Host, number: int) -> Ticket:
        loop = asyncio.get_running_loop()
        self.arrivals += not number
        waiter = Waiter(share, size, number or self.arrivals, loop.create_future(), host)
        waiter.timer = loop.call_later(self.timeout, self.expire, key, slots, waiter)
        bisect.insort(share.waiters, waiter, key=lambda waiter: waiter.number)
        held = self.names.setdefault(share.token, [0, {}])
        held[0] += size
        held[1][waiter] = key, slots
        slots.waiting += 1
        self.waiting, self.bytes = self.waiting + 1, self.bytes + size
        host.waiting += 1
        self.metrics.queued[share.token] = self.metrics.queued.get(share.token, 0) + 1
        try:
            return await waiter.future
        except asyncio.CancelledError:  # the client left
            if not waiter.future.cancelled() and waiter.future.exception() is None:
                self.release(waiter.future.result())  # its turn had come as it left
            elif waiter in share.waiters:
                self.leave(key, slots, waiter)
            raise

    def leave(self, key: tuple, slots: Slots, waiter: Waiter, error: GatewayError | None = None) -> None:
        share = waiter.share
        share.waiters.remove(waiter)
        held = self.names[share.token]
        held[0] -= waiter.size
        del held[1][waiter]
        if not held[1]:
            del self.names[share.token]
        waiter.timer.cancel()
        slots.waiting -= 1
        self.waiting, self.bytes = self.waiting - 1, self.bytes - waiter.size
        waiter.host.waiting -= 1
        self.metrics.queued[share.token] -= 1
        self.forget(key, slots, share)
        if error is not None and not waiter.future.done():
            waiter.future.set_exception(error)

    def expire(self, key: tuple, slots: Slots, waiter: Waiter) -> None:
        self.leave(key, slots, waiter, GatewayError(
            "queue_timeout", f"The model {key[1]!r} was busy with other requests for QUEUE_TIMEOUT_SECONDS "
            f"({self.timeout:g} s); nothing was sent. Try again later.", [(b"retry-after", QUEUE_RETRY_AFTER)]))

    def close(self) -> None:
        """SIGTERM: whatever waits gets 503 shutting_down at once, and nothing more waits."""
        self.closed = True
        for key, slots in list(self.slots.items()):
            for share in list(slots.shares.values()):
                for waiter in list(share.waiters):
                    self.leave(key, slots, waiter, GatewayError("shutting_down", SHUTTING_DOWN))

    @staticmethod
    def next_turn(slots: Slots, now: float) -> Share:
        """The token name whose turn it is: the least slot time had, a tie going to the request that came first."""
        return min((s for s in slots.shares.values() if s.waiters), key=lambda s: (s.had(now), s.waiters[0].number))

    def give_turns(self, key: tuple, slots: Slots, now: float) -> None:
        while slots.waiting and slots.running < self.parallel:
            waiter = self.next_turn(slots, now).waiters[0]
            if not waiter.future.cancelled():  # (one that left just now is taken out here)
                waiter.future.set_result(self.start(key, slots, waiter.share, waiter.number))
            self.leave(key, slots, waiter)


# A histogram's observation (Metrics): here, where a request's first one is made, its wait for a turn.
def observe(histogram: dict[tuple, list], key: tuple, value: float, bounds: tuple[float, ...]) -> None:
    counts = histogram.get(key)
    if counts is None:  # one count per bucket, one for +Inf, then the sum
        counts = histogram[key] = [0] * (len(bounds) + 1) + [0.0]
    counts[bisect.bisect_left(bounds, value)] += 1  # the first bucket whose bound is >= value: its `le`
    counts[-1] += value


###############################################################################
# The relay ###################################################################
###############################################################################

# How much of an upstream error body is read; the message shown to people is cut much shorter.
MAX_ERROR_BODY = 64 * 1024
MAX_ERROR_TEXT = 400

# Memory per request is bounded whatever an upstream sends. An answer is held whole only where it must be: to share it
# between identical requests (COALESCE) and to read a model list. A chat answer is kilobytes (megabytes with logprobs),
# a model list tens of kilobytes; 16 MiB is what MAX_BODY_BYTES takes of a request by default. A larger answer is a 502
# (answer_too_large); with COALESCE=off answers of any size are relayed as they arrive.
MAX_HELD_ANSWER = 16 * 1024 * 1024

# A plain answer up to this size is read whole before any of it is sent: one cut short is still a clean 502 (pump).
RELAY_HOLD_BYTES = 1024 * 1024

# An answer held whole is written in pieces of this size (Gateway.deliver), so that uvicorn's send() waits for
# the client to take each one (it waits before writing while its transport holds more than 64 KiB, asyncio's
# high-water mark) and no more than about two pieces wait in memory for a client that reads slowly.
WRITE_PIECE = 64 * 1024

# Streams are relayed unbuffered; these keep a proxy in front (nginx) from buffering them too.
SSE_HEADERS = {b"cache-control": b"no-cache", b"x-accel-buffering": b"no"}


async def relay(gw: Gateway, ex: Exchange, upstream: Upstream, path: bytes, body: bytes,
                stream: bool, shared: bool = False, method: str = "") -> Answer | None:
    """Send one request upstream with the client's headers, and relay its answer:
    1. Send it (Upstream.send): a failure before the answer's head arrives is a GatewayError (502, 503, 504).
    2. An error status becomes the error answer, in the client's dialect, with what to check (upstream_error).
    3. A stream of the dialect's kind (an event stream; NDJSON for Ollama's own API), to a request that streams, is
       pumped chunk by chunk as it arrives, and its end checked against the route's.
    4. A plain answer to be `shared` by identical requests (Coalescer) is read whole, up to MAX_HELD_ANSWER; any
       other is pumped, whatever its size. Then the upstream's connection goes back to the pool."""
    since = time.perf_counter()
    response = await upstream.send((method or ex.method).encode(), path, ex.forward, body, dialect=ex.dialect,
                                   first=ex.host)
    try:
        if response.status >= 400:
            return await upstream_error(upstream, response, ex.dialect, ex.routed, tuple(gw.upstreams), path)
        if stream and media_type(response.headers) == ex.dialect.stream_type:
            return await pump(gw, ex, upstream, response, stream=True)
        if shared:
            body = await whole(upstream, response, MAX_HELD_ANSWER)
            return Answer(response.status, crossing_headers(response.headers), body, (body, body))
        return await pump(gw, ex, upstream, response, stream=False)
    finally:
        await response.aclose()
        ex.upstream_seconds += time.perf_counter() - since


async def pump(gw: Gateway, ex: Exchange, upstream: Upstream, response: httpcore.Response,
               stream: bool) -> Answer | None:
    """Relay an upstream answer, a `stream` or a plain one, holding at most RELAY_HOLD_BYTES of it:
    1. Read it until more than RELAY_HOLD_BYTES came (a stream: its first chunk). A plain answer that ends within
       that is returned whole, to be answered with its length: one cut short is still a 502, none of it was sent.
       Until here a failure is answered with its plain status (502, 504).
    2. Start the answer: the upstream's headers (a plain answer keeps its Content-Length, else uvicorn chunks it; a
       stream gets SSE_HEADERS), then a body message per upstream chunk as it comes (what Frames lets through), under
       the send guard: a client that takes nothing for TIMEOUT_SECONDS is let go (499), and the upstream with it.
    3. An answer cut after the start (the upstream broke off or went silent, the shutdown grace is over, a stream did
       not end as Route.end says) ends with the dialect's error event if it is a stream, so that no client takes it
       for whole; a plain one can only be left incomplete, and uvicorn closes the connection.
    4. The tokens it says it used are read once, from its start and end: per chunk, only the end is kept."""
    chunks = response.stream.__aiter__()
    first = await whole(upstream, response, 0 if stream else RELAY_HOLD_BYTES, cut=True, chunks=chunks)
    if not stream and len(first) <= RELAY_HOLD_BYTES:  # the whole answer: answered like any other, with its length
        return Answer(response.status, crossing_headers(response.headers), first, (first, first))
    if stream:
        ex.ttfb = time.perf_counter() - ex.t0
        headers = [h for h in crossing_headers(response.headers) if h[0] not in SSE_HEADERS] + [*SSE_HEADERS.items()]
        gw.metrics.streams += 1
    else:
        headers = crossing_headers(response.headers)
        headers += [(b"content-length", v) for k, v in response.headers if k.lower() == b"content-length"][:1]
    frames, cut, last = (Frames if stream else Plain)(ROUTES[ex.route], ex.dialect, ex.hides_usage), "", b""
    ex.watch.guard_sends(gw.config.timeout)
    chunk = first or None
    try:
        # Inside: the end of the shutdown grace may come while the head is being sent, and then it is cut too.
        await ex.start(response.status, headers)
        while chunk is not None:
            chunk = frames.feed(chunk)
            if chunk:
                await ex.write(chunk)
                last = chunk
            chunk = await anext(chunks, None)
        rest = frames.rest()  # the stream ended inside a record held back: the client's if it ends the stream
        if rest and frames.whole():
            await ex.write(rest)
            last = rest
    except UPSTREAM_EXCEPTIONS as exc:
        cut = "went silent for TIMEOUT_SECONDS" if isinstance(exc, httpcore.TimeoutException) else "broke off"
        failure = "upstream_stream_error" if stream else "upstream_body_error"  # the log's error
        ex.error = f"{failure} ({upstream.translate(exc, response.extensions.get(HOST_EXTENSION)).detail})"
    except asyncio.CancelledError as exc:
        # Gone once it had the whole stream, it is done: openai-python closes at [DONE], and the upstream's body may
        # end (its last, empty chunk) only after that.
        done = ex.watch.reason == "gone" and stream and frames.whole()
        if ex.watch.reason != "shutdown" and not done:
            ex.usage = frames.usage()  # what the upstream reported before the client left counts all the same
            raise  # the client left: there is nobody to tell
        if ex.watch.claim(exc) == "shutdown":
            cut, ex.error = "was ended: ModelGate is shutting down", "shutting_down"
    else:  # (a plain answer is whole as far as can be known: its length, if any, is checked by h11)
        if stream and not frames.whole():
            upstream.count_failure("IncompleteStream")
            cut, ex.error = f"ended without {frames.end.marker}", f"upstream_stream_error (no {frames.end.marker})"
    finally:
        if stream:
            gw.metrics.streams -= 1
    if cut and not stream:
        return None  # the response stays incomplete and uvicorn closes the connection: all we can do
    ex.usage = frames.usage()  # whole or cut, what the upstream says it used counts
    if cut:
        message = f"The answer was cut off: the stream from {upstream.name} {cut}. Try again."
        # Cut inside a record, the error event still begins one of its own: NDJSON's on a new line, an event stream's
        # after a blank line; else the client's parser runs it into the half event before it (`dat` and its `data:`
        # make one field, `datdata`, which parsers skip) and the cut answer looks whole. Before the first, nothing:
        # ollama-python would json.loads an empty line.
        ended = not last or last.endswith(ex.dialect.separator or SSE_ENDED)
        separator = b"" if ended else ex.dialect.separator or b"\n\n"
        await ex.write(separator + ex.dialect.cut_event(message))
    await ex.write(b"", more=False)
    return None


# Framing of streams: one splitter per kind, for the end check, the usage and hiding the usage event alike. An
# SSE event ends at a blank line and a line at CRLF, LF or CR, mixed as they come (the SSE specification,
# html.spec.whatwg.org/multipage/server-sent-events.html#parsing-an-event-stream): so every blank line holds
# LF LF, CR CR or LF CR, and one that ends in CR runs on over an LF that follows. An NDJSON record is a line.
# Blank lines are found from the start in a chunk (SSE_BLANK), and from the end in what is kept of a stream
# (blank_end: rfind, for the regular expression would look at every byte of it).
SSE_BLANK = re.compile(rb"\n\n|\r\r\n?|\n\r\n?")
SSE_LINE = re.compile(rb"\r\n|\r|\n")
SSE_ENDED = (b"\n\n", b"\n\r\n", b"\r\r\n", b"\r\r")  # ends in a blank line: an event after it is one of its own
LINE_ENDS = re.compile(rb"[\r\n]*")


def blank_end(data: bytes | bytearray, end: int) -> int:
    """Where the last blank line in data[:end] ends; -1 if there is none."""
    at = -1
    for pair in (b"\n\n", b"\r\r", b"\n\r"):  # each looked for after the last found: not through all of it
        at = max(at, data.rfind(pair, at + 1, end))
    return -1 if at < 0 else at + 3 if data[at + 1:at + 3] == b"\r\n" else at + 2


def line_end(data: bytes | bytearray, end: int) -> int:
    at = data.rfind(b"\n", 0, end)
    return -1 if at < 0 else at + 1


# How much of a stream's end is kept, to judge whether it is whole and to read the tokens it used: OpenAI's
# usage event with its token details is about 500 bytes, and a Responses stream's last event carries its
# usage near its end, followed only by `user` and `metadata`.
TAIL_BYTES = 4096
# And how much of the start of a last record longer than that: where a Responses event has its name, and a
# generate line the "done" before a context of megabytes.
HEAD_BYTES = 1024


def event_fields(event: bytes) -> tuple[str, bytes]:
    """An SSE event's type and its data, the data lines joined by LF (as the specification reads fields)."""
    name, data = "", []
    for line in SSE_LINE.split(event):
        field, _, value = line.partition(b":")
        value = value[1:] if value[:1] == b" " else value
        if field == b"event":
            name = value.decode("utf-8", "replace")
        elif field == b"data":
            data.append(value)
    return name, b"\n".join(data)


def parsed(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: valid, but nested deeper than json reads
        return None


class Frames:
    """One stream on its way to the client, split as its dialect frames it: what of each chunk goes on now (feed, and
    rest at the end), whether it ended as its route's streams end (whole: Route.end), and what it says it used (usage:
    Route.usage; Plain for a plain answer). Hot path: per chunk only the stream's end is kept (TAIL_BYTES), split once,
    when the stream is judged; when the end moves on (trim, once per TAIL_BYTES), the start of the record it begins
    inside is kept too. A chunk is split only where it ends inside a record, or holds the usage event to hide."""

    def __init__(self, route: Route, dialect: Dialect, hides_usage: bool = False) -> None:
        self.end, self.counts, self.own_error = route.end, route.usage, dialect.own_error
        sse = dialect.stream_type == b"text/event-stream"
        self.blank_end, self.fields = (blank_end, event_fields) if sse else (line_end, lambda line: ("", line.strip()))
        self.first = b""  # the stream's first TAIL_BYTES, once `kept` moves on: Anthropic's usage starts there
        self.kept = bytearray()  # the upstream's last TAIL_BYTES at least, twice as many at most
        self.head: bytes | None = None  # the first HEAD_BYTES of the record `kept` begins inside; None: it begins one
        self.ends, self.hides = SSE_ENDED if sse else b"\n", hides_usage  # (hides: Exchange.hides_usage)
        self.held = b""  # the start of a record that the chunks so far left unfinished

    def feed(self, chunk: bytes) -> bytes:
        """What of the chunk goes on now: every record it ends, without the usage event that ModelGate, not its client,
        asked for (OpenAI: its "choices field will always be an empty array"; Ollama's /v1 writes it so too, just before
        [DONE]), so that clients that index choices[0] never see it. A record left unfinished is held back until it ends
        (up to MAX_HELD): a client cannot use part of one, and one cut there would be read, as the SDKs read every event
        and line (openai-python, anthropic-sdk-python, ollama-python), into a JSONDecodeError before the cut event."""
        self.kept += chunk
        if len(self.kept) > 2 * TAIL_BYTES:
            self.trim()
        data, self.held = self.held + chunk, b""
        if not data.endswith(self.ends):  # it ends inside a record, or in a blank line that may run on
            cut = max(self.blank_end(data, len(data) - data.endswith(b"\r")), 0)
            if len(data) - cut <= MAX_HELD:
                data, self.held = data[:cut], data[cut:]
        return self.without_usage(data) if self.hides and EMPTY_CHOICES.search(data) else data

    def rest(self) -> bytes:  # what was held back when the stream ends: the client's, but for the usage event
        held, self.held = self.held, b""
        return self.without_usage(held) if self.hides and EMPTY_CHOICES.search(held) else held

    def trim(self) -> None:
        self.first = self.first or bytes(self.kept[:TAIL_BYTES])
        cut = LINE_ENDS.match(self.kept, len(self.kept) - TAIL_BYTES).end()  # never inside a blank line
        start = self.blank_end(self.kept, cut)
        if start == cut:  # a record begins where `kept` will
            self.head = None
        elif start >= 0 or self.head is None:  # else it began before what was kept, whose start we have
            self.head = bytes(self.kept[max(start, 0):max(start, 0) + HEAD_BYTES])
        del self.kept[:cut]

    def last(self) -> tuple[bytes, bytes]:
        """The last record that is not blank: (b"", all of it) if it began in the last TAIL_BYTES, else (its
        first HEAD_BYTES, the last TAIL_BYTES)."""
        kept = self.kept
        end = len(kept.rstrip(b" \t\r\n"))  # without the blank lines after it
        start = self.blank_end(kept, end)
        if start < 0 and self.head is None:  # the first record
            start = 0
        if start >= 0 and end - start <= TAIL_BYTES:
            return b"", bytes(kept[start:end])
        head = self.head if start < 0 else bytes(kept[start:start + HEAD_BYTES])
        return head, bytes(kept[max(end - TAIL_BYTES, 0):end])

    def whole(self) -> bool:
        """Whether the stream ended as its route's streams end, or with the upstream's own error."""
        head, end = self.last()
        name, data = self.fields(head or end)
        key, values = self.end
        document = None if head else parsed(data)
        if self.own_error(document):
            return True
        if key == "type" and name:
            return name in values
        if head:  # too long to be read as JSON: the key is looked for where it can be, in its start and its end
            # (so a key of the same name in an object inside counts too there: a rare line, cut at that)
            found = b"|".join(re.escape(json.dumps(value).encode()) for value in values)
            pattern = rb'"%s"[ \t\r\n]*:[ \t\r\n]*(?:%s)' % (re.escape(key.encode()), found)
            return key != "data" and bool(re.search(pattern, head) or re.search(pattern, end))
        if key == "data":
            return data.decode("utf-8", "replace") in values
        value = document.get(key) if isinstance(document, dict) else None
        return any(type(value) is type(v) and value == v for v in values)

    def usage(self) -> Spent | None:
        return tokens_used(self.counts, self.first or bytes(self.kept[:TAIL_BYTES]), bytes(self.kept[-TAIL_BYTES:]))

    def without_usage(self, data: bytes) -> bytes:
        kept, at = [], 0
        for match in SSE_BLANK.finditer(data):
            event = data[at:match.end()]
            document = parsed(event_fields(event)[1]) if EMPTY_CHOICES.search(event) else None
            if isinstance(document, dict) and document.get("choices") == [] and isinstance(document.get("usage"), dict):
                event = event[:len(event) - len(event.lstrip(b"\r\n"))]  # the end of the blank line before it
            kept.append(event)
            at = match.end()
        kept.append(data[at:])
        return b"".join(kept)


class Plain(Frames):
    """A plain answer on its way: only its start and its end are kept, where its usage is (Route.usage). Its chunks
    are big (the first holds RELAY_HOLD_BYTES): split as a stream's is, 17 MiB of OpenAI embeddings took 60 times
    the CPU, and the first chunk was held twice."""

    def feed(self, chunk: bytes) -> bytes:
        self.first = self.first or chunk[:TAIL_BYTES]
        self.kept += chunk[-TAIL_BYTES:]
        del self.kept[:-TAIL_BYTES]
        return chunk


# An event with "choices": [] and a usage object is the one ModelGate asked for. Quotes inside JSON strings
# are escaped, so this cannot match the text of an answer.
EMPTY_CHOICES = re.compile(rb'"choices"[ \t\r\n]*:[ \t\r\n]*\[[ \t\r\n]*\]')
# An unfinished record longer than this is passed on as it comes: no usage event or piece of text is that long.
MAX_HELD = 64 * 1024


class Refusal(NamedTuple):
    """An upstream's error answer, as UPSTREAM_HINTS read it."""
    name: str  # the provider
    status: int
    dialect: Dialect  # the client's
    host: Host | None  # the host that answered
    routed: Routed | None  # where the request's model went, if it named one
    providers: tuple[str, ...]  # those configured
    document: Any  # the body as JSON; None if it is not
    path: bytes  # what was asked for, under the base URL


def other_provider(refusal: Refusal) -> str:
    model, provider = refusal.routed.name, refusal.name
    said = f"ModelGate sent {model!r} to {provider}, the DEFAULT_PROVIDER, as it has no ollama/ or openai/ prefix"
    other = "openai" if provider == "ollama" else "ollama"
    if other in refusal.providers:
        return f"{said}; to send it to {other}, write {other}/{model}."
    return f"{said}. GET /v1/models lists the models there."


# What an upstream's error answer adds to what the upstream said, for the person who reads it, in this order: (whether
# it applies, its words, whether it is added to an error already in the client's shape too). The start-up warning and
# --check say the same of a base URL without /v1 in their own place (config_warnings, ollama_native_api).
UPSTREAM_HINTS: tuple[tuple[Callable[[Refusal], bool], Callable[[Refusal], str], bool], ...] = (
    # True: OpenAI's own 401 ("Incorrect API key provided ... find your API key at platform.openai.com") reads, to an
    # app whose token the gateway took, as if that token were wrong; it is the gateway's key.
    # Ollama's own 401 is also what a cloud model gets while Ollama is signed out of ollama.com ("unauthorized",
    # with a signin_url: ollama server/routes.go), which no key of ModelGate's mends.
    (lambda r: r.status in (401, 403), lambda r: f"Check {KEY_VARIABLE[r.name]}" + (
        ", or, for a cloud model, that Ollama is signed in to ollama.com (`ollama signin` where it runs)."
        if r.name == "ollama" and r.status == 401 and r.routed is not None else "."), True),
    # gin's "404 page not found" under a base URL ending in /v1 is an Ollama older than the route: its Messages API
    # (v0.14, ollama PR #13600), its Responses API (v0.13.3), its transcriptions (v0.20); for one that every Ollama's
    # /v1 has (chat, embeddings, models), no Ollama there. A model it lacks gets JSON (no word of prefixes, below).
    (lambda r: (r.status == 404 and r.name == "ollama" and r.document is None and r.host is not None
                and r.host.path.endswith(b"/v1")),
     lambda r: "This Ollama is older than that API (Anthropic Messages: v0.14, Responses: v0.13.3, transcriptions: "
     "v0.20): update it." if r.path in (b"/messages", b"/responses", b"/audio/transcriptions") else "Check that "
     "OLLAMA_BASE_URL is Ollama's address and port with /v1, such as http://127.0.0.1:11434/v1.", False),
    # On Ollama's own API only a 404 without JSON: gin's, for a route under a base URL that was not meant
    # (.../api: /api/api/chat), where a model Ollama lacks answers {"error": ...}.
    (lambda r: (r.status == 404 and r.name == "ollama" and (not r.dialect.native or r.document is None)
                and r.host is not None and not r.host.path.endswith(b"/v1")),
     lambda r: "Check that OLLAMA_BASE_URL ends in /v1: Ollama's OpenAI-compatible API is under /v1.", True),
    (lambda r: r.status == 404 and r.document is not None and r.routed is not None and r.routed.defaulted,
     other_provider, True),
    # (not for an alias whose target doubles it: only the owner can mend MODEL_ALIASES)
    (lambda r: (r.status == 404 and r.routed is not None and not r.routed.aliased
                and r.routed.name.startswith(f"{r.name}/")),
     lambda r: f"ModelGate took one {r.name}/ off {r.name + '/' + r.routed.name!r} and sent {r.routed.name!r} to "
               f"{r.name}: write the prefix once, as {r.routed.name}.", True),
)


async def upstream_error(upstream: Upstream, response: httpcore.Response, dialect: Dialect = OPENAI,
                         routed: Routed | None = None, providers: tuple[str, ...] = (), path: bytes = b"") -> Answer:
    """An upstream error response as the client gets it: same status, in the client's dialect, with what to check
    (UPSTREAM_HINTS). A body already in that shape passes unchanged, but for the hints that go on such a message;
    anything else is wrapped, its text as the message, so that tools which show `error.message` (FluentRead) or
    parse JSON (openai-translator) tell the user what the upstream said."""
    upstream.count_failure(f"http_{response.status}")
    body = await whole(upstream, response, MAX_ERROR_BODY, cut=True)
    name, status, document = upstream.name, response.status, parsed(body)
    refusal = Refusal(name, status, dialect, response.extensions.get(HOST_EXTENSION), routed, providers, document,
                      path)
    kept, own = crossing_headers(response.headers), dialect.own_error(document)
    hints = [words(refusal) for applies, words, always in UPSTREAM_HINTS if (always or not own) and applies(refusal)]
    error = document.get("error") if isinstance(document, dict) else None  # OpenAI's shape, and Anthropic's:
    said = error.get("message") if isinstance(error, dict) else None  # {"error": {"message": ...}}
    if own:
        if hints and isinstance(said, str):
            error["message"] = " ".join([sentence(said), *hints])
            body = json.dumps(document).encode()
        return Answer(status, kept, body)
    if isinstance(document, dict):  # Ollama's native {"error": "..."}, FastAPI's {"detail": "..."}
        text = next((document[k] for k in ("error", "message", "detail") if isinstance(document.get(k), str)), "")
        text = text or (said if isinstance(said, str) else "")  # OpenAI's or Anthropic's shape, for another dialect
    else:
        text = body.decode("utf-8", "replace") if document is None else ""
    text = " ".join(text.split())
    if len(text) > MAX_ERROR_TEXT:
        text = text[:MAX_ERROR_TEXT] + "…"
    phrase = f"{status} {PHRASES.get(status, '')}".strip()
    message = f"{name} answered {phrase}: {text}" if text else f"{name} answered {phrase} with an empty body."
    if hints:
        message = " ".join([sentence(message), *hints])
    kept = [(k, v) for k, v in kept if k not in (b"content-type", b"content-encoding")] + [JSON]
    return Answer(status, kept, dialect.error(status, message, UPSTREAM_ERROR_TYPES.get(status, "api_error"), None))


def sentence(text: str) -> str:
    text = text.rstrip()
    return text if text.endswith((".", "!", "?", "…")) else text + "."


def media_type(headers: Headers) -> bytes:
    for name, value in headers:
        if name.lower() == b"content-type":
            return value.split(b";", 1)[0].strip().lower()
    return b""


###############################################################################
# Upstreams and their hosts ###################################################
###############################################################################

# 512 is the depth of Ollama's own queue (OLLAMA_MAX_QUEUE): more connections could only wait there.
POOL_CONNECTIONS = 512

# A host that refused a connection, or did not complete one in time, is passed over for this long while
# another host is up (nothing was sent to it, so the request goes to the next one); then it is tried again.
HOST_COOLDOWN_SECONDS = 30.0

# What each request to an upstream says it came through (RFC 9110 §7.6.3), under a name no other process has:
# a request that arrives carrying it went round in a circle (OLLAMA_BASE_URL names ModelGate itself) and is
# answered 508 at once, not sent round again until every connection is taken, and the gateway that sent it tells
# its client what to change; that 508 carries it too, so that anyone else's 508 (a proxy's own loop) is relayed as
# theirs. Not a secret: all it gets anyone is that 508.
VIA = (b"via", b"1.1 modelgate-" + secrets.token_hex(8).encode())
LOOPED = ("{url} leads back to this ModelGate, so the request went round in a circle: it must name the upstream's own "
          "address (Ollama listens on port 11434), not ModelGate's (PORT, 8010 unless set).")


class Host:
    """One base URL of a provider: where it lives, its connection pool, and whether it is cooling down."""

    def __init__(self, number: int, base_url: str) -> None:
        url = urlsplit(base_url)
        self.number = number  # 1 for the first one listed: what logs, metrics and /ready show, never the URL
        self.base_url = base_url  # for the start-up summary, --check and the queue's slots, never logged
        self.scheme = url.scheme.encode()
        self.host = url.hostname.encode("idna")
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.path = url.path.rstrip("/").encode()
        self.native_path = self.path.removesuffix(b"/v1")  # where Ollama's own API lives
        self.authority = url.netloc.encode("idna")
        self.loopback = is_loopback(url.hostname)
        self.pool = Pool(self.scheme, self.host, self.port, POOL_CONNECTIONS)
        self.down_until = 0.0  # time.monotonic() before which other hosts go first
        self.waiting = 0  # requests in ModelGate's queue for this host (The queue)


# Where an upstream response notes the Host it came from (httpcore keeps its own keys in the same dict).
HOST_EXTENSION = "modelgate.host"


def cause(exc: BaseException, key: bytes = b"") -> str:
    """What went wrong under an httpcore exception, for the log: its class and the system's or TLS's
    reason, without addresses (hosts are named by number), without the upstream's `key`, and cut short. h11
    quotes the line it could not read (`illegal header line: bytearray(b'...')`): an upstream that echoes the
    Authorization it got in a header, a status line or a chunk's size line would write its key into the log
    (issue 17), as it would into the answer but for Redacted; and a ` token=admin` there would be a field of the
    text log line of its own, as one in an upstream's x-request-id would (log_exchange): its `=` is escaped."""
    root = exc.__cause__ or exc
    if isinstance(root, ssl.SSLCertVerificationError):
        reason = root.verify_message
    elif isinstance(root, ssl.SSLError):
        reason = root.reason or str(root)
    elif isinstance(root, OSError) and root.errno and not isinstance(root, socket.gaierror):
        reason = os.strerror(root.errno)  # "Connection refused", not "Connect call failed ('10.0.0.5', 11434)"
    elif isinstance(root, OSError) and root.strerror:
        reason = root.strerror
    else:
        reason = str(root) or type(root).__name__
    for shown in {key.decode(), repr(key)[2:-1]} if key else ():  # (repr: as h11 quotes it, a \ doubled)
        reason = reason.replace(shown, KEY_SHOWN_AS.decode())
    return printable(f"{type(exc).__name__}: {reason}"[:160]).replace("=", "\\x3d")


class Upstream:
    """One provider: the key it wants, its hosts (OLLAMA_BASE_URL may list several), and how a request reaches one."""

    def __init__(self, name: str, base_urls: tuple[str, ...], api_key: str, config: Config, metrics: Metrics) -> None:
        self.name = name
        self.hosts = [Host(number, url) for number, url in enumerate(base_urls, 1)]
        self.key = api_key.encode()
        self.auth = [(b"authorization", b"Bearer " + self.key)] if api_key else []
        # No write timeout: a request goes out in one write to the socket's buffer, which never waits.
        self.extensions = {"timeout": {"connect": config.connect_timeout, "pool": config.connect_timeout,
                                       "read": config.timeout}}
        self.metrics = metrics

    def by_preference(self, first: str | None = None) -> list[Host]:
        """The hosts to try in turn: `first` (the URL of the one whose slot a request got) if it is not cooling down,
        then the others not cooling down, fewest requests in flight or waiting first, ties as listed (skipped for one
        host)."""
        now = time.monotonic()
        up = [host for host in self.hosts if host.down_until <= now]
        return sorted(up or self.hosts, key=lambda host: (host.base_url != first, host.pool.in_use + host.waiting))

    async def send(self, method: bytes, path: bytes, forward: Headers, body: bytes = b"", host: Host | None = None,
                   dialect: Dialect = OPENAI, first: Host | None = None) -> httpcore.Response:
        """Send to `host`, or to the hosts in preference order (`first` first) until one takes the request; the
        response's head has arrived when this returns. Only a connection that could not be opened moves on to the
        next host: nothing was sent yet. Anything that fails later is the answer, so that no generation runs twice."""
        hosts = [host] if host is not None else self.hosts if len(self.hosts) == 1 else \
            self.by_preference(first and first.base_url)
        # The outbound request, built explicitly from the few client headers that may travel.
        headers = [(b"accept-encoding", b"identity"), *forward, *self.auth, VIA]  # forward: Exchange.forward
        if method in (b"POST", b"DELETE"):  # Ollama's DELETE /api/delete has a body
            headers.append((b"content-length", b"%d" % len(body)))
        causes = []
        for tried, host in enumerate(hosts, 1):
            base = host.native_path if dialect.native else host.path
            url = httpcore.URL(scheme=host.scheme, host=host.host, port=host.port, target=base + path)
            request = httpcore.Request(method, url, headers=[(b"host", host.authority), *headers], content=body,
                                       extensions=self.extensions)
            try:
                response = await host.pool.handle_async_request(request)
            except UPSTREAM_EXCEPTIONS as exc:
                failure = self.translate(exc, host)
                if isinstance(exc, (httpcore.ConnectError, httpcore.ConnectTimeout)):  # nothing was sent
                    causes.append(failure.detail)
                    host.down_until = time.monotonic() + HOST_COOLDOWN_SECONDS
                    if len(self.hosts) > 1:  # log: which host is passed over, without its URL
                        log.warning("%s host %d: %s; passed over for %.0f s", self.name, host.number,
                                    cause(exc), HOST_COOLDOWN_SECONDS)
                    if tried < len(hosts):
                        continue
                    if tried > 1:
                        failure = GatewayError("upstream_unavailable", f"Could not connect to any of the {tried} "
                                               f"{self.name} hosts tried: refused, unreachable or too slow. Check "
                                               f"that they are running and {URL_VARIABLE[self.name]} lists them right.",
                                               detail=", ".join(causes))
                # A status line that h11 rejects is not HTTP at all (an SSH port, say): a retry gets the same.
                elif isinstance(exc.__cause__, h11.RemoteProtocolError):
                    failure.headers.append(NO_RETRY)
                raise failure from exc
            host.down_until = 0.0
            # Ours: it came back to us. Through a proxy, whose Via may be "Via" and follow ours (RFC 9110 §7.6.3).
            if response.status == HTTPStatus.LOOP_DETECTED and any(
                    name.lower() == b"via" and VIA[1] in value for name, value in response.headers):
                await response.aclose()
                raise GatewayError("loop_detected", LOOPED.format(url=URL_VARIABLE[self.name]),  # a retry loops too
                                   [NO_RETRY], f"{self.where(host)} leads back to this gateway")
            if response.status > 599:  # h11 reads any three digits, HTTP has no such status (RFC 9110 §15): not HTTP,
                await response.aclose()  # and uvicorn fails to send it on (a 500)
                failure = self.translate(httpcore.RemoteProtocolError(f"status {response.status}"), host)
                failure.headers.append(NO_RETRY)
                raise failure
            if 300 <= response.status < 400:  # not followed, nor shown: its Location names an address behind us
                await response.aclose()
                said = f"{response.status} {PHRASES.get(response.status, '')}".strip()
                raise GatewayError("upstream_unavailable", f"{self.name} answered {said}, a redirect, which ModelGate "
                                   f"does not follow: check that {URL_VARIABLE[self.name]} is the address it serves "
                                   "its API on (https:// where http:// is redirected?).", [NO_RETRY],
                                   f"{self.where(host)} answered {response.status}")
            response.extensions[HOST_EXTENSION] = host  # for the messages about what it answers
            if self.key:  # the key out of its headers and body (KEY_SHOWN_AS); the body's length may change
                response.headers = [(name, value.replace(self.key, KEY_SHOWN_AS)) for name, value in response.headers
                                    if name.lower() != b"content-length"]
                response.stream = Redacted(response.stream, self.key)
            return response

    def count_failure(self, kind: str) -> None:
        self.metrics.upstream_errors[self.name, kind] += 1

    def translate(self, exc: Exception, host: Host | None = None) -> GatewayError:
        """One of the UPSTREAM_EXCEPTIONS, counted, as the error the client gets (UPSTREAM_FAILURES); the log line
        gets where (`ollama/1`) and the cause, without the upstream's key."""
        self.count_failure(type(exc).__name__)
        situation, message = next((situation, message) for exc_type, situation, message in UPSTREAM_FAILURES
                                  if isinstance(exc, exc_type))
        if host is not None and host.loopback and type(exc) is httpcore.ConnectError:
            # Most often a gateway in a container whose OLLAMA_BASE_URL is the default 127.0.0.1 (docker compose,
            # Docker on Linux), and Ollama on the host.
            message += (" From inside a container, localhost is the container itself: there, {url} names the host by "
                        "its address, or as host.docker.internal.")
        retry = [NO_RETRY] if isinstance(exc, NOT_RETRIED) else None
        return GatewayError(situation, message.format(name=self.name, url=URL_VARIABLE[self.name]), retry,
                            detail=f"{self.where(host)} {cause(exc, self.key)}")

    def where(self, host: Host | None) -> str:
        return f"{self.name}/{host.number}" if host is not None else self.name

    def too_large(self) -> GatewayError:
        self.count_failure("AnswerTooLarge")
        return GatewayError("answer_too_large", f"{self.name} answered with more than {MAX_HELD_ANSWER >> 20} MiB, "
                            "more than ModelGate holds whole (it does so to share one answer between identical "
                            "requests, COALESCE, and to read a model list). With COALESCE=off, answers of any size are "
                            "relayed as they arrive.", [NO_RETRY])

    async def get_json(self, path: bytes, forward: Headers, host: Host, dialect: Dialect = OPENAI) -> Any:
        """GET a JSON document from one host; an error status is returned as its error Answer."""
        response = await self.send(b"GET", path, forward, host=host, dialect=dialect)
        try:
            if response.status >= 400:
                return await upstream_error(self, response, dialect, path=path)
            body = await whole(self, response, MAX_HELD_ANSWER)
        finally:
            await response.aclose()
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            raise GatewayError("upstream_unavailable", f"{self.name} answered {path.decode()} with something "
                               f"that is not JSON. Check that {URL_VARIABLE[self.name]} points at its API.",
                               detail=f"{self.where(host)} answered {path.decode()} with no JSON") from None

    async def list_models(self, headers: Headers) -> list[dict] | Answer:
        """The provider's models, ids prefixed, from all its hosts without duplicates; when no host
        answered, the first failure."""
        documents = await gather_answers(self.get_json(b"/models", headers, host) for host in self.hosts)
        if isinstance(documents, Answer):
            return documents
        models: dict[str, dict] = {}
        for item in model_entries(documents, "data"):
            if isinstance(item, dict) and isinstance(item.get("id"), str):
                models.setdefault(item["id"], {**item, "id": f"{self.name}/{item['id']}"})
        return list(models.values())

    def retire(self) -> None:
        for host in self.hosts:
            host.pool.retire()


# An upstream that echoes the key ModelGate sent it (OLLAMA_API_KEY, OPENAI_API_KEY), in a header or in
# an error body that quotes the request, would hand it to every client (issue 17). Whatever an upstream
# answers, with a key set, goes through Upstream.send first: the key is replaced wherever it appears.
KEY_SHOWN_AS = b"***"


class Redacted:
    """A body with `key` replaced, also where it is split between chunks: the end of a chunk that may begin
    it (at most len(key) - 1 bytes, and only what does begin it) waits for the next chunk."""

    def __init__(self, body: Any, key: bytes) -> None:
        self.body, self.key = body, key

    async def __aiter__(self) -> AsyncIterator[bytes]:
        carry, key = b"", self.key
        async for chunk in self.body:
            chunk = (carry + chunk).replace(key, KEY_SHOWN_AS)
            at = chunk.find(key[:1], max(0, len(chunk) - len(key) + 1))  # the first byte that may begin it
            while at != -1 and not key.startswith(chunk[at:]):
                at = chunk.find(key[:1], at + 1)
            keep = len(chunk) if at == -1 else at
            chunk, carry = chunk[:keep], chunk[keep:]
            if chunk:
                yield chunk
        if carry:
            yield carry

    async def aclose(self) -> None:
        await self.body.aclose()


async def gather_answers(awaitables: Iterable[Awaitable[Any]]) -> list[Any] | Answer:
    """What those that answered returned, in order. When none did, the first failure: an upstream's error Answer is
    returned, a GatewayError raised, to say why rather than list nothing. Anything else raised is a bug: raised."""
    results = await asyncio.gather(*awaitables, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, GatewayError):
            raise result
    if answers := [result for result in results if not isinstance(result, (BaseException, Answer))]:
        return answers
    if isinstance(results[0], GatewayError):
        raise results[0]
    return results[0]


def model_entries(documents: Iterable[Any], key: str) -> list[Any]:
    """The entries of the model lists under `key` in those documents; Ollama answers "data": null with no model."""
    lists = [document.get(key) for document in documents if isinstance(document, dict)]
    return [item for items in lists if isinstance(items, list) for item in items]


###############################################################################
# Readiness ###################################################################
###############################################################################

# GET /ready asks each host of the default provider for its models, waits Gateway(ready_timeout=) for an answer
# (2 s), and keeps the result this long, so that probes every few seconds cost the upstream one cheap request.
READY_CACHE_SECONDS = 5.0


@dataclasses.dataclass(eq=False)
class Readiness:
    """The last /ready probe of the default provider's hosts, shared by the probes until it expires."""
    timeout: float
    probe: asyncio.Task | None = None
    expires: float = 0.0

    async def check(self, upstream: Upstream) -> dict[str, str]:
        """`provider/number` of each host -> "ok", or the kind of failure (as in modelgate_upstream_errors_total)."""
        if self.probe is None or time.monotonic() >= self.expires:
            self.probe = asyncio.ensure_future(self.probe_hosts(upstream))
            self.expires = time.monotonic() + READY_CACHE_SECONDS
        return await asyncio.shield(self.probe)

    async def probe_hosts(self, upstream: Upstream) -> dict[str, str]:
        async def probe(host: Host) -> str:
            try:
                result = await asyncio.wait_for(upstream.get_json(b"/models", [], host), self.timeout)
            except asyncio.TimeoutError:
                return "timeout"
            except GatewayError as failure:  # raised from the httpcore exception, if there was one
                return type(failure.__cause__).__name__ if failure.__cause__ else failure.situation
            return f"http_{result.status}" if isinstance(result, Answer) else "ok"

        results = await asyncio.gather(*(probe(host) for host in upstream.hosts))
        return {f"{upstream.name}/{host.number}": result for host, result in zip(upstream.hosts, results)}

    def stop(self) -> None:
        if self.probe is not None:
            self.probe.cancel()


###############################################################################
# Ollama's cloud stubs ########################################################
###############################################################################

# The list of Ollama's models is used this long before a request that needs it fetches it again: a local model
# replaced by a cloud stub of the same name is caught within a minute (at once when replaced through ModelGate's
# admin routes: Gateway.relay_request), a stub under a new name at once.
CLOUD_LIST_SECONDS = 60.0

# What ModelGate's own requests to Ollama say they are, so that its log tells them from the clients'.
OWN_AGENT = (b"user-agent", b"ModelGate/" + __version__.encode())

# How an HTTP server says it has no such door: no route (404), not for GET (405), no GET at all (501: Python's
# http.server without do_GET). Every Ollama answers GET /api/tags, so such a server is no Ollama and has no stubs.
NO_SUCH_DOOR = frozenset({HTTPStatus.NOT_FOUND, HTTPStatus.METHOD_NOT_ALLOWED, HTTPStatus.NOT_IMPLEMENTED})


class CloudModels:
    """Which of Ollama's models are cloud stubs (check_cloud): from GET /api/tags of every Ollama host, where a stub
    lists a remote_host. Fetched when a request first needs it, again when a request names a model it lacks (a stub
    pulled or copied since), and when it is older than CLOUD_LIST_SECONDS; concurrent requests share one fetch. A host
    that does not answer is left out, as from the model lists; the request then goes to a host that did (it is passed
    over for HOST_COOLDOWN_SECONDS, and not asked for its list meanwhile). When none answers the list stays as it was. A
    host that has no /api/tags (NO_SUCH_DOOR) has no stubs to list; when every one does, no name needs looking up again
    until the list is old. A list that could not be read (any other error status, no answer, no answer in time) is noted
    in `unread`: a name no list read shows local may be a stub there (unplaced)."""

    def __init__(self) -> None:
        self.local: frozenset[str] = frozenset()  # ollama_name of every model listed that is not a stub
        self.stubs: frozenset[str] = frozenset()
        self.no_tags = False  # no host has /api/tags (NO_SUCH_DOOR): no Ollama, so no stub, whatever the name
        self.passed_over: Iterable[Host] = ()  # hosts left out of the list while down (fetch_lists)
        self.hosts: Iterable[Host] = ()  # every host of the Upstream the list was read from (fetch_lists)
        self.unread: GatewayError | None = None  # why the last fetch could not read a host's list, if it could not
        self.fetched = -math.inf  # time.monotonic() of the list
        self.fetch: asyncio.Future | None = None
        self.upstream: Upstream | None = None  # whose hosts it is read from, as the settings of now say (forget)

    async def current(self, upstream: Upstream) -> bool:
        if time.monotonic() - self.fetched >= CLOUD_LIST_SECONDS:
            await self.refresh(upstream)
        return True

    async def refresh(self, upstream: Upstream) -> bool:
        while True:  # again when the list was forgotten meanwhile: a name is never placed by no list at all
            if self.fetch is None or self.fetch.done():
                self.fetch = asyncio.ensure_future(self.fetch_lists(self.upstream or upstream))
            await asyncio.shield(self.fetch)
            if self.fetched != -math.inf or self.unread is not None:
                return True

    def forget(self, upstream: Upstream | None = None) -> None:
        """Ollama's models may have changed (a reload, an admin's pull, copy, create or delete): the list is read
        again before the next model is placed, and a fetch under way, which may have read them before, is not
        used. A reload names the `upstream` whose hosts it is read from now, also for a request that waited for the
        old ones' list: it goes to the new ones."""
        self.fetched, self.unread, self.fetch = -math.inf, None, None
        self.upstream = upstream or self.upstream

    async def fetch_lists(self, upstream: Upstream) -> None:
        now = time.monotonic()  # a host cooling down is not asked: no request goes there meanwhile either
        hosts = [host for host in upstream.hosts if host.down_until <= now] or upstream.hosts
        documents = await asyncio.gather(*(upstream.get_json(b"/api/tags", [OWN_AGENT], host, OLLAMA)
                                           for host in hosts), return_exceptions=True)
        answered, failed = [], []
        for host, document in zip(hosts, documents):
            if isinstance(document, BaseException) and not isinstance(document, GatewayError):
                raise document  # a bug of ours
            if isinstance(document, Answer) and document.status not in NO_SUCH_DOOR:
                said = f"{document.status} {PHRASES.get(document.status, '')}".strip()
                # An auth proxy in front of Ollama refusing OLLAMA_API_KEY: no wait and no retry helps.
                refused = document.status in (401, 403)
                advice = "check OLLAMA_API_KEY" if refused else "try again shortly, or see Ollama's log"
                document = GatewayError("upstream_unavailable", f"Ollama answered GET /api/tags {said}: {advice}.",
                                        [NO_RETRY] if refused else None,
                                        detail=f"{upstream.where(host)} answered /api/tags {document.status}")
            if isinstance(document, GatewayError):
                failed.append((document, host))
            else:
                answered.append(document)
        # A host that could not be connected to is passed over while another is up (Upstream.by_preference), and
        # so is one not asked: until it is up again, when the list is read again before a model is placed (cloud_stub).
        now = time.monotonic()
        passed_over = [host for host in upstream.hosts if host not in hosts or (host.down_until > now and answered)]
        unread = [failure for failure, host in failed if host not in passed_over]
        if len(unread) > 1 and not answered:  # as Upstream.send says it
            unread[0] = GatewayError(unread[0].situation, f"None of the {len(unread)} {upstream.name} hosts asked "
                                     f"answered. {unread[0].message}", unread[0].headers,
                                     ", ".join(failure.detail for failure in unread))
        if asyncio.current_task() is not self.fetch:
            return  # forgotten meanwhile
        self.unread = unread[0] if unread else None
        if answered:
            self.remember(answered, self.unread, passed_over)
            self.hosts = upstream.hosts

    def remember(self, documents: list[Any], unread: GatewayError | None = None,
                 passed_over: Iterable[Host] = ()) -> None:
        """The lists of every host that answered (a 404 Answer lists nothing), why the others could not be read, and
        the hosts passed over while they are down."""
        local, stubs = set(), set()
        for item in model_entries(documents, "models"):
            if isinstance(item, dict):  # no Ollama lists anything else; a server that does names no model
                names = (item.get("name"), item.get("model"))
                listed = stubs if item.get("remote_host") else local
                listed.update(ollama_name(name) for name in names if isinstance(name, str))
        # A model listed local by one host may be a stub on a host whose list could not be read, where a request
        # for it may go: while one cannot be read, a list places no model as local (unplaced refuses it).
        self.local = frozenset(local - stubs) if unread is None else frozenset()
        self.stubs, self.fetched, self.passed_over = frozenset(stubs), time.monotonic(), passed_over
        self.no_tags = unread is None and all(isinstance(document, Answer) for document in documents)
        self.unread = unread

    def stop(self) -> None:
        if self.fetch is not None:
            self.fetch.cancel()


async def cloud_summary(config: Config, upstream: Upstream, cloud: CloudModels) -> str:
    """For --check and the start-up log: whether Ollama's cloud is on (its /api/status, OLLAMA_NO_CLOUD), the
    cloud models it lists, and the tokens that may use them."""
    statuses = await asyncio.gather(*(upstream.get_json(b"/api/status", [OWN_AGENT], host, OLLAMA)
                                      for host in upstream.hosts), return_exceptions=True)
    said = [status.get("cloud") for status in statuses if isinstance(status, dict)]
    states = {"off (OLLAMA_NO_CLOUD)" if state.get("disabled") is True else "on"
              for state in said if isinstance(state, dict)}
    older = any(isinstance(status, Answer) and status.status == 404 for status in statuses)  # ollama #14221
    state = " and ".join(sorted(states)) or ("unknown (Ollama answered /api/status with 404: a version older than "
                                             "OLLAMA_NO_CLOUD)" if older else "unknown (no host answered /api/status)")
    await cloud.refresh(upstream)  # (fetch_lists leaves out the hosts that fail: it raises no GatewayError)
    listed = ", ".join(sorted(cloud.stubs)) or "none"
    tokens = ", ".join(sorted(config.ollama_cloud_tokens)) or "none (OLLAMA_CLOUD_TOKENS is empty)"
    return f"Ollama's cloud: {state}; the cloud models it lists: {listed}; tokens that may use them: {tokens}"


###############################################################################
# Usage #######################################################################
###############################################################################

# Requests, errors, tokens and time per day, token name, provider and model, kept across restarts: what
# GET /usage, `python modelgate.py --usage` and TOKEN_QUOTAS read. Ollama keeps none (ollama #17223, #11118),
# and a Prometheus counter starts again at every restart. A request only adds to a dict in memory; what was
# added is written to USAGE_DB (SQLite, Python's own sqlite3) every USAGE_WRITE_SECONDS and at shutdown, by
# a thread of its own, so that a slow disk (a Raspberry Pi's SD card syncs in tens of milliseconds) never
# holds the event loop. Days are the gateway's local days (TZ).
USAGE_WRITE_SECONDS = 10.0
# GET /usage shows today and the days before it, this many in all; memory keeps these days only.
USAGE_DAYS = 30

# A file of ours says so in its header (SQLite's PRAGMA application_id): any other SQLite file, or one whose
# table is not this one, is refused at start-up and left as it is.
USAGE_APPLICATION_ID = 0x4D477573  # "MGus"
USAGE_COUNTS = ("requests", "errors", "prompt_tokens", "completion_tokens", "queue_seconds", "upstream_seconds")
USAGE_BY = ("day", "token", "provider", "model")
USAGE_TABLE = ("CREATE TABLE IF NOT EXISTS usage (day TEXT NOT NULL, token TEXT NOT NULL, provider TEXT NOT NULL, "
               "model TEXT NOT NULL, requests INTEGER NOT NULL, errors INTEGER NOT NULL, prompt_tokens INTEGER NOT "
               "NULL, completion_tokens INTEGER NOT NULL, queue_seconds REAL NOT NULL, upstream_seconds REAL NOT "
               "NULL, PRIMARY KEY (day, token, provider, model))")
# Counts are added to the row, never written over it: two gateways on one file (an old one still finishing
# its streams while the new one starts) both count.
USAGE_ADD = ("INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (day, token, provider, model) "
             "DO UPDATE SET " + ", ".join(f"{name} = {name} + excluded.{name}" for name in USAGE_COUNTS))

UsageKey = tuple[str, str, str, str]  # (day, token name, provider, model)


def open_usage_file(path: str, read_only: bool = False) -> sqlite3.Connection:
    """USAGE_DB, opened and checked: a new or empty file becomes ours; one that cannot be opened or written,
    or that holds anything but our counts (another program's, a damaged one), is a ConfigError and is left
    as it is. `read_only`: for --usage, which creates nothing."""
    if os.path.isdir(path):  # USAGE_DB=/data, a volume, rather than a file in it
        raise ConfigError(f"USAGE_DB {path!r} is a directory: name a file in it, such as "
                          f"{os.path.join(path, 'modelgate-usage.sqlite3')!r}")
    try:
        # A journal beside it: a write under way, or one cut short (kill -9), which only a connection that may
        # write rolls back before reading (sqlite.org/atomiccommit.html, "Hot Rollback Journals").
        if read_only and not os.path.exists(f"{path}-journal"):
            db = sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True)
        else:  # the gateway's: used by the writer's thread after start-up, one thread at a time
            db = sqlite3.connect(path, check_same_thread=False)
        try:
            check_usage_file(db, read_only)
        except BaseException:
            db.close()
            raise
    except sqlite3.OperationalError as exc:  # cannot open, cannot write, locked
        raise ConfigError(f"USAGE_DB {path!r} cannot be {'read' if read_only else 'opened and written'} ({exc}): "
                          "check that its directory exists and this user may write there, or set USAGE_DB= "
                          "(to nothing) to keep the counts in memory only") from None
    except sqlite3.DatabaseError as exc:  # not a database, or a damaged one
        raise ConfigError(f"USAGE_DB {path!r} is not a file of usage counts ({exc}); it is left as it is: move "
                          "it away, or point USAGE_DB at another file") from None
    return db


def check_usage_file(db: sqlite3.Connection, read_only: bool) -> None:
    if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
        raise sqlite3.DatabaseError("damaged: PRAGMA quick_check failed")
    owner = db.execute("PRAGMA application_id").fetchone()[0]
    tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    if owner != USAGE_APPLICATION_ID and (tables or read_only):
        raise sqlite3.DatabaseError("an SQLite file of another program")
    columns = [row[1] for row in db.execute("PRAGMA table_info(usage)")]
    if tables not in ([], ["usage"]) or columns not in ([], [*USAGE_BY, *USAGE_COUNTS]):
        raise sqlite3.DatabaseError("its tables are not ModelGate's")
    if not read_only:
        with db:  # a write at start-up: a file that cannot be written stops it here, not in ten seconds
            db.execute(f"PRAGMA application_id = {USAGE_APPLICATION_ID}")
            db.execute(USAGE_TABLE)
            db.execute("DELETE FROM usage WHERE requests < 0")  # takes the write lock; there are none


def read_usage(db: sqlite3.Connection, since: str) -> dict[UsageKey, list]:
    rows = db.execute(f"SELECT {', '.join(USAGE_BY + USAGE_COUNTS)} FROM usage WHERE day >= ?", (since,))
    return {tuple(row[:4]): list(row[4:]) for row in rows}


def write_usage(db: sqlite3.Connection, counts: dict[UsageKey, list]) -> None:
    with db:  # one transaction: all of it, or none
        db.executemany(USAGE_ADD, [(*key, *values) for key, values in counts.items()])


def add_counts(into: dict[UsageKey, list], counts: dict[UsageKey, list]) -> dict[UsageKey, list]:
    for key, values in counts.items():
        into[key] = [kept + value for kept, value in zip(into.get(key, (0, 0, 0, 0, 0.0, 0.0)), values)]
    return into


def local_day(now: float) -> tuple[str, float]:
    """The local date (TZ) at `now`, and the time at which it ends: the next local midnight."""
    date = datetime.date.fromtimestamp(now)
    return date.isoformat(), datetime.datetime.combine(date + datetime.timedelta(days=1), datetime.time()).timestamp()


def usage_totals(values: list) -> dict[str, Any]:
    requests, errors, prompt, completion, queued, upstream = values
    return {"requests": requests, "errors": errors, "prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion, "queue_seconds": round(queued, 6),
            "upstream_seconds": round(upstream, 6)}


def usage_report(counts: Mapping[UsageKey, list], today: str, days: int, names: Iterable[str],
                 quotas: Mapping[str, int]) -> dict[str, Any]:
    """What GET /usage answers (and its page and --usage show): for each token name of `names`, today's
    counts, those of the `days` days up to today, each of those days, the same per provider and model, and
    its TOKEN_QUOTAS quota (null: none) with what is left of it today."""
    first = datetime.date.fromisoformat(today) - datetime.timedelta(days=days - 1)
    shown = [(first + datetime.timedelta(days=n)).isoformat() for n in range(days)]
    apps: dict[str, dict] = {name: {"total": [0, 0, 0, 0, 0.0, 0.0], "models": {},  # today: daily[today]
                                    "daily": {day: [0, 0, 0, 0, 0.0, 0.0] for day in shown}} for name in sorted(names)}
    for (day, token, provider, model), values in sorted(counts.items()):
        app = apps.get(token)
        if app is None or day not in app["daily"]:
            continue
        on_day, in_all = app["models"].setdefault((provider, model), ([0, 0, 0, 0, 0.0, 0.0], [0, 0, 0, 0, 0.0, 0.0]))
        for kept in (app["daily"][day], app["total"], in_all, *((on_day,) if day == today else ())):
            kept[:] = [total + value for total, value in zip(kept, values)]
    return {"today": today, "from": shown[0], "days": days, "apps": {name: {
        "today": usage_totals(app["daily"][today]), "total": usage_totals(app["total"]), "quota": quotas.get(name),
        "quota_left": max(0, quotas[name] - sum(app["daily"][today][2:4])) if name in quotas else None,  # its tokens
        "models": [{"provider": provider, "model": model, "today": usage_totals(on_day),
                    "total": usage_totals(in_all)} for (provider, model), (on_day, in_all) in app["models"].items()],
        "daily": [{"day": day, **usage_totals(values)} for day, values in app["daily"].items()],
    } for name, app in apps.items()}}


def usage_page(report: dict[str, Any]) -> bytes:
    """GET /usage as a page: for each app, today and the days shown, a bar per day, a row per model."""
    parts = [USAGE_PAGE, f'<p class="note">Today is {report["today"]}; the bars and the totals cover the '
             f'{report["days"]} days from {report["from"]}, in the gateway\'s time zone. Tokens are what the '
             f'upstreams said they used.</p>\n']
    for name, app in report["apps"].items():
        today, total = app["today"], app["total"]
        parts.append(f"<h2>{html.escape(name)}</h2>\n<p class=\"sum\">Today <b>{plural(today['total_tokens'], 'token')}"
                     f"</b>, {plural(today['requests'], 'request')}, {plural(today['errors'], 'error')}. "
                     f"{report['days']} days: <b>{plural(total['total_tokens'], 'token')}</b>, "
                     f"{plural(total['requests'], 'request')}, {plural(total['errors'], 'error')}.</p>\n")
        if app["quota"] is not None:
            parts.append(f'<p class="sum">Quota {plural(app["quota"], "token")} a day: <b>{app["quota_left"]:,} '
                         "left</b> today.</p>\n")
        parts += [usage_bars(app["daily"]), usage_table(app["models"], report["days"])]
    parts.append("</body>\n</html>\n")
    return "".join(parts).encode()


def usage_bars(daily: list[dict[str, Any]]) -> str:
    top = max((day["total_tokens"] for day in daily), default=0)
    bars = []
    for n, day in enumerate(daily):
        height = round(56 * day["total_tokens"] / (top or 1), 1)
        kind = "today" if n == len(daily) - 1 else "bar"
        bars.append(f'<rect class="{kind}" x="{n * 10 + 1}" y="{60 - height}" width="8" height="{height}">'
                    f'<title>{day["day"]}: {day["total_tokens"]:,} tokens, {day["requests"]:,} requests</title></rect>')
    label = f"Tokens a day, the highest {top:,}" if top else "No tokens counted on these days"
    return (f'<svg viewBox="0 0 {len(daily) * 10} 60" preserveAspectRatio="none" role="img" '
            f'aria-label="{label}"><title>{label}</title>{"".join(bars)}</svg>\n')


def usage_table(models: list[dict[str, Any]], days: int) -> str:
    if not models:
        return '<p class="note">Nothing counted yet.</p>\n'
    rows = []
    for row in sorted(models, key=lambda row: -row["total"]["total_tokens"]):
        model = USAGE_NO_MODEL if row["model"] == "-" else f"{row['provider']}/{row['model']}"
        today, total = row["today"], row["total"]
        rows.append(f"<tr><td>{html.escape(model)}</td><td class=\"w\">{today['requests']:,}</td>"
                    f"<td>{today['total_tokens']:,}</td><td class=\"w\">{total['requests']:,}</td>"
                    f"<td>{total['errors']:,}</td>"
                    f"<td title=\"{total['prompt_tokens']:,} prompt + {total['completion_tokens']:,} completion\">"
                    f"{total['total_tokens']:,}</td><td class=\"w\">{duration(total['upstream_seconds'])}</td>"
                    f"<td class=\"w\">{duration(total['queue_seconds'])}</td></tr>")
    return ('<div class="scroll"><table><thead><tr><th>Model</th><th class="w">Requests today</th><th>Tokens today</th>'
            f'<th class="w">Requests, {days} days</th><th>Errors</th><th>Tokens, {days} days</th><th class="w">Time '
            f'upstream</th><th class="w">Time queued</th></tr></thead><tbody>{"".join(rows)}</tbody></table></div>\n')


def plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" + "s" * (count != 1)


def duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# Where an answer says what tokens it used. Tokens are counted per app from the upstream's own figures, read once.
# Quotes inside JSON strings are escaped: a key found is a key, never an answer's text.
USAGE_KEY = re.compile(rb'"usage"[ \t\r\n]*:[ \t\r\n]*(?=\{)')
# Ollama's native counts come after the message and its tool calls (api.ChatResponse's Metrics): the last wins. A
# count of 10^12 or more is none, here and in `usage`: no answer uses that many, and a sum past USAGE_DB's integers
# (2^63) would stop every write of the file.
OLLAMA_COUNT = re.compile(rb'"(prompt_eval_count|eval_count)"[ \t\r\n]*:[ \t\r\n]*([0-9]{1,12})(?=[ \t\r\n]*[,}])')


def tokens_used(counts: Counts | None, head: bytes, end: bytes) -> Spent | None:
    """The (prompt, completion) tokens an answer says it used, from its start and end where `counts` says (Route.usage);
    None when it does not say. The last `"usage": {...}` that has either key is searched for from the end, where
    dialects put it (Anthropic's message_start: the first, from the start), and read with json's own scanner."""
    if counts is None:
        return None
    if counts.native:  # (embed: the first)
        found = {name: int(count) for name, count in dict(OLLAMA_COUNT.findall(end)).items()}  # the last of each
        return (found.get(b"prompt_eval_count"), found.get(b"eval_count")) if found else None
    used = (None, None)
    for data, first in ((end, False), (head, True)):
        if first and not (counts.head and used[0] is None):
            break
        start, stop = 0, len(data)
        for _ in range(8):  # a "usage" key in a tool's schema, say, is passed over: but not without end
            at = data.find(b'"usage"', start) if first else data.rfind(b'"usage"', 0, stop)
            if at < 0:
                break
            start, stop = at + 1, at
            match = USAGE_KEY.match(data, at)
            if match is None:
                continue
            try:
                usage, _ = _scan_value(data[match.end():].decode("utf-8", "replace"), 0)
            except (ValueError, StopIteration, RecursionError):  # cut off where the kept tail begins, say
                continue
            prompt, completion = usage.get(counts.prompt), usage.get(counts.completion)
            prompt = prompt if type(prompt) is int and 0 <= prompt < 10 ** 12 else None  # (a bool is no count)
            completion = completion if type(completion) is int and 0 <= completion < 10 ** 12 else None
            if (prompt, completion) != (None, None):
                used = (prompt, used[1]) if first else (prompt, completion)
                break
    return None if used == (None, None) else used


class Usage:
    """The counts of the last USAGE_DAYS days, in memory, and their file. Its mutable state: `days` holds what was
    counted until the last write was begun, `unwritten` what requests have added since (the one dict a request touches),
    `unsaved` what a failed write still owes the file. `spent` is today's tokens per token name, for TOKEN_QUOTAS."""

    def __init__(self, path: str, clock: Callable[[], float]) -> None:
        self.path, self.clock = path, clock
        self.db = open_usage_file(path) if path else None  # None: in memory only
        self.today, self.midnight = local_day(clock())
        self.days = read_usage(self.db, self.first_day()) if self.db is not None else {}
        self.unwritten: dict[UsageKey, list] = {}
        self.unsaved: dict[UsageKey, list] = {}
        self.spent: dict[str, int] = {}
        self.models: dict[tuple[str, str], set[str]] = {}  # (token, provider) -> today's models, capped
        for (day, token, provider, model), values in self.days.items():
            if day == self.today:
                self.spent[token] = self.spent.get(token, 0) + values[2] + values[3]
                self.models.setdefault((token, provider), set()).add(model)
        self.writer = concurrent.futures.ThreadPoolExecutor(1, "modelgate-usage") if self.db is not None else None
        self.writing: asyncio.Future | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.failing_since: float | None = None  # monotonic time of the last line saying writes fail

    def first_day(self) -> str:
        return (datetime.date.fromisoformat(self.today) - datetime.timedelta(days=USAGE_DAYS - 1)).isoformat()

    def record(self, ex: Exchange) -> None:
        """Count an exchange of an app (a token's request on a route counted against its limits)."""
        if not ROUTES[ex.route].limited:  # /metrics and /usage: a dashboard is not an app
            return
        if (now := self.clock()) >= self.midnight:
            self.new_day(now)
        key = (self.today, ex.token, ex.provider, ex.upstream_model)
        counts = self.unwritten.get(key)
        if counts is None:
            # The model is the client's word that the upstream took (or refused): past MAX_MODEL_SERIES of them
            # per token name, provider and day, further ones are counted as "other", as in /metrics.
            models = self.models.setdefault((ex.token, ex.provider), set())
            if ex.upstream_model not in models and len(models) >= MAX_MODEL_SERIES:
                key = (self.today, ex.token, ex.provider, "other")
            else:
                models.add(ex.upstream_model)
            counts = self.unwritten.setdefault(key, [0, 0, 0, 0, 0.0, 0.0])
        counts[0] += 1
        counts[1] += bool(ex.error)  # an error answered, or a stream cut; not a client that left (499)
        if ex.usage is not None:
            prompt, completion = ex.usage[0] or 0, ex.usage[1] or 0
            counts[2] += prompt
            counts[3] += completion
            if not ex.spent:  # else counted as soon as its answer ended (spend)
                self.spent[ex.token] = self.spent.get(ex.token, 0) + prompt + completion
        counts[4] += ex.queued or 0.0  # None: a route that does not wait for a turn
        counts[5] += ex.upstream_seconds

    def spend(self, ex: Exchange, used: Spent | None) -> None:
        """Add what an answer used to its token name's tokens of today, once: as soon as it is known, so that a
        request given its turn in the queue next is judged with it (TOKEN_QUOTAS)."""
        if used is not None and not ex.spent:
            ex.spent = True
            self.spent[ex.token] = self.used_today(ex.token)[0] + (used[0] or 0) + (used[1] or 0)

    def used_today(self, name: str) -> tuple[int, float]:
        """The tokens a token name used today, and when today ends (TOKEN_QUOTAS)."""
        if (now := self.clock()) >= self.midnight:
            self.new_day(now)
        return self.spent.get(name, 0), self.midnight

    def new_zone(self) -> None:
        """TZ changed (a reload): today ends at the new zone's midnight, or has ended already. (A zone where it
        is still yesterday leaves today to end at its old midnight: a day is never counted twice.)"""
        now = self.clock()
        today, midnight = local_day(now)
        if today > self.today:
            self.new_day(now)
        elif today == self.today:
            self.midnight = midnight

    def new_day(self, now: float) -> None:
        self.today, self.midnight = local_day(now)
        self.spent, self.models = {}, {}
        first = self.first_day()
        self.days = {key: values for key, values in self.days.items() if key[0] >= first}

    def counts(self) -> dict[UsageKey, list]:
        """Everything counted in the last USAGE_DAYS days, written or not."""
        if (now := self.clock()) >= self.midnight:
            self.new_day(now)
        first = self.first_day()
        return add_counts({key: list(values) for key, values in self.days.items() if key[0] >= first},
                          self.unwritten)

    # Writing --------------------------------------------------------------------

    def start(self) -> None:
        self.timer = asyncio.get_running_loop().call_later(USAGE_WRITE_SECONDS, self.tick)

    def tick(self) -> None:
        self.start()
        if self.writing is None:  # else the next tick takes what came meanwhile
            self.write()

    def write(self) -> asyncio.Future | None:
        """Move what requests added into `days`, and begin writing it (with what a failed write owes) to the
        file; the Future of that write, or None when there is nothing to write."""
        counts, self.unwritten = self.unwritten, {}
        add_counts(self.days, counts)
        if self.writer is None or not (counts or self.unsaved):
            return None
        batch, self.unsaved = add_counts(self.unsaved, counts), {}
        self.writing = asyncio.get_running_loop().run_in_executor(self.writer, write_usage, self.db, batch)
        self.writing.add_done_callback(lambda done: self.written(done, batch))
        return self.writing

    def written(self, done: asyncio.Future, batch: dict[UsageKey, list]) -> None:
        self.writing = None
        exc = None if done.cancelled() else done.exception()
        if exc is None:
            if self.failing_since is not None:  # log: writing works again
                log.info("USAGE_DB %s is written again; no count was lost", self.path)
                self.failing_since = None
            return
        self.unsaved = add_counts(batch, self.unsaved)
        now = time.monotonic()
        if self.failing_since is None or now - self.failing_since >= 60.0:
            # log: at most once a minute while writes fail
            log.error("USAGE_DB %s cannot be written (%s); the counts are kept in memory and written once it "
                      "can be", self.path, exc)
            self.failing_since = now

    async def close(self) -> None:
        """At shutdown: write what is left, then close the file."""
        if self.timer is not None:
            self.timer.cancel()
        if self.writer is None:
            return
        for _ in range(2):  # the write under way, then what came after it
            writing = self.writing or self.write()
            if writing is not None:
                await asyncio.wait([writing])
        if self.unsaved:  # log: what could not be written is lost with the process
            log.error("USAGE_DB %s could not be written at shutdown: the counts of %s since it was last written "
                      "are lost", self.path, plural(sum(values[0] for values in self.unsaved.values()), "request"))
        await asyncio.get_running_loop().run_in_executor(self.writer, self.db.close)
        self.writer.shutdown()


# GET /usage in a browser: a page of its own, like the home page: no script, nothing loaded, every name escaped
# (a model is whatever a client wrote). A bar per day draws each app's tokens in inline SVG; a wide table
# scrolls within its box on a phone.
USAGE_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ModelGate usage</title>
<style>
body { font: 16px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 72rem; margin: 2rem auto;
       padding: 0 1rem; color: #1d1d1f; background: #fff; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; }
h2 { font-size: 1.25rem; margin: 2rem 0 .3rem; overflow-wrap: anywhere; }
.note, .sum { color: #6e6e73; margin: .2rem 0; }
.sum b { color: #1d1d1f; }
svg { display: block; width: 100%; height: 72px; margin: .6rem 0; background: #f7f7f9; border-radius: 4px; }
.bar { fill: #4f7fd9; } .today { fill: #1d4fb8; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: .9rem; }
th, td { text-align: right; padding: .3rem .5rem; border-bottom: 1px solid #e5e5ea; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; white-space: normal; overflow-wrap: anywhere; min-width: 7rem; }
th { font-weight: 600; color: #6e6e73; white-space: normal; vertical-align: bottom; }
@media (max-width: 40rem) { body { margin: 1rem auto; font-size: 15px; } table { font-size: .8rem; }
                            th, td { padding: .3rem .25rem; } .w { display: none; } }
</style>
</head>
<body>
<h1>Usage</h1>
"""
USAGE_NO_MODEL = "no model (model lists, requests refused before their body was read)"


###############################################################################
# Metrics and the log line ####################################################
###############################################################################

# Bucket bounds in seconds. An answer takes from a fraction of a second (a short reply from a loaded model)
# to minutes (a cold model, a long answer); the first byte of a stream comes within seconds once loaded.
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
FIRST_BYTE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# A turn in the queue comes at once, after a few answers (seconds), or after a flood (minutes, up to
# QUEUE_TIMEOUT_SECONDS).
QUEUE_BUCKETS = (0.001, 0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

MAX_MODEL_SERIES = 100  # models per token name and provider in modelgate_tokens_total (Metrics.record)
METRICS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"  # Prometheus' text exposition format


class Metrics:
    """What GET /metrics reports: counters and histograms as dicts keyed by tuples of label values, and two gauges.
    Every label value comes from a closed set (the route table, configured token names, providers, statuses,
    exception names), so no client can make the number of series grow; the one exception, the model of
    modelgate_tokens_total, is capped (MAX_MODEL_SERIES)."""

    def __init__(self) -> None:
        self.requests: Counter[tuple] = Counter()  # (route, provider, token, status)
        self.durations: dict[tuple, list] = {}  # (route,)
        self.first_bytes: dict[tuple, list] = {}  # (route,), streams only
        self.upstream_errors: Counter[tuple] = Counter()  # (provider, kind)
        self.coalesced: Counter[tuple] = Counter()  # (token,)
        self.rate_limited: Counter[tuple] = Counter()  # (token, limit)
        self.tokens: Counter[tuple] = Counter()  # (token, provider, model, kind)
        self.models_counted: dict[tuple, set[str]] = {}  # (token, provider) -> the models in `tokens`
        self.queue_waits: dict[tuple, list] = {}  # (token,), requests on a route that waits its turn
        self.queued: dict[str, int] = {}  # token -> requests waiting for their turn now
        self.in_flight = self.streams = 0

    def record(self, ex: Exchange, seconds: float) -> None:
        self.requests[ex.route, ex.provider, ex.token, ex.status] += 1
        observe(self.durations, (ex.route,), seconds, DURATION_BUCKETS)
        if ex.ttfb is not None:
            observe(self.first_bytes, (ex.route,), ex.ttfb, FIRST_BYTE_BUCKETS)
        if ex.usage is None:
            return
        # The model is the client's word, which the upstream accepted (Ollama takes Qwen2.5 for qwen2.5).
        model, models = ex.upstream_model, self.models_counted.setdefault((ex.token, ex.provider), set())
        if model not in models:
            if len(models) >= MAX_MODEL_SERIES:
                model = "other"
            models.add(model)
        for kind, tokens in zip(("prompt", "completion"), ex.usage):
            if tokens is not None:
                self.tokens[ex.token, ex.provider, model, kind] += tokens

    def render(self, upstreams: Iterable[Upstream]) -> bytes:
        lines: list[str] = []

        def family(name: str, kind: str, text: str, labels: tuple[str, ...], samples: Any) -> None:
            lines.extend((f"# HELP {name} {text}", f"# TYPE {name} {kind}"))
            for values, value in sorted(samples):
                lines.append(f"{name}{label_set(labels, values)} {value}")

        def histogram(name: str, text: str, series: dict[tuple, list], bounds: tuple[float, ...],
                      label: str = "route") -> None:
            lines.extend((f"# HELP {name} {text}", f"# TYPE {name} histogram"))
            for (value,), counts in sorted(series.items()):
                for bound, total in zip((*bounds, "+Inf"), itertools.accumulate(counts)):  # buckets are cumulative
                    lines.append(f"{name}_bucket{label_set((label, 'le'), (value, bound))} {total}")
                lines.append(f"{name}_sum{label_set((label,), (value,))} {counts[-1]}")
                lines.append(f"{name}_count{label_set((label,), (value,))} {total}")

        hosts = [(upstream.name, host) for upstream in upstreams for host in upstream.hosts]
        now = time.monotonic()
        family("modelgate_requests_total", "counter", "Requests answered, by route, provider, token name and status "
               "(499: the client left first).", ("route", "provider", "token", "status"), self.requests.items())
        histogram("modelgate_request_duration_seconds", "Time from request to complete answer.",
                  self.durations, DURATION_BUCKETS)
        histogram("modelgate_stream_first_byte_seconds", "Time from request to the first streamed bytes.",
                  self.first_bytes, FIRST_BYTE_BUCKETS)
        family("modelgate_upstream_errors_total", "counter", "Upstream failures, by provider and kind: the "
               "httpcore exception, http_<status>, IncompleteStream or AnswerTooLarge.", ("provider", "kind"),
               self.upstream_errors.items())
        family("modelgate_requests_in_flight", "gauge", "Requests being answered, streams included.", (),
               [((), self.in_flight)])
        family("modelgate_streams_in_flight", "gauge", "Streams being relayed.", (), [((), self.streams)])
        family("modelgate_coalesced_requests_total", "counter", "Requests answered with an identical request's "
               "upstream answer (COALESCE), by token name.", ("token",), self.coalesced.items())
        family("modelgate_rate_limited_requests_total", "counter", "Requests refused with 429, by token name "
               "and limit (rpm: RATE_LIMIT_RPM, concurrency: MAX_CONCURRENT_PER_TOKEN).", ("token", "limit"),
               self.rate_limited.items())
        histogram("modelgate_queue_wait_seconds", "Time a request waited for its turn at Ollama "
                  "(OLLAMA_NUM_PARALLEL), by token name.", self.queue_waits, QUEUE_BUCKETS, "token")
        family("modelgate_queued", "gauge", "Requests waiting for their turn at Ollama now, by token name.",
               ("token",), [((token,), n) for token, n in self.queued.items()])
        family("modelgate_tokens_total", "counter", "Tokens the upstreams said they used, by token name, "
               "provider, model (as sent upstream) and kind (prompt or completion).",
               ("token", "provider", "model", "kind"), self.tokens.items())
        family("modelgate_upstream_up", "gauge", "1 when the host is not cooling down after a failed connection.",
               ("provider", "host"), [((name, str(host.number)), int(host.down_until <= now)) for name, host in hosts])
        family("modelgate_upstream_in_flight", "gauge", "Requests in flight to the host.", ("provider", "host"),
               [((name, str(host.number)), host.pool.in_use) for name, host in hosts])
        return ("\n".join(lines) + "\n").encode()


def label_set(names: tuple[str, ...], values: tuple) -> str:
    if not names:
        return ""
    escaped = (str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for value in values)
    return "{" + ",".join(f'{name}="{value}"' for name, value in zip(names, escaped)) + "}"


class JsonFormatter(logging.Formatter):
    """LOG_FORMAT=json: one JSON object per line; a request line carries its fields, others a message."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": self.formatTime(record), "level": record.levelname}
        exchange = getattr(record, "exchange", None)
        line.update(exchange_fields(*exchange) if exchange else {"message": record.getMessage()})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def departed_writes(record: logging.LogRecord) -> bool:
    """asyncio's logger without `socket.send() raised exception.`: asyncio's transport writes it for each write
    after the fifth to a connection the client has reset (selector_events.py, LOG_THRESHOLD_FOR_CONNLOST_WRITES),
    without a timestamp, until uvicorn hears of the loss: 126 lines for one client that left a fast stream. The
    departure is the exchange's 499 line, its one line."""
    return record.msg != "socket.send() raised exception."


def setup_logging(log_format: str, logger: logging.Logger = log) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(log_formatter(log_format))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def log_formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else logging.Formatter("%(asctime)s %(levelname)s %(message)s")


app = Gateway()


###############################################################################
# The connection pool and socket stream under httpcore's HTTP/1.1 #############
###############################################################################

# Why our own: httpcore's AsyncConnectionPool and its anyio network backend cost more than the relay itself.
# Measured with bench_modelgate.py on a 2-core VM before they were replaced: with httpcore's pool, most of the
# gateway's time at 64 connections went to re-examining every pooled connection on every request, and anyio's cancel
# scope around each read cost more than the read. httpcore's AsyncHTTP11Connection (h11) still speaks the protocol:
# what is here is only where connections wait between requests and how bytes reach the socket. The floor this leaves
# (`bench_modelgate.py --floor`) is in docs/benchmark.md.

# How much of an upstream's answer may wait here for the client before we stop reading from the upstream.
READ_BUFFER_LIMIT = 1024 * 1024

# An idle upstream connection is dropped after 4 s, before the 5 s idle limit of uvicorn and Node
# servers, so that we never send a request on a connection the server is closing at that moment.
KEEPALIVE_SECONDS = 4.0


class SocketStream(asyncio.Protocol, httpcore.AsyncNetworkStream):
    """One TCP (or TLS) connection as httpcore's HTTP/1.1 code uses it: read, write, close, with a read timeout;
    the same contract as httpcore's own backend, on asyncio's protocol callbacks. The read timeout is one timer per
    connection that moves its deadline on instead of one timer per read (a stream reads once per token). httpcore
    writes a request as headers, body and end in three calls; they leave in one send when it starts to read."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.outgoing: list[bytes] = []
        self.received: list[bytes] = []
        self.buffered = 0  # bytes in `received`
        self.paused = False  # reading from the upstream, until READ_BUFFER_LIMIT bytes wait
        self.eof = False
        self.waiter: asyncio.Future | None = None  # a read waiting for data
        self.deadline = 0.0  # when the waiting read times out
        self.timer: asyncio.TimerHandle | None = None

    @classmethod
    async def connect(cls, host: str, port: int, tls: ssl.SSLContext | None, timeout: float) -> SocketStream:
        loop = asyncio.get_running_loop()
        try:
            _, stream = await wait_at_most(timeout, loop.create_connection(cls, host, port, ssl=tls),
                                           httpcore.ConnectTimeout(f"no connection within {timeout} s"))
        except OSError as exc:  # refused, unreachable, unknown host; with TCP connected, only TLS's handshake
            # is left to fail: a plain-HTTP server answers its ClientHello with 400 (WRONG_VERSION_NUMBER) or hangs up.
            handshake = tls is not None and isinstance(exc, (ssl.SSLError, ConnectionResetError))
            raise (TLSError if handshake else httpcore.ConnectError)(str(exc)) from exc
        return stream

    # asyncio.Protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received.append(data)
        self.buffered += len(data)
        if self.buffered > READ_BUFFER_LIMIT and not self.paused:  # the client reads slower than the upstream writes
            self.paused = True
            self.transport.pause_reading()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def eof_received(self) -> bool:
        self.connection_lost(None)
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _check_deadline(self) -> None:
        self.timer = None
        if self.waiter is None or self.waiter.done():
            return  # nobody is waiting: a new wait arms a new timer
        loop = asyncio.get_running_loop()
        if loop.time() < self.deadline:  # data came meanwhile and a later read is waiting: wait on
            self.timer = loop.call_at(self.deadline, self._check_deadline)
        else:
            self.waiter.set_exception(httpcore.ReadTimeout("nothing within TIMEOUT_SECONDS"))

    # httpcore.AsyncNetworkStream

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self.outgoing:
            self.transport.write(b"".join(self.outgoing))
            self.outgoing.clear()
        if not self.received and not self.eof:  # wait for data, until `timeout` after the last that came
            loop = asyncio.get_running_loop()
            self.waiter = loop.create_future()
            self.deadline = loop.time() + timeout
            if self.timer is None:
                self.timer = loop.call_at(self.deadline, self._check_deadline)
            try:
                await self.waiter
            finally:
                self.waiter = None
        if not self.received:
            return b""  # end of stream
        data = self.received.pop(0)
        if len(data) > max_bytes:
            self.received.insert(0, data[max_bytes:])
            data = data[:max_bytes]
        self.buffered -= len(data)
        if self.paused and self.buffered <= READ_BUFFER_LIMIT:
            self.paused = False
            self.transport.resume_reading()
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        # Never waits, so no write timeout applies: the bytes go to the transport's buffer with the next read.
        if self.transport.is_closing():
            raise httpcore.WriteError("the connection is closed")
        self.outgoing.append(buffer)

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport.close()

    def get_extra_info(self, info: str) -> Any:
        # httpcore asks only "is_readable", of an idle connection: anything to read means the server hung up.
        return bool(self.received) or self.eof


class Connection(httpcore.AsyncHTTP11Connection):
    """httpcore's HTTP/1.1 connection, without the lock around its state (`_state_lock`: Internals relied on). The
    lock guards a connection shared by concurrent requests, as in httpcore's pool; ours hands a connection to one
    request at a time, and anyio's lock costs a trip through the event loop on every acquire, twice per request."""

    def __init__(self, origin: httpcore.Origin, stream: SocketStream, keepalive_expiry: float) -> None:
        super().__init__(origin, stream, keepalive_expiry)
        self._state_lock = NO_LOCK
        self.stream = stream


NO_LOCK = contextlib.nullcontext()  # `async with` it does nothing (Python 3.10)


async def whole(upstream: Upstream, response: httpcore.Response, limit: int, cut: bool = False,
                chunks: AsyncIterator[bytes] | None = None) -> bytes:
    """An upstream's response body, held whole (an answer to share, a model list, an error's body); past `limit`
    bytes, with `cut` its first `limit` (and at most a chunk more; the rest stays in `chunks`, if given), else 502
    answer_too_large. Failures are translated as in Upstream.send."""
    held, size = [], 0
    try:
        async for chunk in chunks or response.stream:
            held.append(chunk)
            size += len(chunk)
            if size > limit:
                if not cut:
                    raise upstream.too_large()
                break
    except UPSTREAM_EXCEPTIONS as exc:
        raise upstream.translate(exc, response.extensions.get(HOST_EXTENSION)) from exc
    return b"".join(held)


@dataclasses.dataclass(slots=True, eq=False)
class PooledBody:
    """A response body that gives its connection back to the pool when it is closed."""
    pool: Pool | None
    connection: Connection
    body: Any

    def __aiter__(self) -> Any:
        return self.body.__aiter__()

    async def aclose(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            try:
                await self.body.aclose()  # h11 decides: ready for the next request, or closed
            finally:
                pool.checkin(self.connection)


class Pool:
    """Keep-alive HTTP/1.1 connections to one upstream: a stack of idle ones and a cap on the total. httpcore's
    pool serves any origin and HTTP/2, and so re-examines every connection it holds on every request (see above);
    one origin and HTTP/1.1 need less: the idle connection used last is the one most likely still open. A request
    owns its connection from checkout until its response is closed, so a cancellation at any point, even while the
    connection opens, leaves nothing half-done in shared state (the trap of httpcore PRs #1094/#1099)."""

    def __init__(self, scheme: bytes, host: bytes, port: int, limit: int) -> None:
        self.origin = httpcore.Origin(scheme, host, port)
        self.host, self.port = host.decode("ascii"), port
        self.tls = ssl.create_default_context() if scheme == b"https" else None
        self.idle: deque[Connection] = deque()  # oldest first
        self.slots = asyncio.Semaphore(limit)
        self.in_use = 0
        self.retired = False  # replaced by a reload: a connection given back is closed, not kept

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        timeouts = request.extensions["timeout"]
        if self.slots.locked():  # all in use: wait for one, as long as for a connection
            await wait_at_most(timeouts["pool"], self.slots.acquire(),
                               httpcore.PoolTimeout("every connection is in use"))
        else:
            await self.slots.acquire()
        self.in_use += 1
        try:
            while self.idle and self.idle[-1].has_expired():  # the idle one used last is the likeliest still open
                self.idle.pop().stream.close()
            if self.idle:
                connection = self.idle.pop()
            else:
                stream = await SocketStream.connect(self.host, self.port, self.tls, timeouts["connect"])
                connection = Connection(self.origin, stream, KEEPALIVE_SECONDS)
            response = await connection.handle_async_request(request)
        except BaseException:
            self.checkin(None)  # httpcore has closed the connection, or it never opened
            raise
        response.stream = PooledBody(self, connection, response.stream)
        return response

    def checkin(self, connection: Connection | None) -> None:
        self.in_use -= 1
        self.slots.release()
        if connection is not None and connection.is_idle():
            # Bytes past the answer's end (more than its Content-Length) would be read as the next request's
            # answer: such a connection is closed, as Go's transport closes one that sends unasked bytes.
            if self.retired or connection._h11_state.trailing_data[0]:
                connection.stream.close()
            else:
                self.idle.append(connection)
        while self.idle and self.idle[0].has_expired():  # the oldest first: close what outlived keep-alive
            self.idle.popleft().stream.close()

    def retire(self) -> None:
        """A reload made another pool for this upstream, or the gateway stops: close the idle connections now,
        and each one in use when its response ends, so that a stream running across a reload goes on to its end."""
        self.retired = True
        while self.idle:
            self.idle.pop().stream.close()


###############################################################################
# Internals relied on #########################################################
###############################################################################

# What this module uses of its libraries beyond what they document, each named here once, with where it is
# used. Each has a test ("Internals relied on" in test_modelgate.py) that fails if a release changes it.
# Read in the sources of httpcore 1.0.5 to 1.0.9 and uvicorn 0.30 to 0.35 and 0.55; tested with httpcore
# 1.0.9 and uvicorn 0.55, json's on Python 3.10 to 3.13. requirements.txt keeps httpcore and uvicorn there.
#
#   httpcore  AsyncHTTP11Connection._state_lock    Connection replaces it with NO_LOCK: httpcore enters it
#             around each request's use of the connection's state, an attribute looked up on every use.
#   httpcore  AsyncHTTP11Connection.has_expired()   asks its stream's get_extra_info("is_readable") whether an
#             idle connection has something to read (the server hung up): SocketStream answers that.
#   httpcore  AsyncHTTP11Connection._h11_state      Pool.checkin reads its h11 trailing_data: bytes that came
#             after an answer's end, which the next request on that connection would take for its answer.
#   httpcore  a status line h11 refuses             raised as httpcore.RemoteProtocolError `from` h11's
#             RemoteProtocolError (its map_exceptions): Upstream.send tells "not HTTP at all" by __cause__.
#   uvicorn   protocols.http.h11_impl.H11Protocol   head_timeout_protocol's subclass, given to Config(http=):
#             its .conn (the h11.Connection, IDLE until a request head is whole), .transport, .loop, and
#             timeout_keep_alive_handler(), which closes the connection.
#   uvicorn   Server.handle_exit, Server.serve      uvicorn_server replaces both on the instance: serve() is
#             what Server.run() awaits, handle_exit what serve() installs for SIGTERM and SIGINT; once done,
#             serve() raises a signal it caught again to the handler it found (main's exit status 0).
#   uvicorn   Server.capture_signals()              takes SIGINT and SIGTERM only (HANDLED_SIGNALS), with
#             signal.signal: serve() puts SIGHUP (reload) on the loop beside them; uvicorn reads
#             config.timeout_graceful_shutdown when it shuts down, after a reload may have set it.
#   Python    json.scanner.make_scanner,            parse_body's walk through a body's top-level keys:
#             json.decoder.scanstring                scanner(text, at) -> (value, end), StopIteration where no
#             value starts; scanstring(text, after the quote) -> (string, end). The scanner calls the
#             decoder's object_pairs_hook, parse_int, parse_float, parse_constant (_skip_value drops values).
#   Python    asyncio's socket transport write()    logs `socket.send() raised exception.` (that msg, no args) on
#             the asyncio logger for each write past the fifth to a lost connection: departed_writes drops it.


###############################################################################
# Command line ################################################################
###############################################################################

def main(argv: list[str] | None = None) -> None:
    """python modelgate.py: read ./.env, check the settings, serve with uvicorn until SIGTERM or Ctrl+C;
    or, with --check, check them and each upstream, and exit."""
    arguments = command_line().parse_args(argv)  # --help, --version and a wrong argument exit here
    environment = dict(os.environ)  # without .env: what a reload reads .env again over
    try:  # what is wrong with the settings, .env or HOST:PORT: exit 1 with one line saying so
        if arguments.add_token is not None:
            print(add_token(arguments.add_token, os.path.join(os.getcwd(), ".env")))
            return
        config, sources = read_config(os.environ)
        if hasattr(time, "tzset"):  # a TZ that .env set: the clock read the zone at start-up (Unix only)
            time.tzset()
        if arguments.check or arguments.usage:
            status = asyncio.run(check(config, sources)) if arguments.check else print_usage(config, arguments.days)
            sys.stdout.flush()  # here, where a reader that left is caught, not at exit
            sys.exit(status)
        sockets = listen(config.host, config.port)
    except ConfigError as exc:
        sys.exit(f"modelgate: {exc}")
    except BrokenPipeError:  # the reader left (--usage | head -1): quiet, with the status a shell gives a process that
        # SIGPIPE ended, as `yes | head -1` (128 + 13). Python's docs, module signal, "Note on SIGPIPE".
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python flushes stdout again at exit
        sys.exit(128 + signal.SIGPIPE)
    setup_logging(config.log_format)
    setup_logging(config.log_format, logging.getLogger("uvicorn"))  # its start and stop lines, in our format
    raise_file_limit()
    app.sources = sources
    app.listening = "listening on " + where_listening(config, [sock.getsockname() for sock in sockets])
    server = uvicorn_server(config, reload=lambda: reload(app, server, environment))
    # SIGTERM ends the process as Ctrl+C does, with exit status 0, a clean stop to service managers: once uvicorn has
    # shut down, it raises the signal again to this handler (Internals relied on), caught below as KeyboardInterrupt.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=sockets)


def command_line() -> Any:
    import argparse  # only the command line needs it

    def whole_days(text: str) -> int:
        if not (text.isascii() and text.isdigit() and int(text) > 0):
            raise argparse.ArgumentTypeError(f"expected a whole number of days above 0, not {text!r}")
        return int(text)

    parser = argparse.ArgumentParser(
        prog="modelgate.py", description="ModelGate: one OpenAI-compatible endpoint and one token in front of "
        "Ollama and, if you want, OpenAI. Without options it serves on HOST:PORT until SIGTERM or Ctrl+C.",
        epilog="Settings come from the environment and from ./.env (the environment wins); README.md lists "
        "them all, and .env.example shows each with its default.")
    parser.add_argument("--version", action="version", version=f"ModelGate {__version__}")
    parser.add_argument("--check", action="store_true", help="read the settings, print the start-up summary, "
                        "ask each upstream once for its models, and exit: 0 when every one answers, 1 otherwise")
    parser.add_argument("--usage", action="store_true", help="print the usage counts in USAGE_DB (per app and "
                        "model: today and the days up to today) and exit; what GET /usage shows")
    parser.add_argument("--days", type=whole_days, default=USAGE_DAYS, metavar="N",
                        help=f"with --usage, the days up to today to count ({USAGE_DAYS})")
    parser.add_argument("--add-token", metavar="NAME", help="add NAME:<a new random token> to MODELGATE_TOKEN "
                        "in ./.env, print the token once, and exit; a running gateway takes it on SIGHUP (unless "
                        "its environment sets MODELGATE_TOKEN)")
    return parser


def print_usage(config: Config, days: int) -> int:
    """--usage: the counts USAGE_DB holds, as a table; 1 when there is no file to read."""
    path = config.usage_db
    if not path:
        print("USAGE_DB is set to nothing: the counts are kept in the running gateway's memory only; "
              "GET /usage shows them")
        return 1
    if not os.path.exists(path):
        print(f"No usage counted yet: {os.path.abspath(path)} (USAGE_DB) does not exist. The gateway makes it "
              "when it starts in this directory.")
        return 1
    try:
        db = open_usage_file(path, read_only=True)
    except ConfigError as exc:
        print(f"modelgate: {exc}")
        return 1
    today = local_day(time.time())[0]
    with contextlib.closing(db):
        counts = read_usage(db, (datetime.date.fromisoformat(today) - datetime.timedelta(days=days - 1)).isoformat())
    names = {*config.token_names, *(key[1] for key in counts)}
    print(*usage_lines(usage_report(counts, today, days, names, config.token_quotas)), sep="\n")
    return 0


def usage_lines(report: dict[str, Any]) -> list[str]:
    """The table --usage prints: a line per app, then one per model, columns aligned."""
    days = report["days"]
    rows = [("app", "model", "requests today", "tokens today", f"requests {days} d", "errors", "prompt tokens",
             "completion tokens", "upstream", "queued")]
    for name, app in report["apps"].items():
        # A model is the app's word: one with a terminal's escape sequences is printed escaped, as it is logged.
        lines = [("", USAGE_NO_MODEL.split(" (")[0] if row["model"] == "-"
                  else printable(f"{row['provider']}/{row['model']}"), row["today"], row["total"])
                 for row in app["models"]]
        for who, model, today, total in [(name, "all models", app["today"], app["total"]), *lines]:
            rows.append((who, model, f"{today['requests']:,}", f"{today['total_tokens']:,}", f"{total['requests']:,}",
                         f"{total['errors']:,}", f"{total['prompt_tokens']:,}", f"{total['completion_tokens']:,}",
                         duration(total["upstream_seconds"]), duration(total["queue_seconds"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    table = ["  ".join(cell.ljust(width) if i < 2 else cell.rjust(width) for i, (cell, width) in
                       enumerate(zip(row, widths))).rstrip() for row in rows]
    quotas = [f"quota {name}: {app['quota_left']:,} of {app['quota']:,} tokens left today"
              for name, app in report["apps"].items() if app["quota"] is not None]
    return [f"Usage from {report['from']} to {report['today']} ({plural(days, 'day')}, local time; tokens as the "
            "upstreams counted them)", "", *table, *([""] + quotas if quotas else [])]


def add_token(name: str, path: str, environ: Mapping[str, str] = os.environ) -> str:
    """--add-token NAME: NAME:<new token> added to MODELGATE_TOKEN in the .env at `path`, every other line kept as it
    was; what to tell the person: the token, once, and how a gateway run in `environ` comes to use it."""
    if not TOKEN_NAME.fullmatch(name):
        raise ConfigError(f"--add-token {name!r}: a name is 1 to 64 letters, digits, '_', '.' or '-'")
    try:
        with open(path, encoding="utf-8-sig", newline="") as file:  # newline="": its CRLFs stay
            lines = file.read().splitlines(keepends=True)
    except FileNotFoundError:
        lines = []
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    at = [number for number, line in enumerate(lines)  # the last MODELGATE_TOKEN line counts (read_dotenv)
          if line.strip().removeprefix("export ").partition("=")[0].strip() == "MODELGATE_TOKEN"]
    if not at:  # none: an empty one, filled in below as any other, after the last line (given its line end)
        lines.append(("\n" if lines and not lines[-1].endswith("\n") else "") + "MODELGATE_TOKEN=\n")
        at = [len(lines) - 1]
    token = secrets.token_urlsafe(32)
    entry = f"{name}:{token}"
    key, _, text = lines[at[-1]].partition("=")
    value, end = dotenv_span(text.strip(), f"{path} line {at[-1] + 1}")
    if value.strip(" \t\r\n"):
        if name in parse_tokens("MODELGATE_TOKEN", value)[1]:
            raise ConfigError(f"MODELGATE_TOKEN in {path} already has a token named {name!r}; choose another name")
        entry = "," + entry
    # Inside its quotes, before its comment: the line stays as written, a value that needs quotes keeps them.
    end += len(text) - len(text.lstrip()) if text.strip() else 0  # what strip() took before it, a no-break space
    if text == text.rstrip("\r\n"):  # the file's last line, without its line end
        text += "\n"
    lines[at[-1]] = f"{key}={text[:end]}{entry}{text[end:]}"
    try:  # in place, not a new file: its owner, mode and a bind mount of it (Docker) stay; a new one is 0600
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8",
                       newline="") as file:
            file.write("".join(lines))
    except OSError as exc:
        raise ConfigError(f"{path} cannot be written: {exc.strerror}") from None
    if environ.get("MODELGATE_TOKEN", "").strip(" \t\r\n"):
        how = ("But MODELGATE_TOKEN is set in the environment, which wins over .env: a gateway started with it does "
               "not use this token, not after a reload either. Add it where MODELGATE_TOKEN is set (the shell, docker "
               "run -e or --env-file, the service's Environment=), or unset it there, then restart the gateway (under "
               "Docker Compose, whose env_file is .env: docker compose up -d).")
    else:
        how = ("Reload the running gateway to use it: kill -HUP <pid of python modelgate.py>, systemctl reload "
               "modelgate, or docker kill -s HUP modelgate (under Docker Compose, whose env_file is read when the "
               "container is made: docker compose up -d).")
    return f"Added the token {name!r} to MODELGATE_TOKEN in {path}; it is shown this once:\n\n    {token}\n\n{how}"


def read_config(environ: MutableMapping[str, str],
                warn: Callable[[str], None] = lambda warning: print(f"modelgate: warning: {warning}", file=sys.stderr)
                ) -> tuple[Config, Sources]:
    """The settings from ./.env and `environ` (which gets what .env adds), or ConfigError with the one line
    that start-up and a reload show; before it, `warn` gets the warnings (a reload logs them, in LOG_FORMAT)."""
    sources = read_settings(os.getcwd(), environ)
    try:
        return load_config(environ), sources
    except ConfigError as exc:
        for warning in sources.warnings:  # a misspelt key may be why a setting is missing
            warn(warning)
        raise ConfigError(f"{exc} ({where_from(getattr(exc, 'setting', ''), sources, environ)})") from None


def where_from(name: str, sources: Sources, environ: Mapping[str, str]) -> str:
    """Where the value a ConfigError is about came from: the environment, or .env (issue 20)."""
    if name in sources.from_environment:
        quotes = ", quotes and all, as `docker run --env-file` passes them" * wrapped_in_quotes(environ[name])
        # `KEY=value # note`: docker run --env-file keeps the note in the value; compose and read_dotenv do not
        quotes += (", its ` #` comment and all, as `docker run --env-file` passes it (put comments on lines of "
                   "their own)") * (" #" in environ[name])
        return (f"{name} is set in the environment{quotes}; the environment wins over .env: change or unset it "
                "where it is set (the shell, docker run -e or --env-file, the service's Environment=)")
    return f"read {sources.dotenv}" if sources.dotenv else f"no .env in {sources.directory}"


def reload(gateway: Gateway, server: Any, environment: Mapping[str, str]) -> None:
    """SIGHUP: read ./.env and the environment again; a configuration with an error is refused whole."""
    if gateway.config is None or gateway.closing:  # not started yet, or shutting down: nothing to change
        log.warning("SIGHUP ignored: the gateway is %s", "shutting down" if gateway.closing else "starting")
        return
    environ = dict(environment)
    try:
        config, sources = read_config(environ, lambda warning: log.warning("%s", warning))  # log: the .env's
    except ConfigError as exc:
        log.error("reload refused, the running configuration stays: modelgate: %s", exc)  # log: why
        return
    gateway.environ = environ
    gateway.reload(config, sources)
    zone = environ.get("TZ")
    if zone != os.environ.get("TZ") and hasattr(time, "tzset"):  # a TZ that .env sets (main), changed
        if zone is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = zone
        time.tzset()
        gateway.usage.new_zone()
        log.info("TZ is now %s: the log's times, the usage days and TOKEN_QUOTAS' midnight follow it",
                 zone or "unset (the system's zone)")
    # uvicorn's backstop after the gateway's own grace (uvicorn_server), read by uvicorn at shutdown.
    server.config.timeout_graceful_shutdown = gateway.config.shutdown_grace + 5
    server.client_timeout = gateway.config.client_timeout


BIND_FAILURES = {  # what listen() says when binding fails, by errno (anything else: its strerror)
    errno.EADDRINUSE: "PORT={port} is in use on {host}: another program (another ModelGate?) listens there. Stop it, "
                      "or set PORT to a free port",
    errno.EADDRNOTAVAIL: "HOST={host!r} is not an address of this machine. Set HOST to one of its addresses: "
                         "0.0.0.0 for every interface, 127.0.0.1 for itself only",
    errno.EACCES: "PORT={port} needs privileges this process lacks (ports below 1024 do): use a port such as 8010",
}


def listen(host: str, port: int) -> list[socket.socket]:
    """Sockets on HOST:PORT, bound as uvicorn would bind them (asyncio's create_server: one per address
    HOST resolves to, IPv6 ones IPv6-only), but before the lifespan starts: a HOST that does not resolve
    and a PORT in use stop start-up with a line naming them, never after "Application startup complete"."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:  # UnicodeError: a label longer than DNS allows
        reason = exc.strerror if isinstance(exc, socket.gaierror) else "not a valid host name"
        raise ConfigError(f"HOST={host!r} does not resolve to an address ({reason}). Set HOST to an address "
                          "of this machine: 0.0.0.0 for every interface, 127.0.0.1 for itself only") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(addresses):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(2048)  # uvicorn's default backlog, where connections wait from here on until uvicorn serves
    except OSError as exc:
        for sock in sockets:
            sock.close()
        failure = BIND_FAILURES.get(exc.errno, "cannot listen on HOST={host!r} PORT={port}: {reason}")
        raise (PortInUse if exc.errno == errno.EADDRINUSE else ConfigError)(
            failure.format(host=host, port=port, reason=exc.strerror)) from None
    return sockets


class PortInUse(ConfigError):
    """PORT is taken: by another program, or by this very gateway when --check runs beside it."""


def where_listening(config: Config, addresses: Iterable[tuple[Any, ...]]) -> str:
    scheme = "https" if config.tls_cert_file else "http"
    urls = ", ".join(f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"
                     for host, port, *_ in addresses)  # (an IPv6 socket's address has two more)
    # In a container (HOST in Compose's env_file), nothing outside can connect, and Docker's healthcheck, which
    # asks 127.0.0.1 (Dockerfile), says healthy all the same: the line that says where it listens says so.
    return urls + (" (loopback: only this machine can connect; in a container, only the container itself: leave "
                   "HOST unset)") * is_loopback(config.host)


# --check waits this long for each host's model list (listing models loads none: it is quick when all is well).
CHECK_TIMEOUT_SECONDS = 10.0


async def check(config: Config, sources: Sources) -> int:
    """--check: the start-up summary and its warnings, each upstream host asked once for its models, and the aliases
    and TOKEN_MODELS compared with them. Exit status 1 when anything is wrong (a warning, an upstream that does not
    answer, an alias or a pattern no listed model matches), each said on a line of its own (issue 20); else 0."""
    log.addHandler(logging.NullHandler())  # what the gateway would log while serving is said here in full
    log.propagate = False
    would_listen = "would listen on " + where_listening(config, [(config.host, config.port)])
    warnings = config_warnings(config, sources)
    print(*summary(config, sources, would_listen), *(f"warning: {warning}" for warning in warnings), sep="\n")
    problems = len(warnings)  # each is something the owner did not mean, or a door left open
    try:
        for sock in listen(config.host, config.port):
            sock.close()
    except PortInUse as exc:
        print(f"note: {exc}; that is fine if it is this gateway, already running")
    except ConfigError as exc:
        print(f"FAILED: {exc}")
        problems += 1
    upstreams = list(Gateway.make_upstreams(config, Metrics()).values())
    try:
        results = await asyncio.gather(*(probe(upstream, host) for upstream in upstreams for host in upstream.hosts))
        try:
            cloud = await asyncio.wait_for(cloud_summary(config, upstreams[0], CloudModels()), CHECK_TIMEOUT_SECONDS)
        except asyncio.TimeoutError:
            cloud = f"Ollama's cloud: unknown (no answer to /api/status within {CHECK_TIMEOUT_SECONDS:g} s)"
    finally:
        for upstream in upstreams:
            upstream.retire()
    answered, lines, ids = zip(*results)  # (each upstream has a host at least)
    unmatched = unmatched_models(config, set().union(*ids)) if all(answered) else []  # else the list is partial
    print(*lines, *(f"FAILED: {line}" for line in unmatched), cloud, sep="\n")
    problems += answered.count(False) + len(unmatched)
    print(f"check failed: {problems} problem{'s' * (problems > 1)}, each said above" if problems
          else "check passed: every upstream answers, and nothing is wrong")
    return 1 if problems else 0


def unmatched_models(config: Config, listed: set[str]) -> list[str]:
    """An alias whose target, and a TOKEN_MODELS pattern that matches, no model any host lists (`provider/id`):
    most likely a typo, which leaves the alias unusable or the token without the model it was meant to have."""
    lines = []
    for alias, target in config.model_aliases.items():
        try:
            model_id = route_model(alias, config).id
        except GatewayError as error:
            lines.append(f"MODEL_ALIASES: {alias}={target}: {error.message}")
            continue
        if listed.isdisjoint(spellings(model_id)):  # Ollama lists tiny:latest, and runs tiny as that
            lines.append(f"MODEL_ALIASES: the target of {alias}={target} is {model_id}, which no host lists; "
                         "GET /v1/models (ollama list) shows the names there are")
    return lines + [f"TOKEN_MODELS: {name}={pattern} matches no model any host lists, so the token named {name!r} "
                    "cannot use what it was meant to; patterns look like ollama/qwen2.5*"
                    for name, patterns in config.token_models.items() for pattern in patterns
                    if not any(matches(model_id, pattern) for model_id in listed)]


async def probe(upstream: Upstream, host: Host) -> tuple[bool, str, list[str]]:
    """One host asked for its models: (whether it answered, a line saying what it answered, its `provider/id`s)."""
    where = f"{upstream.where(host)} {shown_url(host.base_url)}"
    try:
        document = await asyncio.wait_for(upstream.get_json(b"/models", [], host), CHECK_TIMEOUT_SECONDS)
    except asyncio.TimeoutError:
        return False, f"FAILED {where}: no answer to GET /models within {CHECK_TIMEOUT_SECONDS:g} s", []
    except GatewayError as failure:
        detail = failure.detail.removeprefix(upstream.where(host) + " ")
        return False, f"FAILED {where}: {failure.message} ({detail})", []
    if isinstance(document, Answer):  # an error status
        if document.status == 404 and upstream.name == "ollama" and (native := await ollama_native_api(upstream, host)):
            return False, f"FAILED {where}: {native}", []
        message = json.loads(document.body)["error"].get("message")  # upstream_error made it OpenAI-shaped
        return False, f"FAILED {where}: GET /models: {message}", []
    models = model_entries([document], "data")
    ids = [f"{upstream.name}/{item['id']}" for item in models
           if isinstance(item, dict) and isinstance(item.get("id"), str)]
    if not models and upstream.name == "ollama":  # a fresh install: every request would get 404 model not found
        return False, (f"FAILED {where}: answers, but has no model: pull one there (ollama pull qwen2.5:7b), and "
                       "`ollama list` shows it"), []
    return True, f"ok {where}: answers, {len(models)} models", ids


async def ollama_native_api(upstream: Upstream, host: Host) -> str:
    """For a host that answered 404 to /models: whether Ollama's native API answers beside it, and then
    what OLLAMA_BASE_URL should say. "" when it does not answer either."""
    url = urlsplit(host.base_url)
    path = url.path.rstrip("/")
    root = path.removesuffix("/v1").removesuffix("/api")
    native = Host(host.number, urlunsplit((url.scheme, url.netloc, root, "", "")))
    try:
        tags = await asyncio.wait_for(upstream.get_json(b"/api/tags", [], native), CHECK_TIMEOUT_SECONDS)
    except (GatewayError, asyncio.TimeoutError):
        return ""
    finally:
        native.pool.retire()
    if not (isinstance(tags, dict) and "models" in tags):
        return ""
    if path == root + "/v1":
        return (f"Ollama answers {root}/api/tags but 404 on {root}/v1/models: this Ollama has no "
                "OpenAI-compatible API; update it")
    return (f"Ollama answers {root}/api/tags but 404 on {path}/models: OLLAMA_BASE_URL is missing /v1; write "
            f"{with_v1(host.base_url)}")  # what config_warnings says too


# How long an idle client connection stays open: nginx's default keep-alive. uvicorn's own 5 s is exactly
# how long httpx (openai-python, LangChain, LiteLLM, the ollama client) reuses an idle connection, so a
# request sent at 5 s idle could meet a socket being closed; Node's undici keeps 4 s, aiohttp 15 s.
CLIENT_KEEPALIVE_SECONDS = 75


def uvicorn_server(config: Config, gateway: Gateway = app, keep_alive: float = CLIENT_KEEPALIVE_SECONDS,
                   reload: Callable[[], None] | None = None) -> Any:
    """The uvicorn server that `python modelgate.py` runs, with our part of SIGTERM, `reload` on SIGHUP, a bound on
    the wait for a request head (CLIENT_TIMEOUT_SECONDS) and asyncio's errors one line per kind."""
    try:
        import uvicorn  # only the command line needs it; `uvicorn modelgate:app` brings its own
    except ModuleNotFoundError as missing:
        sys.exit(LACKING.format(python=sys.executable, name=missing.name))
    server = uvicorn.Server(uvicorn.Config(
        gateway, host=config.host, port=config.port, server_header=False, timeout_keep_alive=keep_alive,
        ssl_certfile=config.tls_cert_file or None, ssl_keyfile=config.tls_key_file or None,
        # uvicorn's h11 protocol, which closes a connection without a complete request head after
        # CLIENT_TIMEOUT_SECONDS. Named, so that httptools, if installed, is not picked instead: it would lack that.
        http=head_timeout_protocol(lambda: server.client_timeout),
        access_log=False, log_config=None,  # we log one line per request; main() gives uvicorn's own lines our format
        proxy_headers=False,  # X-Forwarded-For is for the app to judge (TRUSTED_PROXIES), not uvicorn
        # A backstop for a client that stops reading the error event: uvicorn cancels what still runs.
        timeout_graceful_shutdown=config.shutdown_grace + 5,
    ))
    server.client_timeout = config.client_timeout  # what a reload sets (main's reload), read per connection
    uvicorn_exit, uvicorn_serve = server.handle_exit, server.serve

    def handle_exit(sig: int, frame: Any) -> None:
        # uvicorn stops accepting connections, then waits for the open ones, however long a stream runs,
        # before the lifespan hears of it; the gateway hears of it now. A signal handler only schedules.
        asyncio.get_running_loop().call_soon_threadsafe(gateway.shut_down)
        uvicorn_exit(sig, frame)

    async def serve(sockets: Any = None) -> None:
        loop = asyncio.get_running_loop()
        before = loop.get_exception_handler()
        loop.set_exception_handler(LoopErrors())
        if reload is not None:  # uvicorn handles SIGINT and SIGTERM only; SIGHUP would end the process
            loop.add_signal_handler(signal.SIGHUP, reload)
        try:
            await uvicorn_serve(sockets)
        finally:
            loop.set_exception_handler(before)
            if reload is not None:
                loop.remove_signal_handler(signal.SIGHUP)

    server.handle_exit = handle_exit  # what uvicorn installs as the SIGTERM and SIGINT handler
    server.serve = serve  # what server.run() runs
    return server


def head_timeout_protocol(seconds: Callable[[], float]) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol, and a timer that closes the connection while h11 waits for a complete request head
    (their_state IDLE) `seconds()` after it began to wait; a client that begins a TLS handshake (a record of type 22,
    major version 3: RFC 8446 §5.1) instead of a request is closed, and the log says why."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadTimeoutProtocol(H11Protocol):
        head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self.watch_head()

        def data_received(self, data: bytes) -> None:
            if data.startswith(b"\x16\x03") and self.conn.their_state is h11.IDLE:  # where a request must begin
                # log: one line that says what to change, not uvicorn's "Invalid HTTP request received."
                log.warning("a client at %s spoke TLS (its URL begins https://) to this gateway, which serves plain "
                            "HTTP: give it http://, or serve HTTPS with TLS_CERT_FILE and TLS_KEY_FILE",
                            self.client[0] if self.client else "-")
                self.transport.close()
                return
            super().data_received(data)
            self.watch_head()

        def connection_lost(self, exc: Exception | None) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
            super().connection_lost(exc)

        def watch_head(self) -> None:
            # Armed once per head: bytes that keep coming do not move the deadline. Between a response
            # and the next request's first byte, uvicorn's keep-alive timer closes an idle connection.
            waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
            if waiting and self.head_timer is None:
                self.head_timer = self.loop.call_later(seconds(), self.timeout_keep_alive_handler)
            elif not waiting and self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

    return HeadTimeoutProtocol


class LoopErrors:
    """asyncio's exception handler under `python modelgate.py`. Out of file descriptors, asyncio's accept loop
    reports its OSError for every connection waiting in the backlog, again and again, each with a traceback (tens
    of thousands a second). Here the first of a kind is logged (an OSError in one line, anything else with
    asyncio's traceback), and those that follow are counted and logged as one line a minute while they go on; a
    kind quiet for a minute is forgotten, and logged in full when it comes back."""

    def __init__(self, seconds: float = 60.0) -> None:
        self.seconds = seconds
        self.repeats: dict[tuple, list] = {}  # kind -> [the text of its first, how many since its last line]

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        message = context.get("message") or "asyncio error"
        # An OSError's kind is its errno, not its text, which may name the peer: one line per kind, not per peer.
        kind = (message, type(exc), getattr(exc, "errno", None))
        if kind not in self.repeats:
            shown = exc if isinstance(exc, OSError) else type(exc).__name__
            text = message if exc is None else f"{message}: {shown}"
            self.repeats[kind] = [text, 0]
            loop.call_later(self.seconds, self.report, kind)
            if isinstance(exc, OSError):  # log: the first of its kind; a count follows if it goes on
                log.error("%s; more of the same are counted", text)
            else:
                loop.default_exception_handler(context)
            return
        self.repeats[kind][1] += 1

    def report(self, kind: tuple) -> None:
        # Kept only if it went on, so that kinds seen once (asyncio's "Exception in callback <handle>") do not pile up.
        text, repeats = self.repeats.pop(kind)
        if repeats:
            log.error("%s: %d more in the last %.0f s", text, repeats, self.seconds)  # log: a kind that goes on
            self.repeats[kind] = [text, 0]
            asyncio.get_running_loop().call_later(self.seconds, self.report, kind)


def raise_file_limit() -> None:
    """Raise the soft limit on open files to the hard one: each connection holds one, and systemd's
    default soft limit (1,024) is soon reached by clients that keep their connections open."""
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource  # Unix only
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:  # on macOS an unlimited hard limit is more than the kernel allows: ValueError, OSError
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.info("open files: the soft limit was raised from %d to the hard limit, %d", soft, hard)


if __name__ == "__main__":
    main()
