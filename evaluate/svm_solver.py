"""Linear SVM solvers for the VOC07 / low-shot SVM protocols: a batched torch solver and the sklearn reference.

The model is exactly the one VISSL and MMSelfSup train (vissl/utils/svm_utils/svm_trainer.py):
`sklearn.svm.LinearSVC(C, class_weight={1: 2, -1: 1}, intercept_scaling=1, penalty="l2",
loss="squared_hinge", dual=True, tol=1e-4, max_iter=2000)`, i.e. liblinear's L2-regularised L2-loss SVM
with the bias as an extra constant feature (so the bias is regularised too):

    min_w  1/2 |w|^2 + sum_i c_i max(0, 1 - y_i w.[x_i, 1])^2,     c_i = C * class_weight[y_i].

Both solvers implement one interface, `fit_scores`: given P problems, each a set of training rows of the
same training matrix, its +-1 labels and cost, return every problem's decision values on named evaluation
matrices. The protocols (evaluate/svm.py, evaluate/lowshot.py) only ever call that.

`TorchSVM` solves all P problems at once, in the primal, by Newton's method with an exact line search
(Keerthi & DeCoste 2005, "A modified finite Newton method for fast solution of large scale linear SVMs";
Chapelle 2007, "Training a support vector machine in the primal"). It works in an orthogonal basis of the
span of the training features (`Basis`): a Gram-matrix eigenbasis when there are fewer images than
dimensions (VOC's 8192-d features), a PCA rotation otherwise, so a row costs min(N, D+1) numbers and
Jacobi preconditioning is effective; folds and low-shot samples are cost-zero rows, so all
(class, cost, fold) problems share one basis. Newton directions come from batched preconditioned CG (a
few matrix products over the whole batch per step: cheap for small C, where nearly every row is active
and the Hessian is well conditioned), or, once CG would cost more, from an exact solve of the dual of the
active set (one Cholesky of |S| x |S|: cheap for large C, where few rows are active and CG crawls); after a
cost's first exact step the active sets move by a few dozen rows, and the previous factorisation is
updated for them instead of redone. Problems that each train on few rows (low-shot k <= 32) are solved
in the coefficients of their own rows instead (`kernel_newton_solve`). Costs
are solved in increasing order, each warm-started from the previous one. It stops at the optimum
(|grad| <= tol * |grad at 0|), which liblinear's dual coordinate descent approaches to its own tolerance;
tests/test_eval_svm.py bounds the differences.
"""
from __future__ import annotations

import ctypes
import math
import os
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

# VISSL / MMSelfSup settings of LinearSVC, the reference model
CLASS_WEIGHT = {1: 2.0, -1: 1.0}
SKLEARN_TOL = 1e-4
SKLEARN_MAX_ITER = 2000


def l2_normalize(feats: np.ndarray) -> np.ndarray:
    """Row-normalise as VISSL's `_normalize_features`: x / (|x| + 1e-5), in float64 (a new array)."""
    feats = np.asarray(feats, dtype=np.float64)
    return feats / (np.linalg.norm(feats, axis=1, keepdims=True) + 1e-5)


def problem_costs(labels: np.ndarray, train_mask: np.ndarray, costs: np.ndarray) -> np.ndarray:
    """Per-sample costs c_i (P, N): C x class weight on a problem's training rows, 0 elsewhere."""
    weight = np.where(labels > 0, CLASS_WEIGHT[1], CLASS_WEIGHT[-1])
    return np.asarray(costs, dtype=np.float64)[:, None] * weight * train_mask


def _check_problems(labels, train_mask, costs, n_train) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


# ----------------------------------------------------------------------------------------------------
# The batched torch solver
# ----------------------------------------------------------------------------------------------------

def gram_matrix(F: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """F F^T, computing only the row blocks' products on and left of the diagonal and mirroring them (the
    matrix is symmetric): (blocks + 1) / (2 blocks) of one matrix product's flops, 5/8 with 4 blocks."""
    n = len(F)
    out = torch.empty(n, n, dtype=F.dtype, device=F.device)
    edges = [round(i * n / blocks) for i in range(blocks + 1)]
    for a, b in zip(edges[:-1], edges[1:]):
        out[a:b, :b] = F[a:b] @ F[:b].T
        out[:a, a:b] = out[a:b, :a].T
    return out


class Basis:
    """An orthonormal basis V (d x r) of the row span of F (n x d), with Z = F V having orthogonal columns.

    For d <= n it is the eigenbasis of F^T F (PCA rotation); otherwise V = F^T U diag(lam)^-1/2 from the
    eigendecomposition F F^T = U diag(lam) U^T, so Z = U diag(lam)^1/2. Directions with eigenvalue below
    `rel_eps * lam_max` are dropped: the SVM optimum has no component outside the training rows' span.
    `gram` is F F^T (= Z Z^T) when the eigenbasis came from it, else None.
    """

    def __init__(self, feats: torch.Tensor, rel_eps: float = 1e-12):
        n, d = feats.shape
        self.gram = None
        if d <= n:
            lam, vecs = torch.linalg.eigh(feats.T @ feats)
            keep = lam > rel_eps * lam.max().clamp_min(1e-300)
            self.V = vecs[:, keep].flip(1)
            self.Z = feats @ self.V
        else:
            self.gram = gram_matrix(feats)
            lam, U = torch.linalg.eigh(self.gram)
            keep = lam > rel_eps * lam.max().clamp_min(1e-300)
            lam, U = lam[keep].flip(0), U[:, keep].flip(1)
            self.V = (feats.T @ U) / lam.sqrt()
            self.Z = U * lam.sqrt()
        self.Z = self.Z.contiguous()

    @property
    def rank(self) -> int:
        return self.Z.shape[1]

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        return feats @ self.V


@dataclass
class SolveInfo:
    newton_iters: int
    cg_iters: int
    converged: int
    problems: int


def _pcg(hvp, rhs: torch.Tensor, precond: torch.Tensor, rtol: torch.Tensor, budget: torch.Tensor):
    """Batched preconditioned conjugate gradients: solve H_p x_p = rhs_p for every row p.

    `hvp(V, rows)` applies the (symmetric positive definite) H of problems `rows` to the rows of V;
    `precond` holds the diagonal of each H (Jacobi). A row leaves the working set (so the matrix products
    shrink) once |r_p| <= rtol_p |rhs_p| or after budget_p steps. Returns x, the number of steps of the
    longest row, and which rows ran out of budget unconverged (x is then a truncated-CG descent direction).
    """
    x = torch.zeros_like(rhs)
    exhausted = torch.zeros(len(rhs), dtype=torch.bool, device=rhs.device)
    live = torch.arange(len(rhs), device=rhs.device)
    r = rhs.clone()
    z = r / precond
    p = z.clone()
    rz = (r * z).sum(1)
    target = rtol * rhs.norm(dim=1)
    tiny = torch.finfo(rhs.dtype).tiny
    iters = 0
    while len(live):
        iters += 1
        hp = hvp(p, live)
        alpha = rz / (p * hp).sum(1).clamp_min(tiny)
        x[live] += alpha[:, None] * p
        r -= alpha[:, None] * hp
        unconverged = r.norm(dim=1) > target
        out_of_budget = unconverged & (budget[live] <= iters)
        exhausted[live[out_of_budget]] = True
        go = unconverged & ~out_of_budget
        if not bool(go.all()):
            live, r, p, rz, target = live[go], r[go], p[go], rz[go], target[go]
            if not len(live):
                break
        z = r / precond[live]
        rz_new = (r * z).sum(1)
        p = z + (rz_new / rz.clamp_min(tiny))[:, None] * p
        rz = rz_new
    return x, iters, exhausted


def _line_search(wd, dd, xi, q, cost, iters: int = 40):
    """Exact minimiser t of phi(t) = f(w + t d) for every problem (phi is a convex piecewise quadratic).

    With xi = 1 - y.o (margins) and q = y.(Z d): phi'(t) = w.d + t d.d - 2 sum c q (xi - t q)_+.
    Safeguarded Newton on phi' from t = 1 (the exact step if no margin changes side), bisecting when a
    step leaves the bracket [lo, hi] with phi'(lo) < 0 < phi'(hi).
    """
    P = wd.shape[0]
    t = torch.ones_like(wd)
    lo = torch.zeros_like(wd)
    hi = torch.full_like(wd, math.inf)
    cq = cost * q
    cqq = cq * q
    slope0 = wd.abs() + 1e-300
    for _ in range(iters):
        m = (xi - t[:, None] * q).clamp_min(0)
        d1 = wd + t * dd - 2 * (cq * m).sum(1)
        d2 = dd + 2 * (cqq * (m > 0)).sum(1)
        done = d1.abs() <= 1e-12 * slope0
        lo = torch.where(d1 < 0, t, lo)
        hi = torch.where(d1 > 0, t, hi)
        step = t - d1 / d2
        inside = (step > lo) & (step < hi)
        bisect = torch.where(torch.isfinite(hi), (lo + hi) / 2, 2 * t)
        t = torch.where(done, t, torch.where(inside, step, bisect))
        if bool(done.all()):
            break
    return t


def padded_gram(K: torch.Tensor) -> torch.Tensor:
    """K with one more row and column of zeros (index N): what `_direct_directions` gathers active sets from,
    so a padding index needs no masking."""
    n = len(K)
    out = torch.zeros(n + 1, n + 1, dtype=K.dtype, device=K.device)
    out[:n, :n] = K
    return out


@dataclass
class ActiveSetFactors:
    """Factorised active-set systems of a chunk of problems, kept between Newton steps of one `newton_solve`
    call (the costs, hence the diagonals, are fixed there): `idx` (b, s) the rows each was built on, padded
    with the padding row N, and `L` (b, s, s) the lower Cholesky factors of K_SS + diag(1/2a_S) (unit rows
    and columns at the padding; only the lower triangle is the factor, see `cholesky_lower`). A problem
    refers to its factor as (chunk, position)."""
    idx: torch.Tensor
    L: torch.Tensor


def _mkl_potrf():
    """LAPACK's dpotrf from the MKL inside torch's CPU library, or None (another BLAS, another platform)."""
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        fn = lib.dpotrf_
    except (OSError, AttributeError):
        return None
    fn.restype = None
    return fn


_POTRF = _mkl_potrf()


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the OS (process-wide).

    glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh mmap, so each of the
    solver's large temporaries (gathered active sets, factors, score blocks) pays a page fault per 4 KB
    page on first touch. With both thresholds at 2 GB such blocks come from, and go back to, malloc's heap
    (once it has grown to fit them): on the 2048-d low-shot protocol the kernel's time fell from 12 to 5 s
    and the wall time by ~5%; peak RSS stays the high-water mark. Returns whether glibc accepted the
    settings (False on other C libraries, where nothing changes).
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, limit = -1, -3, 2 ** 31 - 1
    return bool(mallopt(M_TRIM_THRESHOLD, limit)) and bool(mallopt(M_MMAP_THRESHOLD, limit))


def cholesky_lower(M: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factors of a batch of SPD matrices (b, s, s), for `torch.linalg.solve_triangular`.

    On the CPU in float64 the factorisation runs in place in M (which it overwrites) through LAPACK's dpotrf,
    and the factor is returned as a transposed view whose other triangle still holds M: triangular solves
    never read it. That skips torch's copy of M and its zeroing of the upper triangle, which together cost
    more than the factorisation itself (2.3x faster at 16 x 900 x 900). Elsewhere: torch.linalg.cholesky.
    """
    if _POTRF is None or M.device.type != "cpu" or M.dtype != torch.float64 or not M.is_contiguous():
        return torch.linalg.cholesky(M)
    b, s, _ = M.shape
    uplo, n, info = ctypes.c_char(b"L"), ctypes.c_int(s), ctypes.c_int(0)
    base, stride = M.data_ptr(), M.stride(0) * M.element_size()
    for i in range(b):  # column-major view of a symmetric row-major matrix: the same matrix
        _POTRF(ctypes.byref(uplo), ctypes.byref(n), ctypes.c_void_p(base + i * stride), ctypes.byref(n),
               ctypes.byref(info))
        if info.value:
            raise torch.linalg.LinAlgError(f"cholesky: matrix {i} of the batch is not positive definite "
                                           f"(leading minor of order {info.value})")
    return M.mT


def _active_set_solve(K_SS: torch.Tensor, a: torch.Tensor, y: torch.Tensor, valid: torch.Tensor):
    """g = (K_SS + diag(1/2a))^-1 y for a batch of gathered active sets (b, s, s; overwritten), rows where
    `valid` is False being padding, gathered from a zero row and column (they become unit rows: g is 0
    there); returns g and the factor."""
    M = K_SS.to(torch.float64)
    M.diagonal(dim1=1, dim2=2).add_(torch.where(valid, 0.5 / a, 1.0))
    L = cholesky_lower(M)
    rhs = torch.where(valid, y, 0.0).to(torch.float64)[..., None]
    g = torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, rhs, upper=False), upper=True)
    return g[..., 0], L


def _refactored_duals(Kpad: torch.Tensor, Y: torch.Tensor, A: torch.Tensor, sizes: torch.Tensor,
                      order: torch.Tensor, s: int):
    """Dual solutions g (b, N+1; column N is padding) of b active-set systems, each by a fresh Cholesky
    factorisation of its K_SS + diag(1/2a_S) (padded to s rows with decoupled unit rows), and the factors."""
    pad = len(Kpad) - 1
    valid = torch.arange(s, device=Kpad.device)[None, :] < sizes[:, None]
    idx = torch.where(valid, order[:, :s], pad)
    at = idx.clamp_max(pad - 1)
    gamma, L = _active_set_solve(Kpad[idx[:, :, None], idx[:, None, :]], A.gather(1, at), Y.gather(1, at), valid)
    dual = torch.zeros(len(idx), pad + 1, dtype=gamma.dtype, device=Kpad.device)
    dual.scatter_(1, idx, torch.where(valid, gamma, 0.0))
    return dual, ActiveSetFactors(idx, L)


def _updated_duals(Kpad: torch.Tensor, Y: torch.Tensor, A: torch.Tensor, F: ActiveSetFactors):
    """Dual solutions g (b, N+1) of b active-set systems from the Cholesky factors of earlier, slightly different
    active sets (same costs), or None if a small system below is not numerically positive definite.

    With R = the factor's rows, S = the current active set, Add = S \\ R and Drop = R \\ S: the system on
    U = R + Add is bordered, M_U = [[M_R, B], [B^T, M_AA]], whose factor is [[L, 0], [W^T, L_A]] with W = L^-1 B
    and L_A = chol(M_AA - W^T W); then g = M_U^-1 (y_U + E_D mu) with g_Drop = 0 fixes the multipliers
    mu = -(E_D^T M_U^-1 E_D)^-1 E_D^T M_U^-1 y_U. Triangular solves with |Add| + 2 |Drop| + 2 columns and
    a few small systems replace a gather and a Cholesky of |S| x |S| (~|S|/3 columns' worth of flops).
    """
    pad, dev = len(Kpad) - 1, Kpad.device
    L, ref = F.L, F.idx
    b, m = ref.shape
    ref_valid = ref < pad
    active = torch.cat([A > 0, torch.zeros(b, 1, dtype=torch.bool, device=dev)], 1)  # (b, N+1)
    drop = ref_valid & ~active.gather(1, ref)
    in_ref = torch.zeros_like(active).scatter_(1, ref, ref_valid)
    add = active & ~in_ref
    n_add, n_drop = add.sum(1), drop.sum(1)
    amax, dmax = int(n_add.max()), int(n_drop.max())
    valid_a = torch.arange(amax, device=dev)[None, :] < n_add[:, None]
    add_idx = torch.where(valid_a, torch.argsort((~add).to(torch.int8), dim=1, stable=True)[:, :amax], pad)
    valid_d = torch.arange(dmax, device=dev)[None, :] < n_drop[:, None]
    drop_pos = torch.argsort((~drop).to(torch.int8), dim=1, stable=True)[:, :dmax]  # positions in R
    y_ref = torch.where(ref_valid, Y.gather(1, ref.clamp_max(pad - 1)), 0.0).to(torch.float64)
    y_add = torch.where(valid_a, Y.gather(1, add_idx.clamp_max(pad - 1)), 0.0).to(torch.float64)

    # right-hand sides: y_U, then the unit vectors of the dropped rows
    R1 = torch.zeros(b, m, 1 + dmax, dtype=torch.float64, device=dev)
    R1[:, :, 0] = y_ref
    R1[:, :, 1:].scatter_(1, drop_pos[:, None, :], valid_d[:, None, :].to(torch.float64))
    X1 = torch.linalg.solve_triangular(L, R1, upper=False)
    if amax:
        B = Kpad[ref[:, :, None], add_idx[:, None, :]].to(torch.float64)
        Maa = Kpad[add_idx[:, :, None], add_idx[:, None, :]].to(torch.float64)
        Maa.diagonal(dim1=1, dim2=2).add_(torch.where(valid_a, 0.5 / A.gather(1, add_idx.clamp_max(pad - 1)), 1.0))
        Wb = torch.linalg.solve_triangular(L, B, upper=False)
        La, info = torch.linalg.cholesky_ex(Maa - Wb.mT @ Wb)
        if bool((info != 0).any()):
            return None
        R2 = torch.zeros(b, amax, 1 + dmax, dtype=torch.float64, device=dev)
        R2[:, :, 0] = y_add
        X2 = torch.linalg.solve_triangular(La, R2 - Wb.mT @ X1, upper=False)
        Z2 = torch.linalg.solve_triangular(La.mT, X2, upper=True)
        X1 = X1 - Wb @ Z2
    Z1 = torch.linalg.solve_triangular(L.mT, X1, upper=True)
    g1 = Z1[:, :, 0]
    g2 = Z2[:, :, 0] if amax else None
    if dmax:  # multipliers that make g vanish on the dropped rows
        eye = torch.eye(dmax, dtype=torch.bool, device=dev)
        both = valid_d[:, :, None] & valid_d[:, None, :]
        G = torch.where(both, Z1[:, :, 1:].gather(1, drop_pos[:, :, None].expand(b, dmax, dmax)), eye.double())
        Lg, info = torch.linalg.cholesky_ex(G)
        if bool((info != 0).any()):
            return None
        rhs = torch.where(valid_d, -g1.gather(1, drop_pos), 0.0)
        mu = torch.cholesky_solve(rhs[..., None], Lg)
        g1 = g1 + (Z1[:, :, 1:] @ mu)[..., 0]
        if amax:
            g2 = g2 + (Z2[:, :, 1:] @ mu)[..., 0]
    dual = torch.zeros(b, pad + 1, dtype=torch.float64, device=dev)
    dual.scatter_(1, ref, torch.where(ref_valid & ~drop, g1, 0.0))
    if amax:
        dual.scatter_(1, add_idx, torch.where(valid_a, g2, 0.0))
    return dual


def _direct_directions(Z: torch.Tensor, Kpad: torch.Tensor, Y: torch.Tensor, A: torch.Tensor, W: torch.Tensor,
                       factors: list | None = None, max_bytes: int = 1 << 27, update_ratio: float = 2.0):
    """Exact Newton directions through the dual of the active set S (rows with a positive a = cost x violated).

    On a fixed S the objective is quadratic with minimiser w+ = Z_S^T g, (K_SS + diag(1/2a_S)) g = y_S
    (K = Z Z^T, given as `padded_gram(K)`), one Cholesky solve of size |S| instead of many CG steps; worth
    it when |S| is small, which is where CG is slowest (large C: few margin violators, ill-conditioned
    Hessian). Problems are sorted by |S|, padded to the largest |S| of a chunk (the zero row of Kpad, unit
    diagonal) and solved in float64 (a float32 factorisation is too inexact at large C for Newton to reach
    a tight tolerance).

    `factors` holds, per problem, None or the (ActiveSetFactors, position) of its factorisation at an
    earlier Newton step of the same costs. A chunk whose active sets all moved little from those rows is
    solved by updating the factors (`_updated_duals`: triangular solves with |Add| + 2|Drop| + 2 columns,
    used while that is at most `update_ratio` x the |S|/3 columns' worth of a new Cholesky), the others
    are refactorised. Returns the directions and each problem's factor reference for the next step.
    """
    pad = len(Kpad) - 1
    act = A > 0
    sizes = act.sum(1)
    factors = list(factors) if factors is not None else [None] * len(W)
    dual = torch.zeros(len(W), pad + 1, dtype=torch.float64, device=Z.device)
    refactor = [True] * len(W)
    chunks: dict[int, list[int]] = {}  # factor chunk -> the problems that refer to it
    for p, ref in enumerate(factors):
        if ref is not None:
            chunks.setdefault(id(ref[0]), []).append(p)
    for members in chunks.values():
        F = factors[members[0]][0]
        pos = torch.tensor([factors[p][1] for p in members], device=Z.device)
        sel = torch.tensor(members, device=Z.device)
        ref = F.idx[pos]
        ref_valid = ref < pad
        act_pad = torch.cat([act[sel], torch.zeros(len(sel), 1, dtype=torch.bool, device=Z.device)], 1)
        kept = (act_pad.gather(1, ref) & ref_valid).sum(1)
        n_drop = ref_valid.sum(1) - kept
        cols = (sizes[sel] - kept) + 2 * n_drop + 2
        near = (cols * 3 <= update_ratio * sizes[sel]) & (sizes[sel] > 0)  # the others are refactorised
        if not bool(near.any()):
            continue
        pos, sel = pos[near], sel[near]
        if 2 * len(pos) >= len(F.idx):  # update the whole chunk rather than copy factors out of it: the
            # positions not updated get their factor's own rows as active set and y = 0 (nothing to do)
            Yc = torch.zeros(len(F.idx), Y.shape[1], dtype=Y.dtype, device=Z.device)
            Ac = torch.zeros(len(F.idx), pad + 1, dtype=A.dtype, device=Z.device).scatter_(1, F.idx, 1.0)[:, :pad]
            Yc[pos], Ac[pos] = Y[sel], A[sel]
            got = _updated_duals(Kpad, Yc, Ac, F)
            got = got[pos] if got is not None else None
        else:
            got = _updated_duals(Kpad, Y[sel], A[sel], ActiveSetFactors(F.idx[pos], F.L[pos]))
        if got is not None:
            dual[sel] = got
            for p in sel.tolist():
                refactor[p] = False
    todo = torch.tensor([p for p in range(len(W)) if refactor[p]], dtype=torch.long, device=Z.device)
    if len(todo):
        order = torch.argsort((~act[todo]).to(torch.int8), dim=1, stable=True)  # active rows first, in row order
        by_size = torch.argsort(sizes[todo])  # chunks of problems with similar |S|: little padding
        sorted_sizes = sizes[todo][by_size].tolist()
        start = 0
        while start < len(todo):
            end = start + 1  # grow the chunk while its padded systems fit in max_bytes
            while end < len(todo) and (end + 1 - start) * sorted_sizes[end] ** 2 * 8 <= max_bytes:
                end += 1
            sl, s = by_size[start:end], sorted_sizes[end - 1]
            start = end
            rows = todo[sl]
            if s == 0:  # nothing active: w+ = 0
                for p in rows.tolist():
                    factors[p] = None
                continue
            d, F = _refactored_duals(Kpad, Y[rows], A[rows], sizes[rows], order[sl], s)
            dual[rows] = d
            for i, p in enumerate(rows.tolist()):
                factors[p] = (F, i)
    return dual[:, :pad].to(Z.dtype) @ Z - W, factors


def gradient_norm_at_zero(Z: torch.Tensor, labels: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    """|gradient| of each problem's objective at w = 0: |2 Z^T (cost * labels)| (the convergence scale)."""
    return (2 * ((cost * labels) @ Z)).norm(dim=1)


def newton_solve(Z: torch.Tensor, labels: torch.Tensor, cost: torch.Tensor, tol: float = 1e-6,
                 max_newton: int = 100, max_cg: int = 500, W0: torch.Tensor | None = None,
                 cg_dtype: torch.dtype | None = None, K: torch.Tensor | None = None,
                 direct0: torch.Tensor | None = None, Z2: torch.Tensor | None = None,
                 O0: torch.Tensor | None = None, g0: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, SolveInfo, torch.Tensor, torch.Tensor]:
    """Minimise 1/2|w_p|^2 + sum_i cost[p,i] max(0, 1 - labels[p,i] Z_i.w_p)^2 for every problem p.

    Z: (N, r) shared design; labels (P, N) +-1; cost (P, N) >= 0 (0 = row not in problem p's training
    set). Returns W (P, r). Newton directions come from preconditioned CG on the primal Hessian; given the
    Gram matrix K = Z Z^T (as `padded_gram(K)`), a problem whose CG needs more steps than an exact dual solve
    of its active set S would cost (|S|^3/3 flops against 4 N r per step) keeps its truncated-CG direction for that step and
    switches to exact solves (`_direct_directions`): cheap CG for small C (nearly all rows active, well
    conditioned), Cholesky for large C (few active rows, ill-conditioned). An exact line search follows.
    A problem is done once |grad| <= tol * |grad at w=0|; done problems leave the batch. `direct0` marks
    problems that start with exact solves (warm starts whose predecessor ended with them); the same mask at
    the end is returned third, the training scores Z w at the solutions fourth. Quantities the caller has
    may be passed in rather than recomputed (a matrix product each): `Z2` = Z * Z (for the Jacobi
    preconditioner), `O0` = W0 Z^T, `g0` = |gradient at w = 0| per problem.
    """
    P, N = labels.shape
    r = Z.shape[1]
    W_out = torch.zeros(P, r, dtype=Z.dtype, device=Z.device)
    Z2 = Z * Z if Z2 is None else Z2
    Zlow = Z.to(cg_dtype) if cg_dtype is not None else None
    cy_all = cost * labels
    g0 = gradient_norm_at_zero(Z, labels, cost) if g0 is None else g0
    idx = torch.arange(P, device=Z.device)
    W = W_out.clone() if W0 is None else W0.clone()
    O = (W @ Z.T if O0 is None else O0.clone())  # scores Z w on the training rows
    O_out = torch.empty(P, N, dtype=Z.dtype, device=Z.device)
    Y, C, CY, G0 = labels, cost, cy_all, g0
    direct = torch.zeros(P, dtype=torch.bool, device=Z.device) if direct0 is None or K is None else direct0.clone()
    direct_out = direct.clone()  # switched to exact solves
    factors: list = [None] * P  # each problem's last active-set factorisation (exact steps)
    newton = cg_total = 0
    converged = torch.zeros(P, dtype=torch.bool, device=Z.device)
    for newton in range(1, max_newton + 1):
        xi = 1 - Y * O
        m = xi.clamp_min(0)
        G = W - 2 * ((CY * m) @ Z)
        gn = G.norm(dim=1)
        done = gn <= tol * G0
        if bool(done.any()):
            W_out[idx[done]], O_out[idx[done]] = W[done], O[done]
            converged[idx[done]] = True
            direct_out[idx[done]] = direct[done]
            keep = ~done
            idx, W, O, Y, C, CY, G0, G, gn, xi, direct = (
                a[keep] for a in (idx, W, O, Y, C, CY, G0, G, gn, xi, direct))
            factors = [f for f, k in zip(factors, keep.tolist()) if k]
            if idx.numel() == 0:
                break
        A = C * (xi > 0)
        D = torch.empty_like(W)
        if bool(direct.any()):
            rows = direct.nonzero()[:, 0].tolist()
            D[direct], fs = _direct_directions(Z, K, Y[direct], A[direct], W[direct], [factors[p] for p in rows])
            for p, f in zip(rows, fs):
                factors[p] = f
        if not bool(direct.all()):
            it = ~direct
            Acg = A[it]
            precond = 1 + 2 * (Acg @ Z2)
            rtol = torch.clamp(torch.sqrt(gn[it] / G0[it]), max=0.1)
            if K is not None:  # CG steps worth one Cholesky of the active set
                budget = ((Acg > 0).sum(1).double() ** 3 / 3 / (4 * N * r)).clamp(1, max_cg).long()
            else:
                budget = torch.full((len(Acg),), max_cg, dtype=torch.long, device=Z.device)
            Zc, Ac = (Z, Acg) if cg_dtype is None else (Zlow, Acg.to(cg_dtype))
            Dcg, k, exhausted = _pcg(lambda V, rows: V + 2 * (((V @ Zc.T) * Ac[rows]) @ Zc), (-G[it]).to(Zc.dtype),
                                     precond.to(Zc.dtype), rtol.to(Zc.dtype), budget)
            D[it] = Dcg.to(Z.dtype)
            cg_total += k
            if K is not None:
                direct[it.nonzero()[:, 0][exhausted]] = True
        Delta = D @ Z.T
        t = _line_search((W * D).sum(1), (D * D).sum(1), xi, Y * Delta, C)
        W = W + t[:, None] * D
        O = O + t[:, None] * Delta
    if idx.numel():
        W_out[idx], O_out[idx] = W, O
        direct_out[idx] = direct
    return W_out, SolveInfo(newton, cg_total, int(converged.sum()), P), direct_out, O_out


def kernel_newton_solve(K: torch.Tensor, labels: torch.Tensor, cost: torch.Tensor, tol: float = 1e-6,
                        max_newton: int = 100, B0: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, SolveInfo]:
    """`newton_solve` for problems that each train on few rows, in the coefficients of their own rows.

    Problem p trains on n rows R_p (padding rows have cost 0) with Gram matrix Z_Rp Z_Rp^T = K[p, :n, :n],
    K (P, n+1, n+1) being zero in its last row and column (where active-set gathers send padding); every
    iterate is w_p = Z_Rp^T beta_p, the optimum's form, so scores are K beta, |w|^2 = beta^T K beta,
    and the gradient Z_Rp^T (beta - 2 c y (1 - y K beta)_+) has norm^2 u^T K u. Each step is the exact
    active-set step of `_direct_directions` (a Cholesky of |S| <= n rows, gathered from the problem's own
    K) and the same exact line search; nothing costs more than n^2 per problem but the factorisation,
    where the shared-basis solver's matrix products cost (rows of all problems) x rank. Returns beta (P, n).
    """
    P, n = labels.shape
    dev = K.device
    Kn = K[:, :n, :n]  # (a strided view: products read it in place)
    B_out = torch.zeros(P, n, dtype=K.dtype, device=dev)
    B = B_out.clone() if B0 is None else B0.clone()
    O = (Kn @ B[..., None])[..., 0]
    CY = cost * labels
    G0 = (4 * (CY * (Kn @ CY[..., None])[..., 0]).sum(1)).clamp_min(0).sqrt()
    idx = torch.arange(P, device=dev)
    live = torch.ones(P, dtype=torch.bool, device=dev)  # not yet converged
    Y, C = labels, cost
    converged = torch.zeros(P, dtype=torch.bool, device=dev)
    newton = 0
    for newton in range(1, max_newton + 1):
        xi = 1 - Y * O
        U = B - 2 * CY * xi.clamp_min(0)
        gn = (U * (Kn @ U[..., None])[..., 0]).sum(1).clamp_min(0).sqrt()
        done = live & (gn <= tol * G0)
        if bool(done.any()):
            B_out[idx[done]] = B[done]
            converged[idx[done]] = True
            live &= ~done
            if not bool(live.any()):
                break
            if 2 * int(live.sum()) <= len(live):  # compact once half are done (K is the big copy)
                idx, B, O, Y, C, CY, G0, xi, K, live = (a[live] for a in (idx, B, O, Y, C, CY, G0, xi, K, live))
                Kn = K[:, :n, :n]
        A = C * (xi > 0) * live[:, None]
        act = A > 0
        sizes = act.sum(1)
        s = int(sizes.max())
        target = torch.zeros_like(B)
        if s:
            go = (sizes > 0).nonzero()[:, 0]
            order = torch.argsort((~act[go]).to(torch.int8), dim=1, stable=True)[:, :s]
            valid = torch.arange(s, device=dev)[None, :] < sizes[go, None]
            sel = torch.where(valid, order, n)  # padding: the zero row
            at = sel.clamp_max(n - 1)
            K_SS = torch.gather(K[go[:, None], sel], 2, sel[:, None, :].expand(-1, s, s))  # rows, then columns
            g, _ = _active_set_solve(K_SS, A[go].gather(1, at), Y[go].gather(1, at), valid)
            full = torch.zeros(len(go), n + 1, dtype=torch.float64, device=dev)
            full.scatter_(1, sel, torch.where(valid, g, 0.0))
            target[go] = full[:, :n].to(B.dtype)
        Dir = torch.where(live[:, None], target - B, 0.0)
        KD = (Kn @ Dir[..., None])[..., 0]
        t = _line_search((B * KD).sum(1), (Dir * KD).sum(1), xi, Y * KD, C)
        B = B + t[:, None] * Dir
        O = O + t[:, None] * KD
    if bool(live.any()):
        B_out[idx[live]] = B[live]
    return B_out, SolveInfo(newton, 0, int(converged.sum()), P)


# precision name -> (dtype of the Newton iterates and gradients, dtype of the inner CG solves or None = same)
# (An all-float32 mode is not offered: its gradients and line searches cannot reach tol=1e-6.)
PRECISIONS = {"float64": (torch.float64, None), "mixed": (torch.float64, torch.float32)}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class TorchSVM:
    """Batched solver for many LinearSVC problems on one training matrix (see the module docstring).

    train: (N, D) features (already L2-normalised if the protocol asks for it); evals: name -> (M, D)
    matrices to score, "train" always available. Everything is projected once onto the basis of the
    bias-augmented training rows; each `fit_scores` call may then solve any number of problems.
    """

    def __init__(self, train: np.ndarray, evals: Mapping[str, np.ndarray] | None = None, device: str = "cpu",
                 precision: str = "float64", tol: float = 1e-6, max_newton: int = 100, max_cg: int = 500,
                 batch_size: int = 1024, warm_start: bool = True, max_gram_rows: int = 20000,
                 kernel_rows: int = 700):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.warm_start = warm_start
        self.dtype, self.cg_dtype = PRECISIONS[precision]
        self.tol, self.max_newton, self.max_cg, self.batch_size = tol, max_newton, max_cg, batch_size
        self.kernel_rows = kernel_rows
        self.n_train = len(train)
        aug = self._augment(train)
        self.basis = Basis(aug)
        self.projected = {"train": self.basis.Z}
        for name, feats in (evals or {}).items():
            self.projected[name] = self.basis.project(self._augment(feats))
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
        labels, train_mask, costs = _check_problems(labels, train_mask, costs, self.n_train)
        unknown = [e for e in evals if e not in self.projected]
        if unknown:
            raise KeyError(f"no evaluation matrix named {unknown}; have {sorted(self.projected)}")
        out = {e: np.empty((len(labels), len(self.projected[e]))) for e in evals}
        if self.gram is not None and int(train_mask.sum(1).max()) <= self.kernel_rows:
            return self._fit_kernel(labels, train_mask, costs, evals, out, progress)
        rows = np.flatnonzero(train_mask.any(0))
        rows_t = torch.as_tensor(rows, device=self.device)
        Z, sub = self.basis.Z[rows_t], None
        K = None  # Gram matrix of these rows, padded for `_direct_directions`
        if self.gram is not None:
            K = self.gram if len(rows) == self.n_train else padded_gram(self.gram[rows_t][:, rows_t])
        if len(rows) < 0.9 * self.basis.rank:  # clearly fewer rows than dimensions: a basis of just those
            sub = Basis(Z)
            Z = sub.Z
        Z2 = Z * Z
        y_all = np.where(labels[:, rows] > 0, 1.0, -1.0)
        c_all = problem_costs(labels[:, rows], train_mask[:, rows], costs)
        # what later stages start from: solutions (in this call's basis), whether they ended with exact steps,
        # their training scores; and per problem |gradient at 0| / cost (a chain's rows and labels are fixed)
        warm: dict[int, tuple[torch.Tensor, bool, torch.Tensor]] = {}
        g0_per_cost: dict[int, float] = {}
        for stage in _cost_chains(y_all, train_mask[:, rows], costs):
            for start in range(0, len(stage), self.batch_size):
                batch = stage[start:start + self.batch_size]
                ids = [p for p, _ in batch]
                y = torch.as_tensor(y_all[ids], dtype=self.dtype, device=self.device)
                c = torch.as_tensor(c_all[ids], dtype=self.dtype, device=self.device)
                roots = [i for i, (_, prev) in enumerate(batch) if prev is None]
                if roots:
                    g = gradient_norm_at_zero(Z, y[roots], c[roots])
                    g0_per_cost.update({ids[i]: float(v) / costs[ids[i]] for i, v in zip(roots, g.tolist())})
                g0_per_cost.update({p: g0_per_cost[prev] for p, prev in batch if prev is not None})
                g0 = torch.tensor([g0_per_cost[p] * costs[p] for p in ids], dtype=self.dtype, device=self.device)
                W0 = direct0 = O0 = None
                starts = [warm.pop(prev) if prev is not None else None for _, prev in batch]
                if self.warm_start and any(st is not None for st in starts):
                    W0 = torch.stack([st[0] if st is not None else torch.zeros_like(Z[0]) for st in starts])
                    direct0 = torch.tensor([st is not None and st[1] for st in starts], device=self.device)
                    O0 = torch.stack([st[2] if st is not None else torch.zeros_like(Z[:, 0]) for st in starts])
                W, info, direct, O = newton_solve(Z, y, c, tol=self.tol, max_newton=self.max_newton,
                                                  max_cg=self.max_cg, W0=W0, cg_dtype=self.cg_dtype, K=K,
                                                  direct0=direct0, Z2=Z2, O0=O0, g0=g0)
                warm.update({p: (W[i], bool(direct[i]), O[i]) for i, p in enumerate(ids)})
                self._record(info, progress)
                self._score(W @ sub.V.T if sub is not None else W, ids, evals, out)  # in the full basis
        return out

    def _record(self, info: SolveInfo, progress) -> None:
        """Keep a batch's solve statistics (warning if some problems did not converge); advance the bar."""
        self.info.append(info)
        if info.converged < info.problems:
            warnings.warn(f"TorchSVM: {info.problems - info.converged} of {info.problems} problems did "
                          f"not reach tol={self.tol} in {self.max_newton} Newton steps", RuntimeWarning)
        if progress is not None:
            progress.update(info.problems)

    def _score(self, W: torch.Tensor, ids, evals, out) -> None:
        """Decision values of solutions W (in the basis' coordinates) on the evaluation matrices."""
        for e in evals:
            out[e][ids] = (self.projected[e] @ W.T).T.cpu().numpy()

    def _fit_kernel(self, labels, train_mask, costs, evals, out, progress) -> dict[str, np.ndarray]:
        """`fit_scores` when every problem trains on at most `kernel_rows` rows (low-shot k <= 32 at VOC07
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
        K_chain = self.gram[ext[:, :, None], ext[:, None, :]]
        warm: dict[int, torch.Tensor] = {}
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
                B0 = None
                if self.warm_start and any(prev is not None for _, prev in batch):
                    B0 = torch.stack([warm[prev] if prev is not None else torch.zeros(n, dtype=self.dtype,
                                                                                    device=self.device)
                                      for _, prev in batch])
                beta, info = kernel_newton_solve(K, y, c, tol=self.tol, max_newton=self.max_newton, B0=B0)
                warm.update({p: beta[i] for i, p in enumerate(ids)})
                self._record(info, progress)
        # w = Z_R^T beta in the basis' coordinates, a block of chains at a time: each chain's rows of Z are
        # gathered once for all its costs (a product over every training row would cost N / n times more)
        chain = np.array([root[p] for p in range(len(labels))])
        slot = np.zeros(len(chain), dtype=np.int64)  # a problem's place in its chain
        by_chain = np.argsort(chain, kind="stable")
        starts = np.searchsorted(chain[by_chain], chain[by_chain])
        slot[by_chain] = np.arange(len(chain)) - starts
        coefs = torch.zeros(len(first), int(slot.max()) + 1, n, dtype=self.dtype, device=self.device)
        coefs[torch.as_tensor(chain), torch.as_tensor(slot)] = torch.stack([warm[p] for p in range(len(chain))])
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


# ----------------------------------------------------------------------------------------------------
# The sklearn reference
# ----------------------------------------------------------------------------------------------------

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
        self.evals = {"train": self.train, **{k: np.asarray(v, dtype=np.float64) for k, v in (evals or {}).items()}}
        self.n_train, self.n_jobs, self.max_iter = len(train), n_jobs, max_iter

    def _one(self, y, mask, cost, evals):
        from sklearn.exceptions import ConvergenceWarning
        rows = np.flatnonzero(mask)
        clf = reference_svc(cost, self.max_iter)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(self.train[rows], y[rows])
        return [clf.decision_function(self.evals[e]) for e in evals]

    def fit_scores(self, labels: np.ndarray, train_mask: np.ndarray, costs: np.ndarray,
                   evals: Sequence[str] = ("train",), progress=None) -> dict[str, np.ndarray]:
        from joblib import Parallel, delayed
        labels, train_mask, costs = _check_problems(labels, train_mask, costs, self.n_train)
        unknown = [e for e in evals if e not in self.evals]
        if unknown:
            raise KeyError(f"no evaluation matrix named {unknown}; have {sorted(self.evals)}")
        jobs = (delayed(self._one)(labels[p], train_mask[p], costs[p], evals) for p in range(len(labels)))
        results = []
        for res in Parallel(n_jobs=self.n_jobs, prefer="threads", return_as="generator")(jobs):
            results.append(res)
            if progress is not None:
                progress.update(1)
        return {e: np.stack([r[i] for r in results]) for i, e in enumerate(evals)}


def make_solver(name: str, train: np.ndarray, evals: Mapping[str, np.ndarray] | None = None, *,
                device: str = "cpu", precision: str = "float64", tol: float = 1e-6, n_jobs: int = 1,
                max_iter: int = SKLEARN_MAX_ITER):
    """`torch` (batched Newton-CG) or `sklearn` (the LinearSVC reference) over the same interface."""
    if name == "torch":
        return TorchSVM(train, evals, device=device, precision=precision, tol=tol)
    if name == "sklearn":
        return SklearnSVM(train, evals, n_jobs=n_jobs, max_iter=max_iter)
    raise ValueError(f"unknown SVM solver {name!r}; expected 'torch' or 'sklearn'")
