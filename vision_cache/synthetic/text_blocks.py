"""Decoder layers of the text architectures the families use, and their GGUF keys.

Each function writes one layer's tensors under ``{blk}.*`` in the layout llama.cpp's loader
for that architecture expects, shaped by `Shaping` so that the last prompt token reads
specific image tokens (sharp attention) and what it reads outweighs its own embedding.
"""

from __future__ import annotations

import math

import gguf

from vision_cache.synthetic.spec import Shaping, TextSpec
from vision_cache.synthetic.tensors import Planner


def _attention(p: Planner, t: TextSpec, blk: str, qk_std: float, vo_gain: float) -> None:
    d, q_dim, kv_dim = t.n_embd, t.n_head * t.head_dim, t.n_head_kv * t.head_dim
    p.const(f"{blk}.attn_norm.weight", d, 1.0)
    p.weight(f"{blk}.attn_q.weight", (q_dim, d), qk_std)
    p.weight(f"{blk}.attn_k.weight", (kv_dim, d), qk_std)
    p.weight(f"{blk}.attn_v.weight", (kv_dim, d), vo_gain / math.sqrt(d))
    p.weight(f"{blk}.attn_output.weight", (d, q_dim), vo_gain / math.sqrt(q_dim))


def _qkv_bias(p: Planner, t: TextSpec, blk: str) -> None:
    # Small biases keep attention query-driven (Qwen2 and GLM-4 have them).
    p.noise(f"{blk}.attn_q.bias", t.n_head * t.head_dim, 0.02)
    p.noise(f"{blk}.attn_k.bias", t.n_head_kv * t.head_dim, 0.02)
    p.noise(f"{blk}.attn_v.bias", t.n_head_kv * t.head_dim, 0.02)


def _gated_ffn(p: Planner, t: TextSpec, shaping: Shaping, blk: str) -> None:
    d = t.n_embd
    p.const(f"{blk}.ffn_norm.weight", d, 1.0)
    p.weight(f"{blk}.ffn_gate.weight", (t.n_ff, d), 1.0 / math.sqrt(d))
    p.weight(f"{blk}.ffn_up.weight", (t.n_ff, d), 1.0 / math.sqrt(d))
    p.weight(f"{blk}.ffn_down.weight", (d, t.n_ff), shaping.ffn_gain / math.sqrt(t.n_ff))


def llama_block(
    p: Planner, t: TextSpec, shaping: Shaping, blk: str, *, qkv_bias: bool = False
) -> None:
    """llama, qwen2, qwen2vl: RMS pre-norms, GQA attention, SwiGLU.

    Q and K scaled by qk_gain give attention logits of std ~qk_gain**2; V and O scaled by
    vo_gain make what attention read dominate the residual stream.
    """
    _attention(p, t, blk, shaping.qk_gain / math.sqrt(t.n_embd), shaping.vo_gain)
    if qkv_bias:
        _qkv_bias(p, t, blk)
    _gated_ffn(p, t, shaping, blk)


def qk_norm_block(p: Planner, t: TextSpec, shaping: Shaping, blk: str) -> None:
    """qwen3vl: like llama with Q and K RMS-normed per head; their norm weights alone set
    attention sharpness."""
    _attention(p, t, blk, 1.0 / math.sqrt(t.n_embd), shaping.vo_gain)
    p.const(f"{blk}.attn_q_norm.weight", t.head_dim, shaping.qk_gain)
    p.const(f"{blk}.attn_k_norm.weight", t.head_dim, shaping.qk_gain)
    _gated_ffn(p, t, shaping, blk)


def glm4_block(p: Planner, t: TextSpec, shaping: Shaping, blk: str) -> None:
    """glm4: post-attention and post-FFN norms, gate and up fused in one (2 n_ff) matrix."""
    d = t.n_embd
    _attention(p, t, blk, shaping.qk_gain / math.sqrt(d), shaping.vo_gain)
    _qkv_bias(p, t, blk)
    p.const(f"{blk}.post_attention_norm.weight", d, shaping.gemma_post_attn_gain)
    p.const(f"{blk}.ffn_norm.weight", d, 1.0)
    p.weight(f"{blk}.ffn_up.weight", (2 * t.n_ff, d), 1.0 / math.sqrt(d))
    p.weight(f"{blk}.ffn_down.weight", (d, t.n_ff), shaping.ffn_gain / math.sqrt(t.n_ff))
    p.const(f"{blk}.post_ffw_norm.weight", d, shaping.ffn_gain)


def gemma4_block(p: Planner, t: TextSpec, shaping: Shaping, blk: str) -> None:
    """gemma4: Q/K RMS-normed per head and attention unscaled (no 1/sqrt(head_dim)), V
    RMS-normed without a weight, sandwich norms around attention and FFN."""
    d = t.n_embd
    _attention(p, t, blk, 1.0 / math.sqrt(d), 1.0)
    # logits ~ gain**2 * sqrt(head_dim): head_dim**-1/4 brings them back to ~qk_gain**2
    gain = shaping.qk_gain / t.head_dim**0.25
    p.const(f"{blk}.attn_q_norm.weight", t.head_dim, gain)
    p.const(f"{blk}.attn_k_norm.weight", t.head_dim, gain)
    p.const(f"{blk}.post_attention_norm.weight", d, shaping.gemma_post_attn_gain)
    _gated_ffn(p, t, shaping, blk)
    p.const(f"{blk}.post_ffw_norm.weight", d, shaping.ffn_gain)


def attention_kv(w: gguf.GGUFWriter, arch: str, t: TextSpec) -> None:
    """Head sizes, rotary dimensions, M-RoPE sections and deepstack width, where set."""
    w.add_uint32(f"{arch}.attention.key_length", t.head_dim)
    w.add_uint32(f"{arch}.attention.value_length", t.head_dim)
    if t.n_rot:
        w.add_uint32(f"{arch}.rope.dimension_count", t.n_rot)
    if t.rope_sections:
        w.add_array(f"{arch}.rope.dimension_sections", list(t.rope_sections))
    if t.n_deepstack:
        w.add_uint32(f"{arch}.n_deepstack_layers", t.n_deepstack)
