"""An embedding VLM in the manner of GME (Qwen2-VL based): Qwen2-VL's text model and merger,
with the GGUF saying ``pooling_type = mean``.

Served with ``llama-server --embeddings --mmproj ...``, it answers ``/v1/embeddings`` with one
mean-pooled vector per input, images included (OpenAI content arrays or ``multimodal_data``):
what `vcache compare` shortlists references by. The random weights are Qwen2-VL's shaping, so
different images give clearly different vectors (cosine about 0.6 to 0.8 between the test
images) and the same image gives the same vector.
"""

from __future__ import annotations

import dataclasses

import gguf

from vision_cache.synthetic.families.qwen2vl import Qwen2VL
from vision_cache.synthetic.spec import ModelSpec

POOLING_MEAN = 1  # llama.cpp's LLAMA_POOLING_TYPE_MEAN


class Qwen2VLEmbed(Qwen2VL):
    name = "qwen2vl-embed"

    @property
    def text_arch(self) -> str:
        return "qwen2vl"

    def tiny_spec(self) -> ModelSpec:
        return dataclasses.replace(super().tiny_spec(), arch=self.name)

    def realistic_spec(self) -> ModelSpec:
        return dataclasses.replace(super().realistic_spec(), arch=self.name)

    def text_kv_extra(self, w: gguf.GGUFWriter, spec: ModelSpec) -> None:
        super().text_kv_extra(w, spec)
        w.add_uint32(f"{self.text_arch}.pooling_type", POOLING_MEAN)


FAMILY = Qwen2VLEmbed()
