"""`mocobench sweep SPEC.yaml`: run a pretrain-plus-benchmark sweep as submitit jobs (Slurm, local or debug).

Every stage is one submitit job running `slurm.runner.StageJob` (Checkpointable: requeued and resumed
after preemption or at its time limit). On Slurm, stages of one benchmark (or all pretrain runs) go into
one job array; benchmarks depend on their pretrain run (`aftercorr` array to array, `afterok` otherwise,
`--kill-on-invalid-dep=yes` so that a failed pretrain cancels its benchmarks instead of leaving them
pending forever). Locally (or in debug mode, in this process), stages run one after the other (or
`local_parallel` at a time) in dependency order.

Re-running a sweep skips stages whose metrics.json was written for the same resolved config (hash),
re-submits failed or never-run ones, leaves queued/running ones alone, and refuses to overwrite a
finished result of a different config unless --force (which moves the old stage dir aside).

At the end (unless --no-wait) the sweep prints the state of every stage and gathers the tables with
`mocobench results SWEEP_DIR`; `mocobench status SWEEP_DIR` shows the state at any time.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pretrain.config import ConfigError
from results.records import now_iso
from slurm import jobs, spec as sp, state, status
from slurm.runner import StageJob
from slurm.stages import Stage, build_stages

THROWAWAY_MARKER = "# mocobench-throwaway-slurm"


# ------------------------------------------------------------------ cluster choice
def pick_cluster(requested: str) -> str:
    """auto: submitit's AutoExecutor choice (Slurm where `srun` exists, else local), except that a
    machine whose only Slurm is our stopped throw-away test cluster runs locally."""
    if requested != "auto":
        return requested
    import submitit
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


# ------------------------------------------------------------------ planning
@dataclass
class Action:
    what: str                 # done | active | run | conflict
    note: str = ""
    job_id: str | None = None  # active: the queued/running job


def plan(stages: list[Stage], force: bool) -> dict[str, Action]:
    """What to do with every stage (see the module docstring)."""
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


def archive(stage_dir: str) -> Path | None:
    """Move a stage dir with old outputs aside (never delete results): DIR -> DIR.replaced-<time>."""
    d = Path(stage_dir)
    if not d.exists():
        return None
    dst = d.with_name(f"{d.name}.replaced-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    shutil.move(str(d), str(dst))
    return dst


# ------------------------------------------------------------------ submission
def make_executor(folder: Path, cluster: str, res: sp.Resources, name: str, dependency: str | None = None):
    import submitit
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
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(res, key):
                params[f"slurm_{key}"] = getattr(res, key)
        if res.setup:
            params["slurm_setup"] = list(res.setup)
    elif cluster == "local" and res.setup:
        params["local_setup"] = list(res.setup)
    ex.update_parameters(**params)
    return ex


def _job_record(job, cluster: str, folder: Path) -> dict:
    from submitit.core.utils import JobPaths
    record = {"job_id": str(job.job_id), "cluster": cluster, "submitted": now_iso(),
              "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr),
              "result": str(job.paths.result_pickle)}
    if cluster == "slurm":  # one sbatch script per array, named after the array's job id
        record["sbatch"] = str(JobPaths(folder, job_id=str(job.job_id).split("_")[0]).submission_file)
    return record


def write_stage_file(stage: Stage, new_job: dict | None = None) -> None:
    old = state.read_stage_file(stage.dir) or {}
    jobs_ = list(old.get("jobs", [])) + ([new_job] if new_job else [])
    record = {**stage.info, "id": stage.id, "kind": stage.kind, "benchmark": stage.benchmark,
              "config_hash": stage.hash, "deps": stage.deps, "resources": dataclasses.asdict(stage.resources),
              "payload": stage.payload, "jobs": jobs_}
    state.write_json(Path(stage.dir) / state.STAGE_FILE, record)


def _stage_job(s: Stage) -> StageJob:
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
            js = [ex.submit(_stage_job(s)) for s in members]
        for k, (s, job) in enumerate(zip(members, js)):
            records[s.id] = _job_record(job, "slurm", folder)
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


class LocalRunner:
    """Run stages on this machine in dependency order, `parallel` at a time (debug: in this process);
    the benchmarks of a failed stage are skipped. Interrupting it cancels the running stages."""

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
        from tqdm import tqdm
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
                job = ex.submit(_stage_job(s))
                record = _job_record(job, self.cluster, self.logs / "%j")
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


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def replace_last_job(stage: Stage, record: dict) -> None:
    info = state.read_stage_file(stage.dir) or {}
    state.write_json(Path(stage.dir) / state.STAGE_FILE, {**info, "jobs": info.get("jobs", [])[:-1] + [record]})


def wait_slurm(root: Path, poll: float, timeout: float | None) -> list[status.StageStatus]:
    """Poll until no stage is pending or running; print each state change."""
    from tqdm import tqdm
    seen: dict[str, str] = {}
    start = time.monotonic()
    rows = status.collect(root)
    bar = tqdm(total=len(rows), desc="stages", unit="stage", disable=None)
    while True:
        rows = status.collect(root)
        for r in rows:
            if seen.get(r.id) != r.state:
                if r.id in seen or r.state not in ("done",):
                    bar.write(f"[{time.strftime('%H:%M:%S')}] {r.id}: {r.state}"
                              + (f" (job {r.job_id})" if r.job_id else ""))
                seen[r.id] = r.state
        bar.n = sum(not r.active for r in rows)
        bar.refresh()
        if not any(r.active for r in rows):
            break
        if timeout is not None and time.monotonic() - start > timeout:
            bar.close()
            raise TimeoutError(f"sweep {root} still has active stages after {timeout:.0f}s")
        time.sleep(poll)
    bar.close()
    return rows


def gather_tables(root: str) -> int:
    """`mocobench results ROOT` when the results package is installed (also run as the final Slurm job)."""
    try:
        from results.cli import main as results_main
    except ImportError:
        print("mocobench sweep: results tables not available (results.cli missing)", file=sys.stderr)
        return 0
    return int(results_main([str(root)]) or 0)


# ------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mocobench sweep", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1] + "\nSpec format: docs/slurm.md, "
                                "examples: slurm/specs/demo.yaml, slurm/specs/imagenet_full.yaml",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", metavar="SPEC.yaml", help="sweep spec (a path, or a shipped name: demo, imagenet_full)")
    p.add_argument("--cluster", choices=sp.CLUSTERS, default=None,
                   help="where jobs run (default: the spec's `cluster`, else auto: Slurm when it answers, else local)")
    p.add_argument("--out", metavar="DIR", default=None, help="sweep directory (default: the spec's output_root)")
    p.add_argument("--force", action="store_true",
                   help="re-run finished stages too; old stage dirs are moved to DIR.replaced-<time>")
    p.add_argument("--dry-run", action="store_true", help="show what would run, submit nothing")
    p.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                   help="wait for the jobs, then print every stage's state and gather the tables "
                        "(--no-wait on Slurm: submit and return; a final job gathers the tables)")
    p.add_argument("--results", action=argparse.BooleanOptionalAction, default=None,
                   help="gather tables at the end (default: the spec's `results`)")
    p.add_argument("--poll", type=float, default=5.0, metavar="S", help="seconds between state checks")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="give up waiting after S seconds")
    return p


def _print_plan(stages: list[Stage], actions: dict[str, Action], cluster: str, root: Path) -> None:
    counts: dict[str, int] = {}
    for a in actions.values():
        counts[a.what] = counts.get(a.what, 0) + 1
    print(f"sweep {root}: {len(stages)} stages on {cluster}: "
          + ", ".join(f"{n} {w}" for w, n in sorted(counts.items())))
    for s in stages:
        a = actions[s.id]
        print(f"  {a.what:8s} {s.id}" + (f"  ({a.note})" if a.note else ""))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        spec = sp.load_spec(args.spec)
        root = Path(os.path.expandvars(args.out or spec.output_root)).expanduser().absolute()
        stages = build_stages(spec, root)
        cluster = pick_cluster(args.cluster or spec.cluster)
    except (ConfigError, OSError) as e:
        print(f"mocobench sweep: error: {e}", file=sys.stderr)
        return 2
    actions = plan(stages, args.force)
    _print_plan(stages, actions, cluster, root)
    conflicts = {sid: a for sid, a in actions.items() if a.what == "conflict"}
    if conflicts:
        print("mocobench sweep: error: refusing to overwrite; pass --force to re-run (old outputs are kept "
              "as DIR.replaced-<time>):", file=sys.stderr)
        for sid, a in conflicts.items():
            print(f"  {sid}: {a.note}", file=sys.stderr)
        return 2
    if args.dry_run:
        return 0
    for s in stages:
        if args.force and actions[s.id].what == "run" and state.has_outputs(s.dir):
            moved = archive(s.dir)
            if moved:
                print(f"  moved old {s.id} to {moved}")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    logs = root / "logs" / stamp
    sweep_record = state.read_json(root / status.SWEEP_FILE) or {}
    state.write_json(root / status.SWEEP_FILE, {
        "name": spec.name, "spec": str(Path(spec.source).absolute()), "cluster": cluster, "updated": now_iso(),
        "stages": [{"id": s.id, "dir": s.dir, "kind": s.kind, "benchmark": s.benchmark, "deps": s.deps,
                    "hash": s.hash} for s in stages],
        "submissions": sweep_record.get("submissions", []) + [{"time": now_iso(), "cluster": cluster,
                                                               "logs": str(logs)}]})
    results = spec.results if args.results is None else args.results
    if cluster == "slurm":
        records = submit_slurm(stages, actions, logs, spec.name)
        print(f"submitted {len(records)} jobs; logs in {logs}; `mocobench status {root}` shows progress")
        if not args.wait:
            if results and records:
                ids = sorted({r["job_id"].split("_")[0] for r in records.values()})
                res = sp.merge_resources(sp.parse_resources(spec.resources, spec.source))
                ex = make_executor(logs / "%j", "slurm", dataclasses.replace(res, tasks_per_node=1, gpus_per_node=0),
                                   f"{spec.name}:tables", "afterany:" + ":".join(ids))
                job = ex.submit(gather_tables, str(root))
                print(f"tables job {job.job_id} will write {root / 'tables'} when all stages end")
            return 0
        try:
            rows = wait_slurm(root, args.poll, args.timeout)
        except KeyboardInterrupt:
            print(f"\nstopped waiting; the jobs keep running. `mocobench status {root}` shows progress")
            return 130
    else:
        local_parallel = spec.local_parallel if cluster == "local" else 1
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            LocalRunner(stages, actions, logs, cluster, local_parallel, poll=min(args.poll, 1.0)).run()
        except KeyboardInterrupt:
            print("\ninterrupted; running stages were cancelled. Re-run the sweep to continue.", file=sys.stderr)
            return 130
        finally:
            signal.signal(signal.SIGTERM, previous)
        rows = status.collect(root)
    print(status.render(rows))
    if results:
        if gather_tables(str(root)) == 0:
            print(f"tables: {root / 'tables'}")
    return 1 if any(r.state in status.PROBLEM_STATES + ("skipped",) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
