"""Cache keys: a namespace (everything that shapes the encoder's output) plus
the SHA-256 of the raw image bytes.

    >>> ns = Namespace.for_encoder(
    ...     model="gemma-3-4b", mmproj="mmproj-f16.gguf:1a2b", build="b6000+vc1",
    ...     format_version=1, encoder={"image_min_tokens": 256},
    ... )
    >>> key = ns.key_for_image(b"...jpeg bytes...")
    >>> CacheKey.parse(key.text) == key
    True

Nothing here ever becomes part of a file path: keys live in the SQLite index
only, and segment files are named from integers (see vision_cache.store.layout).
See docs/cache-keys.md for the hash choice and its measurement.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from vision_cache.errors import InvalidDigestError, InvalidNameError, InvalidNamespaceError

# Bumped when the key derivation changes (hash, canonical form): old entries
# then simply stop matching instead of being misread.
KEY_SCHEME = "vc1"
NAMESPACE_SCHEME = "vcache-namespace/1"
DIGEST_ALGORITHM = "sha256"
MAX_NAMESPACE_TEXT = 64 * 1024

# the one spelling of each: content digests (SHA-256) and reference names (vcache://NAME)
DIGEST_PATTERN = r"[0-9a-f]{64}"
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_HEX64 = re.compile(DIGEST_PATTERN)
_NAME = re.compile(NAME_PATTERN)

Component: TypeAlias = (
    str | int | float | bool | Sequence["Component"] | Mapping[str, "Component"] | None
)
BytesLike: TypeAlias = bytes | bytearray | memoryview


def content_digest(data: BytesLike) -> str:
    """SHA-256 of the whole image, as 64 lowercase hex digits."""
    return hashlib.sha256(data).hexdigest()


def validate_digest(value: str, what: str = "digest") -> str:
    """Return `value` if it is 64 lowercase hex digits, else raise."""
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise InvalidDigestError(f"{what} must be 64 lowercase hex digits, got {value!r:.80}")
    return value


def validate_name(name: str) -> str:
    """Return `name` if it is a valid reference name, else raise.

    The charset has no path separators and no leading dot, so even a careless
    future use as a file name could not escape a directory.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidNameError(f"name must match {_NAME.pattern}, got {name!r:.80}")
    return name


@dataclass(frozen=True, slots=True)
class CacheKey:
    """One cached visual package: `vc1:<namespace id>:<content digest>`."""

    namespace_id: str
    digest: str

    def __post_init__(self) -> None:
        validate_digest(self.namespace_id, "namespace id")
        validate_digest(self.digest)

    @property
    def text(self) -> str:
        return f"{KEY_SCHEME}:{self.namespace_id}:{self.digest}"

    def __str__(self) -> str:
        return self.text

    @classmethod
    def parse(cls, text: str) -> CacheKey:
        """Inverse of `text`; raises InvalidKeyError subclasses on bad input."""
        parts = text.split(":") if isinstance(text, str) else []
        if len(parts) != 3 or parts[0] != KEY_SCHEME:
            raise InvalidDigestError(f"not a {KEY_SCHEME} key: {text!r:.120}")
        return cls(parts[1], parts[2])


@dataclass(frozen=True, slots=True)
class Namespace:
    """A canonical, versioned identity of one encoder configuration.

    `text` is canonical JSON (sorted keys, no spaces, ASCII only); `id` is its
    SHA-256. Any change to any component gives a different id, so a model,
    mmproj, build or preprocessing change can never produce a cross hit.
    """

    text: str
    id: str

    @classmethod
    def from_components(cls, components: Mapping[str, Component]) -> Namespace:
        """Build a namespace from any JSON-able mapping of components."""
        if not isinstance(components, Mapping) or not components:
            raise InvalidNamespaceError("namespace components must be a non-empty mapping")
        text = _canonical({"scheme": NAMESPACE_SCHEME, "components": _plain(components)})
        if len(text) > MAX_NAMESPACE_TEXT:
            raise InvalidNamespaceError(f"namespace text longer than {MAX_NAMESPACE_TEXT}")
        return cls(text, hashlib.sha256(text.encode("ascii")).hexdigest())

    @classmethod
    def for_encoder(
        cls,
        *,
        model: str,
        mmproj: str,
        build: str,
        format_version: int,
        encoder: Mapping[str, Component],
    ) -> Namespace:
        """The usual namespace: model name (router mode), mmproj identity,
        llama.cpp build id, package format version and encoder settings."""
        return cls.from_components(
            {
                "model": model,
                "mmproj": mmproj,
                "build": build,
                "format_version": format_version,
                "encoder": dict(encoder),
            }
        )

    @classmethod
    def parse(cls, text: str) -> Namespace:
        """Inverse of `text`; rejects anything that is not already canonical."""
        try:
            document = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise InvalidNamespaceError(f"namespace text is not JSON: {exc}") from None
        if not isinstance(document, dict) or document.get("scheme") != NAMESPACE_SCHEME:
            raise InvalidNamespaceError("namespace text has no known scheme")
        namespace = cls.from_components(document.get("components"))  # type: ignore[arg-type]
        if namespace.text != text:
            raise InvalidNamespaceError("namespace text is not in canonical form")
        return namespace

    @property
    def components(self) -> dict[str, Any]:
        components: dict[str, Any] = json.loads(self.text)["components"]
        return components

    def key(self, digest: str) -> CacheKey:
        return CacheKey(self.id, digest)

    def key_for_image(self, image: BytesLike) -> CacheKey:
        return CacheKey(self.id, content_digest(image))


def _canonical(document: object) -> str:
    # ensure_ascii makes the text (and so the id) independent of any output
    # encoding; allow_nan=False because NaN has no JSON spelling.
    return json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def _plain(value: object) -> Component:
    """Copy `value` into plain dict/list/scalars, rejecting anything else."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidNamespaceError("namespace components must be finite numbers")
        return value
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise InvalidNamespaceError("namespace mapping keys must be strings")
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        return [_plain(v) for v in value]
    raise InvalidNamespaceError(f"unsupported namespace component type {type(value).__name__}")
