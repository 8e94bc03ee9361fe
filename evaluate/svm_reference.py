"""The reference solver: sklearn's LinearSVC with VISSL's / MMSelfSup's settings, one fit per problem.

Settings from vissl/utils/svm_utils/svm_trainer.py and MMSelfSup
tools/benchmarks/classification/svm_voc07/tools/train_svm_kfold.py; the objective is in
evaluate/svm_problem.py. `SklearnSVM` has the `fit_scores` interface of the batched torch solver
(evaluate/svm_solver.py), which tests/test_eval_svm.py checks against it.
"""
from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import numpy as np

from mocobench.evaluate.svm_problem import check_problems

# VISSL / MMSelfSup settings of LinearSVC
SKLEARN_TOL = 1e-4
SKLEARN_MAX_ITER = 2000


def reference_svc(cost: float, max_iter: int = SKLEARN_MAX_ITER):
    """The LinearSVC VISSL / MMSelfSup train (svm_trainer.py, train_svm_kfold.py). `random_state` is fixed
    here (they leave it unset): it only orders liblinear's coordinate sweeps, and fixing it makes the
    reference reproducible run to run."""
    from sklearn.svm import LinearSVC
    return LinearSVC(C=cost, class_weight={1: 2, -1: 1}, intercept_scaling=1.0, penalty="l2",
                     loss="squared_hinge", dual=True, tol=SKLEARN_TOL, max_iter=max_iter, random_state=0)


class SklearnSVM:
    """The reference: one `LinearSVC` fit per problem, parallel over problems with threads
    (liblinear releases the GIL; VISSL also uses one thread per class). Same interface as TorchSVM."""

    def __init__(self, train: np.ndarray, evals: Mapping[str, np.ndarray] | None = None, n_jobs: int = 1,
                 max_iter: int = SKLEARN_MAX_ITER):
        self.train = np.ascontiguousarray(train, dtype=np.float64)
        self.matrices = {"train": self.train, **{k: np.asarray(v, dtype=np.float64) for k, v in (evals or {}).items()}}
        self.n_train, self.n_jobs, self.max_iter = len(train), n_jobs, max_iter

    def _one(self, y, mask, cost, evals):
        from sklearn.exceptions import ConvergenceWarning
        rows = np.flatnonzero(mask)
        clf = reference_svc(cost, self.max_iter)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(self.train[rows], y[rows])
        return [clf.decision_function(self.matrices[e]) for e in evals]

    def fit_scores(self, labels: np.ndarray, train_mask: np.ndarray, costs: np.ndarray,
                   evals: Sequence[str] = ("train",), progress=None) -> dict[str, np.ndarray]:
        from joblib import Parallel, delayed
        labels, train_mask, costs = check_problems(labels, train_mask, costs, self.n_train)
        unknown = [e for e in evals if e not in self.matrices]
        if unknown:
            raise KeyError(f"no evaluation matrix named {unknown}; have {sorted(self.matrices)}")
        jobs = (delayed(self._one)(labels[p], train_mask[p], costs[p], evals) for p in range(len(labels)))
        results = []
        for res in Parallel(n_jobs=self.n_jobs, prefer="threads", return_as="generator")(jobs):
            results.append(res)
            if progress is not None:
                progress.update(1)
        return {e: np.stack([r[i] for r in results]) for i, e in enumerate(evals)}
