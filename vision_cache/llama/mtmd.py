"""libmtmd, typed: the vision encoder, and visual packages made exactly as llama-server makes them.

`VisionEncoder` turns image bytes into a package (docs/wire-format.md) with the same calls, in
the same order, as the patched server's ``POST /vision/embedding``: a bitmap from the bytes
(its id the SHA-256 of the bytes), ``mtmd_tokenize`` of the media marker alone, then per image
chunk ``mtmd_encode_chunk``, ``mtmd_get_output_embd`` and ``mtmd_input_chunk_save``. Fed the
same mmproj, build and settings, the two produce byte-identical packages
(tests/test_encoder_worker.py).

It needs the text model's file, not its weights: libmtmd reads the vocabulary (for the text
around the image, e.g. ``<start_of_image>``) and the rope type (the chunk's position scheme)
from it, and the package's ``n_embd`` is the model's input width. ``mtmd_init_from_file`` with
a NULL model loads, but then cannot tokenize ("llama_vocab is not provided") and leaves the
position scheme unset; a ``vocab_only`` model has no hyperparameters (``n_embd_inp`` is 0). So
the model is loaded ``no_alloc``: metadata, hyperparameters and vocabulary, no tensor data.

The helpers below the class (`chunk_meta`, `encode_chunk`, `decode_chunk`) are shared with the
llama-cpp-python chat handler (vision_cache.llama.chat_handler).
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import xxhash

from vision_cache.errors import VisionCacheError
from vision_cache.llama.libs import LlamaLibs
from vision_cache.package import Chunk, PackageHeader

log = logging.getLogger("vcache.mtmd")

FlashAttn = Literal["auto", "enabled", "disabled"]
_FLASH_ATTN = {"auto": -1, "disabled": 0, "enabled": 1}  # enum llama_flash_attn_type
_GGML_DEVICE_GPU = 1  # enum ggml_backend_dev_type: CPU, GPU, IGPU, ACCEL
_F32 = 4


class EncoderError(VisionCacheError):
    """The vision encoder cannot load, or cannot make a package of this input."""


class ImageRejected(EncoderError):
    """The bytes are not an image the encoder takes (undecodable, audio, video)."""


@dataclasses.dataclass(frozen=True)
class EncoderSettings:
    """How the vision encoder runs.

        >>> EncoderSettings(n_threads=4).namespace_settings("CPU")["flash_attn"]
        'auto'

    ``flash_attn``, the image token limits and the device change the embeddings, so they are
    part of the cache namespace, named as llama-server names them in GET /props; ``n_threads``
    and ``warmup`` do not (a test compares 1 thread with the server's 2, byte for byte).
    """

    n_threads: int = 4
    use_gpu: bool = False
    flash_attn: FlashAttn = "auto"
    image_min_tokens: int = -1
    image_max_tokens: int = -1
    warmup: bool = False

    def namespace_settings(self, device: str) -> dict[str, Any]:
        return {
            "image_min_tokens": self.image_min_tokens,
            "image_max_tokens": self.image_max_tokens,
            "flash_attn": self.flash_attn,
            "device": device,
        }


@dataclasses.dataclass(frozen=True)
class EncodedImage:
    """One image's package: header, f32 payload, and what producing it took."""

    header: PackageHeader
    payload: bytes
    encode_ms: float
    preprocess_ms: float


def mmproj_identity(path: Path) -> str:
    """``xxh3-128:<32 hex>:<size>``, the identity llama-server gives the same file."""
    h = xxhash.xxh3_128()
    size = 0
    with path.open("rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
            size += len(block)
    # hexdigest is the canonical big-endian form: high 64 bits first, as the server prints
    return f"xxh3-128:{h.hexdigest()}:{size}"


class VisionEncoder:
    """An mmproj loaded for encoding, with its text model's metadata. Not thread-safe."""

    def __init__(
        self, libs: LlamaLibs, mmproj: Path, text_model: Path, settings: EncoderSettings
    ) -> None:
        self._libs = libs
        self.settings = settings
        self.build_id = libs.build_id
        self.mmproj_id = mmproj_identity(mmproj)
        self.device = encoder_device(libs, settings.use_gpu)
        self._model = _load_metadata(libs, text_model)
        try:
            self.n_embd = int(libs.llama.llama_model_n_embd_inp(self._model))
            self._ctx = init_context(libs, mmproj, self._model, settings)
        except BaseException:
            libs.llama.llama_model_free(self._model)
            raise

    def close(self) -> None:
        if self._ctx is not None:
            self._libs.mtmd.mtmd_free(self._ctx)
            self._ctx = None
            self._libs.llama.llama_model_free(self._model)

    def namespace_settings(self) -> dict[str, Any]:
        return {**self.settings.namespace_settings(self.device), "n_embd": self.n_embd}

    def encode(self, image: bytes) -> EncodedImage:
        """The f32 package of `image`, as ``POST /vision/embedding`` answers it."""
        t0 = time.perf_counter()
        with (
            _bitmap(self._libs, self._ctx, image) as bitmap,
            _marker_chunks(self._libs, self._ctx, bitmap) as chunks,
        ):
            preprocess_ms = (time.perf_counter() - t0) * 1000.0
            t1 = time.perf_counter()
            parts = [
                encode_chunk(self._libs, self._ctx, c, self.n_embd)
                for c in image_chunks(self._libs, chunks)
            ]
            encode_ms = (time.perf_counter() - t1) * 1000.0
            header = PackageHeader(
                mmproj=self.mmproj_id,
                n_embd=self.n_embd,
                dtype="f32",
                image_id=_bitmap_id(self._libs, bitmap),
                nx=self._libs.mtmd.mtmd_bitmap_get_nx(bitmap),
                ny=self._libs.mtmd.mtmd_bitmap_get_ny(bitmap),
                chunks=tuple(chunk for chunk, _ in parts),
            )
        return EncodedImage(header, b"".join(p for _, p in parts), encode_ms, preprocess_ms)


# --- shared with the chat handler --------------------------------------------------------------


def init_context(libs: LlamaLibs, mmproj: Path, model: Any, settings: EncoderSettings) -> Any:
    """An mtmd context for `mmproj` (`model`: the text model, its metadata at least)."""
    params = libs.mtmd.mtmd_context_params_default()
    params.use_gpu = settings.use_gpu
    params.print_timings = False
    params.n_threads = settings.n_threads
    params.flash_attn_type = _FLASH_ATTN[settings.flash_attn]
    params.warmup = settings.warmup
    params.image_min_tokens = settings.image_min_tokens
    params.image_max_tokens = settings.image_max_tokens
    ctx = libs.mtmd.mtmd_init_from_file(str(mmproj).encode(), model, params)
    if not ctx:
        raise EncoderError(f"cannot load the vision encoder from {mmproj}")
    if not libs.mtmd.mtmd_support_vision(ctx):
        libs.mtmd.mtmd_free(ctx)
        raise EncoderError(f"{mmproj} has no vision encoder")
    return ctx


def image_chunks(libs: LlamaLibs, chunks: Any) -> Iterator[Any]:
    """The image chunks of a tokenized input, in order."""
    mtmd = libs.mtmd
    for i in range(mtmd.mtmd_input_chunks_size(chunks)):
        chunk = mtmd.mtmd_input_chunks_get(chunks, i)
        if chunk and mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
            yield chunk


def chunk_meta(libs: LlamaLibs, chunk: Any) -> bytes:
    """``mtmd_input_chunk_save()`` of a chunk: its layout, never pixel data."""
    size = ctypes.c_size_t(0)
    if libs.mtmd.mtmd_input_chunk_save(chunk, None, 0, ctypes.byref(size)) != 0:
        raise EncoderError("cannot serialize a media chunk")
    buf = (ctypes.c_char * size.value)()
    if libs.mtmd.mtmd_input_chunk_save(chunk, buf, size.value, ctypes.byref(size)) != 0:
        raise EncoderError("cannot serialize a media chunk")
    return bytes(buf)[: size.value]


def encode_chunk(libs: LlamaLibs, ctx: Any, chunk: Any, n_embd: int) -> tuple[Chunk, bytes]:
    """Run the encoder on one image chunk: its package entry and its f32 embeddings."""
    n_tokens = int(libs.mtmd.mtmd_input_chunk_get_n_tokens(chunk))
    if libs.mtmd.mtmd_encode_chunk(ctx, chunk) != 0:
        raise EncoderError("the vision encoder failed on this image")
    embd = libs.mtmd.mtmd_get_output_embd(ctx)
    if not embd:
        raise EncoderError("the vision encoder produced no output")
    # copied out now: the next encode reuses the context's output buffer
    payload = ctypes.string_at(embd, n_tokens * n_embd * _F32)
    return Chunk(n_tokens, chunk_meta(libs, chunk)), payload


def decode_chunk(
    libs: LlamaLibs, ctx: Any, lctx: Any, chunk: Any, embd: Any, n_past: int, n_batch: int
) -> int:
    """Feed precomputed embeddings of `chunk` to the language model; the new n_past.

    `embd` is a ``POINTER(c_float)`` to n_tokens x n_embd floats that outlives the call.
    """
    new_n_past = libs.llama.llama_pos(0)
    res = libs.mtmd.mtmd_helper_decode_image_chunk(
        ctx,
        lctx,
        chunk,
        embd,
        libs.llama.llama_pos(n_past),
        libs.llama.llama_seq_id(0),
        n_batch,
        ctypes.byref(new_n_past),
        libs.mtmd.mtmd_helper_post_decode_callback(0),
        None,
    )
    if res != 0:
        raise EncoderError(f"decoding an image chunk failed ({res})")
    return int(new_n_past.value)


def encoder_device(libs: LlamaLibs, use_gpu: bool) -> str:
    """The device name llama-server reports for the encoder (first GPU, else CPU)."""
    if not use_gpu:
        return "CPU"
    ggml = ctypes.CDLL(libs.llama._lib._name)  # ggml's registry is reachable through libllama
    for name, restype, argtypes in (
        ("ggml_backend_dev_count", ctypes.c_size_t, []),
        ("ggml_backend_dev_get", ctypes.c_void_p, [ctypes.c_size_t]),
        ("ggml_backend_dev_type", ctypes.c_int, [ctypes.c_void_p]),
        ("ggml_backend_dev_name", ctypes.c_char_p, [ctypes.c_void_p]),
    ):
        getattr(ggml, name).restype = restype
        getattr(ggml, name).argtypes = argtypes
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        if ggml.ggml_backend_dev_type(dev) == _GGML_DEVICE_GPU:
            return str(ggml.ggml_backend_dev_name(dev).decode())
    return "CPU"


def silence_native_logs(libs: LlamaLibs) -> None:
    """Route llama.cpp's and libmtmd's logs to Python logging (``vcache.mtmd``)."""
    libs.llama.llama_log_set(_LOG_CALLBACK, None)
    libs.mtmd.mtmd_log_set(_LOG_CALLBACK, None)
    libs.mtmd.mtmd_helper_log_set(_LOG_CALLBACK, None)


# --- private -----------------------------------------------------------------------------------


# enum ggml_log_level: warnings and errors stay what they are; llama.cpp's INFO is a per-load
# flood of tensor listings, so it counts as DEBUG here
_LOG_LEVELS = {3: logging.WARNING, 4: logging.ERROR}


def _on_native_log(level: int, text: bytes | None, _user: Any) -> None:
    py_level = _LOG_LEVELS.get(level, logging.DEBUG)
    if text and text.strip() and log.isEnabledFor(py_level):
        log.log(py_level, "%s", text.decode(errors="replace").rstrip())


# kept at module level: the C side holds this pointer for the life of the process
_LOG_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)(
    _on_native_log
)


def _load_metadata(libs: LlamaLibs, text_model: Path) -> Any:
    """The text model without its weights (see the module docstring)."""
    params = libs.llama.llama_model_default_params()
    params.no_alloc = True
    params.load_mode = 0  # LLAMA_LOAD_MODE_NONE: no_alloc refuses to map the file
    params.lazy_mode = 0  # LLAMA_LAZY_MODE_OFF: lazy reading needs a mapping
    params.n_gpu_layers = 0
    model = libs.llama.llama_model_load_from_file(str(text_model).encode(), params)
    if not model:
        raise EncoderError(f"cannot read the text model's metadata from {text_model}")
    return model


@contextmanager
def _bitmap(libs: LlamaLibs, ctx: Any, image: bytes) -> Iterator[Any]:
    mtmd = libs.mtmd
    buf = (ctypes.c_uint8 * len(image)).from_buffer_copy(image)
    out = mtmd.mtmd_helper_bitmap_init_from_buf_wrapper(
        ctx, buf, len(image), False, mtmd.mtmd_helper_init_opt_default()
    )
    if out.video_ctx:
        mtmd.mtmd_helper_video_free(out.video_ctx)
        if out.bitmap:
            mtmd.mtmd_bitmap_free(out.bitmap)
        raise ImageRejected("the encoder takes images, not video")
    if not out.bitmap:
        raise ImageRejected("failed to load image")
    try:
        if mtmd.mtmd_bitmap_is_audio(out.bitmap):
            raise ImageRejected("the encoder takes images, not audio")
        yield out.bitmap
    finally:
        mtmd.mtmd_bitmap_free(out.bitmap)


@contextmanager
def _marker_chunks(libs: LlamaLibs, ctx: Any, bitmap: Any) -> Iterator[Any]:
    """The marker alone: the image's chunks come out exactly as inside a prompt."""
    mtmd = libs.mtmd
    marker = mtmd.mtmd_get_marker(ctx) or mtmd.mtmd_default_marker()
    text = mtmd.mtmd_input_text()
    text.text = marker
    text.text_len = len(marker)
    text.add_special = False
    text.parse_special = True
    chunks = mtmd.mtmd_input_chunks_init()
    try:
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        if mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 1) != 0:
            raise ImageRejected("failed to preprocess image")
        yield chunks
    finally:
        mtmd.mtmd_input_chunks_free(chunks)


def _bitmap_id(libs: LlamaLibs, bitmap: Any) -> str:
    raw = libs.mtmd.mtmd_bitmap_get_id(bitmap)
    if not raw:
        raise EncoderError("the image has no id")
    return str(raw.decode())
