"""submitit against a real (throw-away, on loopback) Slurm: plain job, afterok dependency, job array,
a failing job reported with its stderr, and a Checkpointable job preempted with USR2 that requeues and
resumes. Skipped with the reason when no cluster can be started (needs root + Debian packages)."""
from __future__ import annotations

import subprocess
import time

import pytest
import submitit

from mocobench.slurm import testing as st


@pytest.fixture(scope="module")
def slurm_cluster():
    reason = st.ensure_cluster()
    if reason:
        pytest.skip(f"real Slurm unavailable: {reason}")
    return True


def _executor(folder, **params) -> submitit.AutoExecutor:
    ex = submitit.AutoExecutor(folder / "%j", cluster="slurm")
    ex.update_parameters(timeout_min=5, cpus_per_task=1, slurm_signal_delay_s=120, **params)
    return ex


def _sacct_states(job_id: str) -> list[str]:
    out = subprocess.run(["sacct", "-D", "-n", "-X", "-P", "-o", "State", "-j", job_id],
                         capture_output=True, text=True, timeout=30, check=True)
    return out.stdout.split()


def test_plain_job_and_afterok_dependency(slurm_cluster, tmp_path):
    ex = _executor(tmp_path)
    first = ex.submit(st.job_start_time, 1)
    ex.update_parameters(slurm_additional_parameters={"dependency": f"afterok:{first.job_id}"})
    second = ex.submit(st.job_start_time, 2)
    st.wait_done(second, 60)
    (a, t_first), (b, t_second) = first.result(), second.result()
    assert (a, b) == (1, 2)
    assert t_second > t_first
    # the dependent job could only start once the first had completed (sacct End of the first)
    end_first = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "End", "-j", first.job_id],
                               capture_output=True, text=True, check=True).stdout.strip()
    assert time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t_second)) >= end_first
    assert int(second.job_id) > int(first.job_id)


def test_job_array(slurm_cluster, tmp_path):
    ex = _executor(tmp_path)
    with ex.batch():
        jobs = [ex.submit(st.add, i, 10) for i in range(3)]
    for job in jobs:
        st.wait_done(job, 60)
    array_ids = {job.job_id.split("_")[0] for job in jobs}
    assert len(array_ids) == 1, [job.job_id for job in jobs]
    assert sorted(job.job_id.split("_")[1] for job in jobs) == ["0", "1", "2"]
    assert [job.result() for job in jobs] == [10, 11, 12]


def test_failing_job_reports_state_and_stderr_and_cancels_dependents(slurm_cluster, tmp_path):
    ex = _executor(tmp_path)
    bad = ex.submit(st.fail_loudly, "stage exploded on purpose")
    ex.update_parameters(slurm_additional_parameters={"dependency": f"afterok:{bad.job_id}",
                                                      "kill-on-invalid-dep": "yes"})
    dependent = ex.submit(st.add, 1, 1)
    st.wait_done(bad, 60)
    err = bad.exception()
    assert err is not None and "stage exploded on purpose" in str(err)
    assert "about to fail: stage exploded on purpose" in bad.stderr()
    st.wait_done(dependent, 60)
    assert _sacct_states(bad.job_id) == ["FAILED"]
    assert _sacct_states(dependent.job_id) == ["CANCELLED"]  # never ran: dependency can't be met
    assert not dependent.paths.result_pickle.exists()


def test_checkpointable_job_preempted_with_usr2_requeues_and_resumes(slurm_cluster, tmp_path):
    ex = _executor(tmp_path)
    state = tmp_path / "count.txt"
    job = ex.submit(st.CountingJob(n=30, state_file=str(state), step_s=0.2))
    st.wait_for_file(state, 60)
    while int(state.read_text() or 0) < 3:
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
    st.wait_done(job, 120)
    assert job.result() == 30
    st.wait_slurm_job_ended(job.job_id, 60)  # the result file appears a moment before Slurm ends the job
    starts = [int(x) for x in (tmp_path / "count.txt.starts").read_text().split()]
    assert len(starts) == 2 and starts[0] == 0 and 3 <= starts[1] < 30, starts  # resumed, not restarted
    assert _sacct_states(job.job_id) == ["REQUEUED", "COMPLETED"]
    show = subprocess.run(["scontrol", "show", "job", job.job_id], capture_output=True, text=True).stdout
    assert "Restarts=1" in show


def test_ensure_cluster_explains_why_it_cannot_start(monkeypatch):
    """Without a responding cluster and without root, the fixture gets a reason to skip, not a crash."""
    monkeypatch.setattr(st, "slurm_responds", lambda timeout=10: False)
    monkeypatch.setattr(st.os, "geteuid", lambda: 1000)
    reason = st.ensure_cluster()
    assert reason is not None and "root" in reason
