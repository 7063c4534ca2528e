"""What the proxy makes of upstream's GET /props: packages per modality, and why not."""

from __future__ import annotations

from typing import Any

from proxy.upstream.client import STOCK_REASON, Capabilities

UNVERIFIED = (
    "projector type 'janus_pro' (image) is not verified for packages; start with "
    "--image-embedding-unverified to allow it"
)


def props(**emb: Any) -> dict[str, Any]:
    base = {
        "enabled": True,
        "version": 1,
        "mmproj": "xxh3-128:" + "0" * 32 + ":1",
        "n_embd": 128,
        "build": "patched-x",
        "settings": {},
        "modalities": ["image"],
    }
    return {"media_marker": "<__media__>", "image_embedding": {**base, **emb}}


def test_image_packages_on_have_no_reason() -> None:
    caps = Capabilities.from_props(props(), "")
    assert caps.packages and caps.namespace is not None
    assert caps.reason is None


def test_a_stock_server_says_so() -> None:
    caps = Capabilities.from_props({"media_marker": "<__media__>"}, "")
    assert not caps.packages
    assert caps.reason == STOCK_REASON


def test_packages_off_for_an_unverified_type_carry_upstreams_reason() -> None:
    caps = Capabilities.from_props(props(enabled=False, modalities=[], reason=UNVERIFIED), "")
    assert not caps.packages
    assert caps.reason == UNVERIFIED


def test_images_go_raw_when_only_audio_takes_packages() -> None:
    """A mixed mmproj whose vision projector is unverified: no image namespace at all."""
    caps = Capabilities.from_props(
        props(modalities=["audio"], media_endpoint="/media/embedding", reason=UNVERIFIED), ""
    )
    assert caps.packages
    assert caps.namespace is None
    assert caps.audio_namespace is not None
    assert caps.reason == UNVERIFIED


def test_a_reason_is_one_printable_header_line() -> None:
    caps = Capabilities.from_props(props(enabled=False, reason="bad\r\nX-Evil: 1\u00e9"), "")
    assert caps.reason is not None
    assert caps.reason.isprintable() and caps.reason.isascii()
    assert "\n" not in caps.reason


def test_another_package_format_is_a_reason_too() -> None:
    caps = Capabilities.from_props(props(version=2), "")
    assert not caps.packages
    assert caps.reason is not None and "format 2" in caps.reason
