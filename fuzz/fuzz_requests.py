#!/usr/bin/env python3
"""Coverage-guided fuzzing (atheris) of everything in the proxy that parses client input.

One input is an endpoint (the first byte picks one of the image endpoints, or a proxy
endpoint) and a request body (the rest). The target runs what a request goes through before
anything reaches upstream: decoding and parsing the body as the proxy does, `find_images` for
the endpoint's family, each image reference through the media loader's parsers (data URIs,
base64; http(s) URLs through the SSRF check only, nothing is fetched), the image header check,
``vcache://`` references through key and name validation, and the proxy endpoints' request
models. Any exception other than the proxy's own errors (which become llama-server-shaped 4xx
answers) is a finding: atheris stops and writes the input as ``crash-<hash>``.

    .venv/bin/python fuzz/fuzz_requests.py -atheris_runs=200000    # a bounded run
    .venv/bin/python fuzz/fuzz_requests.py -max_total_time=3600    # an hour
    .venv/bin/python fuzz/fuzz_requests.py crash-...                # replay a finding

With no corpus directory given it grows one in a temporary directory (libFuzzer adds what it
finds to the first directory it is given), seeded with fuzz/seeds/ (one input per endpoint
family), which it only reads.

The normal suite runs the same properties with Hypothesis (tests/test_fuzz_requests.py);
this one is for long runs on demand (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import atheris

with atheris.instrument_imports():
    from pydantic import ValidationError

    from proxy.errors import ProxyError
    from proxy.images import json_body
    from proxy.images.inspection import inspect
    from proxy.images.media import FetchPolicy, MediaLoader, vet_url
    from proxy.images.slots import IMAGE_PATHS, find_images
    from vision_cache.client.admin_api import LookupRequest, WarmRequest
    from vision_cache.errors import VisionCacheError
    from vision_cache.keys import validate_digest, validate_name

PATHS = [*sorted(IMAGE_PATHS), "/vcache/warm", "/vcache/lookup"]
POLICY = FetchPolicy(max_bytes=4 * 1024 * 1024)
_DIGEST_REF = re.compile(r"sha256:([0-9a-f]{64})")
_LOOP = asyncio.new_event_loop()
_LOADER = MediaLoader(POLICY)


def one_input(data: bytes) -> None:
    if not data:
        return
    path, raw = PATHS[data[0] % len(PATHS)], data[1:]
    if path.startswith("/vcache/"):
        _proxy_endpoint(path, raw)
        return
    try:  # what the proxy does with a body sent to an image endpoint (small spans: found)
        body = json_body.parse(bytearray(raw), min_span=16)
        slots = find_images(path, body, max_images=32)
    except ProxyError:
        return
    for slot in slots:
        if slot.span is None:
            _reference(slot.ref)
        else:
            with contextlib.suppress(ProxyError):  # an image sent inline, read in place
                inspect(_LOADER.inline(slot.span).head)
        slot.put_image(b"\x89PNG\r\n\x1a\n", "image/png", body.insert)
    body.dumps().join()  # rewritten bodies are written back


def _reference(ref: str) -> None:
    try:
        if ref.startswith("vcache://"):
            _named(ref[len("vcache://") :])
        elif ref[:4].lower() == "http":
            vet_url(ref, POLICY)  # what the loader checks before any connection
        elif not ref.lower().startswith("file:"):
            media = _LOOP.run_until_complete(_LOADER.load(ref))
            inspect(media.data)
    except ProxyError:
        pass


def _named(target: str) -> None:
    try:
        m = _DIGEST_REF.fullmatch(target)
        if m:
            validate_digest(m.group(1), "digest")
        else:
            validate_name(target)
    except VisionCacheError:
        pass


def _proxy_endpoint(path: str, raw: bytes) -> None:
    model: Any = WarmRequest if path == "/vcache/warm" else LookupRequest
    with contextlib.suppress(ValidationError):
        model.model_validate_json(raw)


def main() -> None:
    args = sys.argv[1:]
    if not any(not a.startswith("-") for a in args):  # no corpus, no input to replay
        work = tempfile.mkdtemp(prefix="vcache-fuzz-")
        print(f"corpus: {work} (seeds: fuzz/seeds)", flush=True)
        args += [work, str(Path(__file__).with_name("seeds"))]
    atheris.Setup([sys.argv[0], *args], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
