"""The tiny equivalence check: does a patched llama-server decode packages exactly like images?

Run against a freshly built binary before packages are trusted on a llama.cpp tree nobody has
proven (``--source`` outside the proven range, ``make compat``, a rebase). For each of two
generated tiny models (Gemma 3: one fixed-size chunk, non-causal image attention; Qwen2-VL:
token grid by image size, M-RoPE) and two images of different shapes, a greedy answer to the
image's package, inline and by file reference, must be token-identical to the answer to the
raw image, with logprobs within 1e-5; and a different image and a tampered package must both
change the answer, so a server that ignored packages, or a model blind to images, fails.

About ten seconds on two cores, plus generating the two models once. Only the standard library
talks to the server; the models come from vision_cache.synthetic (numpy, gguf), imported when
the check runs.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import re
import struct
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger("vcache.build")

FAMILIES = ("gemma3", "qwen2vl")
IMAGES = ("shapes_640x480", "stripes_300x900")
OTHER_IMAGE = "noise_512x512"
N_PREDICT = 16
LOGPROB_TOLERANCE = 1e-5
STARTUP_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 300.0


@dataclasses.dataclass(frozen=True)
class EquivalenceResult:
    passed: bool
    detail: str  # what was shown, or what failed


class _Mismatch(Exception):
    """The server answered, but not as the check requires."""


def check_equivalence(binary: Path, models_dir: Path, *, threads: int = 2) -> EquivalenceResult:
    """Run the check against `binary`; models are generated into `models_dir` once."""
    from vision_cache.synthetic.models import generate  # numpy and gguf: only when run

    started = time.monotonic()
    shown = []
    try:
        for family in FAMILIES:
            files = generate(family, "tiny", 0, models_dir)
            with tempfile.TemporaryDirectory(prefix="vcache-equivalence-") as scratch:
                args = [
                    "-m", str(files.model), "--mmproj", str(files.mmproj), "-t", str(threads),
                    "-c", "4096", "--no-warmup", "--image-embedding-dir", scratch,
                ]  # fmt: skip
                with _server(binary, args, Path(scratch) / "server.log") as base:
                    shown.append(f"{family}: {_check_model(base)}")
    except (_Mismatch, OSError, RuntimeError) as e:
        return EquivalenceResult(False, f"{e} (after {time.monotonic() - started:.0f} s)")
    took = time.monotonic() - started
    return EquivalenceResult(True, "; ".join(shown) + f" ({took:.0f} s)")


def _check_model(base: str) -> str:
    props = _get(base, "/props").get("image_embedding")
    if not isinstance(props, dict) or not props.get("enabled"):
        raise _Mismatch(f"packages are not enabled: image_embedding = {props!r}")
    for name in IMAGES:
        url = _image_url(name)
        raw = _chat(base, {"type": "image_url", "image_url": {"url": url}})
        if len(raw.tokens) < N_PREDICT:
            raise _Mismatch(f"{name}: the answer to the raw image is {len(raw.tokens)} tokens")
        packages = {output: _encode(base, url, output) for output in ("inline", "file")}
        for output, pkg in packages.items():
            got = _chat(base, {"type": "image_embedding", "image_embedding": pkg})
            if got.tokens != raw.tokens:
                raise _Mismatch(f"{name}: package ({output}) answers {got.text!r}, "
                                f"the raw image {raw.text!r}")  # fmt: skip
            diff = raw.max_logprob_diff(got)
            if diff > LOGPROB_TOLERANCE:
                raise _Mismatch(f"{name}: package ({output}) logprobs differ by {diff:.2e}")
            if got.media_encoded_n != 0 or got.media_embedding_n == 0:
                raise _Mismatch(f"{name}: package ({output}) was encoded, not decoded")
        tampered = _chat(
            base, {"type": "image_embedding", "image_embedding": _tamper(packages["inline"])}
        )
        if tampered.tokens == raw.tokens and raw.max_logprob_diff(tampered) <= 1e-3:
            raise _Mismatch(f"{name}: a tampered package answers like the image")
    other = _chat(base, {"type": "image_url", "image_url": {"url": _image_url(OTHER_IMAGE)}})
    if other.tokens == raw.tokens:
        raise _Mismatch("two different images give the same answer: the model ignores images")
    return f"{len(IMAGES)} images, inline and file, identical; controls differ"


@dataclasses.dataclass(frozen=True)
class _Reply:
    tokens: tuple[str, ...]
    logprobs: tuple[float, ...]
    media_encoded_n: int
    media_embedding_n: int

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    def max_logprob_diff(self, other: _Reply) -> float:
        pairs = zip(self.logprobs, other.logprobs, strict=True)
        return max((abs(a - b) for a, b in pairs), default=0.0)


def _chat(base: str, part: dict[str, Any]) -> _Reply:
    body = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Describe it."}, part]}
        ],
        "temperature": 0, "max_tokens": N_PREDICT, "cache_prompt": False, "logprobs": True,
    }  # fmt: skip
    answer = _post(base, "/v1/chat/completions", body)
    steps = answer["choices"][0]["logprobs"]["content"]
    timings = answer.get("timings", {})
    return _Reply(
        tokens=tuple(s["token"] for s in steps),
        logprobs=tuple(s["logprob"] for s in steps),
        media_encoded_n=int(timings.get("media_encoded_n", -1)),
        media_embedding_n=int(timings.get("media_embedding_n", -1)),
    )


def _encode(base: str, url: str, output: str) -> dict[str, Any]:
    answer = _post(base, "/vision/embedding", {"image_url": {"url": url}, "output": output})
    pkg: dict[str, Any] = answer["image_embedding"]
    return pkg


def _tamper(pkg: dict[str, Any]) -> dict[str, Any]:
    """The same package, inline, with one embedding value changed."""
    if "data" not in pkg:
        raise _Mismatch("expected an inline package to tamper with")
    data = bytearray(base64.b64decode(pkg["data"]))
    (v,) = struct.unpack_from("<f", data, 0)
    struct.pack_into("<f", data, 0, v + 5.0)
    return {**pkg, "data": base64.b64encode(bytes(data)).decode()}


def _image_url(name: str) -> str:
    from vision_cache.synthetic.images import sample_image

    return sample_image(name).data_url("PNG")


# --- the server process ----------------------------------------------------------------------

_LISTENING = re.compile(r"listening on (http://[^\s]+?:\d+)\s")


@contextmanager
def _server(binary: Path, args: list[str], logfile: Path) -> Iterator[str]:
    with logfile.open("wb") as out:
        cmd = [str(binary), *args, "--host", "127.0.0.1", "--port", "0"]
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            yield _wait_ready(proc, logfile)
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_ready(proc: subprocess.Popen[bytes], logfile: Path) -> str:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    base = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = logfile.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"llama-server exited with code {proc.returncode}:\n{tail}")
        if base is None:
            m = _LISTENING.search(logfile.read_text(errors="replace"))
            base = m.group(1) if m else None
        if base is not None:
            try:
                # the base URL is the server's own loopback http:// address, from its log
                with urllib.request.urlopen(base + "/health", timeout=5) as r:  # noqa: S310
                    if r.status == 200:
                        return base
            except (urllib.error.URLError, OSError):
                pass  # not listening yet, or loading (503)
        time.sleep(0.1)
    raise RuntimeError(f"llama-server did not become healthy in {STARTUP_TIMEOUT_S:.0f} s")


def _get(base: str, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(base + path, timeout=REQUEST_TIMEOUT_S) as r:  # noqa: S310
        answer: dict[str, Any] = json.load(r)
        return answer


def _post(base: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(  # noqa: S310 (loopback http://, see _wait_ready)
        base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as r:  # noqa: S310
            answer: dict[str, Any] = json.load(r)
            return answer
    except urllib.error.HTTPError as e:
        raise _Mismatch(f"POST {path}: {e.code} {e.read().decode(errors='replace')[:300]}") from e
