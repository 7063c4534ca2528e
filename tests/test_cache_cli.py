"""The cache's command line as people expect it from `docker image ls` and `git`: readable
80-column tables, full keys in --json, unique prefixes accepted, names, pins, progress bars,
and commands that name a proxy act on that proxy's store.

The store commands run in-process (`proxy.cli.main.main`); beside an in-process proxy they run
in a thread, since the proxy answers them from the test's event loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from proxy.cli.main import main
from tests.support.fault_upstream import FaultUpstream
from tests.support.inprocess_proxy import CHAT, png, png_bytes, proxy_in_front
from tests.support.store_helpers import NAMESPACE, meta_for, payload_for
from tests.support.vlm_client import image_part
from vision_cache import Store
from vision_cache.keys import CacheKey, Namespace

OTHER = Namespace.for_encoder(
    model="other-model", mmproj="xxh3-128:" + "2" * 32 + ":1", build="b", format_version=1,
    encoder={},
)  # fmt: skip


@pytest.fixture(autouse=True)
def no_vcache_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("VCACHE_") and name != "VCACHE_MODELS_DIR":
            monkeypatch.delenv(name)


def digest(prefix: str, i: int) -> str:
    return (prefix + f"{i:x}").ljust(64, "0")


def filled(root: Path) -> dict[str, CacheKey]:
    """Four entries: two whose digests share 10 digits, one image in two namespaces, a name."""
    keys = {
        "a": NAMESPACE.key(digest("abcdef0123", 1)),
        "b": NAMESPACE.key(digest("abcdef0123", 2)),
        "c": NAMESPACE.key(digest("c0ffee", 0)),
        "c-other": OTHER.key(digest("c0ffee", 0)),
    }
    with Store.open(root, hot_bytes=0) as store:
        for ns in (NAMESPACE, OTHER):
            store.register_namespace(ns)
        for k in keys.values():
            assert store.put(k, meta_for(k), payload_for(k, min_size=3 * 2**20)) is not None
        store.set_name(keys["c"], "cat")
    return keys


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_ls_fits_80_columns_and_tells_entries_apart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: at 80 columns every key showed as the same `1fc6b9cb089…`, with no name or
    model, and sizes in raw bytes (`21,474,836,480`)."""
    filled(tmp_path / "s")
    code, out, _ = run(capsys, "ls", "--store", str(tmp_path / "s"))
    assert code == 0
    lines = out.rstrip("\n").splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80, out
    assert lines[0].split() == ["KEY", "NAME", "MODEL", "PINNED", "SIZE", "LAST", "USED"]
    keys = sorted(line.split()[0] for line in lines[2:])
    # one image cached for two models: NAMESPACE:DIGEST prefixes tell them apart
    both = sorted(f"{ns.id[:4]}:c0ffee0" for ns in (NAMESPACE, OTHER))
    assert keys == sorted(["abcdef012310", "abcdef012320", *both])
    cat = next(line for line in lines if " cat " in line)
    assert "test-vlm" in cat and "3.0 MiB" in cat and "just now" in cat
    for short in keys:  # what ls shows, rm, pin and unpin take
        assert run(capsys, "pin", short, "--store", str(tmp_path / "s"))[0] == 0
    assert any("other-model" in line for line in lines)


def test_json_has_full_keys_and_exact_numbers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = filled(tmp_path / "s")
    code, out, _ = run(capsys, "ls", "--store", str(tmp_path / "s"), "--json")
    rows = json.loads(out)
    assert code == 0 and {r["key"] for r in rows} == {k.text for k in keys.values()}
    cat = next(r for r in rows if r["names"] == ["cat"])
    assert cat["length"] > 3 * 2**20 and cat["digest"] == keys["c"].digest
    code, out, _ = run(capsys, "names", "--store", str(tmp_path / "s"), "--json")
    assert json.loads(out) == [
        {"name": "cat", "ref": "vcache://cat", "key": keys["c"].text, "model": cat["model"]}
    ]


def test_unique_prefixes_name_entries_everywhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: `vcache rm` rejected the shortened keys `ls` printed."""
    keys = filled(tmp_path / "s")
    store = ["--store", str(tmp_path / "s")]
    assert run(capsys, "pin", "abcdef012310", *store)[0] == 0
    assert run(capsys, "pin", "vcache://cat", *store)[0] == 0
    with Store.open(tmp_path / "s", hot_bytes=0) as s:
        pinned = {i.key for i in s.iter_entries() if i.pinned}
    assert pinned == {keys["a"], keys["c"]}
    # ambiguous: two entries share the prefix; the namespace prefix tells the two c0ffee apart
    code, _, err = run(capsys, "rm", "abcdef0123", *store)
    assert code == 1 and "is ambiguous" in err and "give more of the key" in err
    code, _, err = run(capsys, "rm", "c0ffee", *store)
    assert code == 1 and "is ambiguous" in err
    code, out, _ = run(capsys, "rm", f"{OTHER.id[:6]}:c0ffee", "abcdef012320", *store)
    assert code == 0 and out.count("deleted: ") == 2
    assert run(capsys, "unpin", keys["a"].text, *store)[0] == 0
    with Store.open(tmp_path / "s", hot_bytes=0) as s:
        left = {i.key: i.pinned for i in s.iter_entries()}
    assert left == {keys["a"]: False, keys["c"]: True}


def test_one_bad_key_changes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = filled(tmp_path / "s")
    code, _, err = run(capsys, "rm", keys["a"].text, "deadbeef", "--store", str(tmp_path / "s"))
    assert code == 1 and "no entry matches 'deadbeef'" in err
    with Store.open(tmp_path / "s", hot_bytes=0) as s:
        assert len(list(s.iter_entries())) == 4


def test_namespace_prefixes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = filled(tmp_path / "s")
    code, out, _ = run(capsys, "ls", "--store", str(tmp_path / "s"), "--json",
                       "--namespace", OTHER.id[:6])  # fmt: skip
    assert code == 0 and [r["key"] for r in json.loads(out)] == [keys["c-other"].text]
    code, _, err = run(capsys, "ls", "--store", str(tmp_path / "s"), "--namespace", "zz")
    assert code == 1 and "no namespace match 'zz'" in err


def test_stats_in_human_units(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    filled(tmp_path / "s")
    code, out, _ = run(capsys, "stats", "--store", str(tmp_path / "s"))
    assert code == 0 and "MiB" in out and "GiB" in out  # live bytes, disk budget
    assert max(len(line.rstrip()) for line in out.splitlines()) <= 80


def test_long_commands_show_a_progress_bar(tmp_path: Path) -> None:
    """verify, gc, export and import draw a bar on a terminal (stderr), and stdout stays clean."""
    filled(tmp_path / "s")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VCACHE_STORE")}
    for argv, label in (
        (["verify"], "verifying"),
        (["gc"], "collecting"),
        (["export", str(tmp_path / "p.vcpack"), "--no-pinned"], "exporting"),
    ):
        primary, secondary = pty.openpty()
        try:
            r = subprocess.run(
                [sys.executable, "-m", "proxy", *argv, "--store", str(tmp_path / "s")],
                stdout=subprocess.PIPE,
                stderr=secondary,
                env={**env, "COLUMNS": "80"},
                timeout=60,
            )
            os.close(secondary)
            drawn = _read_all(primary)
        finally:
            os.close(primary)
        assert r.returncode == 0, drawn
        assert label in drawn, drawn
        assert label not in r.stdout.decode()


def _read_all(fd: int) -> str:
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the other end is closed
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


def test_completion_scripts_know_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    for shell in ("bash", "zsh"):
        code, out, _ = run(capsys, "completion", shell)
        assert code == 0
        for command in ("serve", "warm", "ls", "names", "pin", "unpin", "rm", "completion"):
            assert command in out
        assert "--transport" in out
    if shutil.which("bash"):
        script = run(capsys, "completion", "bash")[1]
        check = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
        assert check.returncode == 0, check.stderr


# --- commands that name a proxy act on its store -----------------------------------------------


async def test_store_commands_with_proxy_act_on_the_proxys_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: every store command run beside a proxy with its own --store acted on the
    default store, and reported success for data the proxy could not see."""
    async with (
        FaultUpstream(packages=True) as fake,
        proxy_in_front(fake.url, tmp_path, store=tmp_path / "proxy-store") as (url, proxy),
        httpx.AsyncClient(timeout=30) as client,
    ):
        r = await client.post(f"{url}{CHAT}", json={"messages": [_user(png(3))]})
        assert "misses=1" in r.headers["X-Vcache"]
        [entry] = list(proxy.store.iter_entries())
        code, out, _ = await asyncio.to_thread(run, capsys, "ls", "--proxy", url, "--json")
        assert code == 0 and [row["key"] for row in json.loads(out)] == [entry.key.text]
        # a --store that is not the proxy's: refused, not silently used
        code, _, err = await asyncio.to_thread(
            run, capsys, "ls", "--proxy", url, "--store", str(tmp_path / "elsewhere")
        )
        assert code == 2 and "is not the store of the proxy" in err
        # rm through the proxy: it forgets its in-memory copy too, so the next request misses
        hit = await client.post(f"{url}{CHAT}", json={"messages": [_user(png(3))]})
        assert "hits=1" in hit.headers["X-Vcache"]
        short = entry.key.digest[:8]
        code, out, _ = await asyncio.to_thread(run, capsys, "rm", short, "--proxy", url)
        assert code == 0 and f"deleted: {entry.key.text}" in out
        again = await client.post(f"{url}{CHAT}", json={"messages": [_user(png(3))]})
        assert "misses=1" in again.headers["X-Vcache"]


async def test_a_proxy_whose_store_is_elsewhere_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same path here holding another store (the proxy runs on another machine): refused."""
    async with (
        FaultUpstream(packages=True) as fake,
        proxy_in_front(fake.url, tmp_path, store=tmp_path / "proxy-store") as (url, proxy),
    ):
        path = proxy.store.path
        await asyncio.to_thread(lambda: proxy.store.id)
        shutil.move(path, tmp_path / "moved")
        with Store.open(path, hot_bytes=0) as imposter:
            imposter.register_namespace(NAMESPACE)
        code, _, err = await asyncio.to_thread(run, capsys, "pin", "abcd", "--proxy", url)
        shutil.rmtree(path)
        shutil.move(tmp_path / "moved", path)
    assert code == 1 and "is not that store" in err and "proxy's machine" in err


async def test_import_loads_into_the_running_proxys_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: `vcache import refs.vcpack --proxy URL`, as the README shows it, printed
    "imported 20 entries" and wrote them into the default store, not the store of the proxy
    at URL: there `vcache://ref7` then answered 400 and the imported images missed."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # where the default store would be
    async with FaultUpstream(packages=True) as fake:
        # warm a reference on one proxy, export it
        async with proxy_in_front(fake.url, tmp_path, store=tmp_path / "a") as (url, _):
            warmed = await _warm(url, png_bytes(5), "ref7")
        code, out, err = run(capsys, "export", str(tmp_path / "refs.vcpack"), "--store",
                             str(tmp_path / "a"))  # fmt: skip
        assert code == 0, err
        # import it through a second proxy with a store of its own, the default store elsewhere
        async with (
            proxy_in_front(fake.url, tmp_path, store=tmp_path / "b") as (url, proxy),
            httpx.AsyncClient(timeout=30) as client,
        ):
            code, out, err = await asyncio.to_thread(
                run, capsys, "import", str(tmp_path / "refs.vcpack"), "--proxy", url
            )
            assert code == 0, err
            assert "imported 1 entries" in out and str(proxy.store.path) in out
            named = {"messages": [{"role": "user", "content": [image_part("vcache://ref7")]}]}
            r = await client.post(f"{url}{CHAT}", json=named)
            by_bytes = await client.post(f"{url}{CHAT}", json={"messages": [_user(png(5))]})
    assert r.status_code == 200 and "hits=1" in r.headers["X-Vcache"], r.text
    assert "hits=1" in by_bytes.headers["X-Vcache"]
    assert warmed in _keys(tmp_path / "b")
    assert not (tmp_path / "home").exists()  # nothing went to the default store


def _user(image: str) -> dict[str, object]:
    return {"role": "user", "content": [image_part(image)]}


async def _warm(url: str, image: bytes, name: str) -> str:
    from vision_cache.data_uri import data_uri

    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.post(
            f"{url}/vcache/warm", json={"image": data_uri(image, "image/png"), "name": name}
        )
    assert r.status_code == 200, r.text
    return str(r.json()["key"])


def _keys(root: Path) -> list[str]:
    with Store.open(root, hot_bytes=0) as store:
        return [info.key.text for info in store.iter_entries()]
