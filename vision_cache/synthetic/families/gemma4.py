"""Gemma 4: projector ``gemma4v`` (variable-resolution ViT: x and y position tables plus 2-D
RoPE, Q/K norms, unscaled attention, sandwich norms; 3x3 average pooling; RMS norm + linear
map), text arch ``gemma4``.

Image tokens attend to each other in both directions in the text model's sliding-window
layers (except at the E2B/E4B widths, 1536 and 2560, which stay causal): the whole image must
fit one micro-batch, so servers run with ``-ub`` at least the largest image's token count
(llama-server aborts otherwise, raw image or package alike). 70 to 1120 tokens per image, one
per 48x48 pixels.
"""

from __future__ import annotations

import math

import gguf

from vision_cache.synthetic.family import Family
from vision_cache.synthetic.preprocessing import dynamic_grid
from vision_cache.synthetic.spec import ModelSpec, Shaping, Size, TextSpec, VisionSpec
from vision_cache.synthetic.tensors import (
    Planner,
    TensorPlan,
    patch_kernel_shape,
    position_table,
)
from vision_cache.synthetic.text_blocks import attention_kv, gemma4_block
from vision_cache.synthetic.vocab import Vocab, chatml_vocab

SPECIALS = ("<|image>", "<image|>", "<|image|>")
MIN_TOKENS, MAX_TOKENS = 70, 1120  # clip.cpp: set_limit_image_tokens(70, 1120)
# pixels in [0, 1]: the graph itself maps them to [-1, 1]
UNIT_MEAN_STD = ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0])


class Gemma4(Family):
    name = "gemma4"
    projector_type = "gemma4v"
    image_mean_std = UNIT_MEAN_STD
    server_args = ("-b", "2048", "-ub", "2048")

    def tiny_spec(self) -> ModelSpec:
        # 128 wide (not 1536 / 2560): image attention is bidirectional in layer 0 (SWA)
        text = TextSpec(
            n_embd=128,
            n_layer=2,
            n_head=4,
            n_head_kv=2,
            head_dim=32,
            n_ff=384,
            n_ctx=8192,
            rope_base=1_000_000.0,
            sliding_window=512,
            swa_pattern=(True, False),
        )
        vision = VisionSpec(
            n_embd=64,
            n_layer=3,
            n_head=4,
            n_ff=160,
            patch_size=16,
            image_size=512,
            n_merge=3,
            norm="rms",
            gated_ffn=True,
            qkv_bias=False,
        )
        return ModelSpec(
            arch=self.name,
            size="tiny",
            text=text,
            vision=vision,
            matrix_type="f32",
            extra={"position_size": 256},
        )

    def realistic_spec(self) -> ModelSpec:
        # Gemma 4 31B: ViT 1152 x 27 (head 72, patch 16, 3x3 pooling, 10240-entry tables)
        text = TextSpec(
            n_embd=5376,
            n_layer=2,
            n_head=32,
            n_head_kv=16,
            head_dim=128,
            n_ff=21504,
            n_ctx=32768,
            rope_base=1_000_000.0,
            sliding_window=1024,
            swa_pattern=(True, False),
        )
        vision = VisionSpec(
            n_embd=1152,
            n_layer=27,
            n_head=16,
            n_ff=4304,
            patch_size=16,
            image_size=896,
            n_merge=3,
            norm="rms",
            gated_ffn=True,
            qkv_bias=False,
        )
        return ModelSpec(
            arch=self.name,
            size="realistic",
            text=text,
            vision=vision,
            matrix_type="f16",
            extra={"position_size": 10240},
        )

    def expected_image_tokens(self, size: Size, width: int, height: int) -> int:
        v = self.spec(size).vision
        cols, rows = dynamic_grid(width, height, v.patch_size * v.n_merge, MIN_TOKENS, MAX_TOKENS)
        return cols * rows

    def vocab(self) -> Vocab:
        return chatml_vocab(SPECIALS)

    def embedding_std(self, spec: ModelSpec) -> float:
        # Gemma scales token embeddings by sqrt(n_embd) (but not image embeddings).
        return 1.0 / math.sqrt(spec.text.n_embd)

    def text_plan(
        self, spec: ModelSpec, vocab: Vocab, shaping: Shaping, seed: int
    ) -> list[TensorPlan]:
        plans = super().text_plan(spec, vocab, shaping, seed)
        p = Planner(seed, spec.matrix_type)
        # full-attention layers' proportional RoPE factors: 1 is plain RoPE
        p.const("rope_freqs.weight", spec.text.head_dim // 2, 1.0)
        return plans + p.plans

    def text_block(self, p: Planner, spec: ModelSpec, shaping: Shaping, blk: str) -> None:
        gemma4_block(p, spec.text, shaping, blk)

    def text_kv_extra(self, w: gguf.GGUFWriter, spec: ModelSpec) -> None:
        t, a = spec.text, self.text_arch
        attention_kv(w, a, t)
        w.add_uint32(f"{a}.attention.sliding_window", t.sliding_window)
        w.add_array(f"{a}.attention.sliding_window_pattern", list(t.swa_pattern))
        w.add_uint32(f"{a}.attention.key_length_swa", t.head_dim)
        w.add_uint32(f"{a}.attention.value_length_swa", t.head_dim)
        w.add_uint32(f"{a}.embedding_length_per_layer_input", 0)
        w.add_float32(f"{a}.rope.freq_base_swa", 10_000.0)

    def patch_embedding(self, p: Planner, spec: ModelSpec, shaping: Shaping) -> None:
        v, n = spec.vision, spec.knob("position_size")
        p.weight("v.patch_embd.weight", patch_kernel_shape(v), self.patch_std(spec, shaping))
        # two tables, x then y, each indexed by the patch's column / row
        position_table(p, "v.position_embd.weight", (2, n, v.n_embd), shaping)

    def vision_block(self, p: Planner, spec: ModelSpec, shaping: Shaping, layer: int) -> None:
        v, blk = spec.vision, f"v.blk.{layer}"
        d, ff, head_dim = v.n_embd, v.n_ff, v.n_embd // v.n_head
        # sandwich norms: the post-norm weights scale the residual branches, as the
        # branch scale does in other towers
        branch = shaping.vision_residual / math.sqrt(v.n_layer)
        p.const(f"{blk}.ln1.weight", d, 1.0)
        for proj in ("attn_q", "attn_k", "attn_v"):
            p.weight(f"{blk}.{proj}.weight", (d, d), 1.0 / math.sqrt(d))
        # attention is unscaled: Q/K norm weights of head_dim**-1/4 give logits of std ~1
        p.const(f"{blk}.attn_q_norm.weight", head_dim, head_dim**-0.25)
        p.const(f"{blk}.attn_k_norm.weight", head_dim, head_dim**-0.25)
        p.weight(f"{blk}.attn_out.weight", (d, d), 1.0 / math.sqrt(d))
        p.const(f"{blk}.attn_post_norm.weight", d, branch)
        p.const(f"{blk}.ln2.weight", d, 1.0)
        p.weight(f"{blk}.ffn_gate.weight", (ff, d), 1.0 / math.sqrt(d))
        p.weight(f"{blk}.ffn_up.weight", (ff, d), 1.0 / math.sqrt(d))
        p.weight(f"{blk}.ffn_down.weight", (d, ff), 1.0 / math.sqrt(ff))
        p.const(f"{blk}.ffn_post_norm.weight", d, branch)

    def post_norm(self, p: Planner, spec: ModelSpec) -> None:
        """The pooler follows the last block directly."""

    def projector(self, p: Planner, spec: ModelSpec, shaping: Shaping) -> None:
        v = spec.vision.n_embd
        p.weight("mm.input_projection.weight", (spec.text.n_embd, v), 1.0 / math.sqrt(v))

    def mmproj_kv_extra(self, w: gguf.GGUFWriter, spec: ModelSpec) -> None:
        w.add_bool("clip.use_gelu", True)
        w.add_uint32("clip.vision.projector.scale_factor", spec.vision.n_merge)


FAMILY = Gemma4()
