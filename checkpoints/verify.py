"""Pre-flight check of a checkpoint before expensive stages run on it (`mocobench inspect --verify`, and a
sweep's third-party `checkpoints` before submission).

A backbone that loads "successfully" can still be wrong: keys matched to nothing, BN statistics never
loaded, weights of another model. Checked, in order: the file loads safely and its format is detected
(unmatched backbone keys are errors there, checkpoints/formats.py); it builds the torchvision ResNet with
only `fc` missing (checkpoints/models.py); its BN layers carry statistics other than the initial
mean 0 / var 1; a weighted kNN (core/knn.py, k = 20) on a small class-balanced slice of an ImageFolder
(default: the embedded demo data) beats the same architecture at random init.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.datasets import ImageFolder

from mocobench.checkpoints.models import model_from_checkpoint
from mocobench.checkpoints.random_init import random_model
from mocobench.core.backbones import SMALL_SUFFIX
from mocobench.core.images import load_rgb
from mocobench.core.knn import knn_accuracy
from mocobench.core.transforms import eval_transform
from mocobench.core.vit import is_vit, vit_shape

K = 20


@dataclass
class Verdict:
    checkpoint: str
    arch: str
    width: int
    knn_top1: float | None = None
    random_top1: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def untouched_bn(model: nn.Module) -> bool:
    """Whether every BN layer still has its initial running statistics (mean 0, var 1)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    return bool(bns) and all(torch.all(m.running_mean == 0) and torch.all(m.running_var == 1) for m in bns)


def _balanced(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class]
                                   for c in np.unique(labels)]))


@torch.no_grad()
def _features(model: nn.Module, data, batch_size: int = 100) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    head, model.fc = model.fc, nn.Identity()
    feats, labels = [], []
    for images, target in torch.utils.data.DataLoader(data, batch_size=batch_size):
        feats.append(model(images))
        labels.append(target)
    model.fc = head
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


def knn_on(model: nn.Module, root: Path, size: int, per_class: int, seed: int = 0) -> float:
    """kNN top-1 (%) of `model`'s pooled features: a class-balanced bank from `root/train`, queries from
    `root/val` (or held-out train images when there is no val/)."""
    transform = eval_transform(int(size * 8 / 7), size)
    train = ImageFolder(str(root / "train"), transform=transform, loader=load_rgb)
    rng = np.random.default_rng(seed)
    labels = np.array(train.targets)
    if (root / "val").is_dir():
        val = ImageFolder(str(root / "val"), transform=transform, loader=load_rgb)
        bank, queries = (torch.utils.data.Subset(train, _balanced(labels, per_class, rng)),
                         torch.utils.data.Subset(val, _balanced(np.array(val.targets), per_class // 2, rng)))
    else:
        idx = _balanced(labels, per_class + per_class // 2, rng)
        bank = torch.utils.data.Subset(train, idx[: len(idx) * 2 // 3])
        queries = torch.utils.data.Subset(train, idx[len(idx) * 2 // 3:])
    return knn_accuracy(*_features(model, bank), *_features(model, queries), ks=(K,))[f"k{K}/top1"]


def verify(checkpoint: str | Path, data: str | Path | None = None, per_class: int = 40, trust: bool = False,
           seed: int = 0) -> Verdict:
    """Run the checks of the module docstring; CheckpointError for a file that does not load at all."""
    model, ckpt = model_from_checkpoint(checkpoint, trust=trust)
    verdict = Verdict(str(checkpoint), ckpt.arch, ckpt.width)
    if untouched_bn(model):
        verdict.problems.append("every BN layer has its initial statistics (mean 0, var 1): the weights look "
                                "untrained or were not loaded")
    if data is None:
        from mocobench.core.demo_data import ensure_demo_data
        data = ensure_demo_data().imagefolder
    # small-image archs (the demo's 32 px crops): *_small ResNets and ViTs made for 32 px (vit_demo)
    size = 32 if ckpt.arch.endswith(SMALL_SUFFIX) or (is_vit(ckpt.arch) and vit_shape(ckpt.arch)[4] <= 32) else 112
    verdict.knn_top1 = knn_on(model, Path(data), size, per_class, seed)
    torch.manual_seed(seed)
    random, _ = random_model(ckpt.arch, ckpt.width)
    verdict.random_top1 = knn_on(random, Path(data), size, per_class, seed)
    if verdict.knn_top1 <= verdict.random_top1:
        verdict.problems.append(f"kNN top-1 {verdict.knn_top1:.1f} % is no better than the same architecture at "
                                f"random init ({verdict.random_top1:.1f} %): wrong weights, or a half-loaded "
                                "backbone")
    return verdict
