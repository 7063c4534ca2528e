"""The shapes of a generated model: text decoder, vision tower, and the scaling of the weights.

A `ModelSpec` is what a family's preset for one size gives; `Shaping` the knobs that make
greedy output depend on the image. Both go into the manifest (`dataclasses.asdict`), so a
change here regenerates cached models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Size = Literal["tiny", "demo", "realistic"]
SIZES: tuple[Size, ...] = ("tiny", "demo", "realistic")


@dataclass(frozen=True)
class TextSpec:
    """Text decoder hyper-parameters (only ``n_embd`` must match the real model)."""

    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_ctx: int
    rope_base: float
    rope_sections: tuple[int, ...] = ()  # M-RoPE split of n_rot / 2 (qwen2vl, qwen3vl, glm4)
    sliding_window: int = 0  # local-attention window (gemma3, gemma4)
    n_rot: int = 0  # rotary dimensions when fewer than head_dim (glm4); 0: head_dim
    n_deepstack: int = 0  # qwen3vl: extra n_embd-wide slices each image token carries
    swa_pattern: tuple[bool, ...] = ()  # gemma4: which layers use the sliding window

    @property
    def n_embd_inp(self) -> int:
        """Width of one input embedding: what a package stores per image token."""
        return self.n_embd * (1 + self.n_deepstack)


@dataclass(frozen=True)
class VisionSpec:
    """Vision tower hyper-parameters."""

    n_embd: int
    n_layer: int
    n_head: int
    n_ff: int
    patch_size: int
    image_size: int  # gemma3: the fixed input size; qwen2vl: only used for warm-up
    n_merge: int  # tokens merged per side: pooling kernel, spatial merge or pixel shuffle
    norm: Literal["layer", "rms"] = "layer"
    gated_ffn: bool = False  # ffn_gate next to ffn_up (SwiGLU / GeGLU towers)
    fused_qkv: bool = False  # one attn_qkv matrix (Qwen3-VL)
    qkv_bias: bool = True
    layer_scale: bool = False  # ls1 / ls2 per-channel scales (InternViT)
    eps: float = 1e-6


@dataclass(frozen=True)
class ModelSpec:
    arch: str  # the family's name (vision_cache.synthetic.registry)
    size: Size
    text: TextSpec
    vision: VisionSpec
    # Storage type of weight matrices; norms, biases and position embeddings stay f32.
    # f32 for tiny models (exact, and tiny matmuls gain nothing from f16); f16 for the
    # realistic ones, halving the bytes streamed per matmul on CPU, like real GGUFs.
    matrix_type: Literal["f32", "f16"]
    # Family-specific preprocessing or projector knobs (window-attention pattern, tile
    # limits, deepstack layers...): part of the manifest, so changing one regenerates.
    extra: dict[str, int | tuple[int, ...]] = field(default_factory=dict)

    def knob(self, name: str) -> int:
        """An integer from `extra`."""
        value = self.extra[name]
        if not isinstance(value, int):
            raise TypeError(f"{self.arch}: extra[{name!r}] is not an integer")
        return value

    def knobs(self, name: str) -> tuple[int, ...]:
        """A tuple of integers from `extra`."""
        value = self.extra[name]
        if not isinstance(value, tuple):
            raise TypeError(f"{self.arch}: extra[{name!r}] is not a tuple")
        return value


@dataclass(frozen=True)
class Shaping:
    """How the random weights are scaled so that greedy output depends on the image.

    Naive random weights give the same greedy tokens whatever the image: attention is
    diffuse, every image token looks alike after a deep tower, and a few tokens win every
    argmax. Each knob below undoes one of those effects.
    """

    # Text attention logits have std ~= qk_gain**2: the last prompt token reads a few
    # specific image tokens instead of their average.
    qk_gain: float = 2.0
    # V and O scale (qwen2vl) / post-attention norm weight (gemma3): the attention output
    # outweighs the current token's own embedding in the residual stream.
    vo_gain: float = 1.5
    gemma_post_attn_gain: float = 2.0
    # The FFN maps the current token to its own random direction, so the next word depends
    # on the current one as well as on the image: without it generation falls into a
    # fixed point ("hound hound hound") once the image readout dominates.
    ffn_gain: float = 1.0
    # Untied output: whole-word rows give logits with this std; everything else (EOS,
    # bytes, fragments, specials) is near zero so they never win greedy decoding.
    word_logit_std: float = 5.0
    minor_logit_std: float = 0.05
    # Newline (the last prompt token of both templates) embeds near zero, so its residual
    # is mostly what attention read from the image.
    quiet_token_scale: float = 0.1
    # Vision residual branches are scaled by this / sqrt(layers): deep towers keep
    # patches apart instead of blurring them together.
    vision_residual: float = 0.7
    position_std: float = 0.3
    patch_gain: float = 2.0
    # qwen2vl merger: GELU input shifted by this, so it stays near-linear; the second
    # bias cancels the shift, or every image token would get the same large offset.
    merger_gelu_shift: float = 3.0
