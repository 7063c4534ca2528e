"""Qwen2-Audio: Whisper encoder + projector ``qwen2a`` + text arch ``qwen2``.

The encoder's 1,500 positions per 30 s window are average-pooled to 750 and mapped to the text
width by one linear layer (``mm.a.fc``). mtmd puts the audio between ``<|audio_bos|>`` and
``<|audio_eos|>``; the chat template is Qwen2-Audio-7B-Instruct's.
"""

from __future__ import annotations

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

QWEN2AUDIO_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}Audio {{ audio_count.value }}: "
    "<|audio_bos|><|AUDIO|><|audio_eos|>\n{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|AUDIO|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
)


class Qwen2Audio(AudioFamily):
    name = "qwen2audio"
    projector_type = "qwen2a"
    text_arch = "qwen2"

    def tiny_spec(self) -> AudioModelSpec:
        text = TextSpec(
            n_embd=128,
            n_layer=2,
            n_head=4,
            n_head_kv=2,
            head_dim=32,
            n_ff=384,
            n_ctx=8192,
            rope_base=1_000_000.0,
        )
        return AudioModelSpec(self.name, "tiny", text, WHISPER_TINY_TEST, "f32")

    def realistic_spec(self) -> AudioModelSpec:
        # Qwen2-Audio-7B: Whisper-large-v3 encoder, Qwen-7B text width 4096 (32 heads, MHA)
        text = TextSpec(
            n_embd=4096,
            n_layer=2,
            n_head=32,
            n_head_kv=32,
            head_dim=128,
            n_ff=11008,
            n_ctx=8192,
            rope_base=10_000.0,
        )
        return AudioModelSpec(self.name, "realistic", text, WHISPER_LARGE, "f16")

    def tokens_per_window(self, spec: AudioModelSpec) -> int:
        return ENCODER_POSITIONS // 2  # average pool by 2

    def vocab(self) -> Vocab:
        return byte_level_bpe_vocab(
            _SPECIALS,
            QWEN2AUDIO_CHAT_TEMPLATE,
            pre="qwen2",
            bos="<|endoftext|>",
            eos="<|im_end|>",
            pad="<|endoftext|>",
        )

    def text_block(self, p: Planner, spec: AudioModelSpec, shaping: Shaping, blk: str) -> None:
        attention_block(p, spec, shaping, blk, qkv_bias=True)  # Qwen2 has Q/K/V biases

    def projector(self, p: Planner, spec: AudioModelSpec, shaping: EncoderShaping) -> None:
        d_in, d_text = spec.audio.n_embd, spec.text.n_embd
        p.weight("mm.a.fc.weight", (d_text, d_in), shaping.projector_gain / math.sqrt(d_in))
        p.const("mm.a.fc.bias", d_text, 0.0)


FAMILY = Qwen2Audio()
