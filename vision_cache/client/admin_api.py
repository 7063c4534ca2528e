"""The proxy's admin API (``/vcache/...``) as typed messages, one definition for both sides.

The server (`proxy.web.admin`) validates requests with these models and writes its answers
through them; the clients (`vision_cache.client.warmup`, ``vcache import``) build requests from
them and read answers into them, so the two cannot drift apart::

    request = WarmRequest(image="data:image/png;base64,...", name="cat")
    answer = WarmResponse.model_validate_json(response_body)
    answer.ref                                   # "vcache://cat"

| endpoint | request | answer |
|---|---|---|
| GET /vcache/health | | `HealthResponse` |
| GET /vcache/metrics | | Prometheus text |
| GET /vcache/stats | | the store's statistics (`vision_cache.StoreStats` as JSON) |
| GET /vcache/namespace?model=M | | `NamespaceResponse` |
| POST /vcache/lookup | `LookupRequest` | `LookupResponse` |
| POST /vcache/warm | `WarmRequest` | `WarmResponse` |

Every endpoint sits behind the proxy key when one is set (`KEY_HEADER`, or
``Authorization: Bearer``); errors come in llama-server's shape (`ErrorResponse`). Requests
refuse unknown fields (a misspelt option is a 400, not a silent default); answers ignore them,
so an older client keeps working against a newer proxy.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vision_cache.keys import DIGEST_PATTERN, NAME_PATTERN

KEY_HEADER = "X-Vcache-Key"
DEFAULT_PROXY = "http://127.0.0.1:8081"  # where `vcache serve` listens by default
MAX_LOOKUP = 100_000

HEALTH = "/vcache/health"
METRICS = "/vcache/metrics"
STATS = "/vcache/stats"
NAMESPACE = "/vcache/namespace"
LOOKUP = "/vcache/lookup"
WARM = "/vcache/warm"

Digest = Annotated[str, Field(pattern=f"^{DIGEST_PATTERN}$")]


def key_headers(api_key: str | None) -> dict[str, str]:
    """The headers that carry the proxy key, when there is one."""
    return {KEY_HEADER: api_key} if api_key else {}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Response(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class WarmRequest(_Request):
    """Encode one image (unless cached), pin it and name it."""

    image: str = Field(min_length=1, description="data URI, base64, http(s) or file:// URL")
    model: str = ""
    name: str | None = Field(None, pattern=f"^{NAME_PATTERN}$")
    pin: bool = True
    ttl: float | None = Field(None, gt=0)


class WarmResponse(_Response):
    key: str
    digest: str
    namespace: str
    status: Literal["cached", "encoded"]
    encode_ms: float
    bytes: int
    ref: str  # vcache://NAME for a named image, else vcache://sha256:DIGEST


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


class HealthResponse(_Response):
    status: Literal["ok"] = "ok"
    upstream: str
    packages: bool
    # why images go upstream raw (an unverified projector type, packages off); absent while
    # image packages are on
    packages_reason: str | None = None
    process: ProcessStats
    managed: ManagedState | None = None


class ErrorDetail(_Response):
    code: int
    message: str
    type: str


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
