"""Qwen2-VL: text arch ``qwen2vl`` + projector ``qwen2vl_merger``.

Dynamic resolution: the token count follows the image's size and aspect ratio, and M-RoPE
positions come from the image grid. The chat template is Qwen2-VL's own.
"""

from __future__ import annotations

import math

import gguf
import numpy as np

from vision_cache.synthetic.family import Family
from vision_cache.synthetic.gguf_file import CLIP_MEAN_STD
from vision_cache.synthetic.spec import ModelSpec, Shaping, Size, TextSpec, VisionSpec
from vision_cache.synthetic.tensors import (
    F32Array,
    Planner,
    gelu_mean,
    patch_kernel_shape,
    uniform,
)
from vision_cache.synthetic.vocab import Vocab, byte_level_bpe_vocab

# Qwen2-VL's chat template (Qwen/Qwen2-VL-7B-Instruct).
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_QWEN2VL_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# clip.cpp's token limits for Qwen2-VL images (set_limit_image_tokens(8, 4096)).
_MIN_TOKENS, _MAX_TOKENS = 8, 4096


class Qwen2VL(Family):
    name = "qwen2vl"
    projector_type = "qwen2vl_merger"
    image_mean_std = CLIP_MEAN_STD

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
        # 28 px patches (real: 14) keep dynamic-resolution images at ~80-100 tokens.
        vision = VisionSpec(
            n_embd=64, n_layer=2, n_head=4, n_ff=160, patch_size=28, image_size=560, n_merge=2
        )
        return ModelSpec(arch=self.name, size="tiny", text=text, vision=vision, matrix_type="f32")

    def realistic_spec(self) -> ModelSpec:
        # Qwen2-VL-7B: text width 3584 (M-RoPE 16/24/24), ViT 1280 x 32, merger -> 3584.
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
            n_embd=1280, n_layer=32, n_head=16, n_ff=5120, patch_size=14, image_size=560, n_merge=2
        )
        return ModelSpec(
            arch=self.name, size="realistic", text=text, vision=vision, matrix_type="f16"
        )

    def expected_image_tokens(self, size: Size, width: int, height: int) -> int:
        """Keeps the aspect ratio, rounds each side to a multiple of patch*merge, and rescales
        into the [8, 4096]-token budget (mirrors ``calc_size_preserved_ratio`` in
        mtmd-image.cpp)."""
        v = self.spec(size).vision
        align = v.patch_size * v.n_merge
        min_pixels = _MIN_TOKENS * align * align
        max_pixels = _MAX_TOKENS * align * align
        w_bar = max(align, math.floor(width / align + 0.5) * align)  # std::round: half away
        h_bar = max(align, math.floor(height / align + 0.5) * align)
        if w_bar * h_bar > max_pixels:
            beta = math.sqrt(width * height / max_pixels)
            w_bar = max(align, math.floor(width / beta / align) * align)
            h_bar = max(align, math.floor(height / beta / align) * align)
        elif w_bar * h_bar < min_pixels:
            beta = math.sqrt(min_pixels / (width * height))
            w_bar = math.ceil(width * beta / align) * align
            h_bar = math.ceil(height * beta / align) * align
        return (w_bar // align) * (h_bar // align)

    def vocab(self) -> Vocab:
        """A byte-level BPE ("gpt2", pre-tokenizer "qwen2") vocabulary shaped like Qwen2's."""
        return byte_level_bpe_vocab(
            _QWEN2VL_SPECIALS,
            QWEN2VL_CHAT_TEMPLATE,
            pre="qwen2",
            bos="<|endoftext|>",
            eos="<|im_end|>",
            pad="<|endoftext|>",
        )

    def text_block(self, p: Planner, spec: ModelSpec, shaping: Shaping, blk: str) -> None:
        t = spec.text
        d, q_dim, kv_dim = t.n_embd, t.n_head * t.head_dim, t.n_head_kv * t.head_dim
        p.const(f"{blk}.attn_norm.weight", d, 1.0)
        p.weight(f"{blk}.attn_q.weight", (q_dim, d), shaping.qk_gain / math.sqrt(d))
        p.weight(f"{blk}.attn_k.weight", (kv_dim, d), shaping.qk_gain / math.sqrt(d))
        p.weight(f"{blk}.attn_v.weight", (kv_dim, d), shaping.vo_gain / math.sqrt(d))
        # Qwen2 has Q/K/V biases; small ones keep attention query-driven.
        p.noise(f"{blk}.attn_q.bias", q_dim, 0.02)
        p.noise(f"{blk}.attn_k.bias", kv_dim, 0.02)
        p.noise(f"{blk}.attn_v.bias", kv_dim, 0.02)
        p.weight(f"{blk}.attn_output.weight", (d, q_dim), shaping.vo_gain / math.sqrt(q_dim))
        p.const(f"{blk}.ffn_norm.weight", d, 1.0)
        p.weight(f"{blk}.ffn_gate.weight", (t.n_ff, d), 1.0 / math.sqrt(d))
        p.weight(f"{blk}.ffn_up.weight", (t.n_ff, d), 1.0 / math.sqrt(d))
        p.weight(f"{blk}.ffn_down.weight", (d, t.n_ff), shaping.ffn_gain / math.sqrt(t.n_ff))

    def text_kv_extra(self, w: gguf.GGUFWriter, spec: ModelSpec) -> None:
        w.add_array(f"{self.text_arch}.rope.dimension_sections", list(spec.text.rope_sections))

    def patch_embedding(self, p: Planner, spec: ModelSpec, shaping: Shaping) -> None:
        # Two temporal kernels, both applied to a still image: split the gain between them.
        for name in ("v.patch_embd.weight", "v.patch_embd.weight.1"):
            p.weight(
                name, patch_kernel_shape(spec.vision), self.patch_std(spec, shaping) / math.sqrt(2)
            )

    def projector(self, p: Planner, spec: ModelSpec, shaping: Shaping) -> None:
        # 2x2 neighbouring patches concatenated -> mm.0 -> GELU -> mm.2 -> text width.
        width, d = 4 * spec.vision.n_embd, spec.text.n_embd
        seed, dtype, shift = p.seed, p.matrix_dtype, shaping.merger_gelu_shift
        p.weight("mm.0.weight", (width, width), 1.0 / math.sqrt(width))
        # Shifting GELU's input keeps it in its near-linear range (image detail survives)...
        p.const("mm.0.bias", width, shift)
        p.weight("mm.2.weight", (d, width), 1.0 / math.sqrt(width))

        # ...and this bias removes the shift's large constant output, which would otherwise
        # make every image token nearly the same vector.
        def cancel_shift() -> F32Array:
            w2 = uniform(seed, "mm.2.weight", (d, width), 1.0 / math.sqrt(width))
            row_sums: F32Array = w2.astype(dtype).astype(np.float32).sum(axis=1)
            row_sums *= np.float32(-gelu_mean(shift))
            return row_sums

        p.add("mm.2.bias", (d,), cancel_shift, matrix=False)

    def mmproj_kv_extra(self, w: gguf.GGUFWriter, spec: ModelSpec) -> None:
        w.add_uint32("clip.vision.spatial_merge_size", spec.vision.n_merge)


FAMILY = Qwen2VL()
