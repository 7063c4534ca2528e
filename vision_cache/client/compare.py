"""Comparing a new image with many references through a running proxy.

References are warmed once (``vision_cache.warm`` or ``vcache warm --tag refs refs/``); each
comparison then encodes only the candidate, shortlists the references by cached embeddings,
and has the VLM judge just the finalists under a rubric that may change every run::

    import vision_cache

    reply = vision_cache.compare("new.jpg", rubric="short fur; triangular ears",
                                 references=vision_cache.References(tag="refs"), top_k=5)
    for f in reply.ranking:
        print(f.rank, f.reference, f.score, f.criteria)

`references_in(folder)` names a folder warmed earlier (by the SHA-256 of its files, labelled
with their names). `parse_condition` reads the command line's ``--where`` syntax.
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from vision_cache.client.admin_api import COMPARE, DEFAULT_PROXY, error_message, key_headers
from vision_cache.client.compare_api import (
    CompareReply,
    CompareRequest,
    Condition,
    Event,
    References,
)
from vision_cache.client.warmup import IMAGE_SUFFIXES
from vision_cache.data_uri import data_uri
from vision_cache.errors import VisionCacheError

OnEvent = Callable[[Event], None]


class CompareError(VisionCacheError):
    """The comparison could not be made (the proxy said why, or could not be reached)."""


def compare(
    candidate: str | Path,
    *,
    rubric: str,
    references: References,
    top_k: int = 5,
    proxy: str = DEFAULT_PROXY,
    api_key: str | None = None,
    on_event: OnEvent | None = None,
    timeout_s: float = 3600.0,
    **options: Any,
) -> CompareReply:
    """Rank `references` against `candidate` (a file, or an image URL, data URI or
    ``vcache://`` reference). `options` are the other fields of `CompareRequest`
    (criteria, where, describe, instruction, parallel, summary, model)."""
    request = CompareRequest(
        candidate=_image(candidate),
        rubric=rubric,
        references=references,
        top_k=top_k,
        stream=True,
        **options,
    )
    headers = key_headers(api_key)
    try:
        with (
            httpx.Client(base_url=proxy.rstrip("/"), headers=headers, timeout=timeout_s) as c,
            c.stream("POST", COMPARE, content=request.model_dump_json()) as r,
        ):
            if r.status_code != 200:
                raise CompareError(error_message(r.status_code, r.read()))
            return _events(r.iter_lines(), on_event)
    except httpx.HTTPError as e:
        raise CompareError(f"cannot reach the proxy at {proxy}: {e}") from e


def _events(lines: Any, on_event: OnEvent | None) -> CompareReply:
    for line in lines:
        if not line.strip():
            continue
        event = Event.model_validate_json(line)
        if event.event == "error":
            raise CompareError(str((event.error or {}).get("message", "comparison failed")))
        if event.event == "result" and event.result is not None:
            return event.result
        if on_event:
            on_event(event)
    raise CompareError("the proxy ended the comparison without a result")


def references_in(folder: str | Path, *, recursive: bool = False) -> References:
    """A folder warmed earlier, as a reference set: its images by digest, labelled by name."""
    root = Path(folder).expanduser()
    found = root.rglob("*") if recursive else root.glob("*")
    files = sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CompareError(f"no images in {folder}")
    labels = {hashlib.sha256(p.read_bytes()).hexdigest(): str(p.relative_to(root)) for p in files}
    return References(digests=list(labels), labels=labels)


def parse_condition(text: str) -> Condition:
    """``FIELD=VALUE``, ``FIELD!=VALUE``, ``FIELD>=N`` (``>``, ``<``, ``<=``), ``FIELD~TEXT``
    (contains); VALUE is read as JSON when it is JSON (numbers, true, lists), else as text."""
    for token, op in (
        ("!=", "ne"),
        (">=", "ge"),
        ("<=", "le"),
        ("~", "contains"),
        ("=", "eq"),
        (">", "gt"),
        ("<", "lt"),
    ):
        if token in text:
            field, raw = text.split(token, 1)
            try:
                value = json.loads(raw)
            except ValueError:
                value = raw
            return Condition.model_validate({"field": field.strip(), "op": op, "value": value})
    raise CompareError(f"not a condition: {text!r} (FIELD=VALUE, FIELD>=N, FIELD~TEXT)")


def conditions(texts: Sequence[str]) -> list[Condition]:
    return [parse_condition(t) for t in texts]


def _image(candidate: str | Path) -> str:
    text = str(candidate)
    if isinstance(candidate, str) and candidate.startswith(("http:", "https:", "data:", "vcache:")):
        return text
    path = Path(text).expanduser()
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    try:
        return data_uri(path.read_bytes(), mime)
    except OSError as e:
        raise CompareError(f"cannot read the candidate {path}: {e}") from e
