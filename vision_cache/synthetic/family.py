"""What one model family gives the generator: presets, a vocabulary, tensors and metadata.

A family is a module in `vision_cache.synthetic.families` with a ``FAMILY`` object, a subclass
of `Family`, and one line in `vision_cache.synthetic.registry`. The base class holds what
families share (the text model's embeddings and output, a ViT tower, the common GGUF keys);
a family fills in its own blocks, projector and keys::

    class Gemma3(Family):
        name = "gemma3"
        projector_type = "gemma3"
        def tiny_spec(self) -> ModelSpec: ...
        def realistic_spec(self) -> ModelSpec: ...
        def vocab(self) -> Vocab: ...
        def text_block(self, p, spec, shaping, blk): ...   # one decoder layer's tensors
        def patch_embedding(self, p, spec, shaping): ...    # the tower's input
        def projector(self, p, spec, shaping): ...          # tower output -> text width
        def expected_image_tokens(self, size, width, height): ...

    FAMILY = Gemma3()

The text model's GGUF architecture is `text_arch` (the family's name unless it says
otherwise); its mmproj's projector is `projector_type`.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from typing import ClassVar

import gguf

from vision_cache.synthetic.gguf_file import SIGLIP_MEAN_STD, KvWriter, file_type, tokenizer_kv
from vision_cache.synthetic.spec import ModelSpec, Shaping, Size
from vision_cache.synthetic.tensors import (
    Planner,
    TensorPlan,
    norm,
    output_weights,
    token_embd,
    vit_block,
)
from vision_cache.synthetic.vocab import Vocab

MeanStd = tuple[list[float], list[float]]


class Family(ABC):
    """One model family (text architecture plus projector), every size of it."""

    name: ClassVar[str]
    projector_type: ClassVar[str]
    # what mtmd normalises pixels with
    image_mean_std: ClassVar[MeanStd] = SIGLIP_MEAN_STD
    # llama-server arguments a server of this family needs (tests and benchmarks add them)
    server_args: ClassVar[tuple[str, ...]] = ()
    # what the generated model stands in for, where it is not the real text architecture
    text_note: ClassVar[str] = ""

    @property
    def text_arch(self) -> str:
        """The text model's GGUF architecture (`general.architecture`)."""
        return self.name

    # --- presets ---------------------------------------------------------------------------

    @abstractmethod
    def tiny_spec(self) -> ModelSpec:
        """Tests: f32, a few MB, milliseconds per image."""

    @abstractmethod
    def realistic_spec(self) -> ModelSpec:
        """Benchmarks: the real model's vision tower and text width, a shallow text model."""

    def spec(self, size: Size) -> ModelSpec:
        if size == "tiny":
            return self.tiny_spec()
        return self.demo_spec() if size == "demo" else self.realistic_spec()

    def demo_spec(self) -> ModelSpec:
        """`make demo`: the realistic widths and image size with a shallow vision tower.

        The encoder still dominates time to first token, as in real models, but one encode
        takes seconds instead of most of a minute on 2 cores (6 of SigLIP-so400m's 27
        layers). The text model keeps its width (so packages have their real size) with a
        narrower FFN, so that a hit shows what the encoder cost rather than a slow 2-layer
        prompt pass.
        """
        real = self.realistic_spec()
        vision = dataclasses.replace(real.vision, n_layer=6)
        text = dataclasses.replace(real.text, n_ff=real.text.n_embd)
        return dataclasses.replace(real, size="demo", vision=vision, text=text)

    @abstractmethod
    def expected_image_tokens(self, size: Size, width: int, height: int) -> int:
        """Embedding tokens mtmd produces for a ``width`` x ``height`` image."""

    # --- the text model --------------------------------------------------------------------

    @abstractmethod
    def vocab(self) -> Vocab: ...

    @abstractmethod
    def text_block(self, p: Planner, spec: ModelSpec, shaping: Shaping, blk: str) -> None:
        """The tensors of one decoder layer, named ``{blk}.*``."""

    def embedding_std(self, spec: ModelSpec) -> float:
        """Token embeddings' std: entries of std ~1 in the residual stream, like images'."""
        return 1.0

    def text_plan(
        self, spec: ModelSpec, vocab: Vocab, shaping: Shaping, seed: int
    ) -> list[TensorPlan]:
        """Tensors of the text model, in the layout llama.cpp's loader for it expects."""
        d, n_vocab = spec.text.n_embd, len(vocab.tokens)
        p = Planner(seed, spec.matrix_type)
        p.add(
            "token_embd.weight",
            (n_vocab, d),
            token_embd(seed, (n_vocab, d), self.embedding_std(spec), vocab, shaping),
            matrix=True,
        )
        p.const("output_norm.weight", d, 1.0)
        # Untied output: rows are independent of the input embeddings, so a word does not
        # predict itself and the text does not collapse into one repeated word.
        p.add(
            "output.weight",
            (n_vocab, d),
            output_weights(seed, (n_vocab, d), vocab, shaping),
            matrix=True,
        )
        for i in range(spec.text.n_layer):
            self.text_block(p, spec, shaping, f"blk.{i}")
        return p.plans

    def text_kv_extra(self, w: gguf.GGUFWriter, spec: ModelSpec) -> None:  # noqa: B027
        """Keys of this architecture beyond the common ones (attention shape, RoPE)."""

    def text_kv(self, spec: ModelSpec, vocab: Vocab) -> KvWriter:
        def write(w: gguf.GGUFWriter) -> None:
            t, a = spec.text, self.text_arch
            w.add_name(f"vcache test {spec.arch} {spec.size}")
            w.add_file_type(file_type(spec))
            w.add_uint32(f"{a}.context_length", t.n_ctx)
            w.add_uint32(f"{a}.embedding_length", t.n_embd)
            w.add_uint32(f"{a}.block_count", t.n_layer)
            w.add_uint32(f"{a}.feed_forward_length", t.n_ff)
            w.add_uint32(f"{a}.attention.head_count", t.n_head)
            w.add_uint32(f"{a}.attention.head_count_kv", t.n_head_kv)
            w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)
            w.add_float32(f"{a}.rope.freq_base", t.rope_base)
            self.text_kv_extra(w, spec)
            tokenizer_kv(w, vocab)

        return write

    # --- the mmproj: vision tower and projector --------------------------------------------

    @abstractmethod
    def patch_embedding(self, p: Planner, spec: ModelSpec, shaping: Shaping) -> None:
        """The tower's input: patch kernels, and position embeddings where the model has them."""

    def vision_block(self, p: Planner, spec: ModelSpec, shaping: Shaping, layer: int) -> None:
        """The tensors of tower block `layer`, named ``v.blk.{layer}.*``."""
        vit_block(p, spec.vision, shaping, f"v.blk.{layer}")

    @abstractmethod
    def projector(self, p: Planner, spec: ModelSpec, shaping: Shaping) -> None:
        """From the tower's output to the text model's width."""

    def patch_std(self, spec: ModelSpec, shaping: Shaping) -> float:
        # Normalised pixels are ~[-1, 1]; this gain gives patch embeddings of std ~1.
        return shaping.patch_gain / math.sqrt(3 * spec.vision.patch_size**2)

    def vision_plan(self, spec: ModelSpec, shaping: Shaping, seed: int) -> list[TensorPlan]:
        """Tensors of the mmproj file: vision tower plus projector."""
        v = spec.vision
        p = Planner(seed, spec.matrix_type)
        self.patch_embedding(p, spec, shaping)
        for i in range(v.n_layer):
            self.vision_block(p, spec, shaping, i)
        self.post_norm(p, spec)
        self.projector(p, spec, shaping)
        return p.plans

    def post_norm(self, p: Planner, spec: ModelSpec) -> None:
        """The norm after the last tower block (towers without one override this)."""
        norm(p, "v.post_ln", spec.vision.n_embd, spec.vision.norm)

    def mmproj_kv_extra(self, w: gguf.GGUFWriter, spec: ModelSpec) -> None:  # noqa: B027
        """Projector keys beyond `clip.projector_type` (merge size, activation)."""

    def mmproj_kv(self, spec: ModelSpec) -> KvWriter:
        def write(w: gguf.GGUFWriter) -> None:
            v = spec.vision
            w.add_name(f"vcache test {spec.arch} {spec.size} mmproj")
            w.add_file_type(file_type(spec))
            w.add_bool("clip.has_vision_encoder", True)
            w.add_uint32("clip.vision.image_size", v.image_size)
            w.add_uint32("clip.vision.patch_size", v.patch_size)
            w.add_uint32("clip.vision.embedding_length", v.n_embd)
            w.add_uint32("clip.vision.feed_forward_length", v.n_ff)
            w.add_uint32("clip.vision.block_count", v.n_layer)
            w.add_uint32("clip.vision.projection_dim", spec.text.n_embd)
            w.add_uint32("clip.vision.attention.head_count", v.n_head)
            w.add_float32("clip.vision.attention.layer_norm_epsilon", v.eps)
            w.add_string("clip.projector_type", self.projector_type)
            self.mmproj_kv_extra(w, spec)
            mean, std = self.image_mean_std
            w.add_array("clip.vision.image_mean", mean)
            w.add_array("clip.vision.image_std", std)

        return write
