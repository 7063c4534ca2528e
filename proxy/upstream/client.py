"""The side that faces llama-server: one pooled httpx client, capability discovery, encodes.

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
import base64
import dataclasses
import logging
import time
from typing import Any, Literal

import httpx

from proxy.errors import UpstreamError, UpstreamTimeout
from proxy.images.modality import Modality
from vision_cache.client.admin_api import error_message
from vision_cache.data_uri import data_uri
from vision_cache.errors import PackageError
from vision_cache.keys import Namespace
from vision_cache.package import FORMAT_VERSION, PackageHeader, parse_inline

CAPS_TTL_S = 10.0
KEEPALIVE_S = 2.0  # cpp-httplib's keep-alive timeout, llama-server's, is 5 s
PROBE_TIMEOUT_S = 5.0
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
DISABLED_REASON = (
    "the patched llama-server was started without --image-embedding: add --image-embedding "
    "(or --image-embedding-dir DIR) to its arguments"
)


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What one upstream model can do with packages; `reason` says why images go upstream raw
    (None while image packages are on), `off_kind` the same in a word (the metric's label)."""

    packages: bool
    namespace: Namespace | None = None
    file_dir: bool = False
    media_marker: str | None = None
    endpoint: str = "/vision/embedding"
    # audio packages: a namespace of their own (audio settings and modality in it), and the
    # endpoint that encodes clips; None where the server takes no audio packages
    audio_namespace: Namespace | None = None
    media_endpoint: str | None = None
    reason: str | None = None
    off_kind: OffKind | None = None

    def namespace_for(self, modality: Modality) -> Namespace | None:
        return self.audio_namespace if modality == "audio" else self.namespace

    @classmethod
    def off(cls, kind: OffKind, reason: str, media_marker: str | None = None) -> Capabilities:
        return cls(packages=False, media_marker=media_marker, reason=reason, off_kind=kind)

    @classmethod
    def from_props(cls, props: dict[str, Any], model: str) -> Capabilities:
        marker = props.get("media_marker")
        media_marker = marker if isinstance(marker, str) else None
        emb = props.get("image_embedding")
        if not isinstance(emb, dict):
            return cls.off("stock", STOCK_REASON, media_marker)
        if not emb.get("enabled"):
            kind, reason = _why_disabled(emb)
            return cls.off(kind, reason, media_marker)
        if emb.get("version") != FORMAT_VERSION:
            reason = (
                f"upstream speaks package format {emb.get('version')!r}, this vcache speaks "
                f"{FORMAT_VERSION}: build llama-server from this vcache's llama_patches/"
            )
            return cls.off("version", reason, media_marker)

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
        media_endpoint = emb.get("media_endpoint")
        takes_audio = (
            isinstance(modalities, list)
            and "audio" in modalities
            and isinstance(media_endpoint, str)
        )
        return cls(
            packages=True,
            namespace=namespace("image"),
            file_dir=bool(emb.get("file_dir")),
            media_marker=media_marker,
            endpoint=str(emb.get("endpoint", "/vision/embedding")),
            audio_namespace=namespace("audio") if takes_audio else None,
            media_endpoint=str(media_endpoint) if takes_audio else None,
        )


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


class Upstream:
    """A llama-server (patched or stock) at `base_url`."""

    def __init__(
        self, base_url: str, *, connect_timeout_s: float = 5.0, encode_timeout_s: float = 600.0
    ) -> None:
        self._base_url = base_url.rstrip("/")
        # generation can stream for minutes: no read timeout on forwarded requests
        self.client = httpx.AsyncClient(
            base_url=self._base_url,
            timeout=httpx.Timeout(None, connect=connect_timeout_s),
            # idle connections go well before llama-server's own 5 s keep-alive timeout: at
            # the same 5 s (httpx's default) a request could go out on a connection the server
            # was closing, a 502 nobody caused (a few a minute in scripts/soak.py)
            limits=httpx.Limits(
                max_connections=256, max_keepalive_connections=64, keepalive_expiry=KEEPALIVE_S
            ),
            follow_redirects=False,
        )
        self._encode_timeout = httpx.Timeout(encode_timeout_s, connect=connect_timeout_s)
        self._caps: dict[str, tuple[float, Capabilities]] = {}
        self._caps_lock = asyncio.Lock()
        # what packages were last seen doing (for the metric, and to log each change once)
        self.last_capabilities: Capabilities | None = None

    @property
    def base_url(self) -> str:
        return self._base_url

    def rebase(self, base_url: str) -> None:
        """Point at another address (a managed server restarted on a new port)."""
        self._base_url = base_url.rstrip("/")
        self.client.base_url = httpx.URL(self._base_url)
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
        params = {"model": model} if model else None
        try:
            resp = await self.client.get("/props", params=params, timeout=10.0)
        except httpx.HTTPError as e:
            return f"upstream {self._base_url} is unreachable ({type(e).__name__}: {e})"
        if resp.status_code != 200:
            return f"upstream's GET /props answered {resp.status_code}: {resp.text[:200]}"
        try:
            props = resp.json()
        except ValueError:
            return "upstream's GET /props answered something that is not JSON"
        return props if isinstance(props, dict) else {}

    async def probe(self) -> Readiness:
        """Upstream's GET /health: whether it is there and has its model loaded."""
        try:
            resp = await self.client.get("/health", timeout=PROBE_TIMEOUT_S)
        except httpx.HTTPError as e:
            return Readiness("unreachable", f"{type(e).__name__}: {e}".rstrip(": "))
        if resp.status_code == 200:
            return Readiness("ok")
        detail = error_message(resp.status_code, resp.content)
        if resp.status_code == 503:
            return Readiness("loading", detail)
        return Readiness("error", detail)

    async def encode(
        self,
        caps: Capabilities,
        image: bytes,
        mime: str | None,
        model: str = "",
        modality: Modality = "image",
    ) -> Encoded:
        """Ask upstream's encode endpoint for the package of one image or audio clip."""
        body: dict[str, Any]
        endpoint = caps.endpoint
        if modality == "audio":
            if caps.media_endpoint is None:
                raise UpstreamError("upstream takes no audio packages")
            endpoint = caps.media_endpoint
            body = {"input_audio": {"data": base64.b64encode(image).decode()}}
        else:
            body = {"image_url": {"url": data_uri(image, mime or "image/png")}}
        if model:
            body["model"] = model
        try:
            resp = await self.client.post(endpoint, json=body, timeout=self._encode_timeout)
        except httpx.TimeoutException as e:
            raise UpstreamTimeout(f"upstream encode timed out: {e!r}") from e
        except httpx.HTTPError as e:
            raise UpstreamError(f"upstream encode failed: {e!r}") from e
        if resp.status_code != 200:
            raise UpstreamError(f"upstream encode answered {resp.status_code}: {resp.text[:300]}")
        return _encoded(resp.json())

    async def aclose(self) -> None:
        await self.client.aclose()


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
