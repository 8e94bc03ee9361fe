"""Dense linear algebra of the SVM solver on the CPU (matrix products, Cholesky factorisations, triangular
solves), through the BLAS / LAPACK library that is fast on this CPU.

torch's CPU products run in the MKL linked into torch, numpy's in OpenBLAS (numpy's wheels ship it with
kernels picked for the CPU at run time). MKL is fast on Intel CPUs; on AMD it leaves speed behind: on a
2-core AMD EPYC (Zen 3, AVX2, one thread), in one process, alternating, torch took 1.2-1.6x numpy's time for
the solver's float32 products ((100 x 5011) @ (5011 x 2049) and (100 x 2049) @ (2049 x 5011)^T), 1.27x for
float64 (100 x 5011) @ (5011 x 2049), 2.1-2.8x for a Gram matrix Z^T Z (numpy calls syrk); MKL's dpotrf
took 1.6-2.2x OpenBLAS's (through scipy.linalg.lapack) on batches of 1000-1500-row float64 systems, and
torch's batched triangular solves 1.6-1.9x scipy's dtrsm.

`use(name)` picks the library process-wide, as an entry point sets torch's threads (evaluate/svm_process.py):
"torch", "openblas", or "auto" = OpenBLAS on AMD CPUs, torch (MKL) elsewhere. The choice is a fixed rule,
not a timing, so a machine always gets the same rounding. `matmul`, `cholesky_lower`, `solve_triangular` and
`eigh` go through it; OpenBLAS then runs with torch's intra-op thread count. Tensors off the CPU, and other
dtypes, always use torch.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from mocobench.evaluate import native

LIBRARIES = ("auto", "torch", "openblas")
_library = "torch"
_blas_threads = 0  # the OpenBLAS thread limit last applied (0: none yet)


def cpu_vendor() -> str:
    """The CPU's vendor string from /proc/cpuinfo ("AuthenticAMD", "GenuineIntel", ...), "" if unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def resolve(name: str) -> str:
    """The library a `blas` option names: "auto" is OpenBLAS on AMD CPUs and torch elsewhere."""
    if name not in LIBRARIES:
        raise ValueError(f"unknown BLAS library {name!r}; expected one of {', '.join(LIBRARIES)}")
    if name == "auto":
        return "openblas" if cpu_vendor() == "AuthenticAMD" else "torch"
    return name


def use(name: str) -> str:
    """Route `matmul` on the CPU through `name` (see `resolve`) from now on in this process; returns the library."""
    global _library
    _library = resolve(name)
    return _library


def current() -> str:
    return _library


@functools.cache
def _threadpool_limits():
    from threadpoolctl import threadpool_limits
    return threadpool_limits


def _fit_blas_threads() -> None:
    """OpenBLAS's threads = torch's intra-op threads (set again only when torch's count has changed), in every
    OpenBLAS of the process: numpy's and scipy's wheels each ship their own, so scipy's is loaded first."""
    global _blas_threads
    n = torch.get_num_threads()
    if n != _blas_threads:
        _scipy_linalg()
        _threadpool_limits()(limits=n, user_api="blas")
        _blas_threads = n


def _blas_operand(t: torch.Tensor) -> np.ndarray:
    """A numpy view BLAS can read directly (row- or column-major); a copy otherwise, since numpy's matmul
    falls back to a slow non-BLAS loop on other strides."""
    if not (t.is_contiguous() or t.mT.is_contiguous()):
        t = t.contiguous()
    return t.detach().numpy()


def routed(t: torch.Tensor) -> bool:
    """Whether tensors like `t` go to OpenBLAS (`use` chose it, t is a float32 / float64 CPU tensor)."""
    return _library == "openblas" and t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (2-D) through the library `use` chose. In OpenBLAS a @ a^T (b a transposed view of a) is one
    syrk: half the flops."""
    if routed(a) and routed(b) and a.dtype == b.dtype and a.dim() == b.dim() == 2:
        _fit_blas_threads()
        return torch.from_numpy(np.matmul(_blas_operand(a), _blas_operand(b)))
    return a @ b


@functools.cache
def _scipy_linalg():
    from scipy.linalg import blas, lapack
    return lapack.dpotrf, blas.dtrsm


def eigh(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.linalg.eigh(A) of a symmetric 2-D A (eigenvalues ascending, eigenvectors in columns), through
    OpenBLAS's LAPACK (scipy, divide and conquer: syevd, the driver torch uses) when `use` chose it: 1.2-1.3 s
    against 1.8-2.3 s in torch for the 2049^2 float32 F^T F of the SVM basis (2-core AVX2 AMD EPYC, one
    thread)."""
    if not (routed(A) and A.dim() == 2):
        return torch.linalg.eigh(A)
    from scipy.linalg import eigh as scipy_eigh
    _fit_blas_threads()
    lam, vecs = scipy_eigh(A.detach().numpy(), driver="evd", check_finite=False)
    return torch.from_numpy(lam), torch.from_numpy(vecs)


def cholesky_lower(M: torch.Tensor, from_lower: bool = False) -> torch.Tensor:
    """`native.cholesky_lower` (same contract: in place in a contiguous float64 M, only the factor's triangle
    written), through OpenBLAS's dpotrf when `use` chose it."""
    if not (routed(M) and M.dtype == torch.float64 and M.dim() == 3 and M.is_contiguous()):
        return native.cholesky_lower(M, from_lower)
    dpotrf, _ = _scipy_linalg()
    _fit_blas_threads()
    arr = M.numpy()
    for i in range(len(arr)):  # arr[i].T is the column-major view of the same (symmetric) matrix
        _, info = dpotrf(arr[i].T, lower=0 if from_lower else 1, clean=0, overwrite_a=1)
        if info:
            raise torch.linalg.LinAlgError(f"cholesky: matrix {i} of the batch is not positive definite "
                                           f"(leading minor of order {info})")
    return M if from_lower else M.mT


def solve_triangular(L: torch.Tensor, B: torch.Tensor, upper: bool) -> torch.Tensor:
    """torch.linalg.solve_triangular(L, B, upper=upper) for batches (b, s, s) and (b, s, k), reading only L's
    `upper` or lower triangle; through OpenBLAS's dtrsm when `use` chose it and each L[i] is row- or
    column-major."""
    if not (routed(L) and L.dtype == B.dtype == torch.float64 and L.dim() == B.dim() == 3 and len(L) == len(B)
            and (L[0].is_contiguous() or L[0].mT.is_contiguous())):
        return torch.linalg.solve_triangular(L, B, upper=upper)
    _, dtrsm = _scipy_linalg()
    _fit_blas_threads()
    Ln, Bn = L.detach().numpy(), B.detach().contiguous().numpy()
    out = np.empty(B.shape, dtype=np.float64)
    for i in range(len(Ln)):
        # L X = B as X^T L^T = B^T (dtrsm side=1), so that B[i] row-major is read in place as B^T column-major;
        # L^T is L[i]'s transpose view when L[i] is row-major, else L[i] itself transposed by dtrsm
        a, trans = (Ln[i].T, 0) if Ln[i].flags.c_contiguous else (Ln[i], 1)
        lower = (not upper) if trans else upper  # a's triangle: L^T's is the other one
        out[i] = dtrsm(1.0, a, Bn[i].T, side=1, lower=int(lower), trans_a=trans, overwrite_b=0).T
    return torch.from_numpy(out)
