"""Managed mode: proxy.upstream.supervisor against tests/support/fake_llama_server.py run as a
real binary."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import select
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from proxy.errors import UpstreamError
from proxy.upstream import supervisor
from proxy.upstream.supervisor import ManagedServer, ManagedServerConfig, ReservedArgumentError

FAKE = Path(__file__).parent / "support" / "fake_llama_server.py"
ROOT = Path(__file__).resolve().parents[1]

FAKE_COMMAND = f"{shlex.quote(sys.executable)} {shlex.quote(str(FAKE))}"

BinaryFactory = Callable[..., Path]


def write_script(path: Path, body: str) -> Path:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


@pytest.fixture(autouse=True)
def no_leftover_children() -> Iterator[None]:
    """Every test must end with no new child process: none running, none a zombie.

    Children that existed before the test (session servers of other test modules, the
    multiprocessing resource tracker) are not this test's to judge or to kill.
    """
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    children = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    for child in children:  # clean up for the next test before failing this one
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(children, timeout=5)
    assert children == []


@pytest.fixture
def make_binary(tmp_path: Path) -> BinaryFactory:
    """A `llama-server` executable: a shell wrapper that execs the fake (so the pid is its)."""

    def make(*, patched: bool = False) -> Path:
        env = "export FAKE_WITH_EMBEDDING_DIR=1\n" if patched else ""
        return write_script(
            tmp_path / ("llama-server-patched" if patched else "llama-server"),
            f'{env}exec {FAKE_COMMAND} "$@"',
        )

    return make


def fast_config(binary: Path, *args: str, **changes: Any) -> ManagedServerConfig:
    """Limits scaled for tests: every wait here is well under a second or two."""
    config = ManagedServerConfig(
        binary=binary,
        args=args,
        start_timeout_s=10.0,
        backoff_initial_s=0.1,
        backoff_max_s=0.4,
        stop_grace_s=2.0,
    )
    return dataclasses.replace(config, **changes)


async def props(server: ManagedServer) -> dict[str, Any]:
    async with httpx.AsyncClient(trust_env=False) as client:
        response = await client.get(server.base_url + "/props")
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


async def eventually(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def is_gone(pid: int) -> bool:
    """Not running. A zombie counts as gone when it is not ours to reap (reparented to init)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What this process has running and open, to compare with after a stop."""

    children: frozenset[int]
    tasks: frozenset[asyncio.Task[Any]]

    @classmethod
    def take(cls) -> Snapshot:
        children = frozenset(p.pid for p in psutil.Process().children(recursive=True))
        return cls(children, frozenset(asyncio.all_tasks()))


def assert_nothing_left(before: Snapshot, workdir: Path, files: set[str]) -> None:
    """No new child process (running or zombie), no task of the supervisor's still running,
    no file under `workdir` still open, and no file there but `files`."""
    children = [
        p for p in psutil.Process().children(recursive=True) if p.pid not in before.children
    ]
    assert children == []
    tasks = [t for t in asyncio.all_tasks() - before.tasks if t is not asyncio.current_task()]
    assert [t.get_name() for t in tasks] == []
    still_open = [
        f.path for f in psutil.Process().open_files() if Path(f.path).is_relative_to(workdir)
    ]
    assert still_open == []
    assert {p.name for p in workdir.iterdir()} == files


# --- starting and stopping ------------------------------------------------------------------


async def test_start_serves_on_loopback_then_stop_leaves_nothing(
    make_binary: BinaryFactory, tmp_path: Path
) -> None:
    before = Snapshot.take()
    log = tmp_path / "llama-server.log"
    server = ManagedServer(fast_config(make_binary(), "-m", "model.gguf", log_path=log))
    await server.start()
    pid = server.pid
    assert pid is not None
    assert server.healthy
    info = await props(server)
    port = server.base_url.rsplit(":", 1)[1]
    assert info["pid"] == pid
    assert info["argv"] == ["-m", "model.gguf", "--host", "127.0.0.1", "--port", port]

    await server.stop()
    await server.stop()  # idempotent
    assert server.pid is None
    assert not psutil.pid_exists(pid)  # reaped, not a zombie
    assert not await server.wait_healthy(0.1)
    assert_nothing_left(before, tmp_path, {"llama-server", "llama-server.log"})
    assert "listening" in log.read_text()  # the child's output went to the log, and stopped
    assert not server.healthy


async def test_context_manager_starts_and_stops(make_binary: BinaryFactory) -> None:
    async with ManagedServer(fast_config(make_binary())) as server:
        pid = server.pid
        assert pid is not None and await server.wait_healthy(0.1)
    assert not psutil.pid_exists(pid)


async def test_load_delay_is_waited_out(make_binary: BinaryFactory) -> None:
    began = time.monotonic()
    async with ManagedServer(fast_config(make_binary(), "--load-delay", "1.0")) as server:
        assert time.monotonic() - began >= 1.0
        assert server.healthy


async def test_start_failure_quotes_the_log_tail(make_binary: BinaryFactory) -> None:
    server = ManagedServer(fast_config(make_binary(), "--fail-start", "-m", "missing.gguf"))
    with pytest.raises(UpstreamError, match="exited with code 1") as caught:
        await server.start()
    assert "failed to load model 'missing.gguf'" in caught.value.message
    assert server.pid is None
    # `vcache serve` exits with it: the status llama-server itself ended with
    assert isinstance(caught.value, supervisor.ManagedStartError)
    assert caught.value.exit_status == 1


async def test_start_timeout_kills_the_loading_child(make_binary: BinaryFactory) -> None:
    config = fast_config(make_binary(), "--load-delay", "30", start_timeout_s=0.5)
    server = ManagedServer(config)
    with pytest.raises(UpstreamError, match=r"did not become healthy within 0\.5 s") as caught:
        await server.start()
    assert server.pid is None  # and no_leftover_children checks it was reaped
    assert isinstance(caught.value, supervisor.ManagedStartError)
    assert caught.value.exit_status == 1  # it did not exit: vcache's own failure status


def test_a_start_killed_by_a_signal_exits_as_a_shell_reports_it() -> None:
    killed = supervisor.ManagedStartError("llama-server was killed", "", -signal.SIGKILL)
    assert killed.exit_status == 128 + signal.SIGKILL
    assert supervisor.ManagedStartError("exited", "", 3).exit_status == 3


async def test_missing_binary_is_an_upstream_error(tmp_path: Path) -> None:
    server = ManagedServer(fast_config(tmp_path / "no-such-llama-server"))
    with pytest.raises(UpstreamError, match="cannot run llama-server"):
        await server.start()


async def test_sigterm_ignored_is_followed_by_sigkill(make_binary: BinaryFactory) -> None:
    server = ManagedServer(fast_config(make_binary(), "--ignore-sigterm", stop_grace_s=0.3))
    await server.start()
    pid = server.pid
    assert pid is not None
    began = time.monotonic()
    await server.stop()
    assert time.monotonic() - began < 2.0
    assert not psutil.pid_exists(pid)


async def test_log_path_is_appended_to(make_binary: BinaryFactory, tmp_path: Path) -> None:
    log_path = tmp_path / "llama-server.log"
    log_path.write_text("earlier run\n")
    async with ManagedServer(fast_config(make_binary(), log_path=log_path)):
        pass
    text = log_path.read_text()
    assert text.startswith("earlier run\n")
    assert "server is listening on http://127.0.0.1:" in text
    assert "shutting down on SIGTERM" in text  # SIGTERM came first, and output was drained


async def test_bind_race_is_retried_on_a_new_port(
    make_binary: BinaryFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The port we picked is taken before llama-server binds it: try another one."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        busy = taken.getsockname()[1]
        picks = iter([busy])
        real_pick = supervisor.pick_free_port
        monkeypatch.setattr(
            supervisor, "pick_free_port", lambda host: next(picks, None) or real_pick(host)
        )
        async with ManagedServer(fast_config(make_binary())) as server:
            assert server.healthy
            assert not server.base_url.endswith(f":{busy}")


async def test_unwritable_log_path_falls_back_to_our_logger(
    make_binary: BinaryFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = fast_config(make_binary(), log_path=tmp_path / "no-such-dir" / "llama.log")
    with caplog.at_level(logging.INFO, logger="proxy.upstream.supervisor"):
        async with ManagedServer(config) as server:
            assert server.healthy
    messages = [(r.name, r.getMessage()) for r in caplog.records]
    assert any("cannot append llama-server's output" in m for _, m in messages)
    assert (
        "proxy.upstream.supervisor.llama_server",
        f"main: server is listening on {server.base_url}",
    ) in messages


# --- arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("--host", "0.0.0.0"),
        ("--port", "8080"),
        ("--host=0.0.0.0",),
        ("--port=8080",),
        ("-m", "model.gguf", "--image-embedding-dir", "/elsewhere"),
    ],
)
def test_reserved_arguments_are_refused(args: tuple[str, ...]) -> None:
    with pytest.raises(ReservedArgumentError, match="managed mode sets it") as caught:
        ManagedServerConfig(binary=Path("llama-server"), args=args)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("name", ["LLAMA_ARG_HOST", "LLAMA_ARG_PORT"])
def test_reserved_environment_is_refused(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(name, "8080")
    with pytest.raises(ReservedArgumentError, match=f"unset {name}"):
        ManagedServer(ManagedServerConfig(binary=Path("llama-server")))


def test_non_loopback_host_is_refused() -> None:
    with pytest.raises(ValueError, match="loopback"):
        ManagedServerConfig(binary=Path("llama-server"), host="0.0.0.0")


async def test_embedding_dir_is_passed_to_a_patched_build(
    make_binary: BinaryFactory,
    tmp_path: Path,
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    config = fast_config(make_binary(patched=True), embedding_dir=store)
    async with ManagedServer(config) as server:
        assert server.supports_embedding_dir
        argv = (await props(server))["argv"]
    assert argv[-2:] == ["--image-embedding-dir", str(store.resolve())]


async def test_embedding_dir_is_left_out_for_a_stock_build(
    make_binary: BinaryFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The stock fake refuses the flag, so a wrongly passed flag would also fail the start.
    config = fast_config(make_binary(), embedding_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="proxy.upstream.supervisor"):
        async with ManagedServer(config) as server:
            assert not server.supports_embedding_dir
            argv = (await props(server))["argv"]
    assert "--image-embedding-dir" not in argv
    warnings = [r for r in caplog.records if "forward images" in r.getMessage()]
    assert len(warnings) == 1


# --- restarts -------------------------------------------------------------------------------


async def test_crash_is_restarted_and_listeners_are_called(
    make_binary: BinaryFactory,
    tmp_path: Path,
) -> None:
    restarted = asyncio.Event()

    async def broken_listener() -> None:
        raise RuntimeError("a listener bug must not stop the others")

    async def listener() -> None:
        restarted.set()

    marker = tmp_path / "crashed"
    config = fast_config(make_binary(), "--crash-after", "0.2", "--crash-marker", str(marker))
    async with ManagedServer(config) as server:
        server.add_restart_listener(broken_listener)
        server.add_restart_listener(listener)
        first_pid, base_url = server.pid, server.base_url
        await asyncio.wait_for(restarted.wait(), 5.0)
        assert server.restarts == 1
        assert server.pid not in (None, first_pid)
        assert server.base_url == base_url  # same port across restarts
        assert (await props(server))["pid"] == server.pid


async def test_failed_restarts_are_retried(tmp_path: Path) -> None:
    """While the marker file exists, every start of the binary fails; then it works again."""
    marker = tmp_path / "broken"
    broken_now = f"[ -e {shlex.quote(str(marker))} ]"
    binary = write_script(
        tmp_path / "llama-server",
        f'if {broken_now}; then set -- "$@" --fail-start; fi\nexec {FAKE_COMMAND} "$@"',
    )
    restarted = asyncio.Event()

    async def listener() -> None:
        restarted.set()

    config = fast_config(binary, "--crash-after", "0.3", "--crash-marker", str(tmp_path / "c"))
    async with ManagedServer(config) as server:
        server.add_restart_listener(listener)
        marker.touch()
        await asyncio.sleep(1.0)  # the crash, then failed restarts after 0.1 s, 0.2 s, 0.4 s...
        assert server.restarts == 0 and not restarted.is_set()
        marker.unlink()
        await asyncio.wait_for(restarted.wait(), 5.0)
        assert server.restarts == 1


async def test_requests_can_wait_out_a_restart(make_binary: BinaryFactory, tmp_path: Path) -> None:
    config = fast_config(
        make_binary(),
        "--crash-after",
        "0.1",
        "--crash-marker",
        str(tmp_path / "crashed"),
        backoff_initial_s=0.3,
    )
    async with ManagedServer(config) as server:
        await eventually(lambda: not server.healthy)
        assert not await server.wait_healthy(0.05)  # still in the backoff
        assert await server.wait_healthy(5.0)
        assert (await props(server))["pid"] == server.pid


async def test_stop_during_the_backoff_leaves_nothing(
    make_binary: BinaryFactory, tmp_path: Path
) -> None:
    before = Snapshot.take()
    config = fast_config(
        make_binary(),
        "--crash-after",
        "0.1",
        backoff_initial_s=30.0,
        backoff_max_s=30.0,
        log_path=tmp_path / "llama-server.log",
    )
    began = time.monotonic()
    async with ManagedServer(config) as server:
        crashed = server.pid
        assert crashed is not None
        await eventually(lambda: not server.healthy)
    assert time.monotonic() - began < 10  # the stop cut the 30 s backoff short
    assert server.restarts == 0 and server.pid is None
    assert not psutil.pid_exists(crashed)  # the crashed child was reaped
    assert_nothing_left(before, tmp_path, {"llama-server", "llama-server.log"})


def test_backoff_doubles_up_to_the_cap_and_resets_after_a_stable_run() -> None:
    config = ManagedServerConfig(
        binary=Path("llama-server"), backoff_initial_s=1.0, backoff_max_s=30.0, stable_after_s=60.0
    )
    backoff = supervisor.Backoff(config)
    delays = [backoff.next_delay(uptime_s=5.0) for _ in range(7)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert backoff.next_delay(uptime_s=60.0) == 1.0
    assert backoff.next_delay(uptime_s=0.0) == 2.0


@pytest.mark.parametrize(
    ("returncode", "text"),
    [
        (1, "exited with code 1"),
        (-signal.SIGKILL, "was killed by SIGKILL"),
    ],
)
def test_exits_are_described_with_code_or_signal(returncode: int, text: str) -> None:
    assert supervisor.describe_exit(returncode) == text


# --- no orphans -----------------------------------------------------------------------------


async def test_cancelling_the_owner_stops_the_child(make_binary: BinaryFactory) -> None:
    started: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def owner() -> None:
        async with ManagedServer(fast_config(make_binary())) as server:
            assert server.pid is not None
            started.set_result(server.pid)
            await asyncio.sleep(3600)

    task = asyncio.create_task(owner())
    pid = await asyncio.wait_for(started, 5.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not psutil.pid_exists(pid)


async def test_cancelling_a_start_stops_the_loading_child(make_binary: BinaryFactory) -> None:
    server = ManagedServer(fast_config(make_binary(), "--load-delay", "30"))
    task = asyncio.create_task(server.start())
    await eventually(lambda: server.pid is not None)
    pid = server.pid
    assert pid is not None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not psutil.pid_exists(pid)


PARENT = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from proxy.upstream.supervisor import ManagedServer, ManagedServerConfig

    async def main() -> None:
        async with ManagedServer(ManagedServerConfig(binary=Path(sys.argv[1]))) as server:
            print(server.pid, flush=True)
            await asyncio.sleep(3600)

    asyncio.run(main())
""")


@pytest.fixture
def parent_process(make_binary: BinaryFactory, tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """A proxy stand-in in its own process, which starts a supervised fake llama-server."""
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(make_binary())],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def read_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    assert ready, "the parent did not report its child in time"
    return proc.stdout.readline()


def test_child_dies_when_its_parent_is_sigkilled(parent_process: subprocess.Popen[str]) -> None:
    child = int(read_line(parent_process, 8.0))
    try:
        assert not is_gone(child)
        parent_process.send_signal(signal.SIGKILL)  # no cleanup code runs in the parent
        parent_process.wait()
        deadline = time.monotonic() + 5.0
        while not is_gone(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert is_gone(child), "llama-server outlived the proxy"
    finally:
        if not is_gone(child):
            os.kill(child, signal.SIGKILL)
