"""Encoded images (PNG/JPEG) in the ``image`` column: decode, encode, inspect.

Images stay encoded in Parquet (small, and what users already have); they are
decoded with Pillow to float32 CHW in [0, 1] where a model needs them.
"""

from __future__ import annotations

import io
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

FORMATS = ("PNG", "JPEG")
# Pillow modes whose natural channel count is 1; everything else decodes to RGB.
_GRAY_MODES = {"1", "L", "I", "I;16", "I;16B", "I;16L", "F", "LA"}


class ImageDecodeError(ValueError):
    """Raised by :func:`open_image` with a short reason; callers add file/row."""


def open_image(data: bytes):
    """Fully decode ``data`` with Pillow; returns the loaded ``PIL.Image``."""

    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise ImageDecodeError("empty image bytes")
    try:
        img = Image.open(io.BytesIO(bytes(data)))
        fmt = img.format
        img.load()  # decode every pixel: catches truncated files
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"cannot decode image: {e}") from None
    if fmt not in FORMATS:
        raise ImageDecodeError(f"image format {fmt} is not PNG or JPEG")
    return img


def natural_shape(img) -> tuple[int, int, int]:
    """(C, H, W) an image decodes to when the dataset does not force channels."""
    c = 1 if img.mode in _GRAY_MODES else 3
    return (c, img.height, img.width)


def _to_array(img, channels: int) -> np.ndarray:
    img = img.convert("L" if channels == 1 else "RGB")
    arr = np.asarray(img, dtype=np.uint8)
    if channels == 1:
        return arr[None, :, :]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def decode_image(data: bytes, shape: Sequence[int] | None = None) -> np.ndarray:
    """Decode one encoded image to float32 CHW in [0, 1].

    With ``shape=(C, H, W)`` the channels are converted to ``C`` and the size
    must match (no silent resizing: a wrong size is a data error).
    """
    img = open_image(data)
    c = natural_shape(img)[0] if shape is None else int(shape[0])
    if c not in (1, 3):
        raise ImageDecodeError(f"images must have 1 or 3 channels, not {c}")
    arr = _to_array(img, c)
    if shape is not None and tuple(arr.shape) != tuple(int(s) for s in shape):
        raise ImageDecodeError(f"image decodes to shape {tuple(arr.shape)}, "
                               f"expected {tuple(shape)}")
    return arr.astype(np.float32) / np.float32(255.0)


def decode_images(items: Iterable[bytes], shape: Sequence[int]) -> np.ndarray:
    """Decode a batch to float32 (N, C, H, W) in [0, 1] (e.g. in a Ray Data map)."""
    arrays = [decode_image(b, shape) for b in items]
    if not arrays:
        return np.zeros((0, *shape), dtype=np.float32)
    return np.stack(arrays)


def encode_png(pixels: np.ndarray) -> bytes:
    """Encode uint8 HxW (gray) or HxWx3 / CxHxW (C in 1, 3) pixels as PNG.

    Deterministic for a given Pillow/zlib: same pixels, same bytes.
    """

    arr = np.asarray(pixels)
    if arr.dtype != np.uint8:
        raise ValueError(f"encode_png needs uint8 pixels, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)  # CHW -> HWC
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
