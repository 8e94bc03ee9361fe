"""Feature files: uncompressed `.npz` written streamed and atomically, read with the feature matrices
memory-mapped straight out of the zip, and checked against the feature-file conventions.

A feature file holds float32 `train_feats` (N x D), `train_labels`, `test_feats`, `test_labels` and
optionally `class_names`; labels are a 1-d int vector (single-label) or N x C in {1, 0, -1} (VOC: present /
absent / difficult). `load_features` memory-maps the feature matrices of any uncompressed `.npz` (features
are never copied per class or per process); a compressed one is read into memory. A `.json` sidecar beside
the file (what the feature cache writes) is returned as `FeatureSet.meta`.
"""
from __future__ import annotations

import json
import os
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mocobench.core.errors import FeatureFileError

FEATURE_KEYS = ("train_feats", "train_labels", "test_feats", "test_labels")


def write_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """An uncompressed `.npz` (np.load-compatible), written atomically and streamed array by array, so
    memory-mapped inputs are never loaded whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)
    os.replace(tmp, path)
    return path


def _npz_member(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, mmap: bool) -> np.ndarray:
    """One array of an .npz: memory-mapped when stored uncompressed (np.savez / write_npz), else read.

    The zip local header (30 bytes + file name + extra field) precedes the member's `.npy` bytes; the
    `.npy` header gives shape, order and dtype, and the data follows it."""
    if mmap and info.compress_type == zipfile.ZIP_STORED:
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
            if local[:4] != b"PK\x03\x04":
                raise FeatureFileError(f"{path}: corrupt zip entry {info.filename}")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            f.seek(info.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(f)
            if version in ((1, 0), (2, 0)):
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read(f)
                if not dtype.hasobject:
                    return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=f.tell(),
                                     order="F" if fortran else "C")
    with zf.open(info) as f:
        return np.lib.format.read_array(f, allow_pickle=False)


@dataclass
class FeatureSet:
    """Features of a file: float32 matrices (memory-mapped where possible) and small in-memory label arrays."""
    train_feats: np.ndarray
    train_labels: np.ndarray
    test_feats: np.ndarray
    test_labels: np.ndarray
    class_names: list[str] | None = None
    path: Path | None = None
    meta: dict = field(default_factory=dict)

    @property
    def multilabel(self) -> bool:
        return self.train_labels.ndim == 2


def _as_int_labels(path: Path, key: str, labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise FeatureFileError(f"{path}: {key} must hold integer class ids, found non-integer values")
    elif labels.dtype.kind not in "iub":
        raise FeatureFileError(f"{path}: {key} has dtype {labels.dtype}; expected integers")
    return labels.astype(np.int64)


def load_features(path: str | Path, mmap: bool = True) -> FeatureSet:
    """Read a feature file: an `.npz` with train_feats, train_labels, test_feats, test_labels (optional
    class_names), or a directory holding `features.npz` (what `mocobench eval extract` writes).

    Checks the shapes and label conventions and raises FeatureFileError naming the file and the problem.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "features.npz"
    if not path.is_file():
        raise FeatureFileError(f"feature file {path} not found; expected a .npz with {', '.join(FEATURE_KEYS)}")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise FeatureFileError(f"{path} is not a .npz file ({e}); expected np.savez output with "
                               f"{', '.join(FEATURE_KEYS)}") from None
    with zf:
        members = {Path(i.filename).stem: i for i in zf.infolist() if i.filename.endswith(".npy")}
        missing = [k for k in FEATURE_KEYS if k not in members]
        if missing:
            raise FeatureFileError(f"{path} lacks arrays {missing}; found {sorted(members)}, expected "
                                   f"{', '.join(FEATURE_KEYS)} (+ optional class_names)")
        try:
            arrays = {k: _npz_member(path, zf, members[k], mmap and k.endswith("feats")) for k in FEATURE_KEYS}
            names = (_npz_member(path, zf, members["class_names"], False) if "class_names" in members else None)
        except ValueError as e:
            raise FeatureFileError(f"{path}: unreadable array ({e}); object arrays are not allowed") from None
    for split in ("train", "test"):
        feats = arrays[f"{split}_feats"]
        if feats.ndim != 2:
            raise FeatureFileError(f"{path}: {split}_feats has shape {feats.shape}; expected N x D")
        if feats.dtype != np.float32:
            if feats.dtype.kind != "f":
                raise FeatureFileError(f"{path}: {split}_feats has dtype {feats.dtype}; expected float32")
            arrays[f"{split}_feats"] = np.asarray(feats, dtype=np.float32)  # a copy: write float32 to avoid it
        labels = _as_int_labels(path, f"{split}_labels", arrays[f"{split}_labels"])
        if labels.ndim not in (1, 2) or len(labels) != len(feats):
            raise FeatureFileError(f"{path}: {split}_labels has shape {labels.shape} for {len(feats)} {split} "
                                   f"features; expected ({len(feats)},) class ids or ({len(feats)}, C) multi-label")
        arrays[f"{split}_labels"] = labels
    tr, te = arrays["train_labels"], arrays["test_labels"]
    if arrays["train_feats"].shape[1] != arrays["test_feats"].shape[1]:
        raise FeatureFileError(f"{path}: train_feats are {arrays['train_feats'].shape[1]}-d but test_feats "
                               f"{arrays['test_feats'].shape[1]}-d")
    if tr.ndim != te.ndim or (tr.ndim == 2 and tr.shape[1] != te.shape[1]):
        raise FeatureFileError(f"{path}: train_labels {tr.shape} and test_labels {te.shape} disagree in kind")
    if tr.ndim == 2 and not (np.isin(tr, (-1, 0, 1)).all() and np.isin(te, (-1, 0, 1)).all()):
        raise FeatureFileError(f"{path}: multi-label labels must be 1 (present), 0 (absent) or -1 (difficult)")
    if tr.ndim == 1 and (tr.min(initial=0) < 0 or te.min(initial=0) < 0):
        raise FeatureFileError(f"{path}: single-label class ids must be >= 0")
    class_names = [str(n) for n in names.tolist()] if names is not None else None
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return FeatureSet(**arrays, class_names=class_names, path=path, meta=meta)
