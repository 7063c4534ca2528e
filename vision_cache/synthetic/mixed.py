"""A model that takes images and audio: a vision family's tower and an audio family's encoder in
one mmproj, for requests that carry both.

llama.cpp loads an mmproj with both encoders when it names each modality's projector apart
(``clip.vision.projector_type``, ``clip.audio.projector_type``), as omni models do; the text
model is the vision family's, and both projectors map to its width::

    files = generate_mixed("gemma3", "qwen2audio", Path(".build/models"))
    llama-server -m files.model --mmproj files.mmproj

Only tiny sizes: this model exists for the tests of mixed requests.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import gguf

from vision_cache.synthetic.audio_family import AudioFamily, EncoderShaping
from vision_cache.synthetic.family import Family
from vision_cache.synthetic.gguf_file import KvWriter, write_gguf
from vision_cache.synthetic.models import ModelFiles, generate, model_files
from vision_cache.synthetic.registry import get_family, vision_family
from vision_cache.synthetic.spec import Shaping


class _OneModality:
    """A GGUFWriter seen by one family's key writer: its projector type goes under its
    modality's key, and keys the other family already wrote are left as they are."""

    def __init__(self, writer: gguf.GGUFWriter, modality: str, written: set[str]) -> None:
        self._writer = writer
        self._modality = modality
        self._written = written

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._writer, name)
        if not name.startswith("add_"):
            return method

        keyed = name in ("add_string", "add_bool", "add_uint32", "add_float32", "add_array")

        def add(first: Any, *args: Any, **kwargs: Any) -> Any:
            if keyed and first == "clip.projector_type":
                first = f"clip.{self._modality}.projector_type"
            seen = first if keyed else name  # add_name(value), add_file_type(value): one each
            if seen in self._written:
                return None
            self._written.add(seen)
            return method(first, *args, **kwargs)

        return add


def _mixed_kv(vision: KvWriter, audio: KvWriter) -> KvWriter:
    def write(w: gguf.GGUFWriter) -> None:
        written: set[str] = set()
        vision(_OneModality(w, "vision", written))  # type: ignore[arg-type]
        audio(_OneModality(w, "audio", written))  # type: ignore[arg-type]

    return write


def generate_mixed(vision_name: str, audio_name: str, out: Path, seed: int = 0) -> ModelFiles:
    """Write ``out/<vision>-<audio>-tiny/`` (text model and mmproj), unless already there."""
    fam_v: Family = vision_family(vision_name)
    fam_a = get_family(audio_name)
    if not isinstance(fam_a, AudioFamily):
        raise TypeError(f"{audio_name} is not an audio family")
    spec_v, spec_a = fam_v.spec("tiny"), fam_a.spec("tiny")
    if spec_v.text.n_embd != spec_a.text.n_embd:
        raise ValueError(f"{vision_name} and {audio_name} have different text widths")
    text = generate(vision_name, "tiny", seed, out)  # the text model, cached like any model
    files = model_files(out, vision_name, "tiny")
    directory = out / f"{vision_name}-{audio_name}-tiny"
    mixed = ModelFiles(
        directory, text.model, directory / "mmproj.gguf", directory / "manifest.json", files.n_embd
    )
    stamp = {
        "vision": json.loads(text.manifest.read_text())["params"],
        "audio": {
            "family": audio_name,
            "seed": seed,
            "spec": dataclasses.asdict(spec_a),
            "shaping": dataclasses.asdict(EncoderShaping()),
        },
    }
    stamp = json.loads(json.dumps(stamp))
    fresh = mixed.manifest.is_file() and mixed.mmproj.is_file()
    if fresh and json.loads(mixed.manifest.read_text()) == stamp:
        return mixed
    directory.mkdir(parents=True, exist_ok=True)
    shaping, encoder = Shaping(), EncoderShaping()
    plans = fam_v.vision_plan(spec_v, shaping, seed) + fam_a.mmproj_plan(spec_a, encoder, seed)
    write_gguf(
        mixed.mmproj,
        "clip",
        _mixed_kv(fam_v.mmproj_kv(spec_v), fam_a.mmproj_kv(spec_a)),
        plans,
        f"{directory.name} mmproj",
    )
    tmp = mixed.manifest.with_name(f".{mixed.manifest.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(stamp))
    os.replace(tmp, mixed.manifest)
    return mixed
