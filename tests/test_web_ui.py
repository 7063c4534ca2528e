"""llama.cpp's own web UI, in a real browser, through vcache.

The patched llama-server embeds llama.cpp's web UI (built from the sources of the pinned
llama.cpp, see vision_cache/llama/server_build/ui.py). Debian's Chromium, driven by Playwright,
loads it from vcache's address, attaches an image, asks two questions about it, and reads both
answers; the same conversation is then had with a second llama-server straight, and the answers
must be equal. The second question sends the image again (the UI sends the whole conversation):
vcache must serve it from the cache.

The server runs with ``--temp 0`` and ``-n 24``: the UI sends no sampling settings of its own
unless a user sets them, so the server's decide, and 24 tokens keep a random-weight model (which
never ends on its own) short.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Response, sync_playwright

from tests.support.fixtures import server_args
from tests.support.llama_server import LlamaServer
from tests.support.proxy_process import ProxyProcess
from vision_cache.synthetic.images import sample_image
from vision_cache.synthetic.models import ModelFiles

pytestmark = [pytest.mark.server, pytest.mark.browser]

CHROMIUM = os.environ.get("VCACHE_TEST_CHROMIUM", "/usr/bin/chromium")
# what a headless Chromium on a machine without internet needs: no sandbox as root, and no
# background connections to Google's services (each refused one costs time and log noise)
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
QUESTIONS = ("What is in this picture?", "Which colours do you see?")
ANSWER = '[aria-label="Assistant message with actions"]'
UI_ARGS = ("--temp", "0", "--seed", "1", "-n", "24", "--image-embedding")
TIMEOUT_MS = 120_000


@dataclass(frozen=True)
class Turn:
    """One question as the browser saw it: the answer streamed, and vcache's header."""

    answer: str
    vcache: str | None


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"no Chromium at {CHROMIUM} (`make system-deps` installs Debian's chromium)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=list(CHROMIUM_ARGS))
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def ui_server(
    patched_bin: Path,
    tiny_model: Callable[[str], ModelFiles],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[str], LlamaServer]]:
    """ui_server(name) -> a started patched llama-server that serves the web UI."""
    started: list[LlamaServer] = []
    logs = tmp_path_factory.mktemp("ui-logs")

    def start(name: str) -> LlamaServer:
        args = server_args(tiny_model("gemma3"), *UI_ARGS)
        server = LlamaServer(patched_bin, args, logs / f"{name}.log")
        server.start()
        started.append(server)
        _require_ui(server.base_url)
        return server

    yield start
    for server in started:
        server.stop()


def _require_ui(base_url: str) -> None:
    page = httpx.get(base_url + "/", headers={"Accept-Encoding": "gzip"}, timeout=10)
    if page.status_code != 200 or "text/html" not in page.headers.get("content-type", ""):
        pytest.fail(
            f"this llama-server serves no web UI (GET / -> {page.status_code}): it was built "
            "without one (npm missing?); `make llama` builds it with the UI"
        )


def sse_answer(body: str) -> str:
    """The assistant text of an OpenAI chat stream."""
    parts = []
    for line in body.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            event = json.loads(line[6:])
            for choice in event.get("choices", []):
                parts.append(choice.get("delta", {}).get("content") or "")
    return "".join(parts)


def converse(browser: Browser, base_url: str, image: Path) -> list[Turn]:
    """Open the UI at `base_url`, attach `image`, ask QUESTIONS; what each answer was."""
    # a fresh profile each time, and no service worker: nothing is answered from a cache
    context = browser.new_context(service_workers="block")
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        page.goto(base_url + "/")
        page.wait_for_selector("textarea")
        page.set_input_files("input[type=file]", str(image))
        turns = []
        for n, question in enumerate(QUESTIONS, start=1):
            page.fill("textarea", question)
            with page.expect_response(_chat_completion) as response:
                page.keyboard.press("Enter")
            body = response.value.text()  # the whole stream: the answer is complete
            turns.append(Turn(sse_answer(body), response.value.headers.get("x-vcache")))
            page.wait_for_function(
                f"document.querySelectorAll('{ANSWER}').length >= {n}"
                f" && document.querySelectorAll('{ANSWER}')[{n - 1}].innerText"
                f".includes({json.dumps(turns[-1].answer.strip()[:40])})"
            )
        return turns
    finally:
        context.close()


def _chat_completion(response: Response) -> bool:
    return response.request.method == "POST" and response.url.endswith("/chat/completions")


def metrics(base_url: str) -> dict[str, float]:
    text = httpx.get(base_url + "/vcache/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line.startswith(("vcache_hits_total ", "vcache_misses_total ")):
            name, value = line.split()
            values[name] = float(value)
    return values


def test_web_ui_through_vcache_answers_as_direct_and_hits_the_second_time(
    browser: Browser,
    ui_server: Callable[[str], LlamaServer],
    tmp_path: Path,
) -> None:
    image = tmp_path / "shapes.png"
    image.write_bytes(sample_image("shapes_640x480").encode("PNG"))
    upstream = ui_server("behind-vcache")
    proxy = ProxyProcess(
        ["--upstream", upstream.base_url, "--store", str(tmp_path / "store")],
        tmp_path / "vcache.log",
    )
    with proxy:
        via = converse(browser, proxy.base_url, image)
        counted = metrics(proxy.base_url)
    direct = converse(browser, ui_server("direct").base_url, image)

    assert all(turn.answer.strip() for turn in via), via
    assert [t.answer for t in via] == [t.answer for t in direct]
    assert via[0].answer != via[1].answer  # two questions, two answers
    assert via[0].vcache is not None and "misses=1" in via[0].vcache
    assert via[1].vcache is not None and "hits=1" in via[1].vcache
    assert counted == {"vcache_hits_total": 1.0, "vcache_misses_total": 1.0}
    assert direct[0].vcache is None
