"""Tensors of a generated model, planned first and drawn only when written.

A `TensorPlan` names one tensor, its shape and storage type, and a function that makes its
values; a `Planner` collects them. Values are deterministic per (seed, tensor name), so they do
not depend on the order tensors are planned or drawn in. `vit_block` is the pre-norm ViT block
most vision towers share.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from vision_cache.synthetic.spec import Shaping, VisionSpec
from vision_cache.synthetic.vocab import Vocab

F32Array = npt.NDArray[np.float32]
Maker = Callable[[], F32Array]


@dataclass(frozen=True)
class TensorPlan:
    """One tensor: its GGUF name, numpy shape (out, in), storage type and a value maker.

    Values are made only when the tensor is written, so a multi-GB model never sits in
    memory at once.
    """

    name: str
    shape: tuple[int, ...]
    dtype: type[np.float32] | type[np.float16]
    make: Maker

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def rng(seed: int, name: str) -> np.random.Generator:
    # One stream per (seed, tensor name): values do not depend on generation order, and
    # a tensor can be re-drawn (the merger bias needs the weight it cancels).
    # SFC64 draws uniforms ~5x faster than PCG64 draws normals.
    entropy = [seed, zlib.crc32(name.encode())]
    return np.random.Generator(np.random.SFC64(np.random.SeedSequence(entropy)))


def uniform(seed: int, name: str, shape: tuple[int, ...], std: float) -> F32Array:
    """Zero-mean uniform noise with standard deviation ``std``.

    Uniform rather than normal because it is several times cheaper to draw; every weight
    feeds sums over hundreds of inputs, which are Gaussian either way.
    """
    values = rng(seed, name).random(shape, dtype=np.float32)
    values -= np.float32(0.5)
    values *= np.float32(std * math.sqrt(12.0))
    return values


def full(shape: tuple[int, ...], value: float) -> Maker:
    return lambda: np.full(shape, value, dtype=np.float32)


class Planner:
    """Collects tensor plans; matrices take the model's storage type, vectors stay f32."""

    def __init__(self, seed: int, matrix_type: Literal["f32", "f16"]) -> None:
        self.seed = seed
        self.matrix_dtype: type[np.float32] | type[np.float16] = (
            np.float16 if matrix_type == "f16" else np.float32
        )
        self.plans: list[TensorPlan] = []

    def add(self, name: str, shape: tuple[int, ...], make: Maker, *, matrix: bool) -> None:
        dtype = self.matrix_dtype if matrix else np.float32
        self.plans.append(TensorPlan(name, shape, dtype, make))

    def weight(self, name: str, shape: tuple[int, ...], std: float) -> None:
        """A matrix (or conv kernel) of uniform noise."""
        seed = self.seed
        self.add(name, shape, lambda: uniform(seed, name, shape, std), matrix=True)

    def noise(self, name: str, size: int, std: float) -> None:
        """A vector of uniform noise (biases)."""
        seed = self.seed
        self.add(name, (size,), lambda: uniform(seed, name, (size,), std), matrix=False)

    def const(self, name: str, size: int, value: float) -> None:
        """A constant vector (norm weights and biases)."""
        self.add(name, (size,), full((size,), value), matrix=False)

    def layer_norm(self, prefix: str, size: int) -> None:
        self.const(f"{prefix}.weight", size, 1.0)
        self.const(f"{prefix}.bias", size, 0.0)


def token_embd(
    seed: int, shape: tuple[int, int], std: float, vocab: Vocab, shaping: Shaping
) -> Maker:
    def make() -> F32Array:
        values = uniform(seed, "token_embd.weight", shape, std)
        values[vocab.quiet_ids] *= np.float32(shaping.quiet_token_scale)
        return values

    return make


def output_weights(seed: int, shape: tuple[int, int], vocab: Vocab, shaping: Shaping) -> Maker:
    # The final RMS norm makes the hidden state's entries ~1, so a row with entries of std
    # s / sqrt(n_embd) yields logits of std s.
    def make() -> F32Array:
        values = uniform(seed, "output.weight", shape, 1.0 / math.sqrt(shape[1]))
        row_scale = np.full((shape[0], 1), shaping.minor_logit_std, dtype=np.float32)
        row_scale[vocab.word_ids] = shaping.word_logit_std
        values *= row_scale
        return values

    return make


def norm(p: Planner, prefix: str, size: int, kind: Literal["layer", "rms"]) -> None:
    """A LayerNorm (weight and bias) or an RMS norm (weight only), as the identity."""
    p.const(f"{prefix}.weight", size, 1.0)
    if kind == "layer":
        p.const(f"{prefix}.bias", size, 0.0)


def vit_block(p: Planner, v: VisionSpec, shaping: Shaping, blk: str) -> None:
    """One pre-norm ViT block; `VisionSpec` says which variant (norm, gating, fused QKV)."""
    d, ff = v.n_embd, v.n_ff
    # Residual branches scaled by ~0.7/sqrt(layers): the stream stays dominated by the
    # patch embedding even after 27-32 layers, so patches (and images) stay distinct.
    branch = shaping.vision_residual / math.sqrt(v.n_layer)
    norm(p, f"{blk}.ln1", d, v.norm)
    if v.fused_qkv:
        p.weight(f"{blk}.attn_qkv.weight", (3 * d, d), 1.0 / math.sqrt(d))
        if v.qkv_bias:
            p.noise(f"{blk}.attn_qkv.bias", 3 * d, 0.02)
    else:
        for proj in ("attn_q", "attn_k", "attn_v"):
            p.weight(f"{blk}.{proj}.weight", (d, d), 1.0 / math.sqrt(d))
            if v.qkv_bias:
                p.noise(f"{blk}.{proj}.bias", d, 0.02)
    p.weight(f"{blk}.attn_out.weight", (d, d), branch / math.sqrt(d))
    p.const(f"{blk}.attn_out.bias", d, 0.0)
    if v.layer_scale:
        p.const(f"{blk}.ls1.weight", d, 1.0)
        p.const(f"{blk}.ls2.weight", d, 1.0)
    norm(p, f"{blk}.ln2", d, v.norm)
    if v.gated_ffn:
        p.weight(f"{blk}.ffn_gate.weight", (ff, d), 1.0 / math.sqrt(d))
        p.noise(f"{blk}.ffn_gate.bias", ff, 0.02)
    # ffn_up is (n_ff, n_embd) and ffn_down (n_embd, n_ff); n_ff != n_embd keeps clip.cpp's
    # legacy up/down swap heuristic from firing.
    p.weight(f"{blk}.ffn_up.weight", (ff, d), 1.0 / math.sqrt(d))
    p.noise(f"{blk}.ffn_up.bias", ff, 0.02)
    p.weight(f"{blk}.ffn_down.weight", (d, ff), branch / math.sqrt(ff))
    p.const(f"{blk}.ffn_down.bias", d, 0.0)


def position_table(p: Planner, name: str, shape: tuple[int, ...], shaping: Shaping) -> None:
    """Learned position embeddings: small next to the patch embeddings they are added to."""
    seed = p.seed
    p.add(name, shape, lambda: uniform(seed, name, shape, shaping.position_std), matrix=False)


def gelu_mlp(
    p: Planner, first: str, second: str, widths: tuple[int, int, int], shaping: Shaping
) -> None:
    """Linear -> GELU -> linear, ``widths`` = (in, hidden, out), GELU kept near-linear.

    The first bias shifts GELU's input into its near-linear range (image detail survives);
    the second cancels the shift's large constant output, which would otherwise make every
    image token nearly the same vector.
    """
    width_in, hidden, width_out = widths
    seed, dtype, shift = p.seed, p.matrix_dtype, shaping.merger_gelu_shift
    w2_name, w2_shape = f"{second}.weight", (width_out, hidden)
    p.weight(f"{first}.weight", (hidden, width_in), 1.0 / math.sqrt(width_in))
    p.const(f"{first}.bias", hidden, shift)
    p.weight(w2_name, w2_shape, 1.0 / math.sqrt(hidden))

    def cancel_shift() -> F32Array:
        w2 = uniform(seed, w2_name, w2_shape, 1.0 / math.sqrt(hidden))
        row_sums: F32Array = w2.astype(dtype).astype(np.float32).sum(axis=1)
        row_sums *= np.float32(-gelu_mean(shift))
        return row_sums

    p.add(f"{second}.bias", (width_out,), cancel_shift, matrix=False)


def patch_kernel_shape(v: VisionSpec) -> tuple[int, int, int, int]:
    return (v.n_embd, 3, v.patch_size, v.patch_size)


def gelu_mean(shift: float) -> float:
    """E[gelu(z + shift)] for z ~ N(0, 1), with ggml's tanh-approximated GELU."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(64)
    x = nodes + shift
    gelu = 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    return float(np.dot(weights, gelu) / math.sqrt(2.0 * math.pi))
