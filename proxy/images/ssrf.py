"""Which URLs and addresses the media loader may fetch: the SSRF policy, without I/O.

A client names an image by URL and the proxy fetches it, so every URL is a request the
client makes *from inside our network*. This module decides, from the URL and the
addresses alone, whether such a request may go out; `proxy.images.media` does the resolving and
the connecting, and connects only to addresses this module has passed.

* `check_url` parses a URL the way the fetcher will (yarl, the parser aiohttp itself
  uses, so checker and fetcher cannot disagree on the host) and refuses schemes other
  than http/https, credentials, malformed hosts, and IP literals that are not public.
* `parse_host_address` reads a host the way ``inet_aton`` would: ``2130706433``,
  ``0177.0.0.1``, ``0x7f.1`` and ``127.1`` all denote 127.0.0.1. `check_url` refuses every
  such non-canonical spelling, even of a public address: no legitimate client writes
  them, and refusing them means no parser downstream ever has to agree with ours.
* `is_public_address` / `why_not_public` hold the address table below. The table is
  ours, not `ipaddress.is_global`: that attribute changed between Python patch releases
  (3.11.10, 3.12.4), and a security boundary must not move with the interpreter.

Not public (refused unless ``FetchPolicy.allow_private``):

* IPv4: 0/8 (incl. 0.0.0.0), 10/8, 100.64/10 (CGNAT), 127/8, 169.254/16 (link-local,
  incl. the 169.254.169.254 metadata service), 172.16/12, 192.0.0/24, 192.0.2/24,
  192.88.99/24, 192.168/16, 198.18/15, 198.51.100/24, 203.0.113/24, 224/4 (multicast),
  240/4 (reserved, incl. 255.255.255.255).
* IPv6: everything outside global unicast 2000::/3 (so ::, ::1, IPv4-compatible ::/96,
  fc00::/7, fe80::/10, fec0::/10, ff00::/8, 64:ff9b:1::/48, 100::/64 ...), and inside it
  2001::/23, 2001:db8::/32, 3fff::/20, 5f00::/16.
* IPv6 forms that carry an IPv4 address are judged by that address: IPv4-mapped
  ::ffff:0:0/96, NAT64 64:ff9b::/96, 6to4 2002::/16, and Teredo 2001::/32 (server and
  client both). ``::ffff:127.0.0.1`` is loopback; ``64:ff9b::8.8.8.8`` is public.
"""

from __future__ import annotations

import dataclasses
import re
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from pathlib import Path

from yarl import URL

from proxy.errors import MediaNotAllowed, shorten

__all__ = [
    "FetchPolicy",
    "IPAddress",
    "check_url",
    "is_public_address",
    "parse_host_address",
    "why_not_public",
]

IPAddress = IPv4Address | IPv6Address


@dataclasses.dataclass(frozen=True)
class FetchPolicy:
    """What `proxy.images.media.MediaLoader` may load, and how much of it.

    Usage::

        >>> policy = FetchPolicy(max_bytes=5 * 1024 * 1024, media_root=Path("/srv/images"))
        >>> policy.allow_private, policy.max_redirects
        (False, 5)
        >>> dataclasses.replace(policy, timeout_s=2.5).timeout_s
        2.5

    * ``allow_private``: also fetch from loopback, private, link-local and other non-public
      addresses (see the module docstring). Off by default; turn it on only when every
      client is trusted, e.g. an image server on the same host.
    * ``max_bytes``: cap for one image, decoded; enforced while reading.
    * ``timeout_s``: total time for one http(s) fetch: resolving, connecting, every
      redirect and the whole body.
    * ``max_redirects``: redirects followed per fetch; each target is checked again.
    * ``media_root``: ``file://`` references load only below this directory (like
      llama-server's ``--media-path``); ``None`` refuses them all.
    """

    allow_private: bool = False
    max_bytes: int = 20 * 1024 * 1024
    timeout_s: float = 10.0
    max_redirects: int = 5
    media_root: Path | None = None

    def __post_init__(self) -> None:
        if self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, not {self.max_bytes}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, not {self.timeout_s}")
        if self.max_redirects < 0:
            raise ValueError(f"max_redirects must be >= 0, not {self.max_redirects}")


# (network, what it is) pairs; the label goes into the error message the client sees.
_V4_NOT_PUBLIC: tuple[tuple[IPv4Network, str], ...] = tuple(
    (IPv4Network(net), label)
    for net, label in (
        ("0.0.0.0/8", "an unspecified ('this network') address"),
        ("10.0.0.0/8", "a private address"),
        ("100.64.0.0/10", "a shared (CGNAT) address"),
        ("127.0.0.0/8", "a loopback address"),
        ("169.254.0.0/16", "a link-local address"),  # incl. cloud metadata 169.254.169.254
        ("172.16.0.0/12", "a private address"),
        ("192.0.0.0/24", "an IETF protocol address"),
        ("192.0.2.0/24", "a documentation address"),
        ("192.88.99.0/24", "a 6to4 relay address"),
        ("192.168.0.0/16", "a private address"),
        ("198.18.0.0/15", "a benchmarking address"),
        ("198.51.100.0/24", "a documentation address"),
        ("203.0.113.0/24", "a documentation address"),
        ("224.0.0.0/4", "a multicast address"),
        ("240.0.0.0/4", "a reserved address"),  # incl. broadcast 255.255.255.255
    )
)

# Only global unicast is public; the labels name the common blocks outside it.
_V6_GLOBAL_UNICAST = IPv6Network("2000::/3")
_V6_OUTSIDE_LABELS: tuple[tuple[IPv6Network, str], ...] = tuple(
    (IPv6Network(net), label)
    for net, label in (
        ("::/128", "an unspecified address"),
        ("::1/128", "a loopback address"),
        ("::/96", "a deprecated IPv4-compatible address"),
        ("fc00::/7", "a unique-local (private) address"),
        ("fe80::/10", "a link-local address"),
        ("ff00::/8", "a multicast address"),
    )
)
_V6_NOT_PUBLIC: tuple[tuple[IPv6Network, str], ...] = tuple(
    (IPv6Network(net), label)
    for net, label in (
        ("2001::/23", "an IETF protocol address"),
        ("2001:db8::/32", "a documentation address"),
        ("3fff::/20", "a documentation address"),
        ("5f00::/16", "a segment-routing address"),
    )
)
_NAT64 = IPv6Network("64:ff9b::/96")
_TEREDO = IPv6Network("2001::/32")


def why_not_public(ip: IPAddress) -> str | None:
    """Say why `ip` is not a public address (e.g. "a loopback address"), or None if it is.

    >>> why_not_public(ip_address("169.254.169.254"))
    'a link-local address'
    >>> why_not_public(ip_address("8.8.8.8")) is None
    True
    """
    if isinstance(ip, IPv4Address):
        return _v4_reason(ip)
    return _v6_reason(ip)


def is_public_address(ip: IPAddress) -> bool:
    """True if `ip` may be fetched from without ``allow_private`` (see the module docstring)."""
    return why_not_public(ip) is None


def _v4_reason(ip: IPv4Address) -> str | None:
    return next((label for net, label in _V4_NOT_PUBLIC if ip in net), None)


def _v6_reason(ip: IPv6Address) -> str | None:
    embedded = _embedded_ipv4(ip)
    if embedded:
        # Connecting to these reaches (or is routed by) the IPv4 address inside, so the
        # IPv4 address decides. _v4_reason, not why_not_public: one table, one answer.
        for v4 in embedded:
            reason = _v4_reason(v4)
            if reason is not None:
                return f"an IPv6 address embedding {v4}, {reason}"
        return None
    if ip not in _V6_GLOBAL_UNICAST:
        labels = (label for net, label in _V6_OUTSIDE_LABELS if ip in net)
        return next(labels, "a non-global IPv6 address")
    return next((label for net, label in _V6_NOT_PUBLIC if ip in net), None)


def _embedded_ipv4(ip: IPv6Address) -> tuple[IPv4Address, ...]:
    if ip.ipv4_mapped is not None:
        return (ip.ipv4_mapped,)
    if ip in _NAT64:
        return (IPv4Address(int(ip) & 0xFFFFFFFF),)
    if ip.sixtofour is not None:
        return (ip.sixtofour,)
    if ip in _TEREDO and ip.teredo is not None:
        return ip.teredo  # (server, client): refuse if either is not public
    return ()


_HEX_PART = re.compile(r"0[xX][0-9a-fA-F]*")
_OCTAL_PART = re.compile(r"0[0-7]+")
_DECIMAL_PART = re.compile(r"0|[1-9][0-9]*")
_HOSTNAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?")


def parse_host_address(host: str) -> IPAddress | None:
    """The IP address a URL host denotes, None if it is a DNS name.

    IPv4 is read with ``inet_aton`` semantics (1 to 4 parts, each decimal, octal with a
    leading 0 or hex with 0x; the last part fills the remaining bytes; one trailing dot
    allowed), because that is how the C resolver would read it. IPv6 may be bracketed and
    carry a zone (``%25eth0`` as in URLs, or ``%eth0``).

    >>> [str(parse_host_address(h)) for h in ("2130706433", "0177.0.0.1", "0x7f.1", "127.1")]
    ['127.0.0.1', '127.0.0.1', '127.0.0.1', '127.0.0.1']
    >>> parse_host_address("images.example.com") is None
    True

    Raises ValueError when the host has the shape of an address but is not a valid one
    ("1.2.3.256", "08.1", "[::g]"): such a host is neither an address nor a DNS name.
    """
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host:
        return ip_address(host.replace("%25", "%", 1))
    parts = host.split(".")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()  # "127.0.0.1." is still 127.0.0.1 to the resolver
    if not _is_number(parts[-1]):
        return None
    return _parse_ipv4(parts, host)


def _is_number(part: str) -> bool:
    # The WHATWG "ends in a number" rule: a host whose last label is numeric is an IPv4
    # address or nothing, never a DNS name ("example.1" is refused, not resolved).
    return (part.isascii() and part.isdigit()) or _HEX_PART.fullmatch(part) is not None


def _parse_ipv4(parts: list[str], host: str) -> IPv4Address:
    if len(parts) > 4:
        raise ValueError(f"{host!r} has more than four IPv4 parts")
    numbers = [_ipv4_number(part, host) for part in parts]
    *leading, last = numbers
    if any(n > 0xFF for n in leading) or last >= 256 ** (5 - len(numbers)):
        raise ValueError(f"{host!r} has an IPv4 part out of range")
    value = last
    for i, n in enumerate(leading):
        value += n << (8 * (3 - i))
    return IPv4Address(value)


def _ipv4_number(part: str, host: str) -> int:
    if _HEX_PART.fullmatch(part):
        return int(part[2:] or "0", 16)  # a bare "0x" is 0, as inet_aton reads it
    if _OCTAL_PART.fullmatch(part):
        return int(part, 8)
    if _DECIMAL_PART.fullmatch(part):
        return int(part)
    raise ValueError(f"{host!r} is not a valid IPv4 address")


def check_url(url: str | URL, policy: FetchPolicy) -> URL:
    """Parse an http(s) URL the client named and refuse what the policy does not allow.

    Returns the parsed URL: pass *that* object to the fetcher, never the string again, so
    the host that was checked is the host that is fetched. Refuses (MediaNotAllowed) other
    schemes, user names and passwords in the URL (refused rather than stripped: a URL
    like ``http://cdn.example@internal/`` is a trick, not a request to honour), malformed
    hosts, non-canonical IPv4 spellings, and IP literals that are not public unless
    ``policy.allow_private``. DNS names pass; `proxy.images.media` vets what they resolve to.
    A URL that cannot be parsed, or has no host, is refused too (MediaNotAllowed, not a
    plain MediaError): what we cannot parse, no other parser (upstream's) may fetch.

    >>> str(check_url("https://cdn.example.com/cat.png", FetchPolicy()))
    'https://cdn.example.com/cat.png'
    """
    parsed = _parse_url(url)
    shown = shorten(str(_without_credentials(parsed)))  # never echo a password
    if parsed.scheme not in ("http", "https"):
        raise MediaNotAllowed(f"{shown}: scheme {parsed.scheme!r} is not allowed (http, https)")
    if parsed.raw_user is not None or parsed.raw_password is not None:
        raise MediaNotAllowed(f"{shown}: URLs with credentials are not allowed")
    host = parsed.raw_host
    if not host:
        raise MediaNotAllowed(f"{shown}: the URL has no host")
    _check_host(host, shown, policy)
    return parsed


def _parse_url(url: str | URL) -> URL:
    if isinstance(url, URL):
        return url
    try:
        return URL(url)
    except (ValueError, TypeError) as exc:  # yarl: bad port, bad IPv6 literal, ...
        raise MediaNotAllowed(f"{shorten(url)}: not a valid URL") from exc


def _without_credentials(url: URL) -> URL:
    if url.raw_user is None and url.raw_password is None:
        return url
    return url.with_user(None)  # drops the password too


def _check_host(host: str, shown: str, policy: FetchPolicy) -> None:
    if len(host) > 254:  # the DNS limit (253, plus a trailing dot)
        raise MediaNotAllowed(f"{shown}: the host name is too long")
    try:
        ip = parse_host_address(host)
    except ValueError as exc:
        raise MediaNotAllowed(f"{shown}: host {host!r} is not a valid address") from exc
    if ip is None:
        if not _HOSTNAME.fullmatch(host):
            raise MediaNotAllowed(f"{shown}: host {host!r} is not a valid host name")
        return
    reason = why_not_public(ip)
    if reason is not None and not policy.allow_private:
        raise MediaNotAllowed(f"{shown}: {ip} is {reason}, not a public address")
    if ":" not in host and host != str(ip):
        raise MediaNotAllowed(f"{shown}: {host!r} is a non-canonical spelling of {ip}")
