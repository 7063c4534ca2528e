"""Janus-Pro: projector ``janus_pro`` (SigLIP, two-layer MLP), fixed square input, llama text.

Kept off the verified-projector list on purpose: it is the unverified control, the family
tests use to show that vcache forwards raw images for a projector type nobody has proven.
"""

from __future__ import annotations

import gguf

from vision_cache.synthetic.family import Family
from vision_cache.synthetic.spec import ModelSpec, Shaping, Size, TextSpec, VisionSpec
from vision_cache.synthetic.tensors import Planner, gelu_mlp, patch_kernel_shape, position_table
from vision_cache.synthetic.text_blocks import attention_kv, llama_block
from vision_cache.synthetic.vocab import Vocab, chatml_vocab


class Janus(Family):
    name = "janus"
    projector_type = "janus_pro"

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
        vision = VisionSpec(
            n_embd=64, n_layer=2, n_head=4, n_ff=160, patch_size=32, image_size=256, n_merge=1
        )
        return ModelSpec(arch=self.name, size="tiny", text=text, vision=vision, matrix_type="f32")

    def realistic_spec(self) -> ModelSpec:
        # Janus-Pro-7B: SigLIP-L at 384 px (patch 16, 576 tokens), llama text 4096
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
            n_embd=1024, n_layer=24, n_head=16, n_ff=4096, patch_size=16, image_size=384, n_merge=1
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
        p.noise("v.patch_embd.bias", v.n_embd, 0.02)
        n_pos = (v.image_size // v.patch_size) ** 2
        position_table(p, "v.position_embd.weight", (n_pos, v.n_embd), shaping)

    def projector(self, p: Planner, spec: ModelSpec, shaping: Shaping) -> None:
        d = spec.text.n_embd
        gelu_mlp(p, "mm.0", "mm.1", (spec.vision.n_embd, d, d), shaping)

    def mmproj_kv_extra(self, w: gguf.GGUFWriter, spec: ModelSpec) -> None:
        w.add_bool("clip.use_gelu", True)


FAMILY = Janus()
