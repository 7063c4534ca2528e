"""Conformance: for every model family in docs/models.md, a cache hit answers exactly like the
raw image.

For each family (vision_cache.synthetic) a stock llama-server gets the raw image, and two
vcache proxies in front of one patched llama-server get the same request twice: the second is
a hit, its package forwarded inline by one proxy and as a file reference by the other. The hit
must be token-identical to stock, with the same logprobs (prompt cache off), for images of
several sizes and aspect ratios: ones that become several tiles or slices, one too small for the
model's lower token limit and one past its upper limit, and two images in one request. Each
comparison has a negative control (another image changes stock's answer), so a family whose
answer ignored the image, or a proxy that swapped images, would fail.

Across families: a package made by one family's mmproj is refused by a server running
another, and a proxy in front of the other finds nothing to reuse. For a projector type that
is not on llama_patches/verified_projectors.txt, the proxy forwards raw images, answers stay
identical, and it says why.

A new family is one generator module, one entry in FAMILIES below and one line in the verified
list. ``VCACHE_TEST_MODEL_SIZE=realistic`` runs the same checks on real-width models.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
import numpy as np
import pytest

from tests.support.fixtures import server_args
from tests.support.llama_server import LlamaServer
from tests.support.proxy_process import ProxyProcess
from tests.support.vlm_client import Reply, chat, encode, image_part, package_part
from vision_cache.synthetic.family import Family
from vision_cache.synthetic.images import SampleImage, sample_image, shapes
from vision_cache.synthetic.models import generate
from vision_cache.synthetic.registry import vision_family
from vision_cache.synthetic.spec import Size

pytestmark = [pytest.mark.server, pytest.mark.conformance]


@dataclass(frozen=True)
class Case:
    """One family, and the llama-server arguments it runs under."""

    family: str
    args: tuple[str, ...] = ()
    max_tokens: int = 0  # --image-max-tokens given: counts are capped, not the defaults

    @property
    def id(self) -> str:
        return self.family + (f"-max{self.max_tokens}" if self.max_tokens else "")


FAMILIES = (
    Case("gemma3"),
    Case("qwen2vl"),
    Case("llava"),
    Case("qwen25vl"),
    Case("qwen3vl"),
    Case("gemma4"),
    Case("idefics3"),
    Case("internvl"),
    Case("pixtral"),
    Case("llama4"),
    Case("minicpmv"),
    Case("lfm2"),
    Case("kimivl"),
    Case("glm4v"),
    # the operator's token limit: a cap the preprocessing must honour identically
    Case("qwen25vl", ("--image-max-tokens", "64"), max_tokens=64),
)

# landscape (several tiles for tiled families), tall portrait, too small for the lower limit,
# past the upper limit (or the tile count cap)
LARGE = SampleImage("shapes_1600x1200", shapes(1600, 1200))
IMAGES = ("shapes_640x480", "stripes_300x900", "tiny_icon_64x48", LARGE.name)
# negative controls: each image's answer must differ from this other image's
OTHER = {
    "shapes_640x480": "stripes_300x900",
    "stripes_300x900": "shapes_640x480",
    "tiny_icon_64x48": "shapes_640x480",
    LARGE.name: "shapes_640x480",
}
PAIR = ("checkers_1024x256", "noise_512x512")  # wide strip + square, in one request
N_PREDICT = 12
LOGPROB_TOLERANCE = 1e-5
MODEL_SIZE = cast(Size, os.environ.get("VCACHE_TEST_MODEL_SIZE", "tiny"))


def image(name: str) -> SampleImage:
    return LARGE if name == LARGE.name else sample_image(name)


def vcache_header(reply: Reply) -> dict[str, float]:
    fields = dict(item.split("=") for item in reply.headers["x-vcache"].split())
    return {k: float(v) for k, v in fields.items()}


@dataclass
class Rig:
    """A family's servers: stock, patched, and the proxies in front of the patched one."""

    case: Case
    family: Family
    stock: LlamaServer
    patched: LlamaServer
    inline: ProxyProcess
    by_file: ProxyProcess
    _refs: dict[tuple[str, ...], Reply] = field(default_factory=dict)

    def reference(self, *names: str) -> Reply:
        """Stock llama-server's answer to the raw images (asked once)."""
        if names not in self._refs:
            self._refs[names] = ask(self.stock.base_url, *names)
        return self._refs[names]


def ask(base_url: str, *names: str) -> Reply:
    return chat(base_url, [image_part(image(n).data_url()) for n in names], n=N_PREDICT)


def _start(server: LlamaServer | ProxyProcess) -> LlamaServer | ProxyProcess:
    server.start()
    return server


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda c: c.id)
def rig(
    request: pytest.FixtureRequest,
    stock_bin: Path,
    patched_bin: Path,
    models_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Rig]:
    case: Case = request.param
    family = vision_family(case.family)
    files = generate(case.family, MODEL_SIZE, 0, models_dir)
    tmp = tmp_path_factory.mktemp(f"conformance-{case.id}")
    file_store = tmp / "file-store"
    (file_store / "segments").mkdir(parents=True)
    args = [*family.server_args, *case.args]
    stock = LlamaServer(stock_bin, server_args(files, *args), tmp / "stock.log")
    patched = LlamaServer(
        patched_bin,
        server_args(files, "--image-embedding-dir", str(file_store / "segments"), *args),
        tmp / "patched.log",
    )
    with ExitStack() as stack, ThreadPoolExecutor(4) as pool:
        # the servers start together: most of a family's set-up is waiting for them
        for server in (stock, patched):
            stack.callback(server.stop)
        list(pool.map(_start, (stock, patched)))
        upstream = ["--upstream", patched.base_url]
        inline = ProxyProcess(
            [*upstream, "--store", str(tmp / "inline-store"), "--transport", "inline"],
            tmp / "proxy-inline.log",
        )
        by_file = ProxyProcess(
            [*upstream, "--store", str(file_store), "--transport", "file"], tmp / "proxy-file.log"
        )
        for proxy in (inline, by_file):
            stack.callback(proxy.stop)
        list(pool.map(_start, (inline, by_file)))
        yield Rig(case, family, stock, patched, inline, by_file)


def test_the_server_verifies_this_projector_type(rig: Rig) -> None:
    props = httpx.get(f"{rig.patched.base_url}/props", timeout=30).json()["image_embedding"]
    assert props["projectors"]["image"] == {"type": rig.family.projector_type, "verified": True}
    assert props["modalities"] == ["image"]
    assert props["n_embd"] == rig.family.spec(MODEL_SIZE).text.n_embd_inp


@pytest.mark.parametrize("name", IMAGES)
def test_a_hit_is_identical_to_the_raw_image(rig: Rig, name: str) -> None:
    ref = rig.reference(name)
    assert len(ref.tokens) == N_PREDICT
    for proxy in (rig.inline, rig.by_file):
        first, hit = ask(proxy.base_url, name), ask(proxy.base_url, name)
        assert vcache_header(hit)["hits"] == 1, hit.headers["x-vcache"]
        for answer in (first, hit):
            assert answer.tokens == ref.tokens
            assert answer.max_logprob_diff(ref) <= LOGPROB_TOLERANCE
    # negative control: the answer depends on the image
    assert rig.reference(OTHER[name]).tokens != ref.tokens


def test_two_images_in_one_request(rig: Rig) -> None:
    ref = rig.reference(*PAIR)
    for proxy in (rig.inline, rig.by_file):
        ask(proxy.base_url, *PAIR)
        hit = ask(proxy.base_url, *PAIR)
        assert vcache_header(hit)["hits"] == 2, hit.headers["x-vcache"]
        assert hit.tokens == ref.tokens
        assert hit.max_logprob_diff(ref) <= LOGPROB_TOLERANCE
    swapped = rig.reference(*PAIR[::-1])
    assert swapped.tokens != ref.tokens  # order matters: the images were not merged or dropped
    assert ask(rig.by_file.base_url, *PAIR[::-1]).tokens == swapped.tokens


def test_every_float_of_the_package_is_read(rig: Rig) -> None:
    """Zeroing the last quarter of each token's embedding changes the answer: the server
    reads the package's whole width (for Qwen3-VL, the deepstack slices past the text
    width)."""
    url = image("shapes_640x480").data_url()
    pkg = encode(rig.patched.base_url, url)["image_embedding"]
    values = np.frombuffer(base64.b64decode(pkg["data"]), dtype="<f4").reshape(-1, pkg["n_embd"])
    cut = values.copy()
    cut[:, -pkg["n_embd"] // 4 :] = 0.0
    blanked = {**pkg, "data": base64.b64encode(cut.tobytes()).decode()}
    whole = chat(rig.patched.base_url, [package_part(pkg)], n=N_PREDICT)
    partial = chat(rig.patched.base_url, [package_part(blanked)], n=N_PREDICT)
    assert whole.tokens != partial.tokens or whole.max_logprob_diff(partial) > 1e-3


def test_image_tokens_follow_the_preprocessing(rig: Rig) -> None:
    """Variable token counts by size and aspect ratio, capped by --image-max-tokens."""
    counts = {}
    for name in (*IMAGES, *PAIR):
        img = image(name)
        n = int(encode(rig.patched.base_url, img.data_url())["n_tokens"])
        counts[name] = n
        if rig.case.max_tokens:
            assert n <= rig.case.max_tokens, name
        else:
            assert n == rig.family.expected_image_tokens(MODEL_SIZE, *img.size), name


# --- across families --------------------------------------------------------------------------

CROSS = ("qwen25vl", "internvl")  # two families of the same text width


@dataclass
class Pair:
    servers: dict[str, LlamaServer]
    stock: dict[str, LlamaServer]
    store: Path
    tmp: Path


@pytest.fixture(scope="module")
def cross(
    stock_bin: Path, patched_bin: Path, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    tmp = tmp_path_factory.mktemp("conformance-cross")
    with ExitStack() as stack, ThreadPoolExecutor(4) as pool:
        servers, stock = {}, {}
        for name in CROSS:
            files = generate(name, MODEL_SIZE, 0, models_dir)
            extra = vision_family(name).server_args
            servers[name] = LlamaServer(
                patched_bin,
                server_args(files, "--image-embedding", *extra),
                tmp / f"patched-{name}.log",
            )
            stock[name] = LlamaServer(
                stock_bin, server_args(files, *extra), tmp / f"stock-{name}.log"
            )
        everything = [*servers.values(), *stock.values()]
        for server in everything:
            stack.callback(server.stop)
        list(pool.map(_start, everything))
        yield Pair(servers, stock, tmp / "shared-store", tmp)


def test_a_package_from_another_family_is_refused(cross: Pair) -> None:
    a, b = (cross.servers[name] for name in CROSS)
    url = image("shapes_640x480").data_url()
    pkg = encode(a.base_url, url)["image_embedding"]
    assert pkg["n_embd"] == encode(b.base_url, url)["image_embedding"]["n_embd"]
    r = httpx.post(
        f"{b.base_url}/v1/chat/completions",
        timeout=120,
        json={"messages": [{"role": "user", "content": [package_part(pkg)]}], "max_tokens": 4},
    )
    assert r.status_code == 400, r.text
    error: dict[str, Any] = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "mmproj" in error["message"]
    assert chat(b.base_url, [image_part(url)], n=N_PREDICT).tokens  # b keeps serving


def test_one_store_in_front_of_two_families_keeps_them_apart(cross: Pair) -> None:
    """Same store, same image: the second family's proxy misses, and answers like its stock."""
    url = image("stripes_300x900").data_url()
    answers = {}
    for name in CROSS:
        with ProxyProcess(
            [
                "--upstream",
                cross.servers[name].base_url,
                "--store",
                str(cross.store),
                "--transport",
                "inline",
            ],
            cross.tmp / f"proxy-{name}.log",
        ) as proxy:
            first = chat(proxy.base_url, [image_part(url)], n=N_PREDICT)
            assert vcache_header(first)["misses"] == 1, name  # nothing of the other's reused
            again = chat(proxy.base_url, [image_part(url)], n=N_PREDICT)
            assert vcache_header(again)["hits"] == 1, name
        direct = chat(cross.stock[name].base_url, [image_part(url)], n=N_PREDICT)
        assert first.tokens == again.tokens == direct.tokens, name
        answers[name] = direct.tokens
    assert answers[CROSS[0]] != answers[CROSS[1]]


# --- a projector type nobody has verified -------------------------------------------------------

UNVERIFIED = "janus"  # generated, and kept off the verified list on purpose
VERIFIED_LIST = Path(__file__).resolve().parents[1] / "llama_patches" / "verified_projectors.txt"


def verified_types() -> set[str]:
    lines = (line.split("#", 1)[0].split() for line in VERIFIED_LIST.read_text().splitlines())
    return {words[0] for words in lines if words}


def test_every_family_here_is_on_the_verified_list_and_the_control_is_not() -> None:
    types = verified_types()
    for case in FAMILIES:
        assert vision_family(case.family).projector_type in types, case.family
    assert vision_family(UNVERIFIED).projector_type not in types


@dataclass
class Control:
    stock: LlamaServer
    patched: LlamaServer
    proxy: ProxyProcess


@pytest.fixture(scope="module")
def control(
    stock_bin: Path,
    patched_bin: Path,
    models_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Control]:
    files = generate(UNVERIFIED, MODEL_SIZE, 0, models_dir)
    tmp = tmp_path_factory.mktemp("conformance-unverified")
    (tmp / "store" / "segments").mkdir(parents=True)
    stock = LlamaServer(stock_bin, server_args(files), tmp / "stock.log")
    patched = LlamaServer(
        patched_bin,
        server_args(files, "--image-embedding-dir", str(tmp / "store" / "segments")),
        tmp / "patched.log",
    )
    with ExitStack() as stack, ThreadPoolExecutor(2) as pool:
        for server in (stock, patched):
            stack.callback(server.stop)
        list(pool.map(_start, (stock, patched)))
        proxy = ProxyProcess(
            ["--upstream", patched.base_url, "--store", str(tmp / "store"), "--transport", "file"],
            tmp / "proxy.log",
        )
        stack.enter_context(proxy)
        yield Control(stock, patched, proxy)


def test_an_unverified_projector_type_falls_back_with_identical_answers(control: Control) -> None:
    type_ = vision_family(UNVERIFIED).projector_type
    props = httpx.get(f"{control.patched.base_url}/props", timeout=30).json()["image_embedding"]
    assert props["projectors"]["image"] == {"type": type_, "verified": False}
    answers = {}
    for name in ("shapes_640x480", "shapes_640x480", "stripes_300x900"):
        ref = answers[name] = ask(control.stock.base_url, name)
        got = ask(control.proxy.base_url, name)
        assert got.tokens == ref.tokens
        assert got.max_logprob_diff(ref) <= LOGPROB_TOLERANCE
        header = vcache_header(got)
        assert (header["hits"], header["misses"], header["fallback"]) == (0, 0, 1)
        assert f"'{type_}'" in got.headers["x-vcache-fallback"]
        assert "not verified" in got.headers["x-vcache-fallback"]
    # negative control: the answers follow the image, so "identical" says something
    assert answers["shapes_640x480"].tokens != answers["stripes_300x900"].tokens
    health = httpx.get(f"{control.proxy.base_url}/vcache/health", timeout=30).json()
    assert health["packages"] is False
    assert f"'{type_}'" in health["packages_reason"]
    assert "PACKAGES ARE OFF" in control.proxy.log()
    stats = httpx.get(f"{control.proxy.base_url}/vcache/stats", timeout=30).json()
    assert stats["entries"] == 0  # nothing of an unverified type was cached
