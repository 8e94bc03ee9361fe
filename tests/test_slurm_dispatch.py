"""`mocobench sweep` through a real Slurm (the throw-away cluster of slurm/cluster/start.sh):
a preempted pretrain that requeues and resumes to the same weights as an uninterrupted run, a 2-task DDP
pretrain over gloo, and job arrays with aftercorr dependencies and a failing stage. The three sweeps are
submitted together (--no-wait) so that they overlap; each test then waits for its own. Skipped, with the
reason, where no cluster can be started."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from mocobench.slurm import state, status, sweep
from mocobench.slurm import testing as st
from mocobench.slurm.wait import wait_slurm


def _spec(root: Path, data: Path, variants: dict, benchmarks: dict | None = None, epochs: int = 2,
          resources: dict | None = None) -> Path:
    spec = {"output_root": str(root / "sweep"), "results": False, "cluster": "slurm",
            "resources": {"cpus_per_task": 1, "timeout_min": 10, **(resources or {})},
            "pretrain": {"config": ["demo"], "overrides": st.tiny_pretrain_fields(data, epochs), "variants": variants},
            "benchmarks": benchmarks or {}}
    root.mkdir(parents=True, exist_ok=True)
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    return root / "spec.yaml"


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    reason = st.ensure_cluster()
    if reason:
        pytest.skip(f"real Slurm unavailable: {reason}")
    base = tmp_path_factory.mktemp("slurm_sweeps")
    data = st.tiny_imagefolder(base / "tiny")
    knn = {"knn": {"config": "demo", "data": str(data), "ks": [5], "resize": 18, "crop": 16, "workers": 0,
                   "cache_dir": str(base / "cache")}}
    specs = {  # submission order = scheduling priority: the preemption test needs its job running first
        "preempt": _spec(base / "preempt", data, {"p": {}}, epochs=5),
        "ddp": _spec(base / "ddp", data, {"ddp": {}}, resources={"tasks_per_node": 2}),
        # batch 12 does not divide the queue (moco_k 32): PretrainConfig validation fails inside the job
        "arrays": _spec(base / "arrays", data, {"a": {}, "bad": {"batch_size": 12}}, knn),
    }
    for spec in specs.values():
        assert sweep.main([str(spec), "--no-wait"]) == 0
    return {name: spec.parent / "sweep" for name, spec in specs.items()}


def test_preempted_pretrain_requeues_and_resumes_to_the_uninterrupted_weights(sweeps):
    root = sweeps["preempt"]
    stage_dir = root / "p" / "trial0" / "pretrain"
    info = json.loads((stage_dir / "stage.json").read_text())
    job_id = info["jobs"][-1]["job_id"]
    st.wait_for_file(stage_dir / "checkpoint_0000.pth.tar", 150, poll=0.1)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    (row,) = wait_slurm(root, poll=1, timeout=180)
    assert (row.state, row.job_id, row.restarts) == ("done", job_id, 1)
    assert [e["event"] for e in state.read_events(stage_dir)] == ["start", "requeue", "start", "done"]
    st.wait_slurm_job_ended(job_id, 60)
    sacct = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-o", "State", "-j", job_id],
                           capture_output=True, text=True, check=True).stdout.split()
    assert sacct == ["REQUEUED", "COMPLETED"]
    resumed = [line for line in (stage_dir / "log.txt").read_text().splitlines() if "resumed from" in line]
    assert len(resumed) == 1 and "at epoch 5" not in resumed[0]  # it resumed mid-run, not after the end

    # the same config run without interruption, in this process with the job's one thread
    from mocobench.pretrain.train import PretrainConfig, run
    cfg = dict(info["payload"]["config"], out=str(root / "reference"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(PretrainConfig(**cfg))
    finally:
        torch.set_num_threads(threads)
    got = torch.load(stage_dir / "checkpoint_0004.pth.tar", weights_only=True)
    ref = torch.load(root / "reference" / "checkpoint_0004.pth.tar", weights_only=True)
    assert got["epoch"] == ref["epoch"] == 5 and got["state_dict"].keys() == ref["state_dict"].keys()
    for key, value in ref["state_dict"].items():
        assert torch.equal(got["state_dict"][key], value), key


def test_two_task_ddp_pretrain_over_gloo(sweeps):
    root = sweeps["ddp"]
    (row,) = wait_slurm(root, poll=1, timeout=240)
    assert row.state == "done"
    stage_dir = root / "ddp" / "trial0" / "pretrain"
    assert "2 process(es)" in (stage_dir / "log.txt").read_text()
    job = json.loads((stage_dir / "stage.json").read_text())["jobs"][-1]
    assert "#SBATCH --ntasks-per-node=2" in Path(job["sbatch"]).read_text()
    rank1 = Path(job["stdout"].replace("_0_log.out", "_1_log.out")).read_text()
    assert "global_rank=1(2)" in rank1  # submitit's second task, which joined the gloo group
    assert json.loads((stage_dir / "metrics.json").read_text())["metrics"]["epochs"] == 2


def test_job_arrays_aftercorr_dependencies_and_a_failing_stage(sweeps, capsys):
    root = sweeps["arrays"]
    rows = {r.id: r for r in wait_slurm(root, poll=1, timeout=300)}
    assert {k: r.state for k, r in rows.items()} == {
        "a/trial0/pretrain": "done", "bad/trial0/pretrain": "failed",
        "a/trial0/knn": "done", "bad/trial0/knn": "skipped"}
    # one array for the pretrain runs, one for the benchmark, task i of one waiting for task i of the other
    pre_ids = [rows[f"{v}/trial0/pretrain"].job_id for v in ("a", "bad")]
    knn_ids = [rows[f"{v}/trial0/knn"].job_id for v in ("a", "bad")]
    pre_array, knn_array = pre_ids[0].split("_")[0], knn_ids[0].split("_")[0]
    assert pre_ids == [f"{pre_array}_0", f"{pre_array}_1"] and knn_ids == [f"{knn_array}_0", f"{knn_array}_1"]
    job = json.loads((root / "a/trial0/knn/stage.json").read_text())["jobs"][-1]
    sbatch = Path(job["sbatch"]).read_text()
    assert f"#SBATCH --dependency=aftercorr:{pre_array}" in sbatch and "#SBATCH --array=0-1%2" in sbatch
    assert rows["bad/trial0/pretrain"].raw == "FAILED"
    assert rows["bad/trial0/knn"].raw == "CANCELLED" and rows["bad/trial0/knn"].reason == "upstream bad/trial0/pretrain failed"
    record = json.loads((root / "a/trial0/knn/metrics.json").read_text())
    assert record["checkpoint"]["path"].endswith("a/trial0/pretrain/checkpoint_0001.pth.tar")
    # the failure report: job id, scheduler state and the stderr tail with the cause
    assert status.main([str(root)]) == 1
    out = capsys.readouterr().out
    assert f"--- bad/trial0/pretrain: failed (job {pre_array}_1, slurm, scheduler state FAILED" in out
    assert "moco_k=32 must be divisible by batch_size=12" in out
    # re-running: finished stages are kept, the failed one and its benchmark are submitted again
    assert sweep.main([str(root.parent / "spec.yaml"), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert plan.count("  done     ") == 2 and "run      bad/trial0/pretrain  (re-run after failure)" in plan
    assert "run      bad/trial0/knn" in plan
