"""Hand stages to submitit: choose the cluster, build executors from a stage's resources, and submit to
Slurm as job arrays with dependencies (plus the final tables job); every submitted job is recorded in its
stage's stage.json.

Every stage is one submitit job running `mocobench.slurm.runner.StageJob`. Stages of one benchmark entry
(or all pretrain runs) with equal resources go into one job array; benchmarks depend on their pretrain run
(`aftercorr` array to array when the task indices line up, `afterok` otherwise), and every job gets
`--kill-on-invalid-dep=yes` so that a failed pretrain cancels its benchmarks instead of leaving them
pending forever.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import submitit
from submitit.core.utils import JobPaths

from mocobench.core.errors import ConfigError
from mocobench.core.records import STAGE_FILE, now_iso
from mocobench.slurm import jobs, state
from mocobench.slurm import spec as sp
from mocobench.slurm.plan import Action
from mocobench.slurm.runner import StageJob
from mocobench.slurm.stages import Stage
from mocobench.slurm.tables import gather_tables

THROWAWAY_MARKER = "# mocobench-throwaway-slurm"  # first line of slurm/cluster/start.sh's slurm.conf


def pick_cluster(requested: str) -> str:
    """auto: submitit's AutoExecutor choice (Slurm where `srun` exists, else local), except that a
    machine whose only Slurm is our stopped throw-away test cluster runs locally."""
    if requested != "auto":
        return requested
    chosen = submitit.AutoExecutor.which()
    if chosen == "slurm" and not jobs.slurm_responds():
        conf = Path("/etc/slurm/slurm.conf")
        if conf.exists() and not conf.read_text().startswith(THROWAWAY_MARKER):
            raise ConfigError("Slurm is installed but its controller does not answer (sinfo failed); "
                              "retry later, or pass --cluster local to run on this machine")
        print("mocobench sweep: Slurm commands are installed but no cluster answers; running locally",
              file=sys.stderr)
        return "local"
    return "local" if chosen != "slurm" else "slurm"


def make_executor(folder: Path, cluster: str, res: sp.Resources, name: str, dependency: str | None = None):
    """A submitit executor (slurm, local or debug) asking for `res`; `dependency` is an sbatch one."""
    ex = submitit.AutoExecutor(folder, cluster=cluster, slurm_max_num_timeout=res.max_timeouts)
    params = dict(name=name, timeout_min=res.timeout_min, nodes=res.nodes, tasks_per_node=res.tasks_per_node,
                  cpus_per_task=res.cpus_per_task)
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    if res.mem_gb:
        params["mem_gb"] = res.mem_gb
    if cluster == "slurm":
        extra = {"kill-on-invalid-dep": "yes", **(res.sbatch_args or {})}
        if dependency:
            extra["dependency"] = dependency
        params.update(slurm_signal_delay_s=res.signal_delay_s, slurm_additional_parameters=extra)
        if res.nodes * res.tasks_per_node > 1:  # one dead rank ends the job instead of leaving the rest in a collective
            params["slurm_srun_args"] = ["--kill-on-bad-exit=1"]
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(res, key):
                params[f"slurm_{key}"] = getattr(res, key)
        if res.setup:
            params["slurm_setup"] = list(res.setup)
    elif cluster == "local" and res.setup:
        params["local_setup"] = list(res.setup)
    ex.update_parameters(**params)
    return ex


def job_record(job, cluster: str, folder: Path) -> dict:
    """What stage.json keeps of a submitted job: id, cluster, time, log and result paths."""
    record = {"job_id": str(job.job_id), "cluster": cluster, "submitted": now_iso(),
              "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr),
              "result": str(job.paths.result_pickle)}
    if cluster == "slurm":  # one sbatch script per array, named after the array's job id
        record["sbatch"] = str(JobPaths(folder, job_id=str(job.job_id).split("_")[0]).submission_file)
    return record


def write_stage_file(stage: Stage, new_job: dict | None = None) -> None:
    """(Re)write the stage's stage.json, appending `new_job` to its list of jobs."""
    old = state.read_stage_file(stage.dir) or {}
    jobs_ = list(old.get("jobs", [])) + ([new_job] if new_job else [])
    record = {**stage.info, "id": stage.id, "kind": stage.kind, "benchmark": stage.benchmark,
              "config_hash": stage.hash, "deps": stage.deps, "resources": dataclasses.asdict(stage.resources),
              "payload": stage.payload, "jobs": jobs_}
    state.write_json(Path(stage.dir) / STAGE_FILE, record)


def stage_job(s: Stage) -> StageJob:
    return StageJob(s.id, s.dir, s.hash, s.payload, threads=s.resources.cpus_per_task)


def submit_slurm(stages: list[Stage], actions: dict[str, Action], logs: Path, name: str) -> dict[str, dict]:
    """Submit every stage to run as job arrays with dependencies; returns stage id -> job record."""
    folder = logs / "%j"
    ref: dict[str, tuple] = {sid: ("single", a.job_id) for sid, a in actions.items() if a.what == "active"}
    records: dict[str, dict] = {}
    todo = [s for s in stages if actions[s.id].what == "run"]
    groups: dict[tuple, list[Stage]] = {}
    for s in todo:  # pretrain stages come first in `stages`, so their ids exist before benchmarks need them
        groups.setdefault((s.group, json.dumps(dataclasses.asdict(s.resources), sort_keys=True)), []).append(s)

    def submit(members: list[Stage], dependency: str | None) -> list:
        ex = make_executor(folder, "slurm", members[0].resources, f"{name}:{members[0].group}", dependency)
        with ex.batch():
            js = [ex.submit(stage_job(s)) for s in members]
        for k, (s, job) in enumerate(zip(members, js)):
            records[s.id] = job_record(job, "slurm", folder)
            write_stage_file(s, records[s.id])
            base = str(job.job_id).split("_")[0]
            ref[s.id] = ("array", base, k) if len(members) > 1 else ("single", str(job.job_id))
        return js

    for (group, _), members in groups.items():
        by_dep: dict[tuple, list[Stage]] = {}
        for s in members:
            upstream = [ref[d] for d in s.deps if d in ref]
            key = upstream[0][:2] if upstream else ("none",)
            by_dep.setdefault(key, []).append(s)
        for key, batch in by_dep.items():
            for s in batch:
                write_stage_file(s)
            if key[0] == "none":
                submit(batch, None)
            elif key[0] == "single":
                submit(batch, f"afterok:{key[1]}")
            else:  # upstream is array key[1]: task-to-task when the indices line up, else one job each
                batch.sort(key=lambda s: ref[s.deps[0]][2])
                idx = [ref[s.deps[0]][2] for s in batch]
                size = sum(1 for r in ref.values() if r[0] == "array" and r[1] == key[1])
                if idx == list(range(size)):
                    submit(batch, f"aftercorr:{key[1]}")
                else:
                    for s, i in zip(batch, idx):
                        submit([s], f"afterok:{key[1]}_{i}")
    return records


def submit_tables_job(spec: sp.SweepSpec, root: Path, logs: Path, records: dict[str, dict]):
    """A one-task CPU Slurm job that gathers the tables once every submitted job has ended (afterany)."""
    ids = sorted({r["job_id"].split("_")[0] for r in records.values()})
    res = sp.merge_resources(sp.parse_resources(spec.resources, spec.source))
    ex = make_executor(logs / "%j", "slurm", dataclasses.replace(res, tasks_per_node=1, gpus_per_node=0),
                       f"{spec.name}:tables", "afterany:" + ":".join(ids))
    return ex.submit(gather_tables, str(root))
