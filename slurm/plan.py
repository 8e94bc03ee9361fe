"""Decide what a sweep does with each stage: reuse a finished result of the same config (hash), leave a
queued/running job alone, (re-)run, or refuse to overwrite another config's outputs; `--force` re-runs
and the sweep moves old stage dirs aside (core/run_folder.py `archive`), never deleting a result.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mocobench.slurm import jobs, state
from mocobench.slurm.stages import Stage


@dataclass
class Action:
    what: str                 # done | active | run | conflict
    note: str = ""
    job_id: str | None = None  # active: the queued/running job


def plan(stages: list[Stage], force: bool) -> dict[str, Action]:
    """Stage id -> Action (see the module docstring); one scheduler query for all Slurm jobs."""
    infos = {s.id: state.read_stage_file(s.dir) or {} for s in stages}
    lasts = {sid: info["jobs"][-1] if info.get("jobs") else None for sid, info in infos.items()}
    slurm_ids = [j["job_id"] for j in lasts.values() if j and j.get("cluster") == "slurm"]
    sched = jobs.slurm_states(slurm_ids) if slurm_ids else {}
    actions = {}
    for s in stages:
        info = infos[s.id]
        finished = state.finished_hash(s.dir)
        metrics = Path(s.dir) / state.METRICS_FILE
        last = lasts[s.id]
        js = None
        if last and last.get("cluster") == "slurm":
            js = sched.get(last["job_id"])
        elif last and last.get("cluster") == "local":
            js = jobs.local_state(last["job_id"], last.get("result", ""))
        if finished == s.hash and not force:
            actions[s.id] = Action("done")
        elif metrics.exists():
            actions[s.id] = Action("conflict", f"{metrics} holds a finished result of another config "
                                               f"(hash {finished or 'unknown'}, now {s.hash})")
        elif js is not None and js.active:
            if info.get("config_hash") == s.hash and not force:
                actions[s.id] = Action("active", f"job {last['job_id']} is {js.state}", last["job_id"])
            else:
                actions[s.id] = Action("conflict", f"job {last['job_id']} ({js.state}) runs another config "
                                                   "or --force was given; cancel it first (scancel)")
        elif info.get("config_hash") not in (None, s.hash) and state.has_outputs(s.dir):
            actions[s.id] = Action("conflict", f"{s.dir} holds partial outputs of another config "
                                               f"(hash {info.get('config_hash')}, now {s.hash})")
        else:
            actions[s.id] = Action("run", "re-run after failure" if last else "")
    if force:  # --force reruns finished stages and moves conflicting outputs aside (not active jobs)
        for sid, a in actions.items():
            if a.what == "conflict" and "job " not in a.note:
                actions[sid] = Action("run", "forced: " + a.note)
    return actions
