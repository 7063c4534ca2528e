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
from vision_cache.errors import PackageError
from vision_cache.keys import Namespace
from vision_cache.package import FORMAT_VERSION, PackageHeader, parse_inline

CAPS_TTL_S = 10.0
KEEPALIVE_S = 2.0  # cpp-httplib's keep-alive timeout, llama-server's, is 5 s


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
class Capabilities:
    """What one upstream model can do with packages, and who it is."""

    packages: bool
    namespace: Namespace | None = None
    file_dir: bool = False
    media_marker: str | None = None
    endpoint: str = "/vision/embedding"
    # audio packages: a namespace of their own (audio settings and modality in it), and the
    # endpoint that encodes clips; None where the server takes no audio packages
    audio_namespace: Namespace | None = None
    media_endpoint: str | None = None

    def namespace_for(self, modality: Modality) -> Namespace | None:
        return self.audio_namespace if modality == "audio" else self.namespace

    identity: ModelIdentity | None = None

    @classmethod
    def from_props(cls, props: dict[str, Any], model: str) -> Capabilities:
        marker = props.get("media_marker")
        media_marker = marker if isinstance(marker, str) else None
        identity = ModelIdentity.from_props(props, model)
        emb = props.get("image_embedding")
        if not isinstance(emb, dict) or not emb.get("enabled"):
            return cls(packages=False, media_marker=media_marker, identity=identity)
        if emb.get("version") != FORMAT_VERSION:
            return cls(packages=False, media_marker=media_marker, identity=identity)

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
            identity=identity,
        )


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
            uri = f"data:{mime or 'image/png'};base64,{base64.b64encode(image).decode()}"
            body = {"image_url": {"url": uri}}
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
