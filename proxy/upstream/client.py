"""The side that faces llama-server: one pooled httpx client, capability discovery, encodes.

Capabilities come from ``GET /props`` (``image_embedding``, see docs/wire-format.md) and are
cached for a short time, per model in router mode. They are read again after that time, after
an upstream restart, and whenever upstream refuses a package, so a server swapped for a stock
one (or the reverse) is noticed without restarting the proxy.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import time
from typing import Any

import httpx

from proxy.errors import UpstreamError, UpstreamTimeout
from proxy.images.modality import Modality
from vision_cache.data_uri import data_uri
from vision_cache.errors import PackageError
from vision_cache.keys import Namespace
from vision_cache.package import FORMAT_VERSION, PackageHeader, parse_inline

CAPS_TTL_S = 10.0
KEEPALIVE_S = 2.0  # cpp-httplib's keep-alive timeout, llama-server's, is 5 s


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What one upstream model can do with packages."""

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

    def namespace_for(self, modality: Modality) -> Namespace | None:
        return self.audio_namespace if modality == "audio" else self.namespace

    @classmethod
    def from_props(cls, props: dict[str, Any], model: str) -> Capabilities:
        marker = props.get("media_marker")
        media_marker = marker if isinstance(marker, str) else None
        emb = props.get("image_embedding")
        if not isinstance(emb, dict):
            return cls(packages=False, media_marker=media_marker, reason=NOT_PATCHED)
        if not emb.get("enabled"):
            why = _reason(emb) or "upstream has packages off"
            return cls(packages=False, media_marker=media_marker, reason=why)
        if emb.get("version") != FORMAT_VERSION:
            why = f"upstream speaks package format {emb.get('version')}, vcache {FORMAT_VERSION}"
            return cls(packages=False, media_marker=media_marker, reason=why)

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
        return cls(
            packages=True,
            namespace=namespace("image") if takes_images else None,
            file_dir=bool(emb.get("file_dir")),
            media_marker=media_marker,
            endpoint=str(emb.get("endpoint", "/vision/embedding")),
            audio_namespace=namespace("audio") if takes_audio else None,
            media_endpoint=str(media_endpoint) if takes_audio else None,
            reason=None if takes_images else _reason(emb) or "upstream takes no image packages",
        )


NOT_PATCHED = "upstream's /props has no image_embedding: a stock llama-server, or not reachable"


def _reason(emb: dict[str, Any]) -> str | None:
    """Upstream's own explanation, as one printable line (it goes into a response header)."""
    reason = emb.get("reason")
    if not isinstance(reason, str) or not reason:
        return None
    return "".join(c if c.isprintable() and c.isascii() else " " for c in reason)[:500]


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
            return caps

    async def _fetch_capabilities(self, model: str) -> Capabilities:
        props = await self._props(None)
        if props.get("role") != "router":
            # a single-model server ignores the model field: one namespace for every name
            return Capabilities.from_props(props, "")
        if not model:
            return Capabilities(packages=False)
        return Capabilities.from_props(await self._props(model), model)

    async def _props(self, model: str | None) -> dict[str, Any]:
        """GET /props; an empty dict when upstream cannot say (asked again after the TTL)."""
        params = {"model": model} if model else None
        try:
            resp = await self.client.get("/props", params=params, timeout=10.0)
            props = resp.json() if resp.status_code == 200 else {}
        except (httpx.HTTPError, ValueError):
            return {}
        return props if isinstance(props, dict) else {}

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
