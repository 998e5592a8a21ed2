"""Exceptions raised by the client, and the single mapping from tritonclient's errors to them."""
from __future__ import annotations

from typing import Optional, Union

from tritonclient.utils import InferenceServerException

from .credentials import API_KEY_ENV


class LesionServeError(Exception):
    """Base class of every error this client raises on purpose."""


class ServerUnavailableError(LesionServeError):
    """The server could not be reached (connection refused, DNS failure, gRPC UNAVAILABLE)."""


class CredentialError(LesionServeError):
    """The server refused the request's credential: no API key was sent, or not the server's.

    Never retried (another attempt would carry the same key). The message names the header the
    server expects and where the client's key came from, never the key.
    """


class RequestTimeoutError(LesionServeError):
    """A call did not complete within the client's timeout (gRPC DEADLINE_EXCEEDED)."""


class InvalidImageError(LesionServeError, ValueError):
    """An input was rejected on the client side, before anything was sent.

    ``index`` is the position of the offending item in the list given to ``classify``.
    """

    def __init__(self, index: int, problem: str) -> None:
        self.index = index
        self.problem = problem
        self.reason = problem  # same attribute name as UndecodableImageError, for partial results
        super().__init__(
            f"images[{index}]: {problem}; accepted inputs are a file path (str or os.PathLike), "
            "encoded image bytes (bytes/bytearray), or an HxWx3 uint8 RGB numpy array"
        )


class ServerError(LesionServeError):
    """Any other server-side failure; ``status`` is the gRPC status string when known."""

    def __init__(self, message: str, status: Optional[str] = None) -> None:
        self.status = status
        super().__init__(message)


class ModelConfigError(ServerError):
    """The ensemble's model config lacks something the client needs (``class_names``,
    ``backbones``, or the ``error`` output of a server that reports bad images per row)."""


class UndecodableImageError(LesionServeError):
    """The server could not decode one image; ``index`` refers to the caller's original list.

    ``reason`` is the server's own words, from the ensemble's per-row ``error`` output.
    """

    def __init__(self, index: int, reason: str) -> None:
        self.index = index
        self.reason = reason
        super().__init__(f"server could not decode images[{index}]: {reason}")


#: How Triton words a request refused by ``--grpc-restricted-protocol`` (sent with status UNAVAILABLE).
RESTRICTED_MARKER = "This protocol is restricted, expecting header"


def map_server_error(exc: InferenceServerException, *, url: str, timeout: float,
                     key_source: Optional[str] = None) -> LesionServeError:
    """Translate a tritonclient exception into this package's hierarchy.

    A bad image never arrives here: the server answers it in the response's ``error`` output
    (results.parse_response), so no message text is parsed for one. ``key_source``: where the API
    key the request carried came from (None: it carried none), for a refused credential's message.
    """
    status = exc.status() or ""
    message = exc.message() or str(exc)
    lowered = message.lower()

    # Before UNAVAILABLE: Triton refuses a missing or wrong credential with that status, and a
    # refusal must be reported as such, not retried as if the server were down.
    if RESTRICTED_MARKER in message:
        sent = (f"the API key sent (from {key_source}) is not the server's" if key_source else
                f"no API key was sent: set {API_KEY_ENV} or pass api_key_file (--api-key-file)")
        return CredentialError(f"LesionServe server at {url} refused the request: {message}; {sent}")
    if status == "StatusCode.UNAVAILABLE" or (
        not status and ("connection refused" in lowered or "failed to connect" in lowered)
    ):
        return ServerUnavailableError(f"LesionServe server at {url} is unavailable: {message}")
    if status == "StatusCode.DEADLINE_EXCEEDED" or "deadline exceeded" in lowered:
        return RequestTimeoutError(
            f"request to {url} timed out after {timeout:g}s (the client timeout); "
            "raise it if the server is busy"
        )
    return ServerError(f"server error{f' ({status})' if status else ''}: {message}", status=status or None)


#: What ``classify(..., partial=True)`` returns in place of a result for an image that failed:
#: either kind carries ``index`` (in the caller's list) and ``reason``.
ImageError = Union[InvalidImageError, UndecodableImageError]
