"""The kNN monitor: how well the query encoder's features separate classes, measured while pretraining.

Weighted kNN (core/knn.py: k = 20, T = 0.07, cosine; InstDisc, Wu et al. 2018, §3.4, the monitor of the
MoCo CIFAR colab) on the pooled backbone features (the projection head left out), with the evaluation
transform Resize(size·8/7) + CenterCrop(size) at the pretraining crop size. The memory bank is a fixed,
seeded, class-balanced draw of the train images; the queries are the `val/` split next to `train/` when
there is one, else a held-out slice of train that the bank never contains. The labels are only read here:
pretraining itself never sees them. A run that learns nothing shows it after its first epochs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.datasets import ImageFolder

from mocobench.core.images import load_rgb
from mocobench.core.knn import knn_accuracy
from mocobench.core.transforms import eval_transform

K, T = 20, 0.07


def _balanced(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Up to `n` indices, as equal per class as the classes allow, in a seeded order."""
    order = rng.permutation(len(labels))
    by_class = [order[labels[order] == c] for c in np.unique(labels)]
    picked, depth = [], 0
    while len(picked) < n and any(depth < len(idx) for idx in by_class):
        picked += [idx[depth] for idx in by_class if depth < len(idx)]
        depth += 1
    return np.sort(np.array(picked[:n], dtype=np.int64))


class KNNMonitor:
    """`monitor(encoder, device, amp) -> kNN top-1 (%)`; builds its two image lists once."""

    def __init__(self, train_root: Path, image_size: int, max_images: int = 2000, seed: int = 0,
                 batch_size: int = 256, workers: int = 0):
        transform = eval_transform(int(image_size * 8 / 7), image_size)
        train = ImageFolder(str(train_root), transform=transform, loader=load_rgb)
        rng = np.random.default_rng(seed)
        labels = np.array(train.targets)
        val_root = Path(train_root).parent / "val"
        if val_root.is_dir() and Path(train_root).name == "train":
            val = ImageFolder(str(val_root), transform=transform, loader=load_rgb)
            if val.classes != train.classes:
                raise ValueError(f"{val_root}: classes differ from {train_root}; expected the same class folders")
            self.bank = torch.utils.data.Subset(train, _balanced(labels, max_images, rng))
            self.queries = torch.utils.data.Subset(val, _balanced(np.array(val.targets), max_images // 2, rng))
            self.source = f"{len(self.bank)} train images vs {len(self.queries)} of val/"
        else:  # hold out a slice of train: a tenth, at most half the bank's size
            held = _balanced(labels, min(len(labels) // 10, max_images // 2), rng)
            rest = np.setdiff1d(np.arange(len(labels)), held)
            self.bank = torch.utils.data.Subset(train, rest[_balanced(labels[rest], max_images, rng)])
            self.queries = torch.utils.data.Subset(train, held)
            self.source = f"{len(self.bank)} train images vs a held-out {len(self.queries)}"
        self.batch_size, self.workers = batch_size, workers

    @torch.no_grad()
    def features(self, backbone: nn.Module, data, device: torch.device, amp: bool) -> tuple[np.ndarray, np.ndarray]:
        loader = torch.utils.data.DataLoader(data, batch_size=self.batch_size, num_workers=self.workers,
                                             generator=torch.Generator().manual_seed(0))  # not the global RNG
        feats, labels = [], []
        for images, target in loader:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                feats.append(backbone(images.to(device)).float().cpu())
            labels.append(target)
        return torch.cat(feats).numpy(), torch.cat(labels).numpy()

    def __call__(self, encoder: nn.Module, device: torch.device, amp: bool = False) -> float:
        """kNN top-1 (%) of `encoder`'s pooled features (its `fc` head is bypassed for the call)."""
        was_training, head = encoder.training, encoder.fc
        encoder.eval()
        encoder.fc = nn.Identity()
        try:
            bank = self.features(encoder, self.bank, device, amp)
            queries = self.features(encoder, self.queries, device, amp)
        finally:
            encoder.fc = head
            encoder.train(was_training)
        return knn_accuracy(*bank, *queries, ks=(K,), T=T, device=device)[f"k{K}/top1"]
