"""The `vcache` command line: the parser, the global options, and the one error path.

A subcommand lives in its own module with an `add_<name>_command(subparsers)` function that
registers it (several, for a family of commands) with `set_defaults(handler=...)`; it is listed
in `COMMANDS` below. Only the module of the command being run is imported, so `vcache serve`
starts without loading the store commands' dependencies.

A handler takes the parsed arguments and returns the exit status; on failure it raises
(`proxy.cli.failure`), and `main` prints one or two lines on stderr: never a traceback unless
``--debug``.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from proxy.cli.failure import USAGE, UsageError, report
from proxy.cli.logs import FORMATS

# command -> "module:function" that registers it (one function may register several)
COMMANDS: dict[str, str] = {
    "serve": "proxy.cli.serve_command:add_serve_command",
    "warm": "proxy.cli.warm_command:add_warm_command",
    "export": "proxy.cli.pack_commands:add_pack_commands",
    "import": "proxy.cli.pack_commands:add_pack_commands",
    "ls": "proxy.cli.store_commands:add_store_commands",
    "names": "proxy.cli.store_commands:add_store_commands",
    "stats": "proxy.cli.store_commands:add_store_commands",
    "rm": "proxy.cli.store_commands:add_store_commands",
    "pin": "proxy.cli.store_commands:add_store_commands",
    "unpin": "proxy.cli.store_commands:add_store_commands",
    "gc": "proxy.cli.store_commands:add_store_commands",
    "verify": "proxy.cli.store_commands:add_store_commands",
    "compare": "proxy.cli.compare_command:add_compare_command",
    "build-server": "proxy.cli.build_server_command:add_build_server_command",
    "completion": "proxy.cli.completion:add_completion_command",
}
DESCRIPTION = "A caching proxy for llama-server that encodes each image once."


class Parser(argparse.ArgumentParser):
    """argparse, with its errors sent down the one error path (with the parser's usage)."""

    def error(self, message: str) -> NoReturn:
        raise ArgumentError(_suggest(message), self)


def _suggest(message: str) -> str:
    """argparse's "invalid choice: 'sevre' (choose from ...)", with the closest choice named."""
    match = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if match is None:
        return message
    choices = re.findall(r"'([^']*)'", match.group(2))
    close = difflib.get_close_matches(match.group(1), choices, n=1)
    return f"{message.split(' (choose from')[0]} (did you mean {close[0]}?)" if close else message


class ArgumentError(UsageError):
    def __init__(self, message: str, parser: argparse.ArgumentParser) -> None:
        super().__init__(message)
        self.parser = parser


def global_options() -> argparse.ArgumentParser:
    """--debug and --log-format: accepted before the command and after it."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the traceback of an error (env: VCACHE_DEBUG=1)",
    )
    common.add_argument(
        "--log-format",
        choices=FORMATS,
        default=argparse.SUPPRESS,
        help="text lines, or one JSON object per line (default: text; env: VCACHE_LOG_FORMAT)",
    )
    return common


def build_parser(command: str | None = None) -> tuple[Parser, Any]:
    """The parser and its subparsers; with `command`, only that command is loaded."""
    from proxy.version import VERSION

    common = global_options()
    parser = Parser(prog="vcache", description=DESCRIPTION, parents=[common])
    parser.add_argument("--version", action="version", version=f"vcache {VERSION}")
    subparsers = parser.add_subparsers(
        title="commands", metavar="COMMAND", dest="command", parser_class=Parser
    )
    subparsers.common = common  # type: ignore[attr-defined]  # each command adds it as a parent
    wanted = [COMMANDS[command]] if command in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for target in wanted:
        module, function = target.split(":")
        getattr(importlib.import_module(module), function)(subparsers)
    return parser, subparsers


def add_command(subparsers: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand's parser, with the global options: use it in every add_*_command."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name, parents=[subparsers.common], **kwargs
    )
    return parser


def _split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """`vcache serve ... -- llama-server args`: what follows `--` goes to llama-server."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand's name: the first word that is no option nor a global option's value."""
    after_option = False
    for arg in argv:
        if not arg.startswith("-") and not after_option:
            return arg
        after_option = arg == "--log-format"
    return None


def _parse(parser: Parser, subparsers: Any, argv: list[str]) -> argparse.Namespace:
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = subparsers.choices.get(getattr(args, "command", None) or "", parser)
        raise ArgumentError(_unrecognized(extra, sub), sub)
    return args


def _unrecognized(extra: list[str], parser: argparse.ArgumentParser) -> str:
    message = f"unrecognized arguments: {' '.join(extra)}"
    options = [o for action in parser._actions for o in action.option_strings]
    close = difflib.get_close_matches(extra[0].split("=")[0], options, n=1)
    return f"{message} (did you mean {close[0]}?)" if close else message


def _debug(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get("VCACHE_DEBUG", "") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    own, passthrough = _split_passthrough(list(sys.argv[1:] if argv is None else argv))
    command = _command_of(own)
    if command is None and "--version" in own:  # at once: no subcommand needs loading for it
        from proxy.version import VERSION

        print(f"vcache {VERSION}")
        return 0
    subparsers: Any = None
    try:
        parser, subparsers = build_parser(command)
        args = _parse(parser, subparsers, own)
        if passthrough:
            args.llama_args = passthrough
        handler: Any = getattr(args, "handler", None)
        if handler is None:
            parser.print_help(sys.stderr)
            return USAGE
        return int(handler(args))
    except SystemExit as e:  # --help and --version
        return e.code if isinstance(e.code, int) else 0
    except BaseException as e:
        usage = e.parser.format_usage() if isinstance(e, ArgumentError) else None
        if usage is None and command in COMMANDS:
            usage = _usage(subparsers, command)
        name = command if command in COMMANDS else ""
        return report(name, e, debug=_debug(own), usage=usage)


def _usage(subparsers: Any, command: str) -> str | None:
    if subparsers is None:
        return None
    sub = subparsers.choices.get(command)
    return sub.format_usage() if sub is not None else None
