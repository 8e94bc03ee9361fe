"""Process-wide settings an SVM entry point makes once (the svm / lowshot evaluators' `run`, the SVM
benchmark's solver process): torch's CPU threads, and for the torch solver on the CPU glibc's malloc
keeping freed memory (evaluate/native.py `keep_freed_memory`) and the BLAS library of its linear algebra
(evaluate/blas.py)."""
from __future__ import annotations

import torch

from mocobench.evaluate import blas as blas_library
from mocobench.evaluate.native import keep_freed_memory
from mocobench.evaluate.svm_solver import resolve_device


def configure_svm_process(solver: str, device: str, threads: int, blas: str = "auto") -> None:
    """Set torch's intra-op threads when `threads` > 0 (0 keeps torch's default); when the torch solver will
    run on the CPU, have malloc keep freed memory and route its linear algebra through `blas`."""
    if threads > 0:
        torch.set_num_threads(threads)
    if solver == "torch" and resolve_device(device).type == "cpu":
        keep_freed_memory()
        blas_library.use(blas)
