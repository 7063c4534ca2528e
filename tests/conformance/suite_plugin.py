"""pytest plugin for llama.cpp's server tests run offline (`-p tests.conformance.suite_plugin`).

* The suite fetches its two test images from the Hugging Face hub with `requests.get` before
  sending them inline; they are served from CONFORMANCE_IMAGES instead.
* Tests that need the internet or a real model's text are skipped with the reason given in
  skips.txt beside this file (one `pattern | reason` per line, fnmatch on the test id).
"""

from __future__ import annotations

import fnmatch
import importlib
import os
from pathlib import Path
from typing import Any

import pytest

SKIPS = Path(__file__).with_name("skips.txt")
# the suite's image URLs (by file name) -> generated test images
IMAGES = {"11_truck.png": "shapes_640x480.png", "91_cat.png": "checkers_1024x256.png"}


def load_skips(path: Path = SKIPS) -> list[tuple[str, str]]:
    entries = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            pattern, _, reason = line.partition("|")
            entries.append((pattern.strip(), reason.strip()))
    return entries


def skip_reason(test_id: str, skips: list[tuple[str, str]]) -> str | None:
    for pattern, reason in skips:
        if fnmatch.fnmatchcase(test_id, pattern):
            return reason
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    skips = load_skips()
    for item in items:
        reason = skip_reason(item.nodeid, skips)
        if reason:
            item.add_marker(pytest.mark.skip(reason=f"conformance: {reason}"))


def _serve_images_locally() -> None:
    requests: Any = importlib.import_module("requests")
    real_get = requests.get

    def get(url: Any, *args: Any, **kwargs: Any) -> Any:
        name = str(url).rsplit("/", 1)[-1]
        if "huggingface.co" in str(url) and name in IMAGES:
            resp = requests.Response()
            resp.status_code = 200
            resp._content = (Path(os.environ["CONFORMANCE_IMAGES"]) / IMAGES[name]).read_bytes()
            resp.url = str(url)
            return resp
        return real_get(url, *args, **kwargs)

    requests.get = get


_serve_images_locally()
