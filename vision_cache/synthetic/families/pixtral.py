"""Mistral Small 3.1 / 3.2 and Pixtral: projector ``pixtral`` (ViT with 2-D RoPE, RMS norms
and SwiGLU, a 2x2 patch merger, a GELU MLP), llama text.

The projector itself puts an ``[IMG_BREAK]`` embedding (a learned vector in the mmproj) after
every row of tokens but the last, so the package holds those rows too; ``[IMG_END]`` follows
as text. Dynamic resolution: one token per 28x28 pixels, 8 to 1024 per image.
"""

from __future__ import annotations

import math

import gguf

from vision_cache.synthetic.family import Family
from vision_cache.synthetic.gguf_file import CLIP_MEAN_STD
from vision_cache.synthetic.preprocessing import dynamic_grid
from vision_cache.synthetic.spec import ModelSpec, Shaping, Size, TextSpec, VisionSpec
from vision_cache.synthetic.tensors import Planner, gelu_mlp, norm, patch_kernel_shape
from vision_cache.synthetic.text_blocks import attention_kv, llama_block
from vision_cache.synthetic.vocab import Vocab, chatml_vocab

SPECIALS = ("[IMG]", "[IMG_BREAK]", "[IMG_END]")
MIN_TOKENS, MAX_TOKENS = 8, 1024


class Pixtral(Family):
    name = "pixtral"
    projector_type = "pixtral"
    image_mean_std = CLIP_MEAN_STD

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
        # 32 px patches, 2x2 merge: one token per 64x64 pixels, plus a break per row
        vision = VisionSpec(
            n_embd=64,
            n_layer=3,
            n_head=4,
            n_ff=160,
            patch_size=32,
            image_size=1024,
            n_merge=2,
            norm="rms",
            gated_ffn=True,
            qkv_bias=False,
            eps=1e-5,
        )
        return ModelSpec(arch=self.name, size="tiny", text=text, vision=vision, matrix_type="f32")

    def realistic_spec(self) -> ModelSpec:
        # Mistral-Small-3.1-24B: ViT 1024 x 24 (patch 14, up to 1540 px), text 5120
        text = TextSpec(
            n_embd=5120,
            n_layer=2,
            n_head=32,
            n_head_kv=8,
            head_dim=128,
            n_ff=32768,
            n_ctx=32768,
            rope_base=1_000_000_000.0,
        )
        vision = VisionSpec(
            n_embd=1024,
            n_layer=24,
            n_head=16,
            n_ff=4096,
            patch_size=14,
            image_size=1540,
            n_merge=2,
            norm="rms",
            gated_ffn=True,
            qkv_bias=False,
            eps=1e-5,
        )
        return ModelSpec(
            arch=self.name, size="realistic", text=text, vision=vision, matrix_type="f16"
        )

    def expected_image_tokens(self, size: Size, width: int, height: int) -> int:
        v = self.spec(size).vision
        cols, rows = dynamic_grid(width, height, v.patch_size * v.n_merge, MIN_TOKENS, MAX_TOKENS)
        return cols * rows + rows - 1  # one [IMG_BREAK] after each row but the last

    def vocab(self) -> Vocab:
        return chatml_vocab(SPECIALS)

    def text_block(self, p: Planner, spec: ModelSpec, shaping: Shaping, blk: str) -> None:
        llama_block(p, spec.text, shaping, blk)

    def text_kv_extra(self, w: gguf.GGUFWriter, spec: ModelSpec) -> None:
        attention_kv(w, self.text_arch, spec.text)

    def patch_embedding(self, p: Planner, spec: ModelSpec, shaping: Shaping) -> None:
        v = spec.vision
        p.weight("v.patch_embd.weight", patch_kernel_shape(v), self.patch_std(spec, shaping))
        norm(p, "v.pre_ln", v.n_embd, "rms")

    def post_norm(self, p: Planner, spec: ModelSpec) -> None:
        """Pixtral's tower ends with its last block; the merger has its own norm."""

    def projector(self, p: Planner, spec: ModelSpec, shaping: Shaping) -> None:
        v, d = spec.vision, spec.text.n_embd
        width = v.n_embd * v.n_merge**2
        p.const("mm.input_norm.weight", v.n_embd, 1.0)
        p.weight("mm.patch_merger.weight", (v.n_embd, width), 1.0 / math.sqrt(width))
        gelu_mlp(p, "mm.1", "mm.2", (v.n_embd, d, d), shaping)
        p.noise("v.token_embd.img_break", d, 1.0)

    def mmproj_kv_extra(self, w: gguf.GGUFWriter, spec: ModelSpec) -> None:
        w.add_bool("clip.use_silu", True)
        w.add_uint32("clip.vision.spatial_merge_size", spec.vision.n_merge)


FAMILY = Pixtral()
