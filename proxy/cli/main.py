"""The `vcache` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from proxy.cli.config import ServeSettings, add_arguments, settings_error, settings_from

if TYPE_CHECKING:
    from proxy.cli.store_commands import Subparsers


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with `command` "serve", only `vcache serve`.

    The other commands' modules import the store, rich and httpx: `vcache serve` must not
    wait for them, so a fleet restart or a per-test proxy is ready in a fraction of a second.
    """
    parser = argparse.ArgumentParser(
        prog="vcache", description="A caching proxy for llama-server that encodes each image once."
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_serve(subparsers)
    if command != "serve":
        from proxy.cli.build_server_command import add_build_server_command
        from proxy.cli.compare_command import add_compare_command
        from proxy.cli.pack_commands import add_pack_commands
        from proxy.cli.store_commands import add_store_commands
        from proxy.cli.warm_command import add_warm_command

        add_warm_command(subparsers)
        add_compare_command(subparsers)
        add_pack_commands(subparsers)
        add_store_commands(subparsers)
        add_build_server_command(subparsers)
    return parser


def _add_serve(subparsers: Subparsers) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="run the proxy",
        description="Run the proxy in front of a llama-server: either one already running "
        "(--upstream URL) or one it starts and manages (--llama-server PATH -- ARGS...).",
        epilog="Example: vcache serve --llama-server ./llama-server -- -m model.gguf "
        "--mmproj mmproj.gguf",
    )
    add_arguments(serve)
    serve.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = settings_from(args, ServeSettings)
    except (ValidationError, ValueError) as e:
        print(f"vcache serve: {settings_error(e)}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from proxy.serve import run  # heavy imports only for the command that needs them

    return run(settings)


def _split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """`vcache serve ... -- llama-server args`: what follows `--` goes to llama-server."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def main(argv: list[str] | None = None) -> int:
    own, passthrough = _split_passthrough(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser(own[0] if own else None)
    args = parser.parse_args(own)
    if passthrough:
        args.llama_args = passthrough
    handler: Any = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    return int(handler(args))
