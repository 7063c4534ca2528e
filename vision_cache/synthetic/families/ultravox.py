"""Ultravox: Whisper encoder + projector ``ultravox`` + text arch ``llama`` (Llama 3).

The projector stacks consecutive encoder frames, then RMS norm, a SwiGLU MLP, RMS norm and a
linear map to the text width (``mm.a.*``). Real Ultravox stacks 8 frames; at the pinned
llama.cpp (0c1e57098) that cannot run: 1,500 frames do not divide by 8, the graph pads to 188
tokens while clip_n_output_tokens() says 187, and llama-server aborts on the first clip.
Voxtral (average pool, then stack 4) aborts the same way, so it has no family here. This family
stacks 4 frames (375 tokens per window), which llama.cpp runs as it would a real model.
"""

from __future__ import annotations

import dataclasses
import math

from vision_cache.synthetic.audio_family import (
    ENCODER_POSITIONS,
    WHISPER_LARGE,
    WHISPER_TINY_TEST,
    AudioFamily,
    AudioModelSpec,
    EncoderShaping,
    attention_block,
)
from vision_cache.synthetic.spec import Shaping, TextSpec
from vision_cache.synthetic.tensors import Planner
from vision_cache.synthetic.vocab import Vocab, byte_level_bpe_vocab

STACK = 4

# Llama 3's chat template, reduced to what tests send (text parts are joined; mtmd inserts the
# audio at the media marker the server puts in the text).
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set content = message['content'] %}"
    "{% else %}{% set content = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') %}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + content | trim"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)


class Ultravox(AudioFamily):
    name = "ultravox"
    projector_type = "ultravox"
    text_arch = "llama"

    def tiny_spec(self) -> AudioModelSpec:
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
        audio = dataclasses.replace(WHISPER_TINY_TEST, stack=STACK, proj_ff=256)
        return AudioModelSpec(self.name, "tiny", text, audio, "f32")

    def realistic_spec(self) -> AudioModelSpec:
        # Ultravox v0.5 on Llama-3.2-1B: text width 2048, 32 heads of 64, 8 KV heads
        text = TextSpec(
            n_embd=2048,
            n_layer=2,
            n_head=32,
            n_head_kv=8,
            head_dim=64,
            n_ff=8192,
            n_ctx=8192,
            rope_base=500_000.0,
        )
        audio = dataclasses.replace(WHISPER_LARGE, stack=STACK, proj_ff=4096)
        return AudioModelSpec(self.name, "realistic", text, audio, "f16")

    def tokens_per_window(self, spec: AudioModelSpec) -> int:
        return ENCODER_POSITIONS // spec.audio.stack

    def vocab(self) -> Vocab:
        vocab = byte_level_bpe_vocab(
            _SPECIALS,
            LLAMA3_CHAT_TEMPLATE,
            pre="llama-bpe",
            bos="<|begin_of_text|>",
            eos="<|eot_id|>",
            pad="<|end_of_text|>",
        )
        # the template ends the prompt with "\n\n": that token must be quiet too
        double_newline = vocab.tokens.index("\u010a\u010a")
        return dataclasses.replace(
            vocab, add_bos=True, quiet_ids=[*vocab.quiet_ids, double_newline]
        )

    def text_block(self, p: Planner, spec: AudioModelSpec, shaping: Shaping, blk: str) -> None:
        attention_block(p, spec, shaping, blk, qkv_bias=False)

    def projector(self, p: Planner, spec: AudioModelSpec, shaping: EncoderShaping) -> None:
        a, d_text = spec.audio, spec.text.n_embd
        stacked = a.n_embd * a.stack
        p.const("mm.a.norm_pre.weight", stacked, 1.0)
        # SwiGLU: twice the width in, one half gates the other
        p.weight("mm.a.mlp.1.weight", (2 * a.proj_ff, stacked), 1.0 / math.sqrt(stacked))
        p.const("mm.a.norm_mid.weight", a.proj_ff, 1.0)
        p.weight(
            "mm.a.mlp.2.weight", (d_text, a.proj_ff), shaping.projector_gain / math.sqrt(a.proj_ff)
        )


FAMILY = Ultravox()
