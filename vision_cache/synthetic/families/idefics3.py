"""SmolVLM / Idefics3: projector ``idefics3`` (SigLIP, pixel shuffle, one linear map), llama
text.

The image's longest side is resized to ``preproc_image_size`` and cut into tower-sized tiles,
plus a global view: several image chunks with text between them
(``<fake_token_around_image><row_R_col_C>`` before each tile, ``\\n`` after each row,
``<global-img>`` before the global view).
"""

from __future__ import annotations

import math

import gguf

from vision_cache.synthetic.family import Family
from vision_cache.synthetic.preprocessing import longest_edge_tiles
from vision_cache.synthetic.spec import ModelSpec, Shaping, Size, TextSpec, VisionSpec
from vision_cache.synthetic.tensors import Planner, patch_kernel_shape, position_table
from vision_cache.synthetic.text_blocks import attention_kv, llama_block
from vision_cache.synthetic.vocab import Vocab, chatml_vocab

SPECIALS = (
    "<fake_token_around_image>",
    "<global-img>",
    "<image>",
    *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)),
)


class Idefics3(Family):
    name = "idefics3"
    projector_type = "idefics3"

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
            rope_base=100_000.0,
        )
        # 128 px tiles / 16 = 8x8 patches, shuffle 2 -> 16 tokens per tile; the longest side
        # goes to 256 px, so an image is 2-4 tiles plus the global view
        vision = VisionSpec(
            n_embd=64, n_layer=3, n_head=4, n_ff=160, patch_size=16, image_size=128, n_merge=2
        )
        return ModelSpec(
            arch=self.name,
            size="tiny",
            text=text,
            vision=vision,
            matrix_type="f32",
            extra={"longest_edge": 256},
        )

    def realistic_spec(self) -> ModelSpec:
        # SmolVLM2-2.2B: SigLIP 1152 x 27 (384 px tiles, 27x27 patches, shuffle 3 -> 81
        # tokens per tile), longest side 1536 (up to 4x4 tiles), SmolLM2-1.7B text (2048)
        text = TextSpec(
            n_embd=2048,
            n_layer=2,
            n_head=32,
            n_head_kv=32,
            head_dim=64,
            n_ff=8192,
            n_ctx=16384,
            rope_base=130_000.0,
        )
        vision = VisionSpec(
            n_embd=1152, n_layer=27, n_head=16, n_ff=4304, patch_size=14, image_size=384, n_merge=3
        )
        return ModelSpec(
            arch=self.name,
            size="realistic",
            text=text,
            vision=vision,
            matrix_type="f16",
            extra={"longest_edge": 1536},
        )

    def expected_image_tokens(self, size: Size, width: int, height: int) -> int:
        spec = self.spec(size)
        v = spec.vision
        per_tile = (v.image_size // v.patch_size // v.n_merge) ** 2
        tiles = longest_edge_tiles(width, height, v.image_size, spec.knob("longest_edge"))
        return (tiles + 1) * per_tile

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
        width = spec.vision.n_embd * spec.vision.n_merge**2
        p.weight("mm.model.fc.weight", (spec.text.n_embd, width), 1.0 / math.sqrt(width))

    def mmproj_kv_extra(self, w: gguf.GGUFWriter, spec: ModelSpec) -> None:
        w.add_bool("clip.use_gelu", True)
        w.add_uint32("clip.vision.projector.scale_factor", spec.vision.n_merge)
        w.add_uint32("clip.vision.preproc_image_size", spec.knob("longest_edge"))


FAMILY = Idefics3()
