"""Checkpoint I/O used by every stage: atomic writes and safe (weights_only) reads.

Untrusted checkpoints are data, not code: every read goes through `safe_load`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temp file in the same directory, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def safe_load(path: str | Path, trust: bool = False) -> Any:
    """Load a torch checkpoint with `weights_only=True` unless the caller explicitly trusts it."""
    return torch.load(path, map_location="cpu", weights_only=not trust)
