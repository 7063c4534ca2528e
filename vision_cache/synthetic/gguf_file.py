"""Writing a GGUF file: tensors streamed one at a time, behind a temporary name.

`tokenizer_kv` writes a `Vocab` as llama.cpp's tokenizer metadata; `write_gguf` writes the
header, the metadata a family gives (`KvWriter`) and then each planned tensor, drawn only when
its turn comes, so a multi-GB model never sits in memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import gguf
import numpy as np

from vision_cache.synthetic.spec import ModelSpec
from vision_cache.synthetic.tensors import TensorPlan
from vision_cache.synthetic.vocab import Vocab

KvWriter = Callable[[gguf.GGUFWriter], None]

# Mean / std that mtmd normalises pixels with (SigLIP's and OpenAI CLIP's).
SIGLIP_MEAN_STD = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
CLIP_MEAN_STD = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])


def file_type(spec: ModelSpec) -> int:
    return int(
        gguf.LlamaFileType.MOSTLY_F16 if spec.matrix_type == "f16" else gguf.LlamaFileType.ALL_F32
    )


def tokenizer_kv(w: gguf.GGUFWriter, vocab: Vocab) -> None:
    w.add_tokenizer_model(vocab.model)
    if vocab.pre:
        w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.scores:
        w.add_token_scores(vocab.scores)
    if vocab.merges:
        w.add_token_merges(vocab.merges)
    ids = vocab.special_ids
    w.add_bos_token_id(ids["bos"])
    w.add_eos_token_id(ids["eos"])
    if "unk" in ids:
        w.add_unk_token_id(ids["unk"])
    w.add_pad_token_id(ids["padding"])
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(False)
    if vocab.add_space_prefix is not None:
        w.add_add_space_prefix(vocab.add_space_prefix)
    w.add_chat_template(vocab.chat_template)


_PROGRESS_EVERY = 512 * 1024 * 1024  # bytes between progress lines on big files


def write_gguf(
    path: Path, arch: str, kv: KvWriter, plans: Sequence[TensorPlan], label: str
) -> None:
    """Stream tensors into ``path`` one at a time, via a temporary file and a rename.

    The rename makes the file appear complete or not at all, so a concurrent reader (or
    a killed run) never sees half a model.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        kv(writer)
        for plan in plans:
            writer.add_tensor_info(plan.name, plan.shape, np.dtype(plan.dtype), plan.nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        _write_tensors(writer, plans, label)
    finally:
        writer.close()
    os.replace(tmp, path)


def _write_tensors(writer: gguf.GGUFWriter, plans: Sequence[TensorPlan], label: str) -> None:
    total = sum(plan.nbytes for plan in plans)
    done, next_report = 0, _PROGRESS_EVERY
    for plan in plans:
        values = plan.make()
        if values.shape != plan.shape:
            raise AssertionError(f"{plan.name}: made {values.shape}, planned {plan.shape}")
        writer.write_tensor_data(values.astype(plan.dtype, copy=False))
        done += plan.nbytes
        if total > _PROGRESS_EVERY and done >= next_report:
            print(f"  {label}: {done / 2**20:,.0f} / {total / 2**20:,.0f} MiB", flush=True)
            next_report = done + _PROGRESS_EVERY
