"""`mocobench status SWEEP_DIR`: every stage of a sweep with its state, job id and restarts; failed
stages also show the scheduler's state and the tail of the job's stderr.

States: done (metrics.json for the current config) | pending | running | failed | timeout | cancelled |
skipped (an upstream stage failed, so Slurm cancelled it) | new (never submitted). Read from the stage
dirs (stage.json, attempts.jsonl, metrics.json; see slurm/state.py) and the scheduler (sacct/squeue for
Slurm, the job process and result file for local jobs).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from mocobench.slurm import jobs, state

SWEEP_FILE = "sweep.json"
PROBLEM_STATES = ("failed", "timeout", "cancelled")


@dataclass
class StageStatus:
    id: str
    state: str
    job_id: str | None = None
    cluster: str | None = None
    restarts: int = 0
    raw: str = ""            # scheduler's word (FAILED, CANCELLED, OUT_OF_MEMORY, ...)
    reason: str = ""
    stderr: str | None = None
    error: str = ""          # debug executor: the exception text
    tasks: int = 1           # nodes x tasks_per_node of its job

    @property
    def active(self) -> bool:
        return self.state in jobs.ACTIVE


def read_sweep(sweep_dir: str | Path) -> dict:
    path = Path(sweep_dir) / SWEEP_FILE
    data = state.read_json(path)
    if data is None:
        raise FileNotFoundError(f"{path} not found or unreadable: {sweep_dir} is not a sweep directory "
                                f"(made by `mocobench sweep SPEC.yaml`)")
    return data


def _verdict(stage: dict, info: dict | None, job: dict | None, sched: jobs.JobState | None) -> tuple[str, str, str]:
    """(state, raw scheduler state, reason) of one stage."""
    want = stage["hash"]
    if state.finished_hash(stage["dir"]) == want:
        return "done", "", ""
    if job is None:
        return "new", "", ""
    if info and info.get("config_hash") != want:
        return "new", "", "the stage.json job ran an older config"
    if sched is None:
        return "unknown", "", ""
    if sched.state == "completed":
        return "failed", sched.raw, "the job completed without writing metrics.json for this config"
    return sched.state, sched.raw, sched.reason


def _tasks(resources: dict | None) -> int:
    resources = resources or {}
    return int(resources.get("nodes") or 1) * int(resources.get("tasks_per_node") or 1)


def collect(sweep_dir: str | Path) -> list[StageStatus]:
    """The status of every stage of the sweep in SWEEP_DIR, in sweep order (one scheduler query)."""
    sweep = read_sweep(sweep_dir)
    infos = {s["id"]: state.read_stage_file(s["dir"]) for s in sweep["stages"]}
    last = {sid: (info or {}).get("jobs", [])[-1] if (info or {}).get("jobs") else None
            for sid, info in infos.items()}
    slurm_ids = [j["job_id"] for j in last.values() if j and j.get("cluster") == "slurm"]
    slurm_states = jobs.slurm_states(slurm_ids) if slurm_ids else {}
    out, done_states = [], {}
    for stage in sweep["stages"]:  # upstream stages come first
        job = last[stage["id"]]
        sched = None
        if job is not None:
            if job.get("cluster") == "slurm":
                sched = slurm_states.get(job["job_id"])
            elif job.get("cluster") == "local":
                sched = jobs.local_state(job["job_id"], job.get("result", ""))
            elif job.get("cluster") == "debug":
                outcome = job.get("outcome")
                sched = jobs.JobState(job["job_id"], "completed" if outcome == "success" else "failed",
                                      outcome or "", "")
        verdict, raw, reason = _verdict(stage, infos[stage["id"]], job, sched)
        bad_deps = [d for d in stage["deps"] if done_states.get(d) in PROBLEM_STATES + ("skipped",)]
        if verdict in ("new", "cancelled") and bad_deps:  # Slurm cancelled it: --kill-on-invalid-dep
            verdict, reason = "skipped", f"upstream {bad_deps[0]} {done_states[bad_deps[0]]}"
        done_states[stage["id"]] = verdict
        out.append(StageStatus(id=stage["id"], state=verdict, job_id=job["job_id"] if job else None,
                               cluster=job.get("cluster") if job else None,
                               restarts=state.restarts(stage["dir"], job["job_id"] if job else None),
                               raw=raw, reason=reason, stderr=job.get("stderr") if job else None,
                               error=(job or {}).get("error", ""), tasks=_tasks((infos[stage["id"]] or {}).get("resources"))))
    return out


def render(rows: list[StageStatus], tail_lines: int = 15) -> str:
    """A table of all stages, then for each failed one its job id, state and the tail of its stderr."""
    header = ("STAGE", "STATE", "JOB", "RESTARTS", "NOTE")
    table = [header] + [(r.id, r.state, r.job_id or "-", str(r.restarts),
                         " ".join(x for x in (r.raw, r.reason) if x)) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1] for row in table]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    lines.append("")
    lines.append("  ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f"  ({len(rows)} stages)")
    for r in rows:
        if r.state not in PROBLEM_STATES:
            continue
        lines.append("")
        lines.append(f"--- {r.id}: {r.state} (job {r.job_id}, {r.cluster}, scheduler state {r.raw or '?'}"
                     + (f", {r.reason}" if r.reason else "") + ")")
        first = jobs.first_task_failure(r.stderr) if r.cluster == "slurm" and r.tasks > 1 else ""
        if first:
            lines.append(f"    first task to fail: {first} (srun); read its error first, the other tasks' may "
                         f"only follow from it")
        text = r.error or jobs.tail(r.stderr, tail_lines)
        if text:
            lines.append(f"    stderr tail ({r.stderr}):" if not r.error else "    error:")
            lines += ["    " + line for line in text.splitlines()[-tail_lines:]]
        else:
            lines.append(f"    (no stderr at {r.stderr})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mocobench status", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", metavar="SWEEP_DIR", help="the sweep's output_root")
    p.add_argument("--json", action="store_true", help="print one JSON object per stage instead of a table")
    p.add_argument("--tail", type=int, default=15, metavar="N", help="stderr lines shown per failed stage")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        rows = collect(args.sweep_dir)
    except FileNotFoundError as e:
        print(f"mocobench status: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        for r in rows:
            print(json.dumps(asdict(r)))
    else:
        print(render(rows, args.tail))
    return 1 if any(r.state in PROBLEM_STATES for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
