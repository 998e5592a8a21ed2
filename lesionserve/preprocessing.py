"""Image preprocessing, defined once.

decode -> RGB uint8 -> resize to a member's square input -> its normalisation (CHW float32).
Training's eval transform, the reference pipeline and the Triton ``preprocess`` model all call
these functions, so the three cannot drift apart.

A batch either raises on its first unreadable image (preprocess_batch: the reference pipeline and
training need every image) or reports it in place (preprocess_batch_rows: the server answers the
other images of the request, and names the unreadable ones in its ``error`` tensor).
"""
from __future__ import annotations

import functools
import io
import re
import warnings
from typing import Any, Callable, Hashable, Iterable, NamedTuple, Sequence

import cv2
import numpy as np

from lesionserve.arrays import array_ops
from lesionserve.architectures import IMAGENET, Normalization

#: Largest decoded image accepted (pixels). Larger headers are refused before decoding.
DEFAULT_MAX_PIXELS = 50_000_000
#: Largest encoded image accepted (bytes), checked before anything is parsed.
DEFAULT_MAX_BYTES = 20_000_000

#: Formats decoded (Pillow's names for the header check; OpenCV decodes the pixels). MPO is how
#: Pillow names multi-picture JPEGs from some cameras.
ACCEPTED_FORMATS = "JPEG, PNG, BMP, TIFF, WebP"
_HEADER_FORMATS = ["JPEG", "PNG", "BMP", "TIFF", "WEBP", "GIF"]
_ACCEPTED_PIL = {"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP"}
_BOMB_PIXELS_RE = re.compile(r"Image size \((\d+) pixels\)")
#: Name of the tensor carrying each row's decode error: an output of the Triton ``preprocess``
#: model, an input of ``threshold`` and an output of ``lesion_ensemble`` (see error_column).
ERROR_TENSOR = "error"



@functools.lru_cache(maxsize=32)
def _statistics(normalization: Normalization) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean*255, 1/(std*255), lookup table) of one normalisation, float32.

    The table is normalize()'s arithmetic evaluated once for every uint8 value of each channel
    (3 x 256): the same float32 operations, so a lookup gives bit-identical results at a fifth of the cost.
    """
    mean = np.asarray(normalization.mean, dtype=np.float32) * 255.0
    inv_std = 1.0 / (np.asarray(normalization.std, dtype=np.float32) * 255.0)
    lut = (np.arange(256, dtype=np.float32)[None, :] - mean[:, None]) * inv_std[:, None]
    return mean, inv_std, lut

# One OpenCV thread: the server runs several model instances on few cores; parallelism comes
# from instances, not from OpenCV's own pool.
cv2.setNumThreads(1)


class ImageDecodeError(ValueError):
    """The bytes are not an image this pipeline can read. The message says why."""


def image_header_size(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int] | None:
    """Read (width, height) from the header only, and refuse what must not be decoded.

    Pillow's lazy ``Image.open`` parses the header (PNG IHDR, JPEG SOF, BMP/TIFF/WebP headers)
    without touching pixel data, so a tiny file declaring 30000x30000 is refused before OpenCV
    would allocate gigabytes. Returns None only when Pillow's own bomb guard fired on an image
    that is still within ``max_pixels`` (a limit configured above Pillow's).
    """
    # Imported here, not at module level: export/checks.py (the engine builder image, no Pillow)
    # uses only preprocess_rgb from this module.
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # Pillow warns on large headers (max_pixels is this pipeline's bomb guard) and on
            # damaged TIFF/EXIF tags it skips; per image, in the server log, that is only noise.
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=_HEADER_FORMATS) as image:
                width, height, fmt = image.width, image.height, image.format
    except Image.DecompressionBombError as exc:
        match = _BOMB_PIXELS_RE.search(str(exc))
        declared = int(match.group(1)) if match else None
        if declared is None or declared > max_pixels:
            raise ImageDecodeError(
                f"image header declares {declared if declared is not None else 'too many'} pixels; "
                f"the limit is {max_pixels} pixels"
            ) from None
        return None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(
            f"cannot decode image ({len(data)} bytes): not a {ACCEPTED_FORMATS} file, or its header "
            f"is corrupt (accepted formats: {ACCEPTED_FORMATS})"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any header parser failure means unreadable input
        raise ImageDecodeError(
            f"cannot decode image ({len(data)} bytes): unreadable header ({type(exc).__name__}: {exc}); "
            f"accepted formats: {ACCEPTED_FORMATS}"
        ) from None
    if fmt not in _ACCEPTED_PIL:
        raise ImageDecodeError(f"{fmt} images are not accepted; accepted formats: {ACCEPTED_FORMATS}")
    if width * height > max_pixels:
        raise ImageDecodeError(f"image is {width}x{height} pixels; the limit is {max_pixels} pixels")
    return width, height


def decode_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES
) -> np.ndarray:
    """Decode encoded image bytes (JPEG, PNG, BMP, TIFF, WebP) into an HxWx3 uint8 RGB array.

    Grayscale is replicated to three channels, alpha is dropped, CMYK JPEG is converted by
    OpenCV and 16-bit samples are scaled to 8 bits. GIF is refused (OpenCV cannot read it).
    Size (``max_bytes``) and pixel count (``max_pixels``, from the header) are checked before
    decoding. Raises ImageDecodeError, and only that, for anything else.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageDecodeError(f"expected encoded image bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageDecodeError("empty input (0 bytes)")
    if len(data) > max_bytes:
        raise ImageDecodeError(f"image is {len(data)} bytes; the limit is {max_bytes} bytes")
    data = bytes(data)
    image_header_size(data, max_pixels)
    buffer = np.frombuffer(data, dtype=np.uint8)
    try:
        image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:  # OpenCV raises (rather than returning None) on some corrupt headers
        raise ImageDecodeError(f"cannot decode image ({len(data)} bytes): {exc.msg.strip()}") from None
    if image is None:
        raise ImageDecodeError(
            f"cannot decode image ({len(data)} bytes): corrupt or truncated "
            f"(accepted formats: {ACCEPTED_FORMATS})"
        )
    # Still checked after decoding: the header check may defer (see image_header_size).
    if image.shape[0] * image.shape[1] > max_pixels:
        raise ImageDecodeError(
            f"image is {image.shape[1]}x{image.shape[0]} pixels; the limit is {max_pixels} pixels"
        )
    return to_rgb(image, bgr=True)


def to_rgb(image: np.ndarray, bgr: bool = False) -> np.ndarray:
    """Convert a decoded array (HxW, HxWx1, HxWx3 or HxWx4; uint8 or uint16) to HxWx3 uint8 RGB.

    ``bgr`` says whether three/four-channel input is in OpenCV's BGR(A) order.
    """
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ImageDecodeError(f"unsupported sample type {image.dtype}; expected 8- or 16-bit integers")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ImageDecodeError(f"unsupported image shape {image.shape}; expected HxW, HxWx3 or HxWx4")
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB if bgr else cv2.COLOR_RGBA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if bgr else np.ascontiguousarray(image)


def resize(rgb: np.ndarray, size: int) -> np.ndarray:
    """Plain resize to size x size (no aspect keeping, as the seed recipe trains).

    Area interpolation when shrinking avoids aliasing; bilinear when enlarging.
    """
    h, w = rgb.shape[:2]
    interpolation = cv2.INTER_AREA if (h >= size and w >= size) else cv2.INTER_LINEAR
    return cv2.resize(rgb, (size, size), interpolation=interpolation)


def normalize(rgb: Any, normalization: Normalization = IMAGENET) -> Any:
    """... x H x W x 3 uint8 RGB -> ... x 3 x H x W float32, ``(x/255 - mean) / std``.

    A numpy array stays on the host; a torch tensor is normalised on its own device (the GPU
    variants send uint8 pixels to the GPU, a quarter of the float32 bytes, and normalise there).
    """
    mean, inv_std, lut = _statistics(normalization)
    if isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8:
        return _normalize_lut(rgb, lut)
    xp = array_ops(rgb)
    chw = xp.moveaxis(xp.astype(rgb, "float32"), -1, -3)
    mean = xp.asarray(mean, "float32", like=rgb)[:, None, None]
    inv_std = xp.asarray(inv_std, "float32", like=rgb)[:, None, None]
    return (chw - mean) * inv_std


def _normalize_lut(rgb: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """normalize() for uint8 numpy input by table lookup, written straight into CHW planes."""
    if rgb.shape[-1] != 3:
        raise ValueError(f"expected ... x H x W x 3 RGB pixels, got shape {rgb.shape}")
    out = np.empty((*rgb.shape[:-3], 3, *rgb.shape[-3:-1]), dtype=np.float32)
    for channel in range(3):
        np.take(lut[channel], rgb[..., channel], out=out[..., channel, :, :])
    return out


def preprocess_rgb(rgb: np.ndarray, size: int, normalization: Normalization = IMAGENET) -> np.ndarray:
    """HxWx3 uint8 RGB -> normalised 3 x size x size float32."""
    return normalize(resize(rgb, size), normalization)


def input_spec(item: Any) -> tuple[int, Normalization]:
    """(size, normalisation) of a batch function's input: a side length (ImageNet statistics) or an
    object with ``size`` and ``normalization`` (lesionserve.pipelines.Preprocessing)."""
    if isinstance(item, (int, np.integer)):
        return int(item), IMAGENET
    return int(item.size), item.normalization


def preprocess_bytes(
    data: bytes, sizes: Iterable[int], max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES
) -> dict[int, np.ndarray]:
    """Decode once, then resize once per distinct input size."""
    rgb = decode_image(data, max_pixels=max_pixels, max_bytes=max_bytes)
    return {size: preprocess_rgb(rgb, size) for size in sizes}


class PreprocessedBatch(NamedTuple):
    """A batch preprocessed row by row: one array per size, and each row's error.

    ``errors[row]`` is "" for a decoded row, else the ImageDecodeError reason decode_image gave
    (e.g. "image is 123 bytes; the limit is 100 bytes"); that row's pixels are all zeros.
    """

    pixels: dict[Any, Any]  # keyed by size (resize_batch_rows) or by input (preprocess_batch_rows)
    errors: list[str]
    #: (width, height) of each decoded image, (0, 0) where it could not be decoded: what a heatmap
    #: is resized back to.
    image_sizes: list[tuple[int, int]] = []
    #: With ``boxes``: the rectangle each row was cut to (x0, y0, x1, y1 in original pixels; the
    #: whole image where its box was NO_BOX, NO_BOX where it could not be decoded).
    crops: list[tuple[int, int, int, int]] = []

    @property
    def failed(self) -> list[int]:
        """Rows that could not be decoded, in order."""
        return [row for row, error in enumerate(self.errors) if error]

    def raise_first_error(self) -> None:
        """Raise ImageDecodeError naming the index of the first row that could not be decoded."""
        for index, error in enumerate(self.errors):
            if error:
                raise ImageDecodeError(f"undecodable image at index {index}: {error}")


def _decode_resize(
    data: bytes, box: Any, *, sizes: tuple[int, ...], max_pixels: int, max_bytes: int, margin: float = 0.0,
) -> tuple[dict[int, np.ndarray], tuple[int, int], Any] | str:
    """One image of resize_batch_rows: bytes -> ({size: S x S x 3 uint8}, (width, height), the
    rectangle cut or None), or the reason it is unreadable. ``box``: cut the image to that lesion
    box grown by ``margin`` first (lesionserve.cropping; NO_BOX: the whole image)."""
    try:
        rgb = decode_image(data, max_pixels=max_pixels, max_bytes=max_bytes)
    except ImageDecodeError as exc:
        return str(exc)
    size = (int(rgb.shape[1]), int(rgb.shape[0]))
    cut = None
    if box is not None:
        from lesionserve.cropping import crop_to_lesion

        rgb, cut, _ = crop_to_lesion(rgb, box, margin)
    return {s: resize(rgb, s) for s in sizes}, size, cut


def resize_batch_rows(
    images: list[bytes],
    sizes: Iterable[int],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    map_fn: Callable = map,
    boxes: Sequence[Any] | None = None,
    margin: float = 0.0,
) -> PreprocessedBatch:
    """Decode each image once and resize it once per size: one N x S x S x 3 uint8 array per size.

    Never raises ImageDecodeError: a row that cannot be decoded gets its reason in ``errors``
    and zeros for pixels; every other row is exactly what resize_batch gives. ``map_fn``: e.g. a
    thread pool's ``map`` to decode several images at once (OpenCV releases the GIL); results
    are the same either way. ``boxes`` (one lesion box per row, NO_BOX where none) and
    ``margin``: each image is cut to its box first (crop-guided classification).
    """
    sizes = tuple(sizes)
    if boxes is not None and len(boxes) != len(images):
        raise ValueError(f"{len(boxes)} boxes for {len(images)} images")
    work = functools.partial(_decode_resize, sizes=sizes, max_pixels=max_pixels, max_bytes=max_bytes, margin=margin)
    per_image = list(map_fn(work, images, boxes if boxes is not None else [None] * len(images)))
    errors = [p if isinstance(p, str) else "" for p in per_image]
    pixels = {}
    for size in sizes:
        batch = np.zeros((len(per_image), size, size, 3), dtype=np.uint8)
        for row, p in enumerate(per_image):
            if not isinstance(p, str):
                batch[row] = p[0][size]
        pixels[size] = batch
    image_sizes = [(0, 0) if isinstance(p, str) else p[1] for p in per_image]
    crops = [] if boxes is None else [(-1, -1, -1, -1) if isinstance(p, str) else p[2] for p in per_image]
    return PreprocessedBatch(pixels, errors, image_sizes, crops)


def resize_batch(
    images: list[bytes],
    sizes: Iterable[int],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    map_fn: Callable = map,
) -> dict[int, np.ndarray]:
    """resize_batch_rows for callers that need every image: raises ImageDecodeError naming the
    index of the first image that cannot be decoded ("undecodable image at index N: reason")."""
    batch = resize_batch_rows(images, sizes, max_pixels=max_pixels, max_bytes=max_bytes, map_fn=map_fn)
    batch.raise_first_error()
    return batch.pixels


def _distinct(inputs: Iterable[Any]) -> tuple[tuple[Any, ...], tuple[int, ...]]:
    """(distinct inputs, distinct sizes), in first-seen order: each size is resized once."""
    inputs = tuple(dict.fromkeys(inputs))
    return inputs, tuple(dict.fromkeys(input_spec(item)[0] for item in inputs))


def _normalize_batches(resized: dict[int, np.ndarray], device: str | None, inputs: Sequence[Hashable]) -> dict[Any, Any]:
    """N x S x S x 3 uint8 per size -> N x 3 x S x S float32 per input (its size, its statistics),
    on the host or on ``device``. Inputs that share a size share its resized pixels."""
    if device is not None:
        from lesionserve.arrays import to_torch

        resized = {size: to_torch(batch, device) for size, batch in resized.items()}
    out = {}
    for item in inputs:
        size, normalization = input_spec(item)
        out[item] = array_ops(resized[size]).contiguous(normalize(resized[size], normalization))
    return out


def preprocess_batch(
    images: list[bytes],
    inputs: Iterable[Any],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    device: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    map_fn: Callable = map,
) -> dict[Any, Any]:
    """Preprocess a batch of encoded images into one N x 3 x S x S float32 array per input.

    ``inputs``: side lengths (ImageNet statistics) or Preprocessing objects (a member's size and
    normalisation); the result is keyed by them. Each image is decoded once and resized once per
    distinct size, whatever the number of inputs.

    ``device`` None: numpy on the host. ``device="cuda:0"``: decoding and resizing stay on the CPU
    (OpenCV), the uint8 pixels are copied to the device and normalised there (torch tensors).
    Raises ImageDecodeError naming the index of the first image that cannot be decoded (the
    reference pipeline and training need every image; the server uses preprocess_batch_rows).
    """
    batch = preprocess_batch_rows(images, inputs, max_pixels, device, max_bytes=max_bytes, map_fn=map_fn)
    batch.raise_first_error()
    return batch.pixels


def preprocess_batch_rows(
    images: list[bytes],
    inputs: Iterable[Any],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    device: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    map_fn: Callable = map,
    boxes: Sequence[Any] | None = None,
    margin: float = 0.0,
) -> PreprocessedBatch:
    """preprocess_batch, row by row: never raises ImageDecodeError.

    A row that cannot be decoded gets its reason in ``errors`` and all-zero pixels (zero after
    normalisation, on ``device`` too); every other row is bit-identical to preprocess_batch's.
    ``boxes`` and ``margin``: crop each row to its lesion first (resize_batch_rows).
    """
    inputs, sizes = _distinct(inputs)
    resized = resize_batch_rows(images, sizes, max_pixels=max_pixels, max_bytes=max_bytes, map_fn=map_fn,
                                boxes=boxes, margin=margin)
    pixels = _normalize_batches(resized.pixels, device, inputs)
    failed = resized.failed
    if failed:
        for batch in pixels.values():
            batch[failed] = 0  # numpy and torch alike: the rows listed
    return PreprocessedBatch(pixels, resized.errors, resized.image_sizes, resized.crops)


# -- the per-row ``error`` tensor (preprocess output, threshold input, ensemble output) ------------


def error_column(errors: Sequence[str]) -> np.ndarray:
    """``errors`` as the ``error`` tensor carries them: N x 1 np.object_ of UTF-8 bytes, b"" = decoded.

    np.object_, not np.bytes_: Triton's BYTES tensors need it (np.bytes_ strips trailing NULs).
    """
    column = np.empty((len(errors), 1), dtype=np.object_)
    column[:, 0] = [error.encode("utf-8") for error in errors]
    return column


def failed_rows(column: Any) -> np.ndarray:
    """Which rows of an ``error`` tensor (N x 1 bytes or str) name an error: bool, length N."""
    return np.array([len(error) > 0 for error in np.asarray(column, dtype=np.object_).reshape(-1)], dtype=bool)


def clear_failed_rows(labels: np.ndarray, fired: np.ndarray, failed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The decision for rows preprocessing could not decode: label b"" and no threshold fired.

    ``labels`` N x 1 (class names as bytes), ``fired`` N x C bool, ``failed`` N bool (failed_rows).
    Returns copies; other rows are unchanged. A row count that differs is a broken pipeline: raise.
    """
    failed = np.asarray(failed, dtype=bool).reshape(-1)
    if not labels.shape[0] == fired.shape[0] == failed.shape[0]:
        raise ValueError(
            f"error tensor has {failed.shape[0]} rows but the decision has {labels.shape[0]} labels "
            f"and {fired.shape[0]} rows of fired thresholds"
        )
    labels, fired = labels.copy(), fired.copy()
    labels[failed] = b""
    fired[failed] = False
    return labels, fired
