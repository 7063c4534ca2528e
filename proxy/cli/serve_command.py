"""`vcache serve`: run the proxy (or the llama-cpp-python backend) until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
from typing import Any

from proxy.cli.config import ServeSettings, add_arguments, settings_from
from proxy.cli.logs import chosen_format, configure


def add_serve_command(subparsers: Any) -> None:
    from proxy.cli.main import add_command

    serve = add_command(
        subparsers,
        "serve",
        usage="vcache serve (--upstream URL | --llama-server PATH [-- ARGS...]) [OPTIONS]\n"
        "       vcache serve --backend llama-cpp-python --model GGUF --mmproj GGUF [OPTIONS]",
        help="run the proxy",
        description="Run the proxy in front of a llama-server: either one already running "
        "(--upstream URL) or one it starts and manages (--llama-server PATH -- ARGS...).",
        epilog="Example: vcache serve --llama-server ./llama-server -- -m model.gguf "
        "--mmproj mmproj.gguf",
    )
    add_arguments(serve)
    serve.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    settings = settings_from(args, ServeSettings)
    configure(settings.log_level, chosen_format(args))
    from proxy.serve import run  # heavy imports only for the command that needs them

    run(settings)
    return 0
