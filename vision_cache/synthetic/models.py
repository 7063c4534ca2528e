"""Generated models on disk: ``OUT/<family>-<size>/{model.gguf,mmproj.gguf,manifest.json}``.

`generate` writes one family at one size and seed, unless the directory's manifest records the
same seed, parameters and generator version (then it is left alone, so `make models` is cheap
the second time)::

    files = generate("gemma3", "tiny", 0, Path(".build/models"))
    llama-server -m files.model --mmproj files.mmproj

Serve with, e.g.::

    llama-server -m DIR/model.gguf --mmproj DIR/mmproj.gguf -t 2 -c 4096 -np 1 --temp 0
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vision_cache.synthetic.audio_family import AudioFamily, AudioModelSpec, EncoderShaping
from vision_cache.synthetic.gguf_file import KvWriter, write_gguf
from vision_cache.synthetic.registry import AnyFamily, get_family, vision_family
from vision_cache.synthetic.spec import ModelSpec, Shaping, Size
from vision_cache.synthetic.tensors import TensorPlan
from vision_cache.synthetic.vocab import Vocab

# Bump whenever the output for a given (family, size, seed) changes, so cached models
# regenerate.
GENERATOR_VERSION = 1


@dataclass(frozen=True)
class ModelFiles:
    """Where a generated model lives, and what a cached visual package costs for it."""

    directory: Path
    model: Path
    mmproj: Path
    manifest: Path
    n_embd: int  # text width: each image token's embedding has this many floats

    def package_bytes(self, n_image_tokens: int) -> int:
        """Size of one image's post-encoder embeddings (f32) for ``n_image_tokens``."""
        return n_image_tokens * self.n_embd * 4


def model_files(out: Path, family: str, size: Size) -> ModelFiles:
    directory = out / f"{family}-{size}"
    return ModelFiles(
        directory=directory,
        model=directory / "model.gguf",
        mmproj=directory / "mmproj.gguf",
        manifest=directory / "manifest.json",
        n_embd=get_family(family).spec(size).text.n_embd,
    )


def _vocab_digest(vocab: Vocab) -> str:
    blob = json.dumps(
        [vocab.tokens, vocab.types, vocab.scores, vocab.merges, vocab.chat_template],
        ensure_ascii=False,
    ).encode()
    return hashlib.sha256(blob).hexdigest()


def _params(
    spec: ModelSpec | AudioModelSpec,
    shaping: Shaping,
    vocab: Vocab,
    seed: int,
    encoder: EncoderShaping | None = None,
) -> dict[str, Any]:
    """Everything the output depends on; a manifest with other params means regenerate."""
    params = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "spec": dataclasses.asdict(spec),
        "shaping": dataclasses.asdict(shaping),
        "vocab_sha256": _vocab_digest(vocab),
    }
    if encoder is not None:
        params["encoder_shaping"] = dataclasses.asdict(encoder)
    return params


@dataclass(frozen=True)
class _Plan:
    """What one generation writes: the manifest's params, then each file's keys and tensors."""

    params: dict[str, Any]
    text: tuple[KvWriter, list[TensorPlan]]
    mmproj: tuple[KvWriter, list[TensorPlan]]


def _plan(fam: AnyFamily, size: Size, vocab: Vocab, seed: int) -> _Plan:
    shaping = Shaping()
    if isinstance(fam, AudioFamily):
        aspec, encoder = fam.spec(size), EncoderShaping()
        return _Plan(
            _params(aspec, shaping, vocab, seed, encoder),
            (fam.text_kv(aspec, vocab), fam.text_plan(aspec, vocab, shaping, seed)),
            (fam.mmproj_kv(aspec), fam.mmproj_plan(aspec, encoder, seed)),
        )
    spec = fam.spec(size)
    return _Plan(
        _params(spec, shaping, vocab, seed),
        (fam.text_kv(spec, vocab), fam.text_plan(spec, vocab, shaping, seed)),
        (fam.mmproj_kv(spec), fam.vision_plan(spec, shaping, seed)),
    )


def _up_to_date(files: ModelFiles, params: dict[str, Any]) -> bool:
    try:
        manifest = json.loads(files.manifest.read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("params") != json.loads(json.dumps(params)):
        return False
    sizes: dict[str, int] = manifest.get("file_sizes", {})
    for path in (files.model, files.mmproj):
        # A size mismatch means a truncated or foreign file: regenerate it.
        if not path.is_file() or path.stat().st_size != sizes.get(path.name):
            return False
    return True


def _write_manifest(
    files: ModelFiles, params: dict[str, Any], vocab: Vocab, seconds: float
) -> None:
    manifest = {
        "params": params,
        "file_sizes": {p.name: p.stat().st_size for p in (files.model, files.mmproj)},
        "n_vocab": len(vocab.tokens),
        "n_word_tokens": len(vocab.word_ids),
        "package_bytes_per_image_token": files.package_bytes(1),
        "generation_seconds": round(seconds, 2),
    }
    tmp = files.manifest.with_name(f".{files.manifest.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, files.manifest)


def generate(family: str, size: Size, seed: int, out: Path, *, force: bool = False) -> ModelFiles:
    """Write ``out/<family>-<size>/`` unless a manifest shows it is already there."""
    fam = get_family(family)
    files = model_files(out, family, size)
    vocab = fam.vocab()
    plan = _plan(fam, size, vocab, seed)
    params = plan.params
    label = f"{family}-{size}"
    if not force and _up_to_date(files, params):
        print(f"{label}: up to date in {files.directory}", flush=True)
        return files
    start = time.monotonic()
    files.directory.mkdir(parents=True, exist_ok=True)
    print(f"{label}: writing {files.model}", flush=True)
    write_gguf(files.model, fam.text_arch, *plan.text, f"{label} model")
    print(f"{label}: writing {files.mmproj}", flush=True)
    write_gguf(files.mmproj, "clip", *plan.mmproj, f"{label} mmproj")
    elapsed = time.monotonic() - start
    _write_manifest(files, params, vocab, elapsed)
    total = (files.model.stat().st_size + files.mmproj.stat().st_size) / 2**20
    print(f"{label}: done in {elapsed:.1f} s ({total:,.1f} MiB)", flush=True)
    return files


def expected_image_tokens(family: str, size: Size, width: int, height: int) -> int:
    """Embedding tokens mtmd produces for a ``width`` x ``height`` image (default limits)."""
    return vision_family(family).expected_image_tokens(size, width, height)


def audio_tokens_per_window(family: str, size: Size) -> int:
    """Embedding tokens an audio family makes of each 30 s window of a clip."""
    fam = get_family(family)
    if not isinstance(fam, AudioFamily):
        raise TypeError(f"{family} is not an audio family")
    return fam.tokens_per_window(fam.spec(size))
