"""LLaVA-1.5 style: projector ``mlp`` (CLIP ViT with a class token, two-layer MLP), llama text.

Every image is resized to the tower's square input, so the token count is fixed. The tower's
last block is not used (LLaVA reads the second-to-last layer).
"""

from __future__ import annotations

import gguf

from vision_cache.synthetic.family import Family
from vision_cache.synthetic.gguf_file import CLIP_MEAN_STD
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


class Llava(Family):
    name = "llava"
    projector_type = "mlp"
    image_mean_std = CLIP_MEAN_STD

    @property
    def text_arch(self) -> str:
        return "llama"

    def tiny_spec(self) -> ModelSpec:
        text = TextSpec(
            n_embd=128,
            n_layer=2,
            n_head=4,
            n_head_kv=4,
            head_dim=32,
            n_ff=384,
            n_ctx=8192,
            rope_base=10_000.0,
        )
        # 224 px / 28 = 8x8 patches: 64 image tokens
        vision = VisionSpec(
            n_embd=64, n_layer=3, n_head=4, n_ff=160, patch_size=28, image_size=224, n_merge=1
        )
        return ModelSpec(arch=self.name, size="tiny", text=text, vision=vision, matrix_type="f32")

    def realistic_spec(self) -> ModelSpec:
        # LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (24 blocks, 576 tokens), Vicuna-7B (4096)
        text = TextSpec(
            n_embd=4096,
            n_layer=2,
            n_head=32,
            n_head_kv=32,
            head_dim=128,
            n_ff=11008,
            n_ctx=4096,
            rope_base=10_000.0,
        )
        vision = VisionSpec(
            n_embd=1024,
            n_layer=24,
            n_head=16,
            n_ff=4096,
            patch_size=14,
            image_size=336,
            n_merge=1,
            eps=1e-5,
        )
        return ModelSpec(
            arch=self.name, size="realistic", text=text, vision=vision, matrix_type="f16"
        )

    def expected_image_tokens(self, size: Size, width: int, height: int) -> int:
        v = self.spec(size).vision
        return (v.image_size // v.patch_size) ** 2

    def vocab(self) -> Vocab:
        return chatml_vocab()

    def text_block(self, p: Planner, spec: ModelSpec, shaping: Shaping, blk: str) -> None:
        llama_block(p, spec.text, shaping, blk)

    def text_kv_extra(self, w: gguf.GGUFWriter, spec: ModelSpec) -> None:
        attention_kv(w, self.text_arch, spec.text)

    def patch_embedding(self, p: Planner, spec: ModelSpec, shaping: Shaping) -> None:
        v = spec.vision
        p.weight("v.patch_embd.weight", patch_kernel_shape(v), self.patch_std(spec, shaping))
        p.noise("v.class_embd", v.n_embd, 1.0)
        n_pos = (v.image_size // v.patch_size) ** 2 + 1
        position_table(p, "v.position_embd.weight", (n_pos, v.n_embd), shaping)
        norm(p, "v.pre_ln", v.n_embd, "layer")

    def post_norm(self, p: Planner, spec: ModelSpec) -> None:
        """LLaVA reads the tower before its final norm."""

    def projector(self, p: Planner, spec: ModelSpec, shaping: Shaping) -> None:
        d = spec.text.n_embd
        gelu_mlp(p, "mm.0", "mm.2", (spec.vision.n_embd, d, d), shaping)


FAMILY = Llava()
