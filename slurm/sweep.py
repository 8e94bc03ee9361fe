"""`mocobench sweep SPEC.yaml`: run a pretrain-plus-benchmark sweep as submitit jobs (Slurm, local or debug).

Every stage is one submitit job running `mocobench.slurm.runner.StageJob` (Checkpointable: requeued and resumed
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
import os
import sys
from datetime import datetime
from pathlib import Path

from mocobench.core.errors import ConfigError
from mocobench.core.records import now_iso
from mocobench.core.run_folder import archive
from mocobench.slurm import spec as sp
from mocobench.slurm import state, status
from mocobench.slurm.local import run_local
from mocobench.slurm.plan import Action, plan
from mocobench.slurm.stages import Stage, build_stages
from mocobench.slurm.submit import pick_cluster, submit_slurm, submit_tables_job
from mocobench.slurm.tables import gather_tables
from mocobench.slurm.wait import wait_slurm


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
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="before submitting, check each third-party checkpoint of the spec once (mocobench inspect "
                        "--verify: BN statistics loaded, kNN above random init) and stop if one fails")
    p.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                   help="wait for the jobs, then print every stage's state and gather the tables "
                        "(--no-wait on Slurm: submit and return; a final job gathers the tables)")
    p.add_argument("--results", action=argparse.BooleanOptionalAction, default=None,
                   help="gather tables at the end (default: the spec's `results`)")
    p.add_argument("--poll", type=float, default=5.0, metavar="S", help="seconds between state checks")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="give up waiting after S seconds")
    return p


def _print_plan(stages: list[Stage], actions: dict[str, Action], cluster: str, root: Path) -> None:
    """The action counts, then one line per stage: action, stage id, note."""
    counts: dict[str, int] = {}
    for a in actions.values():
        counts[a.what] = counts.get(a.what, 0) + 1
    print(f"sweep {root}: {len(stages)} stages on {cluster}: "
          + ", ".join(f"{n} {w}" for w, n in sorted(counts.items())))
    for s in stages:
        a = actions[s.id]
        print(f"  {a.what:8s} {s.id}" + (f"  ({a.note})" if a.note else ""))


def _record_sweep(root: Path, spec: sp.SweepSpec, cluster: str, stages: list[Stage], logs: Path) -> None:
    """(Re)write ROOT/sweep.json: the spec, the stages in order, and this submission added to the earlier ones."""
    previous = state.read_json(root / status.SWEEP_FILE) or {}
    state.write_json(root / status.SWEEP_FILE, {
        "name": spec.name, "spec": str(Path(spec.source).absolute()), "cluster": cluster, "updated": now_iso(),
        "stages": [{"id": s.id, "dir": s.dir, "kind": s.kind, "benchmark": s.benchmark, "deps": s.deps,
                    "hash": s.hash} for s in stages],
        "submissions": previous.get("submissions", []) + [{"time": now_iso(), "cluster": cluster,
                                                           "logs": str(logs)}]})


def preflight(stages: list[Stage], actions: dict[str, Action]) -> bool:
    """Verify every third-party checkpoint (a spec `checkpoints` entry) that a stage to run evaluates, once,
    before anything is submitted: a half-loaded backbone should cost seconds, not days of jobs."""
    files = sorted({s.payload.get("config", {}).get("checkpoint") for s in stages
                    if actions[s.id].what == "run" and s.info.get("stage") == "eval" and not s.deps
                    and not s.info.get("baseline")} - {None, ""})
    if not files:
        return True
    from mocobench.checkpoints.verify import verify
    from mocobench.core.errors import CheckpointError
    ok = True
    for path in files:
        try:
            v = verify(path)
        except CheckpointError as e:
            print(f"mocobench sweep: error: pre-flight: {e}", file=sys.stderr)
            ok = False
            continue
        print(f"  pre-flight {path}: kNN top-1 {v.knn_top1:.1f} % vs random init {v.random_top1:.1f} %"
              + ("" if v.ok else " FAILED"))
        for problem in v.problems:
            print(f"mocobench sweep: error: pre-flight {path}: {problem} (--no-verify skips this check)",
                  file=sys.stderr)
        ok &= v.ok
    return ok


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
    if args.verify and not preflight(stages, actions):
        return 2
    for s in stages:
        if args.force and actions[s.id].what == "run" and state.has_outputs(s.dir):
            moved = archive(s.dir)
            if moved:
                print(f"  moved old {s.id} to {moved}")
    logs = root / "logs" / datetime.now().strftime("%Y%m%d-%H%M%S")
    _record_sweep(root, spec, cluster, stages, logs)
    results = spec.results if args.results is None else args.results
    if cluster == "slurm":
        records = submit_slurm(stages, actions, logs, spec.name)
        print(f"submitted {len(records)} jobs; logs in {logs}; `mocobench status {root}` shows progress")
        if not args.wait:
            if results and records:
                job = submit_tables_job(spec, root, logs, records)
                print(f"tables job {job.job_id} will write {root / 'tables'} when all stages end")
            return 0
        try:
            rows = wait_slurm(root, args.poll, args.timeout)
        except KeyboardInterrupt:
            print(f"\nstopped waiting; the jobs keep running. `mocobench status {root}` shows progress")
            return 130
    else:
        local_parallel = spec.local_parallel if cluster == "local" else 1
        try:
            run_local(stages, actions, logs, cluster, local_parallel, poll=min(args.poll, 1.0))
        except KeyboardInterrupt:
            print("\ninterrupted; running stages were cancelled. Re-run the sweep to continue.", file=sys.stderr)
            return 130
        rows = status.collect(root)
    print(status.render(rows))
    if results:
        if gather_tables(str(root)) == 0:
            print(f"tables: {root / 'tables'}")
    return 1 if any(r.state in status.PROBLEM_STATES + ("skipped",) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
