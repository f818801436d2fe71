#!/usr/bin/env python3
"""Benchmark of ModelGate: what the gateway costs compared with calling the model server directly.

Run it from a clone of the repository, with the Python that has the gateway's dependencies (uvicorn and
httpcore) installed:

    python bench_modelgate.py                  # full run, a few minutes
    python bench_modelgate.py --quick          # a second or two per scenario (CI smoke test)
    python bench_modelgate.py --loop uvloop --http httptools   # with uvicorn's optional accelerators
    python bench_modelgate.py --json           # the same figures as JSON on stdout
    python bench_modelgate.py --floor          # the relay floor (below) in place of the gateway
    python bench_modelgate.py --alternate 3    # gateway, floor, gateway, floor, ...: three rounds of both
    python bench_modelgate.py --markdown docs/benchmark.md   # also write the figures as a markdown table
    python bench_modelgate.py --sharing        # apps sharing one model: ModelGate's queue (below)
    python bench_modelgate.py --instructions   # instructions per request and per chunk, under callgrind
    python bench_modelgate.py --instructions --env 'OLLAMA_NUM_PARALLEL=0' --env 'USAGE_DB=/tmp/u.db'
    python bench_modelgate.py --path --verbose # the functions of modelgate.py a request enters, in order

It starts a fake OpenAI-compatible model server (a plain asyncio protocol with canned answers and
keep-alive connections) and the gateway (`uvicorn modelgate:app`, one worker) in front of it. The fake
server runs in a process of its own, so that it never delays the load generator's event loop and its
work is never counted as the load generator's. When the machine has two CPUs or more, the gateway runs
alone on the first one and the fake server and the load generator share the second, so the gateway's
figures are "per gateway core". Each load scenario runs twice: straight to the fake server ("direct",
the limit of this harness) and through the gateway, with the same request bytes. Requests are sent by
`wrk` when it is installed (`--no-wrk` to not use it), otherwise by the built-in asyncio load generator
(keep-alive connections, each sending its next request as soon as the previous response is complete);
streams always use the built-in client, which timestamps every event as it arrives.

Figures (latencies are from sending a request to receiving its response completely; "ratio" is
gateway / direct of the figure named beside it):
  chat_c1      one connection, chat completions: latency p50 and p99; added = gateway - direct.
  chat_c64     64 connections, chat completions: requests per second, latency p50 and p99, and the
               gateway's CPU time (user + system, from /proc/<pid>/stat) per completed request.
  embed_c64    the same with embeddings requests whose answer is one 768-float vector.
  stream_c200  200 connections, each streaming one chat completion after another; the model sends
               50 SSE events 20 ms apart, the last one `data: [DONE]`. Stream starts are spread over the
               first stream's length, so about 200 streams are open at any time. (--quick sends 10 events,
               so its streams start five times as often: a heavier load than the full run's.)
               ttfb: time to the first complete event; gap: time between consecutive events of a stream;
               batched: the share of gaps under 5 ms (events that arrived in a burst instead of 20 ms
               apart); CPU: the gateway's CPU time per relayed event, including the requests' own cost.
  cold_start   from starting the gateway process until GET /health answers 200: median of 5 starts.
  memory       the gateway's resident memory (VmRSS) once started and idle, and its peak during
               stream_c200 (sampled every 50 ms).
  instructions (--instructions) per plain request and per relayed chunk: ModelGate, the relay floor, and
               ModelGate / floor; with --env, each variant and its difference from ModelGate's default.
  path         (--path) definitions, long_jumps, backwards: as described below.

--floor measures, in place of the gateway, the least any gateway on ModelGate's libraries can cost: uvicorn
serving an app that relays every request through ModelGate's upstream pool and httpcore's HTTP/1.1 connection
and does nothing else (no token, routing, JSON, log line or metrics). The gateway's figures minus the
floor's are what ModelGate's own work costs. --alternate N measures both in one invocation, ModelGate then
the floor, N times over (the direct figures once, in the first round), and gives per round, and as the
median of the rounds: ModelGate's chat_c64 requests/s as a percentage of the floor's, and its CPU time per
relayed chunk as a multiple of the floor's. Runs side by side see the same machine, which a shared one
does not stay from one invocation to the next.

--markdown FILE writes the figures, the date, the machine (CPU model, cores) and the versions of Python,
uvicorn, httpcore and h11 as markdown tables to FILE; with --alternate, also the two ratios per round.

--sharing measures ModelGate's queue (OLLAMA_NUM_PARALLEL, TOKEN_SHARES) against a fake Ollama that schedules as
Ollama does: one request per model at a time, the others first come first served, each streamed for 100 ms.
  late_stream  one token sends 40 streams at once, a second token one stream 0.5 s later, straight to the fake
               Ollama and through ModelGate: the late stream's time to first byte, in service times (direct it
               waits for the whole flood), and the flood's total time through ModelGate against direct.
  shares       two tokens each send 24 streams at once, with TOKEN_SHARES 1:1 and 3:1: their turns (streams
               begun at the fake Ollama) while both still wait, and their ratio against the shares.
  queue_cost   chat_c64 and the gateway's CPU per request against the ordinary fake server, with the queue on
               but never full (OLLAMA_NUM_PARALLEL=1000) and off (0), alternated, three rounds: the medians.

--instructions counts under callgrind (valgrind's; `apt-get install valgrind`) the instructions the process
under test executes: per plain `/v1/chat/completions` request, and per relayed chunk (streams of 50 content
chunks minus streams of 1, per chunk of difference), for ModelGate and for the relay floor, each in a
process of its own after a warm-up (20 requests, 4 streams of each length). Unlike the figures above, these
do not move with the machine's load: two runs agree within 1 %. The fake model server and the client run in
this process, outside the count. How the counted parts are cut out of the process's life:
  - The process is uvicorn as the load runs start it (`uvicorn APP`, not `python modelgate.py`, so that
    ModelGate and the floor run on the same server settings), started by serve_counted(). On SIGUSR1 it
    calls math.lgamma, before which callgrind writes its counts so far (--dump-before), collects all
    garbage, calls it again (that part, the collection's, is not used) and answers on a pipe. Each counted
    part starts with the collector at zero.
  - The signal is sent once the process is idle (waiting in epoll_wait, no CPU time for 50 ms, per /proc):
    what a request does after its response has left (the log line, metrics) counts with it.
  - Per request: (the part with 50 requests - a part with none) / 50; the marking's own cost cancels out.
    Per chunk: (4 streams of 50 chunks - 4 streams of 1) / (4 x 49). --quick counts 10 requests and 2
    streams of 10 chunks, after a warm-up of 5 requests and 2 streams of each length.
  - In the counted process, timers run 1000 times slower (loop.call_later): what they start is not a
    request's own work (uvicorn's tick ten times a second, ModelGate's client listener 50 ms into a request,
    the expiry of idle connections), and under callgrind, which runs the process dozens of times slower,
    it would fall into requests by chance. The fake server sends each event of a stream when the client
    has received the one before, so each reaches the gateway on its own however slowly it runs.
    PYTHONHASHSEED is 0.
--env 'NAME=VALUE ...' counts ModelGate once more with these settings added (once for each --env) and gives
each against the default, which has, as in the load runs, the queue on but never full (--env
OLLAMA_NUM_PARALLEL=0 counts it without). --keep-callgrind DIR keeps callgrind's files for `callgrind_annotate
--inclusive=yes`: NAME.callgrind.out.N, N = 3 the plain requests, 5 none, 7 the long streams, 9 the short
ones. With --markdown FILE the figures, the date, the commit and the versions become FILE's section
"Instructions (callgrind)"; the rest of FILE is kept (and a load run's --markdown keeps that section).

--path follows one plain request as a reader does (issue 16): it runs `python modelgate.py` with
sys.setprofile recording the first entry into each function of modelgate.py (each code object, so
comprehensions too up to Python 3.11; 3.12 inlines them), from Gateway.__call__ to the log line of the
first plain `/v1/chat/completions` request after start, and prints how many definitions were entered, how
many of the steps between successive ones jump more than 300 lines (by the definitions' first lines), and
how many of those jump backwards. --verbose lists them, name:line, in the order entered.

The script asserts no figure: it prints them. It exits with status 1 when something fails to run: the
gateway does not start, a response is not a 2xx, a body or stream is incomplete or malformed (such errors
are counted and printed).
"""

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import itertools
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent
HOST = "127.0.0.1"
TOKEN = "bench-token"
EMBEDDING_SIZE = 768
BATCHED_GAP = 0.005              # seconds: a shorter gap between two events counts as batched
STREAM_CONNECTIONS = 200
CHUNK_INTERVAL = 0.020           # seconds between two events of a fake stream
RSS_SAMPLE_INTERVAL = 0.05       # seconds
RESPONSE_TIMEOUT = 10.0          # seconds a run may exceed its duration before it counts timeouts
START_TIMEOUT = 30.0             # seconds the gateway may take to answer /health
POLL_INTERVAL = 0.005            # seconds between two /health attempts
COLD_STARTS = 5
# The fake model server answers any number of requests at once: the gateway's queue is on but never full
# (above the 200 streams of stream_c200). --sharing compares it with no queue (OLLAMA_NUM_PARALLEL=0).
QUEUE_SLOTS = "1000"
UPSTREAM_LIFETIME = 1800.0       # seconds after which the fake model server stops in any case
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

CHAT_PATH = "/v1/chat/completions"
EMBED_PATH = "/v1/embeddings"
CHAT_BODY = {"model": "ollama/bench", "messages": [{"role": "user", "content": "Say hello."}]}
STREAM_BODY = {**CHAT_BODY, "stream": True}
EMBED_BODY = {"model": "ollama/bench", "input": "The quick brown fox jumps over the lazy dog."}
GATEWAY_APP = "modelgate:app"
FLOOR_APP = "bench_modelgate:relay_floor"


@dataclass
class Settings:
    """How long each part of a run lasts."""
    duration: int        # seconds of each measured run (whole seconds, as wrk takes them)
    warmup: float        # seconds of unmeasured load before each measured run
    chunks: int          # events per fake stream, `data: [DONE]` included


FULL = Settings(duration=10, warmup=1.0, chunks=50)
QUICK = Settings(duration=1, warmup=0.2, chunks=10)


class BenchError(Exception):
    """Something failed to run; the benchmark stops."""


# ---------------------------------------------------------------------------------------------------
# The relay floor (--floor): `uvicorn bench_modelgate:relay_floor`
# ---------------------------------------------------------------------------------------------------

FLOOR_TIMEOUTS = {"timeout": {"connect": RESPONSE_TIMEOUT, "pool": RESPONSE_TIMEOUT,
                              "read": RESPONSE_TIMEOUT, "write": RESPONSE_TIMEOUT}}


async def relay_floor(scope: dict, receive: Callable, send: Callable) -> None:
    """An ASGI app that relays to OLLAMA_BASE_URL as the gateway does, and does nothing more."""
    import httpcore
    import modelgate
    if scope["type"] == "lifespan":
        # The upstream as the gateway holds it (address and pool), in the state uvicorn gives each request.
        scope["state"]["host"] = modelgate.Host(1, os.environ["OLLAMA_BASE_URL"])
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body, more = b"", True
    while more:
        message = await receive()
        body, more = body + message.get("body", b""), message.get("more_body", False)
    if scope["path"] == "/health":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    host = scope["state"]["host"]
    url = httpcore.URL(scheme=host.scheme, host=host.host, port=host.port,
                       target=host.path + scope["path"].removeprefix("/v1").encode())
    headers = [(b"host", host.authority), (b"content-type", b"application/json"),
               (b"content-length", b"%d" % len(body))]
    response = await host.pool.handle_async_request(
        httpcore.Request(b"POST", url, headers=headers, content=body, extensions=FLOOR_TIMEOUTS))
    try:
        if modelgate.media_type(response.headers) == b"text/event-stream":
            await send({"type": "http.response.start", "status": response.status,
                        "headers": [(b"content-type", b"text/event-stream")]})
            async for chunk in response.stream:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        else:
            data = b"".join([chunk async for chunk in response.stream])
            await send({"type": "http.response.start", "status": response.status,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]})
            await send({"type": "http.response.body", "body": data})
    finally:
        await response.aclose()


# ---------------------------------------------------------------------------------------------------
# The fake model server (runs in its own process: `--serve-upstream FD CHUNKS INTERVAL_MS`)
# ---------------------------------------------------------------------------------------------------

# A request's body length (the gateway, the built-in client and wrk never send a chunked one).
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)


def json_bytes(data: object) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def http_response(body: bytes, status: bytes = b"200 OK") -> bytes:
    return (b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (status, len(body), body))


def http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def canned_responses() -> dict[tuple[bytes, bytes], bytes]:
    """The fake server's complete answers by (method, path)."""
    chat = {"id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": "bench",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "Hello! How can I help you today?"}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 9, "total_tokens": 19}}
    vector = [round(math.sin(i + 1) / 10, 8) for i in range(EMBEDDING_SIZE)]
    embeddings = {"object": "list", "model": "bench",
                  "data": [{"object": "embedding", "index": 0, "embedding": vector}],
                  "usage": {"prompt_tokens": 10, "total_tokens": 10}}
    models = {"object": "list", "data": [{"id": "bench", "object": "model", "created": 1700000000,
                                          "owned_by": "bench"}]}
    return {(b"POST", CHAT_PATH.encode()): http_response(json_bytes(chat)),
            (b"POST", EMBED_PATH.encode()): http_response(json_bytes(embeddings)),
            (b"GET", b"/v1/models"): http_response(json_bytes(models))}


def stream_writes(chunks: int) -> list[bytes]:
    """A streamed chat completion as the fake server writes it: the head, then one write per SSE event."""
    def event(delta: dict, finish_reason: str | None) -> bytes:
        chunk = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000,
                 "model": "bench", "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
        return b"data: %s\n\n" % json_bytes(chunk)

    head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    events = [event({"content": "token "}, None) for _ in range(chunks - 2)]
    events.append(event({}, "stop"))
    writes = [head] + [http_chunk(e) for e in events]
    writes.append(http_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    return writes


NOT_FOUND = http_response(b'{"error":"not found"}', b"404 Not Found")
BAD_REQUEST = http_response(b'{"error":"bad request"}', b"400 Bad Request")


class FakeUpstream(asyncio.Protocol):
    """One keep-alive connection to the fake model server; its requests are answered in order."""

    def __init__(self, answers: dict[tuple[bytes, bytes], bytes], stream: list[bytes], interval: float):
        self.answers = answers
        self.stream = stream
        self.interval = interval
        self.loop = asyncio.get_running_loop()
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | asyncio.Future | None = None   # set while a stream is being sent

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.answer_requests()

    def answer_requests(self) -> None:
        while self.timer is None and not self.transport.is_closing():
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end])
            length = CONTENT_LENGTH.search(head)
            size = end + 4 + (int(length[1]) if length else 0)
            if len(self.buffer) < size:
                return
            body = bytes(self.buffer[end + 4:size])
            del self.buffer[:size]
            method, path = head.split(b" ", 2)[:2]
            self.answer(method, path, body)

    def answer(self, method: bytes, path: bytes, body: bytes) -> None:
        if (method, path) == (b"POST", CHAT_PATH.encode()):
            try:
                request = json.loads(body)
            except ValueError:
                request = None
            if not isinstance(request, dict):
                self.transport.write(BAD_REQUEST)
                return
            if request.get("stream") is True:
                self.start_stream(request)
                return
        self.transport.write(self.answers.get((method, path), NOT_FOUND))

    def start_stream(self, request: dict) -> None:
        """Writes the head and the first event at once, then each further event `interval` later."""
        self.transport.write(self.stream[0])
        self.send_event(1)

    def send_event(self, index: int) -> None:
        self.transport.write(self.stream[index])
        if index + 1 < len(self.stream):
            self.timer = self.next_event(index + 1)
        else:
            self.timer = None
            self.answer_requests()

    def next_event(self, index: int) -> asyncio.TimerHandle | asyncio.Future:
        """Schedules event `index` of the stream being sent; what it returns is cancelled if the connection closes."""
        return self.loop.call_later(self.interval, self.send_event, index)


def serve_upstream(fd: int, chunks: int, interval_ms: int) -> None:
    """Serves the fake model server on an inherited listening socket until stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the benchmark process stops this one
    asyncio.run(_serve_upstream(socket.socket(fileno=fd), chunks, interval_ms / 1000))


async def _serve_upstream(sock: socket.socket, chunks: int, interval: float) -> None:
    loop = asyncio.get_running_loop()
    answers, stream = canned_responses(), stream_writes(chunks)
    stopped = loop.create_future()

    def stop() -> None:
        if not stopped.done():
            stopped.set_result(None)

    loop.add_reader(sys.stdin.fileno(), stop)        # readable only at EOF: the benchmark has exited
    loop.call_later(UPSTREAM_LIFETIME, stop)
    server = await loop.create_server(lambda: FakeUpstream(answers, stream, interval), sock=sock,
                                      backlog=1024)
    async with server:
        await stopped


# ---------------------------------------------------------------------------------------------------
# The built-in HTTP/1.1 client and load generator
# ---------------------------------------------------------------------------------------------------

RESPONSE_FRAMING = re.compile(rb"\r\n(content-length|transfer-encoding):[ \t]*([^\r]*)", re.IGNORECASE)


class ResponseParser:
    """Incremental parser of HTTP/1.1 responses with a Content-Length or a chunked body.

    feed() returns True when a response is complete; its status stays in `status` until the next
    response's head arrives. Body bytes go to `on_body` as they arrive, when one is given.
    """

    HEAD, FIXED, SIZE, DATA, DATA_END, TRAILER = range(6)

    def __init__(self, on_body=None):
        self.on_body = on_body
        self.buffer = bytearray()
        self.state = self.HEAD
        self.status = 0
        self.left = 0          # body bytes still expected (Content-Length) or left in the current chunk

    def feed(self, data: bytes) -> bool:
        self.buffer += data
        if self.state == self.HEAD and not self.parse_head():
            return False
        return self.parse_fixed() if self.state == self.FIXED else self.parse_chunked()

    def parse_head(self) -> bool:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(self.buffer[:end + 2])
        del self.buffer[:end + 4]
        if not head.startswith(b"HTTP/1.1 "):
            raise ValueError("not an HTTP/1.1 response")
        self.status = int(head[9:12])
        framing = {name.lower(): value.lower() for name, value in RESPONSE_FRAMING.findall(head)}
        if b"chunked" in framing.get(b"transfer-encoding", b""):
            self.state = self.SIZE
        elif b"content-length" in framing:
            self.state, self.left = self.FIXED, int(framing[b"content-length"])
        else:
            raise ValueError("response without Content-Length or chunked body")
        return True

    def take_body(self) -> None:
        piece = bytes(self.buffer[:self.left])
        del self.buffer[:len(piece)]
        self.left -= len(piece)
        if self.on_body is not None and piece:
            self.on_body(piece)

    def parse_fixed(self) -> bool:
        self.take_body()
        if self.left:
            return False
        self.state = self.HEAD
        return True

    def parse_chunked(self) -> bool:
        while True:
            if self.state == self.DATA:
                if not self.buffer:
                    return False
                self.take_body()
                if not self.left:
                    self.state = self.DATA_END
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                return False
            line = bytes(self.buffer[:end])
            del self.buffer[:end + 2]
            if self.state == self.SIZE:
                self.left = int(line.split(b";")[0], 16)
                self.state = self.DATA if self.left else self.TRAILER
            elif self.state == self.DATA_END:
                if line:
                    raise ValueError("chunk longer than announced")
                self.state = self.SIZE
            elif not line:                     # the empty line after the trailers ends the response
                self.state = self.HEAD
                return True


def request_bytes(path: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data


def request_maker(path: str, body: dict) -> Callable[[], bytes]:
    """Each call: the request again, with a body of its own (`"user": "bench-<n>"`). Identical requests in
    flight at once would share one upstream answer (the gateway's COALESCE), which is not what is measured."""
    numbers = itertools.count()
    return lambda: request_bytes(path, {**body, "user": f"bench-{next(numbers)}"})


@dataclass
class Run:
    """What the connections of one load run share: the requests, the deadline, the errors."""
    requests: Callable[[], bytes]
    deadline: float = math.inf
    errors: Counter = field(default_factory=Counter)


@dataclass
class RequestRun(Run):
    latencies: list[float] = field(default_factory=list)


@dataclass
class StreamRun(Run):
    chunks: int = 0                            # events each stream must have
    ttfbs: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)

    @property
    def events(self) -> int:
        """Events received in complete, correct streams: only those are counted, each of `chunks` events."""
        return len(self.ttfbs) * self.chunks


class Connection(asyncio.Protocol):
    """A keep-alive client connection that sends its run's request again after each complete response
    until the run's deadline. Subclasses say what a complete response means for the run."""

    def __init__(self, run: Run, on_body=None):
        self.run = run
        self.parser = ResponseParser(on_body)
        self.finished = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.now = 0.0                         # when the data being parsed arrived

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop("connection closed by the server")

    def send(self) -> None:
        if self.finished.done():
            return
        self.sent(time.perf_counter())
        self.transport.write(self.run.requests())

    def data_received(self, data: bytes) -> None:
        self.now = time.perf_counter()
        try:
            complete = self.parser.feed(data)
        except ValueError as exc:
            self.stop(f"malformed response: {exc}")
            return
        if complete:
            self.response_complete()
            if self.now < self.run.deadline:
                self.send()
            else:
                self.stop()

    def stop(self, error: str | None = None) -> None:
        if self.finished.done():
            return
        if error:
            self.run.errors[error] += 1
        self.transport.close()
        self.finished.set_result(None)

    def sent(self, at: float) -> None:
        raise NotImplementedError

    def response_complete(self) -> None:
        raise NotImplementedError


class RequestConnection(Connection):
    def sent(self, at: float) -> None:
        self.sent_at = at

    def response_complete(self) -> None:
        status = self.parser.status
        if 200 <= status < 300:
            self.run.latencies.append(self.now - self.sent_at)
        else:
            self.run.errors[f"HTTP {status}"] += 1


class StreamConnection(Connection):
    """Splits each streamed body into SSE events and records when each event became complete."""

    def __init__(self, run: StreamRun):
        super().__init__(run, self.body_received)
        self.pending = bytearray()             # body bytes of an event not yet complete
        self.times: list[float] = []           # when the request was sent, then when each event arrived
        self.last_event = b""
        self.malformed = False

    def sent(self, at: float) -> None:
        self.pending.clear()
        self.times = [at]
        self.last_event = b""
        self.malformed = False

    def body_received(self, piece: bytes) -> None:
        self.pending += piece
        while (end := self.pending.find(b"\n\n")) >= 0:
            self.last_event = bytes(self.pending[:end])
            del self.pending[:end + 2]
            self.malformed |= not self.last_event.startswith(b"data: ")
            self.times.append(self.now)

    def response_complete(self) -> None:
        error = self.stream_error()
        if error:
            self.run.errors[error] += 1
            return
        self.run.ttfbs.append(self.times[1] - self.times[0])
        self.run.gaps.extend(later - earlier for earlier, later in zip(self.times[1:], self.times[2:]))

    def stream_error(self) -> str | None:
        events = len(self.times) - 1
        if not 200 <= self.parser.status < 300:
            return f"HTTP {self.parser.status}"
        if self.malformed or self.pending:
            return "malformed SSE event"
        if events != self.run.chunks:
            return f"stream of {events} events instead of {self.run.chunks}"
        if self.last_event != b"data: [DONE]":
            return "stream not ending with data: [DONE]"
        return None


async def open_connections(port: int, factory, count: int) -> list[Connection]:
    loop = asyncio.get_running_loop()
    connections = []
    for _ in range(count):
        try:
            _, connection = await loop.create_connection(factory, HOST, port)
        except OSError as exc:
            raise BenchError(f"cannot connect to {HOST}:{port}: {exc}") from exc
        connections.append(connection)
    return connections


async def wait_finished(connections: list[Connection], timeout: float) -> None:
    _, late = await asyncio.wait([c.finished for c in connections], timeout=timeout)
    for connection in connections:
        if connection.finished in late:
            connection.stop(f"no complete response within {timeout:.0f} s")


@dataclass
class LoadResult:
    """One measured run of plain requests."""
    requests: int          # responses completed with a 2xx status
    seconds: float
    p50: float             # latency, seconds
    p99: float
    errors: Counter

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; NaN when there are no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


async def request_load(port: int, requests: Callable[[], bytes], connections: int,
                       duration: float) -> LoadResult:
    """Closed loop: every connection sends its next request as soon as its previous response is in."""
    run = RequestRun(requests)
    clients = await open_connections(port, lambda: RequestConnection(run), connections)
    started = time.perf_counter()
    run.deadline = started + duration
    for client in clients:
        client.send()
    await wait_finished(clients, duration + RESPONSE_TIMEOUT)
    seconds = time.perf_counter() - started
    latencies = run.latencies
    return LoadResult(len(latencies), seconds, percentile(latencies, 50), percentile(latencies, 99),
                      run.errors)


class PeakRss:
    """Samples a process's resident memory every RSS_SAMPLE_INTERVAL while `run` is awaited."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak = 0.0

    async def run(self) -> None:
        while True:
            self.peak = max(self.peak, rss_mib(self.pid))
            await asyncio.sleep(RSS_SAMPLE_INTERVAL)


async def stream_load(port: int, requests: Callable[[], bytes], chunks: int, duration: float,
                      rss: PeakRss | None = None) -> StreamRun:
    """STREAM_CONNECTIONS connections stream one response after another until the deadline; their
    first streams start evenly spread over one stream's length."""
    run = StreamRun(requests, chunks=chunks)
    clients = await open_connections(port, lambda: StreamConnection(run), STREAM_CONNECTIONS)
    stream_seconds = (chunks - 1) * CHUNK_INTERVAL
    loop = asyncio.get_running_loop()
    run.deadline = time.perf_counter() + duration
    for index, client in enumerate(clients):
        loop.call_later(index * stream_seconds / len(clients), client.send)
    sampler = asyncio.create_task(rss.run()) if rss else None
    try:
        await wait_finished(clients, duration + stream_seconds + RESPONSE_TIMEOUT)
    finally:
        if sampler:
            sampler.cancel()
    return run


async def fetch(port: int, request: bytes) -> tuple[int, bytes]:
    """One request on a new connection: the status and the whole (de-chunked) body."""
    pieces: list[bytes] = []
    parser = ResponseParser(pieces.append)
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(request)
        while True:
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("connection closed before the response was complete")
            if parser.feed(data):
                return parser.status, b"".join(pieces)
    finally:
        writer.close()


# ---------------------------------------------------------------------------------------------------
# wrk
# ---------------------------------------------------------------------------------------------------

# As request_maker: every request has a body of its own.
WRK_SCRIPT = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {token}"
local number = 0
request = function()
  number = number + 1
  return wrk.format(nil, nil, nil, [==[{body_start}]==] .. number .. [==["}}]==])
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK_RESULT %d %d %d %d %d %d %d %.0f %.0f\\n", summary.requests,
    summary.duration, e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
"""


def wrk_load(wrk: str, workdir: Path, port: int, path: str, body: dict, connections: int,
             duration: int) -> LoadResult:
    script = workdir / "request.lua"
    script.write_text(WRK_SCRIPT.format(token=TOKEN, body_start=json.dumps(body)[:-1] + ', "user": "bench-'))
    command = [wrk, "-t1", f"-c{connections}", f"-d{duration}s", f"--timeout={RESPONSE_TIMEOUT:.0f}s",
               "-s", str(script), f"http://{HOST}:{port}{path}"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish within {exc.timeout:.0f} s") from exc
    lines = [line for line in done.stdout.splitlines() if line.startswith("WRK_RESULT ")]
    if done.returncode != 0 or not lines:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    requests, micros, connect, read, write, timeout, status, p50, p99 = map(float, lines[0].split()[1:])
    errors = Counter({"connect error": int(connect), "read error": int(read), "write error": int(write),
                      "timeout": int(timeout), "HTTP status >= 400": int(status)})
    return LoadResult(int(requests - status), micros / 1e6, p50 / 1e6, p99 / 1e6, +errors)


def wrk_version(wrk: str) -> str:
    done = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10)
    return " ".join((done.stdout or done.stderr).split()[:2])


# ---------------------------------------------------------------------------------------------------
# Processes, pinning and /proc
# ---------------------------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_plan() -> tuple[int, int] | None:
    """(gateway CPU, CPU of the fake server and load generator), or None with fewer than two CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[0], cpus[1]) if len(cpus) >= 2 else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_upstream(chunks: int, stack: contextlib.ExitStack) -> int:
    """Starts the fake model server in a subprocess; returns its port. It serves until our stdin pipe
    to it closes, so it also ends if this process is killed."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        sock.listen(1024)
        command = [sys.executable, str(Path(__file__).resolve()), "--serve-upstream", str(sock.fileno()),
                   str(chunks), str(round(CHUNK_INTERVAL * 1000))]
        process = subprocess.Popen(command, pass_fds=[sock.fileno()], stdin=subprocess.PIPE)
        stack.callback(stop_process, process)
        stack.callback(process.stdin.close)
        return sock.getsockname()[1]


class Gateway:
    """`uvicorn APP` (GATEWAY_APP or FLOOR_APP), one worker, on CPU `cpu` when given."""

    def __init__(self, upstream_port: int, loop: str, http: str, cpu: int | None, log: Path, app: str,
                 settings: dict[str, str] | None = None):
        self.upstream_port, self.loop, self.http, self.cpu, self.log = upstream_port, loop, http, cpu, log
        self.app = app
        self.settings = settings or {}  # the gateway's settings beyond the token and the upstream
        self.port = 0
        self.process: subprocess.Popen | None = None

    def start(self) -> float:
        """Starts the gateway and returns the seconds until GET /health answered 200."""
        self.port = free_port()
        env = {**os.environ, "MODELGATE_TOKEN": TOKEN, "DEFAULT_PROVIDER": "ollama",
               "OLLAMA_BASE_URL": f"http://{HOST}:{self.upstream_port}/v1", "OLLAMA_NUM_PARALLEL": QUEUE_SLOTS,
               **self.settings}
        command = [sys.executable, "-m", "uvicorn", self.app, "--host", HOST, "--port", str(self.port),
                   "--workers", "1", "--no-access-log", "--loop", self.loop, "--http", self.http]
        with open(self.log, "ab") as log:
            started = time.perf_counter()
            self.process = subprocess.Popen(command, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=log)
        if self.cpu is not None:
            os.sched_setaffinity(self.process.pid, {self.cpu})
        self.wait_healthy()
        return time.perf_counter() - started

    def wait_healthy(self) -> None:
        deadline = time.perf_counter() + START_TIMEOUT
        while time.perf_counter() < deadline:
            self.check_running()
            if health_ok(self.port):
                return
            time.sleep(POLL_INTERVAL)
        raise BenchError(f"the gateway did not answer GET /health within {START_TIMEOUT:.0f} s")

    def check_running(self) -> None:
        if self.process.poll() is not None:
            raise BenchError(f"the gateway exited with status {self.process.returncode}")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def health_ok(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\nConnection: close\r\n\r\n")
            answer = b""
            while len(answer) < 12 and (data := sock.recv(4096)):
                answer += data
            return answer.startswith(b"HTTP/1.1 200")
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------------------

def body_error(kind: str, body: bytes, chunks: int) -> str | None:
    """What is wrong with a response body of this kind ("chat", "embed" or "stream"), if anything."""
    try:
        if kind == "stream":
            events = body.split(b"\n\n")
            if len(events) != chunks + 1 or events[-2:] != [b"data: [DONE]", b""]:
                return "stream events missing or not ending with data: [DONE]"
            for event in events[:-2]:
                if "delta" not in json.loads(event.removeprefix(b"data: "))["choices"][0]:
                    return "stream event without delta"
        elif kind == "embed":
            vector = json.loads(body)["data"][0]["embedding"]
            if len(vector) != EMBEDDING_SIZE or not all(isinstance(x, (int, float)) for x in vector):
                return f"embedding is not {EMBEDDING_SIZE} numbers"
        elif not isinstance(json.loads(body)["choices"][0]["message"]["content"], str):
            return "chat completion without message content"
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        return f"unexpected body ({type(exc).__name__}: {exc})"
    return None


def ms(seconds: float) -> float:
    return seconds * 1000


def ratio(gateway: float, direct: float) -> float:
    return gateway / direct if direct else math.nan


class Bench:
    """Runs the scenarios against the fake server ("direct") and the gateway; collects figures and errors."""

    def __init__(self, settings: Settings, gateway: Gateway, upstream_port: int, wrk: str | None,
                 workdir: Path, direct: dict | None = None):
        self.settings = settings
        self.gateway = gateway
        self.upstream_port = upstream_port
        self.wrk = wrk
        self.workdir = workdir
        self.errors: dict[str, Counter] = {}
        # Direct runs by scenario: the fake server does not change between rounds, so it is measured once.
        self.direct = {} if direct is None else direct

    @property
    def ports(self) -> dict[str, int]:
        return {"direct": self.upstream_port, "gateway": self.gateway.port}

    def run_all(self) -> dict:
        """Starts the gateway, runs every scenario and returns their figures."""
        progress("starting the gateway ...")
        self.gateway.start()
        idle_rss = rss_mib(self.gateway.pid)
        results = {"chat_c1": self.chat_c1(),
                   "chat_c64": self.throughput("chat_c64", "chat", CHAT_PATH, CHAT_BODY),
                   "embed_c64": self.throughput("embed_c64", "embed", EMBED_PATH, EMBED_BODY),
                   "stream_c200": self.stream_c200()}
        self.gateway.stop()
        results["cold_start"] = cold_start(self.gateway)
        results["memory"] = {"idle_rss_mib": idle_rss,
                             "stream_c200_peak_rss_mib": results["stream_c200"]["gateway"]["peak_rss_mib"]}
        return results

    def count_errors(self, label: str, errors: Counter) -> None:
        if errors:
            self.errors.setdefault(label, Counter()).update(errors)

    def probe(self, label: str, target: str, kind: str, request: bytes) -> None:
        """One request checked in full (status and body) before the load."""
        try:
            status, body = asyncio.run(asyncio.wait_for(fetch(self.ports[target], request), RESPONSE_TIMEOUT))
            ok = 200 <= status < 300
            error = body_error(kind, body, self.settings.chunks) if ok else f"HTTP {status}"
        except (OSError, ValueError, asyncio.TimeoutError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        if error:
            self.count_errors(label, Counter({f"check request: {error}": 1}))

    def measure(self, label: str, target: str, kind: str, request: bytes, warm_up, measured):
        """Checks one request in full, runs warm_up() unmeasured, then measured(); returns the measured
        run's result and the gateway's CPU seconds during it."""
        progress(f"{label} ...")
        self.probe(label, target, kind, request)
        self.count_errors(label, warm_up().errors)
        cpu_before = cpu_seconds(self.gateway.pid)
        result = measured()
        cpu = cpu_seconds(self.gateway.pid) - cpu_before
        self.gateway.check_running()
        self.count_errors(label, result.errors)
        return result, cpu

    def measure_requests(self, scenario: str, target: str, kind: str, path: str, body: dict,
                         connections: int) -> tuple[LoadResult, float]:
        if target == "direct":
            if scenario not in self.direct:
                self.direct[scenario] = self._measure_requests(scenario, target, kind, path, body, connections)
            return self.direct[scenario]
        return self._measure_requests(scenario, target, kind, path, body, connections)

    def _measure_requests(self, scenario: str, target: str, kind: str, path: str, body: dict,
                          connections: int) -> tuple[LoadResult, float]:
        port, requests, duration = self.ports[target], request_maker(path, body), self.settings.duration
        request = requests()

        def built_in(seconds: float) -> LoadResult:
            return asyncio.run(request_load(port, requests, connections, seconds))

        def measured() -> LoadResult:
            if self.wrk:
                return wrk_load(self.wrk, self.workdir, port, path, body, connections, duration)
            return built_in(duration)

        return self.measure(f"{scenario} {target}", target, kind, request,
                            lambda: built_in(self.settings.warmup), measured)

    def chat_c1(self) -> dict:
        direct, _ = self.measure_requests("chat_c1", "direct", "chat", CHAT_PATH, CHAT_BODY, 1)
        gateway, _ = self.measure_requests("chat_c1", "gateway", "chat", CHAT_PATH, CHAT_BODY, 1)
        return {"direct": {"p50_ms": ms(direct.p50), "p99_ms": ms(direct.p99)},
                "gateway": {"p50_ms": ms(gateway.p50), "p99_ms": ms(gateway.p99)},
                "ratio_p50": ratio(gateway.p50, direct.p50),
                "added_p50_ms": ms(gateway.p50 - direct.p50), "added_p99_ms": ms(gateway.p99 - direct.p99)}

    def throughput(self, scenario: str, kind: str, path: str, body: dict) -> dict:
        direct, _ = self.measure_requests(scenario, "direct", kind, path, body, 64)
        gateway, cpu = self.measure_requests(scenario, "gateway", kind, path, body, 64)

        def figures(result: LoadResult) -> dict:
            return {"requests_per_s": result.rate, "p50_ms": ms(result.p50), "p99_ms": ms(result.p99)}

        return {"direct": figures(direct),
                "gateway": {**figures(gateway), "cpu_ms_per_request": ms(cpu / max(gateway.requests, 1))},
                "ratio_requests_per_s": ratio(gateway.rate, direct.rate)}

    def measure_streams(self, target: str, rss: PeakRss | None = None) -> tuple[StreamRun, float]:
        port, requests = self.ports[target], request_maker(CHAT_PATH, STREAM_BODY)
        request = requests()

        def streams(seconds: float, sampler: PeakRss | None = None) -> StreamRun:
            return asyncio.run(stream_load(port, requests, self.settings.chunks, seconds, sampler))

        return self.measure(f"stream_c200 {target}", target, "stream", request,
                            lambda: streams(self.settings.warmup), lambda: streams(self.settings.duration, rss))

    def stream_c200(self) -> dict:
        rss = PeakRss(self.gateway.pid)
        if "stream_c200" not in self.direct:
            self.direct["stream_c200"] = self.measure_streams("direct")
        direct, _ = self.direct["stream_c200"]
        gateway, cpu = self.measure_streams("gateway", rss)

        def figures(run: StreamRun) -> dict:
            batched = sum(gap < BATCHED_GAP for gap in run.gaps)
            return {"ttfb_p50_ms": ms(percentile(run.ttfbs, 50)), "ttfb_p99_ms": ms(percentile(run.ttfbs, 99)),
                    "gap_p50_ms": ms(percentile(run.gaps, 50)), "gap_p99_ms": ms(percentile(run.gaps, 99)),
                    "batched_percent": 100 * batched / len(run.gaps) if run.gaps else math.nan,
                    "streams": len(run.ttfbs), "chunks": run.events}

        direct_figures, gateway_figures = figures(direct), figures(gateway)
        gateway_figures["cpu_us_per_chunk"] = cpu * 1e6 / max(gateway.events, 1)
        gateway_figures["peak_rss_mib"] = rss.peak
        return {"direct": direct_figures, "gateway": gateway_figures,
                "ratio_ttfb_p99": ratio(gateway_figures["ttfb_p99_ms"], direct_figures["ttfb_p99_ms"]),
                "added_ttfb_p99_ms": gateway_figures["ttfb_p99_ms"] - direct_figures["ttfb_p99_ms"]}


def cold_start(gateway: Gateway) -> dict:
    """Starts and stops the gateway COLD_STARTS times: the time from starting the process until /health
    answers."""
    progress("cold_start ...")
    times = []
    for _ in range(COLD_STARTS):
        try:
            times.append(gateway.start())
        finally:
            gateway.stop()
    times.sort()
    return {"median_s": times[len(times) // 2], "min_s": times[0], "max_s": times[-1], "starts": len(times)}


# ---------------------------------------------------------------------------------------------------
# Instructions under callgrind (--instructions) and the reader's path (--path)
# ---------------------------------------------------------------------------------------------------

@dataclass
class Counting:
    """How much --instructions counts: plain requests, and streams of a long and of a short length."""
    warmup: int          # plain requests before anything is counted (and `streams` streams of each length)
    requests: int        # plain requests counted
    streams: int         # streams of each length counted
    chunks: int          # content events of a long stream; a short one has 1


COUNT_FULL = Counting(warmup=20, requests=50, streams=4, chunks=50)
COUNT_QUICK = Counting(warmup=5, requests=10, streams=2, chunks=10)

# math.lgamma is the marker: callgrind writes the counts so far each time its C function is entered
# (--dump-before), and neither the gateway nor the floor call it otherwise (checked: one dump per marker).
MARKER = "math_lgamma"
COUNT_START_TIMEOUT = 600.0      # seconds the gateway may take to answer /health under callgrind
SETTLE_INTERVAL = 0.05           # seconds without CPU time, waiting in epoll_wait, that mean idle
# In the counted and traced processes, timers (loop.call_later) wait this many times longer than asked.
TIMER_DILATION = 1000
PATH_LONG_JUMP = 300             # lines between two definitions that make a long jump for a reader


def slow_timers() -> None:
    """Makes asyncio's timers TIMER_DILATION times slower in this process, so that what they start does not
    depend on how slowly callgrind or a profiler runs it: uvicorn's tick ten times a second, ModelGate's
    listener that starts 50 ms into a request, idle connections dropped after seconds. None of it is a
    request's own work; a request that takes half a millisecond meets none of it."""
    call_later = asyncio.BaseEventLoop.call_later

    def slow_call_later(self, delay, callback, *args, context=None):
        return call_later(self, delay * TIMER_DILATION, callback, *args, context=context)

    asyncio.BaseEventLoop.call_later = slow_call_later


def serve_counted(ack_fd: int, listen_fd: int, app: str, loop: str, http: str) -> None:
    """The process callgrind counts: uvicorn serving `app` as `uvicorn APP --workers 1 --no-access-log` does,
    on the listening socket `listen_fd` (bound by the benchmark: no other process can take its port while
    callgrind starts this one). On SIGUSR1 it marks the end of what has been counted (callgrind writes the
    counts), collects all garbage and marks again (that dump is the collection's own), then writes a byte to
    `ack_fd`: each counted part starts with the collector's counts at zero."""
    import gc
    import uvicorn

    def mark(signum, frame) -> None:
        math.lgamma(1.0)
        gc.collect()
        math.lgamma(1.0)
        os.write(ack_fd, b".")

    signal.signal(signal.SIGUSR1, mark)
    slow_timers()
    config = uvicorn.Config(app, workers=1, access_log=False, loop=loop, http=http)
    uvicorn.Server(config).run(sockets=[socket.socket(fileno=listen_fd)])


def serve_traced(out_fd: int) -> None:
    """`python modelgate.py` as deployed, with its settings from the environment. On SIGUSR1 it starts to
    record, from the next entry into Gateway.__call__ on, the first entry into each function of modelgate.py;
    on SIGUSR2 it writes what it recorded to `out_fd` as one JSON line: [qualified name, first line], in the
    order they were entered. (It writes "." to `out_fd` once armed.)"""
    import runpy
    module = str(REPO / "modelgate.py")
    entered: dict = {}                 # code object -> None, in the order of first entry
    state = {"armed": False, "on": False}

    def name(code) -> str:
        return getattr(code, "co_qualname", code.co_name)  # Python 3.10 has only the bare name

    def profile(frame, event, arg) -> None:
        if event != "call" or frame.f_code.co_filename != module:
            return
        code = frame.f_code
        if not state["on"]:
            if not (state["armed"] and name(code) in ("Gateway.__call__", "__call__")):
                return
            state["on"] = True
        entered.setdefault(code, None)

    def arm(signum, frame) -> None:
        entered.clear()
        state.update(armed=True, on=False)
        os.write(out_fd, b".")

    def write(signum, frame) -> None:
        record = [[name(code), code.co_firstlineno] for code in entered]
        os.write(out_fd, json.dumps(record).encode() + b"\n")
        state.update(armed=False, on=False)

    signal.signal(signal.SIGUSR1, arm)
    signal.signal(signal.SIGUSR2, write)
    slow_timers()
    sys.argv = [module]
    sys.setprofile(profile)
    runpy.run_path(module, run_name="__main__")


class LockstepUpstream(FakeUpstream):
    """The fake model server of --instructions and --path, in the benchmark's own process. A streamed answer
    has `max_tokens` content events, then the stop event and `data: [DONE]`; each event is sent when the
    client has received the one before (a future in `turns`), never on a timer: so each reaches the gateway
    on its own, however slowly the gateway runs."""

    def __init__(self, answers: dict[tuple[bytes, bytes], bytes], turns: list[asyncio.Future]):
        super().__init__(answers, [], 0.0)
        self.turns = turns

    def start_stream(self, request: dict) -> None:
        self.stream = stream_writes(request.get("max_tokens", 1) + 2)
        super().start_stream(request)

    def next_event(self, index: int) -> asyncio.Future:
        turn = self.loop.create_future()
        turn.add_done_callback(lambda done: done.cancelled() or self.send_event(index))
        self.turns.append(turn)
        return turn


class Client:
    """One keep-alive connection; one request at a time, checked in full. After each SSE event it receives,
    it lets the lockstep upstream send the next one."""

    def __init__(self, port: int, turns: list[asyncio.Future]):
        self.port = port
        self.turns = turns
        self.numbers = itertools.count()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(HOST, self.port)

    def close(self) -> None:
        self.writer.close()

    async def plain(self) -> None:
        await self.exchange("chat", CHAT_BODY, 0)

    async def stream(self, chunks: int) -> None:
        """A stream of `chunks` content events (the stop event and `data: [DONE]` follow them)."""
        await self.exchange("stream", {**STREAM_BODY, "max_tokens": chunks}, chunks + 2)

    async def exchange(self, kind: str, body: dict, events: int) -> None:
        # Bodies of one length: a request differs from the one before only in its "user" (no coalescing).
        request = request_bytes(CHAT_PATH, {**body, "user": f"bench-{next(self.numbers):06d}"})
        pieces: list[bytes] = []
        pending = bytearray()

        def on_body(piece: bytes) -> None:
            pieces.append(piece)
            pending.extend(piece)
            while (end := pending.find(b"\n\n")) >= 0:
                del pending[:end + 2]
                if self.turns:
                    self.turns.pop(0).set_result(None)

        parser = ResponseParser(on_body)
        self.writer.write(request)
        while True:
            data = await asyncio.wait_for(self.reader.read(65536), RESPONSE_TIMEOUT * 10)
            if not data:
                raise BenchError("the gateway closed the connection before the response was complete")
            if parser.feed(data):
                break
        body_bytes = b"".join(pieces)
        error = body_error(kind, body_bytes, events) if 200 <= parser.status < 300 else f"HTTP {parser.status}"
        if error:
            raise BenchError(f"{kind} request: {error}")


def run_nanoseconds(pid: int) -> int:
    """CPU time a process's threads have run so far (schedstat), or its CPU ticks where that is missing."""
    try:
        return sum(int((task / "schedstat").read_text().split()[0])
                   for task in Path(f"/proc/{pid}/task").iterdir())
    except (OSError, ValueError):
        return round(cpu_seconds(pid) * 1e9)


def waiting_in_epoll(pid: int) -> bool:
    """Whether the process's main thread sleeps in epoll_wait: its event loop waits for something to do.
    (A kernel that hides wchan leaves only the sleeping state to go by.)"""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        wchan = Path(f"/proc/{pid}/wchan").read_text().strip()
    except OSError:
        return False
    return state == "S" and (wchan in ("", "0") or "epoll" in wchan)


def settle(pid: int) -> None:
    """Returns once the process has used no CPU for SETTLE_INTERVAL and waits in epoll_wait: a response that
    has reached the client may still be followed by its log line, metrics, and the return of connections."""
    before = -1
    deadline = time.monotonic() + COUNT_START_TIMEOUT
    while time.monotonic() < deadline:
        now = run_nanoseconds(pid)
        if now == before and waiting_in_epoll(pid):
            return
        before = now
        time.sleep(SETTLE_INTERVAL)
    raise BenchError(f"process {pid} did not settle within {COUNT_START_TIMEOUT:.0f} s")


async def signal_and_wait(process: subprocess.Popen, signum: int, reader: int, end: bytes = b".") -> bytes:
    """Waits until the process is idle, sends it `signum` and returns what it writes back, up to `end`."""
    await asyncio.to_thread(settle, process.pid)
    process.send_signal(signum)
    answer = b""
    while not answer.endswith(end):
        data = await asyncio.wait_for(asyncio.to_thread(os.read, reader, 1 << 20), COUNT_START_TIMEOUT)
        if not data:
            raise BenchError(f"the counted process exited with status {process.wait()}")
        answer += data
    return answer


async def wait_answering(process: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + COUNT_START_TIMEOUT
    while not await asyncio.to_thread(health_ok, port):
        if process.poll() is not None:
            raise BenchError(f"the process under test exited with status {process.returncode}")
        if time.monotonic() > deadline:
            raise BenchError(f"no answer to GET /health within {COUNT_START_TIMEOUT:.0f} s")
        await asyncio.sleep(0.2)


async def first_health(process: subprocess.Popen, port: int) -> None:
    """GET /health once, on a connection that waits in the backlog of the socket the benchmark bound until the
    process serves: polling would leave a varying number of requests in the counted process's past."""
    try:
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), COUNT_START_TIMEOUT)
        writer.close()
    except (OSError, asyncio.TimeoutError) as exc:
        answer = f"{type(exc).__name__}: {exc}".encode()
    if not answer.startswith(b"HTTP/1.1 200"):
        status = "running" if process.poll() is None else f"exited with status {process.returncode}"
        raise BenchError(f"GET /health was not answered 200 ({status}): {answer[:100]!r}")


def part_totals(directory: Path, name: str) -> list[int]:
    """The instructions of each part callgrind dumped to directory/name.1, .2, ..., in order."""
    parts = sorted((path for path in directory.glob(f"{name}.*") if path.suffix[1:].isdigit()),
                   key=lambda path: int(path.suffix[1:]))
    totals = []
    for path in parts:
        with path.open() as dump:
            totals.append(next(int(line.split()[1]) for line in dump if line.startswith("summary:")))
    return totals


async def count_instructions(app: str, extra_env: dict[str, str], counting: Counting, args: argparse.Namespace,
                             directory: Path, name: str) -> dict:
    """Instructions per plain request and per relayed chunk of `app` under callgrind (see the docstring)."""
    loop = asyncio.get_running_loop()
    turns: list[asyncio.Future] = []
    upstream = await loop.create_server(lambda: LockstepUpstream(canned_responses(), turns), HOST, 0)
    upstream_port = upstream.sockets[0].getsockname()[1]
    env = dict(os.environ, MODELGATE_TOKEN=TOKEN, DEFAULT_PROVIDER="ollama", PYTHONHASHSEED="0",
               OLLAMA_BASE_URL=f"http://{HOST}:{upstream_port}/v1", OLLAMA_NUM_PARALLEL=QUEUE_SLOTS)
    env.update(extra_env)
    ack_read, ack_write = os.pipe()
    with socket.socket() as listener, open(directory / f"{name}.log", "ab") as log:
        listener.bind((HOST, 0))
        listener.listen(2048)
        port = listener.getsockname()[1]
        command = ["valgrind", "--tool=callgrind", "--quiet", f"--dump-before={MARKER}",
                   f"--callgrind-out-file={directory / name}.callgrind.out", sys.executable, "-c",
                   "import sys, bench_modelgate as b; "
                   "b.serve_counted(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:])",
                   str(ack_write), str(listener.fileno()), app, args.loop, args.http]
        process = subprocess.Popen(command, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=log, pass_fds=[ack_write, listener.fileno()])
    os.close(ack_write)
    client = Client(port, turns)
    try:
        await first_health(process, port)
        await client.open()
        long_, short = counting.chunks, 1
        for _ in range(counting.warmup):
            await client.plain()
        for _ in range(counting.streams):
            await client.stream(long_)
            await client.stream(short)
        await signal_and_wait(process, signal.SIGUSR1, ack_read)      # the start, the warm-up: not counted
        for _ in range(counting.requests):
            await client.plain()
        await signal_and_wait(process, signal.SIGUSR1, ack_read)
        await signal_and_wait(process, signal.SIGUSR1, ack_read)      # nothing: the cost of marking itself
        for _ in range(counting.streams):
            await client.stream(long_)
        await signal_and_wait(process, signal.SIGUSR1, ack_read)
        for _ in range(counting.streams):
            await client.stream(short)
        await signal_and_wait(process, signal.SIGUSR1, ack_read)
    finally:
        if client.writer:
            client.close()
        process.kill()
        process.wait()
        os.close(ack_read)
        upstream.close()
    totals = part_totals(directory, f"{name}.callgrind.out")[0::2]        # every other part is a garbage collection's
    if len(totals) != 5:
        raise BenchError(f"callgrind wrote {len(totals)} counted parts instead of 5: is {MARKER} called elsewhere?")
    _, plain, nothing, long_streams, short_streams = totals
    return {"plain_request": round((plain - nothing) / counting.requests),
            "chunk": round((long_streams - short_streams) / (counting.streams * (long_ - short)))}


def env_assignments(text: str) -> dict[str, str]:
    """`NAME=VALUE NAME=VALUE` (shell quoting) as a dict."""
    pairs = [word.partition("=") for word in shlex.split(text)]
    if not pairs or any(not name or not equals for name, equals, _ in pairs):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, separated by spaces: {text!r}")
    return {name: value for name, _, value in pairs}


def instructions(args: argparse.Namespace) -> dict:
    """--instructions: ModelGate, ModelGate with each --env, and the relay floor, each in a process of its own."""
    if shutil.which("valgrind") is None:
        raise BenchError("valgrind is not installed (Debian, Ubuntu: apt-get install valgrind)")
    counting = COUNT_QUICK if args.quick else COUNT_FULL
    targets = [("gateway", GATEWAY_APP, {})]
    targets += [(" ".join(f"{k}={v}" for k, v in env.items()), GATEWAY_APP, env) for env in args.env]
    targets.append(("floor", FLOOR_APP, {}))
    figures = {}
    with tempfile.TemporaryDirectory(prefix="bench_modelgate-") as scratch:
        directory = Path(args.keep_callgrind or scratch)
        directory.mkdir(parents=True, exist_ok=True)
        for number, (label, app, env) in enumerate(targets, 1):
            progress(f"counting instructions: {label} ...")
            name = label if label in ("gateway", "floor") else f"variant{number - 1}"
            try:
                figures[label] = asyncio.run(count_instructions(app, env, counting, args, directory, name))
            except BenchError:
                progress(f"last lines of its stderr:\n" + "\n".join(
                    (directory / f"{name}.log").read_text(errors="replace").splitlines()[-20:]))
                raise
    result = {"gateway": figures.pop("gateway"), "floor": figures.pop("floor")}
    if figures:
        result["variants"] = figures
    return result


def path_figures(record: list[list]) -> dict:
    """Definitions opened, jumps of more than PATH_LONG_JUMP lines between successive ones, backwards ones."""
    lines = [line for _, line in record]
    jumps = [later - earlier for earlier, later in zip(lines, lines[1:]) if abs(later - earlier) > PATH_LONG_JUMP]
    return {"definitions": len(record), "long_jumps": len(jumps), "backwards": sum(jump < 0 for jump in jumps),
            "path": [f"{name}:{line}" for name, line in record]}


async def trace_path(args: argparse.Namespace, directory: Path) -> dict:
    """--path: the functions of modelgate.py the first plain request enters, under `python modelgate.py`."""
    loop = asyncio.get_running_loop()
    turns: list[asyncio.Future] = []
    upstream = await loop.create_server(lambda: LockstepUpstream(canned_responses(), turns), HOST, 0)
    port = free_port()
    env = dict(os.environ, MODELGATE_TOKEN=TOKEN, DEFAULT_PROVIDER="ollama", HOST=HOST, PORT=str(port),
               OLLAMA_BASE_URL=f"http://{HOST}:{upstream.sockets[0].getsockname()[1]}/v1")
    for each in args.env:
        env.update(each)
    out_read, out_write = os.pipe()
    command = [sys.executable, str(Path(__file__).resolve()), "--serve-traced", str(out_write)]
    with open(directory / "traced.log", "ab") as log:   # in an empty directory: no .env is read
        process = subprocess.Popen(command, cwd=directory, env=env, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=log, pass_fds=[out_write])
    os.close(out_write)
    client = Client(port, turns)
    try:
        await wait_answering(process, port)
        await client.open()
        await signal_and_wait(process, signal.SIGUSR1, out_read)
        await client.plain()
        record = json.loads(await signal_and_wait(process, signal.SIGUSR2, out_read, b"\n"))
    except BenchError:
        progress("last lines of its stderr:\n" + "\n".join(
            (directory / "traced.log").read_text(errors="replace").splitlines()[-20:]))
        raise
    finally:
        if client.writer:
            client.close()
        process.kill()
        process.wait()
        os.close(out_read)
        upstream.close()
    return path_figures(record)


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------

def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def resolve(choice: str, accelerator: str, fallback: str) -> str:
    """What uvicorn uses for --loop/--http `choice`: with auto, the accelerator when it is importable."""
    if choice != "auto":
        return choice
    return accelerator if importlib.util.find_spec(accelerator) else fallback


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def environment(args: argparse.Namespace, plan: tuple[int, int] | None, wrk: str | None) -> dict:
    if plan:
        pinning = f"gateway alone on CPU {plan[0]}, fake model server and load generator on CPU {plan[1]}"
    else:
        pinning = "none (fewer than two CPUs)"
    requests_by = wrk_version(wrk) if wrk else "built-in asyncio client"
    return {"date": datetime.now().astimezone().isoformat(timespec="seconds"),
            "python": platform.python_version(),
            "uvicorn": package_version("uvicorn"), "httpcore": package_version("httpcore"),
            "h11": package_version("h11"),
            "uvloop": package_version("uvloop"), "httptools": package_version("httptools"),
            "loop": resolve(args.loop, "uvloop", "asyncio"), "http": resolve(args.http, "httptools", "h11"),
            "cpu": cpu_model(), "cores": os.cpu_count(), "pinning": pinning,
            "load_generator": f"{requests_by} for chat/embed, built-in asyncio client for streams",
            "mode": "quick" if args.quick else "full",
            "gateway": f"relay floor ({FLOOR_APP})" if args.floor else GATEWAY_APP, "floor": args.floor,
            "alternate": args.alternate}


def num(value: float) -> str:
    """A figure with about three significant digits (whole numbers from 1000 up)."""
    if math.isnan(value):
        return "n/a"
    for limit, digits in ((1, 3), (10, 2), (1000, 1)):
        if abs(value) < limit:
            return f"{value:.{digits}f}"
    return f"{value:,.0f}"


def p50_p99(figures: dict, prefix: str = "") -> str:
    return f"{num(figures[prefix + 'p50_ms'])}/{num(figures[prefix + 'p99_ms'])} ms"


def table(results: dict) -> list[tuple[str, ...]]:
    rows = [("scenario", "direct", "gateway", "gateway/direct", "gateway only")]
    r = results["chat_c1"]
    rows.append(("chat_c1", f"latency {p50_p99(r['direct'])}", f"latency {p50_p99(r['gateway'])}",
                 f"{num(r['ratio_p50'])} (p50)", f"added {num(r['added_p50_ms'])}/{num(r['added_p99_ms'])} ms"))
    for name in ("chat_c64", "embed_c64"):
        r = results[name]
        rows.append((name, *(f"{num(r[t]['requests_per_s'])} req/s, latency {p50_p99(r[t])}"
                             for t in ("direct", "gateway")),
                     f"{num(r['ratio_requests_per_s'])} (req/s)",
                     f"CPU {num(r['gateway']['cpu_ms_per_request'])} ms/request"))
    r = results["stream_c200"]
    rows.append(("stream_c200", *(f"ttfb {p50_p99(r[t], 'ttfb_')}, gap {p50_p99(r[t], 'gap_')}, "
                                  f"batched {num(r[t]['batched_percent'])} %" for t in ("direct", "gateway")),
                 f"{num(r['ratio_ttfb_p99'])} (ttfb p99)",
                 f"added ttfb p99 {num(r['added_ttfb_p99_ms'])} ms, "
                 f"CPU {num(r['gateway']['cpu_us_per_chunk'])} µs/chunk"))
    r = results["cold_start"]
    rows.append(("cold_start", "-", f"{num(r['median_s'])} s", "-",
                 f"median of {r['starts']}, {num(r['min_s'])}-{num(r['max_s'])} s"))
    r = results["memory"]
    rows.append(("memory", "-", f"RSS idle {num(r['idle_rss_mib'])} MiB", "-",
                 f"peak during stream_c200 {num(r['stream_c200_peak_rss_mib'])} MiB"))
    return rows


def print_report(env: dict, runs: list[dict], errors: dict[str, Counter]) -> None:
    """The table of each run, and with --alternate the ratios of ModelGate to the floor."""
    print(f"ModelGate benchmark, {env['mode']} run, {env['date']}")
    if env["floor"]:
        print(f"in place of the gateway: the {env['gateway']}")
    if env["alternate"]:
        print(f"alternated: ModelGate ({GATEWAY_APP}) and the relay floor ({FLOOR_APP}), {rounds(env['alternate'])}")
    print(f"Python {env['python']}, uvicorn {env['uvicorn']}, httpcore {env['httpcore']}, h11 {env['h11']}, "
          f"uvloop {env['uvloop']}, httptools {env['httptools']}; "
          f"gateway loop {env['loop']}, http {env['http']}")
    print(f"CPU {env['cpu']}, {env['cores']} cores; pinning: {env['pinning']}")
    print(f"load: {env['load_generator']}; latencies as p50/p99")
    for run in runs:
        print()
        if env["alternate"]:
            print(f"round {run['round']}: {TARGET_NAMES[run['target']]}")
        rows = table(run["results"])
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    if env["alternate"]:
        print()
        ratios = floor_ratios(runs)
        named = [(f"round {n}", each) for n, each in enumerate(ratios["rounds"], 1)] + [("median", ratios["median"])]
        for name, each in named:
            print(f"{name}: ModelGate's chat_c64 requests/s {num(each['chat_c64_percent_of_floor'])} % of the "
                  f"floor's; its CPU per relayed chunk {num(each['cpu_per_chunk_times_floor'])} times the floor's")
    for label, counts in errors.items():
        print(f"ERRORS {label}: " + ", ".join(f"{what} x{count}" for what, count in counts.items()))


TARGET_NAMES = {"gateway": "ModelGate", "floor": "relay floor"}


def rounds(count: int) -> str:
    return f"{count} round{'s' * (count != 1)}"


def floor_ratios(runs: list[dict]) -> dict:
    """ModelGate against the floor measured right after it, per round and the median of the rounds: its
    chat_c64 requests/s as a percentage of the floor's, its CPU per relayed chunk as a multiple."""
    rounds = []
    for gateway, floor in zip(runs[0::2], runs[1::2]):
        g, f = gateway["results"], floor["results"]
        rounds.append({
            "chat_c64_percent_of_floor": 100 * ratio(g["chat_c64"]["gateway"]["requests_per_s"],
                                                     f["chat_c64"]["gateway"]["requests_per_s"]),
            "cpu_per_chunk_times_floor": ratio(g["stream_c200"]["gateway"]["cpu_us_per_chunk"],
                                               f["stream_c200"]["gateway"]["cpu_us_per_chunk"])})
    return {"rounds": rounds, "median": {key: median([r[key] for r in rounds]) for key in rounds[0]}}


def median(values: list[float]) -> float:
    values = sorted(v for v in values if not math.isnan(v))
    if not values:
        return math.nan
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def median_results(results: list[dict]) -> dict:
    """Each figure of several runs' results (of the same shape): its median."""
    first = results[0]
    if isinstance(first, dict):
        return {key: median_results([r[key] for r in results]) for key in first}
    if isinstance(first, (int, float)):
        return median([float(r) for r in results])
    return first


# ---------------------------------------------------------------------------------------------------
# Markdown (--markdown FILE)
# ---------------------------------------------------------------------------------------------------

def markdown_rows(results: dict[str, dict]) -> list[tuple[str, ...]]:
    """(scenario, figure, direct, then one column per target) for results by target ("gateway", "floor")."""
    targets = list(results)
    some = results[targets[0]]
    rows = []

    def row(scenario: str, figure: str, direct: str, cell: Callable[[dict], str]) -> None:
        rows.append((f"`{scenario}`", figure, direct, *(cell(results[t][scenario]) for t in targets)))

    def pair(figures: dict, prefix: str = "") -> str:
        return f"{num(figures[prefix + 'p50_ms'])} / {num(figures[prefix + 'p99_ms'])} ms"

    r = some["chat_c1"]
    row("chat_c1", "latency p50 / p99", pair(r["direct"]), lambda r: pair(r["gateway"]))
    row("chat_c1", "added p50 / p99", "-",
        lambda r: f"{num(r['added_p50_ms'])} / {num(r['added_p99_ms'])} ms")
    for name in ("chat_c64", "embed_c64"):
        r = some[name]
        row(name, "requests/s", num(r["direct"]["requests_per_s"]), lambda r: num(r["gateway"]["requests_per_s"]))
        row(name, "latency p50 / p99", pair(r["direct"]), lambda r: pair(r["gateway"]))
        row(name, "CPU per request", "-", lambda r: f"{num(r['gateway']['cpu_ms_per_request'])} ms")
    r = some["stream_c200"]
    row("stream_c200", "ttfb p50 / p99", pair(r["direct"], "ttfb_"), lambda r: pair(r["gateway"], "ttfb_"))
    row("stream_c200", "gap p50 / p99", pair(r["direct"], "gap_"), lambda r: pair(r["gateway"], "gap_"))
    row("stream_c200", "batched gaps", f"{num(r['direct']['batched_percent'])} %",
        lambda r: f"{num(r['gateway']['batched_percent'])} %")
    row("stream_c200", "CPU per relayed chunk", "-", lambda r: f"{num(r['gateway']['cpu_us_per_chunk'])} µs")
    row("cold_start", "median of 5 starts", "-", lambda r: f"{num(r['median_s'])} s")
    row("memory", "RSS idle / peak in `stream_c200`", "-",
        lambda r: f"{num(r['idle_rss_mib'])} / {num(r['stream_c200_peak_rss_mib'])} MiB")
    return rows


def markdown_table(rows: list[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return lines + ["| " + " | ".join(row) + " |" for row in rows[1:]]


def markdown(env: dict, runs: list[dict], errors: dict[str, Counter]) -> str:
    """The figures as markdown: what ran where, the ratios to the floor (--alternate), then every figure."""
    if env["alternate"]:
        what = f"ModelGate and the relay floor alternated, {rounds(env['alternate'])}; figures are medians of the rounds"
    else:
        what = f"{env['gateway']} in the gateway's place" if env["floor"] else f"ModelGate ({GATEWAY_APP})"
    lines = ["# ModelGate benchmark", "",
             f"Written by `bench_modelgate.py`: {env['mode']} run, {what}.", ""]
    lines += markdown_table([
        ("", ""),
        ("date", env["date"]),
        ("machine", f"{env['cpu']}, {env['cores']} cores"),
        ("pinning", env["pinning"]),
        ("Python", env["python"]),
        ("uvicorn", f"{env['uvicorn']} (loop {env['loop']}, http {env['http']})"),
        ("httpcore", env["httpcore"]),
        ("h11", env["h11"]),
        ("uvloop, httptools", f"{env['uvloop']}, {env['httptools']}"),
        ("load", env["load_generator"]),
    ])
    if env["alternate"]:
        ratios = floor_ratios(runs)
        lines += ["", "## ModelGate against the relay floor", "",
                  "Each round measures ModelGate, then the floor; each ratio compares the two of one round.", ""]
        rows = [("round", "`chat_c64` requests/s: ModelGate", "relay floor", "ModelGate as % of the floor",
                 "CPU per relayed chunk: ModelGate", "relay floor", "ModelGate / floor")]
        for number, (gateway, floor) in enumerate(zip(runs[0::2], runs[1::2]), 1):
            g, f = gateway["results"], floor["results"]
            rows.append((str(number), num(g["chat_c64"]["gateway"]["requests_per_s"]),
                         num(f["chat_c64"]["gateway"]["requests_per_s"]),
                         f"{num(ratios['rounds'][number - 1]['chat_c64_percent_of_floor'])} %",
                         f"{num(g['stream_c200']['gateway']['cpu_us_per_chunk'])} µs",
                         f"{num(f['stream_c200']['gateway']['cpu_us_per_chunk'])} µs",
                         num(ratios["rounds"][number - 1]["cpu_per_chunk_times_floor"])))
        rows.append(("median", "", "", f"{num(ratios['median']['chat_c64_percent_of_floor'])} %", "", "",
                     num(ratios["median"]["cpu_per_chunk_times_floor"])))
        lines += markdown_table(rows)
    by_target: dict[str, list[dict]] = {}
    for run in runs:
        by_target.setdefault(run["target"], []).append(run["results"])
    results = {target: median_results(each) for target, each in by_target.items()}
    lines += ["", "## Figures", "",
              "Latencies are from sending a request to receiving its response completely. **direct** is the "
              "fake model server without a gateway: the limit of the harness.", ""]
    lines += markdown_table([("scenario", "figure", "direct", *(TARGET_NAMES[t] for t in results)),
                             *markdown_rows(results)])
    if errors:
        lines += ["", "## Errors", ""]
        lines += [f"- {label}: " + ", ".join(f"{what} x{count}" for what, count in counts.items())
                  for label, counts in errors.items()]
    return "\n".join(lines) + "\n"


def json_ready(value):
    """Figures rounded to 4 decimals, and NaN (no data) as null so that the JSON is standard."""
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_ready(item) for item in value]
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 4)
    return value


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------
# Apps sharing one model (--sharing): ModelGate's queue
# ---------------------------------------------------------------------------------------------------

SERVICE_SECONDS = 0.100          # each request to the scheduled fake Ollama streams this long
SERVICE_EVENTS = 5               # events per such stream, the first at once, `data: [DONE]` after the last
FLOOD = 40                       # streams the flooding token sends at once
LATE_AFTER = 0.5                 # seconds after the flood the late token sends its one stream
SHARE_FLOOD = 24                 # streams each of two tokens sends at once in the shares scenario
QUEUE_COST_ROUNDS = 3
SHARING_TOKENS = {"flood": "bench-token-flood", "late": "bench-token-late"}


class ScheduledOllama:
    """A fake Ollama that schedules as Ollama does with OLLAMA_NUM_PARALLEL=1 (server/sched.go): one request
    per model at a time, the others first come first served (asyncio.Lock wakes its waiters in order). Each
    request is an event stream of SERVICE_SECONDS; `served` lists the `user` of each request as it begins."""

    def __init__(self) -> None:
        self.locks: dict[str, asyncio.Lock] = {}
        self.served: list[str] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                if length is None:  # the gateway's GET /api/tags (Ollama's cloud check): no such door here
                    writer.write(NOT_FOUND)
                    continue
                body = json.loads(await reader.readexactly(int(length.group(1))))
                async with self.locks.setdefault(body["model"], asyncio.Lock()):
                    self.served.append(body.get("user", ""))
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                                 b"transfer-encoding: chunked\r\n\r\n")
                    for index in range(SERVICE_EVENTS):
                        if index:
                            await asyncio.sleep(SERVICE_SECONDS / (SERVICE_EVENTS - 1))
                        event = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
                        writer.write(http_chunk(event))
                        await writer.drain()
                    writer.write(http_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Ends what still runs on the loop (the fake Ollama's idle connections), then closes it."""
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()

    async def ended() -> None:  # gathered on `loop`, not on the thread's default loop
        await asyncio.gather(*tasks, return_exceptions=True)

    loop.run_until_complete(ended())
    loop.close()


def sharing_request(token: str, user: str) -> bytes:
    data = json.dumps({**STREAM_BODY, "user": user}).encode()
    return (f"POST {CHAT_PATH} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data


async def timed_stream(port: int, request: bytes, start: float,
                       connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
                       ) -> tuple[float, float]:
    """One stream on `connection` or a new one: seconds from `start` to its first body bytes and to its end."""
    first: list[float] = []
    parser = ResponseParser(lambda piece: first or first.append(time.perf_counter()))
    reader, writer = connection or await asyncio.open_connection(HOST, port)
    try:
        writer.write(request)
        while True:
            data = await asyncio.wait_for(reader.read(65536), RESPONSE_TIMEOUT + FLOOD * SERVICE_SECONDS)
            if not data:
                raise BenchError("a sharing stream was closed before it was complete")
            if parser.feed(data):
                if parser.status != 200:
                    raise BenchError(f"a sharing stream was answered {parser.status}")
                return first[0] - start, time.perf_counter() - start
    finally:
        writer.close()


async def connected(port: int, count: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """`count` connections, opened before any request is sent, so that the requests arrive together."""
    return list(await asyncio.gather(*(asyncio.open_connection(HOST, port) for _ in range(count))))


async def late_stream(port: int) -> dict:
    """One stream alone (one request's service time, as this machine serves it), then FLOOD streams of one
    token at once and one of another token LATE_AFTER later."""
    _, service = await timed_stream(port, sharing_request(SHARING_TOKENS["late"], "alone"), time.perf_counter())
    connections = await connected(port, FLOOD)
    start = time.perf_counter()
    flood = [asyncio.ensure_future(timed_stream(port, sharing_request(SHARING_TOKENS["flood"], f"flood-{n}"),
                                                start, connection)) for n, connection in enumerate(connections)]
    await asyncio.sleep(LATE_AFTER)
    late_start = time.perf_counter()
    late_ttfb, _ = await timed_stream(port, sharing_request(SHARING_TOKENS["late"], "late"), late_start)
    ends = [end for _, end in await asyncio.gather(*flood)]
    return {"service_s": service, "late_ttfb_s": late_ttfb, "flood_total_s": max(ends)}


async def shares_turns(port: int, served: list[str]) -> dict:
    """SHARE_FLOOD streams of each of two tokens at once; the turns each had while both still waited."""
    del served[:]
    connections = iter(await connected(port, 2 * SHARE_FLOOD))
    start = time.perf_counter()
    await asyncio.gather(*(timed_stream(port, sharing_request(SHARING_TOKENS[name], f"{name}-{n}"), start,
                                        next(connections))
                           for n in range(SHARE_FLOOD) for name in ("flood", "late")))
    order = [user.split("-")[0] for user in served]
    # While both wait: up to the turn in which one of them begins its last stream.
    last = min(max(i for i, name in enumerate(order) if name == each) for each in ("flood", "late"))
    turns = Counter(order[:last + 1])
    return {"turns_flood": turns["flood"], "turns_late": turns["late"],
            "ratio": turns["flood"] / max(turns["late"], 1)}


def sharing(args: argparse.Namespace) -> int:
    """--sharing: the late stream behind a flood and the turns by shares (both against ScheduledOllama),
    and the queue's own cost; prints a report (and with --markdown FILE writes it there)."""
    settings = QUICK if args.quick else FULL
    plan = cpu_plan()
    if plan:
        os.sched_setaffinity(0, {plan[1]})
    tokens = ",".join(f"{name}:{token}" for name, token in {"bench": TOKEN, **SHARING_TOKENS}.items())
    results: dict = {}
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_modelgate-")))
        loop = asyncio.new_event_loop()
        stack.callback(close_loop, loop)
        ollama = ScheduledOllama()
        server = loop.run_until_complete(asyncio.start_server(ollama.handle, HOST, 0, backlog=1024))
        ollama_port = server.sockets[0].getsockname()[1]

        def gateway(upstream_port: int, name: str, **settings_: str) -> Gateway:
            each = Gateway(upstream_port, args.loop, args.http, plan[0] if plan else None, workdir / f"{name}.log",
                           GATEWAY_APP, {"MODELGATE_TOKEN": tokens, **settings_})
            stack.callback(each.stop)
            return each

        progress("late_stream direct ...")
        results["late_stream"] = {"direct": loop.run_until_complete(late_stream(ollama_port))}
        queued = gateway(ollama_port, "queued", OLLAMA_NUM_PARALLEL="1")
        queued.start()
        progress("late_stream through ModelGate ...")
        results["late_stream"]["gateway"] = loop.run_until_complete(late_stream(queued.port))
        queued.stop()
        results["shares"] = {}
        for shares, weight in (("", 1), ("flood=3", 3)):
            progress(f"shares {weight}:1 ...")
            each = gateway(ollama_port, f"shares-{weight}", OLLAMA_NUM_PARALLEL="1", TOKEN_SHARES=shares)
            each.start()
            results["shares"][f"{weight}:1"] = {**loop.run_until_complete(shares_turns(each.port, ollama.served)),
                                                "shares": weight}
            each.stop()
        server.close()
        upstream_port = start_upstream(settings.chunks, stack)
        wrk = None if args.no_wrk else shutil.which("wrk")
        rounds_: dict[str, list] = {"on": [], "off": []}
        direct: dict = {}  # the fake server alone, measured once
        for round_ in range(QUEUE_COST_ROUNDS):
            for state, slots in (("on", QUEUE_SLOTS), ("off", "0")):
                progress(f"queue_cost round {round_ + 1}, queue {state} ...")
                each = gateway(upstream_port, f"cost-{state}", OLLAMA_NUM_PARALLEL=slots)
                each.start()
                bench = Bench(settings, each, upstream_port, wrk, workdir, direct)
                rounds_[state].append(bench.throughput("chat_c64", "chat", CHAT_PATH, CHAT_BODY)["gateway"])
                each.stop()
                if bench.errors:
                    raise BenchError(f"queue_cost: {dict(bench.errors)}")
        results["queue_cost"] = {state: {key: median([r[key] for r in runs]) for key in runs[0]}
                                 for state, runs in rounds_.items()}
    report = sharing_report(results)
    print("\n".join(report))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(report) + "\n")
    return 0


def sharing_report(results: dict) -> list[str]:
    late = results["late_stream"]
    on, off = results["queue_cost"]["on"], results["queue_cost"]["off"]
    lines = ["| scenario | figure | direct | ModelGate |", "|---|---|---|---|"]
    direct, gateway = late["direct"], late["gateway"]
    lines.append(f"| `late_stream` | one request's service time (a stream alone) | {num(direct['service_s'])} s | "
                 f"{num(gateway['service_s'])} s |")
    lines.append(f"| `late_stream` | late stream's time to first byte | {num(direct['late_ttfb_s'])} s "
                 f"({num(direct['late_ttfb_s'] / direct['service_s'])} service times) | "
                 f"{num(gateway['late_ttfb_s'])} s ({num(gateway['late_ttfb_s'] / direct['service_s'])} service "
                 "times) |")
    lines.append(f"| `late_stream` | flood's total time | {num(late['direct']['flood_total_s'])} s | "
                 f"{num(late['gateway']['flood_total_s'])} s "
                 f"({num(ratio(late['gateway']['flood_total_s'], late['direct']['flood_total_s']))} times direct) |")
    for name, each in results["shares"].items():
        off_by = 100 * abs(each["ratio"] / each["shares"] - 1)
        lines.append(f"| `shares` {name} | turns while both wait | - | {each['turns_flood']} : {each['turns_late']} "
                     f"= {num(each['ratio'])} ({num(off_by)} % from {name}) |")
    rate = 100 * (ratio(on["requests_per_s"], off["requests_per_s"]) - 1)
    lines.append(f"| `queue_cost` | `chat_c64` requests/s, queue on / off | - | {num(on['requests_per_s'])} / "
                 f"{num(off['requests_per_s'])} ({num(rate)} %) |")
    lines.append(f"| `queue_cost` | CPU per request, queue on / off | - | {num(on['cpu_ms_per_request'])} / "
                 f"{num(off['cpu_ms_per_request'])} ms "
                 f"({num(100 * (ratio(on['cpu_ms_per_request'], off['cpu_ms_per_request']) - 1))} %) |")
    return lines


# ---------------------------------------------------------------------------------------------------
# Report of --instructions and --path
# ---------------------------------------------------------------------------------------------------

INSTRUCTIONS_TITLE = "Instructions (callgrind)"


def git_commit() -> str:
    """The commit the repository is at, the last one that changed modelgate.py, and whether it is changed since."""
    def git(*arguments: str) -> str:
        done = subprocess.run(["git", "-C", str(REPO), *arguments], capture_output=True, text=True, timeout=30)
        return done.stdout.strip() if done.returncode == 0 else ""

    try:
        head, last = git("rev-parse", "--short", "HEAD"), git("log", "-1", "--format=%h", "--", "modelgate.py")
        changed = git("status", "--porcelain", "--", "modelgate.py")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if not head:
        return "unknown"
    return f"{head} (modelgate.py of {last or head}{', changed since' if changed else ''})"


def count_environment(args: argparse.Namespace) -> dict:
    done = subprocess.run(["valgrind", "--version"], capture_output=True, text=True, timeout=30)
    counting = COUNT_QUICK if args.quick else COUNT_FULL
    return {"date": datetime.now().astimezone().isoformat(timespec="seconds"), "commit": git_commit(),
            "valgrind": done.stdout.strip(), "python": platform.python_version(),
            "uvicorn": package_version("uvicorn"), "httpcore": package_version("httpcore"),
            "h11": package_version("h11"), "loop": resolve(args.loop, "uvloop", "asyncio"),
            "http": resolve(args.http, "httptools", "h11"), "mode": "quick" if args.quick else "full",
            "counted": (f"{counting.requests} plain requests; {counting.streams} streams of {counting.chunks} "
                        f"chunks minus {counting.streams} of 1; after {counting.warmup} requests and "
                        f"{counting.streams} streams of each length")}


def instruction_rows(figures: dict) -> list[tuple[str, ...]]:
    gateway, floor = figures["gateway"], figures["floor"]
    return [("instructions", "ModelGate", "relay floor", "ModelGate / floor"),
            *((name, num(gateway[key]), num(floor[key]), num(ratio(gateway[key], floor[key])))
              for name, key in (("per plain request", "plain_request"), ("per relayed chunk", "chunk")))]


def against_default(figures: dict, variant: dict, key: str) -> str:
    return f"{100 * (ratio(variant[key], figures['gateway'][key]) - 1):+.1f} %"


def print_instructions(env: dict, figures: dict) -> None:
    print(f"ModelGate instructions under callgrind, {env['mode']} run, {env['date']}, commit {env['commit']}")
    print(f"Python {env['python']}, uvicorn {env['uvicorn']}, httpcore {env['httpcore']}, h11 {env['h11']}, "
          f"{env['valgrind']}; loop {env['loop']}, http {env['http']}")
    print(f"counted: {env['counted']}")
    rows = instruction_rows(figures)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.rjust(width) if i else cell.ljust(width)
                        for i, (cell, width) in enumerate(zip(row, widths))))
    for label, each in figures.get("variants", {}).items():
        print(f"ModelGate with {label}: per plain request {num(each['plain_request'])} "
              f"({against_default(figures, each, 'plain_request')} against the default), "
              f"per relayed chunk {num(each['chunk'])} ({against_default(figures, each, 'chunk')})")


def instructions_markdown(env: dict, figures: dict) -> list[str]:
    lines = [f"## {INSTRUCTIONS_TITLE}", "",
             f"Written by `bench_modelgate.py --instructions`, {env['mode']} run: the instructions callgrind counts "
             "in the process under test (the fake model server and the client run outside it), per plain "
             "`/v1/chat/completions` request and per relayed chunk (streams of many chunks minus streams of "
             "one, per chunk of difference). Counted: " + env["counted"] + ".", ""]
    lines += markdown_table([
        ("", ""), ("date", env["date"]), ("commit", env["commit"]), ("valgrind", env["valgrind"]),
        ("Python", env["python"]), ("uvicorn", f"{env['uvicorn']} (loop {env['loop']}, http {env['http']})"),
        ("httpcore", env["httpcore"]), ("h11", env["h11"])])
    lines += [""] + markdown_table(instruction_rows(figures))
    if figures.get("variants"):
        rows = [("ModelGate with", "per plain request", "against the default", "per relayed chunk",
                 "against the default")]
        rows += [(f"`{label}`", num(each["plain_request"]), against_default(figures, each, "plain_request"),
                  num(each["chunk"]), against_default(figures, each, "chunk"))
                 for label, each in figures["variants"].items()]
        lines += [""] + markdown_table(rows)
    return lines


def section_pattern(title: str) -> re.Pattern:
    return re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)


def write_section(path: Path, title: str, lines: list[str]) -> None:
    """Puts a `## title` section into a markdown file: in place of the one there, or at its end."""
    text = path.read_text() if path.exists() else "# ModelGate benchmark\n"
    section = "\n".join(lines) + "\n"
    pattern = section_pattern(title)
    if pattern.search(text):
        text = pattern.sub(lambda match: section + ("\n" if match.end() < len(text) else ""), text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def kept_section(path: Path, title: str) -> str:
    """The `## title` section of a markdown file, if it has one, to be kept when the rest is written anew."""
    found = section_pattern(title).search(path.read_text()) if path.exists() else None
    return "\n" + found[0].rstrip("\n") + "\n" if found else ""


def print_path(figures: dict, verbose: bool) -> None:
    print("the first plain /v1/chat/completions request to `python modelgate.py`, from Gateway.__call__ to its "
          "log line:")
    print(f"definitions opened: {figures['definitions']}; jumps of more than {PATH_LONG_JUMP} lines between "
          f"successive ones: {figures['long_jumps']}, {figures['backwards']} of them backwards")
    if verbose:
        lines = [int(each.rsplit(":", 1)[1]) for each in figures["path"]]
        for each, earlier, later in zip(figures["path"], [lines[0]] + lines, lines):
            jump = later - earlier
            print(f"  {each}" + (f"    <- {jump:+,} lines" if abs(jump) > PATH_LONG_JUMP else ""))


# ---------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark ModelGate against a fake model server.")
    parser.add_argument("--quick", action="store_true", help="about a second per measurement (smoke test)")
    parser.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto",
                        help="uvicorn's --loop for the gateway (default: auto)")
    parser.add_argument("--http", choices=["auto", "h11", "httptools"], default="auto",
                        help="uvicorn's --http for the gateway (default: auto)")
    parser.add_argument("--no-wrk", action="store_true",
                        help="use the built-in asyncio load generator even when wrk is installed")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    parser.add_argument("--floor", action="store_true",
                        help="measure the relay floor (uvicorn, ModelGate's pool and httpcore, nothing else) "
                             "in place of the gateway")
    parser.add_argument("--alternate", type=int, default=0, metavar="N",
                        help="measure ModelGate and the relay floor one after the other, N rounds, and compare them")
    parser.add_argument("--markdown", metavar="FILE", help="also write the figures as markdown tables to FILE")
    parser.add_argument("--sharing", action="store_true",
                        help="apps sharing one model: ModelGate's queue against a fake Ollama that schedules as "
                             "Ollama does")
    parser.add_argument("--instructions", action="store_true",
                        help="count under callgrind the instructions per plain request and per relayed chunk, of "
                             "ModelGate and of the relay floor")
    parser.add_argument("--env", type=env_assignments, action="append", default=[], metavar="'NAME=VALUE ...'",
                        help="with --instructions: also count ModelGate with these settings added (once more for "
                             "each --env); with --path: follow the request with them")
    parser.add_argument("--keep-callgrind", metavar="DIR",
                        help="with --instructions: keep callgrind's files in DIR (for callgrind_annotate)")
    parser.add_argument("--path", action="store_true",
                        help="follow one plain request through modelgate.py: definitions entered, long jumps")
    parser.add_argument("--verbose", action="store_true", help="with --path: list the definitions, in order")
    parser.add_argument("--serve-traced", type=int, metavar="FD", help=argparse.SUPPRESS)
    parser.add_argument("--serve-upstream", nargs=3, type=int, metavar=("FD", "CHUNKS", "INTERVAL_MS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.alternate < 0 or (args.alternate and args.floor):
        parser.error("--alternate takes a number of rounds, and measures the floor itself (no --floor)")
    if args.instructions + args.path + args.sharing + bool(args.alternate or args.floor) > 1:
        parser.error("--instructions, --path, --sharing and the load runs (--floor, --alternate) go one at a "
                     "time; --instructions counts the floor itself")
    return args


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("uvicorn") is None:
        raise BenchError(f"uvicorn is not installed for {sys.executable}")
    if args.instructions:
        return run_instructions(args)
    if args.path:
        return run_path(args)
    settings = QUICK if args.quick else FULL
    plan = cpu_plan()
    if plan:
        os.sched_setaffinity(0, {plan[1]})    # this process, the fake server and wrk inherit it
    wrk = None if args.no_wrk else shutil.which("wrk")
    env = environment(args, plan, wrk)
    if args.alternate:
        targets = ["gateway", "floor"] * args.alternate
    else:
        targets = ["floor" if args.floor else "gateway"]
    runs: list[dict] = []
    errors: dict[str, Counter] = {}
    direct: dict = {}
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_modelgate-")))
        upstream_port = start_upstream(settings.chunks, stack)
        for number, target in enumerate(targets):
            log = workdir / f"{target}.log"
            gateway = Gateway(upstream_port, args.loop, args.http, plan[0] if plan else None, log,
                              FLOOR_APP if target == "floor" else GATEWAY_APP)
            stack.callback(gateway.stop)
            bench = Bench(settings, gateway, upstream_port, wrk, workdir, direct)
            round_ = number // 2 + 1
            if args.alternate:
                progress(f"round {round_} of {args.alternate}: {TARGET_NAMES[target]}")
            try:
                results = bench.run_all()
            except BenchError:
                if log.exists():
                    progress(f"last lines of the gateway's stderr:\n{gateway.log_tail()}")
                raise
            runs.append({"round": round_, "target": target, "results": results})
            for label, counts in bench.errors.items():
                errors[f"round {round_} {TARGET_NAMES[target]}: {label}" if args.alternate else label] = counts
    if args.json:
        counts = {label: dict(each) for label, each in errors.items()}
        if args.alternate:
            document = {"environment": env, "runs": runs, "ratios": floor_ratios(runs), "errors": counts}
        else:
            document = {"environment": env, "results": runs[0]["results"], "errors": counts}
        print(json.dumps(json_ready(document), indent=2))
    else:
        print_report(env, runs, errors)
    if args.markdown:
        path = Path(args.markdown)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(markdown(env, runs, errors) + kept_section(path, INSTRUCTIONS_TITLE))
        progress(f"figures written to {args.markdown}")
    return 1 if errors else 0


def run_instructions(args: argparse.Namespace) -> int:
    env = count_environment(args)
    figures = instructions(args)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print_instructions(env, figures)
    if args.markdown:
        write_section(Path(args.markdown), INSTRUCTIONS_TITLE, instructions_markdown(env, figures))
        progress(f"figures written to {args.markdown}")
    return 0


def run_path(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="bench_modelgate-") as directory:
        figures = asyncio.run(trace_path(args, Path(directory)))
    if not args.verbose:
        del figures["path"]
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print_path(figures, args.verbose)
    return 0


def main() -> int:
    args = parse_args()
    if args.serve_upstream:
        serve_upstream(*args.serve_upstream)
        return 0
    if args.serve_traced is not None:
        serve_traced(args.serve_traced)
        return 0
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return sharing(args) if args.sharing else run(args)
    except BenchError as exc:
        print(f"bench_modelgate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench_modelgate: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
