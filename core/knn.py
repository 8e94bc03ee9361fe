"""Weighted kNN classification (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination", zhirongw/lemniscate.pytorch `lib/utils.py::kNN`; the same as DINO's `eval_knn.py`):
L2-normalise train and test features; for a test feature take the k train features of highest cosine
similarity s_i; each votes for its class with weight exp(s_i / T); the prediction ranks classes by total
vote. Used by `mocobench eval knn` and by the kNN monitor of pretraining.

Memory: the train matrix is read in chunks (it may be a memory map of any size); only the running top-k
neighbours of every test point are kept.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mocobench.core.errors import FeatureFileError


@torch.no_grad()
def nearest_neighbours(train_feats: np.ndarray, test_feats: np.ndarray, k: int, chunk: int = 8192,
                       test_chunk: int = 1024, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities, indices), each (N_test, k) sorted by decreasing cosine similarity, of the k nearest
    train features; the train matrix is streamed in chunks of `chunk` rows."""
    device = device or torch.device("cpu")
    test = F.normalize(torch.from_numpy(np.array(test_feats, dtype=np.float32)).to(device), dim=1)
    n_test, k = len(test), min(k, len(train_feats))
    top_sim = torch.full((n_test, k), -float("inf"), device=device)
    top_idx = torch.zeros((n_test, k), dtype=torch.long, device=device)
    for start in tqdm(range(0, len(train_feats), chunk), desc="knn", disable=None, leave=False):
        block = torch.from_numpy(np.array(train_feats[start:start + chunk], dtype=np.float32))  # chunk copy
        block = F.normalize(block.to(device), dim=1)
        ids = torch.arange(start, start + len(block), device=device)
        for t in range(0, n_test, test_chunk):
            sim = test[t:t + test_chunk] @ block.T
            cand_sim = torch.cat([top_sim[t:t + test_chunk], sim], dim=1)
            cand_idx = torch.cat([top_idx[t:t + test_chunk], ids.expand(len(sim), -1)], dim=1)
            best, pos = cand_sim.topk(k, dim=1)
            top_sim[t:t + test_chunk], top_idx[t:t + test_chunk] = best, cand_idx.gather(1, pos)
    return top_sim, top_idx


def weighted_votes(sims: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int, T: float) -> torch.Tensor:
    """(N, num_classes) class scores: sum over neighbours of exp(similarity / T) for the neighbour's class."""
    weights = (sims / T).exp()
    votes = torch.zeros(len(sims), num_classes, dtype=weights.dtype, device=sims.device)
    return votes.scatter_add_(1, neighbour_labels, weights)


def knn_accuracy(train_feats: np.ndarray, train_labels: np.ndarray, test_feats: np.ndarray,
                 test_labels: np.ndarray, ks=(20, 200), T: float = 0.07, chunk: int = 8192,
                 device: torch.device | None = None) -> dict[str, float]:
    """`k{K}/top1` and `k{K}/top5` (percent) of weighted kNN for each K (capped at the train set size)."""
    if np.ndim(train_labels) != 1:
        raise FeatureFileError("kNN needs single-label features (1-d class ids); these labels are multi-label")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sims, idx = nearest_neighbours(train_feats, test_feats, max(ks), chunk=chunk, device=device)
    train_y = torch.as_tensor(np.asarray(train_labels), device=device)
    test_y = torch.as_tensor(np.asarray(test_labels), device=device)
    num_classes = int(max(train_y.max().item(), test_y.max().item())) + 1
    metrics = {}
    for k in ks:
        kk = min(k, sims.shape[1])
        votes = weighted_votes(sims[:, :kk], train_y[idx[:, :kk]], num_classes, T)
        ranked = votes.topk(min(5, num_classes), dim=1).indices
        hit = ranked == test_y[:, None]
        metrics[f"k{k}/top1"] = 100.0 * hit[:, 0].float().mean().item()
        metrics[f"k{k}/top5"] = 100.0 * hit.any(dim=1).float().mean().item()
    return metrics
