"""Newton solver for SVM problems that each train on few rows (low-shot k <= 32), in the coefficients of
their own rows: each step is an exact active-set step (evaluate/svm_active_set.py) on the problem's own
Gram matrix, followed by the exact line search of evaluate/svm_newton.py."""
from __future__ import annotations

import torch

from mocobench.evaluate.svm_active_set import active_set_solve, gather_blocks
from mocobench.evaluate.svm_newton import SolveInfo, line_search


def kernel_newton_solve(K: torch.Tensor, labels: torch.Tensor, cost: torch.Tensor, tol: float = 1e-6,
                        max_newton: int = 100, B0: torch.Tensor | None = None, O0: torch.Tensor | None = None,
                        KU0: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, SolveInfo]:
    """`newton_solve` for problems that each train on few rows, in the coefficients of their own rows.

    Problem p trains on n rows R_p (padding rows have cost 0) with Gram matrix Z_Rp Z_Rp^T = K[p, :n, :n],
    K (P, n+1, n+1) being zero in its last row and column (where active-set gathers send padding); every
    iterate is w_p = Z_Rp^T beta_p, the optimum's form, so scores are K beta, |w|^2 = beta^T K beta,
    and the gradient Z_Rp^T (beta - 2 c y (1 - y K beta)_+) has norm^2 u^T K u. Each step is the exact
    active-set step of `direct_directions` (a Cholesky of |S| <= n rows, gathered from the problem's own
    K) and the same exact line search; nothing costs more than n^2 per problem but the factorisation,
    where the shared-basis solver's matrix products cost (rows of all problems) x rank.
    Returns beta (P, n), the scores O = K beta and the gradient's coefficients times K, K u, at beta: a warm
    start for the next cost of the same rows passes them back as B0, O0 and KU0 (rescaled for the new costs:
    `rescaled_gradient`), each a product with every K saved. Without B0 the solve starts at beta = 0.
    """
    P, n = labels.shape
    dev = K.device
    Kn = K[:, :n, :n]  # (a strided view: products read it in place)

    # K_p v_p for every p, taken as v_p^T K_p (K_p is symmetric): in MKL's batched product a row vector times
    # the matrix ran 2.3x faster than the matrix times a column vector (2-core AMD EPYC, 60 x 667^2 float64)
    def times_K(V: torch.Tensor) -> torch.Tensor:
        return (V[:, None, :] @ Kn)[:, 0]

    B_out = torch.zeros(P, n, dtype=K.dtype, device=dev)
    O_out, KU_out = torch.empty_like(B_out), torch.empty_like(B_out)
    CY = cost * labels
    KCY = times_K(CY)
    G0 = (4 * (CY * KCY).sum(1)).clamp_min(0).sqrt()
    if B0 is None:  # beta = 0: u = -2 c y
        B, O, KU = B_out.clone(), torch.zeros_like(B_out), -2 * KCY
    else:
        B = B0.clone()
        O = times_K(B) if O0 is None else O0.clone()
        KU = KU0
    idx = torch.arange(P, device=dev)
    live = torch.ones(P, dtype=torch.bool, device=dev)  # not yet converged
    Y, C = labels, cost
    converged = torch.zeros(P, dtype=torch.bool, device=dev)
    newton = 0
    for newton in range(1, max_newton + 1):
        xi = 1 - Y * O
        U = B - 2 * CY * xi.clamp_min(0)
        if newton > 1 or KU is None:
            KU = times_K(U)
        gn = (U * KU).sum(1).clamp_min(0).sqrt()
        done = live & (gn <= tol * G0)
        if bool(done.any()):
            B_out[idx[done]], O_out[idx[done]], KU_out[idx[done]] = B[done], O[done], KU[done]
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
            K_SS = gather_blocks(K, sel, sel, batch=go)
            g, _ = active_set_solve(K_SS, A[go].gather(1, at), Y[go].gather(1, at), valid)
            full = torch.zeros(len(go), n + 1, dtype=torch.float64, device=dev)
            full.scatter_(1, sel, torch.where(valid, g, 0.0))
            target[go] = full[:, :n].to(B.dtype)
        Dir = torch.where(live[:, None], target - B, 0.0)
        KD = times_K(Dir)
        t = line_search((B * KD).sum(1), (Dir * KD).sum(1), xi, Y * KD, C)
        B = B + t[:, None] * Dir
        O = O + t[:, None] * KD
    if bool(live.any()):  # out of Newton steps: the last iterate
        U = B - 2 * CY * (1 - Y * O).clamp_min(0)
        B_out[idx[live]], O_out[idx[live]], KU_out[idx[live]] = B[live], O[live], times_K(U)[live]
    return B_out, O_out, KU_out, SolveInfo(newton, 0, int(converged.sum()), P)

