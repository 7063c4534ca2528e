"""Errors of the proxy, each answering the client with llama-server's error shape.

Our exception hierarchy:

* ProxyError                      (500 server_error)
  x ClientError                   (400 invalid_request_error)
    + BodyTooLarge                (413)
    + TooManyImages               (400)
    + MediaError                  (400: an image the client sent or named cannot be used)
      - MediaNotAllowed           (400: URL scheme, address or path refused by policy)
      - MediaTooLarge             (400: over the size cap, or a decompression bomb)
      - MediaFetchFailed          (400: the remote image could not be fetched)
    + UnknownReference            (400: a vcache:// name or digest not in the store)
    + ClientPackageRefused        (400: image_embedding parts from clients are off)
  x ResultError                   (a stored answer that cannot be replayed: a miss, and
                                   replaced; proxy.lookup.result_cache)
  x VectorError                   (a stored vector, or a package to pool, is unusable;
                                   proxy.compare.vectors)
  x AuthError                     (401 authentication_error)
  x ProxyBusy                     (503 unavailable_error: the request-body budget stayed full;
                                   proxy.web.budget)
  x ReservedArgumentError         (also ValueError: managed mode chooses --host/--port itself;
                                   proxy.upstream.supervisor)
  x UpstreamError                 (502 unavailable_error: llama-server down or broken)
    + UpstreamTimeout             (504)
    + ManagedStartError           (llama-server did not come up; proxy.upstream.supervisor;
                                   `vcache serve` exits with its status)
    + LocalEncoderError           (the encoder worker failed; proxy.lookup.local_encoder)
      - LocalEncoderRejected      (the bytes are not an image it takes)
      - LocalEncoderTimeout       (also UpstreamTimeout, 504)

Classes marked with a module live beside the code that raises them, but join this tree.

Apart from the tree, because no client ever sees it:

* StartupError                    `vcache serve` cannot start (address, port, store, llama-server);
                                  the command line prints its message and hint (proxy.cli.failure)

The body is what llama-server itself sends, so clients parse one shape whoever answers:
``{"error": {"code": 400, "message": "...", "type": "invalid_request_error"}}``.
"""

from __future__ import annotations

from typing import Any, ClassVar


class ProxyError(Exception):
    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.status, "message": self.message, "type": self.error_type}}


class ClientError(ProxyError):
    status = 400
    error_type = "invalid_request_error"


class BodyTooLarge(ClientError):
    status = 413


class TooManyImages(ClientError):
    pass


class MediaError(ClientError):
    pass


class MediaNotAllowed(MediaError):
    pass


class MediaTooLarge(MediaError):
    pass


class MediaFetchFailed(MediaError):
    pass


class UnknownReference(ClientError):
    pass


class ClientPackageRefused(ClientError):
    pass


class AuthError(ProxyError):
    status = 401
    error_type = "authentication_error"


class ProxyBusy(ProxyError):
    """Too many request bodies held at once: try again later (nothing reached upstream)."""

    status = 503
    error_type = "unavailable_error"


class UpstreamError(ProxyError):
    status = 502
    error_type = "unavailable_error"


class UpstreamTimeout(UpstreamError):
    status = 504


def shorten(text: str, limit: int = 200) -> str:
    """A client's reference as an error message shows it: never a megabyte of base64."""
    return text if len(text) <= limit else text[:limit] + "..."


class StartupError(Exception):
    """`vcache serve` cannot start: `message` says why, `hint` what to do about it.

    Raised before anything serves (no client sees it); `code` is the command's exit status:
    2 for a setting that cannot work (an address this machine does not have), 1 otherwise.
    """

    def __init__(self, message: str, hint: str | None = None, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code
