"""Gather a sweep's results tables (`mocobench results SWEEP_DIR`), when the sweep ends or as its final
Slurm job."""
from __future__ import annotations

from mocobench.results.cli import main as results_main


def gather_tables(root: str) -> int:
    """`mocobench results ROOT`; its exit status."""
    return int(results_main([str(root)]) or 0)
