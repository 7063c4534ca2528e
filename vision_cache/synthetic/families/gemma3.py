"""Gemma 3: text arch ``gemma3`` + projector ``gemma3`` (SigLIP, 2-D average pool, linear
projection).

Every image is resized to a fixed square, so its token count is fixed; mtmd decodes image
tokens with non-causal attention. The chat template is Gemma 3's own, images as
``<start_of_image>``.
"""

from __future__ import annotations

import math

import gguf

from vision_cache.synthetic.family import Family
from vision_cache.synthetic.spec import ModelSpec, Shaping, Size, TextSpec, VisionSpec
from vision_cache.synthetic.tensors import Planner, patch_kernel_shape, uniform
from vision_cache.synthetic.vocab import Vocab, sentencepiece_vocab

# Gemma 3's chat template (google/gemma-3-*-it), images as <start_of_image>.
GEMMA3_CHAT_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

_GEMMA3_SPECIALS = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)


class Gemma3(Family):
    name = "gemma3"
    projector_type = "gemma3"

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
            sliding_window=1024,
        )
        # 224 px / 14 = 16x16 patches, 2x2 pooling -> 64 image tokens.
        vision = VisionSpec(
            n_embd=128, n_layer=2, n_head=4, n_ff=320, patch_size=14, image_size=224, n_merge=2
        )
        return ModelSpec(arch=self.name, size="tiny", text=text, vision=vision, matrix_type="f32")

    def realistic_spec(self) -> ModelSpec:
        # Gemma 3 4B text width; SigLIP-so400m at 896 px -> 64x64 patches, 4x4 pool -> 256.
        text = TextSpec(
            n_embd=2560,
            n_layer=2,
            n_head=8,
            n_head_kv=4,
            head_dim=256,
            n_ff=10240,
            n_ctx=32768,
            rope_base=1_000_000.0,
            sliding_window=1024,
        )
        vision = VisionSpec(
            n_embd=1152, n_layer=27, n_head=16, n_ff=4304, patch_size=14, image_size=896, n_merge=4
        )
        return ModelSpec(
            arch=self.name, size="realistic", text=text, vision=vision, matrix_type="f16"
        )

    def expected_image_tokens(self, size: Size, width: int, height: int) -> int:
        v = self.spec(size).vision
        return (v.image_size // v.patch_size // v.n_merge) ** 2

    def vocab(self) -> Vocab:
        """A sentencepiece ("llama") vocabulary shaped like Gemma 3's."""
        return sentencepiece_vocab(
            _GEMMA3_SPECIALS,
            GEMMA3_CHAT_TEMPLATE,
            bos="<bos>",
            eos="<eos>",
            unk="<unk>",
            pad="<pad>",
        )

    def embedding_std(self, spec: ModelSpec) -> float:
        # Gemma scales token embeddings by sqrt(n_embd) (but not image embeddings).
        return 1.0 / math.sqrt(spec.text.n_embd)

    def text_block(self, p: Planner, spec: ModelSpec, shaping: Shaping, blk: str) -> None:
        t = spec.text
        d, q_dim, kv_dim = t.n_embd, t.n_head * t.head_dim, t.n_head_kv * t.head_dim
        p.const(f"{blk}.attn_norm.weight", d, 1.0)
        p.weight(f"{blk}.attn_q.weight", (q_dim, d), 1.0 / math.sqrt(d))
        p.weight(f"{blk}.attn_k.weight", (kv_dim, d), 1.0 / math.sqrt(d))
        p.weight(f"{blk}.attn_v.weight", (kv_dim, d), 1.0 / math.sqrt(d))
        p.weight(f"{blk}.attn_output.weight", (d, q_dim), 1.0 / math.sqrt(q_dim))
        # Q and K are RMS-normed per head, so their norm weights alone set attention sharpness.
        p.const(f"{blk}.attn_q_norm.weight", t.head_dim, shaping.qk_gain)
        p.const(f"{blk}.attn_k_norm.weight", t.head_dim, shaping.qk_gain)
        p.const(f"{blk}.post_attention_norm.weight", d, shaping.gemma_post_attn_gain)
        p.const(f"{blk}.ffn_norm.weight", d, 1.0)
        p.weight(f"{blk}.ffn_gate.weight", (t.n_ff, d), 1.0 / math.sqrt(d))
        p.weight(f"{blk}.ffn_up.weight", (t.n_ff, d), 1.0 / math.sqrt(d))
        p.weight(f"{blk}.ffn_down.weight", (d, t.n_ff), 1.0 / math.sqrt(t.n_ff))
        p.const(f"{blk}.post_ffw_norm.weight", d, shaping.ffn_gain)

    def text_kv_extra(self, w: gguf.GGUFWriter, spec: ModelSpec) -> None:
        t, a = spec.text, self.text_arch
        w.add_uint32(f"{a}.attention.key_length", t.head_dim)
        w.add_uint32(f"{a}.attention.value_length", t.head_dim)
        # Like the real model: local layers (window + their own RoPE base), default
        # pattern of five local layers per global one.
        w.add_uint32(f"{a}.attention.sliding_window", t.sliding_window)
        w.add_float32(f"{a}.rope.freq_base_swa", 10_000.0)

    def patch_embedding(self, p: Planner, spec: ModelSpec, shaping: Shaping) -> None:
        v, seed = spec.vision, p.seed
        p.weight("v.patch_embd.weight", patch_kernel_shape(v), self.patch_std(spec, shaping))
        p.noise("v.patch_embd.bias", v.n_embd, 0.02)
        n_pos = (v.image_size // v.patch_size) ** 2
        p.add(
            "v.position_embd.weight",
            (n_pos, v.n_embd),
            lambda: uniform(
                seed, "v.position_embd.weight", (n_pos, v.n_embd), shaping.position_std
            ),
            matrix=False,
        )

    def projector(self, p: Planner, spec: ModelSpec, shaping: Shaping) -> None:
        # After pooling: RMS norm * soft_emb_norm, then a linear map to the text width.
        # Stored (vision, text): clip.cpp transposes it before the matmul.
        v, d = spec.vision.n_embd, spec.text.n_embd
        p.const("mm.soft_emb_norm.weight", v, 1.0)
        p.weight("mm.input_projection.weight", (v, d), 1.0 / math.sqrt(v))

    def mmproj_kv_extra(self, w: gguf.GGUFWriter, spec: ModelSpec) -> None:
        w.add_bool("clip.use_gelu", True)  # SigLIP MLP; qwen2vl keeps quick-GELU
        w.add_uint32("clip.vision.projector.scale_factor", spec.vision.n_merge)


FAMILY = Gemma3()
