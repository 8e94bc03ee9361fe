"""Test support for real Slurm: start the throw-away cluster on demand, wait on jobs with a deadline,
and small importable job payloads (a job process unpickles its function by module name, so payloads
live here rather than in a test file).

The cluster itself is `slurm/cluster/start.sh` / `stop.sh` (see docs/slurm.md).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import submitit

from mocobench.slurm.jobs import slurm_responds, slurm_states

CLUSTER_DIR = Path(__file__).resolve().parent / "cluster"


def ensure_cluster(timeout: float = 240) -> str | None:
    """Make a Slurm cluster available; return None when one answers, else the reason it cannot.

    Uses a running cluster as is (ours or a real one); otherwise runs `slurm/cluster/start.sh`, which
    needs root and the Debian packages (installed via apt-get when missing).
    """
    if slurm_responds():
        return None
    if os.name != "posix" or os.geteuid() != 0:
        return "no Slurm cluster answers `sinfo`, and starting the throw-away one needs root"
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        return "no Slurm cluster answers `sinfo`, and neither slurmctld nor apt-get is installed"
    try:
        out = subprocess.run(["bash", str(CLUSTER_DIR / "start.sh")], capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"slurm/cluster/start.sh did not finish in {timeout:.0f}s"
    if out.returncode != 0:
        tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-8:])
        return f"slurm/cluster/start.sh failed (exit {out.returncode}):\n{tail}"
    return None if slurm_responds() else "start.sh succeeded but `sinfo` shows no usable node"


def wait_done(job: submitit.Job, timeout: float, poll: float = 0.5) -> None:
    """Wait until `job` is done, or raise TimeoutError naming the job and its last known state.

    submitit's own `job.wait()` has no deadline; a job that died without writing a result can keep it
    waiting when accounting is missing, so every wait in tests goes through here.
    """
    deadline = time.monotonic() + timeout
    while not job.done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job.job_id} not done after {timeout:.0f}s (state {job.state})")
        time.sleep(poll)


def wait_slurm_job_ended(job_id: str, timeout: float, poll: float = 0.5) -> None:
    """Until Slurm no longer lists `job_id` as pending or running (a stage's files are complete a moment
    before the job step and the batch script end)."""
    deadline = time.monotonic() + timeout
    while slurm_states([job_id])[job_id].active:
        if time.monotonic() > deadline:
            raise TimeoutError(f"Slurm job {job_id} still active after {timeout:.0f}s")
        time.sleep(poll)


def wait_for_file(path: Path, timeout: float, poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout:.0f}s")
        time.sleep(poll)


# ------------------------------------------------------------------ job payloads used by the tests

def add(a: int, b: int) -> int:
    return a + b


def job_start_time(a: int) -> tuple[int, float]:
    """Return the argument and the wall-clock time the job body started (ordering checks)."""
    return a, time.time()


def fail_loudly(message: str) -> None:
    print(f"about to fail: {message}", file=sys.stderr, flush=True)
    raise RuntimeError(message)


class CountingJob(submitit.helpers.Checkpointable):
    """Counts to `n`, one step per `step_s`, persisting the count to `state_file` after every step.

    On preemption submitit calls `checkpoint()` (inherited: resubmit self) and requeues; the requeued
    run continues from the persisted count. Every start appends the count it resumed from to
    `state_file.starts`, so a test can see the restart and where it resumed.
    """

    def __init__(self, n: int, state_file: str, step_s: float = 0.2) -> None:
        self.n, self.state_file, self.step_s = n, Path(state_file), step_s

    def __call__(self) -> int:
        count = int(self.state_file.read_text()) if self.state_file.exists() else 0
        with open(f"{self.state_file}.starts", "a") as f:
            f.write(f"{count}\n")
        while count < self.n:
            time.sleep(self.step_s)
            count += 1
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(str(count))
            os.replace(tmp, self.state_file)
        return count


# ------------------------------------------------------------------ tiny sweeps for the tests

def tiny_imagefolder(root: str | Path, train_per_class: int = 4, val_per_class: int = 2) -> Path:
    """A few images per class of the embedded demo set as ImageFolder train/ + val/ (made once)."""
    from mocobench.core.demo_data import ensure_demo_data
    root = Path(root)
    if (root / "val").is_dir():
        return root
    demo = ensure_demo_data()
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for cls in sorted((Path(demo.imagefolder) / split).iterdir()):
            dst = tmp / split / cls.name
            dst.mkdir(parents=True)
            for f in sorted(cls.iterdir())[:n]:
                shutil.copy(f, dst / f.name)
    tmp.rename(root)
    return root


def tiny_pretrain_fields(data: str | Path, epochs: int = 2) -> dict:
    """PretrainConfig fields (on top of the shipped `demo` config) for a seconds-long run on 1 CPU."""
    return {"data": str(data), "width": 8, "image_size": 16, "batch_size": 8, "moco_k": 32, "bn_groups": 2,
            "epochs": epochs, "workers": 0, "print_freq": 1}


# ------------------------------------------------------------------ multi-node test payloads

def _fixed_views(image_size: int, *args, **kwargs):
    """A deterministic stand-in for the MoCo augmentation: resize to `image_size`, to tensor."""
    from torchvision import transforms
    return transforms.Compose([transforms.Resize((image_size, image_size)), transforms.ToTensor()])


def pretrain_config(**fields):
    """PretrainConfig(**fields), named here so that a StageJob payload can point at this module."""
    from mocobench.pretrain.train import PretrainConfig
    return PretrainConfig(**fields)


def pretrain_fixed_views(cfg) -> dict:
    """`mocobench pretrain` with the random augmentation replaced by fixed views, so that runs with
    different numbers of ranks see the same pixels and can be compared weight for weight (each rank draws
    its augmentations from its own random stream; nothing else in a step depends on the rank count)."""
    from mocobench.pretrain import train
    original = train.moco_augmentation
    train.moco_augmentation = _fixed_views
    try:
        return train.run(cfg)
    finally:
        train.moco_augmentation = original


def usable_nodes() -> list[str]:
    """Names of the nodes `sinfo` reports as idle, mixed or allocated."""
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=30)
    return sorted({line.split()[0] for line in out.stdout.splitlines()
                   if len(line.split()) == 2 and line.split()[1].startswith(("idle", "mixed", "alloc"))})


def task_pids(job_id: str, rank: int) -> list[int]:
    """Processes of Slurm job `job_id` running task `rank` (SLURM_PROCID) of its step: the submitit
    Python process and anything it started. Needs permission to read /proc/PID/environ (root, or the
    job's own user)."""
    want = {b"SLURM_JOB_ID=" + str(job_id).encode(), b"SLURM_PROCID=" + str(rank).encode()}
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            fields = set(environ.read_bytes().split(b"\0"))
            cmdline = (environ.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if want <= fields and b"python" in cmdline:
            pids.append(int(environ.parent.name))
    return pids
