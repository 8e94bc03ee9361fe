"""VOC07 linear-SVM classification on frozen features: the VISSL / MMSelfSup protocol.

Protocol (vissl/utils/svm_utils/svm_trainer.py + evaluate.py; MMSelfSup
tools/benchmarks/classification/svm_voc07/tools/train_svm_kfold.py, test_svm.py):
  * features: res5 -> AvgPool(6, stride 1) -> 8192-d (layer `voc_svm`) of the whole image: Resize(256) then
    Resize((224, 224)), no crop (VISSL eval_resnet_8gpu_transfer_voc07_svm.yaml; MMSelfSup
    benchmarks/extract_info/voc07.py); L2-normalised per image as x / (|x| + 1e-5);
  * labels N x C in {1 present, 0 absent, -1 difficult}; in training difficult images are negatives
    (0 and -1 both become -1), at test time they are dropped;
  * per class and per cost C in the cost list (VISSL's [0.01, 0.1, 1, 2, 5, 10, 15, 20, 50, 100, 1000]) a
    LinearSVC(C, class_weight {1: 2, -1: 1}, squared hinge, L2, dual, tol 1e-4, max_iter 2000);
  * the cost of each class is the one with the best 3-fold cross-validated AP on trainval
    (sklearn `cross_val_score(cv=3, scoring="average_precision")`: stratified folds, no shuffle; ties go to
    the earlier cost, as `np.argmax`), then the class's SVM is trained on all of trainval at that cost;
  * test AP: all-point interpolated AP (evaluate/ap.py `voc_ap`), reported per class and as their mean.
Metrics (percent): `mAP`, `AP/<class>`. Single-label features (1-d class ids) are scored one-vs-rest.

The solver is a choice (`--solver torch|sklearn`): the batched Newton solver of evaluate/svm_solver.py
(default) or sklearn's LinearSVC itself, the reference (tests bound their difference).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from mocobench.core.config import option
from mocobench.core.errors import ConfigError, FeatureFileError
from mocobench.core.records import now_iso
from mocobench.core.threads import fit_threads
from mocobench.evaluate.ap import step_ap, voc_ap
from mocobench.evaluate.blas import LIBRARIES as BLAS_LIBRARIES
from mocobench.evaluate.blas import current as current_blas
from mocobench.evaluate.feature_cache import FeatureSourceConfig, resolve_features
from mocobench.evaluate.feature_file import load_features
from mocobench.evaluate.protocols import Protocol
from mocobench.evaluate.report import claim_out, peak_rss_mb, report
from mocobench.evaluate.svm_problem import l2_normalize
from mocobench.evaluate.svm_process import configure_svm_process
from mocobench.evaluate.svm_reference import SKLEARN_MAX_ITER
from mocobench.evaluate.svm_solver import PRECISIONS, make_solver

VISSL_COSTS = (0.01, 0.1, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 50.0, 100.0, 1000.0)
MMSELFSUP_COSTS = (1.0, 10.0, 100.0)  # MMSelfSup/OpenSelfSup svm_voc07 eval_svm_full.sh / eval_svm_lowshot.sh
_VOC07 = dict(layer="voc_svm", image_transform="resize", folds=3, normalize=True)
NAMED_PROTOCOLS = (  # evaluate/protocols.py; image sizes scale with the data and are recorded in provenance
    Protocol("voc07-svm/vissl", 1, {**_VOC07, "costs": list(VISSL_COSTS)},
             "VISSL configs/config/benchmark/linear_image_classification/voc07/eval_resnet_8gpu_transfer_voc07_svm.yaml, "
             "vissl/utils/svm_utils/svm_trainer.py"),
    Protocol("voc07-svm/mmselfsup", 1, {**_VOC07, "costs": list(MMSELFSUP_COSTS)},
             "MMSelfSup tools/benchmarks/classification/svm_voc07/ (extract_info/voc07.py, eval_svm_full.sh)"),
)


@dataclass
class SVMSolverOptions:
    """Options shared by the SVM protocols (full VOC07 and low-shot)."""
    costs: list[float] = option(None, f"SVM costs C (default VISSL's {list(VISSL_COSTS)})", above=0)
    solver: str = option("torch", "torch (batched Newton solver) or sklearn (LinearSVC, the reference)")
    device: str = option("auto", "torch solver device: auto (cuda if available), cpu, cuda or cuda:N")
    precision: str = option("mixed", "torch solver precision: mixed (float32 CG directions inside float64 Newton "
                            "steps, gradients and stopping rule) or float64 throughout")
    tol: float = option(1e-6, "torch solver stopping rule: |gradient| <= tol * |gradient at w=0|", above=0)
    n_jobs: int = option(1, "sklearn solver: LinearSVC fits run in parallel threads", at_least=1)
    max_iter: int = option(SKLEARN_MAX_ITER, "sklearn solver: liblinear max_iter (VISSL: 2000)", at_least=1)
    threads: int = option(0, "torch CPU threads (0 = every CPU given to the process: core/threads.py)", at_least=0)
    blas: str = option("auto", "torch solver's CPU linear algebra: auto (OpenBLAS on AMD CPUs, else torch's "
                       "MKL), torch or openblas (evaluate/blas.py)")
    normalize: bool = option(True, "L2-normalise features first (VISSL/MMSelfSup: yes)")

    def __post_init__(self):
        if self.costs is None:
            self.costs = list(VISSL_COSTS)

    def check_solver(self) -> None:
        if not self.costs or min(self.costs) <= 0:
            raise ConfigError(f"costs must be positive numbers, got {self.costs}")
        if self.solver not in ("torch", "sklearn"):
            raise ConfigError(f"unknown solver {self.solver!r}; expected torch or sklearn")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.blas not in BLAS_LIBRARIES:
            raise ConfigError(f"blas must be one of {', '.join(BLAS_LIBRARIES)}, got {self.blas!r}")

    def make_solver(self, train: np.ndarray, evals: dict[str, np.ndarray]):
        return make_solver(self.solver, train, evals, device=self.device, precision=self.precision, tol=self.tol,
                           n_jobs=self.n_jobs, max_iter=self.max_iter)

    def prepare(self, feats: np.ndarray) -> np.ndarray:
        """float64 features, L2-normalised when asked (the one copy of a memory-mapped matrix)."""
        return l2_normalize(feats) if self.normalize else np.asarray(feats, dtype=np.float64)


@dataclass
class SVMConfig(SVMSolverOptions, FeatureSourceConfig):
    """VOC07 SVM: per-class linear SVMs on frozen features, cost chosen by 3-fold CV on trainval."""
    dataset: str = option("voc", "dataset layout: voc (VOC2007 devkit) or imagefolder")
    layer: str = option("voc_svm", "feature layer (VOC07 protocol: voc_svm = res5 AvgPool(6, stride 1))")
    image_transform: str = option("resize", "resize: Resize(resize) + Resize((crop, crop)), the whole image (VISSL, "
                                  "MMSelfSup VOC07); center_crop | square (core/transforms.py)")
    out: str = option("runs/svm", "run directory for metrics.json")
    folds: int = option(3, "cross-validation folds for the cost choice (stratified, no shuffle)", at_least=2)


# ----------------------------------------------------------------------------------------------------
# Labels and folds
# ----------------------------------------------------------------------------------------------------

def as_multilabel(labels: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """N x C labels in {1, 0, -1}; a 1-d vector of class ids becomes one-vs-rest {1, 0}."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        return labels.astype(np.int8)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    out = np.zeros((len(labels), num_classes), dtype=np.int8)
    out[np.arange(len(labels)), labels] = 1
    return out


def class_names_of(fs, num_classes: int) -> list[str]:
    if fs.class_names and len(fs.class_names) == num_classes:
        return list(fs.class_names)
    return [str(c) for c in range(num_classes)]


def train_targets(labels: np.ndarray) -> np.ndarray:
    """(C, N) SVM targets: +1 present, -1 absent or difficult (VISSL's training rule)."""
    return np.where(labels.T == 1, 1, -1).astype(np.int8)


def stratified_folds(y: np.ndarray, n_folds: int) -> list[np.ndarray]:
    """Held-out index arrays of sklearn's StratifiedKFold(n_folds) (no shuffle) on +-1 labels: the split
    `cross_val_score(cv=n_folds)` makes for a classifier, computed as sklearn's `_make_test_folds` does
    (tests compare it with sklearn) without importing sklearn (~1 s) into the torch solver's runs.

    Classes are numbered in order of first appearance; the labels sorted by that number are dealt to the
    folds round-robin, which fixes how many of each class every fold holds; each class's images then fill
    the folds in index order, fold 0 first."""
    y = np.asarray(y)
    _, first, inverse = np.unique(y, return_index=True, return_inverse=True)
    encoded = np.argsort(np.argsort(first))[inverse.reshape(-1)]  # class number by first appearance
    if np.all(np.bincount(encoded) < n_folds):
        raise ValueError(f"n_splits={n_folds} cannot be greater than the number of members in each class")
    in_order = np.sort(encoded)
    allocation = np.stack([np.bincount(in_order[i::n_folds], minlength=len(first)) for i in range(n_folds)])
    test_folds = np.empty(len(y), dtype=np.int64)
    for k in range(len(first)):
        test_folds[encoded == k] = np.repeat(np.arange(n_folds), allocation[:, k])
    return [np.flatnonzero(test_folds == i) for i in range(n_folds)]


def choose_costs(cv_ap: np.ndarray) -> np.ndarray:
    """Per class (row), the index of the cost with the best CV AP; first one on ties (np.argmax).
    NaN (a fold without both classes) counts as the worst score."""
    return np.argmax(np.nan_to_num(cv_ap, nan=-np.inf), axis=1)


# ----------------------------------------------------------------------------------------------------
# The protocol
# ----------------------------------------------------------------------------------------------------

@dataclass
class SVMResult:
    test_ap: np.ndarray      # (C,) fraction, NaN for a class without test positives
    cv_ap: np.ndarray        # (C, K) mean CV AP per class and cost
    chosen: np.ndarray       # (C,) index into costs
    costs: list[float]
    seconds: dict
    solver: dict = field(default_factory=dict)

    @property
    def mAP(self) -> float:
        return float(np.nanmean(self.test_ap))


def voc07_svm(train_feats: np.ndarray, train_labels: np.ndarray, test_feats: np.ndarray, test_labels: np.ndarray,
              opts: SVMSolverOptions, folds: int = 3, progress: bool = True) -> SVMResult:
    """Run the whole protocol (see the module docstring) with the solver `opts` describe."""
    opts.check_solver()
    costs = list(opts.costs)
    num_classes = train_labels.shape[1] if train_labels.ndim == 2 else int(max(train_labels.max(), test_labels.max())) + 1
    Ytr, Yte = as_multilabel(train_labels, num_classes), as_multilabel(test_labels, num_classes)
    t0 = time.perf_counter()
    X, Xt = opts.prepare(train_feats), opts.prepare(test_feats)
    solver = opts.make_solver(X, {"test": Xt})
    del X, Xt
    t_setup = time.perf_counter() - t0
    C, K, N = num_classes, len(costs), len(Ytr)
    y = train_targets(Ytr)

    # cross-validation: every (class, fold, cost) problem in one call. A training fold holding one class
    # only cannot be fit (LinearSVC raises; cross_val_score scores the fold NaN): it is left out as NaN.
    held = [stratified_folds(y[c], folds) for c in range(C)]
    cv = np.full((C, folds, K), np.nan)
    problems = []
    for c in range(C):
        for f in range(folds):
            train = np.ones(N, dtype=bool)
            train[held[c][f]] = False
            if (y[c, train] > 0).any() and (y[c, train] < 0).any():
                problems += [(c, f, k, train) for k in range(K)]
    t0 = time.perf_counter()
    if problems:
        with tqdm(total=len(problems), desc="svm cross-validation", disable=not progress or None, leave=False) as bar:
            scores = solver.fit_scores(np.stack([y[c] for c, _, _, _ in problems]),
                                       np.stack([m for _, _, _, m in problems]),
                                       np.array([costs[k] for _, _, k, _ in problems]), ("train",), bar)["train"]
        for p, (c, f, k, _) in enumerate(problems):
            rows = held[c][f]
            cv[c, f, k] = step_ap(y[c, rows], scores[p, rows])
    cv_ap = cv.mean(axis=1)
    t_cv = time.perf_counter() - t0

    # final SVMs on all of trainval at the chosen cost; test AP without the difficult images
    chosen = choose_costs(cv_ap)
    fit = [c for c in range(C) if (y[c] > 0).any() and (y[c] < 0).any()]
    test_ap = np.full(C, np.nan)
    t0 = time.perf_counter()
    if fit:
        with tqdm(total=len(fit), desc="svm final fits", disable=not progress or None, leave=False) as bar:
            test_scores = solver.fit_scores(y[fit], np.ones((len(fit), N), dtype=bool),
                                            np.array([costs[chosen[c]] for c in fit]), ("test",), bar)["test"]
        for i, c in enumerate(fit):
            test_ap[c] = _test_ap(Yte[:, c], test_scores[i])
    t_final = time.perf_counter() - t0
    seconds = {"setup": t_setup, "cross_validation": t_cv, "final": t_final, "total": t_setup + t_cv + t_final}
    return SVMResult(test_ap, cv_ap, chosen, costs, seconds, solver_details(solver))


def _test_ap(labels: np.ndarray, scores: np.ndarray) -> float:
    keep = labels != -1  # difficult images are not scored
    if not (labels[keep] == 1).any():
        return float("nan")
    return float(voc_ap(labels[keep], scores[keep]))


def solver_details(solver) -> dict:
    info = getattr(solver, "info", [])
    if not info:
        return {}
    return {"newton_iters": sum(i.newton_iters for i in info), "cg_iters": sum(i.cg_iters for i in info),
            "unconverged": sum(i.problems - i.converged for i in info), "blas": current_blas()}


def run(cfg: SVMConfig) -> dict:
    start = now_iso()
    cfg.check_solver()
    configure_svm_process(cfg.solver, cfg.device, cfg.threads, cfg.blas)
    if cfg.folds < 2:
        raise ConfigError(f"folds must be >= 2, got {cfg.folds}")
    held = claim_out(cfg, "svm")
    if held.finished is not None:
        return held.finished["metrics"]
    path = resolve_features(cfg)
    fs = load_features(path)
    fit_threads(0, cfg.threads, announce=None)  # extraction is done: every CPU for the solver
    num_classes = fs.train_labels.shape[1] if fs.multilabel else int(max(fs.train_labels.max(), fs.test_labels.max())) + 1
    if num_classes < 1 or len(fs.train_feats) < cfg.folds:
        raise FeatureFileError(f"{path}: {len(fs.train_feats)} training images; the SVM protocol needs at least "
                               f"{cfg.folds} (one per fold)")
    names = class_names_of(fs, num_classes)
    res = voc07_svm(fs.train_feats, fs.train_labels, fs.test_feats, fs.test_labels, cfg, cfg.folds)
    metrics: dict = {"mAP": 100.0 * res.mAP}
    metrics.update({f"AP/{n}": 100.0 * float(a) for n, a in zip(names, res.test_ap)})
    rss = peak_rss_mb()["self"]
    metrics["details"] = {
        "features": str(path), "n_train": len(fs.train_feats), "n_test": len(fs.test_feats),
        "dim": int(fs.train_feats.shape[1]), "costs": res.costs,
        "chosen_cost": {n: res.costs[k] for n, k in zip(names, res.chosen)},
        "cv_ap": {n: [float(v) for v in row] for n, row in zip(names, res.cv_ap)},
        "classes_without_test_positives": [n for n, a in zip(names, res.test_ap) if np.isnan(a)],
        "seconds": res.seconds, "peak_rss_mb": rss, "solver": res.solver}
    line = (f"svm: mAP {metrics['mAP']:.2f} over {num_classes} classes ({cfg.solver} solver, "
            f"{res.seconds['total']:.1f}s, peak RSS {rss:.0f} MiB)")
    report(cfg, "svm", metrics, start, line, fs.meta.get("checkpoint_key"), held.run_id, NAMED_PROTOCOLS, "voc07-svm")
    return metrics
