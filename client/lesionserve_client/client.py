"""LesionClient: classify skin-lesion images against the LesionServe Triton ensemble over gRPC."""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence, TypeVar, Union, overload, Literal

import numpy as np
from tritonclient.grpc import InferenceServerClient, InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from .config import ModelInfo, parse_model_config
from .encoding import ImageInput, to_image_bytes
from .errors import ImageError, InvalidImageError, UndecodableImageError, map_server_error
from .results import OUTPUT_NAMES, LesionResult, parse_response

DEFAULT_URL = "localhost:8001"
DEFAULT_MODEL = "lesion_ensemble"
INPUT_NAME = "raw_image"

_T = TypeVar("_T")


def validate_url(url: str) -> str:
    """Check that ``url`` is ``host:port`` as tritonclient's gRPC client expects."""
    if "://" in url:
        # tritonclient would fail later with an obscure DNS error; say what is wrong instead.
        raise ValueError(f"url must be host:port (e.g. {DEFAULT_URL}) without a scheme, got {url!r}")
    if not url:
        raise ValueError("url must not be empty")
    return url


class LesionClient:
    """Client for the ``lesion_ensemble`` model.

    Large inputs are split into requests of at most ``max_images_per_request`` images (default
    and cap: the ensemble's ``max_batch_size``) that run concurrently on ``max_workers`` threads.
    The model config (class names, backbones, batch limit) is read once, on first use.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        model_name: str = DEFAULT_MODEL,
        timeout: float = 60.0,
        max_workers: int = 4,
        max_images_per_request: Optional[int] = None,
        ssl: bool = False,
        root_certificates: Optional[str] = None,
        verbose: bool = False,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers!r}")
        if max_images_per_request is not None and max_images_per_request < 1:
            raise ValueError(f"max_images_per_request must be >= 1, got {max_images_per_request!r}")
        self.url = validate_url(url)
        self.model_name = model_name
        self.timeout = float(timeout)
        self.max_workers = max_workers
        self.max_images_per_request = max_images_per_request
        self._client = InferenceServerClient(
            url=url, verbose=verbose, ssl=ssl, root_certificates=root_certificates
        )
        self._info: Optional[ModelInfo] = None
        self._executor: Optional[ThreadPoolExecutor] = None
        self._lock = threading.Lock()
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> "LesionClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the worker threads and the gRPC channel. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        self._client.close()

    # -- model metadata --------------------------------------------------------------------

    @property
    def model_info(self) -> ModelInfo:
        """Class names, backbones and batch limit of the served ensemble (fetched once)."""
        with self._lock:
            if self._info is None:
                config = self._call(
                    self._client.get_model_config, self.model_name, as_json=True, client_timeout=self.timeout
                )
                self._info = parse_model_config(config, self.model_name)
            return self._info

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names in the model's output order."""
        return self.model_info.class_names

    @property
    def backbones(self) -> tuple[str, ...]:
        """Backbone names in the order of ``backbone_probs``."""
        return self.model_info.backbones

    # -- inference -------------------------------------------------------------------------

    @overload
    def classify(self, images: Sequence[ImageInput], partial: Literal[False] = False) -> list[LesionResult]: ...

    @overload
    def classify(
        self, images: Sequence[ImageInput], partial: Literal[True]
    ) -> list[Union[LesionResult, ImageError]]: ...

    def classify(
        self, images: Sequence[ImageInput], partial: bool = False
    ) -> Union[list[LesionResult], list[Union[LesionResult, ImageError]]]:
        """Classify ``images`` and return one LesionResult per image, in input order.

        Each item may be a file path, encoded image bytes, or an HxWx3 uint8 RGB array.

        ``partial=False`` (default): raises InvalidImageError before contacting the server if any
        item is unusable, UndecodableImageError if the server cannot decode one.
        ``partial=True``: such an image gets its error object (InvalidImageError or
        UndecodableImageError, with ``index`` and ``reason``) in its place in the returned list and
        every other image still gets its result. Errors that are not about one image (server
        unavailable, timeout, other server errors) are raised in both modes.
        """
        if isinstance(images, (str, bytes, bytearray, os.PathLike)) or (
            isinstance(images, np.ndarray) and images.ndim == 3
        ):
            # Iterating a single image would yield characters/bytes/rows: a confusing failure.
            raise TypeError("classify() takes a sequence of images; wrap a single image in a list")
        if self._closed:
            raise RuntimeError("LesionClient is closed")
        if partial:
            return self._classify_partial(images)
        # Encode everything first so bad input fails fast and no request is wasted.
        blobs = [to_image_bytes(image, index) for index, image in enumerate(images)]
        if not blobs:
            return []

        info = self.model_info
        size = self._request_size(info, len(blobs))
        starts = range(0, len(blobs), size)
        if len(starts) == 1:
            return self._infer(info, 0, blobs)

        futures = [self._pool().submit(self._infer, info, start, blobs[start : start + size]) for start in starts]
        results: list[LesionResult] = []
        try:
            # Collect in submission order: results stay in input order, and on failure the
            # error of the earliest failing request (lowest image index) is the one raised.
            for future in futures:
                results.extend(future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return results

    def _classify_partial(self, images: Sequence[ImageInput]) -> list[Union[LesionResult, ImageError]]:
        """classify(partial=True): per-image errors take the place of results."""
        out: list[Union[LesionResult, ImageError, None]] = [None] * len(images)
        items: list[tuple[int, bytes]] = []
        for index, image in enumerate(images):
            try:
                items.append((index, to_image_bytes(image, index)))
            except InvalidImageError as exc:
                out[index] = exc
        if items:
            info = self.model_info
            size = self._request_size(info, len(items))
            chunks = [items[i : i + size] for i in range(0, len(items), size)]
            if len(chunks) == 1:
                done = [self._infer_partial(info, chunks[0])]
            else:
                futures = [self._pool().submit(self._infer_partial, info, chunk) for chunk in chunks]
                try:
                    done = [future.result() for future in futures]
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
            for chunk in done:
                for index, value in chunk:
                    out[index] = value
        return out  # type: ignore[return-value]  # every slot is filled above

    def _infer_partial(
        self, info: ModelInfo, items: list[tuple[int, bytes]]
    ) -> list[tuple[int, Union[LesionResult, ImageError]]]:
        """Send ``items`` (caller index, bytes) as one request; on an undecodable image, set it
        aside and resend the rest.

        The server fails a whole request on its first bad row, naming that row: each retry drops
        exactly one image, so k bad images cost k extra requests and no good image is lost.
        """
        done: list[tuple[int, Union[LesionResult, ImageError]]] = []
        pending = list(items)
        while pending:
            try:
                # offset 0: the error's index is then the row in ``pending``, mapped back below.
                results = self._infer(info, 0, [blob for _, blob in pending])
            except UndecodableImageError as exc:
                if not 0 <= exc.index < len(pending):
                    raise  # a row the request does not have: not an answer about one image
                index, _ = pending.pop(exc.index)
                done.append((index, UndecodableImageError(index, exc.reason)))
                continue
            done.extend((index, result) for (index, _), result in zip(pending, results))
            break
        return done

    def _request_size(self, info: ModelInfo, total: int) -> int:
        """Images per request: the caller's choice capped by the server's limit."""
        limit = info.max_batch_size if info.max_batch_size > 0 else total
        if self.max_images_per_request is None:
            return limit
        # Larger requests would only be rejected by the server.
        return min(self.max_images_per_request, limit)

    def _pool(self) -> ThreadPoolExecutor:
        """The client's worker pool, created on first concurrent use and reused after."""
        with self._lock:
            if self._closed:
                raise RuntimeError("LesionClient is closed")
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.max_workers, thread_name_prefix="lesionserve")
            return self._executor

    def _infer(self, info: ModelInfo, offset: int, blobs: list[bytes]) -> list[LesionResult]:
        """Send one request for ``blobs`` (images ``offset`` onwards of the caller's list)."""
        tensor = InferInput(INPUT_NAME, [len(blobs), 1], "BYTES")
        # np.object_, not np.bytes_: numpy's fixed-width bytes drop trailing NUL bytes.
        tensor.set_data_from_numpy(np.array([[blob] for blob in blobs], dtype=np.object_))
        response = self._call(
            self._client.infer,
            self.model_name,
            inputs=[tensor],
            outputs=[InferRequestedOutput(name) for name in OUTPUT_NAMES],
            client_timeout=self.timeout,
            offset=offset,
        )
        return parse_response(response, info, len(blobs))

    def _call(self, fn: Callable[..., _T], *args: Any, offset: int = 0, **kwargs: Any) -> _T:
        """Run a tritonclient call, translating its exceptions in one place."""
        try:
            return fn(*args, **kwargs)
        except InferenceServerException as exc:
            raise map_server_error(exc, url=self.url, timeout=self.timeout, offset=offset) from exc
