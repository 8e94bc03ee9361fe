"""Low-shot VOC07 SVMs: the VISSL / MMSelfSup low-shot protocol on frozen features.

Protocol (vissl extra_scripts/create_low_shot_samples.py `generate_voc07_low_shot_samples`,
vissl/utils/svm_utils/svm_low_shot_trainer.py; MMSelfSup svm_voc07/tools/eval_svm_lowshot.sh):
  * for k in {1, 2, 4, 8, 16, 32, 64, 96} and 5 independent samples: for every class separately draw k
    positives (label 1) and (C-1)*k negatives (label 0; 19k for VOC's 20 classes) from trainval without
    replacement; difficult images (-1) are never drawn;
  * features of the whole image resized to 224 x 224, no crop (VISSL eval_resnet_8gpu_transfer_voc07_low_shot_svm
    .yaml), layer `voc_svm`;
  * per class, an SVM (the VOC07 one: LinearSVC, class_weight {1: 2, -1: 1}, ...) for every cost in the
    cost list on exactly those k + (C-1)k images; features L2-normalised;
  * test: all-point AP per class without the test difficult images, mean over classes = the mAP of one
    (k, sample, cost);
  * for each k, the cost with the best mean test mAP over the 5 samples is chosen, and mean / std
    (population, np.std) / min / max over the samples at that cost are reported, in percent:
    `k{K}/mAP_mean`, `k{K}/mAP_std`, `k{K}/mAP_min`, `k{K}/mAP_max`.
Choosing the cost on test mAP is what the published numbers do (VISSL `aggregate_stats`), even though it
selects on the test set. `--selection val` offers a clean variant: the cost is chosen by the mean AP on
the trainval images outside each class's sample (difficult ones dropped), and test mAP is reported at it.

Sampling is seeded: sample s of k uses numpy `default_rng([seed, k, s])`, so the same seed gives the same
samples whatever the other k values; the indices (into the trainval order) are saved in
OUT/lowshot_samples.npz as `k{K}_sample{S}`: a C x (C*k) int32 array per draw, each row the class's k
positives then its (C-1)k negatives.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mocobench.core.config import option
from mocobench.core.errors import ConfigError, DataError
from mocobench.core.records import now_iso
from mocobench.core.threads import fit_threads
from mocobench.evaluate.ap import voc_ap
from mocobench.evaluate.feature_cache import FeatureSourceConfig, resolve_features
from mocobench.evaluate.feature_file import load_features, write_npz
from mocobench.evaluate.protocols import Protocol
from mocobench.evaluate.report import claim_out, peak_rss_mb, report
from mocobench.evaluate.svm import (MMSELFSUP_COSTS, VISSL_COSTS, SVMSolverOptions, as_multilabel, class_names_of,
                                    solver_details)
from mocobench.evaluate.svm_process import configure_svm_process

K_VALUES = (1, 2, 4, 8, 16, 32, 64, 96)
_LOWSHOT = dict(layer="voc_svm", image_transform="square", samples=5, selection="test", normalize=True)
NAMED_PROTOCOLS = (  # evaluate/protocols.py; the k list only selects which k are reported
    Protocol("lowshot/vissl", 1, {**_LOWSHOT, "costs": list(VISSL_COSTS)},
             "VISSL eval_resnet_8gpu_transfer_voc07_low_shot_svm.yaml, svm_low_shot_trainer.py, "
             "extra_scripts/create_low_shot_samples.py"),
    Protocol("lowshot/mmselfsup", 1, {**_LOWSHOT, "costs": list(MMSELFSUP_COSTS)},
             "MMSelfSup tools/benchmarks/classification/svm_voc07/eval_svm_lowshot.sh"),
)


@dataclass
class LowShotConfig(SVMSolverOptions, FeatureSourceConfig):
    """Low-shot SVMs: k positives and (C-1)k negatives per class, 5 samples per k."""
    dataset: str = option("voc", "dataset layout: voc (VOC2007 devkit) or imagefolder")
    layer: str = option("voc_svm", "feature layer (VOC07 protocol: voc_svm = res5 AvgPool(6, stride 1))")
    image_transform: str = option("square", "square: Resize((crop, crop)), the whole image (VISSL low-shot); "
                                  "resize | center_crop (core/transforms.py)")
    out: str = option("runs/lowshot", "run directory for metrics.json and lowshot_samples.npz")
    k_values: list[int] = option(None, f"positives per class (default {list(K_VALUES)})", at_least=1)
    samples: int = option(5, "independent samples per k", at_least=1)
    sample_seed: int = option(0, "seed of the low-shot draws (same seed -> same samples)")
    selection: str = option("test", "cost choice: test (published: best mean test mAP) or val (held-out trainval)")

    def __post_init__(self):
        super().__post_init__()
        if self.k_values is None:
            self.k_values = list(K_VALUES)


def draw_samples(labels: np.ndarray, k: int, sample: int, seed: int, class_names: list[str] | None = None
                 ) -> np.ndarray:
    """One low-shot draw: (C, C*k) trainval indices, row c = k positives of class c, then (C-1)k negatives."""
    C = labels.shape[1]
    rng = np.random.default_rng([seed, k, sample])
    rows = []
    for c in range(C):
        pos, neg = np.flatnonzero(labels[:, c] == 1), np.flatnonzero(labels[:, c] == 0)
        if len(pos) < k or len(neg) < (C - 1) * k:
            name = class_names[c] if class_names else str(c)
            raise DataError(f"low-shot k={k} needs {k} positives and {(C - 1) * k} negatives of class {name!r}, "
                            f"but trainval has {len(pos)} and {len(neg)} (difficult images excluded); "
                            f"use smaller --k-values")
        rows.append(np.concatenate([rng.choice(pos, k, replace=False), rng.choice(neg, (C - 1) * k, replace=False)]))
    return np.stack(rows).astype(np.int32)


def _solve_groups(draws: dict, n_train: int, kernel=None) -> list[list[tuple[int, int]]]:
    """Which draws are solved in one `fit_scores` call: all samples of a k together once one draw alone
    spans a quarter of the trainval rows (then the batched solver's matrix products, shared over every
    problem's rows, get wider at little extra cost: about 2x faster at VOC07 size), else one draw per call
    (small k: a draw's few rows get their own small basis). `kernel(rows_per_problem, rows_in_call)` is the
    solver's choice of path (`TorchSVM.use_kernel`), where it has one: the k values it solves in the shared
    basis form one call (at VOC07 size k = 64 and 96: products over 200 problems instead of 100, 0.92-0.95x
    the time per problem on a 2-core AVX2 AMD EPYC, and half the batches), those of its kernel path stay one
    call per k (each problem is padded to the call's largest)."""
    groups: list[list[tuple[int, int]]] = []
    by_k: dict[int, list[tuple[int, int]]] = {}
    for (k, s), idx in draws.items():
        if len(np.unique(idx)) < n_train / 4:
            groups.append([(k, s)])
            continue
        if k not in by_k:
            by_k[k] = []
            groups.append(by_k[k])
        by_k[k].append((k, s))
    if kernel is None:
        return groups
    shared = [g for g in groups if g is by_k.get(g[0][0])
              and not kernel(draws[g[0]].shape[1], len(np.unique(np.concatenate([draws[key] for key in g], None))))]
    if len(shared) < 2:
        return groups
    return [g for g in groups if not any(g is h for h in shared)] + [[key for g in shared for key in g]]


def _class_ap(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """All-point AP of one class for many score rows (P, M), difficult (-1) rows dropped; NaN without positives."""
    keep = labels != -1
    if not (labels[keep] == 1).any():
        return np.full(len(scores), np.nan)
    return voc_ap(np.repeat(labels[keep][:, None], len(scores), 1), scores[:, keep].T)


def _classes_ap(labels: np.ndarray, scores: np.ndarray, per_class: int) -> np.ndarray:
    """`_class_ap` of every class at once: labels (M, C), scores (C * per_class, M), class c's rows at
    c * per_class; returns (C, per_class). A difficult image ranks below every real score in its class's
    columns, where it cannot change the AP (it follows every positive), so one ranking call serves all."""
    C = labels.shape[1]
    cols = np.repeat(labels, per_class, axis=1)  # (M, C * per_class)
    ranked = np.where(cols == -1, -np.inf, scores.T)
    return voc_ap(cols == 1, ranked).reshape(C, per_class)


@dataclass
class LowShotResult:
    test_map: dict   # k -> (samples, costs) mean test AP over classes (fraction)
    val_map: dict    # k -> (samples, costs) mean held-out trainval AP (selection="val" only)
    samples: dict    # "k{K}_sample{S}" -> (C, C*k) indices
    costs: list
    seconds: float
    solver: dict = field(default_factory=dict)

    def summary(self, selection: str = "test") -> dict:
        """Per k: chosen cost and mean/std/min/max (percent) of test mAP over the samples at that cost."""
        out = {}
        for k, test in self.test_map.items():
            select = test if selection == "test" else self.val_map[k]
            best = int(np.argmax(np.nan_to_num(select.mean(axis=0), nan=-np.inf)))
            col = 100.0 * test[:, best]
            out[k] = {"cost": self.costs[best], "mean": float(col.mean()), "std": float(col.std()),
                      "min": float(col.min()), "max": float(col.max())}
        return out


def lowshot_svm(train_feats: np.ndarray, train_labels: np.ndarray, test_feats: np.ndarray, test_labels: np.ndarray,
                opts: SVMSolverOptions, k_values=K_VALUES, n_samples: int = 5, seed: int = 0, selection: str = "test",
                class_names: list[str] | None = None, progress: bool = True) -> LowShotResult:
    """Train and test every (k, sample, class, cost) SVM; see the module docstring."""
    opts.check_solver()
    if selection not in ("test", "val"):
        raise ConfigError(f"selection must be 'test' or 'val', got {selection!r}")
    costs = list(opts.costs)
    num_classes = train_labels.shape[1] if train_labels.ndim == 2 else int(max(train_labels.max(), test_labels.max())) + 1
    Ytr, Yte = as_multilabel(train_labels, num_classes), as_multilabel(test_labels, num_classes)
    C, K, N = num_classes, len(costs), len(Ytr)
    draws = {(k, s): draw_samples(Ytr, k, s, seed, class_names) for k in k_values for s in range(n_samples)}
    t0 = time.perf_counter()
    X, Xt = opts.prepare(train_feats), opts.prepare(test_feats)
    solver = opts.make_solver(X, {"test": Xt})
    del X, Xt
    evals = ("test", "train") if selection == "val" else ("test",)
    test_map = {k: np.zeros((n_samples, K)) for k in k_values}
    val_map = {k: np.zeros((n_samples, K)) for k in k_values} if selection == "val" else {}
    with tqdm(total=len(draws) * C * K, desc="low-shot svm", disable=not progress or None, leave=False) as bar:
        for group in _solve_groups(draws, N, getattr(solver, "use_kernel", None)):
            labels = np.zeros((len(group) * C * K, N), dtype=np.int8)
            mask = np.zeros((len(group) * C * K, N), dtype=bool)
            for g, key in enumerate(group):
                idx, k = draws[key], key[0]
                for c in range(C):
                    rows = slice((g * C + c) * K, (g * C + c + 1) * K)
                    labels[rows, idx[c, :k]] = 1
                    labels[rows, idx[c, k:]] = -1
                    mask[rows, idx[c]] = True
            scores = solver.fit_scores(labels, mask, np.tile(costs, len(group) * C), evals, bar)
            for g, (k, s) in enumerate(group):
                idx, first = draws[k, s], g * C * K
                test_ap = _classes_ap(Yte, scores["test"][first:first + C * K], K)
                test_map[k][s] = np.nanmean(test_ap, axis=0)
                if selection == "val":
                    val_ap = []
                    for c in range(C):
                        held = np.ones(N, dtype=bool)
                        held[idx[c]] = False
                        val_ap.append(_class_ap(Ytr[held, c], scores["train"][first + c * K:first + (c + 1) * K][:, held]))
                    val_map[k][s] = np.nanmean(np.stack(val_ap), axis=0)
    samples = {f"k{k}_sample{s}": idx for (k, s), idx in draws.items()}
    return LowShotResult(test_map, val_map, samples, costs, time.perf_counter() - t0, solver_details(solver))


def run(cfg: LowShotConfig) -> dict:
    start = now_iso()
    cfg.check_solver()
    configure_svm_process(cfg.solver, cfg.device, cfg.threads, cfg.blas)
    if cfg.samples < 1 or not cfg.k_values or min(cfg.k_values) < 1:
        raise ConfigError(f"need samples >= 1 and positive k_values, got samples={cfg.samples}, k_values={cfg.k_values}")
    held = claim_out(cfg, "lowshot")
    if held.finished is not None:
        return held.finished["metrics"]
    path = resolve_features(cfg)
    fs = load_features(path)
    fit_threads(0, cfg.threads, announce=None)  # extraction is done: every CPU for the solver
    num_classes = fs.train_labels.shape[1] if fs.multilabel else int(max(fs.train_labels.max(), fs.test_labels.max())) + 1
    names = class_names_of(fs, num_classes)
    res = lowshot_svm(fs.train_feats, fs.train_labels, fs.test_feats, fs.test_labels, cfg, cfg.k_values, cfg.samples,
                      cfg.sample_seed, cfg.selection, names)
    summary = res.summary(cfg.selection)
    metrics: dict = {}
    for k, row in summary.items():
        metrics.update({f"k{k}/mAP_{stat}": row[stat] for stat in ("mean", "std", "min", "max")})
    samples_path = write_npz(Path(cfg.out) / "lowshot_samples.npz", res.samples)
    rss = peak_rss_mb()["self"]
    metrics["details"] = {
        "features": str(path), "n_train": len(fs.train_feats), "n_test": len(fs.test_feats),
        "dim": int(fs.train_feats.shape[1]), "costs": res.costs, "selection": cfg.selection,
        "chosen_cost": {f"k{k}": row["cost"] for k, row in summary.items()},
        "test_mAP": {f"k{k}": (100.0 * m).tolist() for k, m in res.test_map.items()},
        **({"val_mAP": {f"k{k}": (100.0 * m).tolist() for k, m in res.val_map.items()}} if res.val_map else {}),
        "samples_file": str(samples_path), "seconds": res.seconds, "peak_rss_mb": rss, "solver": res.solver}
    line = ("lowshot: " + ", ".join(f"k{k} {row['mean']:.2f}±{row['std']:.2f}" for k, row in summary.items())
            + f" ({cfg.selection}-selected cost, {res.seconds:.1f}s, peak RSS {rss:.0f} MiB)")
    report(cfg, "lowshot", metrics, start, line, fs.meta.get("checkpoint_key"), held.run_id, NAMED_PROTOCOLS,
           "lowshot")
    return metrics
