"""Packages: an image's or a clip's projector output plus what places it back in a prompt.

The format is the patched llama-server's (docs/wire-format.md). Here a package is split in two:
a small `PackageHeader` (identity and chunk layout, stored as the entry's meta) and the payload
(the embeddings, stored in a segment file and never copied on the way to the server).

pydantic models validate what comes over the wire; everything inside uses the dataclasses.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vision_cache.errors import PackageError
from vision_cache.keys import DIGEST_PATTERN

FORMAT_VERSION = 1
DTYPE_SIZES = {"f32": 4, "f16": 2}

Hex64 = Annotated[str, Field(pattern=f"^{DIGEST_PATTERN}$")]
Modality = Literal["image", "audio"]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ChunkWire(_Wire):
    n_tokens: Annotated[int, Field(ge=1, le=1 << 20)]
    meta: Annotated[str, Field(max_length=64 * 1024)]


class ImageSizeWire(_Wire):
    nx: Annotated[int, Field(ge=1, le=1 << 16)]
    ny: Annotated[int, Field(ge=1, le=1 << 16)]


class AudioSizeWire(_Wire):
    n_samples: Annotated[int, Field(ge=1, le=1 << 27)]
    sample_rate: Annotated[int, Field(ge=1, le=1 << 20)]


class EmbeddingFileWire(_Wire):
    path: Annotated[str, Field(pattern=r"^[A-Za-z0-9._/-]{1,512}$")]
    offset: Annotated[int, Field(ge=0)]
    length: Annotated[int, Field(ge=1)]
    xxh3: Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]


class PackageWire(_Wire):
    """The package object as llama-server writes and reads it (`image_embedding`, or
    `media_embedding` for any modality: an audio package says ``"modality": "audio"``)."""

    version: Literal[1]
    modality: Modality | None = None  # absent: image
    mmproj: Annotated[str, Field(min_length=1, max_length=256)]
    n_embd: Annotated[int, Field(ge=1, le=1 << 16)]
    dtype: Literal["f32", "f16"]
    id: Hex64
    image: ImageSizeWire | None = None
    audio: AudioSizeWire | None = None
    chunks: Annotated[list[ChunkWire], Field(min_length=1, max_length=256)]
    data: str | None = None
    file: EmbeddingFileWire | None = None

    @model_validator(mode="after")
    def _one_source(self) -> PackageWire:
        if (self.data is None) == (self.file is None):
            raise ValueError('exactly one of "data" and "file" is required')
        if self.modality == "audio":
            if self.audio is None or self.image is not None:
                raise ValueError('an audio package has "audio" and no "image"')
        elif self.image is None or self.audio is not None:
            raise ValueError('an image package has "image" and no "audio"')
        return self


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One media chunk: its token count and its `mtmd_input_chunk_save()` bytes."""

    n_tokens: int
    meta: bytes


@dataclasses.dataclass(frozen=True)
class EmbeddingFileRef:
    """Where a payload lies inside the server's embedding directory."""

    path: str
    offset: int
    length: int
    xxh3: str

    def to_wire(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PackageHeader:
    """Everything of a package except its embeddings."""

    mmproj: str
    n_embd: int
    dtype: str
    image_id: str
    nx: int
    ny: int
    chunks: tuple[Chunk, ...]
    version: int = FORMAT_VERSION
    modality: Modality = "image"
    n_samples: int = 0  # audio: samples at sample_rate (mono), what the server re-tokenizes
    sample_rate: int = 0

    @property
    def n_tokens(self) -> int:
        return sum(c.n_tokens for c in self.chunks)

    @property
    def payload_size(self) -> int:
        return self.n_tokens * self.n_embd * DTYPE_SIZES[self.dtype]

    def to_wire(self) -> dict[str, Any]:
        """The package object without `data`/`file`."""
        wire: dict[str, Any] = {
            "version": self.version,
            "mmproj": self.mmproj,
            "n_embd": self.n_embd,
            "dtype": self.dtype,
            "id": self.image_id,
            "chunks": [
                {"n_tokens": c.n_tokens, "meta": base64.b64encode(c.meta).decode()}
                for c in self.chunks
            ],
        }
        if self.modality == "audio":
            wire["modality"] = "audio"
            wire["audio"] = {"n_samples": self.n_samples, "sample_rate": self.sample_rate}
        else:
            wire["image"] = {"nx": self.nx, "ny": self.ny}
        return wire

    def inline(self, payload: bytes | memoryview) -> dict[str, Any]:
        return {**self.to_wire(), "data": base64.b64encode(payload).decode()}

    def by_reference(self, ref: EmbeddingFileRef) -> dict[str, Any]:
        return {**self.to_wire(), "file": ref.to_wire()}


@dataclasses.dataclass(frozen=True)
class StoredPackage:
    """What the store's meta column holds: the header, and what producing it cost."""

    header: PackageHeader
    encode_ms: float = 0.0

    def to_meta(self) -> bytes:
        doc = {"package": self.header.to_wire(), "encode_ms": round(self.encode_ms, 3)}
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_meta(cls, meta: bytes) -> StoredPackage:
        try:
            doc = json.loads(meta)
            wire = PackageWire.model_validate({**doc["package"], "data": ""})
            encode_ms = float(doc.get("encode_ms", 0.0))
        except (ValueError, TypeError, KeyError, ValidationError) as e:
            raise PackageError(f"stored package header is invalid: {e}") from e
        return cls(_header(wire), encode_ms)


def _header(wire: PackageWire) -> PackageHeader:
    try:
        chunks = tuple(
            Chunk(c.n_tokens, base64.b64decode(c.meta, validate=True)) for c in wire.chunks
        )
    except binascii.Error as e:
        raise PackageError(f"chunk metadata is not valid base64: {e}") from e
    image, audio = wire.image, wire.audio
    return PackageHeader(
        mmproj=wire.mmproj,
        n_embd=wire.n_embd,
        dtype=wire.dtype,
        image_id=wire.id,
        nx=image.nx if image else 0,
        ny=image.ny if image else 0,
        chunks=chunks,
        version=wire.version,
        modality=wire.modality or "image",
        n_samples=audio.n_samples if audio else 0,
        sample_rate=audio.sample_rate if audio else 0,
    )


def parse_inline(obj: Any) -> tuple[PackageHeader, bytes]:
    """Header and payload of an inline package object (as the encode endpoints answer)."""
    try:
        wire = PackageWire.model_validate(obj)
    except ValidationError as e:
        raise PackageError(f"invalid package: {e.errors(include_url=False)}") from e
    if wire.data is None:
        raise PackageError("package has no inline data")
    header = _header(wire)
    try:
        payload = base64.b64decode(wire.data, validate=True)
    except binascii.Error as e:
        raise PackageError(f"package data is not valid base64: {e}") from e
    if len(payload) != header.payload_size:
        raise PackageError(
            f"package data holds {len(payload)} bytes, its chunks need {header.payload_size}"
        )
    return header, payload


def parse_reference(obj: Any) -> tuple[PackageHeader, EmbeddingFileRef]:
    """Header and file reference of a package object that points at its payload in a file
    (as an export's ``.json`` holds it)."""
    try:
        wire = PackageWire.model_validate(obj)
    except ValidationError as e:
        raise PackageError(f"invalid package: {e.errors(include_url=False)}") from e
    if wire.file is None:
        raise PackageError("package has no file reference")
    header = _header(wire)
    f = wire.file
    if f.length != header.payload_size:
        raise PackageError(
            f"file reference of {f.length} bytes, its chunks need {header.payload_size}"
        )
    return header, EmbeddingFileRef(f.path, f.offset, f.length, f.xxh3)
