"""GLM-4.1V / GLM-4.5V: projector ``glm4v`` (ViT with M-RoPE and an interpolated position
table, a convolution patch merger, a SwiGLU MLP), text arch ``glm4`` with M-RoPE on part of
each head (partial rotary).

Dynamic resolution: one token per 28x28 pixels, 8 to 4096 per image.
"""

from __future__ import annotations

import math

import gguf

from vision_cache.synthetic.family import Family
from vision_cache.synthetic.gguf_file import CLIP_MEAN_STD
from vision_cache.synthetic.preprocessing import dynamic_grid
from vision_cache.synthetic.spec import ModelSpec, Shaping, Size, TextSpec, VisionSpec
from vision_cache.synthetic.tensors import Planner, norm, patch_kernel_shape, position_table
from vision_cache.synthetic.text_blocks import attention_kv, glm4_block
from vision_cache.synthetic.vocab import Vocab, chatml_vocab

SPECIALS = ("<|begin_of_image|>", "<|end_of_image|>", "<|image|>")
MIN_TOKENS, MAX_TOKENS = 8, 4096


class Glm4V(Family):
    name = "glm4v"
    projector_type = "glm4v"
    image_mean_std = CLIP_MEAN_STD

    @property
    def text_arch(self) -> str:
        return "glm4"

    def tiny_spec(self) -> ModelSpec:
        text = TextSpec(
            n_embd=128,
            n_layer=2,
            n_head=4,
            n_head_kv=2,
            head_dim=32,
            n_ff=256,
            n_ctx=8192,
            rope_base=10_000.0,
            n_rot=16,
            rope_sections=(2, 3, 3, 0),
        )
        vision = VisionSpec(
            n_embd=64,
            n_layer=3,
            n_head=4,
            n_ff=160,
            patch_size=28,
            image_size=336,
            n_merge=2,
            norm="rms",
            gated_ffn=True,
            eps=1e-5,
        )
        return ModelSpec(
            arch=self.name,
            size="tiny",
            text=text,
            vision=vision,
            matrix_type="f32",
            extra={"projector_ff": 256},
        )

    def realistic_spec(self) -> ModelSpec:
        # GLM-4.1V-9B: ViT 1536 x 24 (patch 14, 336 px position table, SwiGLU 4096), merger
        # to 4096 with a 13696-wide SwiGLU, GLM-4-9B text (4096; rotary on 64 of 128 dims,
        # M-RoPE 8/12/12)
        text = TextSpec(
            n_embd=4096,
            n_layer=2,
            n_head=32,
            n_head_kv=2,
            head_dim=128,
            n_ff=13696,
            n_ctx=32768,
            rope_base=10_000.0,
            n_rot=64,
            rope_sections=(8, 12, 12, 0),
        )
        vision = VisionSpec(
            n_embd=1536,
            n_layer=24,
            n_head=12,
            n_ff=4096,
            patch_size=14,
            image_size=336,
            n_merge=2,
            norm="rms",
            gated_ffn=True,
            eps=1e-5,
        )
        return ModelSpec(
            arch=self.name,
            size="realistic",
            text=text,
            vision=vision,
            matrix_type="f16",
            extra={"projector_ff": 13696},
        )

    def expected_image_tokens(self, size: Size, width: int, height: int) -> int:
        v = self.spec(size).vision
        cols, rows = dynamic_grid(width, height, v.patch_size * v.n_merge, MIN_TOKENS, MAX_TOKENS)
        return cols * rows

    def vocab(self) -> Vocab:
        return chatml_vocab(SPECIALS)

    def text_block(self, p: Planner, spec: ModelSpec, shaping: Shaping, blk: str) -> None:
        glm4_block(p, spec.text, shaping, blk)

    def text_kv_extra(self, w: gguf.GGUFWriter, spec: ModelSpec) -> None:
        attention_kv(w, self.text_arch, spec.text)

    def patch_embedding(self, p: Planner, spec: ModelSpec, shaping: Shaping) -> None:
        v = spec.vision
        for name in ("v.patch_embd.weight", "v.patch_embd.weight.1"):
            p.weight(name, patch_kernel_shape(v), self.patch_std(spec, shaping) / math.sqrt(2))
        p.noise("v.patch_embd.bias", v.n_embd, 0.02)
        side = v.image_size // v.patch_size
        position_table(p, "v.position_embd.weight", (side * side, v.n_embd), shaping)

    def projector(self, p: Planner, spec: ModelSpec, shaping: Shaping) -> None:
        v, d, ff, k = spec.vision, spec.text.n_embd, spec.knob("projector_ff"), spec.vision.n_merge
        # a k x k convolution over the merged patches, then linear + LayerNorm + GELU and a
        # SwiGLU MLP
        p.weight("mm.patch_merger.weight", (d, v.n_embd, k, k), 1.0 / math.sqrt(v.n_embd * k * k))
        p.noise("mm.patch_merger.bias", d, 0.02)
        p.weight("mm.model.fc.weight", (d, d), 1.0 / math.sqrt(d))
        norm(p, "mm.post_norm", d, "layer")
        p.weight("mm.gate.weight", (ff, d), 1.0 / math.sqrt(d))
        p.weight("mm.up.weight", (ff, d), 1.0 / math.sqrt(d))
        p.weight("mm.down.weight", (d, ff), 2.0 / math.sqrt(ff))

    def mmproj_kv_extra(self, w: gguf.GGUFWriter, spec: ModelSpec) -> None:
        w.add_bool("clip.use_silu", True)
        w.add_uint32("clip.vision.spatial_merge_size", spec.vision.n_merge)


FAMILY = Glm4V()
