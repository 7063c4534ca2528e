"""`vcache serve --backend llama-cpp-python`: the OpenAI-compatible API in-process, no llama-server.

For users who run llama-cpp-python rather than a patched llama-server: one ``llama_cpp.Llama``
with `vision_cache.llama.chat_handler.CachingChatHandler`, so each image is encoded once and later
requests decode its stored package. Endpoints: ``POST /v1/chat/completions`` (and
``/chat/completions``; streamed as server-sent events when ``"stream": true``),
``GET /v1/models``, ``GET /health``::

    settings = LlamaCppSettings(model=Path("model.gguf"), mmproj=Path("mmproj.gguf"),
                                store=Path("~/.cache/vcache/store").expanduser())
    asyncio.run(serve_llama_cpp(settings))

A Llama is not thread-safe: generations run one at a time on a single dedicated thread, off the
event loop, in arrival order. A streaming client that disconnects stops its generation at the
next token; a non-streaming one runs to ``max_tokens``. Image URLs are fetched here under the
proxy's fetch policy (`proxy.images.media`); the handler itself only ever sees data URIs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Generator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.errors import ClientError, TooManyImages
from proxy.images.media import FetchPolicy, MediaLoader
from proxy.upstream.relay import RESPONSE_STARTED
from proxy.web.listen import parse_hosts
from proxy.web.site import request_middleware, run_until_signalled, running_site
from vision_cache.data_uri import data_uri
from vision_cache.llama.libs import load_llama_libs
from vision_cache.store import Store

log = logging.getLogger("vcache.llama_cpp")
MIB = 1024 * 1024
# what the chat completion endpoint takes from a request; anything else is ignored, as
# llama-server ignores fields it does not know
_SAMPLING = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "typical_p",
    "max_tokens",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repeat_penalty",
    "logprobs",
    "top_logprobs",
    "response_format",
    "logit_bias",
    "tools",
    "tool_choice",
)
_END = object()


@dataclasses.dataclass(frozen=True)
class LlamaCppSettings:
    """``vcache serve --backend llama-cpp-python``.

    ``lib_dir``: the llama.cpp build's library directory (None: ``$LLAMA_CPP_LIB_PATH``, else
    llama-cpp-python's own). ``logits_all`` is needed for ``logprobs`` and costs
    n_ctx x n_vocab floats. ``alias`` names the model in /v1/models (default: the file's stem).
    """

    model: Path
    mmproj: Path
    store: Path
    lib_dir: Path | None = None
    n_ctx: int = 4096
    n_threads: int = 4
    n_gpu_layers: int = 0
    mmproj_use_gpu: bool = False
    logits_all: bool = False
    alias: str | None = None
    host: str = "127.0.0.1"
    port: int = 8081
    hot_mb: int = 256
    disk_gb: float = 20.0
    max_body_mb: int = 100
    max_images: int = 32
    fetch: FetchPolicy = dataclasses.field(default_factory=FetchPolicy)


class LlamaCppBackend:
    """One model behind the chat completion API; generations run on one dedicated thread."""

    def __init__(self, llama: Any, name: str, media: MediaLoader, max_images: int) -> None:
        self._llama = llama
        self.name = name
        self._media = media
        self._max_images = max_images
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vcache-llama")

    def close(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        kwargs = await self._arguments(body)
        loop = asyncio.get_running_loop()
        try:
            result: dict[str, Any] = await loop.run_in_executor(
                self._thread, lambda: self._llama.create_chat_completion(**kwargs)
            )
        except ValueError as e:
            raise _refused(e) from e
        return {**result, "model": self.name}

    async def stream(self, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        kwargs = await self._arguments(body)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()
        job = loop.run_in_executor(self._thread, _pump, self._llama, kwargs, queue, loop, stop)
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, ValueError):
                    raise _refused(item) from item
                if isinstance(item, BaseException):
                    raise item
                yield {**item, "model": self.name}
        finally:
            stop.set()  # a client gone mid-stream: the thread stops at the next token
            job.cancel()  # not started yet: it never will

    async def _arguments(self, body: dict[str, Any]) -> dict[str, Any]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ClientError('"messages" must be a non-empty array')
        kwargs = {k: body[k] for k in _SAMPLING if k in body}
        if "max_completion_tokens" in body and "max_tokens" not in body:
            kwargs["max_tokens"] = body["max_completion_tokens"]
        kwargs["messages"] = await self._inline_images(messages)
        kwargs["stream"] = bool(body.get("stream", False))
        return kwargs

    async def _inline_images(self, messages: list[Any]) -> list[Any]:
        """Every image_url part as a data URI, fetched under the fetch policy."""
        parts = [
            p
            for m in messages
            if isinstance(m, dict) and isinstance(m.get("content"), list)
            for p in m["content"]
            if isinstance(p, dict) and p.get("type") == "image_url"
        ]
        if len(parts) > self._max_images:
            raise TooManyImages(f"at most {self._max_images} images per request")
        for part in parts:
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str):
                raise ClientError("image_url needs a url")
            media = await self._media.load(url)
            part["image_url"] = {"url": data_uri(media.data, media.mime or "image/png")}
        return messages


def _refused(e: ValueError) -> ClientError:
    """llama-cpp-python refuses a request (context overflow, a bad image) with a ValueError:
    the client's error, a 400, as llama-server would answer."""
    return ClientError(str(e))


def _pump(
    llama: Any,
    kwargs: dict[str, Any],
    queue: asyncio.Queue[Any],
    loop: asyncio.AbstractEventLoop,
    stop: threading.Event,
) -> None:
    """Generate on the worker thread, handing each chunk to the event loop."""

    def put(item: Any) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    try:
        chunks: Generator[dict[str, Any], None, None] = llama.create_chat_completion(**kwargs)
        try:
            for chunk in chunks:
                if stop.is_set():
                    break
                put(chunk)
        finally:
            chunks.close()  # here, on the one thread that touches the Llama
    except BaseException as e:  # re-raised on the event loop
        put(e)
    finally:
        put(_END)


# --- HTTP ------------------------------------------------------------------------------------

BACKEND = web.AppKey("backend", LlamaCppBackend)


def create_app(backend: LlamaCppBackend, *, max_body_mb: int = 100) -> web.Application:
    app = web.Application(client_max_size=max_body_mb * MIB, middlewares=[request_middleware()])
    app[BACKEND] = backend
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/chat/completions", _chat)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/models", _models)
    app.router.add_get("/health", _health)
    return app


async def _chat(request: web.Request) -> web.StreamResponse:
    backend = request.app[BACKEND]
    try:
        body = await request.json()
    except json.JSONDecodeError as e:
        raise ClientError(f"invalid JSON body: {e}") from e
    if not isinstance(body, dict):
        raise ClientError("the body must be a JSON object")
    if not body.get("stream"):
        return web.json_response(await backend.complete(body))
    return await _sse(request, backend.stream(body))


async def _sse(
    request: web.Request, chunks: AsyncGenerator[dict[str, Any], None]
) -> web.StreamResponse:
    # the first chunk before the headers: a request refused up front still gets a 400
    first = await anext(chunks, None)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    request[RESPONSE_STARTED] = response  # a failure from here on cuts the stream short
    try:
        if first is not None:
            await response.write(_event(first))
        async for chunk in chunks:
            await response.write(_event(chunk))
        await response.write(b"data: [DONE]\n\n")
    finally:
        await chunks.aclose()  # a client gone mid-stream: stop the generation now
    return response


def _event(chunk: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode()


async def _models(request: web.Request) -> web.Response:
    name = request.app[BACKEND].name
    return web.json_response(
        {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": 0, "owned_by": "vcache"}],
        }
    )


async def _health(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


# --- running it ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_backend(settings: LlamaCppSettings) -> AsyncIterator[tuple[str, Any]]:
    """Load the model, start the server; yields its URL and the chat handler."""
    store = Store.open(
        settings.store,
        hot_bytes=settings.hot_mb * MIB,
        disk_bytes=int(settings.disk_gb * 1024 * MIB),
    )
    try:
        llama, handler = await asyncio.to_thread(_load_model, settings, store)
        async with MediaLoader(settings.fetch) as media:
            name = settings.alias or settings.model.stem
            backend = LlamaCppBackend(llama, name, media, settings.max_images)
            try:
                app = create_app(backend, max_body_mb=settings.max_body_mb)
                async with running_site(app, parse_hosts(settings.host), settings.port) as url:
                    yield url, handler
            finally:
                await asyncio.to_thread(backend.close)
                await asyncio.to_thread(llama.close)
    finally:
        store.close()


def _load_model(settings: LlamaCppSettings, store: Store) -> tuple[Any, Any]:
    load_llama_libs(settings.lib_dir)
    import llama_cpp

    from vision_cache.llama.chat_handler import CachingChatHandler

    handler = CachingChatHandler(str(settings.mmproj), store, use_gpu=settings.mmproj_use_gpu)
    t0 = time.perf_counter()
    llama = llama_cpp.Llama(
        str(settings.model),
        chat_handler=handler,
        n_ctx=settings.n_ctx,
        n_threads=settings.n_threads,
        n_gpu_layers=settings.n_gpu_layers,
        logits_all=settings.logits_all,
        verbose=False,
    )
    log.info("loaded %s in %.1f s", settings.model, time.perf_counter() - t0)
    return llama, handler


async def serve_llama_cpp(settings: LlamaCppSettings) -> None:
    """Run until SIGINT or SIGTERM."""
    what = f"{settings.model.name} with llama-cpp-python"
    await run_until_signalled(running_backend(settings), what)
