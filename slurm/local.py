"""Run a sweep's stages on this machine: submitit's local executor (one process tree per stage) or its
debug executor (in this process), in dependency order, `parallel` at a time; the benchmarks of a failed
stage are skipped, and an interrupt (Ctrl-C or SIGTERM) cancels the running stages.
"""
from __future__ import annotations

import signal
import time
from pathlib import Path

from tqdm import tqdm

from mocobench.core.records import STAGE_FILE
from mocobench.slurm import jobs, state
from mocobench.slurm.plan import Action
from mocobench.slurm.stages import Stage
from mocobench.slurm.submit import job_record, make_executor, stage_job, write_stage_file


class LocalRunner:
    """Start the stages whose action is `run` once their dependencies are done; wait for stages that
    another sweep's local job is running (`active`)."""

    def __init__(self, stages: list[Stage], actions: dict[str, Action], logs: Path, cluster: str, parallel: int,
                 poll: float = 1.0) -> None:
        self.by_id = {s.id: s for s in stages}
        self.todo = [s for s in stages if actions[s.id].what == "run"]
        self.ok = {sid for sid, a in actions.items() if a.what == "done"}
        self.failed: set[str] = set()
        self.elsewhere = {sid: a.job_id for sid, a in actions.items() if a.what == "active"}  # another sweep's
        self.running: dict[str, tuple] = {}
        self.logs, self.cluster, self.parallel, self.poll = logs, cluster, parallel, poll
        self.bar = None

    def say(self, msg: str) -> None:
        self.bar.write(f"[{time.strftime('%H:%M:%S')}] {msg}")

    def run(self) -> None:
        self.bar = tqdm(total=len(self.todo), desc="stages", unit="stage", disable=None)
        try:
            while self.todo or self.running:
                self._check_elsewhere()
                self._start_ready()
                for sid, (s, job, record) in list(self.running.items()):
                    if job.done():
                        del self.running[sid]
                        self._finish(s, job, record)
                if self.running or self.elsewhere:
                    time.sleep(self.poll)
        except KeyboardInterrupt:
            for sid, (_, job, record) in self.running.items():
                jobs.stop_local_job(job)
                self.say(f"{sid}: cancelled (job {record['job_id']})")
            raise
        finally:
            self.bar.close()

    def _check_elsewhere(self) -> None:
        for sid, job_id in list(self.elsewhere.items()):
            s = self.by_id[sid]
            if state.finished_hash(s.dir) == s.hash:
                self.ok.add(sid)
            elif not jobs.local_state(job_id, "").active:
                self.failed.add(sid)
            else:
                continue
            del self.elsewhere[sid]

    def _start_ready(self) -> None:
        for s in list(self.todo):
            if any(d in self.failed for d in s.deps):
                self.todo.remove(s)
                self.failed.add(s.id)
                self.say(f"{s.id}: skipped (upstream failed)")
            elif all(d in self.ok for d in s.deps) and len(self.running) < self.parallel:
                self.todo.remove(s)
                ex = make_executor(self.logs / "%j", self.cluster, s.resources, s.id)
                write_stage_file(s)
                job = ex.submit(stage_job(s))
                record = job_record(job, self.cluster, self.logs / "%j")
                write_stage_file(s, record)
                self.say(f"{s.id}: started (job {job.job_id})")
                if self.cluster == "debug":  # the debug executor runs the job when asked for its outcome
                    self._finish(s, job, record)
                else:
                    self.running[s.id] = (s, job, record)

    def _finish(self, s: Stage, job, record: dict) -> None:
        if self.cluster == "debug":
            err = job.exception()
            record["outcome"] = "success" if err is None else "error"
            if err is not None:
                record["error"] = str(err)[-3000:]
            replace_last_job(s, record)
        done = state.finished_hash(s.dir) == s.hash
        (self.ok if done else self.failed).add(s.id)
        self.bar.update(1)
        self.say(f"{s.id}: {'done' if done else 'FAILED'} (job {record['job_id']})")


def replace_last_job(stage: Stage, record: dict) -> None:
    """Replace the last job of the stage's stage.json by `record` (the debug job with its outcome)."""
    info = state.read_stage_file(stage.dir) or {}
    state.write_json(Path(stage.dir) / STAGE_FILE, {**info, "jobs": info.get("jobs", [])[:-1] + [record]})


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run_local(stages: list[Stage], actions: dict[str, Action], logs: Path, cluster: str, parallel: int,
              poll: float = 1.0) -> None:
    """`LocalRunner(...).run()` with SIGTERM raising KeyboardInterrupt meanwhile, so that a terminated
    sweep cancels its running stages too; re-raises the KeyboardInterrupt."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        LocalRunner(stages, actions, logs, cluster, parallel, poll=poll).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
