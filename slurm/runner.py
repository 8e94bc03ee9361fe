"""The job side of a sweep: `StageJob` is what submitit pickles and runs for every stage.

It is a `submitit.helpers.Checkpointable`: on preemption or near the time limit Slurm sends USR2
(`--signal=USR2@signal_delay_s`), submitit calls `checkpoint()`, which resubmits the same StageJob, and
requeues the job (same job id). The requeued run calls the stage again, and the stage resumes from its
own output dir (pretraining from its latest `checkpoint_*.pth.tar`, linear eval from its head checkpoint,
detectron2 with `--resume`). Protocol: submitit docs, "Checkpointing" (a signal after
min(0.8 x limit, limit - 10 min) counts as a time-out, `max_timeouts` of them are requeued; preemption
signals need the cluster's `SlurmctldParameters=preempt_send_user_signal`).

Multi-task stages (DDP, one task per GPU, on one or several nodes) get RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT from the job environment (slurm/rendezvous.py: SLURM_PROCID etc., the first node's
address, a port fixed by the job id); detectron2 stages get `--num-machines/--machine-rank/--dist-url`.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import submitit

from mocobench.core.commands import dispatch
from mocobench.core.errors import one_line
from mocobench.slurm import rendezvous, state

# `call: cli` payloads: the command their argv starts with -> "module:function" taking the rest of argv
CLI_COMMANDS: dict[str, tuple[str, str]] = {
    "transfer": ("mocobench.transfer.cli:main", "detectron2 transfer (a sweep's transfer stages)"),
}


class StageError(RuntimeError):
    """A stage that ran but did not produce its result; the message says what is missing."""


def job_environment():
    """submitit's JobEnvironment inside a submitit job (slurm, local or debug), else None."""
    try:
        return submitit.JobEnvironment()
    except RuntimeError:
        return None


def _demo_data_root() -> str:
    """The embedded demo data's root: transfer reads ROOT/VOCdevkit/VOC2007 and ROOT/coco from it."""
    from mocobench.core.demo_data import ensure_demo_data
    return str(ensure_demo_data().root)


def limit_threads(threads: int | None) -> None:
    """The job's CPUs (`cpus_per_task`) as $MOCOBENCH_CPUS, which every stage's `fit_threads` splits between
    intra-op threads and loader workers (core/threads.py); PyTorch otherwise starts one thread per core of
    the node and oversubscribes shared nodes. A user's $OMP_NUM_THREADS / $MOCOBENCH_CPUS wins."""
    if not threads or "OMP_NUM_THREADS" in os.environ or "MOCOBENCH_CPUS" in os.environ:
        return
    os.environ["MOCOBENCH_CPUS"] = str(threads)  # inherited by launched subprocesses (detectron2 workers)
    import torch
    torch.set_num_threads(threads)


class StageJob(submitit.helpers.Checkpointable):
    def __init__(self, stage_id: str, stage_dir: str, config_hash: str, payload: dict,
                 threads: int | None = None) -> None:
        self.stage_id, self.stage_dir, self.config_hash, self.payload = stage_id, stage_dir, config_hash, payload
        self.threads = threads

    def __repr__(self) -> str:
        return f"StageJob({self.stage_id})"

    def __call__(self) -> dict:
        env = job_environment()
        rank = env.global_rank if env else 0
        job_id = env.job_id if env else None
        limit_threads(self.threads)
        if rank == 0:
            state.append_event(self.stage_dir, "start", job_id=job_id, hash=self.config_hash)
        try:
            if self.payload["call"] == "dataclass":
                self._run_dataclass(env)
            elif self.payload["call"] == "cli":
                self._run_cli(env)
            else:
                raise StageError(f"{self.stage_id}: unknown payload kind {self.payload['call']!r}")
            if rank == 0 and not (Path(self.stage_dir) / state.METRICS_FILE).exists():
                raise StageError(f"{self.stage_id}: the stage returned without writing its metrics.json")
        except Exception as e:  # recorded for `mocobench results` / `status`, then raised to submitit
            if rank == 0:
                state.append_event(self.stage_dir, "failed", job_id=job_id, hash=self.config_hash,
                                   error=f"{type(e).__name__}: {one_line(e)}"[:500])
            raise
        metrics = Path(self.stage_dir) / state.METRICS_FILE
        if rank == 0:
            state.append_event(self.stage_dir, "done", job_id=job_id, hash=self.config_hash)
        return {"stage": self.stage_id, "metrics": str(metrics), "rank": rank}

    def _run_dataclass(self, env) -> None:
        if env is not None and env.num_tasks > 1:
            # CUDA_VISIBLE_DEVICES stays as Slurm set it: the stages pick cuda:LOCAL_RANK themselves
            rendezvous.export_torch_env(env)
        module = importlib.import_module(self.payload["module"])
        cls = getattr(module, self.payload["config_class"])
        fn = getattr(module, self.payload["function"])
        fn(cls(**self.payload["config"]))

    def _run_cli(self, env) -> None:
        argv = list(self.payload["argv"])
        root = self.payload.get("data_root", "")
        argv += ["--data-root", _demo_data_root() if root == "demo" else root]
        if self.payload.get("multinode") and env is not None and env.num_nodes > 1:
            argv += ["--num-machines", str(env.num_nodes), "--machine-rank", str(env.node),
                     "--dist-url", rendezvous.dist_url(env)]
        argv.append("--resume")  # detectron2 resumes from OUT/detectron2/last_checkpoint if there is one
        argv += list(self.payload.get("opts", []))
        print(f"stage {self.stage_id}: mocobench {' '.join(argv)}", flush=True)
        rc = dispatch(CLI_COMMANDS, argv, "mocobench", "command", "")
        if rc:
            raise StageError(f"{self.stage_id}: `mocobench {' '.join(argv[:2])}` exited with status {rc}")

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on USR2 (rank 0): note the requeue; the stage resumes from its own dir."""
        env = job_environment()
        state.append_event(self.stage_dir, "requeue", job_id=env.job_id if env else None, hash=self.config_hash)
        print(f"stage {self.stage_id}: preempted or near its time limit; requeueing", file=sys.stderr, flush=True)
        return super().checkpoint(*args, **kwargs)


