"""Side-by-side timing shared by the `mocobench bench` commands.

Speed claims are ratios measured in one process, with the variants interleaved round by round (A B, then
B A, ...) so that drift in machine load (other jobs, turbo, thermal) hits both sides alike; each figure is
the median over rounds, and a speed-up is the median of the per-round ratios. Every benchmark prints readable lines and, last, one JSON object with its figures.
"""
from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from typing import Callable


def interleaved(variants: dict[str, Callable[[], float]], rounds: int, progress: bool = True) -> dict[str, list[float]]:
    """Run each variant once per round, alternating the order (ABBA...); each call returns a rate.

    Returns {name: [rate per round]}.
    """
    names = list(variants)
    rates: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            rates[name].append(variants[name]())
        if progress:
            line = "  ".join(f"{n} {rates[n][-1]:.2f}" for n in names)
            print(f"  round {r + 1}/{rounds}: {line}", flush=True)
    return rates


def rate(fn: Callable[[], int]) -> float:
    """Items per second of one call of `fn` (which returns the number of items it processed)."""
    t = time.perf_counter()
    n = fn()
    return n / max(time.perf_counter() - t, 1e-12)


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num[i] / den[i]: each round's two runs saw the same machine load."""
    return median([a / b for a, b in zip(num, den)])


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(result: dict) -> None:
    """The last line of every benchmark: one JSON object with its figures."""
    sys.stdout.flush()
    print(json.dumps(result, sort_keys=False), flush=True)
