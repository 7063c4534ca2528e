"""`vcache completion bash|zsh`: the shell completion script, generated from the parser.

    vcache completion bash > ~/.local/share/bash-completion/completions/vcache
    vcache completion zsh > "${fpath[1]}/_vcache"

The script is made by shtab from the same argparse parser the command runs, so it completes
every subcommand, option and choice there is, and never drifts from them.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

SHELLS = ("bash", "zsh")


def add_completion_command(subparsers: Any) -> None:
    from proxy.cli.main import add_command

    parser = add_command(
        subparsers,
        "completion",
        help="print the shell completion script",
        description="Print a completion script for bash or zsh on stdout.",
        epilog="Example: "
        "vcache completion bash > ~/.local/share/bash-completion/completions/vcache",
    )
    parser.add_argument("shell", choices=SHELLS, help="the shell to complete in")
    parser.set_defaults(handler=run_completion)


def run_completion(args: argparse.Namespace) -> int:
    import shtab

    from proxy.cli.main import build_parser

    parser, _ = build_parser()  # every command, whichever ran this one
    sys.stdout.write(shtab.complete(parser, shell=args.shell))
    return 0
