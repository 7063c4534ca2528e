"""Turn an image reference from a client request into image bytes, safely.

A reference is what a client put where llama-server takes an image (``image_url.url``, an
element of ``multimodal_data``, an Anthropic ``source.data``). `MediaLoader.load` takes:

=================  ====================================  ==========  =========================
form               example                               origin      notes
=================  ====================================  ==========  =========================
data URI           ``data:image/png;base64,iVBOR...``    "data-uri"  image/* and base64 only
raw base64         ``iVBORw0KGgo...``                    "base64"    strict decoding
http(s) URL        ``https://cdn.example.com/cat.png``   "http"      public addresses only
file URL           ``file://cats/tabby.png``             "file"      below ``media_root`` only
=================  ====================================  ==========  =========================

Anything else (``gopher:``, ``ftp:``, ``javascript:``, ``ws:``, ``vcache:`` ...) is
MediaNotAllowed, and so is every http(s) reference we refuse or cannot parse, including
text that merely starts with "http" (llama-server would try to download it): a plain
MediaError means "undecodable here", which a caller may leave to upstream, and no URL may
reach upstream's fetcher, which has no SSRF guard. Where we differ from llama-server:

* base64: llama-server's decoder stops at the first character outside the alphabet and
  needs no padding. Ours (pybase64, validating) refuses whitespace, URL-safe ``-_``,
  missing, misplaced or excess padding and trailing data: an input llama-server would decode
  only a prefix of is refused with a message instead of encoded as some other image.
* data URIs: ``data:``, the media type and ``;base64`` match case-insensitively
  (llama-server: exactly ``data:image/``, ``data:audio/`` or ``data:video/``).
  ``data:video/...`` is MediaError: video has no package, so there is nothing to cache.
* file URLs mean what ``--media-path`` makes them mean: the text after ``file://`` is a
  path relative to ``media_root``, not percent-decoded (so ``file:///etc/passwd`` is an
  absolute path, refused).

How an http(s) fetch stays on addresses the policy allows (`proxy.images.ssrf` holds the policy):

1. `ssrf.check_url` parses the URL with yarl, the parser aiohttp uses, and the parsed
   object is what is fetched. It refuses schemes, credentials and IP literals.
2. A DNS name is resolved once per hop, here; every address must pass, or the fetch is
   refused (one private answer among public ones is how rebinding attacks start).
3. aiohttp connects through `PinnedResolver`, which answers only with the addresses
   vetted in step 2 for this hop (a ContextVar carries them, so concurrent loads never see
   each other's) and refuses any other name. IP literals never reach a resolver: aiohttp
   connects to the literal that step 1 passed.
4. Redirects are followed here, by hand; every target goes through steps 1 to 3 again, so a
   redirect to ``file://``, ``gopher://`` or 10.0.0.1 is refused like a first request.
5. No proxy from the environment, no cookies kept, no connection reused: every connection
   is made right after its own check.
6. One deadline (``timeout_s``) covers resolving, connecting, every redirect and the whole
   body, so a server dripping one byte a second cannot hold a request. ``max_bytes`` is
   checked against Content-Length first, then against what actually arrives, per chunk.
7. ``Accept-Encoding: identity``, and a compressed answer is refused: nothing a remote
   server sends is ever decompressed here (no decompression bombs).

Every failure is a `proxy.errors.MediaError` (or subclass); aiohttp errors, OSError and
timeouts are translated here, with messages that name the reference and the reason only.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import errno
import os
import re
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import ip_address
from pathlib import Path
from types import TracebackType
from typing import Self

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from proxy.errors import MediaError, MediaFetchFailed, MediaNotAllowed, MediaTooLarge, shorten
from proxy.images import ssrf
from proxy.images.image_bytes import MEDIA_TYPE, ImageBytes, read_reference
from proxy.images.json_body import Span
from proxy.images.ssrf import FetchPolicy, IPAddress

__all__ = ["SCHEME", "FetchPolicy", "Media", "MediaLoader", "is_locator", "vet_url"]

# a URI scheme; base64 has no ':', so inline bytes never match
SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024
_FILE_CHUNK = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Media:
    """The bytes of one image, and what its source said about them.

    ``mime`` is the data URI's media type or the response's Content-Type, lowercase and
    without parameters, None when unknown (raw base64, file URLs). It is a claim of the
    source, not a check of the bytes. ``origin`` is "data-uri", "base64", "http" or "file".
    """

    data: bytes = dataclasses.field(repr=False)  # a repr of megabytes helps nobody
    mime: str | None
    origin: str


def is_locator(ref: str) -> bool:
    """Anything but inline bytes (a data URI, base64) and vcache:// names: a URL or a path.

    These are loaded here, under the fetch policy, which refuses every scheme but http(s) and
    file (and, like llama-server, takes whatever starts with "http" for a URL). Upstream must
    never be handed one: its fetcher has no SSRF guard."""
    scheme = SCHEME.match(ref)
    return ref[:4].lower() == "http" or (
        scheme is not None and scheme.group(1).lower() not in ("data", "vcache")
    )


class MediaLoader:
    """Loads image references under one `FetchPolicy`.

    Usage::

        async with MediaLoader(FetchPolicy(max_bytes=8 * 1024 * 1024)) as loader:
            media = await loader.load("https://cdn.example.com/cat.png")

    One loader serves any number of concurrent loads. Its HTTP session opens on the first
    http(s) load and closes with `aclose` (or the ``async with`` block).
    """

    def __init__(self, policy: FetchPolicy) -> None:
        self._policy = policy
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def inline(self, ref: Span | str) -> ImageBytes:
        """The image a data URI or bare base64 holds, read where it lies (a `Span` of the
        request body, or a string): hashed in pieces, never held decoded. Slow on megabytes
        (a worker thread's job). Raises MediaTooLarge or MediaError, as `load` does."""
        if self._closed:
            raise RuntimeError("MediaLoader is closed")
        return read_reference(ref, self._policy.max_bytes)

    def leaves_to_upstream(self, ref: str) -> bool:
        """Whether `ref` is a file URL this loader cannot read, for lack of a media directory.

        In front of a llama-server started with ``--media-path``, file URLs mean files below
        that directory, and only upstream knows which: such a URL is forwarded as it came, so
        upstream applies its own rule, exactly as it would to the request sent direct. The
        image is then not cached (the proxy never sees its bytes); giving the proxy the same
        ``--media-path`` (managed mode takes it from llama-server's arguments) caches it.
        """
        return self._policy.media_root is None and ref[:7].lower() == "file://"

    async def load(self, ref: str) -> Media:
        """The image `ref` names: a data URI, raw base64, an http(s) URL or a file URL.

        Raises MediaNotAllowed (refused by policy), MediaTooLarge (over ``max_bytes``),
        MediaFetchFailed (network error, timeout, non-2xx answer) or MediaError (anything
        else unusable), and nothing else for any input.
        """
        if self._closed:
            raise RuntimeError("MediaLoader is closed")
        if not ref:
            raise MediaError("empty image reference")
        match = SCHEME.match(ref)
        if match is None and ref[:4].lower() == "http":
            # llama-server downloads anything that starts with "http"; a plain MediaError
            # would leave this to upstream's unguarded fetcher (the package lookup does so).
            raise MediaNotAllowed(f"{shorten(ref)}: not a valid http(s) URL")
        if match is None:
            return _load_inline(ref, self._policy.max_bytes, "base64")
        scheme = match.group(1).lower()
        if scheme == "data":
            return _load_inline(ref, self._policy.max_bytes, "data-uri")
        if scheme in ("http", "https"):
            return await self._load_http(ref)
        if scheme == "file":
            return await _load_file(ref, self._policy)
        raise MediaNotAllowed(
            f"{shorten(ref)}: scheme {scheme!r} is not allowed (data, http, https, file)"
        )

    async def aclose(self) -> None:
        """Close the HTTP session, if one was opened. Safe to call more than once."""
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _load_http(self, ref: str) -> Media:
        url = vet_url(ref, self._policy)
        shown = shorten(str(url))
        try:
            async with asyncio.timeout(self._policy.timeout_s):
                return await self._follow(url)
        except TimeoutError as exc:  # also aiohttp's ServerTimeoutError
            raise MediaFetchFailed(
                f"{shown}: no complete answer within {self._policy.timeout_s:g} s"
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise MediaFetchFailed(f"{shown}: {_describe(exc)}") from exc

    async def _follow(self, url: URL) -> Media:
        first = shorten(str(url))
        via: URL | None = None  # the URL that redirected here, for messages
        for _ in range(self._policy.max_redirects + 1):
            addresses = await _vetted_addresses(url, self._policy, via)
            with pinned(url, addresses):
                async with self._client().get(url, allow_redirects=False) as resp:
                    target = _redirect_target(resp, url, self._policy)
                    if target is None:
                        return await _media_from(resp, url, self._policy.max_bytes)
            via, url = url, target
        raise MediaFetchFailed(f"{first}: more than {self._policy.max_redirects} redirects")

    def _client(self) -> aiohttp.ClientSession:
        # Opened on first use: a session needs a running loop, and a loader that only ever
        # sees data URIs never needs one.
        if self._session is None:
            connector = aiohttp.TCPConnector(
                resolver=PinnedResolver(),
                use_dns_cache=False,  # a cached answer would outlive the hop it was vetted for
                force_close=True,  # no reuse: each connection follows its own check
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),  # one site's cookies never reach another
                trust_env=False,  # an HTTP(S)_PROXY would connect for us, to unchecked addresses
                auto_decompress=False,  # see Accept-Encoding: we never inflate remote data
                headers={
                    "Accept": "image/*, audio/*",
                    "Accept-Encoding": "identity",
                    "User-Agent": "vcache",
                },
            )
        return self._session


# --- data URIs and base64 ----------------------------------------------------------------


def _load_inline(ref: str, max_bytes: int, origin: str) -> Media:
    image = read_reference(ref, max_bytes)
    return Media(image.data(), image.mime, origin)


# --- http(s): the guard ------------------------------------------------------------------


async def _vetted_addresses(
    url: URL, policy: FetchPolicy, via: URL | None
) -> tuple[IPAddress, ...]:
    """The addresses this hop may connect to; refuses the hop if any is not allowed."""
    host = url.raw_host
    assert host is not None  # check_url refused URLs without a host
    literal = ssrf.parse_host_address(host)
    if literal is not None:
        return (literal,)  # check_url vetted it, and aiohttp connects to it as written
    addresses = await resolve_name(host, url.port or 0)
    if not policy.allow_private:
        for ip in addresses:
            reason = ssrf.why_not_public(ip)
            if reason is not None:
                where = f"redirect from {shorten(str(via))}: " if via is not None else ""
                raise MediaNotAllowed(
                    f"{where}{shorten(str(url))}: {host} resolves to {ip}, {reason}"
                )
    return addresses


async def resolve_name(host: str, port: int) -> tuple[IPAddress, ...]:
    """Every address the system resolver gives for `host`: the guard's one lookup a hop."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:  # socket.gaierror is an OSError
        raise MediaFetchFailed(f"cannot resolve host {host!r}") from exc
    found: dict[IPAddress, None] = {}  # a dict keeps the resolver's order, without repeats
    for family, _, _, _, sockaddr in infos:
        if family == socket.AF_INET6 and len(sockaddr) == 4 and sockaddr[3]:
            found[ip_address(f"{sockaddr[0]}%{sockaddr[3]}")] = None  # keep the scope id
        elif family in (socket.AF_INET, socket.AF_INET6):
            found[ip_address(sockaddr[0])] = None
    if not found:
        raise MediaFetchFailed(f"host {host!r} has no IPv4 or IPv6 address")
    return tuple(found)


@dataclasses.dataclass(frozen=True)
class _Pin:
    host: str
    addresses: tuple[IPAddress, ...]


_PIN: contextvars.ContextVar[_Pin | None] = contextvars.ContextVar("vcache_pin", default=None)


@contextmanager
def pinned(url: URL, addresses: tuple[IPAddress, ...]) -> Iterator[None]:
    assert url.raw_host is not None
    token = _PIN.set(_Pin(_host_key(url.raw_host), addresses))
    try:
        yield
    finally:
        _PIN.reset(token)


def _host_key(host: str) -> str:
    # aiohttp folds trailing dots ("a.." -> "a.") before it resolves; compare without them.
    return host.rstrip(".").lower()


class PinnedResolver(AbstractResolver):
    """aiohttp's only resolver: the addresses vetted for the current hop, nothing else."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        pin = _PIN.get()
        if pin is None or pin.host != _host_key(host):
            # Cannot happen while the guard runs first; if it ever does, fail closed
            # rather than look the name up unchecked.
            raise OSError(errno.EACCES, f"{host!r} was not vetted")
        return [
            _resolve_result(host, ip, port)
            for ip in pin.addresses
            if family in (socket.AF_UNSPEC, _family(ip))
        ]

    async def close(self) -> None:
        return None


def _family(ip: IPAddress) -> socket.AddressFamily:
    return socket.AF_INET if ip.version == 4 else socket.AF_INET6


def _resolve_result(host: str, ip: IPAddress, port: int) -> ResolveResult:
    return {
        "hostname": host,
        "host": str(ip),
        "port": port,
        "family": _family(ip),
        "proto": 0,
        "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
    }


# --- http(s): redirects and the body -----------------------------------------------------


def vet_url(url: str | URL, policy: FetchPolicy) -> URL:
    """`ssrf.check_url`, with whatever the URL parser raises taken as a refusal.

    yarl fails on some malformed URLs with errors other than ValueError ("http://[x]@//"
    raised IndexError: found by fuzz/fuzz_requests.py), and what cannot be parsed is not
    fetched; without this the request failed with a 500.
    """
    try:
        return ssrf.check_url(url, policy)
    except MediaError:
        raise
    except Exception as exc:  # the parser's bugs, translated at the boundary
        raise MediaNotAllowed(f"{shorten(str(url))}: not a valid URL") from exc


def _redirect_target(resp: aiohttp.ClientResponse, url: URL, policy: FetchPolicy) -> URL | None:
    """The checked URL a redirect points to, or None if `resp` is not a redirect."""
    if resp.status not in _REDIRECTS:
        return None
    shown = shorten(str(url))
    location = resp.headers.get("Location")
    if not location:
        raise MediaFetchFailed(f"{shown}: HTTP {resp.status} without a Location")
    try:
        target = url.join(URL(location)).with_fragment(None)
    except Exception as exc:  # yarl's own failures too (IndexError): see vet_url
        raise MediaFetchFailed(f"{shown}: redirect to a malformed URL") from exc
    try:
        return vet_url(target, policy)
    except MediaError as exc:
        # Same class (a refused redirect is a refusal), and say it came from a redirect.
        raise type(exc)(f"redirect from {shown}: {exc.message}") from exc


async def _media_from(resp: aiohttp.ClientResponse, url: URL, max_bytes: int) -> Media:
    shown = shorten(str(url))
    if not 200 <= resp.status < 300:
        raise MediaFetchFailed(f"{shown}: the server answered HTTP {resp.status}")
    encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding != "identity":
        raise MediaFetchFailed(f"{shown}: the body is {encoding!r}-encoded; only identity is")
    data = await _read_capped(resp, max_bytes, shown)
    if not data:
        raise MediaFetchFailed(f"{shown}: the answer has an empty body")
    return Media(data, _mime(resp.headers.get("Content-Type")), "http")


async def _read_capped(resp: aiohttp.ClientResponse, max_bytes: int, shown: str) -> bytes:
    declared = resp.content_length
    if declared is not None and declared > max_bytes:
        raise MediaTooLarge(f"{shown}: Content-Length {declared} is over the {max_bytes}-byte cap")
    # Content-Length is a claim, not a limit, and chunked bodies have none: count what
    # arrives, chunk by chunk, and stop as soon as it is too much.
    body = bytearray()
    async for chunk in resp.content.iter_chunked(_CHUNK):
        body += chunk
        if len(body) > max_bytes:
            raise MediaTooLarge(f"{shown}: the body is over the {max_bytes}-byte cap")
    return bytes(body)


def _mime(content_type: str | None) -> str | None:
    mime = (content_type or "").split(";")[0].strip().lower()
    return mime if MEDIA_TYPE.fullmatch(mime) else None


# aiohttp's own messages name our resolver, sockets and addresses; the client gets these.
_ERROR_TEXT: tuple[tuple[type[BaseException], str], ...] = (
    (aiohttp.ClientConnectorCertificateError, "the server's TLS certificate was not accepted"),
    (aiohttp.ClientSSLError, "the TLS handshake failed"),
    (aiohttp.ClientConnectorError, "cannot connect to the server"),
    (aiohttp.ServerDisconnectedError, "the server closed the connection early"),
    (aiohttp.ClientPayloadError, "the body was cut short or malformed"),
    (aiohttp.ClientResponseError, "the answer is not valid HTTP"),
)


def _describe(exc: BaseException) -> str:
    return next((text for cls, text in _ERROR_TEXT if isinstance(exc, cls)), "the fetch failed")


# --- file URLs ---------------------------------------------------------------------------

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO must not wait for a writer; fstat refuses it right after.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


async def _load_file(ref: str, policy: FetchPolicy) -> Media:
    shown = shorten(ref)
    if policy.media_root is None:
        raise MediaNotAllowed(f"{shown}: file URLs are off (no media directory is configured)")
    if ref[: len("file://")].lower() != "file://":
        raise MediaError(f"{shown}: a file URL is file://<path below the media directory>")
    parts = _relative_parts(ref[len("file://") :], shown)
    try:
        data = await asyncio.to_thread(_read_below, policy.media_root, parts, policy, shown)
    except OSError as exc:  # whatever _read_below did not name more precisely
        raise MediaError(f"{shown}: cannot be read") from exc
    return Media(data, None, "file")


def _relative_parts(path: str, shown: str) -> tuple[str, ...]:
    if "\x00" in path:
        raise MediaNotAllowed(f"{shown}: the path has a NUL byte")
    if path.startswith("/"):
        raise MediaNotAllowed(f"{shown}: the path must be relative to the media directory")
    parts = tuple(part for part in path.split("/") if part not in ("", "."))
    if ".." in parts:
        raise MediaNotAllowed(f"{shown}: '..' is not allowed in the path")
    if not parts:
        raise MediaError(f"{shown}: no file named")
    return parts


def _read_below(root: Path, parts: tuple[str, ...], policy: FetchPolicy, shown: str) -> bytes:
    """Read root/parts, which must be a regular file that is below root once resolved."""
    real_root = os.path.realpath(root)
    # realpath follows symlinks, including ones inside the root: only where they end counts.
    target = os.path.realpath(os.path.join(real_root, *parts))
    if os.path.commonpath([real_root, target]) != real_root or target == real_root:
        raise MediaNotAllowed(f"{shown}: the path leads out of the media directory")
    fd = open_regular(real_root, Path(target).relative_to(real_root).parts, shown)
    try:
        return _read_fd(fd, policy.max_bytes, shown)
    finally:
        os.close(fd)


def open_regular(real_root: str, parts: tuple[str, ...], shown: str) -> int:
    try:
        fd = _open_nofollow(real_root, parts)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise MediaError(f"{shown}: no such file in the media directory") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symlink appeared after realpath: a swap, refuse it
            raise MediaNotAllowed(f"{shown}: the path changed while it was opened") from exc
        raise MediaError(f"{shown}: cannot be opened") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise MediaNotAllowed(f"{shown}: not a regular file")
    return fd


def _open_nofollow(real_root: str, parts: tuple[str, ...]) -> int:
    """Open real_root/parts one component at a time, following no symlink (ELOOP).

    `parts` come from realpath and hold no symlink. One found now was swapped in after the
    containment check; O_NOFOLLOW at every step refuses it instead of following it out.
    """
    fd = os.open(real_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            next_fd = _open_dir_nofollow(part, fd)
            os.close(fd)
            fd = next_fd
        return os.open(parts[-1], _FILE_FLAGS, dir_fd=fd)
    finally:
        os.close(fd)


def _open_dir_nofollow(name: str, dir_fd: int) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except NotADirectoryError:
        # Linux answers ENOTDIR, not ELOOP, for a symlink opened O_DIRECTORY | O_NOFOLLOW.
        if stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            raise OSError(errno.ELOOP, "symbolic link in the path", name) from None
        raise


def _read_fd(fd: int, max_bytes: int, shown: str) -> bytes:
    if os.fstat(fd).st_size > max_bytes:
        raise MediaTooLarge(f"{shown}: the file is over the {max_bytes}-byte cap")
    data = bytearray()
    # Never read more than one byte past the cap: the file may grow while we read.
    while chunk := os.read(fd, min(_FILE_CHUNK, max_bytes + 1 - len(data))):
        data += chunk
        if len(data) > max_bytes:
            raise MediaTooLarge(f"{shown}: the file is over the {max_bytes}-byte cap")
    if not data:
        raise MediaError(f"{shown}: the file is empty")
    return bytes(data)
