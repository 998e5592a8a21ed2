"""LesionClient: classify skin-lesion images against the LesionServe Triton ensemble over gRPC."""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence, Union, overload, Literal

import numpy as np
from tritonclient.grpc import (
    MAX_GRPC_MESSAGE_SIZE,
    InferenceServerClient,
    InferInput,
    InferRequestedOutput,
    KeepAliveOptions,
)
from tritonclient.utils import InferenceServerException

from .config import ModelInfo, parse_model_config
from .credentials import ApiKey, PathLike, resolve_api_key
from .encoding import ImageInput, to_image_bytes
from .errors import (ImageError, InvalidImageError, RequestTimeoutError, ServerError, ServerUnavailableError,
                     UndecodableImageError, map_server_error)
from .replicas import DEFAULT_PROBE_INTERVAL, ReplicaSet
from .results import (CROP_OUTPUTS, DETECT_OUTPUTS, MELANOMA_HEAD_OUTPUTS, MELANOMA_OUTPUTS, OUTPUT_NAMES, SEGMENT_OUTPUTS,
                      DetectionResult, LesionResult, MelanomaResult, SegmentationResult, melanoma_heads, parse_detections,
                      parse_melanoma, parse_response, parse_segmentation, with_crops)

#: Explanation methods the ``<model>_explain`` ensemble serves (lesionserve.explain.CAM_METHODS).
EXPLAIN_METHODS: tuple[str, ...] = ("gradcam", "gradcampp")
DEFAULT_URL = "localhost:8001"
DEFAULT_MODEL = "lesion_ensemble"
INPUT_NAME = "raw_image"
#: The segmentation ensemble (lesionserve.segmentation.spec.LESION_SEGMENT).
SEGMENT_MODEL = "lesion_segment"
#: The crop-guided classifier (lesionserve.segmentation.spec.LESION_CROP).
CROP_MODEL = "lesion_crop"
#: The detector (lesionserve.detection.spec.LESION_DETECT) and its NMS defaults (ultralytics predict's).
DETECT_MODEL = "lesion_detect"
#: The ViT melanoma pipeline (a head per dataset, attention maps).
MELANOMA_MODEL = "melanoma_vit"
DEFAULT_CONF, DEFAULT_IOU, DEFAULT_MAX_DET, MAX_MAX_DET = 0.25, 0.7, 300, 1000
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF = 0.5
DEFAULT_MAX_BACKOFF = 4.0
#: gRPC's own reconnection backoff grows to 120 s by default, during which every call fails at once
#: with UNAVAILABLE: capped so that a restarted server is found again within our retries.
MAX_RECONNECT_BACKOFF_MS = 1000

logger = logging.getLogger("lesionserve_client")


def check_root_certificates(path: Union[str, "os.PathLike[str]"]) -> str:
    """Check that ``path`` is a readable PEM file of CA certificates; return it as a string.

    Errors name the path only, never the file's content.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"root_certificates file not found: {path!r}; give the PEM file of the CA that signed the server's certificate"
        )
    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as exc:
        raise PermissionError(f"root_certificates file {path!r} is not readable: {exc.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise ValueError(f"root_certificates file {path!r} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    return path


def channel_args() -> list[tuple[str, Any]]:
    """tritonclient's default channel options (passing any replaces them all) plus a capped reconnect backoff."""
    keepalive = KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.min_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    ]


def validate_url(url: str) -> str:
    """Check that ``url`` is ``host:port`` as tritonclient's gRPC client expects."""
    if "://" in url:
        # tritonclient would fail later with an obscure DNS error; say what is wrong instead.
        raise ValueError(f"url must be host:port (e.g. {DEFAULT_URL}) without a scheme, got {url!r}")
    if not url:
        raise ValueError("url must not be empty")
    return url


def validate_urls(url: Union[str, Sequence[str]]) -> tuple[str, ...]:
    """One endpoint (``host:port``) or several (a sequence, or one string of comma-separated
    ``host:port``), each checked by validate_url; the same endpoint twice is an error."""
    urls = [part.strip() for part in url.split(",")] if isinstance(url, str) else list(url)
    if not urls:
        raise ValueError(f"url must name at least one endpoint (host:port, e.g. {DEFAULT_URL})")
    for each in urls:
        if not isinstance(each, str):
            raise TypeError(f"each url must be a str host:port, got {type(each).__name__}")
        validate_url(each)
    twice = sorted({u for u in urls if urls.count(u) > 1})
    if twice:
        raise ValueError(f"url lists {', '.join(twice)} more than once; give each replica once")
    return tuple(urls)


class LesionClient:
    """Client for the ``lesion_ensemble`` model.

    Large inputs are split into requests of at most ``max_images_per_request`` images (default
    and cap: the ensemble's ``max_batch_size``) that run concurrently on ``max_workers`` threads.
    The model config (class names, backbones, batch limit) is read once, on first use.

    ``timeout`` bounds each call to the server in seconds, retries included: a call never takes
    longer. A call that fails with ServerUnavailableError (server down, restarting, connection
    lost) is retried up to ``retries`` times, after ``backoff`` seconds and then twice as long
    each time (at most ``max_backoff``), while the timeout leaves room; nothing else is retried
    (timeouts, bad images and server errors are raised at once). Inference has no side effect on
    the server, so a retried request is safe. ``ssl=True`` speaks TLS; ``root_certificates``
    is then the PEM file of the CA to trust (default: the system's).

    ``url`` may name several replicas serving the same model repository (a sequence of
    ``host:port``, or one comma-separated string). Each request goes to the up replica with the
    fewest requests in flight (ties: round robin). A replica that fails with UNAVAILABLE is marked
    down and probed every ``probe_interval`` seconds until it is ready again; the failed request
    is retried at once on another replica (up ones first; a retry, counted against ``retries``), and
    only when every replica has failed it since the last wait does the client wait ``backoff``. A request is retried only
    when it got no answer: one that was answered, even with an error, is never sent again.

    ``api_key`` (or ``api_key_file``, else ``$LESIONSERVE_API_KEY``): the credential a server
    started with one requires (``lesionserve serve --api-key-file``), sent with every request as
    header ``lesionserve-key``; a refusal raises CredentialError, never retried. The key is never
    logged or shown (repr names where it came from).
    """

    #: How retries wait; unit tests replace it to run without waiting.
    _sleep = staticmethod(time.sleep)

    def __init__(
        self,
        url: str = DEFAULT_URL,
        model_name: str = DEFAULT_MODEL,
        timeout: float = 60.0,
        max_workers: int = 4,
        max_images_per_request: Optional[int] = None,
        ssl: bool = False,
        root_certificates: Optional[Union[str, "os.PathLike[str]"]] = None,
        verbose: bool = False,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
        max_backoff: float = DEFAULT_MAX_BACKOFF,
        api_key: Union[str, ApiKey, None] = None,
        api_key_file: Optional[PathLike] = None,
        probe_interval: float = DEFAULT_PROBE_INTERVAL,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers!r}")
        if max_images_per_request is not None and max_images_per_request < 1:
            raise ValueError(f"max_images_per_request must be >= 1, got {max_images_per_request!r}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0 (0 = no retry), got {retries!r}")
        if not backoff > 0 or not max_backoff >= backoff:
            raise ValueError(f"backoff must be > 0 and max_backoff >= backoff, got {backoff!r} and {max_backoff!r}")
        if root_certificates is not None and not ssl:
            raise ValueError("root_certificates is only used over TLS: pass ssl=True as well")
        self.urls = validate_urls(url)
        #: The endpoints as one string, for messages.
        self.url = ",".join(self.urls)
        self.api_key = resolve_api_key(api_key, api_key_file)
        if verbose and self.api_key is not None:
            raise ValueError("verbose=True makes tritonclient print every request's headers, the API key among "
                             "them: drop verbose, or the key")
        # Passed only when there is a key: the header is the whole of what the key changes.
        self._headers = {"headers": self.api_key.grpc_headers()} if self.api_key is not None else {}
        self.model_name = model_name
        self.timeout = float(timeout)
        self.max_workers = max_workers
        self.max_images_per_request = max_images_per_request
        self.ssl = bool(ssl)
        self.root_certificates = check_root_certificates(root_certificates) if root_certificates is not None else None
        self.retries = retries
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self._replicas = ReplicaSet(self.urls, lambda each: InferenceServerClient(
            url=each, verbose=verbose, ssl=self.ssl, root_certificates=self.root_certificates, channel_args=channel_args()
        ), probe_interval=probe_interval)
        self._infos: dict[str, ModelInfo] = {}
        self._configs: dict[str, dict] = {}
        self._executor: Optional[ThreadPoolExecutor] = None
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        # Paths and settings only: never certificate or key contents.
        tls = f", ssl=True, root_certificates={self.root_certificates!r}" if self.ssl else ""
        key = f", api_key={self.api_key!r}" if self.api_key is not None else ""
        return (f"LesionClient(url={self.url!r}, model_name={self.model_name!r}, timeout={self.timeout:g}, "
                f"retries={self.retries}{tls}{key})")

    @property
    def _client(self) -> InferenceServerClient:
        """The first replica's tritonclient (the only one, for a single url)."""
        return self._replicas.replicas[0].client

    def replica_counts(self) -> dict[str, int]:
        """Calls each replica has answered so far, by url (in the order given)."""
        return self._replicas.counts()

    def down_replicas(self) -> list[str]:
        """Urls of the replicas marked down now (failed with UNAVAILABLE, not yet found ready again)."""
        return self._replicas.down()

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
        self._replicas.close()

    # -- model metadata --------------------------------------------------------------------

    @property
    def model_info(self) -> ModelInfo:
        """Class names, backbones and batch limit of the served ensemble (fetched once)."""
        return self._model_info(self.model_name)

    def _model_info(self, model: str) -> ModelInfo:
        with self._lock:
            if model not in self._infos:
                config = self._call("get_model_config", model, as_json=True)
                self._infos[model] = parse_model_config(config, model)
            return self._infos[model]

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
    def classify(self, images: Sequence[ImageInput], partial: Literal[False] = False, *, explain: bool = False,
                 explain_class: Optional[str] = None, explain_method: str = "gradcam", crop: bool = False,
                 crop_model: str = CROP_MODEL) -> list[LesionResult]: ...

    @overload
    def classify(
        self, images: Sequence[ImageInput], partial: Literal[True], *, explain: bool = False,
        explain_class: Optional[str] = None, explain_method: str = "gradcam", crop: bool = False,
        crop_model: str = CROP_MODEL,
    ) -> list[Union[LesionResult, ImageError]]: ...

    def classify(
        self, images: Sequence[ImageInput], partial: bool = False, *, explain: bool = False,
        explain_class: Optional[str] = None, explain_method: str = "gradcam", crop: bool = False,
        crop_model: str = CROP_MODEL,
    ) -> Union[list[LesionResult], list[Union[LesionResult, ImageError]]]:
        """Classify ``images`` and return one LesionResult per image, in input order.

        Each item may be a file path, encoded image bytes, or an HxWx3 uint8 RGB array.

        ``partial=False`` (default): raises InvalidImageError before contacting the server if any
        item is unusable, UndecodableImageError (the first, by index) if the server cannot decode one.
        ``partial=True``: such an image gets its error object (InvalidImageError or
        UndecodableImageError, with ``index`` and ``reason``) in its place in the returned list and
        every other image still gets its result. Both modes send the same requests (one per
        ``max_images_per_request`` images): the server reports each image's decode error in its
        response, so bad images cost no extra round trip. Errors that are not about one image
        (server unavailable, timeout, other server errors) are raised in both modes.

        ``explain=True``: each result also carries ``heatmap`` (the image's height x width, in
        [0, 1]) for ``explain_class`` (default: its predicted label) by ``explain_method``
        (``gradcam`` or ``gradcampp``), from the ``<model>_explain`` ensemble; ``result.overlay(image)``
        draws it. Heatmaps keep each image's own size, so every image is its own request (sent
        concurrently, ``max_workers`` at a time).

        ``crop=True``: crop-guided classification by ``crop_model`` (the ``lesion_crop`` pipeline):
        the server segments each image, cuts its lesion's bounding rectangle (+ margin) and
        classifies the crop with its crop-trained members. Each result then also carries
        ``crop_box`` (the rectangle classified, original pixels) and ``cropped`` (False: no lesion
        was found and the whole image was classified).
        """
        if explain_method not in EXPLAIN_METHODS:
            raise ValueError(f"explain_method must be one of {', '.join(EXPLAIN_METHODS)}, got {explain_method!r}")
        if crop and explain:
            raise ValueError("crop=True and explain=True cannot be combined: the crop pipeline serves no heatmaps")
        out, items = self._encode(images, partial, "classify")
        if items:
            info = self._model_info(crop_model) if crop else self.model_info
            if explain_class is not None and explain_class not in info.class_names:
                raise ValueError(f"cannot explain unknown class {explain_class!r}; classes: {', '.join(info.class_names)}")
            wanted = (explain_class or "", explain_method) if explain else None
            size = 1 if explain else self._request_size(info, len(items))
            chunks = [items[i : i + size] for i in range(0, len(items), size)]
            for chunk, rows in zip(chunks, self._infer_chunks(info, chunks, partial, wanted, crop_model if crop else None)):
                for (index, _), row in zip(chunk, rows):
                    out[index] = row
        return out  # type: ignore[return-value]  # every slot is filled above

    def _encode(self, images: Sequence[ImageInput], partial: bool, method: str) -> tuple[list[Any], list[tuple[int, bytes]]]:
        """(one slot per image, holding its InvalidImageError where ``partial``; the (index in the
        caller's list, encoded bytes) pairs to send). Without ``partial`` the first unusable image
        is raised before anything is sent: bad input fails fast and no request is wasted."""
        if isinstance(images, (str, bytes, bytearray, os.PathLike)) or (
            isinstance(images, np.ndarray) and images.ndim == 3
        ):
            # Iterating a single image would yield characters/bytes/rows: a confusing failure.
            raise TypeError(f"{method}() takes a sequence of images; wrap a single image in a list")
        if self._closed:
            raise RuntimeError("LesionClient is closed")
        out: list[Any] = [None] * len(images)
        items: list[tuple[int, bytes]] = []
        for index, image in enumerate(images):
            try:
                items.append((index, to_image_bytes(image, index)))
            except InvalidImageError as exc:
                if not partial:
                    raise
                out[index] = exc
        return out, items

    def _infer_chunks(
        self, info: ModelInfo, chunks: list[list[tuple[int, bytes]]], partial: bool,
        explain: Optional[tuple[str, str]] = None, crop_model: Optional[str] = None,
    ) -> list[list[Union[LesionResult, UndecodableImageError]]]:
        """One request per chunk, concurrently when there are several; answers in chunk order."""
        if len(chunks) == 1:
            return [self._infer(info, chunks[0], partial, explain, crop_model)]
        futures = [self._pool().submit(self._infer, info, chunk, partial, explain, crop_model) for chunk in chunks]
        try:
            # Collect in submission order: results stay in input order, and on failure the
            # error of the earliest failing request (lowest image index) is the one raised.
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise

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

    def _infer(
        self, info: ModelInfo, items: list[tuple[int, bytes]], partial: bool,
        explain: Optional[tuple[str, str]] = None, crop_model: Optional[str] = None,
    ) -> list[Union[LesionResult, UndecodableImageError]]:
        """Send ``items`` ((index in the caller's list, bytes) pairs) as one request (to ``crop_model``
        where given).

        The server answers every row of it: an image it cannot decode gets its reason in the
        ``error`` output, in place, so partial results never cost a second request. Unless
        ``partial``, the first such image is raised as UndecodableImageError.
        """
        tensor = InferInput(INPUT_NAME, [len(items), 1], "BYTES")
        # np.object_, not np.bytes_: numpy's fixed-width bytes drop trailing NUL bytes.
        tensor.set_data_from_numpy(np.array([[blob] for _, blob in items], dtype=np.object_))
        inputs, outputs, model = [tensor], list(OUTPUT_NAMES), self.model_name
        if crop_model is not None:
            model, outputs = crop_model, outputs + list(CROP_OUTPUTS)
        if explain is not None:  # the twin ensemble: same outputs plus the heatmap
            model, outputs = f"{self.model_name}_explain", outputs + ["heatmap"]
            for name, value in zip(("explain_class", "explain_method"), explain):
                extra = InferInput(name, [len(items), 1], "BYTES")
                extra.set_data_from_numpy(np.array([[value.encode()]] * len(items), dtype=np.object_))
                inputs.append(extra)
        response = self._call(
            "infer", model, inputs=inputs, outputs=[InferRequestedOutput(name) for name in outputs],
        )
        rows = parse_response(response, info, [index for index, _ in items])
        if explain is not None:
            heatmaps = response.as_numpy("heatmap")
            if heatmaps is None or heatmaps.ndim != 3 or len(heatmaps) != len(items):
                raise ServerError(f"{model} returned no heatmap per image (got {None if heatmaps is None else heatmaps.shape})")
            rows = [row if isinstance(row, UndecodableImageError) else dataclasses.replace(
                row, heatmap=heatmaps[i], explained_class=explain[0] or row.label, explain_method=explain[1])
                for i, row in enumerate(rows)]
        if crop_model is not None:
            rows = with_crops(response, rows)
        if not partial:
            for row in rows:
                if isinstance(row, UndecodableImageError):
                    raise row
        return rows

    def segment(self, images: Sequence[ImageInput], partial: bool = False, *,
                model_name: str = SEGMENT_MODEL) -> list[Union[SegmentationResult, ImageError]]:
        """The lesion of each image: a SegmentationResult (mask at the image's size, box, area
        fraction, found flag) per image, in input order, from the segmentation ensemble.

        Bad input behaves as in ``classify``: without ``partial`` the first unusable or undecodable
        image is raised (InvalidImageError before anything is sent); with it, the error object takes
        that image's place. Images go in requests of up to the ensemble's max_batch_size.
        """
        return self._per_image(images, partial, "segment", model_name, SEGMENT_OUTPUTS,
                               lambda response, indices, _: parse_segmentation(response, indices))

    def detect(self, images: Sequence[ImageInput], partial: bool = False, *, conf: float = DEFAULT_CONF,
               iou: float = DEFAULT_IOU, max_det: int = DEFAULT_MAX_DET, explain: bool = False,
               model_name: str = DETECT_MODEL) -> list[Union[DetectionResult, ImageError]]:
        """The lesions the detector finds in each image: a DetectionResult per image, in input order,
        each with its boxes (x0, y0, x1, y1 in the image's pixels), class names and scores, after
        the server's NMS at ``conf`` (score threshold), ``iou`` (overlap) and ``max_det`` (boxes per
        image). Out-of-range values raise ValueError before anything is sent; bad images behave as in
        ``classify``. ``explain=True``: each result also carries ``heatmap``, the EigenCAM of the
        detector's layer 8 at the image's size (gradient-free: it explains no box), from
        ``<model>_explain``."""
        problems = [f"{name} {value!r} is not in {allowed}" for name, value, ok, allowed in (
            ("conf", conf, 0 <= conf <= 1, "[0, 1]"), ("iou", iou, 0 <= iou <= 1, "[0, 1]"),
            ("max_det", max_det, isinstance(max_det, int) and 1 <= max_det <= MAX_MAX_DET, f"[1, {MAX_MAX_DET}] (an int)"))
            if not ok]
        if problems:
            raise ValueError("; ".join(problems))

        def extra(count: int) -> list[InferInput]:
            tensors = []
            for name, value, dtype, kind in (("conf", conf, "FP32", np.float32), ("iou", iou, "FP32", np.float32),
                                             ("max_det", max_det, "INT32", np.int32)):
                tensor = InferInput(name, [count, 1], dtype)
                tensor.set_data_from_numpy(np.full((count, 1), value, kind))
                tensors.append(tensor)
            return tensors

        model = f"{model_name}_explain" if explain else model_name
        outputs = DETECT_OUTPUTS + (("heatmap", "image_size") if explain else ())
        return self._per_image(images, partial, "detect", model, outputs,
                               lambda response, indices, config: parse_detections(response, indices, config, explain), extra)

    def melanoma(self, images: Sequence[ImageInput], partial: bool = False, *, head: Optional[str] = None,
                 model_name: str = MELANOMA_MODEL) -> list[Union[MelanomaResult, ImageError]]:
        """The ViT melanoma classifier's answer for each image: a MelanomaResult per image, in input
        order, whose ``prediction`` is the head named ``head`` (one per dataset the server's model was
        trained on, e.g. ``ham10000``: melanoma vs rest, ``ph2``: common / atypical nevus / melanoma;
        None: every head, ``prediction`` the first), with the decision at that head's calibrated
        threshold and the attention map at the image's size. An unknown head raises ValueError naming
        the server's heads before anything is sent; bad images behave as in ``classify``."""
        config = self._model_config(model_name)
        served = list(melanoma_heads(config))
        if head is not None and head not in served:
            raise ValueError(f"unknown head {head!r}; {model_name} serves heads: {', '.join(served)}")
        heads = served if head is None else [head]
        outputs = [f"{what}_{h}" for h in heads for what in MELANOMA_HEAD_OUTPUTS] + list(MELANOMA_OUTPUTS)
        return self._per_image(images, partial, "melanoma", model_name, outputs,
                               lambda response, indices, cfg: parse_melanoma(response, indices, cfg, heads, heads[0]))

    def _per_image(self, images: Sequence[ImageInput], partial: bool, method: str, model_name: str,
                   outputs: Sequence[str], parse: Callable[..., list], extra: Optional[Callable[[int], list]] = None) -> list:
        """Send ``images`` to ``model_name`` in requests of up to its max_batch_size; one parsed row per image."""
        out, items = self._encode(images, partial, method)
        config = self._model_config(model_name) if items else {}
        size = max(1, int(config.get("max_batch_size") or 1))
        if self.max_images_per_request is not None:
            size = min(size, self.max_images_per_request)
        for start in range(0, len(items), size):
            chunk = items[start:start + size]
            tensor = InferInput(INPUT_NAME, [len(chunk), 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[blob] for _, blob in chunk], dtype=np.object_))
            response = self._call("infer", model_name, inputs=[tensor, *(extra(len(chunk)) if extra else [])],
                                  outputs=[InferRequestedOutput(name) for name in outputs])
            for (index, _), row in zip(chunk, parse(response, [i for i, _ in chunk], config)):
                if isinstance(row, UndecodableImageError) and not partial:
                    raise row
                out[index] = row
        return out

    def _model_config(self, model_name: str) -> dict:
        """A model's config as JSON (fetched once per model name)."""
        with self._lock:
            if model_name not in self._configs:
                config = self._call("get_model_config", model_name, as_json=True)
                self._configs[model_name] = config.get("config", config)
            return self._configs[model_name]

    def backoff_delays(self) -> list[float]:
        """Seconds waited before each retry: ``backoff`` doubling up to ``max_backoff``."""
        return [min(self.backoff * 2**attempt, self.max_backoff) for attempt in range(self.retries)]

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run tritonclient's ``method`` on a replica within ``timeout`` (retries included), translating
        its exceptions in one place. ServerUnavailableError (no answer) is retried: at once on a
        replica this call has not tried since its last wait (up ones first), else after the next backoff."""
        start = time.monotonic()
        deadline = start + self.timeout
        delays = self.backoff_delays()
        key_source = self.api_key.source if self.api_key is not None else None
        waits, attempt, tried, everywhere = 0, 0, [], []
        replica = self._replicas.acquire()
        while True:
            attempt += 1
            answered = unavailable = False
            try:
                result = getattr(replica.client, method)(
                    *args, client_timeout=max(deadline - time.monotonic(), 0.001), **self._headers, **kwargs)
                answered = True
                return result
            except InferenceServerException as exc:
                cause = exc  # ``exc`` is unbound after this block; the error raised below chains to it
                error = map_server_error(exc, url=replica.url, timeout=self.timeout, key_source=key_source)
                unavailable = isinstance(error, ServerUnavailableError)
                # A timeout is neither: the request may still run there, so it is not sent again either.
                answered = not unavailable and not isinstance(error, RequestTimeoutError)
                if not unavailable:
                    raise error from exc
            finally:
                self._replicas.release(replica, answered=answered, unavailable=unavailable)
            tried.append(replica)
            everywhere.append(replica.url)
            left = deadline - time.monotonic()
            following = self._replicas.acquire(exclude=tried) if attempt <= self.retries and left > 0 else None
            if following is not None:
                logger.warning("%s; retry %d of %d on %s", error, attempt, self.retries, following.url)
                replica = following
                continue
            delay = delays[waits] if attempt <= self.retries else None
            # A retry needs time to wait and then to be answered: never start one the timeout cuts off.
            if delay is None or delay >= left:
                if attempt > 1:
                    where = f"; replicas tried: {', '.join(dict.fromkeys(everywhere))}" if len(self.urls) > 1 else ""
                    error = ServerUnavailableError(
                        f"{error} (gave up after {attempt} attempts in {time.monotonic() - start:.1f}s; "
                        f"retries={self.retries}, timeout={self.timeout:g}s{where})"
                    )
                raise error from cause
            logger.warning("%s; retry %d of %d in %.2fs", error, attempt, self.retries, delay)
            self._sleep(delay)
            waits, tried = waits + 1, []
            replica = self._replicas.acquire()
