"""Decoding a frame: image files by extension, fully decoded (a truncated file fails here, not later), with the
size checked from the header first (an oversized image is refused before its pixels take memory)."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from objret import storage
from objret.errors import BadFrameError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
VIDEO_EXTENSIONS = frozenset({".avi", ".mp4", ".mov", ".mkv", ".webm"})
# An image over this many pixels is skipped rather than decoded (a 20000 x 20000 RGB frame is 1.2 GB in memory);
# Pillow itself refuses over 2 x Image.MAX_IMAGE_PIXELS (179 M) whatever this says.
MAX_PIXELS = 100_000_000
MIN_SIDE = 32  # a shorter image side is no frame (under one cell of the stride-32 feature map at full size)


def _extension(uri: str) -> str:
    return os.path.splitext(str(uri))[1].lower()


def is_image(uri: str | Path) -> bool:
    return _extension(str(uri)) in IMAGE_EXTENSIONS


def is_video(uri: str | Path) -> bool:
    return _extension(str(uri)) in VIDEO_EXTENSIONS


def decode_image(uri: str, data: bytes, max_pixels: int = MAX_PIXELS, min_side: int = 1) -> Image.Image:
    """Fully decode, so a truncated file fails here and not later in the pipeline. The size is checked from the
    header first: an oversized image is refused before its pixels take any memory."""
    if not data:
        raise BadFrameError(f"{uri}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels decides, below
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise BadFrameError(f"{uri}: image too large, not decoded: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise BadFrameError(f"{uri}: cannot decode image: not in an image format Pillow reads") from exc
    except Exception as exc:  # Pillow raises many types for bad data
        raise BadFrameError(f"{uri}: cannot decode image: {exc}") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise BadFrameError(f"{uri}: image too large, not decoded: {width}x{height} is {width * height} pixels, "
                            f"more than lake.max_pixels ({max_pixels})")
    if min(width, height) < min_side:
        raise BadFrameError(f"{uri}: image too small: {width}x{height}, a side under lake.min_side ({min_side} px)")
    try:
        image.load()
    except Exception as exc:
        raise BadFrameError(f"{uri}: cannot decode image: {exc}") from exc
    return image


def load_image(uri: str, endpoint_url: str | None = None, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The pixels at ``uri`` as RGB uint8 (H, W, 3). BadFrameError if they do not decode (or hold more than
    ``max_pixels``), StoreError if they cannot be read."""
    image = decode_image(uri, storage.read_bytes(uri, endpoint_url), max_pixels)
    return np.asarray(image.convert("RGB"))
