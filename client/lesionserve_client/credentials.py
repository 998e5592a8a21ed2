"""The inference credential (API key): where it is read from, how it travels, how it is kept out of sight.

Shared by the SDK and the server launcher (``lesionserve.server`` imports these constants), so the
two sides cannot disagree. The key is read from ``--api-key-file`` / ``api_key_file`` or, failing
that, the environment variable ``LESIONSERVE_API_KEY`` (in Kubernetes: Secret
``lesionserve-credentials``, key ``api-key``). It travels as the request header ``lesionserve-key``;
over gRPC Triton expects restricted-protocol headers prefixed ``triton-grpc-protocol-`` (measured on
2.51: the unprefixed header is refused like a missing one). Its value never appears in a message,
a log line or a repr: errors name where it came from, its length, the position of a bad character.
"""
from __future__ import annotations

import os
import string
from typing import Mapping, Optional, Union

API_KEY_ENV = "LESIONSERVE_API_KEY"
API_KEY_HEADER = "lesionserve-key"
#: Triton's gRPC server reads a restricted protocol's header from this metadata key prefix + name.
GRPC_RESTRICTED_PREFIX = "triton-grpc-protocol-"
#: The gRPC metadata key the SDK sends.
GRPC_API_KEY_HEADER = GRPC_RESTRICTED_PREFIX + API_KEY_HEADER
#: Shorter keys are guessable; longer ones no header should need.
API_KEY_MIN_LENGTH, API_KEY_MAX_LENGTH = 16, 4096
#: Base64 (standard and URL-safe), hex and ``secrets.token_urlsafe`` fit; nothing that a gRPC
#: metadata value, a command line argument or Triton's ``groups:header=value`` syntax would mangle.
API_KEY_CHARACTERS = frozenset(string.ascii_letters + string.digits + "-._~+/=")
_ALLOWED = "A-Z, a-z, 0-9 and - . _ ~ + / ="

PathLike = Union[str, "os.PathLike[str]"]


class ApiKey:
    """An API key whose repr and str never show it; ``value`` is what goes into the header."""

    __slots__ = ("value", "source")

    def __init__(self, value: str, source: str) -> None:
        problem = key_problem(value)
        if problem:
            raise ValueError(f"the API key from {source} {problem}")
        self.value = value
        self.source = source

    def __repr__(self) -> str:
        return f"ApiKey(<{len(self.value)} characters from {self.source}>)"

    __str__ = __repr__

    def grpc_headers(self) -> dict[str, str]:
        """The metadata a gRPC request carries."""
        return {GRPC_API_KEY_HEADER: self.value}


def key_problem(value: str) -> Optional[str]:
    """What is wrong with ``value`` as an API key (None: nothing), without quoting any of it."""
    if not API_KEY_MIN_LENGTH <= len(value) <= API_KEY_MAX_LENGTH:
        return (f"is {len(value)} characters long; it must be {API_KEY_MIN_LENGTH} to {API_KEY_MAX_LENGTH} "
                f"characters of {_ALLOWED} (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    bad = next((i for i, ch in enumerate(value) if ch not in API_KEY_CHARACTERS), None)
    if bad is not None:
        return f"has a character outside {_ALLOWED} at position {bad}"
    return None


def read_api_key_file(path: PathLike) -> ApiKey:
    """The key held by ``path`` (surrounding whitespace, e.g. a trailing newline, is dropped)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"API key file not found: {path!r}; give a file holding only the key")
    try:
        with open(path, encoding="ascii") as f:
            value = f.read().strip()
    except UnicodeDecodeError:
        raise ValueError(f"the API key file {path!r} holds non-ASCII bytes; the key must be {_ALLOWED}") from None
    except OSError as exc:
        raise PermissionError(f"API key file {path!r} is not readable: {exc.strerror}") from None
    return ApiKey(value, f"file {path!r}")


def resolve_api_key(api_key: Union[str, ApiKey, None] = None, api_key_file: Optional[PathLike] = None,
                    environ: Mapping[str, str] = os.environ) -> Optional[ApiKey]:
    """The key from ``api_key``, else ``api_key_file``, else ``$LESIONSERVE_API_KEY``; None when none is set.

    Giving both ``api_key`` and ``api_key_file`` is an error (which one was meant?). The variable set
    but empty is an error too: in a pod it means the Secret did not reach the container.
    """
    if api_key is not None and api_key_file is not None:
        raise ValueError("give api_key or api_key_file, not both")
    if isinstance(api_key, ApiKey):
        return api_key
    if api_key is not None:
        return ApiKey(api_key, "the api_key argument")
    if api_key_file is not None:
        return read_api_key_file(api_key_file)
    if API_KEY_ENV in environ:
        value = environ[API_KEY_ENV].strip()
        if not value:
            raise ValueError(f"{API_KEY_ENV} is set but empty; set it to the API key, or unset it to send none")
        return ApiKey(value, f"${API_KEY_ENV}")
    return None
