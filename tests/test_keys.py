"""Keys and namespaces: identity, text round trips, validation, and that no
client-supplied string ever becomes part of a file path."""

from __future__ import annotations

import contextlib
import hashlib
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.store_helpers import ALLOWED_FILES, store_files
from vision_cache import CacheKey, Namespace, Store, content_digest
from vision_cache.errors import (
    InvalidDigestError,
    InvalidKeyError,
    InvalidNameError,
    InvalidNamespaceError,
)
from vision_cache.keys import validate_name
from vision_cache.store.layout import parse_segment_name, segment_name

BASE: dict[str, Any] = {
    "model": "gemma-3-4b-it",
    "mmproj": "mmproj-gemma-3-4b-f16.gguf:9f2c",
    "build": "b6000-vcache1",
    "format_version": 1,
    "encoder": {
        "image_min_tokens": 256,
        "image_max_tokens": 1024,
        "flash_attn": True,
        "device": "cuda0",
    },
}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**53), 2**53),
    st.text(max_size=20),
    st.floats(allow_nan=False, allow_infinity=False),
)
components = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
hex64 = st.text("0123456789abcdef", min_size=64, max_size=64)


def variants(value: Any) -> Iterator[Any]:
    """Values that differ from `value` (for the single-change property)."""
    yield "changed"
    yield None if value is not None else 0
    if isinstance(value, bool):
        yield not value
    elif isinstance(value, int):
        yield value + 1
    elif isinstance(value, str):
        yield value + "x"


def test_same_components_give_same_id_whatever_the_order() -> None:
    reordered = dict(reversed(list(BASE.items())))
    assert Namespace.from_components(reordered) == Namespace.from_components(BASE)


@pytest.mark.parametrize("component", sorted(BASE))
def test_changing_any_top_level_component_changes_the_namespace(component: str) -> None:
    base = Namespace.from_components(BASE)
    for value in variants(BASE[component]):
        changed = Namespace.from_components(BASE | {component: value})
        assert changed.id != base.id
        assert changed.key("a" * 64) != base.key("a" * 64)


@pytest.mark.parametrize("setting", sorted(BASE["encoder"]))
def test_changing_any_encoder_setting_changes_the_namespace(setting: str) -> None:
    base = Namespace.from_components(BASE)
    for value in variants(BASE["encoder"][setting]):
        encoder = BASE["encoder"] | {setting: value}
        assert Namespace.from_components(BASE | {"encoder": encoder}).id != base.id


def test_adding_or_removing_a_component_changes_the_namespace() -> None:
    base = Namespace.from_components(BASE)
    assert Namespace.from_components(BASE | {"image_size_cap": 1008}).id != base.id
    assert Namespace.from_components({k: v for k, v in BASE.items() if k != "build"}).id != base.id


def test_bool_and_int_are_different_components() -> None:
    assert Namespace.from_components({"a": True}).id != Namespace.from_components({"a": 1}).id


def test_for_encoder_is_from_components_with_named_fields() -> None:
    assert Namespace.for_encoder(**BASE) == Namespace.from_components(BASE)


@given(st.dictionaries(st.text(max_size=12), components, min_size=1, max_size=6), st.data())
def test_any_single_component_change_changes_the_key(
    mapping: dict[str, Any], data: st.DataObject
) -> None:
    base = Namespace.from_components(mapping)
    name = data.draw(st.sampled_from(sorted(mapping)))
    new_value = data.draw(
        components.filter(
            lambda v: (
                Namespace.from_components({"x": v}).text
                != Namespace.from_components({"x": mapping[name]}).text
            )
        )
    )
    changed = Namespace.from_components(mapping | {name: new_value})
    assert changed.id != base.id


@given(st.dictionaries(st.text(max_size=12), components, min_size=1, max_size=6))
def test_namespace_text_round_trips(mapping: dict[str, Any]) -> None:
    namespace = Namespace.from_components(mapping)
    assert Namespace.parse(namespace.text) == namespace
    assert namespace.text.isascii()
    assert namespace.id == hashlib.sha256(namespace.text.encode()).hexdigest()


@given(hex64, hex64)
def test_key_text_round_trips(namespace_id: str, digest: str) -> None:
    key = CacheKey(namespace_id, digest)
    assert CacheKey.parse(key.text) == key
    assert CacheKey.parse(str(key)) == key


@given(st.text(max_size=200))
def test_parse_accepts_only_well_formed_keys(text: str) -> None:
    try:
        key = CacheKey.parse(text)
    except InvalidKeyError:
        return
    assert key.text == text


@pytest.mark.parametrize(
    "digest",
    [
        "A" * 64,
        "a" * 63,
        "a" * 65,
        "g" * 64,
        "../" + "a" * 61,
        "a" * 64 + "\n",
        "",
    ],
)
def test_malformed_digests_are_refused(digest: str) -> None:
    with pytest.raises(InvalidDigestError):
        CacheKey("a" * 64, digest)
    with pytest.raises(InvalidDigestError):
        CacheKey(digest, "a" * 64)


def test_non_canonical_namespace_text_is_refused() -> None:
    namespace = Namespace.from_components({"a": 1, "b": 2})
    spaced = namespace.text.replace(",", ", ")
    with pytest.raises(InvalidNamespaceError):
        Namespace.parse(spaced)
    with pytest.raises(InvalidNamespaceError):
        Namespace.parse("not json")


@pytest.mark.parametrize(
    "bad", [{}, {"a": float("nan")}, {"a": b"bytes"}, {"a": {1: 2}}, {"a": object()}]
)
def test_unusable_components_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidNamespaceError):
        Namespace.from_components(bad)


def test_content_digest_is_sha256_of_all_bytes() -> None:
    image = bytes(range(256)) * 100
    assert content_digest(image) == hashlib.sha256(image).hexdigest()
    # A prefix or a differently shaped image with the same pixels must differ.
    assert content_digest(image[:-1]) != content_digest(image)


@pytest.mark.parametrize("name", ["a", "ref-1", "Brand.Logo_v2", "x" * 128])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name", ["", ".hidden", "-x", "a/b", "..", "a\\b", "x" * 129, "a b", "é", "a\x00"]
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidNameError):
        validate_name(name)


@given(st.text(max_size=40))
def test_names_never_carry_path_syntax(name: str) -> None:
    try:
        validate_name(name)
    except InvalidNameError:
        return
    assert "/" not in name and "\\" not in name and not name.startswith(".")
    assert set(name) <= set(string.ascii_letters + string.digits + "._-")


@given(st.integers(1, 10**12))
def test_segment_names_come_from_integers_only(segment_id: int) -> None:
    assert parse_segment_name(segment_name(segment_id)) == segment_id
    with pytest.raises(ValueError):
        segment_name(str(segment_id))  # type: ignore[arg-type]


hostile = st.lists(
    st.sampled_from(["/", "..", "\\", "\x00", "~", "a", "é", " ", "%", "seg-1"]), max_size=12
).map("".join)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(model=hostile, name=hostile, image=st.binary(min_size=1, max_size=64))
def test_no_client_string_reaches_a_path(
    tmp_path: Path, model: str, name: str, image: bytes
) -> None:
    """Hostile model names, reference names and images only ever land in the
    index: every file in the store matches the fixed layout."""
    root = tmp_path / "store"
    namespace = Namespace.for_encoder(
        model=model, mmproj=name, build="b", format_version=1, encoder={name: model}
    )
    key = namespace.key_for_image(image)
    with Store.open(root, hot_bytes=0) as store:
        store.register_namespace(namespace)
        assert store.put(key, model.encode(), image) is not None
        with contextlib.suppress(InvalidNameError):
            store.set_name(key, name)
        entry = store.get(key)
        assert entry is not None
        assert "/" not in entry.ref.segment and entry.ref.segment == segment_name(
            parse_segment_name(entry.ref.segment) or 1
        )
    for relative in store_files(root):
        assert ALLOWED_FILES.fullmatch(relative), relative
