"""ctypes calls into native libraries for the SVM solver: LAPACK's dpotrf from the MKL inside torch's CPU
library (an in-place batched Cholesky, with torch.linalg.cholesky as the fallback), looked up on first use,
and glibc's `mallopt` (`keep_freed_memory`, a process-wide setting for an entry point to make)."""
from __future__ import annotations

import ctypes
import functools
import os

import torch


@functools.cache
def _mkl_potrf():
    """LAPACK's dpotrf from the MKL inside torch's CPU library, or None (another BLAS, another platform);
    looked up once, on the first call."""
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        fn = lib.dpotrf_
    except (OSError, AttributeError):
        return None
    fn.restype = None
    return fn


def cholesky_lower(M: torch.Tensor, from_lower: bool = False) -> torch.Tensor:
    """Lower Cholesky factors of a batch of SPD matrices (b, s, s), for `torch.linalg.solve_triangular`.

    On the CPU in float64 the factorisation runs in place in M (which it overwrites) through LAPACK's dpotrf,
    reading one triangle of M and writing the factor over it, the other triangle left as it was: triangular
    solves never read it. That skips torch's copy of M and its zeroing of the other triangle, which together
    cost more than the factorisation itself. By default the upper triangle is read and the factor is returned
    as a transposed view (M's strictly lower triangle still holds M); with `from_lower` only the lower triangle
    is read (the upper may hold anything) and M itself is returned, its lower triangle the factor. Elsewhere
    (or without MKL's dpotrf): torch.linalg.cholesky, which reads the lower triangle and leaves M as it was.
    """
    potrf = _mkl_potrf() if M.device.type == "cpu" and M.dtype == torch.float64 and M.is_contiguous() else None
    if potrf is None:
        return torch.linalg.cholesky(M)
    b, s, _ = M.shape
    # LAPACK sees the row-major M as its transpose: its "L" is M's upper triangle, its "U" M's lower
    uplo, n, info = ctypes.c_char(b"U" if from_lower else b"L"), ctypes.c_int(s), ctypes.c_int(0)
    base, stride = M.data_ptr(), M.stride(0) * M.element_size()
    for i in range(b):  # column-major view of a symmetric row-major matrix: the same matrix
        potrf(ctypes.byref(uplo), ctypes.byref(n), ctypes.c_void_p(base + i * stride), ctypes.byref(n),
              ctypes.byref(info))
        if info.value:
            raise torch.linalg.LinAlgError(f"cholesky: matrix {i} of the batch is not positive definite "
                                           f"(leading minor of order {info.value})")
    return M if from_lower else M.mT


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the OS (process-wide).

    glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh mmap, so each of the
    SVM solver's large temporaries (gathered active sets, factors, score blocks) pays a page fault per 4 KB
    page on first touch. With both thresholds at 2 GB such blocks come from, and go back to, malloc's heap
    (once it has grown to fit them); peak RSS stays the high-water mark. Being process-wide, it is set by
    an entry point (evaluate/svm_process.py), not by a solver. Returns whether glibc accepted the settings
    (False on other C libraries, where nothing changes).
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, limit = -1, -3, 2 ** 31 - 1
    return bool(mallopt(M_TRIM_THRESHOLD, limit)) and bool(mallopt(M_MMAP_THRESHOLD, limit))
