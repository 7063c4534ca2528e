"""A stand-in for llama-server that the supervisor tests run as its binary.

    python tests/support/fake_llama_server.py --host H --port P [-m MODEL] [--load-delay S]
        [--crash-after S [--crash-marker FILE]] [--fail-start] [--ignore-sigterm]
        [--image-embedding-dir DIR]
    python tests/support/fake_llama_server.py --help

Like llama-server it answers GET /health with 503 "Loading model" until the (fake) model is
loaded, then 200; it prints "couldn't bind HTTP server socket" and exits 1 when the port is
taken, and shuts down cleanly on SIGTERM. --crash-after S exits with code 3, S seconds after
the first 200 from /health (so a test knows the supervisor saw it healthy first); with
--crash-marker only while FILE does not exist, which the crash creates: one crash in all.
GET /props returns its argv and pid, so tests can see
what the supervisor passed. A stock build lacks --image-embedding-dir: the flag is listed in
--help and accepted only when the environment has FAKE_WITH_EMBEDDING_DIR=1 (a patched build).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiohttp import web

EMBEDDING_ENV = "FAKE_WITH_EMBEDDING_DIR"


def _patched() -> bool:
    return os.environ.get(EMBEDDING_ENV) == "1"


def _parser() -> argparse.ArgumentParser:
    # add_help=False: --help is answered before aiohttp is imported, to keep the probe fast.
    parser = argparse.ArgumentParser(prog="llama-server", add_help=False)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("-m", "--model", default="fake.gguf")
    parser.add_argument("--load-delay", type=float, default=0.0)
    parser.add_argument("--crash-after", type=float, default=None)
    parser.add_argument("--crash-marker", default=None)
    parser.add_argument("--fail-start", action="store_true")
    parser.add_argument("--ignore-sigterm", action="store_true")
    if _patched():
        parser.add_argument("--image-embedding-dir", default=None)
    return parser


def _help() -> str:
    lines = ["usage: llama-server [options]", "", "--host HOST", "--port PORT", "-m, --model FNAME"]
    if _patched():
        lines.append(
            "--image-embedding-dir PATH   directory whose files image_embedding inputs "
            "may reference"
        )
    return "\n".join(lines)


def say(message: str) -> None:
    # flush: our stdout is a pipe to the supervisor, block-buffered otherwise.
    print(message, file=sys.stderr, flush=True)


async def serve(args: argparse.Namespace) -> int:
    # Imported here, so that the --help probe does not pay for it.
    from aiohttp import web

    loaded_at = time.monotonic() + args.load_delay
    crash_armed = args.crash_after is not None

    async def health(request: web.Request) -> web.Response:
        nonlocal crash_armed
        if time.monotonic() < loaded_at:
            body = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
            return web.json_response(body, status=503)
        if crash_armed:
            crash_armed = False
            asyncio.get_running_loop().call_later(args.crash_after, _crash, args.crash_marker)
        return web.json_response({"status": "ok"})

    async def props(request: web.Request) -> web.Response:
        return web.json_response(
            {"argv": sys.argv[1:], "pid": os.getpid(), "model_path": args.model}
        )

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/props", props)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        return await _run_site(runner, args)
    finally:
        await runner.cleanup()


async def _run_site(runner: web.AppRunner, args: argparse.Namespace) -> int:
    from aiohttp import web

    try:
        await web.TCPSite(runner, args.host, args.port).start()
    except OSError as exc:
        say(f"couldn't bind HTTP server socket, hostname: {args.host}, port: {args.port} ({exc})")
        return 1
    say(f"main: server is listening on http://{args.host}:{args.port}")
    stop = asyncio.Event()
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    say("main: shutting down on SIGTERM")
    return 0


def _crash(marker: str | None) -> None:
    if marker is not None:
        if Path(marker).exists():
            return
        Path(marker).touch()
    say("fake: crashing on purpose")
    os._exit(3)  # no cleanup, as in a real crash


def main(argv: list[str]) -> int:
    if "--help" in argv or "-h" in argv:
        print(_help(), flush=True)
        return 0
    args = _parser().parse_args(argv)
    if args.fail_start:
        say(f"error: failed to load model '{args.model}'")
        return 1
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
