"""The side that faces llama-server: one pooled HTTP client, capability discovery, encodes.

The client is aiohttp's (`Upstream.session`): a relayed text request cost the proxy about
1.2 ms of CPU through httpx and 0.5 ms through aiohttp's client (its parser is C, and it does
without httpx's anyio cancellation scopes), the largest part of the proxy's own overhead.

Capabilities come from ``GET /props`` (``image_embedding``, see docs/wire-format.md) and are
cached for a short time, per model in router mode. They are read again after that time, after
an upstream restart, and whenever upstream refuses a package, so a server swapped for a stock
one (or the reverse) is noticed without restarting the proxy. When packages are off,
`Capabilities.reason` says why and what fixes it, and each change of that state is logged.

Readiness (`Upstream.probe`) is upstream's own ``GET /health``: 200 ready, 503 loading its
model, no answer unreachable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import aiohttp
import orjson
from aiohttp.client_proto import ResponseHandler
from yarl import URL

from proxy.errors import UpstreamError, UpstreamTimeout
from proxy.images.image_bytes import ImageBytes
from proxy.images.modality import Modality
from vision_cache.client.admin_api import error_message
from vision_cache.data_uri import data_uri_bytes
from vision_cache.errors import PackageError
from vision_cache.keys import Namespace
from vision_cache.package import FORMAT_VERSION, PackageHeader, parse_inline

CAPS_TTL_S = 10.0
KEEPALIVE_S = 2.0  # cpp-httplib's keep-alive timeout, llama-server's, is 5 s
PROBE_TIMEOUT_S = 5.0
# a miss goes upstream raw with this request header; the answer's EXPORTED header names the
# package files the server wrote for its raw media (docs/wire-format.md, "Exports")
EXPORT_HEADER = "X-Image-Embedding-Export"
EXPORTED_HEADER = "X-Image-Embedding-Exported"
EXPORT_ENDPOINT = "/media/embedding"

log = logging.getLogger("vcache.upstream")

# why packages are off, in a word (the metric's label); the sentence is Capabilities.reason
OffKind = Literal[
    "unreachable", "stock", "disabled", "unverified", "no_mmproj", "version", "router_no_model"
]
STOCK_REASON = (
    "upstream is a stock llama-server (GET /props has no image_embedding): every image is "
    "encoded by the server each time; run the patched llama-server (llama_patches/, "
    "`make llama`) with --image-embedding to cache them"
)
NO_IMAGES = "upstream takes no image packages (its vision projector is not verified)"
DISABLED_REASON = (
    "the patched llama-server was started without --image-embedding: add --image-embedding "
    "(or --image-embedding-dir DIR) to its arguments"
)


# What /props says of the model that changes its answers (media_marker and is_sleeping change
# by themselves; the rest only when the operator changes the model, build or settings).
_IDENTITY_PROPS = (
    "model_path",
    "model_alias",
    "model_ftype",
    "build_info",
    "chat_template",
    "chat_template_tool_use",
    "default_generation_settings",
    "bos_token",
    "eos_token",
    "image_embedding",
)


@dataclasses.dataclass(frozen=True)
class ModelIdentity:
    """What the answers of one upstream model depend on, as far as the server tells: the
    components of the result cache's namespace, and the sampling defaults a request that
    leaves a parameter out gets."""

    components: dict[str, Any]
    defaults: dict[str, Any]

    @classmethod
    def from_props(cls, props: dict[str, Any], model: str) -> ModelIdentity | None:
        if not props.get("model_path") and not props.get("build_info"):
            return None  # not a llama-server's /props (or none could be read)
        components = {k: props.get(k) for k in _IDENTITY_PROPS}
        settings = props.get("default_generation_settings")
        params = settings.get("params") if isinstance(settings, dict) else None
        return cls({"model": model, **components}, params if isinstance(params, dict) else {})


@dataclasses.dataclass(frozen=True)
class EmbeddingDir:
    """The directory upstream reads file references from and writes exports into, as upstream
    sees it, with the token it wrote there (None where it could not write): whoever finds the
    same token in `token_file` under its own view of the directory shares it with upstream."""

    path: str
    token: str | None = None
    token_file: str | None = None

    @classmethod
    def from_props(cls, value: Any) -> EmbeddingDir | None:
        if not isinstance(value, dict) or not isinstance(value.get("path"), str):
            return None
        token, token_file = value.get("token"), value.get("token_file")
        if not (isinstance(token, str) and isinstance(token_file, str)):
            return cls(value["path"])
        return cls(value["path"], token, token_file)


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What one upstream model can do with packages, and who it is; `reason` says why images
    go upstream raw (None while image packages are on), `off_kind` the same in a word (the
    metric's label)."""

    packages: bool
    namespace: Namespace | None = None
    file_dir: bool = False
    media_marker: str | None = None
    endpoint: str = "/vision/embedding"
    # audio packages: a namespace of their own (audio settings and modality in it), and the
    # endpoint that encodes clips; None where the server takes no audio packages
    audio_namespace: Namespace | None = None
    media_endpoint: str | None = None
    # why images (or every medium) go upstream raw, in upstream's words where it gave them
    # (an unverified projector type, packages off); None while image packages are on
    reason: str | None = None
    off_kind: OffKind | None = None
    # exports: a miss travels raw and its package comes back from the same request
    export: bool = False
    encoder_id: str | None = None
    embedding_dir: EmbeddingDir | None = None
    # set by the package lookup, not upstream: the proxy's store is upstream's embedding_dir
    # (same token in the same file), so packages travel as file references both ways
    shares_dir: bool = False

    def namespace_for(self, modality: Modality) -> Namespace | None:
        return self.audio_namespace if modality == "audio" else self.namespace

    identity: ModelIdentity | None = None

    @classmethod
    def off(
        cls,
        kind: OffKind,
        reason: str,
        media_marker: str | None = None,
        identity: ModelIdentity | None = None,
    ) -> Capabilities:
        return cls(
            packages=False,
            media_marker=media_marker,
            reason=reason,
            off_kind=kind,
            identity=identity,
        )

    @classmethod
    def from_props(cls, props: dict[str, Any], model: str) -> Capabilities:
        marker = props.get("media_marker")
        media_marker = marker if isinstance(marker, str) else None
        identity = ModelIdentity.from_props(props, model)
        emb = props.get("image_embedding")
        if not isinstance(emb, dict):
            return cls.off("stock", STOCK_REASON, media_marker, identity)
        if not emb.get("enabled"):
            kind, reason = _why_disabled(emb)
            return cls.off(kind, _printable(reason), media_marker, identity)
        if emb.get("version") != FORMAT_VERSION:
            reason = (
                f"upstream speaks package format {emb.get('version')!r}, this vcache speaks "
                f"{FORMAT_VERSION}: build llama-server from this vcache's llama_patches/"
            )
            return cls.off("version", reason, media_marker, identity)

        def namespace(modality: Modality) -> Namespace:
            encoder = {**emb.get("settings", {}), "n_embd": emb.get("n_embd")}
            if modality == "audio":
                # image keys stay as they were; audio keys name their modality
                encoder["modality"] = "audio"
            return Namespace.for_encoder(
                model=model,
                mmproj=str(emb.get("mmproj")),
                build=str(emb.get("build")),
                format_version=FORMAT_VERSION,
                encoder=encoder,
            )

        modalities = emb.get("modalities", ["image"])
        modalities = modalities if isinstance(modalities, list) else []
        media_endpoint = emb.get("media_endpoint")
        takes_audio = "audio" in modalities and isinstance(media_endpoint, str)
        # a modality missing from the list (its projector type is not verified) takes no
        # packages: its media go upstream as sent
        takes_images = "image" in modalities
        given = emb.get("reason")
        images_off = _printable(given) if isinstance(given, str) and given else NO_IMAGES
        return cls(
            packages=True,
            namespace=namespace("image") if takes_images else None,
            file_dir=bool(emb.get("file_dir")),
            media_marker=media_marker,
            endpoint=str(emb.get("endpoint", "/vision/embedding")),
            audio_namespace=namespace("audio") if takes_audio else None,
            media_endpoint=str(media_endpoint) if takes_audio else None,
            identity=identity,
            reason=None if takes_images else images_off,
            off_kind=None if takes_images else "unverified",
            **_export_caps(emb),
        )


def _export_caps(emb: dict[str, Any]) -> dict[str, Any]:
    """The export fields of ``image_embedding`` (absent on a server that predates exports)."""
    encoder_id = emb.get("encoder_id")
    return {
        "export": emb.get("export") is True and isinstance(encoder_id, str),
        "encoder_id": encoder_id if isinstance(encoder_id, str) else None,
        "embedding_dir": EmbeddingDir.from_props(emb.get("dir")),
    }


def _printable(reason: str) -> str:
    """Upstream's own explanation, as one printable line (it goes into a response header)."""
    return "".join(c if c.isprintable() and c.isascii() else " " for c in reason)[:500]


def _why_disabled(emb: dict[str, Any]) -> tuple[OffKind, str]:
    """Why a patched server takes no packages, from its own `reason` where it gives one."""
    given = emb.get("reason")
    reason = given if isinstance(given, str) and given else DISABLED_REASON
    projectors = emb.get("projectors")
    if isinstance(projectors, dict):
        if not projectors:
            return "no_mmproj", reason
        unverified = [
            p for p in projectors.values() if isinstance(p, dict) and not p.get("verified")
        ]
        if unverified and not emb.get("allow_unverified"):
            return "unverified", reason
    if "no multimodal projector" in reason:
        return "no_mmproj", reason
    return "disabled", reason


@dataclasses.dataclass(frozen=True)
class Readiness:
    """Upstream's GET /health: "ok" (ready), "loading" (its model), "unreachable", "error";
    "restarting" while a managed llama-server comes back."""

    state: Literal["ok", "loading", "unreachable", "error", "restarting"]
    detail: str = ""

    @property
    def ready(self) -> bool:
        return self.state == "ok"


@dataclasses.dataclass(frozen=True)
class Encoded:
    """A package fresh from upstream's encoder."""

    header: PackageHeader
    payload: bytes
    encode_ms: float


class _Response(aiohttp.ClientResponse):
    """A response whose connection is never pooled after an event stream or a bodiless answer.

    After an event stream: llama-server closes the connection after every one (its stream
    provider ends by returning false, which cpp-httplib takes for an error) while announcing
    keep-alive, and a request sent on it before the FIN arrives fails unsent, a 502 nobody
    caused. After a bodiless answer (204, 304, the answer to HEAD), which ends with its
    headers whatever they say: bytes a broken server sends after them (llama-server's
    /cors-proxy answers 204 with a chunked body) would be read as the answer to the next
    request on the connection, someone else's.

    Decided here, as the headers arrive: the client hands a connection back to its pool the
    moment a body is complete, which for a short stream is before anyone has seen its headers.
    """

    async def start(self, connection: aiohttp.connector.Connection) -> _Response:
        protocol = connection.protocol
        await super().start(connection)
        if protocol is None or not self._ends_connection():
            return self
        if self.connection is None:
            # its body is all here and the connection back in the pool (nothing ran
            # meanwhile: no await since): a closed socket is dropped when next picked
            protocol.close()
        else:
            protocol.force_close()  # closed when the body ends, instead of pooled
        return self

    def _ends_connection(self) -> bool:
        return (
            self.method == "HEAD"
            or self.status in (204, 304)
            or "text/event-stream" in self.headers.get("Content-Type", "")
        )


# the head of an answer that has no body whatever its headers say (RFC 9112 6.3)
_BODILESS_HEAD = re.compile(rb"HTTP/1\.[01] (?:204|304) ")


class _ResponseHandler(ResponseHandler):
    """The connection's protocol, blind to what a broken server sends after a 204's headers.

    llama-server's /cors-proxy answers 204 with `Transfer-Encoding: chunked` and the chunked
    terminator after its headers. aiohttp's parser (C and Python alike) takes those bytes for
    a malformed next response and fails the whole read, so the client would get a 502 for an
    answer it gets straight from llama-server. Those bytes are nobody's answer: dropped here,
    in the read that holds the answer's head; `_Response` never pools the connection after.
    """

    _at_head = False

    def set_response_params(self, **kwargs: Any) -> None:  # called before each request goes
        self._at_head = True
        super().set_response_params(**kwargs)

    def data_received(self, data: bytes) -> None:
        if self._at_head and data:
            self._at_head = False
            end = data.find(b"\r\n\r\n")
            if end != -1 and _BODILESS_HEAD.match(data):
                data = data[: end + 4]
        super().data_received(data)


class _Connector(aiohttp.TCPConnector):
    """aiohttp's connector, making its connections with `_ResponseHandler`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # the protocol factory aiohttp's connectors build every connection with
        self._factory = functools.partial(  # type: ignore[assignment]  # a subclass
            _ResponseHandler, loop=asyncio.get_running_loop()
        )


class Upstream:
    """A llama-server (patched or stock) at `base_url`."""

    def __init__(
        self, base_url: str, *, connect_timeout_s: float = 5.0, encode_timeout_s: float = 600.0
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self.connect_timeout_s = connect_timeout_s
        self._encode_timeout = aiohttp.ClientTimeout(
            total=encode_timeout_s, sock_connect=connect_timeout_s
        )
        self._session: aiohttp.ClientSession | None = None
        self._caps: dict[str, tuple[float, Capabilities]] = {}
        self._caps_lock = asyncio.Lock()
        # what packages were last seen doing (for the metric, and to log each change once)
        self.last_capabilities: Capabilities | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The pooled client, made on first use (a session belongs to the running loop)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                # idle connections go well before llama-server's own 5 s keep-alive timeout:
                # at the same 5 s a request could go out on a connection the server was
                # closing, a 502 nobody caused (a few a minute in scripts/soak.py)
                connector=_Connector(limit=256, keepalive_timeout=KEEPALIVE_S),
                # a transparent proxy: no cookies kept, nothing decompressed, no headers of
                # its own added to what the client sent, no proxy from the environment
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                trust_env=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                response_class=_Response,
            )
        return self._session

    @property
    def base_url(self) -> str:
        return self._base_url

    def url(self, raw_path: str) -> URL:
        """Upstream's URL for `raw_path`, its query and escapes exactly as the client wrote them."""
        return URL(self._base_url + raw_path, encoded=True)

    def rebase(self, base_url: str) -> None:
        """Point at another address (a managed server restarted on a new port)."""
        self._base_url = base_url.rstrip("/")
        self.forget_capabilities()

    def forget_capabilities(self) -> None:
        self._caps.clear()

    async def capabilities(self, model: str = "") -> Capabilities:
        """Capabilities for requests naming `model` (only a router tells models apart)."""
        cached = self._caps.get(model)
        if cached and time.monotonic() - cached[0] < CAPS_TTL_S:
            return cached[1]
        async with self._caps_lock:
            cached = self._caps.get(model)
            if cached and time.monotonic() - cached[0] < CAPS_TTL_S:
                return cached[1]
            caps = await self._fetch_capabilities(model)
            self._caps[model] = (time.monotonic(), caps)
            self._note(caps)
            return caps

    def _note(self, caps: Capabilities) -> None:
        """Log when packages go on or off, or change reason: once per change, not per request."""
        last, self.last_capabilities = self.last_capabilities, caps
        if last is not None and (last.packages, last.reason) == (caps.packages, caps.reason):
            return
        if caps.packages and not caps.reason:
            if last is not None:
                log.warning("packages are ON again: upstream %s takes them", self._base_url)
            return
        log.warning(
            "PACKAGES ARE OFF: every image goes to upstream as sent and is encoded there each "
            "time. Why: %s",
            caps.reason,
        )

    async def _fetch_capabilities(self, model: str) -> Capabilities:
        props = await self._props(None)
        if isinstance(props, str):
            return Capabilities.off("unreachable", props)
        if props.get("role") != "router":
            # a single-model server ignores the model field: one namespace for every name
            return Capabilities.from_props(props, "")
        if not model:
            return Capabilities.off(
                "router_no_model", "upstream is a router: requests must name a model"
            )
        named = await self._props(model)
        if isinstance(named, str):
            return Capabilities.off("unreachable", named)
        return Capabilities.from_props(named, model)

    async def _props(self, model: str | None) -> dict[str, Any] | str:
        """GET /props, or why upstream cannot say (asked again after the TTL)."""
        url = URL(self._base_url + "/props")
        try:
            async with self.session.get(
                url.with_query(model=model) if model else url,
                timeout=aiohttp.ClientTimeout(total=10.0),
            ) as resp:
                body = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            why = f"{type(e).__name__}: {e}".rstrip(": ")
            return f"upstream {self._base_url} is unreachable ({why})"
        if resp.status != 200:
            text = body[:200].decode(errors="replace")
            return f"upstream's GET /props answered {resp.status}: {text}"
        try:
            props = orjson.loads(body)
        except ValueError:
            return "upstream's GET /props answered something that is not JSON"
        return props if isinstance(props, dict) else {}

    async def probe(self) -> Readiness:
        """Upstream's GET /health: whether it is there and has its model loaded."""
        try:
            async with self.session.get(
                URL(self._base_url + "/health"),
                timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S),
            ) as resp:
                status, body = resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            return Readiness("unreachable", f"{type(e).__name__}: {e}".rstrip(": "))
        if status == 200:
            return Readiness("ok")
        detail = error_message(status, body)
        if status == 503:
            return Readiness("loading", detail)
        return Readiness("error", detail)

    async def encode(
        self, caps: Capabilities, image: ImageBytes, model: str = "", modality: Modality = "image"
    ) -> Encoded:
        """Ask upstream's encode endpoint for the package of one image or audio clip.

        The media's base64 goes out as the client sent it (a view of the request's body, for
        media sent inline): never decoded, encoded again or copied into a JSON string."""
        endpoint = caps.endpoint
        if modality == "audio":
            if caps.media_endpoint is None:
                raise UpstreamError("upstream takes no audio packages")
            endpoint = caps.media_endpoint
            head = b'{"input_audio":{"data":"'
        else:
            head = b'{"image_url":{"url":"' + data_uri_bytes(b"", image.mime or "image/png")
        tail = b'"}' + (b',"model":' + orjson.dumps(model) if model else b"") + b"}"
        pieces = [head, image.base64(), tail]
        try:
            async with self.session.post(
                URL(self._base_url + endpoint),
                data=_stream(pieces),
                headers={
                    "Content-Type": "application/json",
                    "Content-Length": str(sum(memoryview(p).nbytes for p in pieces)),
                },
                timeout=self._encode_timeout,
            ) as resp:
                answer = await resp.read()
        except TimeoutError as e:  # before aiohttp.ClientError: its timeouts are both
            raise UpstreamTimeout(f"upstream encode timed out: {e!r}") from e
        except aiohttp.ClientError as e:
            raise UpstreamError(f"upstream encode failed: {e!r}") from e
        if resp.status != 200:
            raise UpstreamError(
                f"upstream encode answered {resp.status}: {answer[:300].decode(errors='replace')}"
            )
        try:
            return await asyncio.to_thread(_encoded, orjson.loads(answer))
        except orjson.JSONDecodeError as e:
            raise UpstreamError(f"upstream encode answered something that is not JSON: {e}") from e

    async def take_export(self, name: str) -> Encoded:
        """The package upstream exported as `name` (a name from EXPORTED_HEADER), over HTTP and
        inline, for a proxy that cannot read upstream's directory; upstream deletes its files.
        Nothing is encoded again: the encode time is the export's."""
        body = {"exported": name, "output": "inline", "remove": True}
        try:
            async with self.session.post(
                URL(self._base_url + EXPORT_ENDPOINT), json=body, timeout=self._encode_timeout
            ) as resp:
                answer = await resp.read()
        except TimeoutError as e:  # before aiohttp.ClientError: its timeouts are both
            raise UpstreamTimeout(f"taking upstream's export timed out: {e!r}") from e
        except aiohttp.ClientError as e:
            raise UpstreamError(f"taking upstream's export failed: {e!r}") from e
        if resp.status != 200:
            raise UpstreamError(
                f"upstream answered {resp.status} for its export {name}: "
                f"{answer[:300].decode(errors='replace')}"
            )
        try:
            return await asyncio.to_thread(_encoded, orjson.loads(answer))
        except orjson.JSONDecodeError as e:
            raise UpstreamError(f"upstream's export answer is not JSON: {e}") from e

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _stream(
    pieces: list[bytes | memoryview], chunk: int = 256 * 1024
) -> AsyncIterator[memoryview]:
    for piece in pieces:
        view = memoryview(piece)
        for start in range(0, view.nbytes, chunk):
            yield view[start : start + chunk]


def _encoded(body: Any) -> Encoded:
    if not isinstance(body, dict):
        raise UpstreamError("upstream encode answered something that is not an object")
    try:
        header, payload = parse_inline(body.get("media_embedding", body.get("image_embedding")))
    except PackageError as e:
        raise UpstreamError(f"upstream encode answered a bad package: {e}") from e
    timings = body.get("timings") if isinstance(body.get("timings"), dict) else {}
    encode_ms = float(timings.get("encode_ms", 0.0)) if timings else 0.0
    return Encoded(header, payload, encode_ms)
