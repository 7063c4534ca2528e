"""InternVL 2.5 / 3: projector ``internvl`` (InternViT with a class token and layer scales,
pixel shuffle, LayerNorm + MLP), Qwen2 text.

Dynamic tiling: an image larger than one tile is resized to the grid of tiles (within
``preproc_min_tiles``..``preproc_max_tiles``) closest to its aspect ratio; the tiles and then
a thumbnail are encoded as consecutive image chunks between ``<img>`` and ``</img>``.
"""

from __future__ import annotations

import gguf

from vision_cache.synthetic.family import Family
from vision_cache.synthetic.preprocessing import internvl_candidates, pinpoint_tiles
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

SPECIALS = ("<img>", "</img>", "<IMG_CONTEXT>")
IMAGENET_MEAN_STD = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


class InternVL(Family):
    name = "internvl"
    projector_type = "internvl"
    image_mean_std = IMAGENET_MEAN_STD

    @property
    def text_arch(self) -> str:
        return "qwen2"

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
        # 128 px tiles / 16 = 8x8 patches, shuffle 2 -> 16 tokens per tile, up to 6 tiles
        vision = VisionSpec(
            n_embd=64,
            n_layer=3,
            n_head=4,
            n_ff=160,
            patch_size=16,
            image_size=128,
            n_merge=2,
            layer_scale=True,
        )
        return ModelSpec(
            arch=self.name,
            size="tiny",
            text=text,
            vision=vision,
            matrix_type="f32",
            extra={"min_tiles": 1, "max_tiles": 6},
        )

    def realistic_spec(self) -> ModelSpec:
        # InternVL3-8B: InternViT-300M (1024 x 24, 448 px, patch 14: 256 tokens per tile),
        # 1-12 tiles + thumbnail, Qwen2.5-7B text (3584)
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
            n_embd=1024,
            n_layer=24,
            n_head=16,
            n_ff=4096,
            patch_size=14,
            image_size=448,
            n_merge=2,
            layer_scale=True,
        )
        return ModelSpec(
            arch=self.name,
            size="realistic",
            text=text,
            vision=vision,
            matrix_type="f16",
            extra={"min_tiles": 1, "max_tiles": 12},
        )

    def expected_image_tokens(self, size: Size, width: int, height: int) -> int:
        spec = self.spec(size)
        v = spec.vision
        per_tile = (v.image_size // v.patch_size // v.n_merge) ** 2
        candidates = internvl_candidates(
            v.image_size, spec.knob("min_tiles"), spec.knob("max_tiles")
        )
        return (pinpoint_tiles(width, height, v.image_size, candidates) + 1) * per_tile

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
        p.noise("v.class_embd", v.n_embd, 1.0)
        side = v.image_size // v.patch_size
        position_table(p, "v.position_embd.weight", (side * side + 1, v.n_embd), shaping)

    def post_norm(self, p: Planner, spec: ModelSpec) -> None:
        """InternViT has no norm after its last block."""

    def projector(self, p: Planner, spec: ModelSpec, shaping: Shaping) -> None:
        d, width = spec.text.n_embd, spec.vision.n_embd * spec.vision.n_merge**2
        norm(p, "mm.model.mlp.0", width, "layer")
        gelu_mlp(p, "mm.model.mlp.1", "mm.model.mlp.3", (width, d, d), shaping)

    def mmproj_kv_extra(self, w: gguf.GGUFWriter, spec: ModelSpec) -> None:
        w.add_bool("clip.use_gelu", True)
        w.add_uint32("clip.vision.projector.scale_factor", spec.vision.n_merge)
        w.add_uint32("clip.vision.preproc_min_tiles", spec.knob("min_tiles"))
        w.add_uint32("clip.vision.preproc_max_tiles", spec.knob("max_tiles"))


FAMILY = InternVL()
