"""ImageLike values to what the Rust core takes: a path ``str``, encoded ``bytes``, or a
C-contiguous uint8 ``HxWx3`` array.

Files and bytes are decoded in Rust with their EXIF orientation applied. Arrays and PIL
images are the caller's pixels, taken as they are: grayscale is replicated to three
channels and alpha is dropped (not composited), as transformers does.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ImageError

if TYPE_CHECKING:
    import PIL.Image

    ImageLike = str | os.PathLike[str] | bytes | np.ndarray | PIL.Image.Image
else:
    ImageLike = Any


def _from_array(a: np.ndarray) -> np.ndarray:
    if a.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8, got {a.dtype}")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise TypeError(f"image arrays must be HxW or HxWxC, got shape {a.shape}")
    channels = a.shape[2]
    if channels == 1:
        a = np.repeat(a, 3, axis=2)
    elif channels == 4:
        a = a[:, :, :3]
    elif channels != 3:
        raise TypeError(f"image arrays need 1, 3 or 4 channels, got {channels}")
    return np.ascontiguousarray(a)


def to_core(image: ImageLike) -> str | bytes | np.ndarray:
    """Converts one ImageLike for the Rust core."""
    if isinstance(image, str):
        return image
    if isinstance(image, os.PathLike):
        path = os.fspath(image)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        return path
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, np.ndarray):
        return _from_array(image)
    if type(image).__module__.startswith("PIL."):
        try:
            # PIL decodes lazily, on first use: a truncated or corrupt file fails here
            # with an OSError ("image file is truncated", "broken data stream ...").
            rgb = image.convert("RGB")
        except OSError as e:
            raise ImageError(f"cannot decode PIL image: {e}") from None
        return _from_array(np.asarray(rgb))
    raise TypeError(
        "an image must be a path (str or os.PathLike), encoded bytes, a uint8 numpy array "
        f"or a PIL image, got {type(image).__name__}"
    )
