"""core/threads.py: the CPUs a process was given, and threads + loader workers that fit them."""
from __future__ import annotations

import os

import pytest
import torch

from mocobench.core import threads


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("MOCOBENCH_CPUS", "SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_cpus_given_prefers_explicit_then_slurm_then_affinity(monkeypatch):
    assert threads.cpus_given() == (len(os.sched_getaffinity(0)), "CPU affinity")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert threads.cpus_given() == (3, "$SLURM_CPUS_PER_TASK")
    monkeypatch.setenv("MOCOBENCH_CPUS", "5")
    assert threads.cpus_given() == (5, "$MOCOBENCH_CPUS")


def test_threads_plus_workers_never_exceed_the_cpus(monkeypatch):
    monkeypatch.setenv("MOCOBENCH_CPUS", "4")
    assert [threads.plan_threads(w).threads for w in (0, 1, 3, 4, 8)] == [4, 3, 1, 1, 1]
    assert threads.plan_threads(2, threads=6).threads == 6  # an explicit request wins
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    plan = threads.plan_threads(0)
    assert (plan.threads, plan.chosen_by) == (2, "from $OMP_NUM_THREADS")


def test_fit_threads_applies_and_says_what_it_chose(monkeypatch):
    monkeypatch.setenv("MOCOBENCH_CPUS", "2")
    said = []
    plan = threads.fit_threads(workers=1, announce=said.append)
    assert torch.get_num_threads() == plan.threads == 1
    assert said == ["threads: 1 intra-op thread(s) + 1 loader worker(s) on 2 CPU(s) ($MOCOBENCH_CPUS; threads fit)"]
