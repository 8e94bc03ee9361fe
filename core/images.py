"""Reading image files: one place for every stage's decoding.

`load_rgb` (PIL) raises OSError on an unreadable file so pretraining's `RobustImageFolder` can skip it;
`load_rgb_or_error` turns that into a `DataError` naming the file (evaluation never skips images);
`decode_rgb` reads straight into a uint8 tensor for the tensor augmentation pipeline.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import io as tvio

from mocobench.core.errors import DataError


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image file as an RGB PIL image (OSError if it cannot be read)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
        return img.convert("RGB")


def load_rgb_or_error(path: str | Path) -> Image.Image:
    """`load_rgb`, with an unreadable file reported as a DataError naming it."""
    try:
        return load_rgb(path)
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"unreadable image {path}: {e}") from None


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """PIL RGB image -> 3xHxW uint8 tensor."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def decode_rgb(path: str | Path) -> torch.Tensor:
    """Read an image file into a 3xHxW uint8 RGB tensor (torchvision.io; PIL for formats it cannot read).

    Raises OSError for unreadable files, like `load_rgb`, so `RobustImageFolder` skips them the same way.
    torchvision 0.29 deprecates its decoders in favour of TorchCodec and warns on every call; the pinned
    0.29.1 still ships them and they decode JPEG ~3x faster than PIL here, so that one warning is muted
    for this call only (data-loader workers are processes, so the scoped filter is not shared).
    """
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities",
                                    category=DeprecationWarning)
            img = tvio.decode_image(tvio.read_file(str(path)), mode=tvio.ImageReadMode.RGB)
        if img.dtype == torch.uint8:
            return img
    except (RuntimeError, ValueError):
        pass  # not JPEG/PNG/WEBP/GIF or an exotic variant: let PIL try (it raises OSError if it cannot)
    return pil_to_uint8(load_rgb(path))  # also 16-bit PNGs: converted exactly as the PIL pipeline does
