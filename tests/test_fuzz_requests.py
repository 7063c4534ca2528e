"""Fuzzing what parses client input: request bodies of every endpoint family, image parts,
``vcache://`` references, data URIs and base64, through `find_images` and through the running
proxy. Whatever comes in: no 500, no traceback in any body, every error of the proxy in
llama-server's shape, and no image URL or path ever reaches upstream.

The proxy and the fault upstream (tests/support/fault_upstream.py, as a stock and as a patched
server) run on their own event loop in a thread, so Hypothesis drives them with a plain client. Name
lookups are faked and connections leaving loopback fail: no fuzzed URL reaches the network.
fuzz/fuzz_requests.py is the coverage-guided (atheris) version of the same, run on demand.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.errors import ClientError, ClientPackageRefused, MediaFetchFailed, TooManyImages
from proxy.images import json_body, media
from proxy.images.slots import (
    ANTHROPIC_PATHS,
    CHAT_PATHS,
    IMAGE_PATHS,
    PROMPT_PATHS,
    RESPONSES_PATHS,
    find_images,
)
from tests.support.fault_upstream import FaultUpstream
from tests.support.inprocess_proxy import png_bytes, proxy_in_front

PROXY_ERRORS = {400, 401, 413, 502, 503, 504}
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- strategies -------------------------------------------------------------------------------

PNG = base64.b64encode(png_bytes(5)).decode()
# numbers past 64 bits and NaN too: llama-server's parser reads huge integers, and the proxy
# must write back whatever it parsed (orjson could not, and answered 500: found by atheris)
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20))
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
b64 = st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode())
locators = st.sampled_from(
    [
        "http://127.0.0.1/x.png",
        "http://[::1]/x",
        "http://10.0.0.1/",
        "http://2130706433/",
        "https://internal.test/x.png",
        "http:/x",
        "http",
        "HTTP://127.0.0.1:1/",
        "httpx://y",
        "file:///etc/passwd",
        "file://../x",
        "gopher://x/",
        "ftp://127.0.0.1/",
        "//x/y.png",
    ]
)
refs = st.one_of(
    locators,
    locators,
    st.just(PNG),
    st.just("data:image/png;base64," + PNG),
    b64,
    b64.map(lambda t: "data:image/png;base64," + t),
    st.tuples(
        st.sampled_from(["image/png", "IMAGE/JPEG", "text/html", "image/", "", "a/b/c"]),
        st.sampled_from([";base64", ";BASE64", "", ";charset=x;base64", ";base64;x"]),
        b64,
    ).map(lambda t: f"data:{t[0]}{t[1]},{t[2]}"),
    st.text(max_size=40).map(lambda t: "vcache://" + t),
    st.from_regex(r"vcache://sha256:[0-9a-fA-F]{60,66}", fullmatch=True),
    st.sampled_from(["data:", "data:,", "vcache://"]),
    st.text(max_size=60),
)
chat_part = st.one_of(
    st.builds(lambda r: {"type": "image_url", "image_url": {"url": r}}, refs),
    st.builds(lambda r: {"type": "image_url", "image_url": r}, refs),
    st.builds(
        lambda r, v: {"type": "image_url", "image_url": {"url": r, "detail": v}}, refs, json_value
    ),
)
anthropic_part = st.one_of(
    st.builds(
        lambda r, m: {"type": "image", "source": {"type": "base64", "media_type": m, "data": r}},
        refs,
        json_value,
    ),
    st.builds(lambda r: {"type": "image", "source": {"type": "url", "url": r}}, refs),
    st.builds(
        lambda p: {"type": "tool_result", "content": [p]},
        st.builds(lambda r: {"type": "image", "source": {"type": "url", "url": r}}, refs),
    ),
)
responses_part = st.builds(lambda r: {"type": "input_image", "image_url": r}, refs)
any_part = st.one_of(
    chat_part,
    anthropic_part,
    responses_part,
    json_value,
    st.builds(lambda v: {"type": "image_url", "image_url": v}, json_value),
    st.just({"type": "image_embedding", "image_embedding": {"version": 1}}),
    st.just({"type": "text", "text": "hi"}),
)


def messages_of(part: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    # well-formed shapes first (weighted by repetition), junk anywhere now and then
    parts = st.lists(st.one_of(part, part, part, any_part), min_size=1, max_size=3)
    content = st.one_of(parts, parts, parts, st.text(max_size=20), json_value)
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "tool"]), "content": content}
    )
    return st.one_of(st.lists(message, min_size=1, max_size=3), json_value)


prompt = st.one_of(
    st.fixed_dictionaries(
        {
            "prompt_string": st.text(max_size=20),
            "multimodal_data": st.lists(st.one_of(refs, refs, json_value), min_size=1, max_size=3),
        }
    ),
    st.lists(
        st.fixed_dictionaries({"multimodal_data": st.lists(refs, max_size=2)}),
        min_size=1,
        max_size=2,
    ),
    st.text(max_size=20),
    json_value,
)


def body_for(path: str) -> st.SearchStrategy[Any]:
    extra = st.dictionaries(
        st.sampled_from(["model", "stream", "max_tokens", "n_predict"]), json_value, max_size=2
    )
    if path in CHAT_PATHS:
        main = st.fixed_dictionaries({"messages": messages_of(chat_part)})
    elif path in ANTHROPIC_PATHS:
        main = st.fixed_dictionaries({"messages": messages_of(anthropic_part)})
    elif path in PROMPT_PATHS:
        main = st.one_of(
            st.fixed_dictionaries({"prompt": prompt}),
            st.fixed_dictionaries(
                {}, optional={"prompt": prompt, "input": prompt, "content": prompt}
            ),
        )
    else:
        main = st.fixed_dictionaries({"input": messages_of(responses_part)})
    return st.tuples(main, extra).map(lambda t: {**t[1], **t[0]})


requests = st.sampled_from(sorted(IMAGE_PATHS)).flatmap(
    lambda path: st.tuples(
        st.just(path), st.one_of(body_for(path), body_for(path), body_for(path), json_value)
    )
)
raw_bodies = st.tuples(
    st.sampled_from(sorted(IMAGE_PATHS)),
    st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)),
)


# --- find_images alone ------------------------------------------------------------------------


@FUZZ
@given(requests, st.booleans())
def test_find_images_takes_any_body(request: tuple[str, Any], allow_packages: bool) -> None:
    path, tree = request
    body = json_body.parse(json.dumps(tree).encode(), min_span=16)  # small spans: many
    try:
        slots = find_images(path, body, max_images=4, allow_client_packages=allow_packages)
    except (ClientPackageRefused, TooManyImages):
        return
    for slot in slots:
        assert isinstance(slot.ref, str)
        slot.put_image(b"\x89PNG", "image/png", body.insert)
    for slot in slots:
        slot.put_package({"version": 1})
    json.loads(body.dumps().join())  # still a JSON document after every replacement


def test_every_endpoint_family_is_fuzzed() -> None:
    assert IMAGE_PATHS == CHAT_PATHS | PROMPT_PATHS | ANTHROPIC_PATHS | RESPONSES_PATHS


# --- the running proxy ------------------------------------------------------------------------


class BackgroundProxy:
    """Fault upstream plus proxy on an event loop of their own, in a daemon thread."""

    def __init__(self, tmp: Path, packages: bool) -> None:
        self._tmp, self._packages = tmp, packages
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self.url = ""
        self.fake: FaultUpstream | None = None
        self._thread = threading.Thread(
            target=self._loop.run_until_complete, args=(self._main(),), daemon=True
        )

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        # with a media directory the proxy reads file URLs itself (below it, or refuses them),
        # so no locator of any scheme may reach upstream; without one it forwards them as they
        # came, for upstream's own --media-path rule (test_dropin.py covers that)
        media = self._tmp / "media"
        media.mkdir(exist_ok=True)
        async with (
            FaultUpstream(packages=self._packages) as fake,
            proxy_in_front(fake.url, self._tmp, max_images=4, media_path=media) as (url, _),
        ):
            self.fake, self.url = fake, url
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> BackgroundProxy:
        self._thread.start()
        assert self._ready.wait(30), "proxy did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        self._loop.close()


@pytest.fixture(scope="module", params=[False, True], ids=["stock", "patched"])
def running(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[BackgroundProxy, httpx.Client]]:
    with pytest.MonkeyPatch.context() as patch:

        async def no_names(host: str, port: int) -> Any:
            raise MediaFetchFailed(f"cannot resolve host {host!r} (fuzzing: no DNS)")

        patch.setattr(media, "resolve_name", no_names)
        tmp = tmp_path_factory.mktemp("fuzz")
        with BackgroundProxy(tmp, bool(request.param)) as proxy, httpx.Client(timeout=30) as client:
            yield proxy, client


def check_answer(r: httpx.Response) -> None:
    assert r.status_code != 500, r.text
    assert "Traceback" not in r.text and 'File "' not in r.text
    if r.status_code in PROXY_ERRORS:
        error = r.json()["error"]
        assert error["code"] == r.status_code and isinstance(error["message"], str)
        assert error["type"] in (
            "invalid_request_error",
            "authentication_error",
            "unavailable_error",
        )
    else:
        assert r.status_code == 200, r.text  # the fake answers whatever reaches it


def check_upstream_saw_no_locator(proxy: BackgroundProxy, since: int) -> None:
    assert proxy.fake is not None
    for seen in proxy.fake.seen[since:]:
        if seen.path not in IMAGE_PATHS:
            continue
        try:
            body = json_body.parse(seen.body)
        except ClientError:
            continue
        for slot in find_images(seen.path, body, max_images=10**6, allow_client_packages=True):
            ref = slot.ref.lower()
            assert not ref.startswith(("http", "file:", "gopher:", "ftp:")), slot.ref[:100]


@FUZZ
@given(request=requests)
def test_the_proxy_takes_any_json_body(
    running: tuple[BackgroundProxy, httpx.Client], request: tuple[str, Any]
) -> None:
    proxy, client = running
    assert proxy.fake is not None
    since = len(proxy.fake.seen)
    path, body = request
    check_answer(
        client.post(
            f"{proxy.url}{path}",
            content=json.dumps(body),
            headers={"Content-Type": "application/json"},
        )
    )
    check_upstream_saw_no_locator(proxy, since)


@FUZZ
@given(request=raw_bodies)
def test_the_proxy_takes_any_bytes(
    running: tuple[BackgroundProxy, httpx.Client], request: tuple[str, bytes]
) -> None:
    proxy, client = running
    path, raw = request
    check_answer(client.post(f"{proxy.url}{path}", content=raw))


@FUZZ
@given(body=json_value, path=st.sampled_from(["/vcache/warm", "/vcache/lookup"]))
def test_the_proxy_endpoints_take_any_json(
    running: tuple[BackgroundProxy, httpx.Client], body: Any, path: str
) -> None:
    proxy, client = running
    check_answer(client.post(f"{proxy.url}{path}", content=json.dumps(body)))
