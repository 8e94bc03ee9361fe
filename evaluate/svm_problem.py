"""The SVM problem of the VOC07 / low-shot protocols: its per-sample costs, feature normalisation and the
checks on a batch of problems that every solver (evaluate/svm_reference.py, evaluate/svm_solver.py) runs.

The model is the one VISSL and MMSelfSup train (vissl/utils/svm_utils/svm_trainer.py):
`sklearn.svm.LinearSVC(C, class_weight={1: 2, -1: 1}, intercept_scaling=1, penalty="l2",
loss="squared_hinge", dual=True, tol=1e-4, max_iter=2000)`, i.e. liblinear's L2-regularised L2-loss SVM
with the bias as an extra constant feature (so the bias is regularised too):

    min_w  1/2 |w|^2 + sum_i c_i max(0, 1 - y_i w.[x_i, 1])^2,     c_i = C * class_weight[y_i].

A batch of P problems shares one training matrix: each is a set of its rows (`train_mask`), their +-1
labels and a cost.
"""
from __future__ import annotations

import numpy as np

# VISSL / MMSelfSup class weights of LinearSVC, the reference model
CLASS_WEIGHT = {1: 2.0, -1: 1.0}


def l2_normalize(feats: np.ndarray) -> np.ndarray:
    """Row-normalise as VISSL's `_normalize_features`: x / (|x| + 1e-5), in float64 (a new array)."""
    feats = np.asarray(feats, dtype=np.float64)
    return feats / (np.linalg.norm(feats, axis=1, keepdims=True) + 1e-5)


def problem_costs(labels: np.ndarray, train_mask: np.ndarray, costs: np.ndarray) -> np.ndarray:
    """Per-sample costs c_i (P, N): C x class weight on a problem's training rows, 0 elsewhere."""
    weight = np.where(labels > 0, CLASS_WEIGHT[1], CLASS_WEIGHT[-1])
    return np.asarray(costs, dtype=np.float64)[:, None] * weight * train_mask


def check_problems(labels, train_mask, costs, n_train) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A batch of problems as arrays: labels and train_mask (P, n_train), +-1 training labels, costs (P,) > 0;
    ValueError otherwise."""
    labels, train_mask, costs = np.asarray(labels), np.asarray(train_mask, dtype=bool), np.asarray(costs, float)
    if labels.ndim != 2 or labels.shape != train_mask.shape or labels.shape[1] != n_train:
        raise ValueError(f"labels {labels.shape} and train_mask {train_mask.shape} must both be (P, {n_train})")
    if costs.shape != (labels.shape[0],):
        raise ValueError(f"costs must have one entry per problem ({labels.shape[0]}), got shape {costs.shape}")
    if not np.isin(labels[train_mask], (-1, 1)).all():
        raise ValueError("training labels must be +1 / -1")
    if (costs <= 0).any():
        raise ValueError(f"costs must be positive, got {sorted(set(costs[costs <= 0].tolist()))}")
    return labels, train_mask, costs
