"""What one audio family gives the generator: a Whisper encoder, a projector, a text model.

The audio counterpart of `vision_cache.synthetic.family`: a family is a module in
`vision_cache.synthetic.families` with a ``FAMILY`` object, here a subclass of `AudioFamily`,
and one line in `vision_cache.synthetic.registry`. What the families share lives here: the
Whisper encoder (two 1-D convolutions, position embeddings, pre-norm transformer layers), the
text model's embeddings and output, the common GGUF keys. A family fills in its presets, its
vocabulary, one decoder layer and its projector::

    class Qwen2Audio(AudioFamily):
        name = "qwen2audio"
        projector_type = "qwen2a"
        text_arch = "qwen2"
        def tiny_spec(self) -> AudioModelSpec: ...
        def realistic_spec(self) -> AudioModelSpec: ...
        def vocab(self) -> Vocab: ...
        def text_block(self, p, spec, shaping, blk): ...
        def projector(self, p, spec, shaping): ...
        def tokens_per_window(self, spec): ...

    FAMILY = Qwen2Audio()

Every Whisper-style window is 30 s of 16 kHz audio (3,000 mel frames, 1,500 encoder positions),
so each window costs the encoder the same whatever the clip's length. llama.cpp pads a clip
with 30 s of silence and keeps whole windows (mtmd-audio.cpp): a clip of 30.0 s or more is two
chunks (see `vision_cache.synthetic.audio.whisper_windows`).

Greedy output depends on the audio for the same reasons it depends on the image in the vision
families (`spec.Shaping`: sharp text attention, quiet last prompt token, word-only logits); on
the encoder side, residual branches are scaled by ~0.7/sqrt(layers), position embeddings are
small, and the first convolution has zero mean over its inputs, so that the silence llama.cpp
pads every clip with (Whisper's normalisation makes it one constant frame) maps to zero and the
clip's content stands out.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import gguf

from vision_cache.synthetic.gguf_file import KvWriter, tokenizer_kv
from vision_cache.synthetic.spec import Shaping, Size, TextSpec
from vision_cache.synthetic.tensors import (
    F32Array,
    Maker,
    Planner,
    TensorPlan,
    full,
    output_weights,
    token_embd,
    uniform,
)
from vision_cache.synthetic.vocab import Vocab

# Whisper's encoder: 3000 mel frames per 30 s window, halved by the second convolution.
WINDOW_FRAMES = 3000
ENCODER_POSITIONS = WINDOW_FRAMES // 2


@dataclass(frozen=True)
class AudioSpec:
    """Whisper encoder hyper-parameters, plus the projector's."""

    n_mel: int
    n_embd: int
    n_layer: int
    n_head: int
    n_ff: int
    stack: int = 0  # frames stacked per token before the projector (ultravox); 0 for none
    proj_ff: int = 0  # projector MLP width (ultravox)


WHISPER_LARGE = AudioSpec(n_mel=128, n_embd=1280, n_layer=32, n_head=20, n_ff=5120)
WHISPER_TINY_TEST = AudioSpec(n_mel=80, n_embd=64, n_layer=2, n_head=4, n_ff=160)


@dataclass(frozen=True)
class AudioModelSpec:
    arch: str  # the family's name (vision_cache.synthetic.registry)
    size: Size
    text: TextSpec
    audio: AudioSpec
    matrix_type: Literal["f32", "f16"]


@dataclass(frozen=True)
class EncoderShaping:
    """The encoder's knobs (see the module docstring); the text model's are `spec.Shaping`."""

    residual: float = 0.7
    position_std: float = 0.3
    conv_gain: float = 2.0
    conv2_gain: float = 1.5
    projector_gain: float = 1.0


class AudioFamily(ABC):
    """One audio family (Whisper encoder + projector + text architecture), every size of it."""

    name: ClassVar[str]
    projector_type: ClassVar[str]
    text_arch: ClassVar[str]

    # --- presets ---------------------------------------------------------------------------

    @abstractmethod
    def tiny_spec(self) -> AudioModelSpec:
        """Tests: f32, about 10 MB, a 2-layer 64-wide encoder."""

    @abstractmethod
    def realistic_spec(self) -> AudioModelSpec:
        """Benchmarks: the real encoder (Whisper-large) and text width, a shallow text model."""

    def spec(self, size: Size) -> AudioModelSpec:
        if size == "tiny":
            return self.tiny_spec()
        return self.demo_spec() if size == "demo" else self.realistic_spec()

    def demo_spec(self) -> AudioModelSpec:
        """The realistic widths with 6 of the encoder's 32 layers: seconds per window."""
        real = self.realistic_spec()
        audio = dataclasses.replace(real.audio, n_layer=6)
        return dataclasses.replace(real, size="demo", audio=audio)

    @abstractmethod
    def tokens_per_window(self, spec: AudioModelSpec) -> int:
        """Embedding tokens per 30 s window (clip_n_output_tokens at the pinned llama.cpp)."""

    # --- the text model --------------------------------------------------------------------

    @abstractmethod
    def vocab(self) -> Vocab: ...

    @abstractmethod
    def text_block(self, p: Planner, spec: AudioModelSpec, shaping: Shaping, blk: str) -> None:
        """The tensors of one decoder layer, named ``{blk}.*``."""

    def text_plan(
        self, spec: AudioModelSpec, vocab: Vocab, shaping: Shaping, seed: int
    ) -> list[TensorPlan]:
        """Tensors of the text model, in the layout llama.cpp's loader for it expects."""
        d, n_vocab = spec.text.n_embd, len(vocab.tokens)
        p = Planner(seed, spec.matrix_type)
        p.add(
            "token_embd.weight",
            (n_vocab, d),
            token_embd(seed, (n_vocab, d), 1.0, vocab, shaping),
            matrix=True,
        )
        p.const("output_norm.weight", d, 1.0)
        p.add(
            "output.weight",
            (n_vocab, d),
            output_weights(seed, (n_vocab, d), vocab, shaping),
            matrix=True,
        )
        for i in range(spec.text.n_layer):
            self.text_block(p, spec, shaping, f"blk.{i}")
        return p.plans

    def text_kv(self, spec: AudioModelSpec, vocab: Vocab) -> KvWriter:
        def write(w: gguf.GGUFWriter) -> None:
            t, a = spec.text, self.text_arch
            w.add_name(f"vcache test {spec.arch} {spec.size}")
            w.add_file_type(_file_type(spec))
            w.add_uint32(f"{a}.context_length", t.n_ctx)
            w.add_uint32(f"{a}.embedding_length", t.n_embd)
            w.add_uint32(f"{a}.block_count", t.n_layer)
            w.add_uint32(f"{a}.feed_forward_length", t.n_ff)
            w.add_uint32(f"{a}.attention.head_count", t.n_head)
            w.add_uint32(f"{a}.attention.head_count_kv", t.n_head_kv)
            w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)
            w.add_float32(f"{a}.rope.freq_base", t.rope_base)
            tokenizer_kv(w, vocab)

        return write

    # --- the mmproj: Whisper encoder and projector -----------------------------------------

    @abstractmethod
    def projector(self, p: Planner, spec: AudioModelSpec, shaping: EncoderShaping) -> None:
        """From the encoder's output to the text model's width (tensors ``mm.a.*``)."""

    def mmproj_plan(
        self, spec: AudioModelSpec, shaping: EncoderShaping, seed: int
    ) -> list[TensorPlan]:
        a = spec.audio
        p = Planner(seed, spec.matrix_type)
        _encoder_input(p, a, shaping)
        for i in range(a.n_layer):
            _encoder_block(p, a, shaping, f"a.blk.{i}")
        p.layer_norm("a.post_ln", a.n_embd)
        self.projector(p, spec, shaping)
        return p.plans

    def mmproj_kv(self, spec: AudioModelSpec) -> KvWriter:
        def write(w: gguf.GGUFWriter) -> None:
            a = spec.audio
            w.add_name(f"vcache test {spec.arch} {spec.size} mmproj")
            w.add_file_type(_file_type(spec))
            w.add_bool("clip.has_audio_encoder", True)
            w.add_string("clip.projector_type", self.projector_type)
            w.add_uint32("clip.audio.num_mel_bins", a.n_mel)
            w.add_uint32("clip.audio.embedding_length", a.n_embd)
            w.add_uint32("clip.audio.feed_forward_length", a.n_ff)
            w.add_uint32("clip.audio.block_count", a.n_layer)
            w.add_uint32("clip.audio.attention.head_count", a.n_head)
            w.add_uint32("clip.audio.projection_dim", spec.text.n_embd)
            w.add_float32("clip.audio.attention.layer_norm_epsilon", 1e-5)
            if a.stack:
                w.add_uint32("clip.audio.projector.stack_factor", a.stack)

        return write


def _file_type(spec: AudioModelSpec) -> int:
    return int(
        gguf.LlamaFileType.MOSTLY_F16 if spec.matrix_type == "f16" else gguf.LlamaFileType.ALL_F32
    )


def _centred_conv(seed: int, name: str, shape: tuple[int, int, int], std: float) -> Maker:
    # zero mean over each output's inputs: a constant mel frame (padding silence) maps to zero
    def make() -> F32Array:
        w = uniform(seed, name, shape, std)
        w -= w.mean(axis=(1, 2), keepdims=True)
        return w

    return make


def _encoder_input(p: Planner, a: AudioSpec, shaping: EncoderShaping) -> None:
    """Whisper's two 1-D convolutions (kernel 3, the second with stride 2) and positions."""
    d, seed = a.n_embd, p.seed
    for i, (n_in, gain) in enumerate(((a.n_mel, shaping.conv_gain), (d, shaping.conv2_gain)), 1):
        name, shape = f"a.conv1d.{i}.weight", (d, n_in, 3)
        p.add(
            name, shape, _centred_conv(seed, name, shape, gain / math.sqrt(3 * n_in)), matrix=True
        )
        # (out, 1): ggml adds it to the (frames, channels) convolution output by broadcasting
        p.add(f"a.conv1d.{i}.bias", (d, 1), full((d, 1), 0.0), matrix=False)
    shape_pos = (ENCODER_POSITIONS, d)
    p.add(
        "a.position_embd.weight",
        shape_pos,
        lambda: uniform(seed, "a.position_embd.weight", shape_pos, shaping.position_std),
        matrix=False,
    )


def _encoder_block(p: Planner, a: AudioSpec, shaping: EncoderShaping, blk: str) -> None:
    """One Whisper encoder layer: pre-norm attention (K has no bias) and a GELU MLP."""
    d = a.n_embd
    branch = shaping.residual / math.sqrt(a.n_layer)
    p.layer_norm(f"{blk}.ln1", d)
    for proj in ("attn_q", "attn_k", "attn_v"):
        p.weight(f"{blk}.{proj}.weight", (d, d), 1.0 / math.sqrt(d))
        if proj != "attn_k":
            p.noise(f"{blk}.{proj}.bias", d, 0.02)
    p.weight(f"{blk}.attn_out.weight", (d, d), branch / math.sqrt(d))
    p.const(f"{blk}.attn_out.bias", d, 0.0)
    p.layer_norm(f"{blk}.ln2", d)
    p.weight(f"{blk}.ffn_up.weight", (a.n_ff, d), 1.0 / math.sqrt(d))
    p.noise(f"{blk}.ffn_up.bias", a.n_ff, 0.02)
    p.weight(f"{blk}.ffn_down.weight", (d, a.n_ff), branch / math.sqrt(a.n_ff))
    p.const(f"{blk}.ffn_down.bias", d, 0.0)


def attention_block(
    p: Planner, spec: AudioModelSpec, shaping: Shaping, blk: str, *, qkv_bias: bool
) -> None:
    """A llama / qwen2 decoder layer, shaped like the vision families' (`spec.Shaping`)."""
    t = spec.text
    d, q_dim, kv_dim = t.n_embd, t.n_head * t.head_dim, t.n_head_kv * t.head_dim
    p.const(f"{blk}.attn_norm.weight", d, 1.0)
    p.weight(f"{blk}.attn_q.weight", (q_dim, d), shaping.qk_gain / math.sqrt(d))
    p.weight(f"{blk}.attn_k.weight", (kv_dim, d), shaping.qk_gain / math.sqrt(d))
    p.weight(f"{blk}.attn_v.weight", (kv_dim, d), shaping.vo_gain / math.sqrt(d))
    if qkv_bias:
        p.noise(f"{blk}.attn_q.bias", q_dim, 0.02)
        p.noise(f"{blk}.attn_k.bias", kv_dim, 0.02)
        p.noise(f"{blk}.attn_v.bias", kv_dim, 0.02)
    p.weight(f"{blk}.attn_output.weight", (d, q_dim), shaping.vo_gain / math.sqrt(q_dim))
    p.const(f"{blk}.ffn_norm.weight", d, 1.0)
    p.weight(f"{blk}.ffn_gate.weight", (t.n_ff, d), 1.0 / math.sqrt(d))
    p.weight(f"{blk}.ffn_up.weight", (t.n_ff, d), 1.0 / math.sqrt(d))
    p.weight(f"{blk}.ffn_down.weight", (d, t.n_ff), shaping.ffn_gain / math.sqrt(t.n_ff))
