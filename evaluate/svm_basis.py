"""An orthonormal basis of the training features' span, in which the batched SVM solver works
(evaluate/svm_solver.py): a Gram-matrix eigenbasis when there are fewer images than dimensions, a PCA
rotation otherwise, so a row costs min(N, D+1) numbers and Jacobi preconditioning is effective."""
from __future__ import annotations

import torch

from mocobench.evaluate.blas import eigh, matmul, routed


def gram_matrix(F: torch.Tensor, blocks: int = 8) -> torch.Tensor:
    """F F^T, computing only the row blocks' products on and left of the diagonal and mirroring them (the
    matrix is symmetric): (blocks + 1) / (2 blocks) of one matrix product's flops, 9/16 with 8 blocks. In
    OpenBLAS (evaluate/blas.py) one syrk: half the flops."""
    if routed(F):
        return matmul(F, F.T)
    n = len(F)
    out = torch.empty(n, n, dtype=F.dtype, device=F.device)
    edges = [round(i * n / blocks) for i in range(blocks + 1)]
    for a, b in zip(edges[:-1], edges[1:]):
        out[a:b, :b] = F[a:b] @ F[:b].T
        out[:a, a:b] = out[a:b, :a].T
    return out


class Basis:
    """An orthonormal basis V (d x r) of the row span of F (n x d), with Z = F V having orthogonal columns.

    For d <= n it is the eigenbasis of F^T F (PCA rotation), computed in float32: the rotation only has to
    make Jacobi preconditioning effective, and the design the solver then works with is Z itself (a float32
    product F V, held in F's dtype), V orthonormal and Z's columns orthogonal to float32 precision
    (|V^T V - I| ~ 1e-6 at 2049-d), the order of the features' own float32 rounding. On a 2-core AVX2 AMD
    EPYC (one thread) at 5011 x 2049 it takes 2.4-3.0 s instead of 4.7-5.4 s in float64, and the VOC07
    protocol's mAP is unchanged (4 decimals). Otherwise (d > n) V = F^T U diag(lam)^-1/2 from the float64
    eigendecomposition F F^T = U diag(lam) U^T, so Z = U diag(lam)^1/2 and Z Z^T is the Gram matrix the exact
    Newton steps use. Directions with eigenvalue below
    `rel_eps * lam_max` are dropped: the SVM optimum has no component outside the training rows' span.
    `gram` is F F^T (= Z Z^T) when the eigenbasis came from it, else None.
    """

    def __init__(self, feats: torch.Tensor, rel_eps: float = 1e-12):
        n, d = feats.shape
        self.gram = None
        if d <= n:
            F32 = feats.to(torch.float32)
            lam, vecs = eigh(gram_matrix(F32.T))  # F^T F
            keep = lam > rel_eps * lam.max().clamp_min(1e-30)
            V = vecs[:, keep].flip(1)
            self.Z = matmul(F32, V).to(feats.dtype)
            self.V = V.to(feats.dtype)
        else:
            self.gram = gram_matrix(feats)
            lam, U = eigh(self.gram)
            keep = lam > rel_eps * lam.max().clamp_min(1e-300)
            lam, U = lam[keep].flip(0), U[:, keep].flip(1)
            self.V = matmul(feats.T, U) / lam.sqrt()
            self.Z = U * lam.sqrt()
        self.Z = self.Z.contiguous()

    @property
    def rank(self) -> int:
        return self.Z.shape[1]
