"""A run folder belongs to one run: every stage claims its `--out` before it reads data or builds a model.

The claim is `OUT/run.json` ({"stage", "benchmark", "run_id", "config", "created"}), written when a run
starts. Running a stage again into the same folder then means:
  - same stage and the same resolved config (keys in RUN_INDEPENDENT aside): the same run, resumed; when its
    metrics.json is already there the run is finished and the stage does nothing (it says so);
  - another stage, another benchmark or a changed config key: refused with one line naming what is there,
    the changed keys, and the ways on (the same config, another --out, or --force);
  - `force`: the old folder is moved aside, whole, to `OUT.replaced-<time>` (nothing is deleted) and the
    run starts afresh in an empty OUT. `mocobench results` skips `*.replaced-*` folders.
A folder with a metrics.json but no run.json (written by hand or by an older version) counts as claimed by
the stage and config that record names. A claimed folder that holds no result yet (only the claim, the
log, the resolved config, a sweep's bookkeeping) is free: a run that failed before producing anything
never blocks the corrected rerun.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from mocobench.core.errors import ConfigError
from mocobench.core.records import new_run_id, now_iso

OWNER_FILE = "run.json"
METRICS_FILE = "metrics.json"
REPLACED_TAG = ".replaced-"  # OUT.replaced-<time>: an old run moved aside by --force (or `sweep --force`)
# Files that are not results: a folder holding only these (or empty files) has nothing to lose.
BOOKKEEPING = frozenset({OWNER_FILE, "stage.json", "attempts.jsonl", "log.txt", "config.yaml"})
# How a run is executed, not what it computes: changing these resumes the same run.
RUN_INDEPENDENT = frozenset({"out", "resume", "force", "workers", "print_freq", "save_freq", "keep_checkpoints",
                             "stop_after", "dist_backend", "cache_dir", "refresh", "threads", "n_jobs", "progress",
                             "knn_monitor", "knn_monitor_images"})  # the monitor only watches (pretrain/knn_monitor.py)


@dataclass
class Claim:
    """This process's hold on a run folder: the run's id, and its finished record if there is one."""
    path: Path
    run_id: str
    resumed: bool              # the folder already held this run
    finished: dict | None      # the run's metrics.json when the run is complete, else None
    replaced: Path | None      # where --force moved the old folder


def archive(folder: str | Path) -> Path | None:
    """Move `folder` aside whole, to `folder.replaced-<time>` (never deleted); None if it does not exist."""
    d = Path(folder)
    if not d.exists():
        return None
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    dst = d.with_name(f"{d.name}{REPLACED_TAG}{stamp}")
    while dst.exists():
        dst = d.with_name(f"{d.name}{REPLACED_TAG}{stamp}-{uuid.uuid4().hex[:4]}")
    shutil.move(str(d), str(dst))
    return dst


def is_replaced(path: Path) -> bool:
    """Whether `path` lies inside a folder moved aside by `archive`."""
    return any(REPLACED_TAG in part for part in path.parts)


def ensure_writable_dir(out: str | Path, option: str = "--out") -> Path:
    """Create `out` if needed and check that files can be written in it; ConfigError naming the option."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{option} {out}: is a file; expected a directory (or a path that does not exist yet)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test.{os.getpid()}.{uuid.uuid4().hex[:6]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{option} {out}: cannot write there ({e.strerror or e}); expected a writable directory") \
            from None
    return out


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def current_owner(out: Path) -> dict | None:
    """The run that holds `out`: its run.json, else what its metrics.json says, else None."""
    owner = _read_json(out / OWNER_FILE)
    if owner is not None:
        return owner
    record = _read_json(out / METRICS_FILE)
    if record is not None:
        return {"stage": record.get("stage"), "benchmark": record.get("benchmark"), "run_id": record.get("run_id"),
                "config": record.get("config") or {}, "from": METRICS_FILE}
    return None


def holds_results(out: Path) -> bool:
    """Whether `out` holds anything besides bookkeeping files and empty files."""
    return any(p.name not in BOOKKEEPING and (p.is_dir() or p.stat().st_size > 0) for p in out.iterdir())


def changed_keys(old: dict, new: dict, ignore: frozenset = RUN_INDEPENDENT) -> dict[str, tuple]:
    """{key: (old, new)} for every key whose value differs, the run-independent keys aside."""
    keys = [k for k in dict.fromkeys([*old, *new]) if k not in ignore]
    return {k: (old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)}


def _describe(owner: dict) -> str:
    stage, bench = owner.get("stage") or "unknown", owner.get("benchmark")
    return f"{stage} {bench}" if bench and bench != stage else stage


def claim(out: str | Path, *, stage: str, benchmark: str, config: dict, force: bool = False,
          write: bool = True, ignore: frozenset = RUN_INDEPENDENT) -> Claim:
    """Claim `out` for a run of `stage`/`benchmark` with the resolved `config` (see the module docstring).

    Raises ConfigError (one line) when `out` is not writable or holds another run and `force` is not set.
    `write=False` (the other ranks of a multi-process run) makes the same checks and changes nothing;
    `ignore`: the config keys that may change within one run."""
    out = ensure_writable_dir(out) if write else Path(out)
    owner = current_owner(out) if out.is_dir() else None
    if owner is not None and not holds_results(out):
        owner = None  # claimed, but nothing came of it: start afresh
    replaced = None
    if owner is not None:
        same_kind = (owner.get("stage"), owner.get("benchmark")) == (stage, benchmark)
        changes = changed_keys(owner.get("config") or {}, config, ignore) if same_kind else {}
        if same_kind and not changes and not force:
            record = _read_json(out / METRICS_FILE)
            finished = record if record is not None and record.get("run_id") == owner.get("run_id") else None
            return Claim(out, owner.get("run_id") or new_run_id(), True, finished, None)
        if not force:
            where = out / owner.get("from", OWNER_FILE)
            if same_kind:
                shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in
                                  [(k, *v) for k, v in list(changes.items())[:6]])
                more = f" and {len(changes) - 6} more" if len(changes) > 6 else ""
                what = f"the {_describe(owner)} run of another config ({shown}{more})"
                ways = "rerun with its config to resume it, choose another --out"
            else:
                what = f"the {_describe(owner)} run, not {stage} {benchmark}"
                ways = "choose another --out"
            raise ConfigError(f"--out {out} holds {what} ({where}); {ways}, or pass --force to move it aside "
                              f"to {out.name}{REPLACED_TAG}<time>")
        if not write:
            return Claim(out, "", False, None, None)
        replaced = archive(out)
        out = ensure_writable_dir(out)
    run_id = new_run_id()
    if not write:
        return Claim(out, run_id, False, None, None)
    tmp = out / f".{OWNER_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"stage": stage, "benchmark": benchmark, "run_id": run_id, "config": config,
                               "created": now_iso()}, indent=2))
    os.replace(tmp, out / OWNER_FILE)
    return Claim(out, run_id, False, None, replaced)
