"""Batched primal Newton solver of many squared-hinge SVM problems sharing one design matrix.

Newton's method with an exact line search (Keerthi & DeCoste 2005, "A modified finite Newton method for
fast solution of large scale linear SVMs"; Chapelle 2007, "Training a support vector machine in the
primal"). Directions come from batched Jacobi-preconditioned CG (a few matrix products over the whole batch
per step: cheap for small C, where nearly every row is active and the Hessian is well conditioned), or,
once CG would cost more, from an exact solve of the dual of the active set (evaluate/svm_active_set.py:
cheap for large C, where few rows are active and CG crawls). It stops at |grad| <= tol * |grad at 0|.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mocobench.evaluate.blas import matmul
from mocobench.evaluate.svm_active_set import direct_directions


# How many float64 Cholesky flops' worth of float32 CG steps a problem may take before switching to exact
# steps: a CG step's products run at ~65 GFLOP/s in float32 against ~25 for a float64 Cholesky, and an exact
# step also gathers its active set, solves triangular systems and maps the dual back in float64 (2-core AVX2
# AMD EPYC, one thread). Measured there on the 2048-d low-shot k = 64 + 96 solve: 1 -> 59-64 s, 2 -> 56 s,
# 4 -> 54-57 s, 6 -> 54-58 s, 12 -> 64 s, 25 -> 76 s; the 2048-d VOC07 protocol 38-44 s at 1, 40-42 s at 4.
EXACT_STEP_COST = 4.0


@dataclass
class SolveInfo:
    """Statistics of one batched solve: Newton steps taken, CG steps over them (per Newton step, those of
    the batch's longest CG run), and how many of its problems reached the tolerance."""
    newton_iters: int
    cg_iters: int
    converged: int
    problems: int


@dataclass
class NewtonResult:
    """What `newton_solve` returns, per problem: the solution W (P, r), its training scores O = W Z^T and
    gradient G (what the next cost of a chain starts from: `newton_solve(W0=, O0=, G_start=)`), whether it
    ended with exact steps, its last active-set factorisation (or None), and the solve statistics."""
    W: torch.Tensor
    O: torch.Tensor
    G: torch.Tensor
    direct: torch.Tensor
    factors: list
    info: SolveInfo


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


def line_search(wd, dd, xi, q, cost, iters: int = 40):
    """Exact minimiser t of phi(t) = f(w + t d) for every problem (phi is a convex piecewise quadratic).

    With xi = 1 - y.o (margins) and q = y.(Z d): phi'(t) = w.d + t d.d - 2 sum c q (xi - t q)_+.
    Safeguarded Newton on phi' from t = 1 (the exact step if no margin changes side), bisecting when a
    step leaves the bracket [lo, hi] with phi'(lo) < 0 < phi'(hi).
    """
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


def gradient_at_zero(Z: torch.Tensor, labels: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    """Gradient of each problem's objective at w = 0: -2 Z^T (cost * labels); its norm is the convergence scale."""
    return -2 * matmul(cost * labels, Z)


def rescaled_gradient(W: torch.Tensor, G: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """The gradient at W once every row's cost is multiplied by `ratio` (P,): G = W - 2 Z^T(c y m) is affine
    in the costs at a fixed W, so it is (1 - ratio) W + ratio G, without the matrix product. What the next
    cost of a chain (same rows, labels and class weights) starts from."""
    return (1 - ratio)[:, None] * W + ratio[:, None] * G


def newton_solve(Z: torch.Tensor, labels: torch.Tensor, cost: torch.Tensor, tol: float = 1e-6,
                 max_newton: int = 100, max_cg: int = 500, W0: torch.Tensor | None = None,
                 cg_dtype: torch.dtype | None = None, K: torch.Tensor | None = None,
                 direct0: torch.Tensor | None = None, Z2: torch.Tensor | None = None,
                 O0: torch.Tensor | None = None, g0: torch.Tensor | None = None, factors0: list | None = None,
                 G_start: torch.Tensor | None = None) -> NewtonResult:
    """Minimise 1/2|w_p|^2 + sum_i cost[p,i] max(0, 1 - labels[p,i] Z_i.w_p)^2 for every problem p.

    Z: (N, r) shared design; labels (P, N) +-1; cost (P, N) >= 0 (0 = row not in problem p's training
    set). Returns the solutions W (P, r) and more (`NewtonResult`). Newton directions come from
    preconditioned CG on the primal Hessian; given the Gram matrix K = Z Z^T (as `padded_gram(K)`), a problem
    whose CG needs more steps than an exact dual solve of its active set S would cost (`EXACT_STEP_COST` x
    |S|^3/3 flops against 4 N r per step) keeps its truncated-CG direction for that step and switches to
    exact solves (`direct_directions`): cheap CG for small C (nearly
    all rows active, well conditioned), Cholesky for large C (few active rows, ill-conditioned). An exact
    line search follows.
    A problem is done once |grad| <= tol * |grad at w=0|; done problems leave the batch. `direct0` marks
    problems that start with exact solves (warm starts whose predecessor ended with them); the same mask at
    the end is returned (`NewtonResult`), and each problem's last active-set factorisation (or None): passed
    back as `factors0` for the next cost of the same problem, it is rebuilt for the new costs rather than
    gathered again (`direct_directions`). Quantities the caller has may be passed in rather than recomputed (a
    matrix product each): `Z2` = Z * Z (for the Jacobi preconditioner, whose products run in Z2's dtype: the
    CG dtype will do), `O0` = W0 Z^T, `g0` = |gradient at w = 0| per problem, `G_start` = the gradient at W0
    (see `rescaled_gradient`).
    """
    P, N = labels.shape
    r = Z.shape[1]
    W_out = torch.zeros(P, r, dtype=Z.dtype, device=Z.device)
    Z2 = Z * Z if Z2 is None else Z2
    Zlow = Z.to(cg_dtype) if cg_dtype is not None else None
    cy_all = cost * labels
    g0 = gradient_at_zero(Z, labels, cost).norm(dim=1) if g0 is None else g0
    idx = torch.arange(P, device=Z.device)
    W = W_out.clone() if W0 is None else W0.clone()
    O = (matmul(W, Z.T) if O0 is None else O0.clone())  # scores Z w on the training rows
    O_out = torch.empty(P, N, dtype=Z.dtype, device=Z.device)
    G_out = torch.empty(P, r, dtype=Z.dtype, device=Z.device)
    Y, C, CY, G0 = labels, cost, cy_all, g0
    direct = torch.zeros(P, dtype=torch.bool, device=Z.device) if direct0 is None or K is None else direct0.clone()
    direct_out = direct.clone()  # switched to exact solves
    factors: list = list(factors0) if factors0 is not None else [None] * P  # each problem's last active-set
    factors_out: list = [None] * P  # factorisation (exact steps); those of factors0 belong to other costs
    epoch = object()  # this call's costs
    newton = cg_total = 0
    converged = torch.zeros(P, dtype=torch.bool, device=Z.device)
    for newton in range(1, max_newton + 1):
        xi = 1 - Y * O
        if newton == 1 and G_start is not None:
            G = G_start
        else:
            G = W - 2 * matmul(CY * xi.clamp_min(0), Z)
        gn = G.norm(dim=1)
        done = gn <= tol * G0
        if bool(done.any()):
            W_out[idx[done]], O_out[idx[done]], G_out[idx[done]] = W[done], O[done], G[done]
            converged[idx[done]] = True
            direct_out[idx[done]] = direct[done]
            for p, f in zip(idx[done].tolist(), (f for f, d in zip(factors, done.tolist()) if d)):
                factors_out[p] = f
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
            D[direct], fs = direct_directions(Z, K, Y[direct], A[direct], W[direct], [factors[p] for p in rows],
                                              epoch=epoch)
            for p, f in zip(rows, fs):
                factors[p] = f
        if not bool(direct.all()):
            it = ~direct
            Acg = A[it]
            precond = 1 + 2 * matmul(Acg.to(Z2.dtype), Z2)
            rtol = torch.clamp(torch.sqrt(gn[it] / G0[it]), max=0.1)
            if K is not None:  # CG steps worth one Cholesky of the active set
                steps = EXACT_STEP_COST * (Acg > 0).sum(1).double() ** 3 / 3 / (4 * N * r)
                budget = steps.clamp(1, max_cg).long()
            else:
                budget = torch.full((len(Acg),), max_cg, dtype=torch.long, device=Z.device)
            Zc, Ac = (Z, Acg) if cg_dtype is None else (Zlow, Acg.to(cg_dtype))
            Dcg, k, exhausted = _pcg(lambda V, rows: V + 2 * matmul(matmul(V, Zc.T) * Ac[rows], Zc), (-G[it]).to(Zc.dtype),
                                     precond.to(Zc.dtype), rtol.to(Zc.dtype), budget)
            D[it] = Dcg.to(Z.dtype)
            cg_total += k
            if K is not None:
                direct[it.nonzero()[:, 0][exhausted]] = True
        Delta = matmul(D, Z.T)
        t = line_search((W * D).sum(1), (D * D).sum(1), xi, Y * Delta, C)
        W = W + t[:, None] * D
        O = O + t[:, None] * Delta
    if idx.numel():  # out of Newton steps: the last iterate, and its gradient
        xi = 1 - Y * O
        W_out[idx], O_out[idx], G_out[idx] = W, O, W - 2 * matmul(CY * xi.clamp_min(0), Z)
        direct_out[idx] = direct
        for p, f in zip(idx.tolist(), factors):
            factors_out[p] = f
    return NewtonResult(W_out, O_out, G_out, direct_out, factors_out,
                        SolveInfo(newton, cg_total, int(converged.sum()), P))
