"""The caching chat handler (vision_cache.llama.chat_handler) against llama-cpp-python's stock one.

Greedy decoding, logprobs on, so replies are compared token by token. Negative controls: another
image answers differently (the model reads the image), a tampered stored package changes the
answer (hits really decode the stored embeddings), a package of another layout is not used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from tests.support.llama_cpp_fixtures import OTHER_IMAGE, data_url, png
from vision_cache.llama.libs import LlamaLibs
from vision_cache.package import StoredPackage
from vision_cache.store import Store
from vision_cache.synthetic.models import ModelFiles

if TYPE_CHECKING:
    from vision_cache.llama.chat_handler import CachingChatHandler

pytestmark = pytest.mark.server
N_TOKENS = 16


def _llama(libs: LlamaLibs, files: ModelFiles, handler: Any) -> Any:
    import llama_cpp

    # logits_all: per-token logprobs, so replies compare token by token
    return llama_cpp.Llama(
        str(files.model),
        chat_handler=handler,
        n_ctx=2048,
        n_threads=2,
        logits_all=True,
        verbose=False,
    )


@pytest.fixture(scope="session")
def stock_llama(
    llama_libs: LlamaLibs, tiny_model: Callable[[str], ModelFiles], arch: str
) -> Iterator[Any]:
    from llama_cpp.llama_chat_format import MTMDChatHandler

    files = tiny_model(arch)
    llama = _llama(
        llama_libs, files, MTMDChatHandler(str(files.mmproj), verbose=False, use_gpu=False)
    )
    yield llama
    llama.close()  # now: at interpreter exit the stock handler's cleanup writes to closed files


@pytest.fixture(scope="session")
def caching(
    llama_libs: LlamaLibs,
    tiny_model: Callable[[str], ModelFiles],
    arch: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Any, CachingChatHandler, Store]]:
    from vision_cache.llama.chat_handler import CachingChatHandler

    files = tiny_model(arch)
    with Store.open(tmp_path_factory.mktemp("handler-store"), hot_bytes=0, durable=False) as store:
        handler = CachingChatHandler(str(files.mmproj), store)
        llama = _llama(llama_libs, files, handler)
        yield llama, handler, store
        llama.close()
        assert store.check().ok


def _ask(llama: Any, image: bytes, text: str = "Describe the image.") -> tuple[str, ...]:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": text},
                {"type": "image_url", "image_url": {"url": data_url(image)}},
            ],
        }
    ]
    reply = llama.create_chat_completion(
        messages=messages, temperature=0, max_tokens=N_TOKENS, logprobs=True, top_logprobs=1
    )
    return tuple(t["token"] for t in reply["choices"][0]["logprobs"]["content"])


def test_cached_packages_are_token_identical_to_the_stock_handler(
    stock_llama: Any, caching: tuple[Any, CachingChatHandler, Store]
) -> None:
    llama, handler, _ = caching
    for name in ("shapes_640x480", "stripes_300x900"):
        image = png(name)
        expected = _ask(stock_llama, image)
        before = handler.stats.encoded_chunks

        assert _ask(llama, image) == expected, f"{name}: miss"
        encoded = handler.stats.encoded_chunks
        assert encoded > before
        hits = handler.stats.hits
        assert _ask(llama, image, "Another question about it?") != ()
        assert _ask(llama, image) == expected, f"{name}: hit"
        # the second and third requests decoded the stored package: the encoder did not run
        assert handler.stats.encoded_chunks == encoded
        assert handler.stats.hits == hits + 2
    assert handler.stats.unprepared_chunks == 0
    assert len(expected) == N_TOKENS
    # negative control: the model reads the image
    assert _ask(stock_llama, png(OTHER_IMAGE)) != expected


def test_hits_decode_the_stored_embeddings(
    stock_llama: Any, caching: tuple[Any, CachingChatHandler, Store]
) -> None:
    """A stored package whose tokens are rotated must change the answer, without an encode."""
    llama, handler, store = caching
    image = png("checkers_1024x256")
    assert _ask(llama, image) == _ask(stock_llama, image)
    key = handler.namespace.key_for_image(image)
    entry = store.get(key)
    assert entry is not None
    stored = StoredPackage.from_meta(entry.meta)
    values = np.frombuffer(entry.payload, dtype=np.float32).reshape(-1, stored.header.n_embd)
    tampered = np.roll(values, 7, axis=0).tobytes()
    del entry, values
    assert store.delete(key)
    assert store.put(key, stored.to_meta(), tampered) is not None
    encoded = handler.stats.encoded_chunks

    assert _ask(llama, image) != _ask(stock_llama, image)
    assert handler.stats.encoded_chunks == encoded


def test_a_package_of_another_layout_is_not_used(
    stock_llama: Any, caching: tuple[Any, CachingChatHandler, Store]
) -> None:
    """Chunk metadata that is not this handler's own tokenization of the image is a miss."""
    llama, handler, store = caching
    image = png(OTHER_IMAGE)
    key = handler.namespace.key_for_image(image)
    assert store.get(key) is None
    # another image's package (its chunks carry the other image's id) under this image's key
    _ask(llama, png("shapes_640x480"))
    donor = store.get(handler.namespace.key_for_image(png("shapes_640x480")))
    assert donor is not None
    header = StoredPackage.from_meta(donor.meta).header
    assert store.put(key, StoredPackage(header).to_meta(), donor.payload) is not None
    misses = handler.stats.misses

    assert _ask(llama, image) == _ask(stock_llama, image)
    assert handler.stats.misses == misses + 1


def test_the_namespace_names_the_encoder(
    caching: tuple[Any, CachingChatHandler, Store], llama_libs: LlamaLibs, lib_dir: Path
) -> None:
    """Like the stock handler, the encoder runs without flash attention when the Llama has it
    off, so its packages live apart from the server's (flash attention "auto")."""
    _, handler, store = caching
    components = handler.namespace.components
    assert components["build"] == llama_libs.build_id
    assert components["build"].startswith(lib_dir.parent.name.split("-")[0])
    assert components["encoder"]["flash_attn"] == "disabled"
    assert components["mmproj"].startswith("xxh3-128:")
    assert handler.namespace.id in {ns.id for ns in store.namespaces()}


def test_only_data_uris_are_loaded(caching: tuple[Any, CachingChatHandler, Store]) -> None:
    """The stock handler opens any URL with urllib; this one leaves fetching to the server."""
    _, handler, _ = caching
    with pytest.raises(ValueError, match="data: URIs"):
        handler.load_image("http://127.0.0.1:1/cat.png")
    with pytest.raises(ValueError, match="base64"):
        handler.load_image("data:image/png;base64,!!!!")
    assert handler.load_image(data_url(b"abc")) == b"abc"
