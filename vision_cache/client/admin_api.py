"""The proxy's admin API (``/vcache/...``) as typed messages, one definition for both sides.

The server (`proxy.web.admin`) validates requests with these models and writes its answers
through them; the clients (`vision_cache.client.warmup`, ``vcache import``) build requests from
them and read answers into them, so the two cannot drift apart::

    request = WarmRequest(image="data:image/png;base64,...", name="cat")
    answer = WarmResponse.model_validate_json(response_body)
    answer.ref                                   # "vcache://cat"

| endpoint | request | answer |
|---|---|---|
| GET /vcache/health | | `HealthResponse`: 200 when ready, 503 (with `error`) when not |
| GET /vcache/live | | `LiveResponse`: 200 while the proxy's event loop answers |
| GET /vcache/store | | `StoreResponse`: where the proxy's store is (store commands use it) |
| POST /vcache/delete | `DeleteRequest` | `DeleteResponse` |
| GET /vcache/metrics | | Prometheus text |
| GET /vcache/stats | | the store's statistics (`vision_cache.StoreStats` as JSON) |
| GET /vcache/namespace?model=M | | `NamespaceResponse` |
| POST /vcache/lookup | `LookupRequest` | `LookupResponse` |
| POST /vcache/warm | `WarmRequest` | `WarmResponse` |
| POST /vcache/compare | `CompareRequest` | `CompareReply`, or `Event`s (NDJSON) |

(The compare messages live in `vision_cache.client.compare_api`.)

Every endpoint sits behind the proxy key when one is set (`KEY_HEADER`, or
``Authorization: Bearer``); errors come in llama-server's shape (`ErrorResponse`). Requests
refuse unknown fields (a misspelt option is a 400, not a silent default); answers ignore them,
so an older client keeps working against a newer proxy.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vision_cache.keys import DIGEST_PATTERN, NAME_PATTERN

KEY_HEADER = "X-Vcache-Key"
DEFAULT_PROXY = "http://127.0.0.1:8081"  # where `vcache serve` listens by default
MAX_LOOKUP = 100_000

HEALTH = "/vcache/health"
LIVE = "/vcache/live"
STORE = "/vcache/store"
DELETE = "/vcache/delete"
MAX_DELETE = 10_000
METRICS = "/vcache/metrics"
STATS = "/vcache/stats"
NAMESPACE = "/vcache/namespace"
LOOKUP = "/vcache/lookup"
WARM = "/vcache/warm"
COMPARE = "/vcache/compare"
MAX_TAGS = 32

Digest = Annotated[str, Field(pattern=f"^{DIGEST_PATTERN}$")]
Tag = Annotated[str, Field(pattern=f"^{NAME_PATTERN}$")]


def key_headers(api_key: str | None) -> dict[str, str]:
    """The headers that carry the proxy key, when there is one."""
    return {KEY_HEADER: api_key} if api_key else {}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Response(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class WarmRequest(_Request):
    """Encode one image (unless cached), pin it, name it, tag it, describe it."""

    image: str = Field(min_length=1, description="data URI, base64, http(s) or file:// URL")
    model: str = ""
    name: str | None = Field(None, pattern=f"^{NAME_PATTERN}$")
    pin: bool = True
    ttl: float | None = Field(None, gt=0)
    # `vcache compare --tag TAG` compares against the images tagged TAG
    tags: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS)
    describe: str | dict[str, Any] | None = Field(
        None,
        description="a prompt or JSON schema: the VLM's description of the image is "
        "stored once (a result-cache entry) for compare's where-filters",
    )


class WarmResponse(_Response):
    key: str
    digest: str
    namespace: str
    status: Literal["cached", "encoded"]
    encode_ms: float
    bytes: int
    ref: str  # vcache://NAME for a named image, else vcache://sha256:DIGEST
    # with `describe` only: the description, and whether it was stored before (no model call)
    description: dict[str, Any] | None = None
    described: bool | None = None


class LookupRequest(_Request):
    """Which of these images (by SHA-256 of their bytes) are cached: warm-up skips them."""

    model: str = ""
    digests: list[Digest] = Field(max_length=MAX_LOOKUP)


class LookupResponse(_Response):
    namespace: str
    present: list[str]
    pinned: list[str]


class NamespaceResponse(_Response):
    """The cache namespace requests for one model use; None when upstream takes no packages."""

    packages: bool
    id: str | None = None
    text: str | None = None


class ProcessStats(_Response):
    """What a leak would show (-1 where the platform cannot tell)."""

    tasks: int
    open_fds: int
    rss_bytes: int


class ManagedState(_Response):
    healthy: bool
    restarts: int
    pid: int | None


class ErrorDetail(_Response):
    code: int
    message: str
    type: str


UpstreamState = Literal["ok", "loading", "unreachable", "error", "restarting"]


class HealthResponse(_Response):
    """Readiness: can the proxy serve requests now, and will images be cached.

    `ready` needs upstream to answer its own GET /health with 200 (its model loaded). Packages
    being off does not make the proxy unready (requests still work, uncached): `packages` and
    `packages_reason` say so. When not ready the answer is a 503 whose `error` is
    llama-server's own error shape, so clients that parse llama-server's errors read it too.
    """

    status: Literal["ok", "unavailable"] = "ok"
    ready: bool = True
    version: str = ""
    upstream: str
    upstream_state: UpstreamState = "ok"
    upstream_detail: str | None = None
    packages: bool
    packages_reason: str | None = None
    encoder: Literal["local", "server"]  # who encodes on a miss: vcache's workers, or upstream
    # how packages reach upstream now: file references while it shares the store's directory
    transport: Literal["file", "inline"] = "inline"
    exports: bool = False  # a miss goes upstream raw and its package comes back exported
    process: ProcessStats
    managed: ManagedState | None = None
    error: ErrorDetail | None = None


class LiveResponse(_Response):
    """Liveness: the process answers (it asks nothing of upstream)."""

    status: Literal["ok"] = "ok"
    version: str


class DeleteRequest(_Request):
    """Delete these entries (full keys), from the index and from the proxy's memory."""

    keys: list[str] = Field(max_length=MAX_DELETE)


class DeleteResponse(_Response):
    deleted: list[str]  # the keys that were there


class StoreResponse(_Response):
    """The store a running proxy uses: `path` on the proxy's machine, and the store's `id`
    (the same path on another machine is another store)."""

    path: str
    id: str


class ErrorResponse(_Response):
    """llama-server's error shape, which every error of the proxy takes too."""

    error: ErrorDetail


def error_message(status: int, body: bytes | str) -> str:
    """The message of an error answer, or its status and start when it is not one of ours."""
    try:
        return ErrorResponse.model_validate_json(body).error.message
    except ValidationError:
        text = body.decode(errors="replace") if isinstance(body, bytes) else body
        return f"HTTP {status}: {text[:200]}"
