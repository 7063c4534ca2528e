"""MiniCPM-V 2.6: projector ``resampler`` (SigLIP, then a cross-attention resampler with a
fixed number of queries per slice), Qwen2 text.

An image larger than one slice becomes an overview plus up to 9 slices, with text between the
image chunks: ``<image>``...``</image>`` around the overview, ``<slice>``...``</slice>``
around each slice, ``\\n`` after each row of slices. Every chunk has ``query_num`` tokens.
"""

from __future__ import annotations

import math

import gguf

from vision_cache.synthetic.family import Family
from vision_cache.synthetic.preprocessing import uhd_slices
from vision_cache.synthetic.spec import ModelSpec, Shaping, Size, TextSpec, VisionSpec
from vision_cache.synthetic.tensors import (
    Planner,
    norm,
    patch_kernel_shape,
    position_table,
    uniform,
)
from vision_cache.synthetic.text_blocks import attention_kv, llama_block
from vision_cache.synthetic.vocab import Vocab, chatml_vocab

SPECIALS = ("<image>", "</image>", "<slice>", "</slice>")
_VERSION = 3  # clip.minicpmv_version of MiniCPM-V 2.6
_POSITION_BUCKETS = 70  # clip.cpp buckets patch positions on a 70x70 table
# Resampler queries and keys scaled up: each query reads a few patches, not their average.
_QUERY_GAIN = 3.0


class MiniCPMV(Family):
    name = "minicpmv"
    projector_type = "resampler"

    @property
    def text_arch(self) -> str:
        return "qwen2"

    def tiny_spec(self) -> ModelSpec:
        # the resampler's heads are 128 wide, so the text width is a multiple of 128
        text = TextSpec(
            n_embd=128,
            n_layer=2,
            n_head=4,
            n_head_kv=2,
            head_dim=32,
            n_ff=384,
            n_ctx=8192,
            rope_base=1_000_000.0,
        )
        # 112 px slices / 14 = 8x8 patches -> 16 queries per slice
        vision = VisionSpec(
            n_embd=64, n_layer=3, n_head=4, n_ff=160, patch_size=14, image_size=112, n_merge=1
        )
        return ModelSpec(
            arch=self.name,
            size="tiny",
            text=text,
            vision=vision,
            matrix_type="f32",
            extra={"query_num": 16},
        )

    def realistic_spec(self) -> ModelSpec:
        # MiniCPM-V 2.6: SigLIP 1152 x 27 (448 px slices, patch 14), 64 queries per slice,
        # Qwen2-7B text (3584)
        text = TextSpec(
            n_embd=3584,
            n_layer=2,
            n_head=28,
            n_head_kv=4,
            head_dim=128,
            n_ff=18944,
            n_ctx=32768,
            rope_base=1_000_000.0,
        )
        vision = VisionSpec(
            n_embd=1152, n_layer=27, n_head=16, n_ff=4304, patch_size=14, image_size=448, n_merge=1
        )
        return ModelSpec(
            arch=self.name,
            size="realistic",
            text=text,
            vision=vision,
            matrix_type="f16",
            extra={"query_num": 64},
        )

    def expected_image_tokens(self, size: Size, width: int, height: int) -> int:
        spec = self.spec(size)
        slices = uhd_slices(width, height, spec.vision.image_size)
        return (slices + 1) * spec.knob("query_num")

    def vocab(self) -> Vocab:
        return chatml_vocab(SPECIALS)

    def text_block(self, p: Planner, spec: ModelSpec, shaping: Shaping, blk: str) -> None:
        llama_block(p, spec.text, shaping, blk, qkv_bias=True)

    def text_kv_extra(self, w: gguf.GGUFWriter, spec: ModelSpec) -> None:
        attention_kv(w, self.text_arch, spec.text)

    def patch_embedding(self, p: Planner, spec: ModelSpec, shaping: Shaping) -> None:
        v = spec.vision
        p.weight("v.patch_embd.weight", patch_kernel_shape(v), self.patch_std(spec, shaping))
        p.noise("v.patch_embd.bias", v.n_embd, 0.02)
        position_table(p, "v.position_embd.weight", (_POSITION_BUCKETS**2, v.n_embd), shaping)

    def projector(self, p: Planner, spec: ModelSpec, shaping: Shaping) -> None:
        d, q, seed = spec.text.n_embd, spec.knob("query_num"), p.seed
        p.add(
            "resampler.query",
            (q, d),
            lambda: uniform(seed, "resampler.query", (q, d), 1.0),
            matrix=False,
        )
        # required by the loader, unused by the graph (positions are computed)
        p.add(
            "resampler.pos_embed_k",
            (q, d),
            lambda: uniform(seed, "pos_embed_k", (q, d), 0.0),
            matrix=False,
        )
        p.weight(
            "resampler.kv.weight", (d, spec.vision.n_embd), 1.0 / math.sqrt(spec.vision.n_embd)
        )
        for which in ("q", "kv", "post"):
            norm(p, f"resampler.ln_{which}", d, "layer")
        for which, gain in (("q", _QUERY_GAIN), ("k", _QUERY_GAIN), ("v", 1.0), ("out", 1.0)):
            p.weight(f"resampler.attn.{which}.weight", (d, d), gain / math.sqrt(d))
            p.noise(f"resampler.attn.{which}.bias", d, 0.02)
        p.weight("resampler.proj.weight", (d, d), 1.0 / math.sqrt(d))

    def mmproj_kv_extra(self, w: gguf.GGUFWriter, spec: ModelSpec) -> None:
        w.add_bool("clip.use_gelu", True)
        w.add_int32("clip.minicpmv_version", _VERSION)
        w.add_uint32("clip.minicpmv_query_num", spec.knob("query_num"))


FAMILY = MiniCPMV()
