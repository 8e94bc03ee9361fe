"""Jobs that span two nodes of the throw-away Slurm (slurm/cluster/start.sh: nodes HOST-1 and HOST-2 on
loopback, one slurmd each): MoCo pretraining over 2 nodes x 1 task equals the single process that emulates
the same global batch; a 2-node pretrain preempted with USR2 requeues and ends bit-identical to an
uninterrupted one; a killed rank fails the job at once with the cause in `mocobench status`; 2-node linear
eval, semi-supervised fine-tuning and detectron2 transfer run to their metrics. Every job is submitted by
the module fixture so that they overlap; each test waits for its own. Skipped, with the reason, where no
2-node cluster can be started.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from mocobench.pretrain.train import CONFIG_DIR
from mocobench.slurm import spec as sp
from mocobench.slurm import state, status, sweep
from mocobench.slurm import testing as st
from mocobench.slurm.runner import StageJob
from mocobench.slurm.submit import make_executor
from mocobench.slurm.wait import wait_slurm

EPOCHS = 8
TWO_NODES = {"nodes": 2, "tasks_per_node": 1}
# BN running statistics are not compared: the single process updates them once per BN group (two momentum
# steps per training step), each DDP rank once, and DDP then keeps rank 0's (pretrain/moco.py docstring).
BN_RUNNING = ("running_mean", "running_var", "num_batches_tracked")


def _spec(root: Path, data: Path, pretrain_resources: dict, benchmarks: dict | None = None,
          epochs: int = EPOCHS, keep: int = 0) -> Path:
    spec = {"output_root": str(root / "sweep"), "results": False, "cluster": "slurm",
            "resources": {"cpus_per_task": 1, "timeout_min": 10},
            "pretrain": {"config": ["demo"], "overrides": {**st.tiny_pretrain_fields(data, epochs), "amp": False,
                                                                "keep_checkpoints": keep},
                         "variants": {"mn": {}}, "resources": pretrain_resources},
            "benchmarks": benchmarks or {}}
    root.mkdir(parents=True, exist_ok=True)
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    return root / "spec.yaml"


def _fixed_views_job(out: Path, data: Path, resources: dict):
    """A StageJob running pretrain with fixed views (slurm/testing.py) on `resources`."""
    demo = yaml.safe_load((CONFIG_DIR / "demo.yaml").read_text())
    config = {**demo, **st.tiny_pretrain_fields(data, 2), "out": str(out), "loader": "pil", "amp": False,
              "channels_last": False, "knn_monitor": 0}
    payload = {"call": "dataclass", "module": "mocobench.slurm.testing", "config_class": "pretrain_config",
               "function": "pretrain_fixed_views", "config": config}
    res = sp.merge_resources(sp.Resources(cpus_per_task=1, timeout_min=10, **resources))
    ex = make_executor(out.parent / "logs" / "%j", "slurm", res, f"test:{out.name}")
    return ex.submit(StageJob(out.name, str(out), "test", payload, threads=1))


@pytest.fixture(scope="module")
def submitted(tmp_path_factory, smoke_root):
    reason = st.ensure_cluster()
    if reason:
        pytest.skip(f"real Slurm unavailable: {reason}")
    nodes = st.usable_nodes()
    if len(nodes) < 2:
        pytest.skip(f"the running Slurm has {len(nodes)} usable node(s) ({', '.join(nodes)}); these tests need 2 "
                    "(slurm/cluster/start.sh starts 2 by default)")
    base = tmp_path_factory.mktemp("multinode")
    data = st.tiny_imagefolder(base / "tiny")
    linear = {"config": ["demo"], "data": str(data), "epochs": 1, "schedule": [], "image_size": 16, "resize": 18,
              "crop": 16, "batch_size": 8, "workers": 0, "print_freq": 1, "resources": TWO_NODES}
    labelled = st.tiny_imagefolder(base / "labelled", train_per_class=20)  # its 10 % subset: 2 images a class
    semisup = {"config": ["demo"], "data": str(labelled), "subset": "10pct", "epochs": 1, "schedule": [],
               "lrs": [0.01], "head_mults": [1], "image_size": 16, "resize": 18, "crop": 16, "batch_size": 8,
               "workers": 0, "print_freq": 1, "resources": TWO_NODES}
    smoke = {"benchmark": "voc07-c4", "smoke": True, "data_root": str(smoke_root), "weights": "none",
             "resources": TWO_NODES}
    specs = {  # submission order = scheduling priority: the jobs signalled mid-run go first
        "requeue": _spec(base / "requeue", data, TWO_NODES),
        # far more epochs than the tests take to reach it (500 of them ran in 2.3 min on a fast host): it runs
        # until the test kills a rank, or until its 10-min limit / the teardown's scancel
        "dies": _spec(base / "dies", data, TWO_NODES, epochs=20000, keep=2),
        "mn": _spec(base / "mn", data, TWO_NODES, {"linear": linear, "semisup": semisup,
                                                         "voc07-c4-smoke": smoke}),
    }
    for path in specs.values():
        assert sweep.main([str(path), "--no-wait"]) == 0
    fixed = {"ddp": _fixed_views_job(base / "fixed" / "ddp", data, TWO_NODES),
             "emulated": _fixed_views_job(base / "fixed" / "emulated", data, {})}
    sweeps = {name: path.parent / "sweep" for name, path in specs.items()}
    yield {"sweeps": sweeps, "fixed": fixed}
    # a test that failed early may leave its jobs running (the 'dies' pretrain runs for minutes): stop them
    left = [r.job_id for root in sweeps.values() for r in status.collect(root) if r.active and r.job_id]
    left += [job.job_id for job in fixed.values() if not job.done()]
    if left:
        subprocess.run(["scancel", *left], check=False)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


# the two tests that signal a running job come first: their jobs were submitted first and are running
def test_two_node_pretrain_preempted_requeues_and_ends_as_the_uninterrupted_run(submitted):
    root = submitted["sweeps"]["requeue"]
    stage_dir = root / "mn" / "trial0" / "pretrain"
    st.wait_for_file(stage_dir / "stage.json", 30)
    job_id = json.loads((stage_dir / "stage.json").read_text())["jobs"][-1]["job_id"]
    st.wait_for_file(stage_dir / "checkpoint_0000.pth.tar", 180, poll=0.1)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    (row,) = wait_slurm(root, poll=1, timeout=240)
    assert (row.state, row.job_id, row.restarts) == ("done", job_id, 1)
    assert [e["event"] for e in state.read_events(stage_dir)] == ["start", "requeue", "start", "done"]
    resumed = [line for line in (stage_dir / "log.txt").read_text().splitlines() if "resumed from" in line]
    assert len(resumed) == 1 and "2 process(es)" in resumed[0]

    # the same 2-node config, uninterrupted: the mn sweep's pretrain
    (ref_row, *_) = [r for r in wait_slurm(submitted["sweeps"]["mn"], poll=1, timeout=400) if "pretrain" in r.id]
    assert ref_row.state == "done"
    name = f"checkpoint_{EPOCHS - 1:04d}.pth.tar"
    got = _weights(stage_dir / name)
    ref = _weights(submitted["sweeps"]["mn"] / "mn" / "trial0" / "pretrain" / name)
    assert got.keys() == ref.keys()
    for key, value in ref.items():
        assert torch.equal(got[key], value), key


def test_a_killed_rank_fails_the_two_node_job_at_once_with_the_cause_in_status(submitted, capsys):
    root = submitted["sweeps"]["dies"]
    stage_dir = root / "mn" / "trial0" / "pretrain"
    deadline = time.monotonic() + 240
    while not list(stage_dir.glob("checkpoint_*.pth.tar")):  # it keeps the newest 2: which ones varies
        assert time.monotonic() < deadline, f"no checkpoint in {stage_dir} after 240 s"
        time.sleep(0.2)
    job_id = json.loads((stage_dir / "stage.json").read_text())["jobs"][-1]["job_id"]
    assert not (stage_dir / "metrics.json").exists(), "the job finished before a rank could be killed"
    pids = st.task_pids(job_id, rank=1)
    assert pids, f"no process of task 1 of job {job_id} found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    (row,) = wait_slurm(root, poll=1, timeout=120)
    assert row.state == "failed" and row.raw.startswith("FAILED"), row
    assert time.monotonic() - killed < 90  # not a hang in a collective
    assert not (stage_dir / "metrics.json").exists()
    assert status.main([str(root)]) == 1
    out = capsys.readouterr().out
    assert f"--- mn/trial0/pretrain: failed (job {job_id}, slurm, scheduler state FAILED" in out
    assert "first task to fail: task 1 on " in out and ": Killed (srun)" in out, out


def test_two_node_pretrain_equals_the_single_process_emulating_its_global_batch(submitted):
    ddp, emulated = submitted["fixed"]["ddp"], submitted["fixed"]["emulated"]
    for job in (ddp, emulated):
        st.wait_done(job, 300)
        assert job.exception() is None, job.stderr()
    ddp_dir, emu_dir = (Path(job.submission().function.stage_dir) for job in (ddp, emulated))
    assert "2 process(es)" in (ddp_dir / "log.txt").read_text()
    assert "1 process(es)" in (emu_dir / "log.txt").read_text()
    got, ref = _weights(ddp_dir / "checkpoint_0001.pth.tar"), _weights(emu_dir / "checkpoint_0001.pth.tar")
    assert got.keys() == ref.keys()
    compared = [k for k in ref if not k.endswith(BN_RUNNING)]
    assert any("encoder_q" in k for k in compared) and "module.queue" in compared
    for key in compared:
        # fp32 sums in another order (gloo's all-reduce, per-rank loss means) over 10 SGD steps
        torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-5, msg=key)
    assert not torch.equal(got["module.encoder_q.conv1.weight"],
                           torch.load(ddp_dir / "checkpoint_0000.pth.tar", weights_only=True)["state_dict"][
                               "module.encoder_q.conv1.weight"])  # it trained

    # rank 0 alone writes: one header, one record per logging step, one start/done, rank 1 silent
    log = (ddp_dir / "log.txt").read_text()
    assert log.count("MoCo pretrain:") == 1
    steps = [json.loads(line)["step"] for line in (ddp_dir / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == sorted(set(steps)) and len(steps) == 10
    assert [e["event"] for e in state.read_events(ddp_dir)] == ["start", "done"]
    rank1_out = Path(str(ddp.paths.stdout).replace("_0_log.out", "_1_log.out"))
    assert "global_rank=1(2)" in rank1_out.read_text() and "MoCo pretrain" not in rank1_out.read_text()
    sbatch = Path(str(ddp.paths.submission_file)).read_text()
    assert "#SBATCH --nodes=2" in sbatch and "--kill-on-bad-exit=1" in sbatch


def test_two_node_sweep_pretrain_linear_and_detectron2(submitted):
    root = submitted["sweeps"]["mn"]
    rows = {r.id: r for r in wait_slurm(root, poll=1, timeout=400)}
    assert {k: r.state for k, r in rows.items()} == {
        "mn/trial0/pretrain": "done", "mn/trial0/linear": "done", "mn/trial0/semisup": "done",
        "baseline/none/voc07-c4-smoke": "done"}, \
        status.render(list(rows.values()))
    pretrain = root / "mn" / "trial0" / "pretrain"
    job = json.loads((pretrain / "stage.json").read_text())["jobs"][-1]
    assert "#SBATCH --nodes=2" in Path(job["sbatch"]).read_text()
    assert "2 process(es)" in (pretrain / "log.txt").read_text()
    for evaluator in ("linear", "semisup"):
        record = json.loads((root / "mn" / "trial0" / evaluator / "metrics.json").read_text())
        assert record["checkpoint"]["path"].endswith(f"checkpoint_{EPOCHS - 1:04d}.pth.tar")
        stdout = Path(json.loads((root / "mn/trial0" / evaluator / "stage.json").read_text())["jobs"][-1]["stdout"])
        assert "2 process(es)" in stdout.read_text(), evaluator
    smoke = json.loads((root / "baseline" / "none" / "voc07-c4-smoke" / "metrics.json").read_text())
    assert smoke["provenance"]["world_size"] == 2 and set(smoke["metrics"]) >= {"AP", "AP50", "AP75"}
    d2_stdout = Path(json.loads((root / "baseline/none/voc07-c4-smoke/stage.json").read_text())["jobs"][-1]["stdout"])
    assert "--num-machines 2 --machine-rank 0 --dist-url tcp://" in d2_stdout.read_text()


# ------------------------------------------------------------------ without a cluster

def _fake_scontrol(tmp_path, monkeypatch, output: str, rc: int = 0) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(f"#!/bin/sh\ncat <<'OUT'\n{output}\nOUT\nexit {rc}\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_rendezvous_uses_slurms_node_address_and_a_port_fixed_by_the_job_id(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from mocobench.slurm import rendezvous
    _fake_scontrol(tmp_path, monkeypatch, "NodeName=gpu-7 Arch=x86_64 CoresPerSocket=2 NodeAddr=10.1.2.7 "
                                          "NodeHostName=gpu-7 Port=6818")
    env = SimpleNamespace(hostnames=["gpu-7", "gpu-8"], job_id="4242", global_rank=3, num_tasks=4, local_rank=1,
                          num_nodes=2)
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(key, "unset")  # recorded, so the values exported below are undone after the test
    values = rendezvous.export_torch_env(env)
    port = rendezvous.master_port("4242")
    assert values == {"MASTER_ADDR": "10.1.2.7", "MASTER_PORT": str(port), "RANK": "3", "WORLD_SIZE": "4",
                      "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert all(os.environ[k] == v for k, v in values.items())
    assert rendezvous.dist_url(env) == f"tcp://10.1.2.7:{port}"
    assert port == rendezvous.master_port("4242") and 20000 <= port <= 60000  # the same after a requeue
    assert rendezvous.master_port("4243") != port


def test_rendezvous_falls_back_to_the_node_name(tmp_path, monkeypatch):
    from mocobench.slurm import rendezvous
    _fake_scontrol(tmp_path, monkeypatch, "slurm_load_node error: Invalid node name specified", rc=1)
    assert rendezvous.node_address("gpu-7") == "gpu-7"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no scontrol at all
    assert rendezvous.node_address("gpu-7") == "gpu-7"


def test_status_names_the_first_task_that_failed(tmp_path):
    from mocobench.slurm import jobs
    log = tmp_path / "7_0_log.err"
    log.write_text("srun: error: node-2: task 1: Killed\nsrun: launch/slurm: _step_signal: Terminating StepId=7.0\n"
                   "RuntimeError: Connection reset by peer\nsrun: error: node-1: task 0: Exited with exit code 1\n")
    assert jobs.first_task_failure(log) == "task 1 on node-2: Killed"
    log.write_text("srun: error: node-3: tasks 4-7: Killed\n")
    assert jobs.first_task_failure(log) == "tasks 4-7 on node-3: Killed"
    log.write_text("Traceback (most recent call last):\nValueError: bad\n")
    assert jobs.first_task_failure(log) == "" and jobs.first_task_failure(tmp_path / "missing") == ""
    row = status.StageStatus(id="v/trial0/pretrain", state="failed", job_id="7", cluster="slurm", restarts=0,
                             raw="FAILED", stderr=str(log), tasks=2)
    log.write_text("x" * (jobs.TASK_ERROR_WINDOW + 10) + "\nsrun: error: node-2: task 1: Killed\n"
                   "RuntimeError: Connection reset by peer\n")  # found in a log longer than the window read
    text = status.render([row])
    assert "first task to fail: task 1 on node-2: Killed (srun)" in text and "Connection reset by peer" in text
    single = status.render([dataclasses.replace(row, tasks=1)])  # one task: the tail says it all
    assert "first task to fail" not in single and "Connection reset by peer" in single
