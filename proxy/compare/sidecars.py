"""Attribute sidecars: the VLM's structured description of a reference, made once at warm-up.

``vcache warm --describe PROMPT_OR_SCHEMA`` asks the VLM, per reference, for a JSON
description: a JSON schema constrains the answer to its fields (llama-server's
``json_schema``), a plain prompt asks for any JSON object. The description is not kept apart:
it is the result-cache entry of that describe request (greedy, seeded, so fully determined),
which the next warm-up, a client sending the same request, and ``compare`` all find by the
same key. ``compare --where FIELD=VALUE`` keeps the references whose description passes
every condition, before any embedding is read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from proxy.errors import ClientError
from vision_cache.client.compare_api import Condition

DESCRIBE_MAX_TOKENS = 512
_PROMPT = "Describe this image as a JSON object"


def describe_request(
    image_ref: str, describe: str | dict[str, Any], model: str = ""
) -> dict[str, Any]:
    """The chat request whose answer is the image's description."""
    schema = _schema(describe)
    prompt = (
        f"{_PROMPT} with the fields of this schema."
        if schema is not None
        else f"{_PROMPT}. {describe}"
    )
    fmt: dict[str, Any] = (
        {"type": "json_schema", "json_schema": {"name": "description", "schema": schema}}
        if schema is not None
        else {"type": "json_object"}
    )
    body: dict[str, Any] = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_ref}},
                    {"type": "text", "text": prompt},
                ],
            }
        ],
        "temperature": 0,
        "seed": 0,
        "max_tokens": DESCRIBE_MAX_TOKENS,
        "response_format": fmt,
    }
    if model:
        body["model"] = model
    return body


def _schema(describe: str | dict[str, Any]) -> dict[str, Any] | None:
    if isinstance(describe, dict):
        return describe
    text = describe.strip()
    if not text.startswith("{"):
        return None
    try:
        schema = json.loads(text)
    except ValueError as e:
        raise ClientError(f"describe looks like a JSON schema but is not JSON: {e}") from e
    if not isinstance(schema, dict):
        raise ClientError("a describe schema must be a JSON object")
    return schema


def description(answer_body: Any) -> dict[str, Any] | None:
    """The description in a describe request's answer; None if it holds none."""
    try:
        content = answer_body["choices"][0]["message"]["content"]
        doc = json.loads(content)
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def passes(doc: dict[str, Any], conditions: Sequence[Condition]) -> bool:
    return all(_test(_field(doc, c.field), c) for c in conditions)


_MISSING = object()


def _field(doc: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(doc, dict) or part not in doc:
            return _MISSING
        doc = doc[part]
    return doc


def _test(value: Any, c: Condition) -> bool:
    if value is _MISSING:
        return c.op == "ne"
    if c.op == "eq":
        return bool(_same(value, c.value))
    if c.op == "ne":
        return not _same(value, c.value)
    if c.op == "in":
        return isinstance(c.value, list) and any(_same(value, v) for v in c.value)
    if c.op == "contains":
        if isinstance(value, str):
            return isinstance(c.value, str) and c.value.lower() in value.lower()
        return isinstance(value, list) and any(_same(v, c.value) for v in value)
    return _order(value, c)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a.strip().lower() == b.strip().lower()
    return bool(a == b)


def _order(value: Any, c: Condition) -> bool:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or isinstance(c.value, bool)
        or not isinstance(c.value, int | float)
    ):
        return False
    return {
        "lt": value < c.value,
        "le": value <= c.value,
        "gt": value > c.value,
        "ge": value >= c.value,
    }[c.op]
