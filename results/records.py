"""`metrics.json`: the one record every stage writes into its `--out` dir, and that `results/` gathers.

Schema (all plain JSON):
  stage       "pretrain" | "eval" | "transfer"
  benchmark   e.g. "linear", "knn", "svm", "lowshot", "semisup", "voc07-c4"
  checkpoint  {"path": str, "md5": str} or null
  metrics     {name: number | list | dict}   (flat numbers are what tables read)
  config      the resolved stage config
  start, end  ISO-8601 UTC times;  host;  git_sha (null outside a checkout)
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SCHEMA_KEYS = ("stage", "benchmark", "checkpoint", "metrics", "config", "start", "end", "host", "git_sha")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def file_md5(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist"):  # numpy / torch scalars and arrays
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    return x


def write_metrics(out_dir: str | Path, *, stage: str, benchmark: str, metrics: dict, config: dict,
                  start: str, checkpoint: str | Path | None = None, checkpoint_md5: str | None = None) -> Path:
    """Write `out_dir/metrics.json` atomically and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = None
    if checkpoint is not None:
        ckpt = {"path": str(Path(checkpoint).resolve()),
                "md5": checkpoint_md5 or file_md5(checkpoint)}
    record = {"stage": stage, "benchmark": benchmark, "checkpoint": ckpt, "metrics": _jsonable(metrics),
              "config": _jsonable(config), "start": start, "end": now_iso(), "host": socket.gethostname(),
              "git_sha": git_sha()}
    path = out / "metrics.json"
    tmp = path.with_name(f".metrics.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2, allow_nan=True))
    os.replace(tmp, path)
    return path


def read_metrics(path: str | Path) -> dict:
    """Read one metrics.json, checking it has the schema's keys (error names the file and the keys)."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable metrics.json ({e})") from None
    missing = [k for k in SCHEMA_KEYS if k not in record]
    if missing:
        raise ValueError(f"{path}: metrics.json lacks keys {missing}; expected {list(SCHEMA_KEYS)}")
    return record
