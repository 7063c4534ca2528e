"""Llama 4: projector ``llama4`` (ViT with a class token and 2-D RoPE, pixel shuffle, a GELU
MLP and a linear map, none with biases).

Images larger than one tile are cut into up to 3x3 square tiles, followed by an overview:
consecutive image chunks between ``<|image_start|>`` and ``<|image_end|>``. The text model is
a dense llama of Llama 4 Scout's width in place of its mixture of experts: the text side reads
image embeddings like any others, and a MoE would make the test model far bigger.
"""

from __future__ import annotations

import math

import gguf

from vision_cache.synthetic.family import Family
from vision_cache.synthetic.gguf_file import CLIP_MEAN_STD
from vision_cache.synthetic.preprocessing import grid_candidates, pinpoint_tiles
from vision_cache.synthetic.spec import ModelSpec, Shaping, Size, TextSpec, VisionSpec
from vision_cache.synthetic.tensors import Planner, norm, position_table
from vision_cache.synthetic.text_blocks import attention_kv, llama_block
from vision_cache.synthetic.vocab import Vocab, chatml_vocab

SPECIALS = (
    "<|image_start|>",
    "<|image_end|>",
    "<|image|>",
    "<|patch|>",
    "<|tile_x_separator|>",
    "<|tile_y_separator|>",
)
# The adapter has no biases, so GELU cannot be centred as elsewhere: its inputs are kept
# small (GELU is then ~x/2) and the next layer scales back up.
_GELU_IN_STD = 0.25
_TILES_PER_SIDE = 3  # clip.cpp: set_llava_uhd_res_candidates(model, 3)


class Llama4(Family):
    name = "llama4"
    projector_type = "llama4"
    image_mean_std = CLIP_MEAN_STD
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
            rope_base=500_000.0,
        )
        # 224 px tiles / 28 = 8x8 patches, shuffle 2 -> 16 tokens per tile
        vision = VisionSpec(
            n_embd=64,
            n_layer=3,
            n_head=4,
            n_ff=160,
            patch_size=28,
            image_size=224,
            n_merge=2,
            eps=1e-5,
        )
        return ModelSpec(
            arch=self.name,
            size="tiny",
            text=text,
            vision=vision,
            matrix_type="f32",
            extra={"adapter": 128},
        )

    def realistic_spec(self) -> ModelSpec:
        # Llama-4-Scout: ViT 1408 x 34 (336 px tiles, patch 14: 144 tokens per tile),
        # adapter 5632 -> 4096 -> 4096, text 5120
        text = TextSpec(
            n_embd=5120,
            n_layer=2,
            n_head=40,
            n_head_kv=8,
            head_dim=128,
            n_ff=8192,
            n_ctx=32768,
            rope_base=500_000.0,
        )
        vision = VisionSpec(
            n_embd=1408,
            n_layer=34,
            n_head=16,
            n_ff=5632,
            patch_size=14,
            image_size=336,
            n_merge=2,
            eps=1e-5,
        )
        return ModelSpec(
            arch=self.name,
            size="realistic",
            text=text,
            vision=vision,
            matrix_type="f16",
            extra={"adapter": 4096},
        )

    def expected_image_tokens(self, size: Size, width: int, height: int) -> int:
        v = self.spec(size).vision
        per_tile = (v.image_size // v.patch_size // v.n_merge) ** 2
        candidates = grid_candidates(v.image_size, _TILES_PER_SIDE)
        return (pinpoint_tiles(width, height, v.image_size, candidates) + 1) * per_tile

    def vocab(self) -> Vocab:
        return chatml_vocab(SPECIALS)

    def text_block(self, p: Planner, spec: ModelSpec, shaping: Shaping, blk: str) -> None:
        llama_block(p, spec.text, shaping, blk)

    def text_kv_extra(self, w: gguf.GGUFWriter, spec: ModelSpec) -> None:
        attention_kv(w, self.text_arch, spec.text)

    def patch_embedding(self, p: Planner, spec: ModelSpec, shaping: Shaping) -> None:
        v = spec.vision
        # Llama4UnfoldConvolution: a linear map of the flattened patch
        p.weight(
            "v.patch_embd.weight", (v.n_embd, 3 * v.patch_size**2), self.patch_std(spec, shaping)
        )
        p.noise("v.class_embd", v.n_embd, 1.0)
        side = v.image_size // v.patch_size
        position_table(p, "v.position_embd.weight", (side * side + 1, v.n_embd), shaping)
        norm(p, "v.pre_ln", v.n_embd, "layer")

    def projector(self, p: Planner, spec: ModelSpec, shaping: Shaping) -> None:
        v, d, a = spec.vision, spec.text.n_embd, spec.knob("adapter")
        width = v.n_embd * v.n_merge**2
        p.weight("mm.model.mlp.1.weight", (a, width), _GELU_IN_STD / math.sqrt(width))
        # GELU(x) ~ x/2: x2 restores the scale, the next GELU gets small inputs again
        p.weight("mm.model.mlp.2.weight", (a, a), 2.0 / math.sqrt(a))
        p.weight("mm.model.fc.weight", (d, a), 1.0 / (0.5 * _GELU_IN_STD) / math.sqrt(a))

    def mmproj_kv_extra(self, w: gguf.GGUFWriter, spec: ModelSpec) -> None:
        w.add_bool("clip.use_gelu", True)
        w.add_uint32("clip.vision.projector.scale_factor", spec.vision.n_merge)


FAMILY = Llama4()
