"""Atomic file writes: write a temp file in the target's folder, then rename over the target, so a crash
or preemption never leaves half a checkpoint or record behind."""
from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def atomic_write(path: str | Path, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Call `write(f)` on a temp file next to `path`, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_save(obj: Any, path: str | Path) -> Path:
    """`torch.save` through `atomic_write`."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """A text file through `atomic_write`."""
    return atomic_write(path, lambda f: f.write(text.encode()))
