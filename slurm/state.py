"""What a sweep leaves in each stage directory, next to the stage's own outputs:

  stage.json      written by `mocobench sweep` only (slurm/submit.py): identity for the results tables
                  (variant, trial, stage, checkpoint_id), the stage id, kind, benchmark, config hash,
                  dependencies, resources, the payload the job runs, and every job submitted for it
                  ({job_id, cluster, submitted, stdout, stderr}).
  attempts.jsonl  appended by the job itself (rank 0): {"event": "start" | "requeue" | "done", job_id,
                  time, host, hash}. Starts of one job id beyond the first are restarts (requeues).
  metrics.json    written by the stage (core/records.py); a stage is done when it exists and the last
                  "done" event carries the current config hash.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from mocobench.core.records import ATTEMPTS_FILE, STAGE_FILE, now_iso

METRICS_FILE = "metrics.json"


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_stage_file(stage_dir: str | Path) -> dict | None:
    return read_json(Path(stage_dir) / STAGE_FILE)


def append_event(stage_dir: str | Path, event: str, **fields) -> None:
    """One JSON line per event; appends of a few hundred bytes are atomic on local and NFS files."""
    path = Path(stage_dir) / ATTEMPTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"event": event, "time": now_iso(), "host": socket.gethostname(), **fields}, default=str)
    with open(path, "a") as f:
        f.write(line + "\n")


def read_events(stage_dir: str | Path) -> list[dict]:
    path = Path(stage_dir) / ATTEMPTS_FILE
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill; the others still count
    return events


def finished_hash(stage_dir: str | Path) -> str | None:
    """Config hash of the last successful run whose metrics.json is still there, else None."""
    if not (Path(stage_dir) / METRICS_FILE).exists():
        return None
    done = [e for e in read_events(stage_dir) if e.get("event") == "done"]
    return done[-1].get("hash") if done else None


def restarts(stage_dir: str | Path, job_id: str | None) -> int:
    """How often job `job_id` was started again after a requeue (preemption / time-out)."""
    if job_id is None:
        return 0
    starts = [e for e in read_events(stage_dir) if e.get("event") == "start" and str(e.get("job_id")) == str(job_id)]
    return max(0, len(starts) - 1)


def has_outputs(stage_dir: str | Path) -> bool:
    """Anything in the stage dir besides the sweep's own bookkeeping (partial checkpoints, logs, ...)."""
    d = Path(stage_dir)
    return d.is_dir() and any(p.name not in (STAGE_FILE, ATTEMPTS_FILE) for p in d.iterdir())
