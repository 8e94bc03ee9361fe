"""Threads that fit the CPUs a process was given: intra-op threads plus data-loader workers never exceed them.

PyTorch starts one intra-op thread per core of the node, and each data-loader worker is a process of its
own; on a shared node (or a Slurm job given 2 of 64 cores) the two oversubscribe the CPUs and a run slows
down by more than the extra threads could ever gain. Every entry point calls `fit_threads` once:

  CPUs given  $MOCOBENCH_CPUS, else Slurm's $SLURM_CPUS_PER_TASK, else the process's CPU affinity set
              (cgroup/taskset), else os.cpu_count()
  threads     an explicit request (a `threads` option, or $OMP_NUM_THREADS set by the user) wins; else the
              CPUs left to the main process beside `workers` loader workers, at least 1

and prints what it chose. Loader workers use one thread each (PyTorch's default in workers).
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ThreadPlan:
    cpus: int
    source: str          # where `cpus` came from
    threads: int         # intra-op threads of the main process
    workers: int         # data-loader worker processes
    chosen_by: str       # "fit" or what the user set

    def describe(self) -> str:
        return (f"{self.threads} intra-op thread(s) + {self.workers} loader worker(s) on {self.cpus} CPU(s) "
                f"({self.source}; threads {self.chosen_by})")


def cpus_given() -> tuple[int, str]:
    """(CPUs this process may use, where that number comes from)."""
    for var in ("MOCOBENCH_CPUS", "SLURM_CPUS_PER_TASK"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value), f"${var}"
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)), "CPU affinity"
    return os.cpu_count() or 1, "os.cpu_count()"


def plan_threads(workers: int = 0, threads: int = 0) -> ThreadPlan:
    """The plan without applying it: `threads` > 0 (or $OMP_NUM_THREADS) is the user's choice."""
    cpus, source = cpus_given()
    if threads > 0:
        return ThreadPlan(cpus, source, threads, workers, "as asked")
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return ThreadPlan(cpus, source, int(omp), workers, "from $OMP_NUM_THREADS")
    return ThreadPlan(cpus, source, max(1, cpus - workers), workers, "fit")


def fit_threads(workers: int = 0, threads: int = 0, announce=print) -> ThreadPlan:
    """Apply `plan_threads` to torch's intra-op threads; print the plan (`announce=None`: silently)."""
    import torch
    plan = plan_threads(workers, threads)
    torch.set_num_threads(plan.threads)
    if announce is not None:
        announce(f"threads: {plan.describe()}")
    return plan
