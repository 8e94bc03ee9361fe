"""Exact Newton directions of the primal SVM through the dual of each problem's active set: batched
Cholesky factorisations of K_SS + diag(1/2a_S), and rank updates of them when an active set moves by a
few rows between Newton steps (bordering for added rows, multipliers pinning dropped rows to zero).
Used by evaluate/svm_newton.py (large C: few active rows, ill-conditioned) and evaluate/svm_kernel.py."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mocobench.evaluate.blas import cholesky_lower, matmul, solve_triangular


def padded_gram(K: torch.Tensor) -> torch.Tensor:
    """K with one more row and column of zeros (index N): what `direct_directions` gathers active sets from,
    so a padding index needs no masking."""
    n = len(K)
    out = torch.zeros(n + 1, n + 1, dtype=K.dtype, device=K.device)
    out[:n, :n] = K
    return out


def gather_blocks(K: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, batch: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Blocks K[rows[i]][:, cols[i]] of a 2-D K (or K[batch[i]][rows[i]][:, cols[i]] of a 3-D K) for index
    batches rows (b, s) and cols (b, t): (b, s, t).

    On the CPU through numpy: from a 2-D K by fancy indexing, which took 0.5-0.9x the time of torch's from a
    5012^2 float64 Gram matrix (11-35 against 21-46 ns per element, blocks of 400-900 rows); from the short
    rows of a 3-D K block by block, whole rows first, then the columns out of the copy (each row read once,
    in order): 0.5x the time of fancy indexing for the kernel path's blocks (low-shot k = 32 at VOC07 size,
    100 blocks from 641^2 matrices: 1.9 against 3.9 s in all), where copying whole rows of the 5012^2 matrix
    took 2.5x longer, most blocks there being a few columns wide. Measured on a 2-core AVX2 AMD EPYC."""
    if K.device.type != "cpu":
        if batch is None:
            return K[rows[:, :, None], cols[:, None, :]]
        return K[batch[:, None, None], rows[:, :, None], cols[:, None, :]]
    Kn, r, c = K.numpy(), rows.numpy(), cols.numpy()
    if batch is None:
        return torch.from_numpy(Kn[r[:, :, None], c[:, None, :]])
    out = np.empty((r.shape[0], r.shape[1], c.shape[1]), dtype=Kn.dtype)
    for i, b in enumerate(batch.tolist()):
        np.take(Kn[b].take(r[i], axis=0), c[i], axis=1, out=out[i])
    return torch.from_numpy(out)


@dataclass
class ActiveSetFactors:
    """Factorised active-set systems of a chunk of problems: `idx` (b, s) the rows each was built on, padded
    with the padding row N, and `L` (b, s, s) the lower Cholesky factors of K_SS + diag(1/2a_S) (unit rows
    and columns at the padding; only the lower triangle is the factor, see `cholesky_lower`). A problem
    refers to its factor as (chunk, position). Within one `newton_solve` call (one `epoch`: the costs, hence
    the diagonals, are fixed) factors are updated between Newton steps. For the next cost of a chain they are
    rebuilt (`_rebuilt`) from `src`, whose strictly lower triangles keep the gathered K_SS (problem i's at
    `src[src_pos[i]]`), with the new diagonal: a copy and a Cholesky instead of a gather and a Cholesky."""
    idx: torch.Tensor
    L: torch.Tensor
    src: torch.Tensor | None = None
    src_pos: torch.Tensor | None = None
    epoch: object = None

    def take(self, pos: torch.Tensor) -> "ActiveSetFactors":
        """The factors of the problems at `pos` (copies of their rows and factors; `src` is shared)."""
        return ActiveSetFactors(self.idx[pos], self.L[pos], self.src,
                                None if self.src_pos is None else self.src_pos[pos], self.epoch)


def active_set_solve(K_SS: torch.Tensor, a: torch.Tensor, y: torch.Tensor, valid: torch.Tensor):
    """g = (K_SS + diag(1/2a))^-1 y for a batch of gathered active sets (b, s, s; overwritten), rows where
    `valid` is False being padding, gathered from a zero row and column (they become unit rows: g is 0
    there); returns g and the factor."""
    M = K_SS.to(torch.float64)
    M.diagonal(dim1=1, dim2=2).add_(torch.where(valid, 0.5 / a, 1.0))
    L = cholesky_lower(M)
    rhs = torch.where(valid, y, 0.0).to(torch.float64)[..., None]
    g = solve_triangular(L.mT, solve_triangular(L, rhs, upper=False), upper=True)
    return g[..., 0], L


def _refactored_duals(Kpad: torch.Tensor, Y: torch.Tensor, A: torch.Tensor, sizes: torch.Tensor,
                      order: torch.Tensor, s: int, epoch: object = None):
    """Dual solutions g (b, N+1; column N is padding) of b active-set systems, each by a fresh Cholesky
    factorisation of its K_SS + diag(1/2a_S) (padded to s rows with decoupled unit rows), and the factors."""
    pad = len(Kpad) - 1
    valid = torch.arange(s, device=Kpad.device)[None, :] < sizes[:, None]
    idx = torch.where(valid, order[:, :s], pad)
    at = idx.clamp_max(pad - 1)
    K_SS = gather_blocks(Kpad, idx, idx).to(torch.float64)  # factorised in place: its lower triangle stays
    gamma, L = active_set_solve(K_SS, A.gather(1, at), Y.gather(1, at), valid)
    dual = torch.zeros(len(idx), pad + 1, dtype=gamma.dtype, device=Kpad.device)
    dual.scatter_(1, idx, torch.where(valid, gamma, 0.0))
    return dual, ActiveSetFactors(idx, L, K_SS, torch.arange(len(idx), device=Kpad.device), epoch)


def _rebuilt(Kpad: torch.Tensor, A: torch.Tensor, F: ActiveSetFactors, pos: torch.Tensor, epoch: object
             ) -> ActiveSetFactors:
    """The factors of F's problems at `pos` for new costs (a new epoch; A: those problems' current weights) on
    their rows still active: K_SS copied from `F.src`, the rows and columns of rows that have left zeroed with
    a unit diagonal (they become padding, exactly decoupled), the others' diagonal set to K_ii + 1/2a with the
    current a, and factorised again. Rows that have joined are then added by `_updated_duals`."""
    pad = len(Kpad) - 1
    idx, src_pos = F.idx[pos], F.src_pos[pos]
    active = torch.cat([A > 0, torch.zeros(len(A), 1, dtype=torch.bool, device=A.device)], 1).gather(1, idx)
    a = A.gather(1, idx.clamp_max(pad - 1))
    M = F.src[src_pos]  # a copy, the gathered K_SS in its strictly lower triangle
    b, i = (~active).nonzero(as_tuple=True)
    M[b, i, :] = 0
    M[b, :, i] = 0
    M.diagonal(dim1=1, dim2=2).copy_(torch.where(active, Kpad.diagonal()[idx] + 0.5 / a, 1.0))
    return ActiveSetFactors(torch.where(active, idx, pad), cholesky_lower(M, from_lower=True), F.src, src_pos, epoch)


# Costs in flops of one problem's exact direction by a fresh gather + Cholesky of its s active rows and by
# rebuilding a factor w rows wide (copy, zeroed rows, Cholesky) and bordering it with `add` rows. A gathered
# element cost 170-500 flops' time (|S| 900-300) and a copied one ~45, against a float64 Cholesky at 19-23
# GFLOP/s (2-core AVX2 AMD EPYC, one thread, batches of 30).
def _refactor_flops(s: torch.Tensor) -> torch.Tensor:
    return s.double() ** 3 / 3 + 210 * s.double() ** 2


def _rebuild_flops(w: int, add: torch.Tensor) -> torch.Tensor:
    return w ** 3 / 3 + (55 + add.double()) * w ** 2


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
    if amax:  # L^-1 [R1, B] in one triangular solve: L, read once, is what bounds it with so few columns
        B = gather_blocks(Kpad, ref, add_idx).to(torch.float64)
        Maa = gather_blocks(Kpad, add_idx, add_idx).to(torch.float64)
        Maa.diagonal(dim1=1, dim2=2).add_(torch.where(valid_a, 0.5 / A.gather(1, add_idx.clamp_max(pad - 1)), 1.0))
        X1Wb = solve_triangular(L, torch.cat([R1, B], 2), upper=False)
        X1, Wb = X1Wb[:, :, :1 + dmax], X1Wb[:, :, 1 + dmax:]
        La, info = torch.linalg.cholesky_ex(Maa - Wb.mT @ Wb)
        if bool((info != 0).any()):
            return None
        R2 = torch.zeros(b, amax, 1 + dmax, dtype=torch.float64, device=dev)
        R2[:, :, 0] = y_add
        X2 = torch.linalg.solve_triangular(La, R2 - Wb.mT @ X1, upper=False)
        Z2 = torch.linalg.solve_triangular(La.mT, X2, upper=True)
        X1 = X1 - Wb @ Z2
    else:
        X1 = solve_triangular(L, R1, upper=False)
    Z1 = solve_triangular(L.mT, X1, upper=True)
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


def direct_directions(Z: torch.Tensor, Kpad: torch.Tensor, Y: torch.Tensor, A: torch.Tensor, W: torch.Tensor,
                       factors: list | None = None, max_bytes: int = 1 << 27, update_ratio: float = 1.0,
                       epoch: object = None):
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
    are refactorised. Timed both ways on the same chunks (2-core AVX2 AMD EPYC, one thread, 2048-d VOC07
    CV and low-shot k = 96), an update cost as much as the refactorisation (gather included) at a ratio of
    0.8-1.1, 0.4x of it at 0.3 and 1.4-2x at 1.5-2: hence 1.
    `epoch` names the current costs (None: every factor is taken as built for them). A factor of another
    epoch (the previous cost of a chain) is rebuilt for the current costs on its rows still active
    (`_rebuilt`: a copy instead of the gather) and bordered with the rows that joined, where that costs
    fewer flops than a refactorisation (`_rebuild_flops`, `_refactor_flops`); otherwise refactorised.
    Returns the directions and each problem's factor reference for the next step.
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
        if epoch is not None and F.epoch is not epoch:  # built for other costs: rebuild, then border
            worth = _rebuild_flops(ref.shape[1], sizes[sel] - kept) <= _refactor_flops(sizes[sel])
            worth &= sizes[sel] > 0
            if not bool(worth.any()):
                continue
            pos, sel = pos[worth], sel[worth]
            Fs = _rebuilt(Kpad, A[sel], F, pos, epoch)
            got = _updated_duals(Kpad, Y[sel], A[sel], Fs)
            if got is not None:
                dual[sel] = got
                for i, p in enumerate(sel.tolist()):
                    refactor[p], factors[p] = False, (Fs, i)
            continue
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
            got = _updated_duals(Kpad, Y[sel], A[sel], F.take(pos))
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
            d, F = _refactored_duals(Kpad, Y[rows], A[rows], sizes[rows], order[sl], s, epoch)
            dual[rows] = d
            for i, p in enumerate(rows.tolist()):
                factors[p] = (F, i)
    return matmul(dual[:, :pad].to(Z.dtype), Z) - W, factors
