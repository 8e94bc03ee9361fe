"""Frozen-backbone feature extraction at any layer, and the feature cache shared by kNN, SVM, low-shot and
fast linear evaluation.

Layers (MMSelfSup `MultiPooling` / VISSL naming: feature1 = stem, feature2..5 = res2..res5):

  feature1..feature5  MMSelfSup's linear-eval pooling (openselfsup/models/utils/multi_pooling.py): for a
                      ResNet-50 at 224 px ("specified") AvgPool k10/s10/p4, k16/s8, k13/s5, k8/s3, k6/s1 on
                      the 112/56/28/14/7 px maps -> 9216/9216/8192/9216/8192-d; any other map size uses the
                      same output grids 12/6/4/3/2 with adaptive average pooling.
  avgpool             global average pool of res5 (2048-d for ResNet-50): what main_lincls.py and kNN use.
  voc_svm             res5 -> AvgPool2d(6, stride 1) (8192-d at 224 px), the VOC07 SVM feature of VISSL and
                      MMSelfSup; maps smaller than 6 px (small-image demo models) use a 2x2 adaptive pool.

The backbone runs in eval() mode (BN uses its running statistics) under no_grad, fp32 by default; `amp`
gives bf16 autocast (a fast path whose deviation from fp32 is bounded by a test).

Cache: one uncompressed `.npz` per (checkpoint md5, dataset, layer, transform, precision) under
`cache_dir/<md5>/<dataset>/<layer>_<transform>_<precision>.npz`, with a `.json` sidecar (fingerprints of the
image lists, timings, peak RSS). The `.npz` holds float32 `train_feats` (N x D), `train_labels`, `test_feats`,
`test_labels` and optionally `class_names`; labels are a 1-d int vector (single-label) or N x C in {1, 0, -1}
(VOC: present / absent / difficult). `load_features` memory-maps the feature matrices of any uncompressed
`.npz` (features are never copied per class or per process); a compressed one is read into memory.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import struct
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pretrain.augment import eval_transform
from pretrain.distributed import amp_dtype
from pretrain.config import ConfigError, option, to_dict
from pretrain.data import DataError
from results.records import now_iso, write_metrics

FEATURE_LAYERS = ("feature1", "feature2", "feature3", "feature4", "feature5", "avgpool", "voc_svm")
STAGE_OF_LAYER = {"feature1": 0, "feature2": 1, "feature3": 2, "feature4": 3, "feature5": 4, "avgpool": 4,
                  "voc_svm": 4}
# MMSelfSup MultiPooling for ResNet-50 at 224 px: map size -> (kernel, stride, padding), and output grids.
SPECIFIED_POOL = {0: (112, (10, 10, 4)), 1: (56, (16, 8, 0)), 2: (28, (13, 5, 0)), 3: (14, (8, 3, 0)),
                  4: (7, (6, 1, 0))}
POOL_SIZES = (12, 6, 4, 3, 2)
FEATURE_KEYS = ("train_feats", "train_labels", "test_feats", "test_labels")
DEFAULT_CACHE = Path(os.environ.get("MOCOBENCH_CACHE", Path.home() / ".cache" / "mocobench")) / "features"


class FeatureFileError(ValueError):
    """A feature file that cannot be used; the message names the file and what was expected."""


# --- layers and pooling ---------------------------------------------------------------------------------
def check_layer(layer: str) -> str:
    if layer not in FEATURE_LAYERS:
        raise ConfigError(f"unknown feature layer {layer!r}; choose one of {', '.join(FEATURE_LAYERS)}")
    return layer


def stage_maps(model: nn.Module, x: torch.Tensor, upto: int) -> list[torch.Tensor]:
    """Feature maps of a torchvision ResNet: [stem (conv1-bn1-relu, before max-pool), res2, .., res5],
    computed only up to stage index `upto` (0 = stem)."""
    x = model.relu(model.bn1(model.conv1(x)))
    maps = [x]
    x = model.maxpool(x)
    for i in range(1, upto + 1):
        x = getattr(model, f"layer{i}")(x)
        maps.append(x)
    return maps


def pool_map(layer: str, fmap: torch.Tensor) -> torch.Tensor:
    """The pooled (N, C, h, w) map a layer's features are made of (see the module docstring)."""
    if layer == "avgpool":
        return F.adaptive_avg_pool2d(fmap, 1)
    if layer == "voc_svm":
        if min(fmap.shape[-2:]) >= 6:
            return F.avg_pool2d(fmap, kernel_size=6, stride=1)
        return F.adaptive_avg_pool2d(fmap, 2)
    stage = STAGE_OF_LAYER[layer]
    size, (k, s, p) = SPECIFIED_POOL[stage]
    if tuple(fmap.shape[-2:]) == (size, size):
        return F.avg_pool2d(fmap, kernel_size=k, stride=s, padding=p)
    return F.adaptive_avg_pool2d(fmap, POOL_SIZES[stage])


class LayerFeatures(nn.Module):
    """Pooled feature maps {layer: (N, C, h, w)} of a frozen torchvision ResNet (runs only the stages needed)."""

    def __init__(self, backbone: nn.Module, layers: list[str] | tuple[str, ...]):
        super().__init__()
        self.backbone = backbone
        self.layers = [check_layer(layer) for layer in layers]
        self.upto = max(STAGE_OF_LAYER[layer] for layer in self.layers)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        maps = stage_maps(self.backbone, x, self.upto)
        return {layer: pool_map(layer, maps[STAGE_OF_LAYER[layer]]) for layer in self.layers}


@torch.no_grad()
def extract(model: nn.Module, dataset, layer: str, batch_size: int = 256, workers: int = 4, amp: bool = False,
            device: torch.device | None = None, out_path: str | Path | None = None,
            desc: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Features of every item of `dataset` (items: (image tensor, label)) at `layer`, in dataset order.

    Returns (float32 N x D features, labels as an int64 vector or N x C matrix). With `out_path` the features
    are written to a `.npy` memory map there instead of RAM. The model is put in eval() mode.
    """
    check_layer(layer)
    device = device or next(model.parameters()).device
    model.eval()
    net = LayerFeatures(model, [layer])
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    feats, labels, pos = None, [], 0
    for images, targets in tqdm(loader, desc=desc or f"extract {layer}", disable=None, leave=False):
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype(device), enabled=amp):
            f = net(images)[layer]
        f = f.float().flatten(1).cpu().numpy()
        if feats is None:
            shape = (len(dataset), f.shape[1])
            feats = (np.lib.format.open_memmap(out_path, mode="w+", dtype=np.float32, shape=shape)
                     if out_path is not None else np.empty(shape, dtype=np.float32))
        feats[pos:pos + len(f)] = f
        pos += len(f)
        labels.append(np.asarray(targets))
    if feats is None:
        raise DataError(f"cannot extract features from an empty dataset ({getattr(dataset, 'root', dataset)})")
    if isinstance(feats, np.memmap):
        feats.flush()
    return feats, np.concatenate(labels).astype(np.int64)


# --- .npz files: streamed writing, memory-mapped reading ------------------------------------------------
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
    """One array of an .npz: memory-mapped when stored uncompressed (np.savez / write_npz), else read."""
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
    """Cached features: float32 matrices (memory-mapped where possible) and small in-memory label arrays."""
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


# --- the cache ------------------------------------------------------------------------------------------
def peak_rss_mb() -> dict[str, float]:
    """Peak resident memory so far (MiB) of this process and of its finished children (loader workers)."""
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20  # ru_maxrss: KiB on Linux, bytes on macOS
    return {"self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
            "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale}


def check_checkpoint(checkpoint: str | Path) -> bool:
    """True for a `random:ARCH[:WIDTH]` spec, True for an existing file, else a CheckpointError."""
    from pretrain.checkpoints import CheckpointError, parse_random_spec
    if parse_random_spec(str(checkpoint)) is not None or Path(checkpoint).is_file():
        return True
    raise CheckpointError(f"checkpoint {checkpoint} not found; expected a checkpoint file or random:ARCH[:WIDTH]")


def checkpoint_key(checkpoint: str | Path, seed: int = 0) -> str:
    """md5 of the checkpoint file; for a `random:ARCH[:WIDTH]` spec, md5 of the spec and the init seed."""
    from pretrain.checkpoints import parse_random_spec
    from results.records import file_md5
    check_checkpoint(checkpoint)
    if parse_random_spec(str(checkpoint)) is not None:
        return hashlib.md5(f"{checkpoint}|seed={seed}".encode()).hexdigest()
    return file_md5(checkpoint)


def _fingerprint(ds) -> str:
    return ds.fingerprint() if hasattr(ds, "fingerprint") else f"len={len(ds)}"


def load_frozen_backbone(checkpoint: str | Path, seed: int = 0, device: torch.device | None = None) -> nn.Module:
    """The checkpoint's backbone as a torchvision ResNet in eval() mode, every parameter frozen."""
    from pretrain.checkpoints import build_model
    torch.manual_seed(seed)  # only matters for random:ARCH specs
    model, _ = build_model(checkpoint)
    model.requires_grad_(False)
    return model.to(device or torch.device("cpu")).eval()


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


# --- the config every feature-based evaluator shares ----------------------------------------------------
SPLITS = {"imagefolder": ("train", "val"), "voc": ("trainval", "test")}


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
    resize: int = option(256, "Resize (shorter side) before the center crop")
    crop: int = option(224, "CenterCrop size")
    batch_size: int = option(256, "extraction batch size")
    workers: int = option(4, "data loader workers")
    amp: bool = option(False, "bf16 autocast extraction (fast path, not the reference fp32 protocol)")
    seed: int = option(0, "random seed (initialises random:ARCH baselines)")
    cache_dir: str = option("", f"feature cache directory (default $MOCOBENCH_CACHE/features or {DEFAULT_CACHE})")
    refresh: bool = option(False, "re-extract even when cached")


def dataset_name(data: str, kind: str, train_split: str, test_split: str) -> str:
    """Cache directory name of a dataset: kind, splits and (for a path) its location."""
    where = "demo" if data == "demo" else f"{Path(data).name}-{hashlib.md5(str(Path(data).resolve()).encode()).hexdigest()[:8]}"
    return f"{kind}-{where}-{train_split}-{test_split}"


def build_datasets(data: str, kind: str, train_split: str, test_split: str, transform):
    from evaluate import datasets
    if kind not in SPLITS:
        raise ConfigError(f"unknown dataset layout {kind!r}; expected one of {', '.join(SPLITS)}")
    root = datasets.resolve_data(data, kind)
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
    check_checkpoint(cfg.checkpoint)
    train_split, test_split = cfg.train_split or SPLITS[cfg.dataset][0], cfg.test_split or SPLITS[cfg.dataset][1]
    transform = eval_transform(cfg.resize, cfg.crop)
    train_ds, test_ds = build_datasets(cfg.data, cfg.dataset, train_split, test_split, transform)
    return cached_features(cfg.checkpoint, dataset_name(cfg.data, cfg.dataset, train_split, test_split),
                           train_ds, test_ds, cfg.layer, f"resize{cfg.resize}_crop{cfg.crop}", cfg.cache_dir or None,
                           batch_size=cfg.batch_size, workers=cfg.workers, amp=cfg.amp, seed=cfg.seed,
                           refresh=cfg.refresh)


# --- `mocobench eval extract` ---------------------------------------------------------------------------
@dataclass
class ExtractConfig(FeatureSourceConfig):
    """Extract (or reuse cached) features and export them as OUT/features.npz."""
    out: str = option("runs/extract", "run directory: features.npz (a link to the cache entry) and metrics.json")


def link_or_copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
    return dst


def run_extract(cfg: ExtractConfig) -> dict:
    start = now_iso()
    check_layer(cfg.layer)
    if cfg.features:
        raise ConfigError("extract makes a features file; --features is for the evaluators that read one")
    path = resolve_features(cfg)
    fs = load_features(path)
    out = link_or_copy(path, Path(cfg.out) / "features.npz")
    meta = fs.meta
    metrics = {"n_train": len(fs.train_feats), "n_test": len(fs.test_feats), "dim": fs.train_feats.shape[1],
               "seconds": meta.get("seconds", float("nan")), "images_per_s": meta.get("images_per_s", float("nan")),
               "peak_rss_mb": meta.get("peak_rss_mb", {}).get("self", float("nan")),
               "details": {"cache": str(path), "features": str(out), "extracted_at": meta.get("created")}}
    ckpt = cfg.checkpoint if Path(cfg.checkpoint).is_file() else None
    write_metrics(cfg.out, stage="eval", benchmark="extract", metrics=metrics, config=to_dict(cfg), start=start,
                  checkpoint=ckpt, checkpoint_md5=meta.get("checkpoint_key") if ckpt else None)
    print(f"features: {out} ({metrics['n_train']} train + {metrics['n_test']} test, {metrics['dim']}-d)")
    return metrics


run = run_extract  # the evaluator convention: run(cfg) -> metrics
CONFIG_DIR = Path(__file__).parent / "configs"


def main(argv: list[str]) -> int:
    from evaluate.cli import run_evaluator
    return run_evaluator(ExtractConfig, run_extract, argv, "mocobench eval extract",
                         "Extract frozen-backbone features at one layer (cached per checkpoint/dataset/layer/transform).",
                         CONFIG_DIR / "extract")
