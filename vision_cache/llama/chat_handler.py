"""A llama-cpp-python chat handler that decodes cached visual packages instead of encoding images.

`CachingChatHandler` is llama-cpp-python's own ``MTMDChatHandler`` (chat template, tokenization,
sampling, streaming all stay the stock code) with one step changed: before the prompt is
evaluated, each image is looked up in a vision_cache `Store`. A hit is decoded with
``mtmd_helper_decode_image_chunk`` from the stored embeddings, and the encoder does not run; a
miss is encoded as the stock handler would, stored, then decoded the same way::

    load_llama_libs(Path(".build/llama/patched-<key>/bin"))   # before importing this module
    from vision_cache.llama.chat_handler import CachingChatHandler

    handler = CachingChatHandler("mmproj.gguf", store)
    llm = Llama("model.gguf", chat_handler=handler, n_ctx=4096, verbose=False)
    llm.create_chat_completion(messages=[...])   # second time: no encode

Packages are the wire format's (docs/wire-format.md), keyed like the proxy's: a namespace built
from the mmproj identity, the llama.cpp build, the format version and the encoder settings, plus
the SHA-256 of the image bytes. A stored package is used only if its chunk metadata is
byte-identical to this handler's own tokenization of the image (the check the patched
llama-server makes), so a package made with other preprocessing is a miss, never wrong input.

How: ``MTMDChatHandler.__call__`` reaches libmtmd through ``self._mtmd_cpp``. The handler puts a
facade there that passes every call through except two: ``mtmd_tokenize`` (after which the
prompt's images are looked up, or encoded and stored) and ``mtmd_helper_eval_chunk_single``
(which, for those images, decodes the prepared embeddings). This relies on llama-cpp-python
0.3.36's handler; tests/test_chat_handler.py fails if a later version stops calling them.

Importing this module loads llama.cpp (`vision_cache.llama.libs`): call ``load_llama_libs``
first to choose the build.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import dataclasses
import itertools
import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from vision_cache.errors import PackageError
from vision_cache.keys import DIGEST_PATTERN, Namespace
from vision_cache.llama.libs import load_llama_libs
from vision_cache.llama.mtmd import (
    EncoderSettings,
    FlashAttn,
    chunk_meta,
    encode_chunk,
    encoder_device,
    image_chunks,
    init_context,
    mmproj_identity,
    silence_native_logs,
)
from vision_cache.package import FORMAT_VERSION, PackageHeader, StoredPackage
from vision_cache.store import Store

LIBS = load_llama_libs()

import llama_cpp  # noqa: E402  (after load_llama_libs: the import loads the libraries)
from llama_cpp.llama_chat_format import MTMDChatHandler  # noqa: E402

log = logging.getLogger("vcache.chat_handler")
_HEX64 = re.compile(DIGEST_PATTERN)
_NO_CALLBACK = LIBS.mtmd.mtmd_helper_post_decode_callback(0)  # NULL: no post-decode hook


@dataclasses.dataclass
class HandlerStats:
    """What the handler did since it was made (per image, not per chunk)."""

    hits: int = 0
    misses: int = 0
    encoded_chunks: int = 0
    encode_ms: float = 0.0
    # image chunks left to the stock path (encoded inside libmtmd, not stored): only images
    # without an id, which mtmd_helper_bitmap_init_from_buf always gives
    unprepared_chunks: int = 0


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """One image chunk's embeddings, ready to decode; `data` keeps the memory alive."""

    data: npt.NDArray[np.float32]
    pointer: Any


class CachingChatHandler(MTMDChatHandler):
    """``MTMDChatHandler`` with a package store in front of the vision encoder.

    ``flash_attn``: the encoder's; None does what the stock handler does (on when the Llama
    context has it on, else off). ``model`` is the namespace's model component.
    """

    def __init__(
        self,
        clip_model_path: str,
        store: Store,
        *,
        verbose: bool = False,
        use_gpu: bool = False,
        flash_attn: FlashAttn | None = None,
        image_min_tokens: int = -1,
        image_max_tokens: int = -1,
        model: str = "",
    ) -> None:
        super().__init__(clip_model_path, verbose=verbose, use_gpu=use_gpu)
        if not hasattr(self, "_mtmd_cpp"):
            raise TypeError(
                "this llama-cpp-python's MTMDChatHandler has no _mtmd_cpp: "
                "CachingChatHandler is written for llama-cpp-python 0.3.36"
            )
        self._store = store
        self._flash_attn = flash_attn
        self._token_limits = (image_min_tokens, image_max_tokens)
        self._model_name = model
        self._mmproj_id = mmproj_identity(Path(clip_model_path))
        self._namespace: Namespace | None = None
        self._n_embd = 0
        self._sizes: dict[str, tuple[int, int]] = {}  # image id -> original nx, ny
        self._prepared: dict[int, _Prepared] = {}  # chunk address -> embeddings
        self.stats = HandlerStats()
        if not verbose:
            silence_native_logs(LIBS)
        # the stock __call__ reaches libmtmd only through this attribute (see module docstring)
        self._mtmd_cpp = _StoreBackedMtmd(self)  # type: ignore[assignment]

    @property
    def namespace(self) -> Namespace:
        """The packages' namespace; known once the handler has met its Llama (first call)."""
        if self._namespace is None:
            raise RuntimeError("the namespace is known after the first chat completion")
        return self._namespace

    def _init_mtmd_context(self, llama_model: llama_cpp.Llama) -> None:
        self.verbose = llama_model.verbose
        if self.mtmd_ctx is not None:
            return
        settings = self._settings(llama_model)
        ctx = init_context(LIBS, Path(self.clip_model_path), llama_model.model, settings)
        self.mtmd_ctx = ctx
        llama_model._stack.callback(self._free_context)
        self._n_embd = int(LIBS.llama.llama_model_n_embd_inp(llama_model.model))
        device = encoder_device(LIBS, self.use_gpu)
        self._namespace = Namespace.for_encoder(
            model=self._model_name,
            mmproj=self._mmproj_id,
            build=LIBS.build_id,
            format_version=FORMAT_VERSION,
            encoder={**settings.namespace_settings(device), "n_embd": self._n_embd},
        )
        self._store.register_namespace(self._namespace)

    def _settings(self, llama_model: llama_cpp.Llama) -> EncoderSettings:
        flash_attn = self._flash_attn
        if flash_attn is None:
            llama_fa = llama_model.context_params.flash_attn_type
            flash_attn = (
                "enabled" if llama_fa == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED else "disabled"
            )
        return EncoderSettings(
            n_threads=llama_model.n_threads,
            use_gpu=self.use_gpu,
            flash_attn=flash_attn,
            image_min_tokens=self._token_limits[0],
            image_max_tokens=self._token_limits[1],
            warmup=True,
        )

    def _free_context(self) -> None:
        if self.mtmd_ctx is not None:
            LIBS.mtmd.mtmd_free(self.mtmd_ctx)
            self.mtmd_ctx = None

    def load_image(self, image_url: str) -> bytes:
        """Only ``data:`` URIs: fetching URLs is the server's job, under its fetch policy
        (the stock handler would open any URL with urllib)."""
        head, sep, data = image_url.partition(",")
        if not (head.lower().startswith("data:") and head.lower().endswith(";base64") and sep):
            raise ValueError("images must be base64 data: URIs")
        try:
            return base64.b64decode(data, validate=True)
        except binascii.Error as e:
            raise ValueError(f"image data URI is not valid base64: {e}") from e

    def _create_bitmap_from_bytes(self, image_bytes: bytes) -> Any:
        bitmap = super()._create_bitmap_from_bytes(image_bytes)
        image_id = LIBS.mtmd.mtmd_bitmap_get_id(bitmap)
        if image_id:
            self._sizes[image_id.decode()] = (
                LIBS.mtmd.mtmd_bitmap_get_nx(bitmap),
                LIBS.mtmd.mtmd_bitmap_get_ny(bitmap),
            )
        return bitmap

    # -- called through the facade ---------------------------------------------------------

    def _prepare(self, chunks: Any) -> None:
        """Embeddings for every image of a freshly tokenized prompt: stored, else encoded."""
        self._prepared.clear()
        by_image: dict[str, list[Any]] = {}
        for chunk in image_chunks(LIBS, chunks):
            image_id = LIBS.mtmd.mtmd_input_chunk_get_id(chunk)
            if image_id and _HEX64.fullmatch(image_id.decode()):
                by_image.setdefault(image_id.decode(), []).append(chunk)
        for image_id, image_chunk_list in by_image.items():
            if not self._from_store(image_id, image_chunk_list):
                self._encode_and_store(image_id, image_chunk_list)
        self._sizes.clear()

    def _from_store(self, image_id: str, chunks: list[Any]) -> bool:
        entry = self._store.get(self.namespace.key(image_id))
        if entry is None:
            return False
        try:
            header = StoredPackage.from_meta(entry.meta).header
            arrays = self._matching(header, chunks, entry.payload)
        except PackageError as e:
            log.warning("stored package %s does not fit this model: %s", image_id[:16], e)
            return False
        for chunk, data in zip(chunks, arrays, strict=True):
            self._prepared[chunk] = _prepared(data)
        self.stats.hits += 1
        return True

    def _matching(
        self, header: PackageHeader, chunks: list[Any], payload: memoryview
    ) -> list[npt.NDArray[np.float32]]:
        """The package's embeddings per chunk, if its layout is exactly ours."""
        if header.n_embd != self._n_embd or len(header.chunks) != len(chunks):
            raise PackageError("chunk count or embedding width differs")
        if len(payload) != header.payload_size:
            raise PackageError("payload size differs from the header")
        for ours, theirs in zip(chunks, header.chunks, strict=True):
            if chunk_meta(LIBS, ours) != theirs.meta:
                raise PackageError("chunk layout differs from this tokenization")
        dtype = np.float32 if header.dtype == "f32" else np.float16
        # f32 payloads are used in place (the view keeps the mapping alive), f16 ones widened
        values = np.asarray(np.frombuffer(payload, dtype=dtype), dtype=np.float32)
        bounds = np.cumsum([0] + [c.n_tokens * header.n_embd for c in header.chunks])
        return [values[a:b] for a, b in itertools.pairwise(bounds)]

    def _encode_and_store(self, image_id: str, chunks: list[Any]) -> None:
        t0 = time.perf_counter()
        parts = [encode_chunk(LIBS, self.mtmd_ctx, c, self._n_embd) for c in chunks]
        encode_ms = (time.perf_counter() - t0) * 1000.0
        self.stats.misses += 1
        self.stats.encoded_chunks += len(chunks)
        self.stats.encode_ms += encode_ms
        for chunk, (_, payload) in zip(chunks, parts, strict=True):
            self._prepared[chunk] = _prepared(np.frombuffer(payload, dtype=np.float32))
        nx, ny = self._sizes.get(image_id, (0, 0))
        if nx < 1 or ny < 1:
            return  # size unknown (not one of our bitmaps): usable now, not storable
        header = PackageHeader(
            mmproj=self._mmproj_id,
            n_embd=self._n_embd,
            dtype="f32",
            image_id=image_id,
            nx=nx,
            ny=ny,
            chunks=tuple(c for c, _ in parts),
        )
        payload = b"".join(p for _, p in parts)
        if (
            self._store.put(
                self.namespace.key(image_id), StoredPackage(header, encode_ms).to_meta(), payload
            )
            is None
        ):
            log.warning("store refused package %s: serving uncached", image_id[:16])

    def _eval_prepared(self, chunk: Any, args: tuple[Any, ...]) -> int | None:
        """Decode `chunk` from prepared embeddings; None if it has none (stock path)."""
        prepared = self._prepared.get(chunk)
        if prepared is None:
            return None
        ctx, lctx, _, n_past, seq_id, n_batch, _logits_last, new_n_past = args
        return int(
            LIBS.mtmd.mtmd_helper_decode_image_chunk(
                ctx,
                lctx,
                chunk,
                prepared.pointer,
                n_past,
                seq_id,
                n_batch,
                new_n_past,
                _NO_CALLBACK,
                None,
            )
        )


class _StoreBackedMtmd:
    """What ``MTMDChatHandler.__call__`` sees as ``llama_cpp.mtmd_cpp``."""

    def __init__(self, handler: CachingChatHandler) -> None:
        self._handler = handler

    def __getattr__(self, name: str) -> Any:
        return getattr(LIBS.mtmd, name)

    def mtmd_tokenize(self, ctx: Any, chunks: Any, text: Any, bitmaps: Any, n: int) -> int:
        res = int(LIBS.mtmd.mtmd_tokenize(ctx, chunks, text, bitmaps, n))
        if res == 0:
            self._handler._prepare(chunks)
        return res

    def mtmd_helper_eval_chunk_single(self, *args: Any) -> int:
        res = self._handler._eval_prepared(args[2], args)
        if res is not None:
            return res
        if LIBS.mtmd.mtmd_input_chunk_get_type(args[2]) != LIBS.mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
            self._handler.stats.unprepared_chunks += 1
        return int(LIBS.mtmd.mtmd_helper_eval_chunk_single(*args))


def _prepared(data: npt.NDArray[np.float32]) -> _Prepared:
    # decode only reads the embeddings: a pointer into a read-only mapping is fine
    return _Prepared(data, data.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
