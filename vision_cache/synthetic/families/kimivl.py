"""Kimi-VL: projector ``kimivl`` (MoonViT: 2-D RoPE plus an interpolated position table, pixel
unshuffle, LayerNorm + GELU MLP).

Dynamic resolution: one token per 28x28 pixels, 8 to 1024 per image. The text model is a
dense llama of Kimi-VL's width in place of its DeepSeek-style mixture of experts.
"""

from __future__ import annotations

import gguf

from vision_cache.synthetic.family import Family
from vision_cache.synthetic.preprocessing import dynamic_grid
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

SPECIALS = ("<|media_start|>", "<|media_content|>", "<|media_end|>", "<|media_pad|>")
MIN_TOKENS, MAX_TOKENS = 8, 1024


class KimiVL(Family):
    name = "kimivl"
    projector_type = "kimivl"
    text_note = "dense llama text of the real model's width in place of its MoE"

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
            rope_base=50_000.0,
        )
        vision = VisionSpec(
            n_embd=64,
            n_layer=3,
            n_head=4,
            n_ff=160,
            patch_size=28,
            image_size=448,
            n_merge=2,
            eps=1e-5,
        )
        return ModelSpec(arch=self.name, size="tiny", text=text, vision=vision, matrix_type="f32")

    def realistic_spec(self) -> ModelSpec:
        # Kimi-VL-A3B: MoonViT 1152 x 27 (patch 14, 64x64 position table), text 2048
        text = TextSpec(
            n_embd=2048,
            n_layer=2,
            n_head=16,
            n_head_kv=16,
            head_dim=128,
            n_ff=11264,
            n_ctx=32768,
            rope_base=800_000.0,
        )
        vision = VisionSpec(
            n_embd=1152,
            n_layer=27,
            n_head=16,
            n_ff=4304,
            patch_size=14,
            image_size=896,
            n_merge=2,
            eps=1e-5,
        )
        return ModelSpec(
            arch=self.name, size="realistic", text=text, vision=vision, matrix_type="f16"
        )

    def expected_image_tokens(self, size: Size, width: int, height: int) -> int:
        v = self.spec(size).vision
        cols, rows = dynamic_grid(width, height, v.patch_size * v.n_merge, MIN_TOKENS, MAX_TOKENS)
        return cols * rows

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
        v = spec.vision
        width = v.n_embd * v.n_merge**2
        norm(p, "mm.input_norm", v.n_embd, "layer")
        gelu_mlp(p, "mm.1", "mm.2", (width, width, spec.text.n_embd), shaping)

    def mmproj_kv_extra(self, w: gguf.GGUFWriter, spec: ModelSpec) -> None:
        w.add_bool("clip.use_gelu", True)
        w.add_uint32("clip.vision.projector.scale_factor", spec.vision.n_merge)


FAMILY = KimiVL()
