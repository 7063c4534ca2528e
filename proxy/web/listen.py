"""Where the app listens: one or several addresses, as llama-server's `--host` takes them.

`--host 127.0.0.1,::1` makes llama-server listen on both loopbacks; a drop-in front must take
the same value. `proxy.web.site.running_site` listens on them all (one port; with port 0, the
one the kernel chose for the first address). Parsed here without loading aiohttp: the command
line checks ``--host`` before anything starts.
"""

from __future__ import annotations


def parse_hosts(value: str) -> tuple[str, ...]:
    """`127.0.0.1,::1` -> ("127.0.0.1", "::1"); brackets around IPv6 addresses are dropped."""
    hosts = tuple(h.strip().removeprefix("[").removesuffix("]") for h in value.split(","))
    if not hosts or any(not h for h in hosts):
        raise ValueError(f"--host {value!r}: give one address, or several separated by commas")
    return hosts


def url_of(host: str, port: int) -> str:
    """The URL of `host`:`port` (an IPv6 address in brackets)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
