"""The README and docs are true to the code: their commands run, their tables match the options.

The quick-start blocks are executed as written, in order, in a scratch directory with HOME
pointing there, against the tiny test model: lines that start a server run in the background
until their port answers; every other line must exit 0. Python blocks run too. The docs'
blocks that need no server run as well; every `vcache` command shown anywhere is parsed by the
real parser (an option that does not exist fails), and every script and make target named in a
block exists.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import httpx
import pytest

from proxy.cli.config import ServeSettings
from tests.support.redis_server import RedisServer
from vision_cache.synthetic.images import sample_image
from vision_cache.synthetic.models import ModelFiles

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"```(sh|python)\n(.*?)```", re.S)
SERVER_LINE = re.compile(r"vcache serve|\"\$LLAMA_SERVER\" ")
PORT = re.compile(r"--port (\d+)")


def blocks() -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(README)]


def test_readme_starts_with_the_two_commands() -> None:
    first = blocks()[0]
    lines = [ln.split("#")[0].strip() for ln in first[1].splitlines() if ln.strip()]
    assert lines == ["make demo", "make test"]
    assert README.index("make demo") < README.index("## ")


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [
        ln
        for ln in ci.splitlines()
        if ln.strip() and not ln.startswith(("#", "set ")) and not ln.startswith("cd ")
    ]
    assert commands == ["make test"]


def _config_rows() -> dict[str, tuple[str, str]]:
    table = README.split("<!-- config-table:start -->")[1].split("<!-- config-table:end -->")[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`--"):
            rows[cells[0].strip("`")] = (cells[1].strip("`"), cells[2])
    return rows


def test_configuration_table_matches_the_options() -> None:
    rows = _config_rows()
    expected = {}
    for name, field in ServeSettings.model_fields.items():
        if name == "llama_args":
            continue
        default = field.get_default(call_default_factory=True)
        shown = "unset" if default is None else str(default)
        expected["--" + name.replace("_", "-")] = (shown, field.description)
    assert rows == expected


def test_every_vcache_command_in_the_readme_exists() -> None:
    code = " ".join(c for _, c in blocks()) + " ".join(re.findall(r"`([^`\n]+)`", README))
    commands = set(re.findall(r"vcache ([\w-]+)", code)) - {"serve"}
    expected = {"warm", "export", "import", "ls", "names", "pin", "unpin", "stats", "rm", "gc"}
    assert expected | {"verify"} <= commands
    for command in commands | {"serve"}:
        r = subprocess.run(
            [sys.executable, "-m", "proxy", command, "--help"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert r.returncode == 0, (command, r.stderr)


class Shell:
    """Runs README lines like a user would, keeping servers in the background."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd, self.env = cwd, env
        self.background: list[subprocess.Popen[bytes]] = []
        self.logs: list[IO[bytes]] = []
        self.outputs: list[str] = []  # what each foreground line printed

    def run(self, line: str) -> None:
        if SERVER_LINE.search(line):
            self._start(line)
            return
        r = subprocess.run(
            ["bash", "-c", line],
            cwd=self.cwd,
            env=self.env,
            timeout=900,
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, f"{line}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        self.outputs.append(r.stdout)
        if line.startswith("LLAMA_SERVER="):
            self.env["LLAMA_SERVER"] = subprocess.run(
                # a newline, not "; ": the line may end in a comment
                ["bash", "-c", f'{line}\necho "$LLAMA_SERVER"'],
                cwd=self.cwd,
                env=self.env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()

    def _start(self, line: str) -> None:
        port = PORT.search(line)
        assert port, f"server line without --port: {line}"
        log = (self.cwd / f"server-{port.group(1)}.log").open("wb")
        self.logs.append(log)
        proc = subprocess.Popen(
            ["bash", "-c", f"exec {line}"],
            cwd=self.cwd,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.background.append(proc)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"{line} exited:\n{(self.cwd / log.name).read_text()}"
            try:
                health = httpx.get(f"http://127.0.0.1:{port.group(1)}/health", timeout=2)
                if health.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{line} did not come up")

    def stop_all(self) -> None:
        for proc in reversed(self.background):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        self.background.clear()
        for log in self.logs:
            log.close()
        self.logs.clear()


@pytest.fixture
def shell(
    tmp_path: Path, tiny_model: Callable[[str], ModelFiles], redis_server: RedisServer
) -> Iterator[Shell]:
    files, embedder = tiny_model("gemma3"), tiny_model("qwen2vl-embed")
    refs = tmp_path / "refs"
    refs.mkdir()
    (refs / "cat.jpg").write_bytes(sample_image("shapes_640x480").encode("JPEG"))
    (refs / "dog.png").write_bytes(sample_image("noise_512x512").encode("PNG"))
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "MODEL": str(files.model),
        "MMPROJ": str(files.mmproj),
        "EMBED_MODEL": str(embedder.model),
        "EMBED_MMPROJ": str(embedder.mmproj),
        "IMAGE_URL": sample_image("stripes_300x900").data_url(),
        "IMAGE": str(refs / "cat.jpg"),
        "REDIS_URL": redis_server.url,
        # `vcache build-server` finds the builds `make llama` made (HOME is a fresh one)
        "VCACHE_LLAMA_CACHE": os.environ.get("VCACHE_LLAMA_CACHE", str(ROOT / ".build" / "llama")),
        "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}",
    }
    for link in (
        ".venv",
        "scripts",
        "Makefile",
        "pyproject.toml",
        "constraints.txt",
        "proxy",
        "vision_cache",
        "llama_patches",
        ".build",
        "README.md",
        "docs",
        "tests",
    ):
        (tmp_path / link).symlink_to(ROOT / link)
    sh = Shell(tmp_path, env)
    yield sh
    sh.stop_all()


@pytest.mark.server
def test_quick_start_commands_run(shell: Shell) -> None:
    """Every sh and python block after the first, in order, as written."""
    for lang, code in blocks()[1:]:
        if lang == "python":
            r = subprocess.run(
                [sys.executable, "-c", code],
                cwd=shell.cwd,
                env=shell.env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert r.returncode == 0, f"{code}\n{r.stderr[-2000:]}"
            continue
        for line in _logical_lines(code):
            if "--port 8080" in line and "vcache serve --upstream" not in line:
                # the second quick start fronts a server of its own: free 8081 first
                shell.stop_all()
            shell.run(line)
    # the quick start's promise: the same local image twice, a miss and then a hit
    headers = [o.strip() for o in shell.outputs if o.lower().startswith("x-vcache")]
    assert any("misses=1" in h for h in headers), headers
    assert any("hits=1" in h for h in headers), headers


def _logical_lines(code: str) -> list[str]:
    """Lines with continuations (a trailing backslash or an open quote) joined."""
    out, buf = [], ""
    for line in code.splitlines():
        buf = f"{buf}\n{line}" if buf else line
        try:
            shlex.split(buf.split(" #")[0] if "'" not in buf else buf)
        except ValueError:
            continue  # an open quote: the command goes on
        if buf.endswith("\\"):
            continue
        if buf.strip() and not buf.strip().startswith("#"):
            out.append(buf)
        buf = ""
    return out


# --- docs/architecture.md and the tree ---------------------------------------------------------

ARCHITECTURE = (ROOT / "docs" / "architecture.md").read_text()
ROW = re.compile(r"^\| `([\w/.]+)` \|(.*)\|$", re.M)


def _packages() -> list[Path]:
    """Every package of proxy/ and vision_cache/, the two roots included."""
    return sorted(
        init.parent
        for top in ("proxy", "vision_cache")
        for init in (ROOT / top).rglob("__init__.py")
    )


def _rows() -> dict[str, str]:
    """The architecture tables: the path in the first cell -> the rest of its row."""
    return {m.group(1): m.group(2) for m in ROW.finditer(ARCHITECTURE)}


def test_architecture_names_every_subpackage_and_its_modules() -> None:
    rows = _rows()
    for package in _packages():
        relative = f"{package.relative_to(ROOT)}/"
        if package.parent == ROOT:
            assert f"`{relative}`" in ARCHITECTURE, relative
            modules = [m for m in package.glob("*.py") if not m.name.startswith("__")]
            for module in modules:  # the top-level modules have rows of their own
                assert f"{relative}{module.name}" in rows, f"{relative}{module.name}"
            continue
        assert relative in rows, f"docs/architecture.md has no row for {relative}"
        named = set(re.findall(r"`([\w.]+)`", rows[relative]))
        for module in package.glob("*.py"):
            if not module.name.startswith("__"):
                assert module.stem in named, f"{relative}{module.name} is not in its row"


def test_every_path_in_architecture_exists() -> None:
    paths = set(re.findall(r"`((?:proxy|vision_cache|tests|scripts|docs)/[\w/.]*)`", ARCHITECTURE))
    paths |= set(re.findall(r"\b((?:proxy|vision_cache)/[\w/]+\.py)\b", ARCHITECTURE))
    assert paths, "no paths found: the pattern or the document changed"
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert missing == []


def test_every_module_named_in_a_row_exists() -> None:
    """A row's lowercase `name` is a module (or subpackage) of that row's package."""
    for path, row in _rows().items():
        if not path.endswith("/"):
            continue
        for name in re.findall(r"`([a-z_0-9]+)`", row):
            assert (ROOT / path / f"{name}.py").exists() or (ROOT / path / name).is_dir(), (
                f"{path}: `{name}` is not a module there"
            )


# --- every command the docs show ---------------------------------------------------------------

DOCS = [
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "llama_patches" / "README.md",
    ROOT / "README.md",
]
# blocks that need nothing running: executed as written (the others are parsed and checked)
RUNNABLE = ("docs/store.md", "docs/operations.md")
SHELL_END = {"|", ">", ">>", "<", ";", "&&", "||", "#", "2>&1"}


def _sh_lines(path: Path) -> list[str]:
    text = path.read_text()
    return [
        line
        for m in BLOCK.finditer(text)
        if m.group(1) == "sh"
        for line in _logical_lines(m.group(2))
    ]


def _vcache_invocations() -> list[tuple[str, list[str], bool]]:
    """(where, argv after `vcache`, whether inline) for every vcache command in a block or in
    inline code (where prose may name an option without its value)."""
    found = []
    for path in DOCS:
        text = path.read_text()
        # code spans in order, so the prose between two spans is never read as one
        spans = re.findall(r"`([^`\n]+)`", text)
        inline = [span for span in spans if re.search(r"\bvcache [a-z]", span)]
        candidates = [(line, False) for line in _sh_lines(path)] + [(c, True) for c in inline]
        for line, is_inline in candidates:
            try:
                words = shlex.split(line.replace("\\\n", " "), comments=True)
            except ValueError:
                continue
            for i, word in enumerate(words):
                if word == "vcache" or word.endswith("/vcache"):
                    argv = []
                    for arg in words[i + 1 :]:
                        if arg in SHELL_END:
                            break
                        if arg not in ("...", "[...]"):
                            argv.append(arg)
                    if argv and re.fullmatch(r"[a-z-]+", argv[0]):
                        where = f"{path.relative_to(ROOT)}: {line[:80]}"
                        found.append((where, argv, is_inline))
    return found


def test_every_vcache_command_in_the_docs_parses() -> None:
    """An option or command the docs show must exist: the real parser reads each one."""
    from proxy.cli.main import ArgumentError, build_parser

    invocations = _vcache_invocations()
    assert len(invocations) > 30, "the docs' commands were not found: the pattern changed"
    parser, _subparsers = build_parser()
    for where, argv, is_inline in invocations:
        own = argv[: argv.index("--")] if "--" in argv else argv
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                _, extra = parser.parse_known_args(own)
        except SystemExit as e:  # --help, --version
            assert e.code == 0, where
            continue
        except ArgumentError as e:
            if is_inline and re.search(r"required|expected one argument", e.message):
                continue  # prose naming a command or an option (`vcache warm --ttl`)
            raise AssertionError(f"{where}: {e.message}") from None
        assert extra == [], f"{where}: unknown {extra}"


def test_every_script_and_make_target_in_the_docs_exists() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for path in DOCS:
        for line in _sh_lines(path):
            for script in re.findall(r"\bscripts/([\w]+\.(?:py|sh))", line):
                assert (ROOT / "scripts" / script).exists(), f"{path.name}: {line}"
            for module in re.findall(r"-m scripts\.(\w+)", line):
                assert (ROOT / "scripts" / f"{module}.py").exists(), f"{path.name}: {line}"
            for target in re.findall(r"^make ([\w-]+)", line):
                assert re.search(rf"^{target}:", makefile, re.M), f"{path.name}: {line}"


def test_the_docs_blocks_that_need_no_server_run(tmp_path: Path) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("VCACHE_STORE")},
        "HOME": str(tmp_path),
        "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}",
    }
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    for doc in RUNNABLE:
        text = (ROOT / doc).read_text()
        for m in BLOCK.finditer(text):
            if m.group(1) != "sh":
                continue
            # one bash per block: a block's lines share their variables, as in a terminal
            r = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", m.group(2)],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert r.returncode == 0, f"{doc}:\n{m.group(2)}\n{r.stdout[-2000:]}{r.stderr[-2000:]}"


def test_the_example_config_and_service_are_valid(tmp_path: Path) -> None:
    from proxy.cli.config import ClientSettings, ServeSettings, load
    from proxy.cli.main import build_parser

    example = ROOT / "docs" / "examples" / "vcache.toml"
    serve = load(ServeSettings, {}, example)
    assert serve.upstream == "http://127.0.0.1:8080" and serve.port == 8081
    assert load(ClientSettings, {}, example).proxy == "http://127.0.0.1:8081"
    unit = (ROOT / "docs" / "examples" / "vcache.service").read_text()
    [exec_start] = re.findall(r"^ExecStart=(.*)$", unit, re.M)
    words = shlex.split(exec_start)
    assert words[0].endswith("/vcache")
    parser, _ = build_parser()
    args, extra = parser.parse_known_args(words[1:])
    assert extra == [] and args.command == "serve"


def test_the_license_is_the_one_pyproject_names() -> None:
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert 'license = { text = "MIT" }' in (ROOT / "pyproject.toml").read_text()
