"""Where media sit in the request bodies llama-server accepts, and how to swap one for a package.

Each endpoint family names images its own way; this module hides that behind `ImageSlot`: the
client's reference to one image or audio clip (a URL, a data URI, base64, or ``vcache://NAME``)
plus a function that puts a package object in its place. The forms are those of
docs/wire-format.md. Audio comes in OpenAI ``input_audio`` parts and in ``multimodal_data``; the
package that replaces a clip goes in the ``media_embedding`` form (``image_embedding`` is the
image-only spelling), chosen by the package's own ``modality``.

`ImageSlot.put_image` puts image bytes where the client named the image by URL or path: the
proxy fetches such images itself (under its SSRF policy) and upstream must never fetch them.

Bodies come parsed by `proxy.images.json_body`: an image sent inline is a big string left in the
raw body, a `Span`, and its slot says so (`ImageSlot.span`, `ref` then holding its first
characters).

A client that sends ``image_embedding`` parts itself is refused unless the proxy is told to
trust them: a package names its own id, and a forged one could poison the server's prompt cache
for the image it claims to be.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import pybase64

from proxy.errors import ClientPackageRefused, TooManyImages
from proxy.images.json_body import JsonBody, Span
from vision_cache.data_uri import data_uri_bytes

Package = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class InlinePayload:
    """A package's payload, in place of its ``data`` string until the request is written out
    (`proxy.web.app` puts its base64 into the body as it is, never through the JSON encoder)."""

    payload: bytes | memoryview

    def base64(self) -> bytes:
        return pybase64.b64encode(self.payload)


# puts a string value whose JSON text is the given bytes (no escaping needed) in the body,
# written out as it is (JsonBody.insert)
Insert = Callable[[bytes], str]

CHAT_PATHS = frozenset(
    {
        "/v1/chat/completions",
        "/chat/completions",
        "/v1/chat/completions/input_tokens",
        "/chat/completions/input_tokens",
    }
)
EMBEDDING_PATHS = frozenset({"/embedding", "/embeddings", "/v1/embeddings"})
PROMPT_PATHS = (
    frozenset(
        {
            "/completion",
            "/completions",
            "/v1/completions",
            "/infill",
        }
    )
    | EMBEDDING_PATHS
)
ANTHROPIC_PATHS = frozenset({"/v1/messages", "/v1/messages/count_tokens"})
RESPONSES_PATHS = frozenset(
    {
        "/v1/responses",
        "/responses",
        "/v1/responses/input_tokens",
        "/responses/input_tokens",
    }
)
IMAGE_PATHS = CHAT_PATHS | PROMPT_PATHS | ANTHROPIC_PATHS | RESPONSES_PATHS


@dataclasses.dataclass(frozen=True)
class ImageSlot:
    """One image in a request: what the client sent, and how to replace it by a package
    (`put_package`) or by the image's bytes and media type (`put_image`).

    `span` is the client's reference where it is a big string left in the body (an image sent
    inline); `ref` then holds its first characters, enough to tell what it is."""

    ref: str
    mime: str | None
    put_package: Callable[[Package], None]
    put_image: Callable[[bytes, str, Insert], None]
    # an audio package can go here (chat parts, multimodal_data); Anthropic and Responses
    # blocks have no form for one, so a clip there is left as sent
    takes_audio: bool = True
    span: Span | None = None
    # with a span: the string that stands for it in the parsed body (`JsonBody.span` of it is
    # `span`), which is how the result cache finds this image in the body
    placeholder: str | None = None


def find_images(
    path: str, body: JsonBody, *, max_images: int, allow_client_packages: bool = False
) -> list[ImageSlot]:
    """Every image in `body`, in request order; raises on a refused or oversized request."""
    if not isinstance(body.tree, dict) or path not in IMAGE_PATHS:
        return []
    found = [_with_span(s, body) if s is not None else None for s in _slots(path, body.tree)]
    if not allow_client_packages and any(s is None for s in found):
        raise ClientPackageRefused(
            "image_embedding inputs are not accepted from clients; send the image itself"
        )
    slots = [s for s in found if s is not None]
    if len(slots) > max_images:
        raise TooManyImages(f"{len(slots)} images in one request, the limit is {max_images}")
    return slots


def _with_span(slot: ImageSlot, body: JsonBody) -> ImageSlot:
    span = body.span(slot.ref)
    if span is None:
        return slot
    return dataclasses.replace(slot, ref=span.head(), span=span, placeholder=slot.ref)


# walkers yield None for a package the client sent itself (an image_embedding input)
Found = ImageSlot | None


def _slots(path: str, body: dict[str, Any]) -> Iterator[Found]:
    if path in CHAT_PATHS:
        yield from _chat_slots(body.get("messages"))
    elif path in PROMPT_PATHS:
        for key in ("prompt", "input", "content"):
            yield from _prompt_slots(body.get(key), path in EMBEDDING_PATHS)
    elif path in ANTHROPIC_PATHS:
        yield from _anthropic_slots(body.get("messages"))
    else:
        yield from _responses_slots(body.get("input"))


# --- OpenAI chat: {"type": "image_url", "image_url": {"url": ...}} ---------------------------


def _chat_slots(messages: Any) -> Iterator[Found]:
    for msg in _dicts(messages):
        yield from _part_slots(msg.get("content"))


def _part_slots(parts: Any) -> Iterator[Found]:
    """The media of one OpenAI content array (a chat message's, or an embedding input's)."""
    for part in _dicts(parts):
        if part.get("type") in ("image_embedding", "media_embedding"):
            yield None
        if part.get("type") == "input_audio":
            yield from _audio_part(part)
        if part.get("type") != "image_url":
            continue
        image_url = part.get("image_url")
        url = image_url.get("url") if isinstance(image_url, dict) else image_url
        if isinstance(url, str):
            yield ImageSlot(url, None, _chat_replacer(part), _chat_image(part))


def _chat_replacer(part: dict[str, Any]) -> Callable[[Package], None]:
    def put(pkg: Package) -> None:
        kind = package_kind(pkg)
        part.clear()
        part.update({"type": kind, kind: pkg})

    return put


def package_kind(pkg: Package) -> str:
    """The input type a package goes in: image_embedding, or media_embedding for audio."""
    return "media_embedding" if pkg.get("modality") == "audio" else "image_embedding"


def _audio_part(part: dict[str, Any]) -> Iterator[Found]:
    # {"type": "input_audio", "input_audio": {"data": "<base64>", "format": "wav"}}; the server
    # also takes a "url" there (a data URI, http(s), file://), and ignores "format"
    audio = part.get("input_audio")
    if not isinstance(audio, dict):
        return
    key = "data" if isinstance(audio.get("data"), str) else "url"
    ref = audio.get(key)
    if isinstance(ref, str):
        yield ImageSlot(ref, None, _chat_replacer(part), _audio_bytes(audio, key))


def _audio_bytes(audio: dict[str, Any], key: str) -> Callable[[bytes, str, Insert], None]:
    def put(data: bytes, mime: str, insert: Insert) -> None:
        audio.pop("url" if key == "data" else "data", None)
        audio[key] = insert(
            data_uri_bytes(data, mime) if key == "url" else pybase64.b64encode(data)
        )

    return put


def _chat_image(part: dict[str, Any]) -> Callable[[bytes, str, Insert], None]:
    def put(data: bytes, mime: str, insert: Insert) -> None:
        if isinstance(part.get("image_url"), dict):
            part["image_url"]["url"] = insert(data_uri_bytes(data, mime))
        else:
            part["image_url"] = insert(data_uri_bytes(data, mime))

    return put


# --- native prompts: {"prompt_string": ..., "multimodal_data": ["<base64>", ...]} ------------


def _prompt_slots(prompt: Any, embedding: bool) -> Iterator[Found]:
    for obj in _dicts(prompt if isinstance(prompt, list) else [prompt]):
        if embedding and isinstance(obj.get("content"), list):
            # an embedding input may be an OpenAI content array: {"content": [parts]}
            yield from _part_slots(obj["content"])
            continue
        data = obj.get("multimodal_data")
        if not isinstance(data, list):
            continue
        for i, item in enumerate(data):
            if isinstance(item, str):
                yield ImageSlot(item, None, _list_replacer(data, i), _list_image(data, i))
            elif isinstance(item, dict):
                yield None


def _list_replacer(items: list[Any], i: int) -> Callable[[Package], None]:
    def put(pkg: Package) -> None:
        items[i] = {package_kind(pkg): pkg}

    return put


def _list_image(items: list[Any], i: int) -> Callable[[bytes, str, Insert], None]:
    def put(data: bytes, mime: str, insert: Insert) -> None:
        items[i] = insert(pybase64.b64encode(data))  # multimodal_data holds bare base64

    return put


# --- Anthropic: {"type": "image", "source": {"type": "base64"|"url", ...}} -------------------


def _anthropic_slots(messages: Any) -> Iterator[Found]:
    for msg in _dicts(messages):
        for block in _dicts(msg.get("content")):
            yield from _anthropic_block(block)
            if block.get("type") == "tool_result":
                for inner in _dicts(block.get("content")):
                    yield from _anthropic_block(inner)


def _anthropic_block(block: dict[str, Any]) -> Iterator[Found]:
    source = block.get("source")
    if block.get("type") != "image" or not isinstance(source, dict):
        return
    kind = source.get("type")
    if kind == "image_embedding":
        yield None
    elif kind == "base64" and isinstance(source.get("data"), str):
        mime = source.get("media_type")
        yield ImageSlot(
            source["data"],
            mime if isinstance(mime, str) else None,
            _source_replacer(block),
            _source_image(block),
            takes_audio=False,
        )
    elif kind == "url" and isinstance(source.get("url"), str):
        yield ImageSlot(
            source["url"], None, _source_replacer(block), _source_image(block), takes_audio=False
        )


def _source_replacer(block: dict[str, Any]) -> Callable[[Package], None]:
    def put(pkg: Package) -> None:
        block["source"] = {"type": "image_embedding", "image_embedding": pkg}

    return put


def _source_image(block: dict[str, Any]) -> Callable[[bytes, str, Insert], None]:
    def put(data: bytes, mime: str, insert: Insert) -> None:
        block["source"] = {
            "type": "base64",
            "media_type": mime,
            "data": insert(pybase64.b64encode(data)),
        }

    return put


# --- Responses: {"type": "input_image", "image_url": "..."} ----------------------------------


def _responses_slots(items: Any) -> Iterator[Found]:
    for item in _dicts(items):
        if item.get("type") == "image_embedding":
            yield None
        for key in ("content", "output"):
            for part in _dicts(item.get(key)):
                if part.get("type") == "image_embedding":
                    yield None
                url = part.get("image_url")
                if part.get("type") == "input_image" and isinstance(url, str):
                    yield ImageSlot(
                        url, None, _chat_replacer(part), _responses_image(part), takes_audio=False
                    )


def _responses_image(part: dict[str, Any]) -> Callable[[bytes, str, Insert], None]:
    def put(data: bytes, mime: str, insert: Insert) -> None:
        part["image_url"] = insert(data_uri_bytes(data, mime))

    return put


# --- helpers ---------------------------------------------------------------------------------


def _dicts(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, list):
        yield from (v for v in value if isinstance(v, dict))
