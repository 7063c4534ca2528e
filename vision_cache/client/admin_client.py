"""Calls to a running proxy's admin API that the command line makes (admin_api's messages).

    path, store_id = store_of("http://127.0.0.1:8081", api_key=None)
    deleted = delete_entries("http://127.0.0.1:8081", [key], api_key=None)  # {key.text: True}

Failures raise `ProxyUnreachable` (nothing answered) or `AdminError` (the proxy refused, with
its message), both `VisionCacheError`s.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import httpx
from pydantic import BaseModel

from vision_cache.client import admin_api as api
from vision_cache.errors import VisionCacheError
from vision_cache.keys import CacheKey

AnswerT = TypeVar("AnswerT", bound=BaseModel)


class AdminError(VisionCacheError):
    """The proxy answered, with an error."""


class ProxyUnreachable(AdminError):
    """Nothing answered at the proxy's address."""


def store_of(proxy: str, api_key: str | None) -> tuple[Path, str]:
    """Where the proxy's store is (a path on the proxy's machine) and the store's id."""
    answer = _call("GET", proxy, api.STORE, api_key, None, api.StoreResponse)
    return Path(answer.path), answer.id


def delete_entries(proxy: str, keys: Sequence[CacheKey], api_key: str | None) -> dict[str, bool]:
    """Delete entries through the proxy (so that it forgets its in-memory copies too)."""
    request = api.DeleteRequest(keys=[k.text for k in keys])
    answer = _call("POST", proxy, api.DELETE, api_key, request, api.DeleteResponse)
    return {k.text: k.text in answer.deleted for k in keys}


def _call(
    method: str,
    proxy: str,
    path: str,
    api_key: str | None,
    request: BaseModel | None,
    answer: type[AnswerT],
) -> AnswerT:
    url = proxy.rstrip("/") + path
    body = request.model_dump_json().encode() if request is not None else None
    headers = api.key_headers(api_key) | {"Content-Type": "application/json"}
    try:
        resp = httpx.request(method, url, content=body, headers=headers, timeout=30)
    except httpx.TransportError as e:
        raise ProxyUnreachable(f"cannot reach the proxy at {proxy}: {e}") from e
    if resp.status_code != 200:
        message = api.error_message(resp.status_code, resp.content)
        raise AdminError(f"the proxy at {proxy} answered {path} with: {message}")
    return answer.model_validate_json(resp.content)
