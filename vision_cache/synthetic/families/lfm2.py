"""LFM2-VL: projector ``lfm2`` (SigLIP2 NaFlex with an interpolated position table, pixel
unshuffle, LayerNorm + GELU MLP).

An image within twice the 256-token budget is encoded whole (64-256 tokens); a larger one
becomes 512 px tiles, each after an ``<|img_row_R_col_C|>`` marker, plus a thumbnail after
``<|img_thumbnail|>``: several image chunks with text between them. The text model is a
dense llama of LFM2's width in place of its hybrid convolution model, which reads image
embeddings like any others.
"""

from __future__ import annotations

import gguf

from vision_cache.synthetic.family import Family
from vision_cache.synthetic.preprocessing import dynamic_grid, lfm2_tiles
from vision_cache.synthetic.spec import ModelSpec, Shaping, Size, TextSpec, VisionSpec
from vision_cache.synthetic.tensors import (
    Planner,
    gelu_mlp,
    norm,
    patch_kernel_shape,
    position_table,
)
from vision_cache.synthetic.text_blocks import attention_kv, llama_block
from vision_cache.synthetic.vocab import Vocab, chatml_vocab

SPECIALS = (
    "<|image_start|>",
    "<|image_end|>",
    "<|img_thumbnail|>",
    *(f"<|img_row_{r}_col_{c}|>" for r in range(1, 11) for c in range(1, 11)),
)
MIN_TOKENS, MAX_TOKENS = 64, 256  # clip.cpp: set_limit_image_tokens(64, 256)
TILE = 512


class Lfm2(Family):
    name = "lfm2"
    projector_type = "lfm2"
    text_note = "dense llama text of the real model's width in place of its hybrid convolution"

    @property
    def text_arch(self) -> str:
        return "llama"

    def tiny_spec(self) -> ModelSpec:
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
        # the real patch and the fixed 512 px tiles: 256 tokens per tile
        vision = VisionSpec(
            n_embd=64, n_layer=2, n_head=4, n_ff=160, patch_size=16, image_size=256, n_merge=2
        )
        return ModelSpec(arch=self.name, size="tiny", text=text, vision=vision, matrix_type="f32")

    def realistic_spec(self) -> ModelSpec:
        # LFM2-VL-1.6B: SigLIP2 NaFlex 1152 x 27 (patch 16), LFM2-1.2B width (2048)
        text = TextSpec(
            n_embd=2048,
            n_layer=2,
            n_head=32,
            n_head_kv=8,
            head_dim=64,
            n_ff=8192,
            n_ctx=32768,
            rope_base=1_000_000.0,
        )
        vision = VisionSpec(
            n_embd=1152, n_layer=27, n_head=16, n_ff=4304, patch_size=16, image_size=256, n_merge=2
        )
        return ModelSpec(
            arch=self.name, size="realistic", text=text, vision=vision, matrix_type="f16"
        )

    def expected_image_tokens(self, size: Size, width: int, height: int) -> int:
        v = self.spec(size).vision
        align = v.patch_size * v.n_merge
        cols, rows = dynamic_grid(width, height, align, MIN_TOKENS, MAX_TOKENS)
        grid = lfm2_tiles(width, height, align, v.patch_size, MAX_TOKENS * align * align)
        return cols * rows + grid[0] * grid[1] * (TILE // align) ** 2

    def vocab(self) -> Vocab:
        return chatml_vocab(SPECIALS)

    def text_block(self, p: Planner, spec: ModelSpec, shaping: Shaping, blk: str) -> None:
        llama_block(p, spec.text, shaping, blk)

    def text_kv_extra(self, w: gguf.GGUFWriter, spec: ModelSpec) -> None:
        attention_kv(w, self.text_arch, spec.text)

    def patch_embedding(self, p: Planner, spec: ModelSpec, shaping: Shaping) -> None:
        v = spec.vision
        p.weight("v.patch_embd.weight", patch_kernel_shape(v), self.patch_std(spec, shaping))
        p.noise("v.patch_embd.bias", v.n_embd, 0.02)
        side = v.image_size // v.patch_size
        position_table(p, "v.position_embd.weight", (side * side, v.n_embd), shaping)

    def projector(self, p: Planner, spec: ModelSpec, shaping: Shaping) -> None:
        d, width = spec.text.n_embd, spec.vision.n_embd * spec.vision.n_merge**2
        norm(p, "mm.input_norm", width, "layer")
        gelu_mlp(p, "mm.1", "mm.2", (width, d, d), shaping)

    def mmproj_kv_extra(self, w: gguf.GGUFWriter, spec: ModelSpec) -> None:
        w.add_bool("clip.use_gelu", True)
        w.add_uint32("clip.vision.projector.scale_factor", spec.vision.n_merge)


FAMILY = Lfm2()
