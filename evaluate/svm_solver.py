"""Batched linear-SVM solver driver for the VOC07 / low-shot SVM protocols (`TorchSVM`), and `make_solver`,
which picks it or the sklearn reference (evaluate/svm_reference.py) behind one interface.

Both solvers implement `fit_scores`: given P problems, each a set of training rows of the same training
matrix, its +-1 labels and cost (the objective: evaluate/svm_problem.py), return every problem's decision
values on named evaluation matrices. The protocols (evaluate/svm.py, evaluate/lowshot.py) only ever call that.

`TorchSVM` solves all P problems at once, in the primal, by Newton's method (evaluate/svm_newton.py). It
works in an orthogonal basis of the span of the training features (evaluate/svm_basis.py), where folds and
low-shot samples are cost-zero rows, so all (class, cost, fold) problems share one basis; the training Gram
matrix serves the exact active-set Newton steps (evaluate/svm_active_set.py). Problems that each train on
few rows (low-shot k <= 32) are solved in the coefficients of their own rows instead
(evaluate/svm_kernel.py). Costs are solved in increasing order, each warm-started from the previous one.
It stops at the optimum (|grad| <= tol * |grad at 0|), which liblinear's dual coordinate descent approaches
to its own tolerance; tests/test_eval_svm.py bounds the differences.
"""
from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import numpy as np
import torch

from mocobench.evaluate.blas import matmul
from mocobench.evaluate.svm_active_set import gather_blocks, padded_gram
from mocobench.evaluate.svm_basis import Basis, gram_matrix
from mocobench.evaluate.svm_kernel import kernel_newton_solve
from mocobench.evaluate.svm_newton import SolveInfo, gradient_at_zero, newton_solve, rescaled_gradient
from mocobench.evaluate.svm_problem import check_problems, problem_costs
from mocobench.evaluate.svm_reference import SKLEARN_MAX_ITER, SklearnSVM

# precision name -> (dtype of the Newton iterates and gradients, dtype of the inner CG solves or None = same).
# "mixed" is the default: a CG direction only has to be a descent direction, which float32 gives, while the
# gradient, line search and stopping rule stay float64, so the solution meets the same tol (2-core AMD EPYC,
# 2048-d VOC07 protocol: 37.8 s -> 31.1 s, same mAP). Its decision values (which only rank images for AP)
# are float32 products too. An all-float32 mode is not offered: its gradients and line searches cannot
# reach tol=1e-6.
PRECISIONS = {"float64": (torch.float64, None), "mixed": (torch.float64, torch.float32)}


def resolve_device(device: str) -> torch.device:
    """The torch device a `device` option names: "auto" is CUDA when available, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class TorchSVM:
    """Batched solver for many LinearSVC problems on one training matrix (see the module docstring).

    train: (N, D) features (already L2-normalised if the protocol asks for it); evals: name -> (M, D)
    matrices to score, "train" always available. The bias-augmented training rows are projected once onto
    their basis; each `fit_scores` call may then solve any number of problems. Other matrices are kept in
    feature space and scored through each batch's solutions mapped back to it (`_score`).
    """

    def __init__(self, train: np.ndarray, evals: Mapping[str, np.ndarray] | None = None, device: str = "cpu",
                 precision: str = "mixed", tol: float = 1e-6, max_newton: int = 100, max_cg: int = 500,
                 batch_size: int = 1024, warm_start: bool = True, max_gram_rows: int = 20000,
                 kernel_rows: int = 700, kernel_cost_ratio: float = 30.0):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
        self.device = resolve_device(device)
        self.warm_start = warm_start
        self.dtype, self.cg_dtype = PRECISIONS[precision]
        self.tol, self.max_newton, self.max_cg, self.batch_size = tol, max_newton, max_cg, batch_size
        self.kernel_rows, self.kernel_cost_ratio = kernel_rows, kernel_cost_ratio
        self.n_train = len(train)
        aug = self._augment(train)
        self.basis = Basis(aug)
        # scores only rank images (AP): under "mixed" they are float32 products, the solve stays as it is
        self.score_dtype = self.cg_dtype or self.dtype
        self.matrices = {"train": self.basis.Z.to(self.score_dtype)}  # the training rows in the basis,
        for name, feats in (evals or {}).items():                       # the others in feature space
            self.matrices[name] = self._augment(feats).to(self.score_dtype)
        self.basis.V = self.basis.V.to(self.score_dtype)  # V only maps solutions back to features to score
        del aug
        # Gram matrix of the training rows, for exact Newton steps on small active sets (N x N floats)
        self.gram = None
        if self.n_train <= max_gram_rows:
            self.gram = padded_gram(self.basis.gram if self.basis.gram is not None else gram_matrix(self.basis.Z))
            self.basis.gram = None
        self.info: list[SolveInfo] = []

    def _augment(self, feats: np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(feats), device=self.device).to(self.dtype)
        return torch.cat([x, torch.ones(len(x), 1, dtype=self.dtype, device=self.device)], 1)

    def fit_scores(self, labels: np.ndarray, train_mask: np.ndarray, costs: np.ndarray,
                   evals: Sequence[str] = ("train",), progress=None) -> dict[str, np.ndarray]:
        """Train P problems (labels/train_mask (P, N_train), costs (P,)); decision values (P, M) per eval.

        Only the rows some problem trains on enter the solve (when they are clearly fewer than the basis
        rank, through a smaller basis of just those rows). Problems that differ only in cost form a chain
        solved in increasing cost, each warm-started from the previous solution (a regularisation path);
        the k-th members of all chains are solved together as one batch.
        """
        labels, train_mask, costs = check_problems(labels, train_mask, costs, self.n_train)
        unknown = [e for e in evals if e not in self.matrices]
        if unknown:
            raise KeyError(f"no evaluation matrix named {unknown}; have {sorted(self.matrices)}")
        out = {e: np.empty((len(labels), len(self.matrices[e]))) for e in evals}
        rows = np.flatnonzero(train_mask.any(0))
        if self.use_kernel(int(train_mask.sum(1).max()), len(rows)):
            return self._fit_kernel(labels, train_mask, costs, evals, out, progress)
        rows_t = torch.as_tensor(rows, device=self.device)
        Z, sub = self.basis.Z[rows_t], None
        K = None  # Gram matrix of these rows, padded for `direct_directions`
        if self.gram is not None:
            K = self.gram if len(rows) == self.n_train else padded_gram(self.gram[rows_t][:, rows_t])
        if len(rows) < 0.9 * self.basis.rank:  # clearly fewer rows than dimensions: a basis of just those
            sub = Basis(Z)
            Z = sub.Z
        Z2 = (Z * Z).to(self.cg_dtype or self.dtype)  # for the Jacobi preconditioner of the CG steps only
        y_all = np.where(labels[:, rows] > 0, 1.0, -1.0)
        c_all = problem_costs(labels[:, rows], train_mask[:, rows], costs)
        # what later stages start from: solutions (in this call's basis), whether they ended with exact steps,
        # their training scores, their last active-set factorisations; and per problem |gradient at 0| / cost
        # (a chain's rows and labels are fixed)
        warm: dict[int, tuple] = {}
        g0_per_cost: dict[int, float] = {}
        for stage in _cost_chains(y_all, train_mask[:, rows], costs):
            for start in range(0, len(stage), self.batch_size):
                batch = stage[start:start + self.batch_size]
                ids = [p for p, _ in batch]
                y = torch.as_tensor(y_all[ids], dtype=self.dtype, device=self.device)
                c = torch.as_tensor(c_all[ids], dtype=self.dtype, device=self.device)
                roots = [i for i, (_, prev) in enumerate(batch) if prev is None]
                G_zero = gradient_at_zero(Z, y[roots], c[roots]) if roots else None
                if roots:
                    g = G_zero.norm(dim=1)
                    g0_per_cost.update({ids[i]: float(v) / costs[ids[i]] for i, v in zip(roots, g.tolist())})
                g0_per_cost.update({p: g0_per_cost[prev] for p, prev in batch if prev is not None})
                g0 = torch.tensor([g0_per_cost[p] * costs[p] for p in ids], dtype=self.dtype, device=self.device)
                W0 = direct0 = O0 = factors0 = None
                G_start = G_zero if len(roots) == len(ids) else None  # gradients at the start, where known
                starts = [warm.pop(prev) if prev is not None else None for _, prev in batch]
                if self.warm_start and any(st is not None for st in starts):
                    W0 = torch.stack([st[0] if st is not None else torch.zeros_like(Z[0]) for st in starts])
                    direct0 = torch.tensor([st is not None and st[1] for st in starts], device=self.device)
                    O0 = torch.stack([st[2] if st is not None else torch.zeros_like(Z[:, 0]) for st in starts])
                    factors0 = [st[3] if st is not None else None for st in starts]
                    chained = [i for i, st in enumerate(starts) if st is not None]
                    ratio = torch.tensor([costs[ids[i]] / costs[batch[i][1]] for i in chained],
                                         dtype=self.dtype, device=self.device)
                    G_start = torch.empty_like(W0)
                    G_start[chained] = rescaled_gradient(W0[chained], torch.stack([starts[i][4] for i in chained]),
                                                         ratio)
                    if roots:
                        G_start[roots] = G_zero
                res = newton_solve(Z, y, c, tol=self.tol, max_newton=self.max_newton, max_cg=self.max_cg, W0=W0,
                                   cg_dtype=self.cg_dtype, K=K, direct0=direct0, Z2=Z2, O0=O0, g0=g0,
                                   factors0=factors0, G_start=G_start)
                warm.update({p: (res.W[i], bool(res.direct[i]), res.O[i], res.factors[i], res.G[i])
                             for i, p in enumerate(ids)})
                self._record(res.info, progress)
                self._score(matmul(res.W, sub.V.T) if sub is not None else res.W, ids, evals, out)  # full basis
        return out

    def use_kernel(self, rows_per_problem: int, rows_in_call: int) -> bool:
        """Whether problems of at most `rows_per_problem` rows, `rows_in_call` rows in all, are solved in
        their own rows' coefficients: only within `kernel_rows`, and only while one factorisation of that
        size (n^3 / 3 flops, repeated every Newton step) costs at most `kernel_cost_ratio` products with the
        call's rows in the shared basis (rows x rank flops, a few per CG step). Measured on a 2-core AMD
        EPYC: low-shot k = 16 at 1,000 images (ratio 11) and k = 32 at VOC07 size (14) run 1.2-1.4x faster
        in the kernel path; 3-fold CV at 1,000 images (667 rows, ratio 99) 1.9x slower."""
        if self.gram is None or rows_per_problem > self.kernel_rows:
            return False
        return rows_per_problem ** 3 / 3 <= self.kernel_cost_ratio * rows_in_call * self.basis.rank

    def _record(self, info: SolveInfo, progress) -> None:
        """Keep a batch's solve statistics (warning if some problems did not converge); advance the bar."""
        self.info.append(info)
        if info.converged < info.problems:
            warnings.warn(f"TorchSVM: {info.problems - info.converged} of {info.problems} problems did "
                          f"not reach tol={self.tol} in {self.max_newton} Newton steps", RuntimeWarning)
        if progress is not None:
            progress.update(info.problems)

    def _score(self, W: torch.Tensor, ids, evals, out) -> None:
        """Decision values of solutions W (in the basis' coordinates) on the evaluation matrices: Z W^T on
        the training rows, X (W V^T)^T on a matrix X in feature space. Mapping a batch's solutions back
        costs P x r x (D+1) flops where projecting X once cost M x r x (D+1) (at VOC07's 8192-d, 4,952 test
        images against a batch of 20 final fits)."""
        W, W_feat = W.to(self.score_dtype), None
        for e in evals:
            if e == "train":
                scores = matmul(self.matrices["train"], W.T)
            else:
                W_feat = matmul(W, self.basis.V.T) if W_feat is None else W_feat
                scores = matmul(self.matrices[e], W_feat.T)
            out[e][ids] = scores.T.cpu().numpy()

    def _fit_kernel(self, labels, train_mask, costs, evals, out, progress) -> dict[str, np.ndarray]:
        """`fit_scores` when every problem trains on few rows (`use_kernel`; low-shot k <= 32 at VOC07
        size): each problem in the coefficients of its own rows (`kernel_newton_solve`), its Gram matrix
        gathered from the training Gram matrix, instead of matrix products over every row of the call."""
        n_rows = train_mask.sum(1)
        n, pad = int(n_rows.max()), self.n_train  # index n_train: the zero row of the padded Gram matrix
        order = np.argsort(~train_mask, axis=1, kind="stable")[:, :n]
        valid = np.arange(n)[None, :] < n_rows[:, None]
        R = np.where(valid, order, pad)
        own = np.take_along_axis(labels, np.minimum(R, pad - 1), 1)  # each problem's labels on its rows
        y_all = np.where(own > 0, 1.0, -1.0)
        c_all = problem_costs(own, valid, costs)
        R_t = torch.as_tensor(R, device=self.device)
        stages = _cost_chains(np.where(labels > 0, 1.0, -1.0), train_mask, costs)
        # one Gram matrix per chain (its problems share their rows), gathered once
        root = {p: i for i, (p, _) in enumerate(stages[0])}
        first = R_t[[p for p, _ in stages[0]]]
        ext = torch.cat([first, torch.full_like(first[:, :1], pad)], 1)  # + the zero row of the padded gram
        K_chain = gather_blocks(self.gram, ext, ext)
        warm: dict[int, tuple] = {}  # problem -> (beta, scores K beta, K u at beta) at its solution
        for stage in stages:
            for p, prev in stage:
                if prev is not None:
                    root[p] = root[prev]
            for start in range(0, len(stage), self.batch_size):
                batch = stage[start:start + self.batch_size]
                ids = [p for p, _ in batch]
                at = [root[p] for p in ids]
                K = K_chain if at == list(range(len(K_chain))) else K_chain[at]
                y = torch.as_tensor(y_all[ids], dtype=self.dtype, device=self.device)
                c = torch.as_tensor(c_all[ids], dtype=self.dtype, device=self.device)
                B0 = O0 = KU0 = None
                if self.warm_start and any(prev is not None for _, prev in batch):
                    zero = torch.zeros(n, dtype=self.dtype, device=self.device)
                    B0 = torch.stack([warm[prev][0] if prev is not None else zero for _, prev in batch])
                    if all(prev is not None for _, prev in batch):  # the usual case: a whole stage of chains
                        ratio = torch.tensor([costs[p] / costs[prev] for p, prev in batch], dtype=self.dtype,
                                             device=self.device)
                        O0 = torch.stack([warm[prev][1] for _, prev in batch])
                        KU0 = rescaled_gradient(O0, torch.stack([warm[prev][2] for _, prev in batch]), ratio)
                beta, O, KU, info = kernel_newton_solve(K, y, c, tol=self.tol, max_newton=self.max_newton, B0=B0,
                                                        O0=O0, KU0=KU0)
                warm.update({p: (beta[i], O[i], KU[i]) for i, p in enumerate(ids)})
                self._record(info, progress)
        # w = Z_R^T beta in the basis' coordinates, a block of chains at a time: each chain's rows of Z are
        # gathered once for all its costs (a product over every training row would cost N / n times more)
        chain = np.array([root[p] for p in range(len(labels))])
        slot = np.zeros(len(chain), dtype=np.int64)  # a problem's place in its chain
        by_chain = np.argsort(chain, kind="stable")
        starts = np.searchsorted(chain[by_chain], chain[by_chain])
        slot[by_chain] = np.arange(len(chain)) - starts
        coefs = torch.zeros(len(first), int(slot.max()) + 1, n, dtype=self.dtype, device=self.device)
        coefs[torch.as_tensor(chain), torch.as_tensor(slot)] = torch.stack([warm[p][0] for p in range(len(chain))])
        coefs *= (first < pad)[:, None, :]  # padding rows carry no weight
        step = max(1, (1 << 28) // (n * self.basis.rank * self.basis.Z.element_size()))
        for c0 in range(0, len(first), step):
            W = coefs[c0:c0 + step] @ self.basis.Z[first[c0:c0 + step].clamp_max(pad - 1)]
            ids = np.flatnonzero((chain >= c0) & (chain < c0 + step))
            self._score(W[chain[ids] - c0, slot[ids]], ids, evals, out)
        return out


def _cost_chains(y: np.ndarray, mask: np.ndarray, costs: np.ndarray) -> list[list[tuple[int, int | None]]]:
    """Stages of (problem, warm-start problem or None): problems with equal labels and training rows form a
    chain ordered by cost; stage k holds every chain's k-th problem, warm-started from its (k-1)-th."""
    chains: dict[bytes, list[int]] = {}
    for p in range(len(y)):
        key = np.packbits(mask[p]).tobytes() + np.packbits(y[p] > 0).tobytes()
        chains.setdefault(key, []).append(p)
    stages: list[list[tuple[int, int | None]]] = []
    for chain in chains.values():
        chain.sort(key=lambda p: costs[p])
        for k, p in enumerate(chain):
            if k == len(stages):
                stages.append([])
            stages[k].append((p, chain[k - 1] if k else None))
    return stages


def make_solver(name: str, train: np.ndarray, evals: Mapping[str, np.ndarray] | None = None, *,
                device: str = "cpu", precision: str = "mixed", tol: float = 1e-6, n_jobs: int = 1,
                max_iter: int = SKLEARN_MAX_ITER):
    """`torch` (batched Newton-CG) or `sklearn` (the LinearSVC reference) over the same interface."""
    if name == "torch":
        return TorchSVM(train, evals, device=device, precision=precision, tol=tol)
    if name == "sklearn":
        return SklearnSVM(train, evals, n_jobs=n_jobs, max_iter=max_iter)
    raise ValueError(f"unknown SVM solver {name!r}; expected 'torch' or 'sklearn'")
