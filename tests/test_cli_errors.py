"""Ordinary mistakes end in one or two clear lines on stderr and a non-zero exit, never a
traceback, and leave nothing half-written.

Each test is a mistake a new user made with an earlier version (the regression it guards is
in its docstring); `vcache` runs as a process, as the user runs it.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.support.store_helpers import NAMESPACE, key, meta_for, payload_for
from vision_cache import Store

FAKE = Path(__file__).parent / "support" / "fake_llama_server.py"


def vcache(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("VCACHE_", "LLAMA_ARG_"))}
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**clean, **(env or {})},
        timeout=timeout,
    )


def assert_fails(r: subprocess.CompletedProcess[str], code: int, *fragments: str) -> str:
    """Exit `code`, no traceback, nothing on stdout, one error line (and a hint at most)."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stdout == "", r.stdout
    said = [ln for ln in r.stderr.splitlines() if ln.startswith(("vcache", "hint:"))]
    assert len([ln for ln in said if ": error: " in ln]) == 1, r.stderr
    assert len(said) <= 2, r.stderr
    for fragment in fragments:
        assert fragment in r.stderr, (fragment, r.stderr)
    return r.stderr


@pytest.fixture
def llama_server(tmp_path: Path) -> Path:
    """A llama-server binary that is the fake (tests/support/fake_llama_server.py)."""
    path = tmp_path / "llama-server"
    path.write_text(
        f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(FAKE))} "$@"\n'
    )
    path.chmod(0o755)
    return path


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


# --- vcache serve ------------------------------------------------------------------------------


def test_bare_serve_shows_its_usage(tmp_path: Path) -> None:
    """Regression: "give exactly one of --upstream URL and --llama-server PATH", no usage."""
    r = vcache("serve", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("usage: vcache serve (--upstream URL")
    assert "vcache serve: error: give exactly one of --upstream URL and --llama-server PATH" in (
        r.stderr
    )
    assert "Traceback" not in r.stderr


def test_a_misspelt_option_shows_the_commands_usage_and_the_right_spelling(
    tmp_path: Path,
) -> None:
    """Regression: a misspelt option showed the top-level usage (`vcache [-h] COMMAND ...`)."""
    r = vcache("serve", "--upstrem", "http://127.0.0.1:8080", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("usage: vcache serve")
    assert "unrecognized arguments: --upstrem" in r.stderr
    assert "(did you mean --upstream?)" in r.stderr
    typo = vcache("sevre", cwd=tmp_path)
    assert typo.returncode == 2 and "did you mean serve?" in typo.stderr


def test_upstream_must_be_a_url(tmp_path: Path) -> None:
    """Regression: `--upstream not-a-url` started serving."""
    r = vcache("serve", "--upstream", "not-a-url", "--port", "0", cwd=tmp_path)
    assert_fails(r, 2, "--upstream 'not-a-url': not an http(s) URL", "http://127.0.0.1:8080")
    assert list(tmp_path.iterdir()) == []


def test_a_misspelt_vcache_variable_is_refused(tmp_path: Path) -> None:
    """Regression: a misspelt VCACHE_* variable was silently ignored."""
    r = vcache("ls", env={"VCACHE_STOR": str(tmp_path / "s")}, cwd=tmp_path)
    assert_fails(r, 2, "unknown environment variable VCACHE_STOR", "did you mean VCACHE_STORE?")


def test_a_store_that_is_a_file(tmp_path: Path) -> None:
    """Regression: `--store` naming a file ended in a FileExistsError traceback."""
    afile = tmp_path / "afile"
    afile.write_bytes(b"mine")
    r = vcache("serve", "--upstream", "http://127.0.0.1:9", "--store", str(afile), cwd=tmp_path)
    assert_fails(r, 2, f"--store '{afile}': a file, not a directory")
    assert afile.read_bytes() == b"mine"


def test_a_missing_llama_server_binary(tmp_path: Path) -> None:
    """Regression: a missing llama-server binary ended in a 69-line traceback."""
    r = vcache("serve", "--llama-server", str(tmp_path / "nope"), "--", "-m", "x", cwd=tmp_path)
    assert_fails(r, 2, f"--llama-server '{tmp_path / 'nope'}': no such file", "make llama")


def test_llama_server_exiting_while_it_loads(tmp_path: Path, llama_server: Path) -> None:
    """Regression: llama-server exiting while it loads ended in a traceback under its log."""
    before = children()
    r = vcache(
        "serve",
        "--llama-server",
        str(llama_server),
        "--store",
        str(tmp_path / "store"),
        "--port",
        "0",
        "--",
        "-m",
        "broken.gguf",
        "--fail-start",
        cwd=tmp_path,
    )
    err = assert_fails(r, 1, "llama-server exited with code 1 before it became healthy")
    assert "failed to load model 'broken.gguf'" in err
    assert f"hint: its whole output is in {tmp_path / 'store' / 'llama-server.log'}" in err
    assert children() == before


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--", "-m", "m.gguf", "--port", "8080"], {}, "remove --port from the llama-server"),
        (["--", "-m", "m.gguf"], {"LLAMA_ARG_PORT": "8080"}, "unset LLAMA_ARG_PORT"),
    ],
)
def test_managed_mode_refuses_what_it_sets_itself(
    tmp_path: Path, llama_server: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    """Regression: `-- --port 8080` and LLAMA_ARG_PORT ended in tracebacks."""
    store = tmp_path / "store"
    r = vcache("serve", "--llama-server", str(llama_server), "--store", str(store), *args,
               env=env, cwd=tmp_path)  # fmt: skip
    assert_fails(r, 2, message, "usage: vcache serve")
    assert not store.exists()


def test_a_port_in_use(tmp_path: Path, taken_port: int) -> None:
    """Regression: a port in use ended in an OSError 98 traceback."""
    store = tmp_path / "store"
    r = vcache(
        "serve", "--upstream", "http://127.0.0.1:9", "--store", str(store),
        "--port", str(taken_port), cwd=tmp_path,
    )  # fmt: skip
    assert_fails(r, 1, f"cannot listen on 127.0.0.1:{taken_port}: the address is already in use")
    assert not store.exists()


def test_a_port_in_use_fails_before_llama_server_starts(
    tmp_path: Path, llama_server: Path, taken_port: int
) -> None:
    """Regression: in managed mode a port in use failed only after the model had loaded."""
    store = tmp_path / "store"
    started = time.monotonic()
    r = vcache(
        "serve", "--llama-server", str(llama_server), "--store", str(store),
        "--port", str(taken_port), "--", "-m", "m.gguf", "--load-delay", "60", cwd=tmp_path,
    )  # fmt: skip
    assert_fails(r, 1, "the address is already in use", "give another --port")
    assert time.monotonic() - started < 30  # not the 60 s the model takes to load
    assert not store.exists()  # llama-server never started: no store, no log


def test_an_address_that_is_none(tmp_path: Path) -> None:
    """Regression: `--host 999.1.1.1` ended in a socket.gaierror traceback."""
    r = vcache("serve", "--upstream", "http://127.0.0.1:9", "--host", "999.1.1.1",
               "--store", str(tmp_path / "s"), cwd=tmp_path)  # fmt: skip
    assert_fails(r, 2, "cannot listen on '999.1.1.1'", "hint: give --host an address")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[serve]\nport = "abc"\n', "vcache.toml: port: Input should be a valid integer"),
        ("[serve\nport = 1\n", "vcache.toml: not valid TOML"),
        ("[serve]\nhot_mbb = 1\n", "unknown setting 'hot_mbb' (did you mean 'hot_mb'?)"),
    ],
)
def test_config_file_mistakes_name_the_file(tmp_path: Path, text: str, message: str) -> None:
    """Regression: TOML mistakes did not name the file."""
    config = tmp_path / "vcache.toml"
    config.write_text(text)
    assert_fails(vcache("serve", "--config", str(config), cwd=tmp_path), 2, str(config), message)


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    r = vcache("--debug", "serve", "--upstream", "not-a-url", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" in r.stderr and "not an http(s) URL" in r.stderr


def test_version_and_choices_in_help(tmp_path: Path) -> None:
    """Regression: no --version; --help hid allowed values (`--transport TRANSPORT`)."""
    version = vcache("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("vcache ")
    usage = vcache("serve", "--help", cwd=tmp_path).stdout
    assert "--transport {auto,file,inline}" in usage and "--log-format {text,json}" in usage


# --- export and import -------------------------------------------------------------------------


def make_store(root: Path, n: int) -> Path:
    with Store.open(root, hot_bytes=0) as store:
        store.register_namespace(NAMESPACE)
        for i in range(n):
            assert store.put(key(i), meta_for(key(i)), payload_for(key(i)), pin=True) is not None
    return root


def entries(root: Path) -> int:
    with Store.open(root, hot_bytes=0, create=False) as store:
        return len(list(store.iter_entries()))


def test_export_into_a_missing_directory(tmp_path: Path) -> None:
    """Regression: export into a missing directory ended in a traceback; errors went to stdout."""
    store = make_store(tmp_path / "store", 2)
    r = vcache("export", str(tmp_path / "nodir" / "refs.vcpack"), "--store", str(store),
               cwd=tmp_path)  # fmt: skip
    assert_fails(r, 1, f"the directory {tmp_path / 'nodir'} does not exist")
    assert not (tmp_path / "nodir").exists()


def test_import_of_a_file_that_is_not_a_pack(tmp_path: Path) -> None:
    """Regression: importing a file that is not a pack ended in a tarfile.ReadError traceback."""
    store = make_store(tmp_path / "store", 2)
    bogus = tmp_path / "notes.vcpack"
    bogus.write_text("not a pack")
    r = vcache("import", str(bogus), "--store", str(store), "--proxy", "http://127.0.0.1:9",
               "--keep-unmatched", cwd=tmp_path)  # fmt: skip
    assert_fails(r, 1, f"{bogus} is not a vcache pack")
    assert entries(store) == 2


def test_import_of_a_damaged_pack_stores_nothing(tmp_path: Path) -> None:
    """A pack whose last entry is corrupt: the entries before it are not stored either."""
    from vision_cache.client.pack import export_pack

    with Store.open(make_store(tmp_path / "a", 3), hot_bytes=0) as source:
        export_pack(source, tmp_path / "refs.vcpack")
    with (
        tarfile.open(tmp_path / "refs.vcpack") as good,
        tarfile.open(tmp_path / "damaged.vcpack", "w") as bad,
    ):
        for member in good.getmembers():
            data = good.extractfile(member).read()  # type: ignore[union-attr]
            if member.name == "manifest.json":
                manifest = json.loads(data)
                manifest["entries"][-1]["xxh3"] = "0" * 16  # the last entry's checksum, wrong
                data = json.dumps(manifest).encode()
                member.size = len(data)
            bad.addfile(member, io.BytesIO(data))
    target = tmp_path / "b"
    r = vcache("import", str(tmp_path / "damaged.vcpack"), "--store", str(target),
               "--proxy", "http://127.0.0.1:9", "--keep-unmatched", cwd=tmp_path)  # fmt: skip
    assert_fails(r, 1, "is corrupt (checksum mismatch)")
    assert not target.exists() or entries(target) == 0


def test_import_without_a_running_proxy(tmp_path: Path) -> None:
    """Import loads into the running proxy's store: with none running, it says so."""
    store = make_store(tmp_path / "store", 1)
    from vision_cache.client.pack import export_pack

    with Store.open(store, hot_bytes=0) as source:
        export_pack(source, tmp_path / "refs.vcpack")
    r = vcache("import", str(tmp_path / "refs.vcpack"), "--proxy", "http://127.0.0.1:9",
               cwd=tmp_path)  # fmt: skip
    assert_fails(r, 1, "cannot reach the proxy at http://127.0.0.1:9", "--keep-unmatched")
    pack, later_store = str(tmp_path / "refs.vcpack"), str(tmp_path / "later")
    later = vcache("import", pack, "--proxy", "http://127.0.0.1:9", "--keep-unmatched",
                   "--store", later_store, cwd=tmp_path)  # fmt: skip
    assert later.returncode == 0, later.stderr
    assert "for later: no proxy runs at http://127.0.0.1:9" in later.stdout
    assert entries(tmp_path / "later") == 1


def test_every_error_of_a_store_command_goes_to_stderr(tmp_path: Path) -> None:
    r = vcache("ls", "--store", str(tmp_path / "none"), "--json", cwd=tmp_path)
    assert_fails(r, 2, f"no store at {tmp_path / 'none'}", "hint:")
    json_error = vcache("rm", "zz", "--store", str(make_store(tmp_path / "s", 1)), cwd=tmp_path)
    assert_fails(json_error, 2, "'zz' names no entry")
    assert json.loads(vcache("ls", "--store", str(tmp_path / "s"), "--json", cwd=tmp_path).stdout)
