"""The feature cache shared by kNN, SVM, low-shot and fast linear evaluation, and `FeatureSourceConfig`,
the options those evaluators take to say where their features come from.

One uncompressed `.npz` (evaluate/feature_file.py) per (checkpoint md5, dataset, layer, transform,
precision) under `cache_dir/<md5>/<dataset>/<layer>_<transform>_<precision>.npz`, with a `.json` sidecar
(fingerprints of the image lists, timings, peak RSS). An entry is extracted on first use and again when the
dataset's image lists no longer match the sidecar's fingerprints.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mocobench.checkpoints.random_init import parse_random_spec
from mocobench.core.config import option
from mocobench.core.errors import ConfigError, DataError
from mocobench.core.records import file_md5, now_iso
from mocobench.evaluate.feature_file import write_npz
from mocobench.evaluate.layers import FEATURE_LAYERS, check_layer, extract, load_frozen_backbone
from mocobench.evaluate.report import check_checkpoint, peak_rss_mb

DEFAULT_CACHE = Path(os.environ.get("MOCOBENCH_CACHE", Path.home() / ".cache" / "mocobench")) / "features"
SPLITS = {"imagefolder": ("train", "val"), "voc": ("trainval", "test")}


def checkpoint_key(checkpoint: str | Path, seed: int = 0) -> str:
    """md5 of the checkpoint file; for a `random:ARCH[:WIDTH]` spec, md5 of the spec and the init seed."""
    check_checkpoint(checkpoint)
    if parse_random_spec(str(checkpoint)) is not None:
        return hashlib.md5(f"{checkpoint}|seed={seed}".encode()).hexdigest()
    return file_md5(checkpoint)


def _fingerprint(ds) -> str:
    return ds.fingerprint() if hasattr(ds, "fingerprint") else f"len={len(ds)}"


def cached_features(checkpoint: str | Path, dataset_name: str, train_ds, test_ds, layer: str, transform_id: str,
                    cache_dir: str | Path | None = None, *, model: nn.Module | None = None, batch_size: int = 256,
                    workers: int = 4, amp: bool = False, seed: int = 0, refresh: bool = False) -> Path:
    """Path of the cached features of (checkpoint, dataset, layer, transform, precision), extracting them
    first when absent or when the dataset's image lists changed (fingerprints in the sidecar)."""
    key = checkpoint_key(checkpoint, seed)
    precision = "bf16" if amp else "fp32"
    path = Path(cache_dir or DEFAULT_CACHE) / key / dataset_name / f"{check_layer(layer)}_{transform_id}_{precision}.npz"
    meta_path = path.with_suffix(".json")
    fps = {"train_fingerprint": _fingerprint(train_ds), "test_fingerprint": _fingerprint(test_ds)}
    if path.is_file() and meta_path.is_file() and not refresh:
        meta = json.loads(meta_path.read_text())
        if all(meta.get(k) == v for k, v in fps.items()):
            print(f"features: reusing cache {path}", flush=True)
            return path
        print(f"features: dataset changed since {path} was made; extracting again", flush=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = (model or load_frozen_backbone(checkpoint, seed, device)).to(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0, tmp = time.time(), {}
    try:
        arrays = {}
        for split, ds in (("train", train_ds), ("test", test_ds)):
            tmp[split] = path.with_name(f".{path.stem}.{split}.{os.getpid()}.npy")
            arrays[f"{split}_feats"], arrays[f"{split}_labels"] = extract(
                model, ds, layer, batch_size, workers, amp, device, tmp[split], desc=f"extract {layer} {split}")
        seconds = time.time() - t0
        names = getattr(train_ds, "classes", None)
        if names:
            arrays["class_names"] = np.array([str(n) for n in names])
        write_npz(path, arrays)
    finally:
        for p in tmp.values():
            p.unlink(missing_ok=True)
    n = len(train_ds) + len(test_ds)
    meta = {"checkpoint": str(checkpoint), "checkpoint_key": key, "dataset": dataset_name, "layer": layer,
            "transform": transform_id, "precision": precision, **fps, "n_train": len(train_ds),
            "n_test": len(test_ds), "dim": int(arrays["train_feats"].shape[1]), "seconds": seconds,
            "images_per_s": n / max(seconds, 1e-9), "peak_rss_mb": peak_rss_mb(), "created": now_iso()}
    meta_path.write_text(json.dumps(meta, indent=2))
    rss = meta["peak_rss_mb"]
    print(f"features: {n} images -> {meta['dim']}-d {layer} in {seconds:.1f}s ({meta['images_per_s']:.1f} img/s); "
          f"peak RSS {rss['self']:.0f} MiB (workers {rss['children']:.0f} MiB); cached at {path}", flush=True)
    return path


@dataclass
class FeatureSourceConfig:
    """Where features come from: a `.npz` (`features`), or a checkpoint + dataset, extracted once and cached.
    Evaluators that work on features subclass this (and may override `layer`/`dataset`/`out` defaults)."""
    checkpoint: str = option("", "checkpoint path (any format `mocobench inspect` reads) or random:ARCH[:WIDTH]")
    data: str = option("demo", "'demo' (embedded dataset) or the dataset root (ImageFolder root / VOC2007 devkit)")
    dataset: str = option("imagefolder", "dataset layout: imagefolder (train/ + val/) or voc (VOC2007 devkit)")
    features: str = option("", "a features .npz (train_feats, train_labels, test_feats, test_labels); skips extraction")
    layer: str = option("avgpool", f"feature layer: {', '.join(FEATURE_LAYERS)}")
    train_split: str = option("", "train split (default: train for imagefolder, trainval for voc)")
    test_split: str = option("", "test split (default: val for imagefolder, test for voc)")
    image_transform: str = option("center_crop", "center_crop (Resize + CenterCrop, main_lincls.py) | resize "
                                  "(Resize + Resize((crop, crop)), VISSL VOC07 SVM) | square (Resize((crop, crop)), "
                                  "VISSL low-shot); core/transforms.py")
    resize: int = option(256, "Resize (shorter side) first (center_crop, resize)", at_least=8)
    crop: int = option(224, "input size: CenterCrop size, or the square side", at_least=8)
    batch_size: int = option(256, "extraction batch size", at_least=1)
    workers: int = option(4, "data loader workers", at_least=0)
    amp: bool = option(False, "bf16 autocast extraction (fast path, not the reference fp32 protocol)")
    seed: int = option(0, "random seed (initialises random:ARCH baselines)")
    cache_dir: str = option("", f"feature cache directory (default $MOCOBENCH_CACHE/features or {DEFAULT_CACHE})")
    refresh: bool = option(False, "re-extract even when cached")
    force: bool = option(False, "start afresh when --out holds another run: move the old folder aside to OUT.replaced-<time>")


def dataset_name(data: str, kind: str, train_split: str, test_split: str) -> str:
    """Cache directory name of a dataset: kind, splits and (for a path) its location."""
    where = "demo" if data == "demo" else f"{Path(data).name}-{hashlib.md5(str(Path(data).resolve()).encode()).hexdigest()[:8]}"
    return f"{kind}-{where}-{train_split}-{test_split}"


def splits_of(kind: str, train_split: str = "", test_split: str = "") -> tuple[str, str]:
    """(train, test) split names of a dataset layout; empty names take the layout's defaults."""
    if kind not in SPLITS:
        raise ConfigError(f"unknown dataset layout {kind!r}; expected one of {', '.join(SPLITS)}")
    return train_split or SPLITS[kind][0], test_split or SPLITS[kind][1]


def build_datasets(data: str, kind: str, train_split: str, test_split: str, transform):
    from mocobench.evaluate import datasets  # torchvision: only when images are read
    splits_of(kind)
    root = datasets.dataset_root(data, kind)
    reader = datasets.image_folder if kind == "imagefolder" else datasets.voc2007
    train_ds = reader(root, train_split, transform)
    test_ds = reader(root, test_split, transform)
    if kind == "voc" and train_ds.class_names != test_ds.class_names:
        raise DataError(f"{root}: {train_split} and {test_split} have different class lists "
                        f"({train_ds.class_names} vs {test_ds.class_names})")
    return train_ds, test_ds


def resolve_features(cfg: FeatureSourceConfig) -> Path:
    """The `.npz` an evaluator should read: `cfg.features` if given, else the cache entry for the checkpoint
    (extracted on first use)."""
    if cfg.features:
        return Path(cfg.features)
    if not cfg.checkpoint:
        raise ConfigError("give --checkpoint (to extract features) or --features FILE.npz")
    from mocobench.core.transforms import IMAGE_TRANSFORMS, eval_transform, transform_id  # torchvision, as above
    check_checkpoint(cfg.checkpoint)
    train_split, test_split = splits_of(cfg.dataset, cfg.train_split, cfg.test_split)
    if cfg.image_transform not in IMAGE_TRANSFORMS:
        raise ConfigError(f"image_transform={cfg.image_transform!r}; expected one of {', '.join(IMAGE_TRANSFORMS)}")
    transform = eval_transform(cfg.resize, cfg.crop, cfg.image_transform)
    train_ds, test_ds = build_datasets(cfg.data, cfg.dataset, train_split, test_split, transform)
    return cached_features(cfg.checkpoint, dataset_name(cfg.data, cfg.dataset, train_split, test_split),
                           train_ds, test_ds, cfg.layer, transform_id(cfg.resize, cfg.crop, cfg.image_transform),
                           cfg.cache_dir or None,
                           batch_size=cfg.batch_size, workers=cfg.workers, amp=cfg.amp, seed=cfg.seed,
                           refresh=cfg.refresh)
