"""Request bodies with their big strings left in place (proxy.images.json_body): every body is
read as the standard library reads it (or refused as it refuses it), and written back intact,
the big strings byte for byte."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import ClientError
from proxy.images.json_body import JsonBody, parse

MIN = 8  # tiny spans, so that the generated bodies have many


def _values() -> st.SearchStrategy[Any]:
    text = st.text(st.characters(codec="utf-8"), max_size=40)
    leaves = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(text, inner, max_size=5),
        max_leaves=30,
    )


def _materialized(body: JsonBody, value: Any) -> Any:
    """The tree with every span read back to its value."""
    span = body.span(value)
    if span is not None:
        return span.text()
    if isinstance(value, list):
        return [_materialized(body, v) for v in value]
    if isinstance(value, dict):
        return {k: _materialized(body, v) for k, v in value.items()}
    return value


@settings(max_examples=300, deadline=None)
@given(_values(), st.booleans(), st.booleans())
def test_reads_and_writes_back_what_the_standard_library_reads(
    value: Any, ascii_: bool, spaced: bool
) -> None:
    raw = json.dumps(value, ensure_ascii=ascii_, indent=1 if spaced else None).encode()
    body = parse(raw, min_span=MIN)
    assert _materialized(body, body.tree) == json.loads(raw)
    assert json.loads(body.dumps().join()) == json.loads(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=60) | st.text(max_size=60).map(str.encode))
def test_refuses_exactly_what_the_standard_library_refuses(raw: bytes) -> None:
    try:
        expected = json.loads(raw.decode("utf-8").removeprefix("\ufeff"))
    except (ValueError, RecursionError):
        with pytest.raises(ClientError):
            parse(raw, min_span=2)
        return
    body = parse(raw, min_span=2)
    # compared as JSON text: NaN is read too, and NaN != NaN
    assert json.dumps(_materialized(body, body.tree)) == json.dumps(expected)


def test_big_strings_stay_in_the_body_and_keys_never_become_spans() -> None:
    big = "A" * 100
    raw = json.dumps({"url": big, big: [big, "short"]}).encode()
    body = parse(raw, min_span=64)
    span = body.span(body.tree["url"])
    assert span is not None and span.view.obj is raw  # a view of the body: no copy
    assert big in body.tree  # a key is parsed as ever
    assert body.span(body.tree[big][1]) is None
    assert json.loads(body.dumps().join()) == json.loads(raw)


def test_escapes_in_a_span_are_kept_byte_for_byte() -> None:
    raw = b'{"a": "' + b'x\\"y\\\\z\\u00e9\\/' * 20 + b'"}'
    body = parse(raw, min_span=16)
    span = body.span(body.tree["a"])
    assert span is not None and span.escaped
    assert span.text() == json.loads(raw)["a"]
    assert span.head(7) == 'x"y\\z'  # never half an escape
    assert body.dumps().join() == b'{"a":"' + b'x\\"y\\\\z\\u00e9\\/' * 20 + b'"}'


def test_a_client_string_that_looks_like_a_placeholder_is_just_a_string() -> None:
    raw = json.dumps({"a": "\u0000deadbeefdeadbeef:0", "b": "B" * 100}).encode()
    body = parse(raw, min_span=64)
    assert body.span(body.tree["a"]) is None
    assert json.loads(body.dumps().join()) == json.loads(raw)


def test_inserted_strings_are_written_as_they_are() -> None:
    body = parse(b'{"parts": [1, 2]}')
    body.tree["parts"].append(body.insert(b"data:image/png;base64,QUJD"))
    assert json.loads(body.dumps().join()) == {"parts": [1, 2, "data:image/png;base64,QUJD"]}


def test_segments_come_out_in_bounded_pieces_without_copies() -> None:
    raw = json.dumps({"a": "x" * 1000}).encode()
    out = parse(raw, min_span=100).dumps()
    pieces = list(out.chunks(64))
    assert max(p.nbytes for p in pieces) <= 64
    assert b"".join(pieces) == out.join() and len(out) == len(out.join())
