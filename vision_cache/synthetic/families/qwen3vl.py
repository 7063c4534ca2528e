"""Qwen3-VL: projector ``qwen3vl_merger``, text arch ``qwen3vl`` (interleaved M-RoPE).

Deepstack: features taken from some tower blocks are projected to the text width and stacked
after the main embedding, so each image token is ``n_embd * (1 + n_deepstack)`` floats wide;
the text model adds slice i to the output of its layer i. A package therefore holds several
times the text width per token. Dynamic resolution as in Qwen2-VL (patch 16, 2x2 merge).
"""

from __future__ import annotations

import dataclasses
import math

import gguf

from vision_cache.synthetic.family import Family
from vision_cache.synthetic.gguf_file import CLIP_MEAN_STD
from vision_cache.synthetic.preprocessing import dynamic_grid
from vision_cache.synthetic.spec import ModelSpec, Shaping, Size, TextSpec, VisionSpec
from vision_cache.synthetic.tensors import (
    Planner,
    gelu_mlp,
    norm,
    patch_kernel_shape,
    position_table,
    vit_block,
)
from vision_cache.synthetic.text_blocks import attention_kv, qk_norm_block
from vision_cache.synthetic.vocab import Vocab, chatml_vocab

SPECIALS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>")
MIN_TOKENS, MAX_TOKENS = 8, 4096


class Qwen3VL(Family):
    name = "qwen3vl"
    projector_type = "qwen3vl_merger"
    image_mean_std = CLIP_MEAN_STD

    def tiny_spec(self) -> ModelSpec:
        text = TextSpec(
            n_embd=128,
            n_layer=3,
            n_head=4,
            n_head_kv=2,
            head_dim=32,
            n_ff=384,
            n_ctx=8192,
            rope_base=1_000_000.0,
            rope_sections=(6, 5, 5, 0),
            n_deepstack=2,
        )
        vision = VisionSpec(
            n_embd=64,
            n_layer=4,
            n_head=4,
            n_ff=160,
            patch_size=32,
            image_size=512,
            n_merge=2,
            fused_qkv=True,
        )
        return ModelSpec(
            arch=self.name,
            size="tiny",
            text=text,
            vision=vision,
            matrix_type="f32",
            extra={"deepstack_layers": (1, 2)},
        )

    def realistic_spec(self) -> ModelSpec:
        # Qwen3-VL-8B: ViT 1152 x 27 (patch 16, 48x48 position table), deepstack from blocks
        # 8, 16 and 24: 4 x 4096 floats per image token
        text = TextSpec(
            n_embd=4096,
            n_layer=4,
            n_head=32,
            n_head_kv=8,
            head_dim=128,
            n_ff=12288,
            n_ctx=32768,
            rope_base=5_000_000.0,
            rope_sections=(24, 20, 20, 0),
            n_deepstack=3,
        )
        vision = VisionSpec(
            n_embd=1152,
            n_layer=27,
            n_head=16,
            n_ff=4304,
            patch_size=16,
            image_size=768,
            n_merge=2,
            fused_qkv=True,
        )
        return ModelSpec(
            arch=self.name,
            size="realistic",
            text=text,
            vision=vision,
            matrix_type="f16",
            extra={"deepstack_layers": (8, 16, 24)},
        )

    def expected_image_tokens(self, size: Size, width: int, height: int) -> int:
        v = self.spec(size).vision
        cols, rows = dynamic_grid(width, height, v.patch_size * v.n_merge, MIN_TOKENS, MAX_TOKENS)
        return cols * rows

    def vocab(self) -> Vocab:
        return chatml_vocab(SPECIALS)

    def text_block(self, p: Planner, spec: ModelSpec, shaping: Shaping, blk: str) -> None:
        qk_norm_block(p, spec.text, shaping, blk)

    def text_kv_extra(self, w: gguf.GGUFWriter, spec: ModelSpec) -> None:
        attention_kv(w, self.text_arch, spec.text)

    def patch_embedding(self, p: Planner, spec: ModelSpec, shaping: Shaping) -> None:
        v = spec.vision
        for name in ("v.patch_embd.weight", "v.patch_embd.weight.1"):
            p.weight(name, patch_kernel_shape(v), self.patch_std(spec, shaping) / math.sqrt(2))
        p.noise("v.patch_embd.bias", v.n_embd, 0.02)
        side = v.image_size // v.patch_size
        position_table(p, "v.position_embd.weight", (side * side, v.n_embd), shaping)

    def demo_spec(self) -> ModelSpec:
        # the demo's 6-block tower: deepstack from blocks 1, 3 and 5
        return dataclasses.replace(super().demo_spec(), extra={"deepstack_layers": (1, 3, 5)})

    def vision_block(self, p: Planner, spec: ModelSpec, shaping: Shaping, layer: int) -> None:
        v = spec.vision
        vit_block(p, v, shaping, f"v.blk.{layer}")
        if layer in spec.knobs("deepstack_layers"):
            # merged 2x2 block features -> the text width, stacked after the main embedding
            width, ds = v.n_embd * v.n_merge**2, f"v.deepstack.{layer}"
            norm(p, f"{ds}.norm", width, "layer")
            gelu_mlp(p, f"{ds}.fc1", f"{ds}.fc2", (width, width, spec.text.n_embd), shaping)

    def projector(self, p: Planner, spec: ModelSpec, shaping: Shaping) -> None:
        width = spec.vision.n_embd * spec.vision.n_merge**2
        gelu_mlp(p, "mm.0", "mm.2", (width, width, spec.text.n_embd), shaping)

    def mmproj_kv_extra(self, w: gguf.GGUFWriter, spec: ModelSpec) -> None:
        w.add_bool("clip.use_gelu", True)
        w.add_uint32("clip.vision.spatial_merge_size", spec.vision.n_merge)


FAMILY = Qwen3VL()
