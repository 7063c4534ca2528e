"""Qwen2.5-VL: projector ``qwen2.5vl_merger``, text arch ``qwen2vl`` (M-RoPE).

The tower attends within 112 px windows except in every n-th layer (window attention), uses
RMS norms and a SwiGLU FFN; images keep their aspect ratio, one token per 28x28 pixels
(patch 14, 2x2 merge), between 8 and 4096 tokens.
"""

from __future__ import annotations

import math

import gguf

from vision_cache.synthetic.family import Family
from vision_cache.synthetic.gguf_file import CLIP_MEAN_STD
from vision_cache.synthetic.preprocessing import dynamic_grid
from vision_cache.synthetic.spec import ModelSpec, Shaping, Size, TextSpec, VisionSpec
from vision_cache.synthetic.tensors import Planner, gelu_mlp, patch_kernel_shape
from vision_cache.synthetic.text_blocks import attention_kv, llama_block
from vision_cache.synthetic.vocab import Vocab, chatml_vocab

SPECIALS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>")
# clip.cpp's token limits for Qwen-VL images (set_limit_image_tokens(8, 4096))
MIN_TOKENS, MAX_TOKENS = 8, 4096


class Qwen25VL(Family):
    name = "qwen25vl"
    projector_type = "qwen2.5vl_merger"
    image_mean_std = CLIP_MEAN_STD

    @property
    def text_arch(self) -> str:
        return "qwen2vl"

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
            rope_sections=(4, 6, 6, 0),
        )
        # 28 px patches: the 112 px windows are 2x2 merged tokens, so every image but the
        # smallest has several windows; full attention in every second layer.
        vision = VisionSpec(
            n_embd=64,
            n_layer=4,
            n_head=4,
            n_ff=160,
            patch_size=28,
            image_size=560,
            n_merge=2,
            norm="rms",
            gated_ffn=True,
        )
        return ModelSpec(
            arch=self.name,
            size="tiny",
            text=text,
            vision=vision,
            matrix_type="f32",
            extra={"n_wa_pattern": 2},
        )

    def realistic_spec(self) -> ModelSpec:
        # Qwen2.5-VL-7B: ViT 1280 x 32 (full attention every 8th block), text 3584
        text = TextSpec(
            n_embd=3584,
            n_layer=2,
            n_head=28,
            n_head_kv=4,
            head_dim=128,
            n_ff=18944,
            n_ctx=32768,
            rope_base=1_000_000.0,
            rope_sections=(16, 24, 24, 0),
        )
        vision = VisionSpec(
            n_embd=1280,
            n_layer=32,
            n_head=16,
            n_ff=3420,
            patch_size=14,
            image_size=560,
            n_merge=2,
            norm="rms",
            gated_ffn=True,
        )
        return ModelSpec(
            arch=self.name,
            size="realistic",
            text=text,
            vision=vision,
            matrix_type="f16",
            extra={"n_wa_pattern": 8},
        )

    def expected_image_tokens(self, size: Size, width: int, height: int) -> int:
        v = self.spec(size).vision
        cols, rows = dynamic_grid(width, height, v.patch_size * v.n_merge, MIN_TOKENS, MAX_TOKENS)
        return cols * rows

    def vocab(self) -> Vocab:
        return chatml_vocab(SPECIALS)

    def text_block(self, p: Planner, spec: ModelSpec, shaping: Shaping, blk: str) -> None:
        llama_block(p, spec.text, shaping, blk, qkv_bias=True)

    def text_kv_extra(self, w: gguf.GGUFWriter, spec: ModelSpec) -> None:
        attention_kv(w, self.text_arch, spec.text)

    def patch_embedding(self, p: Planner, spec: ModelSpec, shaping: Shaping) -> None:
        # Two temporal kernels, both applied to a still image: split the gain between them.
        for name in ("v.patch_embd.weight", "v.patch_embd.weight.1"):
            p.weight(
                name, patch_kernel_shape(spec.vision), self.patch_std(spec, shaping) / math.sqrt(2)
            )

    def projector(self, p: Planner, spec: ModelSpec, shaping: Shaping) -> None:
        # 2x2 neighbouring patches concatenated -> mm.0 -> GELU -> mm.2 -> text width
        width = 4 * spec.vision.n_embd
        gelu_mlp(p, "mm.0", "mm.2", (width, width, spec.text.n_embd), shaping)

    def mmproj_kv_extra(self, w: gguf.GGUFWriter, spec: ModelSpec) -> None:
        w.add_bool("clip.use_silu", True)
        w.add_uint32("clip.vision.spatial_merge_size", spec.vision.n_merge)
        w.add_uint32("clip.vision.n_wa_pattern", spec.knob("n_wa_pattern"))


FAMILY = Qwen25VL()
