"""A fake llama-server that misbehaves on purpose: the upstream faults vcache must survive.

For faults only: that vcache's answers are *right* is proven against the real llama-server
(tests/test_proxy.py). This one speaks just enough HTTP/1.1, over a raw asyncio socket on
127.0.0.1 (port 0), to break it in ways a real server or a network does::

    async with FaultUpstream(packages=True) as fake:
        fake.set_fault("/v1/chat/completions", Fault.RESET_MID_BODY)
        ...                                   # send requests through the proxy
        assert fake.count("POST", "/v1/chat/completions") == 1   # never replayed

Faults (`Fault`), applied to every request on a path until changed:

* OK: 200, JSON with Content-Length, or an SSE stream ending in ``[DONE]`` for
  ``"stream": true``.
* RESET_BEFORE_HEADERS: reads the request, then resets the connection (a crash mid-request).
* RESET_MID_BODY: headers and part of the body (an SSE stream stops inside an event), then RST.
* STALL_BEFORE_HEADERS / STALL_MID_STREAM: stops answering, keeps the connection open.
* MALFORMED_SSE: a 200 event stream of garbage: no ``data:``, invalid UTF-8, no final newline.
* STATUS_500 / STATUS_503: llama-server's error shape with that status.
* NO_CONTENT_CHUNKED: 204 with ``Transfer-Encoding: chunked`` and a body, as llama-server's
  /cors-proxy does; the body is a complete HTTP response, so a client that pools the
  connection without noticing reads it as the answer to its next request ("SMUGGLED").
* NO_CONTENT_CHUNK_END: the bytes llama-server's /cors-proxy sends for a 204 from its target:
  the head with ``Transfer-Encoding: chunked`` and keep-alive, then the chunked terminator
  (``0``, CRLF, CRLF) in the same write, which a strict HTTP parser rejects whole.
* CLOSE_RANDOMLY: answers OK, then closes the keep-alive connection at random (half the time),
  without a ``Connection: close`` header; or, a quarter of the time, reads the request and
  closes without answering.
* CLOSE_AFTER_STREAM: what llama-server does: an event stream announced keep-alive, then the
  connection closed a moment later (here 0.3 s) whatever comes on it in between.
* REFUSE_PACKAGES: 400 ``image_embedding ... not supported`` for a body with packages, OK
  otherwise (a server swapped for a stock one: vcache then re-sends the images once).
* CLOSE_AFTER_BODY: answers OK with ``Connection: close``, then closes the connection as soon
  as the body is written (as servers that do not keep connections alive do).

``GET /health`` answers 200 unless a fault is set for it (STATUS_503: "Loading model").
``props`` replaces what ``GET /props`` answers (a patched server with packages off, say).

With ``packages=True`` it also plays a patched server: ``GET /props`` offers packages and
``POST /vision/embedding`` answers a package whose payload is a function of the image's
SHA-256 (`expected_payload`), and OK answers say how many packages in the request were intact
(``vcache_fake``), which is how crash tests find a corrupt entry served.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import dataclasses
import enum
import hashlib
import json
import random
import socket
import struct
import time
from collections.abc import AsyncIterator, Iterator
from types import TracebackType
from typing import Any, Self

N_EMBD = 16
MMPROJ = "xxh3-128:00000000000000000000000000000000:1"
ERROR_500 = {"error": {"code": 500, "message": "fake failure", "type": "server_error"}}
ERROR_503 = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
REFUSAL = {
    "error": {
        "code": 400,
        "message": "image_embedding inputs are not supported",
        "type": "invalid_request_error",
    }
}
SMUGGLED = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 8\r\n\r\nSMUGGLED"


class Fault(enum.Enum):
    OK = "ok"
    RESET_BEFORE_HEADERS = "reset-before-headers"
    RESET_MID_BODY = "reset-mid-body"
    STALL_BEFORE_HEADERS = "stall-before-headers"
    STALL_MID_STREAM = "stall-mid-stream"
    MALFORMED_SSE = "malformed-sse"
    STATUS_500 = "status-500"
    STATUS_503 = "status-503"
    NO_CONTENT_CHUNKED = "no-content-chunked"
    NO_CONTENT_CHUNK_END = "no-content-chunk-end"
    CLOSE_RANDOMLY = "close-randomly"
    CLOSE_AFTER_STREAM = "close-after-stream"
    REFUSE_PACKAGES = "refuse-packages"
    CLOSE_AFTER_BODY = "close-after-body"


@dataclasses.dataclass
class Seen:
    """One request as the fake received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    connection: int
    closed_at: float | None = None  # when the client (the proxy) closed the connection

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


class _Closed(Exception):
    """The peer closed the connection between requests."""


class FaultUpstream:
    """The fake server; an async context manager that starts and stops it."""

    def __init__(self, *, packages: bool = False, n_embd: int = N_EMBD, seed: int = 0) -> None:
        self.packages = packages
        self.n_embd = n_embd
        self.faults: dict[str, Fault] = {}
        self.seen: list[Seen] = []
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self._progress = asyncio.Event()  # set whenever a request comes in
        self.connections = 0
        self.encodes = 0
        self._rng = random.Random(seed)
        self._release = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        self.props: dict[str, Any] | None = None  # GET /props answers this, when set

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_fault(self, path: str, fault: Fault) -> None:
        self.faults[path] = fault

    def count(self, method: str, path: str) -> int:
        return self.counts[method, path]

    async def wait_for_count(self, method: str, path: str, n: int) -> None:
        """Until `n` requests for `path` have come in (all time, not just from now)."""
        while self.counts[method, path] < n:
            self._progress.clear()
            await self._progress.wait()

    def requests(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]

    async def __aenter__(self) -> Self:
        # a deep backlog: a proxy under load opens hundreds of connections at once
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=4096)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._release.set()  # stalled handlers return
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=1.0)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- connections --------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        conn = self.connections
        try:
            while not writer.is_closing():
                seen = await _read_request(reader, conn)
                self.seen.append(seen)
                self.counts[seen.method, seen.path] += 1
                self._progress.set()
                await self._answer(seen, reader, writer)
        except (_Closed, ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # stopped at teardown: a connection task ends quietly, not as an error
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _answer(
        self, seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if seen.path == "/props" and seen.method == "GET":
            return await _send_json(writer, 200, self.props or self._props())
        if seen.path == "/health" and seen.path not in self.faults:
            return await _send_json(writer, 200, {"status": "ok"})
        if seen.path == "/vision/embedding" and self.packages:
            fault = self.faults.get(seen.path, Fault.OK)
            if fault is Fault.OK:
                return await _send_json(writer, 200, self._encode(seen))
        fault = self.faults.get(seen.path, Fault.OK)
        await _FAULTS[fault](self, seen, reader, writer)

    def _props(self) -> dict[str, Any]:
        props: dict[str, Any] = {"model_path": "fault-upstream.gguf", "media_marker": "<__media__>"}
        if self.packages:
            props["image_embedding"] = {
                "enabled": True,
                "version": 1,
                "mmproj": MMPROJ,
                "n_embd": self.n_embd,
                "dtypes": ["f32"],
                "file_dir": False,
                "endpoint": "/vision/embedding",
                "build": "fault-upstream",
                "settings": {},
            }
        return props

    def _encode(self, seen: Seen) -> dict[str, Any]:
        self.encodes += 1
        url = seen.json()["image_url"]["url"]
        image = base64.b64decode(url.partition(",")[2])
        digest = hashlib.sha256(image).hexdigest()
        payload = expected_payload(digest, self.n_embd)
        n_tokens = len(payload) // (4 * self.n_embd)
        package = {
            "version": 1,
            "mmproj": MMPROJ,
            "n_embd": self.n_embd,
            "dtype": "f32",
            "id": digest,
            "image": {"nx": 8, "ny": 8},
            "chunks": [{"n_tokens": n_tokens, "meta": base64.b64encode(b"m").decode()}],
            "data": base64.b64encode(payload).decode(),
        }
        return {
            "object": "image_embedding",
            "image_embedding": package,
            "n_tokens": n_tokens,
            "timings": {"encode_ms": 5.0},
        }

    def verdicts(self, body: Any) -> dict[str, int]:
        """How many packages in a request body are intact, corrupt, or raw images."""
        out = {"intact": 0, "corrupt": 0, "images": 0}
        for part in _parts(body):
            if part.get("type") == "image_url":
                out["images"] += 1
            pkg = part.get("image_embedding")
            if isinstance(pkg, dict):
                ok = _payload_of(pkg) == expected_payload(str(pkg.get("id")), self.n_embd)
                out["intact" if ok else "corrupt"] += 1
        return out


def expected_payload(digest: str, n_embd: int = N_EMBD) -> bytes:
    """The package payload the fake encodes for an image of this SHA-256: 1 to 16 tokens."""
    n_tokens = 1 + int(digest[:2], 16) % 16 if _is_hex(digest) else 1
    return hashlib.shake_256(b"fault-upstream:" + digest.encode()).digest(n_tokens * n_embd * 4)


def _is_hex(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _payload_of(pkg: dict[str, Any]) -> bytes | None:
    try:
        return base64.b64decode(str(pkg.get("data")), validate=True)
    except binascii.Error:
        return None


def _parts(body: Any) -> Iterator[dict[str, Any]]:
    messages = body.get("messages") if isinstance(body, dict) else None
    for msg in messages if isinstance(messages, list) else []:
        content = msg.get("content") if isinstance(msg, dict) else None
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict):
                yield part


# --- HTTP/1.1, just enough ---------------------------------------------------------------


async def _read_request(reader: asyncio.StreamReader, conn: int) -> Seen:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        raise _Closed from e
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = await _read_chunked(reader)
    else:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Seen(method, path.split("?")[0], headers, body, conn)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return bytes(body)
        body += await reader.readexactly(size)
        await reader.readexactly(2)


def _head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


_REASONS = {
    200: "OK",
    204: "No Content",
    400: "Bad Request",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


async def _send_json(writer: asyncio.StreamWriter, status: int, body: Any) -> None:
    data = json.dumps(body).encode()
    writer.write(
        _head(status, {"Content-Type": "application/json", "Content-Length": str(len(data))}) + data
    )
    await writer.drain()


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _event(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _token(i: int) -> dict[str, Any]:
    return {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": f"t{i} "}}],
    }


def _wants_stream(seen: Seen) -> bool:
    body = _json_or_none(seen.body)
    return isinstance(body, dict) and body.get("stream") is True


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


SSE_HEADERS = {"Content-Type": "text/event-stream", "Transfer-Encoding": "chunked"}


async def _ok(
    fake: FaultUpstream, seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    if not _wants_stream(seen):
        body = _json_or_none(seen.body)
        return await _send_json(
            writer,
            200,
            {
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
                "vcache_fake": fake.verdicts(body),
                "request_bytes": len(seen.body),
            },
        )
    writer.write(_head(200, SSE_HEADERS))
    for i in range(3):
        writer.write(_chunk(_event(_token(i))))
    writer.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    await writer.drain()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST instead of FIN: what a crashed server's kernel sends."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _reset_before_headers(
    fake: FaultUpstream, seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    _reset(writer)


async def _reset_mid_body(
    fake: FaultUpstream, seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    if _wants_stream(seen):
        writer.write(
            _head(200, SSE_HEADERS)
            + _chunk(_event(_token(0)))
            + _chunk(b'data: {"choices": [{"ind')
        )  # stops inside an event
    else:
        writer.write(
            _head(200, {"Content-Type": "application/json", "Content-Length": "100000"})
            + b'{"choices": ['
            + b" " * 5000
        )
    await writer.drain()
    await asyncio.sleep(0.1)  # let the proxy relay what came before the reset
    _reset(writer)


async def _stall(reader: asyncio.StreamReader, fake: FaultUpstream, seen: Seen) -> None:
    """Wait, answering nothing, until the peer closes (noted in `seen`) or the fake stops."""
    eof = asyncio.ensure_future(reader.read(1))
    release = asyncio.ensure_future(fake._release.wait())
    try:
        await asyncio.wait({eof, release}, return_when=asyncio.FIRST_COMPLETED)
        if eof.done():
            seen.closed_at = time.monotonic()
    finally:
        for fut in (eof, release):
            fut.cancel()
        await asyncio.gather(eof, release, return_exceptions=True)
    raise _Closed


async def _stall_before_headers(
    fake: FaultUpstream, seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    await _stall(reader, fake, seen)


async def _stall_mid_stream(
    fake: FaultUpstream, seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    if _wants_stream(seen):
        writer.write(_head(200, SSE_HEADERS) + _chunk(_event(_token(0))))
    else:
        writer.write(
            _head(200, {"Content-Type": "application/json", "Content-Length": "100"})
            + b'{"choices": ['
        )
    await writer.drain()
    await _stall(reader, fake, seen)


async def _malformed_sse(
    fake: FaultUpstream, seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    writer.write(_head(200, SSE_HEADERS))
    for junk in (
        b"this is not an event\n\n",
        b"data: {not json\n\n",
        b"\xff\xfe\x00 bad utf-8",
        b"\r\r\revent:\n",
        b"data: " + b"x" * 70_000,
    ):  # and no final newline
        writer.write(_chunk(junk))
    writer.write(b"0\r\n\r\n")
    await writer.drain()


async def _status_500(
    fake: FaultUpstream, seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    await _send_json(writer, 500, ERROR_500)


async def _status_503(
    fake: FaultUpstream, seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    await _send_json(writer, 503, ERROR_503)


async def _no_content_chunked(
    fake: FaultUpstream, seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    # A 204 has no body whatever its headers say (RFC 9112 6.3): these bytes are the start of
    # the next response to whoever reads this connection next. Chunk framing is left out on
    # purpose: a server this broken does not frame what it should not send.
    writer.write(_head(204, {"Transfer-Encoding": "chunked"}) + SMUGGLED)
    await writer.drain()


async def _no_content_chunk_end(
    fake: FaultUpstream, seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    head = {"Transfer-Encoding": "chunked", "Keep-Alive": "timeout=5, max=100"}
    writer.write(_head(204, head) + b"0\r\n\r\n")
    await writer.drain()


async def _close_randomly(
    fake: FaultUpstream, seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    roll = fake._rng.random()
    if roll < 0.25:
        writer.close()  # read the request, answer nothing: a POST the client cannot retry
        return
    await _ok(fake, seen, reader, writer)
    if roll < 0.625:
        writer.close()  # kept alive, as far as the client knows


async def _close_after_stream(
    fake: FaultUpstream, seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    await _ok(fake, seen, reader, writer)
    if _wants_stream(seen):
        await asyncio.sleep(0.3)  # a request sent on the connection meanwhile goes unanswered
        writer.close()


async def _refuse_packages(
    fake: FaultUpstream, seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    if b'"image_embedding"' in seen.body:
        return await _send_json(writer, 400, REFUSAL)
    await _ok(fake, seen, reader, writer)


async def _close_after_body(
    fake: FaultUpstream, seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    data = json.dumps({"choices": [{"index": 0, "message": {"content": "ok"}}]}).encode()
    headers = {
        "Content-Type": "application/json",
        "Content-Length": str(len(data)),
        "Connection": "close",
    }
    writer.write(_head(200, headers) + data)
    await writer.drain()
    writer.close()
    raise _Closed


_FAULTS = {
    Fault.OK: _ok,
    Fault.RESET_BEFORE_HEADERS: _reset_before_headers,
    Fault.RESET_MID_BODY: _reset_mid_body,
    Fault.STALL_BEFORE_HEADERS: _stall_before_headers,
    Fault.STALL_MID_STREAM: _stall_mid_stream,
    Fault.MALFORMED_SSE: _malformed_sse,
    Fault.STATUS_500: _status_500,
    Fault.STATUS_503: _status_503,
    Fault.NO_CONTENT_CHUNKED: _no_content_chunked,
    Fault.NO_CONTENT_CHUNK_END: _no_content_chunk_end,
    Fault.CLOSE_RANDOMLY: _close_randomly,
    Fault.CLOSE_AFTER_STREAM: _close_after_stream,
    Fault.REFUSE_PACKAGES: _refuse_packages,
    Fault.CLOSE_AFTER_BODY: _close_after_body,
}


@contextlib.asynccontextmanager
async def refused_port() -> AsyncIterator[int]:
    """A loopback port nobody listens on (bound, never listening, so nobody else takes it)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


async def _serve_forever(packages: bool, n_embd: int) -> None:
    async with FaultUpstream(packages=packages, n_embd=n_embd) as fake:
        print(fake.url, flush=True)
        await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    """Run the fake in a process of its own (benchmarks): its URL on stdout, until killed."""
    import argparse

    parser = argparse.ArgumentParser(description="the fault upstream, answering OK")
    parser.add_argument("--packages", action="store_true", help="play a patched server")
    parser.add_argument("--n-embd", type=int, default=N_EMBD, help="package width")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forever(args.packages, args.n_embd))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
