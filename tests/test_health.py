"""Health that tells the truth: readiness, liveness, why packages are off, the request count,
and the per-request cache bypass.

Against the fake upstream (tests/support/fault_upstream.py) for the states a real server is
slow or awkward to put in (down, loading, closing every connection); against the real stock
and patched llama-server for what they report about packages.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.version import VERSION
from tests.support.fault_upstream import Fault, FaultUpstream, refused_port
from tests.support.inprocess_proxy import CHAT, chat, png, proxy_in_front
from tests.support.llama_server import LlamaServer
from tests.support.proxy_process import ProxyProcess
from tests.support.vlm_client import image_part
from vision_cache.synthetic.models import ModelFiles

ERROR_SHAPE = {"code", "message", "type"}


def metric(text: str, name: str, labels: str = "") -> float | None:
    """The value of one sample of the Prometheus text, None when absent."""
    pattern = rf"^{re.escape(name)}{re.escape(labels)} (\S+)$"
    match = re.search(pattern, text, re.M)
    return float(match.group(1)) if match else None


async def get(url: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.get(url, **kwargs)


# --- readiness and liveness --------------------------------------------------------------------


async def test_health_is_503_in_llama_servers_shape_while_upstream_is_unreachable(
    tmp_path: Path,
) -> None:
    """Regression: /vcache/health answered 200 {"status": "ok"} with upstream unreachable."""
    async with (
        refused_port() as port,
        proxy_in_front(f"http://127.0.0.1:{port}", tmp_path) as (
            url,
            _,
        ),
    ):
        health = await get(f"{url}/vcache/health")
        live = await get(f"{url}/vcache/live")
    assert health.status_code == 503
    body = health.json()
    assert set(body["error"]) == ERROR_SHAPE
    assert body["error"]["code"] == 503 and body["error"]["type"] == "unavailable_error"
    assert "unreachable" in body["error"]["message"]
    assert body["ready"] is False and body["upstream_state"] == "unreachable"
    assert body["packages"] is False and "unreachable" in body["packages_reason"]
    assert live.status_code == 200
    assert live.json() == {"status": "ok", "version": VERSION}


async def test_health_is_503_while_upstream_loads_its_model(tmp_path: Path) -> None:
    async with FaultUpstream(packages=True) as fake:
        fake.set_fault("/health", Fault.STATUS_503)
        async with proxy_in_front(fake.url, tmp_path) as (url, _):
            loading = await get(f"{url}/vcache/health")
            del fake.faults["/health"]
            ready = await get(f"{url}/vcache/health")
    assert loading.status_code == 503
    assert loading.json()["upstream_state"] == "loading"
    assert "loading its model: Loading model" in loading.json()["error"]["message"]
    assert ready.status_code == 200
    body = ready.json()
    assert body["ready"] is True and body["status"] == "ok" and "error" not in body
    assert body["packages"] is True and "packages_reason" not in body
    assert body["version"] == VERSION


# --- packages off: health, log line, metric ----------------------------------------------------


async def test_a_stock_upstream_is_said_loudly_once_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: a stock upstream (nothing ever cached) showed only as fallback=1 in a header."""
    caplog.set_level(logging.WARNING, logger="vcache.upstream")
    async with (
        FaultUpstream(packages=False) as fake,
        proxy_in_front(fake.url, tmp_path) as (url, proxy),
        httpx.AsyncClient(timeout=30) as client,
    ):
        for i in range(3):
            r = await client.post(f"{url}{CHAT}", json=chat(image=png(i)))
            assert r.status_code == 200 and "fallback=1" in r.headers["X-Vcache"]
        proxy.upstream.forget_capabilities()  # read /props again: same state, no new line
        health = (await client.get(f"{url}/vcache/health")).json()
        metrics = (await client.get(f"{url}/vcache/metrics")).text
    assert health["ready"] is True and health["packages"] is False
    assert "stock llama-server" in health["packages_reason"]
    assert "--image-embedding" in health["packages_reason"]  # the fix
    lines = [r.getMessage() for r in caplog.records if "PACKAGES ARE OFF" in r.getMessage()]
    assert len(lines) == 1 and "stock llama-server" in lines[0]
    assert metric(metrics, "vcache_packages_enabled") == 0
    assert metric(metrics, "vcache_packages_off", '{reason="stock"}') == 1
    assert metric(metrics, "vcache_build_info", f'{{version="{VERSION}"}}') == 1


async def test_an_unverified_projector_is_reported_with_the_servers_reason(
    tmp_path: Path,
) -> None:
    """A patched server that refuses packages for its projector type says why in /props."""
    reason = (
        "projector type 'mlp' (image) is not verified for packages; start with "
        "--image-embedding-unverified to allow it"
    )
    async with FaultUpstream(packages=False) as fake:
        fake.props = {
            "image_embedding": {
                "enabled": False,
                "modalities": [],
                "projectors": {"image": {"type": "mlp", "verified": False}},
                "allow_unverified": False,
                "reason": reason,
            }
        }
        async with proxy_in_front(fake.url, tmp_path) as (url, _):
            health = (await get(f"{url}/vcache/health")).json()
            metrics = (await get(f"{url}/vcache/metrics")).text
    assert health["packages"] is False and health["packages_reason"] == reason
    assert metric(metrics, "vcache_packages_off", '{reason="unverified"}') == 1


@pytest.mark.server
def test_real_servers_say_why_packages_are_off(
    stock_bin: Path,
    patched_bin: Path,
    tiny_model: Callable[[str], ModelFiles],
    tmp_path: Path,
) -> None:
    """The stock build, and the patched one without --image-embedding: each reason names its
    fix, in /vcache/health and in the log line at start-up."""
    from tests.support.fixtures import server_args

    args = server_args(tiny_model("gemma3"))
    for name, binary, expected in (
        ("stock", stock_bin, "stock llama-server"),
        ("patched", patched_bin, "--image-embedding"),
    ):
        with (
            LlamaServer(binary, args, tmp_path / f"{name}.log") as server,
            ProxyProcess(
                ["--upstream", server.base_url, "--store", str(tmp_path / name)],
                tmp_path / f"proxy-{name}.log",
            ) as proxy,
        ):
            health = httpx.get(f"{proxy.base_url}/vcache/health", timeout=30)
            log = proxy.log()
        assert health.status_code == 200, health.text
        body = health.json()
        assert body["ready"] is True and body["packages"] is False
        assert expected in body["packages_reason"], body
        assert "PACKAGES ARE OFF" in log and expected in log


# --- the request count -------------------------------------------------------------------------


async def test_requests_served_in_full_are_counted_when_upstream_closes_after_the_body(
    tmp_path: Path,
) -> None:
    """Regression: fully served 200s were logged `cancelled (client gone)` and left out of
    vcache_requests_total: an upstream that closes its connection after the body, and clients
    that open one connection per request and close it once they have the answer, cancelled the
    handler while it was still closing upstream's response. The proxy runs as a process of
    its own, so that its handler and the client really race."""
    n = 40
    async with FaultUpstream(packages=True) as fake:
        fake.set_fault(CHAT, Fault.CLOSE_AFTER_BODY)
        proxy = ProxyProcess(
            ["--upstream", fake.url, "--store", str(tmp_path / "store")], tmp_path / "proxy.log"
        )
        await asyncio.to_thread(proxy.start)
        try:
            for i in range(n):
                # a client per request: its connection closes as soon as it has the answer
                async with httpx.AsyncClient(timeout=30) as client:
                    r = await client.post(f"{proxy.base_url}{CHAT}", json=chat(image=png(i % 4)))
                assert r.status_code == 200, r.text
            await asyncio.sleep(0.3)  # the last handler's tidying up
            metrics = (await get(f"{proxy.base_url}/vcache/metrics")).text
        finally:
            await asyncio.to_thread(proxy.stop)
    labels = f'{{endpoint="{CHAT}",status="2xx"}}'
    assert metric(metrics, "vcache_requests_total", labels) == n, proxy.log()[-3000:]
    assert "cancelled (client gone)" not in proxy.log()


# --- per request: no cache ---------------------------------------------------------------------


async def test_cache_control_no_store_and_no_cache_send_the_image_as_it_came(
    tmp_path: Path,
) -> None:
    async with (
        FaultUpstream(packages=True) as fake,
        proxy_in_front(fake.url, tmp_path) as (url, proxy),
        httpx.AsyncClient(timeout=30) as client,
    ):
        for directive in ("no-store", "no-cache", "max-age=0, No-Cache"):
            r = await client.post(
                f"{url}{CHAT}", json=chat(image=png(7)), headers={"Cache-Control": directive}
            )
            assert r.status_code == 200, r.text
            assert "bypass=1" in r.headers["X-Vcache"] and "misses=0" in r.headers["X-Vcache"]
            assert r.json()["vcache_fake"] == {"intact": 0, "corrupt": 0, "images": 1}
        assert fake.encodes == 0 and list(proxy.store.iter_entries()) == []
        cached = await client.post(f"{url}{CHAT}", json=chat(image=png(7)))
        assert "misses=1" in cached.headers["X-Vcache"]  # without the header: cached as usual
        named = {"messages": [{"role": "user", "content": [image_part("vcache://cat")]}]}
        refused = await client.post(
            f"{url}{CHAT}", json=named, headers={"Cache-Control": "no-cache"}
        )
        metrics = (await client.get(f"{url}/vcache/metrics")).text
    assert refused.status_code == 400
    assert "Cache-Control" in refused.json()["error"]["message"]
    assert metric(metrics, "vcache_bypassed_total") == 3


# --- logs --------------------------------------------------------------------------------------


async def test_json_logs_and_no_http_library_lines(tmp_path: Path) -> None:
    """--log-format json: one object per line, the request line's fields as keys; httpx's own
    per-request INFO lines (`HTTP Request: POST ...`) are gone (regression: they were mixed in)."""
    async with FaultUpstream(packages=True) as fake:
        proxy = ProxyProcess(
            ["--upstream", fake.url, "--store", str(tmp_path / "s"), "--log-format", "json"],
            tmp_path / "proxy.log",
        )
        await asyncio.to_thread(proxy.start)
        try:
            async with httpx.AsyncClient(timeout=30) as client:
                r = await client.post(
                    f"{proxy.base_url}{CHAT}",
                    json=chat(image=png(1)),
                    headers={"X-Request-Id": "r1"},
                )
            assert r.status_code == 200
        finally:
            await asyncio.to_thread(proxy.stop)
    lines = [ln for ln in proxy.log().splitlines() if ln and not ln.startswith("vcache: serving")]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    [access] = [r for r in records if r.get("rid") == "r1"]
    assert access["method"] == "POST" and access["path"] == CHAT and access["status"] == 200
    assert "misses=1" in access["note"]
    assert not [r for r in records if r["logger"].startswith(("httpx", "httpcore", "aiohttp"))]
