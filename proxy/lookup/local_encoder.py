"""The local encoder: packages computed from an mmproj file in worker processes, off the LLM server.

On a miss the package lookup asks an encoder for the package of one image.
`proxy.upstream.client.Upstream` asks llama-server's ``POST /vision/embedding``, which runs the
vision encoder on the server's own cores and, on a stock server, blocks every other request
while it runs. `LocalEncoder` runs it here instead, in a pool of worker processes that each load
the mmproj (and the text model's metadata, never its weights: see vision_cache.llama.mtmd), so
the LLM server only decodes packages and text requests never wait behind an encode::

    config = LocalEncoderConfig(mmproj=Path("mmproj.gguf"), text_model=Path("model.gguf"),
                                lib_dir=Path(".build/llama/patched-<key>/bin"),
                                settings=EncoderSettings(n_threads=4))
    async with LocalEncoder(config) as encoder:
        namespace = Namespace.from_components(encoder.namespace_components())
        encoded = await encoder.encode(png_bytes, "image/png")

Processes, not threads: an encode holds its cores for seconds to minutes inside libmtmd, and a
crash there (a bad mmproj, an out-of-memory abort) must take down a worker, not the proxy. A
worker that dies is replaced, and the encode it held is tried once more on the new one. Each
worker has its own pipe, so a death is seen by exactly the call it interrupted (EOF on that
pipe); ``concurrent.futures.ProcessPoolExecutor`` can instead leave a call submitted while a
worker dies pending forever (seen here with Python 3.11).

Errors are `LocalEncoderError`, a `proxy.errors.UpstreamError`: the package lookup treats a failed
local encode like a failed upstream encode and forwards the image as the client sent it.

* LocalEncoderError       (UpstreamError, 502)
  x LocalEncoderRejected  (the bytes are not an image the encoder takes)
  x LocalEncoderTimeout   (UpstreamTimeout, 504)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import multiprocessing
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext, SpawnProcess
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from proxy.errors import UpstreamError, UpstreamTimeout
from proxy.upstream.client import Encoded
from vision_cache.errors import VisionCacheError
from vision_cache.keys import Namespace
from vision_cache.llama.mtmd import (
    EncoderSettings,
    ImageRejected,
    VisionEncoder,
    silence_native_logs,
)
from vision_cache.package import FORMAT_VERSION, PackageHeader

log = logging.getLogger("vcache.encoder")
STOP_GRACE_S = 5.0


class LocalEncoderError(UpstreamError):
    """The local encoder could not produce a package."""


class LocalEncoderRejected(LocalEncoderError):
    """The bytes are not an image the encoder takes."""


class LocalEncoderTimeout(LocalEncoderError, UpstreamTimeout):
    """An encode ran past the time limit; its worker was stopped."""


@dataclasses.dataclass(frozen=True)
class LocalEncoderConfig:
    """What the workers load and how they run.

    ``lib_dir``: the llama.cpp build's library directory (None: ``$LLAMA_CPP_LIB_PATH``, else
    llama-cpp-python's own). ``model``: the namespace's model component, as in router mode
    (empty for one model, like a single-model llama-server).
    """

    mmproj: Path
    text_model: Path
    lib_dir: Path | None = None
    settings: EncoderSettings = dataclasses.field(default_factory=EncoderSettings)
    workers: int = 1
    model: str = ""
    timeout_s: float = 600.0


class LocalEncoder:
    """Encoder worker processes; the async API mirrors `proxy.upstream.client.Upstream`.

    It belongs to the event loop `start` ran on. ``workers`` calls run at once, the rest wait.
    """

    def __init__(self, config: LocalEncoderConfig) -> None:
        if config.workers < 1:
            raise ValueError("a local encoder needs at least one worker")
        self._config = config
        # spawn: a forked child would inherit the event loop's threads and locks mid-flight
        self._mp = multiprocessing.get_context("spawn")
        # one thread per worker waits on its pipe, so the event loop never blocks on one
        self._threads = ThreadPoolExecutor(config.workers, thread_name_prefix="vcache-encoder")
        self._idle: asyncio.Queue[_Worker] | None = None
        self._workers: set[_Worker] = set()
        self._identity: dict[str, Any] | None = None
        self.encodes = 0  # completed encodes, for metrics and tests

    async def start(self) -> None:
        """Start the workers and load the encoder in one of them (to learn its identity)."""
        self._idle = asyncio.Queue()
        for _ in range(self._config.workers):
            self._idle.put_nowait(await asyncio.to_thread(self._spawn))
        self._identity = await self._call(_describe)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        workers, self._workers, self._idle = self._workers, set(), None
        await asyncio.gather(*(asyncio.to_thread(w.stop) for w in workers))
        self._threads.shutdown(wait=False, cancel_futures=True)

    def namespace_components(self) -> dict[str, Any]:
        """The cache namespace's components, in the shape `Namespace.for_encoder` builds.

        The same as a patched llama-server's ``GET /props`` gives for the same mmproj, build
        and settings: the two produce byte-identical packages, so they share entries.
        """
        if self._identity is None:
            raise RuntimeError("LocalEncoder.start() has not run")
        ident = self._identity
        return {
            "model": self._config.model,
            "mmproj": ident["mmproj"],
            "build": ident["build"],
            "format_version": FORMAT_VERSION,
            "encoder": ident["encoder"],
        }

    def namespace(self) -> Namespace:
        return Namespace.from_components(self.namespace_components())

    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    async def encode(self, image: bytes, mime: str | None = None) -> Encoded:
        """The f32 package of `image` (`mime` is ignored: the encoder reads the bytes)."""
        header, payload, encode_ms = await self._call(_encode, image)
        if header.image_id != hashlib.sha256(image).hexdigest():
            raise LocalEncoderError("the encoder answered for another image")
        self.encodes += 1
        return Encoded(header, payload, encode_ms)

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn` on an idle worker. A worker that dies is replaced and the call made once
        more: encodes have no side effects, and the usual causes (the OOM killer, an
        operator's kill) pass; an input that kills a worker every time fails the second time."""
        for attempt in (1, 2):
            try:
                return await self._call_once(fn, args)
            except _WorkerDied as e:
                if attempt == 2:
                    raise LocalEncoderError(
                        "encoder workers died twice on this request (see the log above)"
                    ) from e
                log.warning("an encoder worker died (%s): retrying on a fresh one", e)
        raise AssertionError("unreachable")

    async def _call_once(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        idle = self._idle
        if idle is None:
            raise LocalEncoderError("the local encoder is not running")
        worker = await idle.get()
        job = asyncio.get_running_loop().run_in_executor(self._threads, worker.call, fn, args)
        # the worker goes back when its call is really over, not when our caller stops waiting
        job.add_done_callback(lambda done: self._release(idle, worker, done))
        try:
            return await asyncio.wait_for(asyncio.shield(job), self._config.timeout_s)
        except TimeoutError as e:
            worker.kill()  # a native encode cannot be interrupted: only its process ended
            raise LocalEncoderTimeout(
                f"local encode ran past {self._config.timeout_s:.0f} s"
            ) from e
        except ImageRejected as e:
            raise LocalEncoderRejected(f"local encoder: {e}") from e
        except (VisionCacheError, OSError) as e:
            raise LocalEncoderError(f"local encoder: {e}") from e

    def _release(
        self, idle: asyncio.Queue[_Worker], worker: _Worker, done: asyncio.Future[Any]
    ) -> None:
        if not done.cancelled():
            done.exception()  # retrieved here: the caller may have stopped waiting
        if self._idle is not idle:
            return  # closed meanwhile: aclose stops every worker
        if not worker.alive():
            log.warning("replacing encoder worker %s", worker.process.pid)
            self._workers.discard(worker)
            worker.stop()  # already dead: this only reaps it
            worker = self._spawn()
        idle.put_nowait(worker)

    def _spawn(self) -> _Worker:
        worker = _Worker(self._mp, self._config)
        self._workers.add(worker)
        return worker


class _WorkerDied(Exception):
    """The worker process ended while (or before) it held a call."""


class _Worker:
    """One worker process and the pipe to it; one call at a time, on one thread."""

    def __init__(self, mp: SpawnContext, config: LocalEncoderConfig) -> None:
        self._conn, child = mp.Pipe()
        self.process: SpawnProcess = mp.Process(
            target=_serve, args=(child, config), name="vcache-encoder", daemon=True
        )
        self.process.start()
        child.close()  # only the worker holds its end: its death is EOF here

    def alive(self) -> bool:
        return self.process.is_alive() and not self._conn.closed

    def call(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        try:
            self._conn.send((fn, args))
            ok, value = self._conn.recv()
        except (EOFError, OSError) as e:
            self._conn.close()
            raise _WorkerDied(f"exit code {self.process.exitcode}") from e
        if not ok:
            raise value
        return value

    def kill(self) -> None:
        self.process.kill()

    def stop(self) -> None:
        """Ask the worker to exit, kill it if it does not."""
        if not self._conn.closed:
            with contextlib.suppress(OSError):  # already gone
                self._conn.send(None)
            self._conn.close()
        self.process.join(STOP_GRACE_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


# --- the worker side: module-level, so spawned processes can import them --------------------

_encoder: VisionEncoder | None = None
_config: LocalEncoderConfig | None = None


def _serve(conn: Connection, config: LocalEncoderConfig) -> None:
    """A worker's life: calls in, results (or the exception raised) out, until told to stop."""
    global _config
    # Ctrl-C reaches the whole process group; the parent decides when workers stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _config = config
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return  # the parent is gone
        if message is None:
            return
        fn, args = message
        try:
            conn.send((True, fn(*args)))
        except Exception as e:  # travels back; raised in the parent
            conn.send((False, e if _picklable(e) else LocalEncoderError(repr(e))))


def _picklable(e: Exception) -> bool:
    import pickle

    try:
        pickle.dumps(e)
        return True
    except Exception:  # whatever pickling raises, the answer is no
        return False


def _worker_encoder() -> VisionEncoder:
    """Loaded on a worker's first call, so load errors travel back as that call's error."""
    global _encoder
    if _encoder is None:
        from vision_cache.llama.libs import load_llama_libs

        assert _config is not None, "_serve sets the config before any call"
        libs = load_llama_libs(_config.lib_dir)
        silence_native_logs(libs)
        _encoder = VisionEncoder(libs, _config.mmproj, _config.text_model, _config.settings)
    return _encoder


def _describe() -> dict[str, Any]:
    encoder = _worker_encoder()
    return {
        "mmproj": encoder.mmproj_id,
        "build": encoder.build_id,
        "encoder": encoder.namespace_settings(),
    }


def _encode(image: bytes) -> tuple[PackageHeader, bytes, float]:
    encoded = _worker_encoder().encode(image)
    return encoded.header, encoded.payload, encoded.encode_ms
