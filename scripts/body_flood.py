"""Memory under a flood of huge bodies: many clients at once, each sending a body of base64.

Starts `vcache serve --max-body-mb LIMIT` in front of the fault upstream (tests/
fault_upstream.py, as a patched or a stock server), waits until it idles, then has CLIENTS
clients each POST a chat request whose one image is a data URI of SIZE MB of base64, all at
once (with Content-Length, or chunked). Samples the proxy's resident memory every 20 ms and
reports its peak above the idle value, which must stay under twice LIMIT: the proxy holds at
most LIMIT of request bodies at once (proxy/budget.py), and parsing one costs about as much
again.

    python -m scripts.body_flood                                  # 50 x 100 MB, limit 100 MiB
    python -m scripts.body_flood --chunked --upstream stock       # the other paths
    python -m scripts.body_flood --clients 8 --size-mb 6 --limit-mb 8   # the test's size
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from tests.support.fault_upstream import FaultUpstream
from tests.support.proxy_process import ProxyProcess

ROOT = Path(__file__).resolve().parent.parent

MB = 1_000_000
MIB = 1024 * 1024
HEAD = (
    b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": '
    b'{"url": "data:image/png;base64,'
)
TAIL = b'"}}]}]}'
PIECE = b"A" * (1 << 20)


@dataclasses.dataclass
class Flood:
    clients: int
    size_mb: float
    limit_mib: int
    chunked: bool
    upstream: str
    statuses: dict[str, int]
    idle_rss_mib: float
    peak_rss_mib: float
    peak_growth_mib: float
    growth_over_limit: float  # peak growth / limit: must stay under 2
    seconds: float


def rss(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for {pid}")


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux 4.0+)


async def body(size: int) -> AsyncIterator[bytes]:
    yield HEAD
    left = size - len(HEAD) - len(TAIL)
    while left > 0:
        yield PIECE[: min(left, len(PIECE))]
        left -= len(PIECE)
    yield TAIL


async def send(
    session: aiohttp.ClientSession, size: int, chunked: bool, statuses: collections.Counter[str]
) -> None:
    headers = {"Content-Type": "application/json"}
    if not chunked:
        headers["Content-Length"] = str(size)
    try:
        async with session.post("/v1/chat/completions", data=body(size), headers=headers) as r:
            await r.read()
            statuses[str(r.status)] += 1
    except aiohttp.ClientError as e:  # the proxy may close on a refused body: say so
        statuses[type(e).__name__] += 1


async def sample(pid: int, peak: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], rss(pid))
        await asyncio.sleep(0.02)


async def flood(
    clients: int, size_mb: float, limit_mib: int, chunked: bool, upstream: str
) -> Flood:
    size = int(size_mb * MB)
    with tempfile.TemporaryDirectory(prefix="vcache-flood-") as tmp:
        async with FaultUpstream(packages=upstream == "patched") as fake:
            # the image cap below the body size: the image is refused unread, as a 100 MB
            # one is under the default 20 MiB cap
            proxy = ProxyProcess(
                [
                    "--upstream",
                    fake.url,
                    "--store",
                    f"{tmp}/store",
                    "--max-body-mb",
                    str(limit_mib),
                    "--url-max-mb",
                    str(max(1, min(20, limit_mib // 4))),
                    "--log-level",
                    "warning",
                ],
                Path(tmp) / "proxy.log",
            )
            await asyncio.to_thread(proxy.start)
            try:
                return await _measure(proxy, clients, size, limit_mib, chunked, upstream)
            finally:
                proxy.stop()


async def _measure(
    proxy: ProxyProcess, clients: int, size: int, limit_mib: int, chunked: bool, upstream: str
) -> Flood:
    assert proxy.proc is not None
    pid = proxy.proc.pid
    statuses: collections.Counter[str] = collections.Counter()
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(
        proxy.base_url, connector=connector, timeout=timeout
    ) as session:
        await send(session, 4096, False, collections.Counter())  # warm up every code path
        await asyncio.sleep(0.5)
        reset_peak(pid)
        idle, peak, stop = rss(pid), [0], asyncio.Event()
        sampler = asyncio.create_task(sample(pid, peak, stop))
        started = time.monotonic()
        await asyncio.gather(*(send(session, size, chunked, statuses) for _ in range(clients)))
        seconds = time.monotonic() - started
        stop.set()
        await sampler
    peak_bytes = max(peak[0], rss(pid, "VmHWM"))
    growth = (peak_bytes - idle) / MIB
    return Flood(
        clients,
        size / MB,
        limit_mib,
        chunked,
        upstream,
        dict(statuses),
        idle / MIB,
        peak_bytes / MIB,
        growth,
        growth / limit_mib,
        seconds,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--size-mb", type=float, default=100.0, help="each body, in MB (10^6)")
    parser.add_argument("--limit-mb", type=int, default=100, help="--max-body-mb, in MiB")
    parser.add_argument("--chunked", action="store_true", help="no Content-Length")
    parser.add_argument("--upstream", choices=["patched", "stock"], default="patched")
    args = parser.parse_args()
    result = asyncio.run(
        flood(args.clients, args.size_mb, args.limit_mb, args.chunked, args.upstream)
    )
    print(json.dumps(dataclasses.asdict(result), indent=2))
    return 0 if result.growth_over_limit < 2 else 1


if __name__ == "__main__":
    sys.exit(main())
