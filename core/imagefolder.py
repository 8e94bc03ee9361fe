"""Image data for pretraining: torchvision's ImageFolder layout, tolerant of unreadable files.

A corrupt image is recorded and replaced by the next readable one instead of crashing a run 40 hours in;
`strict=True` makes it fatal with the file name. The batch size stays fixed (MoCo's queue needs it).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from mocobench.core.errors import DataError
from mocobench.core.images import load_rgb


class RobustImageFolder(ImageFolder):
    """ImageFolder whose items are (transformed image, label, index, skipped paths)."""

    MAX_SKIPS = 16

    def __init__(self, root: str | Path, transform=None, strict: bool = False):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"image folder {root} does not exist; expected ImageFolder layout root/<class>/<image>")
        try:
            super().__init__(str(root), transform=transform, loader=load_rgb)
        except (FileNotFoundError, RuntimeError) as e:
            raise DataError(f"image folder {root}: {e}; expected root/<class>/<image> with extensions "
                            f"{', '.join(IMG_EXTENSIONS)}") from None
        self.strict = strict

    def __getitem__(self, index: int):
        skipped = []
        for attempt in range(self.MAX_SKIPS):
            i = (index + attempt) % len(self.samples)
            path, label = self.samples[i]
            try:
                img = self.loader(path)
            except (OSError, ValueError, SyntaxError) as e:
                if self.strict:
                    raise DataError(f"unreadable image {path}: {e} (run without --strict-data to skip such files)") from e
                skipped.append(path)
                continue
            if self.transform is not None:
                img = self.transform(img)
            return img, label, i, tuple(skipped)
        names = ", ".join(str(p) for p in skipped[:3])
        raise DataError(f"{len(skipped)} unreadable images in a row in {self.root} ({names} and "
                        f"{len(skipped) - 3} more); expected readable image files (JPEG, PNG, ...)")


def collate_with_skips(batch):
    """Default-collate (image, label, index) and concatenate the skipped-file lists."""
    skipped = [p for item in batch for p in item[3]]
    images, labels, ids = torch.utils.data.default_collate([item[:3] for item in batch])
    return images, labels, ids, skipped
