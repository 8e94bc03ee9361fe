"""`metrics.json`: the one record every stage writes into its `--out` dir, and that `results/` gathers.

Schema (all plain JSON):
  stage       "pretrain" | "eval" | "transfer"
  benchmark   e.g. "linear", "knn", "svm", "lowshot", "semisup", "voc07-c4"
  run_id      this record's run: a pretrain run keeps one id across resumes and stores it in every
              checkpoint it writes; other stages get a fresh id per record
  checkpoint  {"path": str, "md5": str, "run_id": str | null, "epoch": int | null} or null, where run_id /
              epoch are read from the checkpoint (a mocobench pretrain's; null for other formats): this is
              how `results` links an evaluation to the pretrain run that made its checkpoint
  metrics     {name: number | list | dict}   (flat numbers are what tables read)
  protocol    "name@version" of the evaluation protocol the numbers were made with (evaluate/protocols.py),
              "<evaluator>/custom" when the config matches none; null for pretraining
  provenance  what makes the number reproducible: layer, image transform, searched grid and chosen
              values, batch, world size, seed, subset-file md5 (evaluate/report.py)
  environment torch, CUDA, GPU, CPU model, Python of the machine that made it
  config      the resolved stage config
  start, end  ISO-8601 UTC times;  host;  git_sha (null outside a checkout)
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import platform
import re
import socket
import subprocess
import uuid
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

STAGE_FILE = "stage.json"  # the identity a sweep writes beside a stage's metrics.json
ATTEMPTS_FILE = "attempts.jsonl"  # a sweep stage's events, one JSON line each: start, requeue, failed, done
CHECKPOINT_NAME = "checkpoint_{epoch:04d}.pth.tar"  # the official MoCo name; epoch counted from 0
CHECKPOINT_RE = re.compile(r"checkpoint_(\d{4,})\.pth\.tar$")
SCHEMA_KEYS = ("stage", "benchmark", "checkpoint", "metrics", "config", "start", "end", "host", "git_sha")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def file_md5(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def new_run_id() -> str:
    """A fresh run identity (16 hex digits of a random UUID)."""
    return uuid.uuid4().hex[:16]


def checkpoint_identity(path: str | Path) -> dict:
    """`run_id` and `epoch` stored in a mocobench checkpoint; None for other formats or unreadable files.

    Read with `torch.load(weights_only=True, mmap=True)`: no code runs and the tensors are not read."""
    import torch  # only here: `results` reads records without torch
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile):
        return {"run_id": None, "epoch": None}
    if not isinstance(obj, dict):
        return {"run_id": None, "epoch": None}
    run_id, epoch = obj.get("run_id"), obj.get("epoch")
    return {"run_id": run_id if isinstance(run_id, str) else None,
            "epoch": int(epoch) if isinstance(epoch, int) and "state_dict" in obj else None}


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict:
    """torch / CUDA / GPU / CPU / Python of this machine (torch only when already imported: `results` and
    sweeps write no records)."""
    import sys
    torch = sys.modules.get("torch")
    env = {"python": platform.python_version(), "cpu": cpu_model(), "cpus": os.cpu_count()}
    if torch is not None:
        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        env["threads"] = torch.get_num_threads()
    return env


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
                  start: str, checkpoint: str | Path | None = None, checkpoint_md5: str | None = None,
                  run_id: str | None = None, protocol: str | None = None, provenance: dict | None = None) -> Path:
    """Write `out_dir/metrics.json` atomically and return its path (`run_id`: the run's claim)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = None
    if checkpoint is not None:
        ckpt = {"path": str(Path(checkpoint).resolve()), "md5": checkpoint_md5 or file_md5(checkpoint),
                **checkpoint_identity(checkpoint)}
    record = {"stage": stage, "benchmark": benchmark, "run_id": run_id or new_run_id(), "checkpoint": ckpt,
              "metrics": _jsonable(metrics), "protocol": protocol, "provenance": _jsonable(provenance or {}),
              "environment": environment(), "config": _jsonable(config), "start": start, "end": now_iso(),
              "host": socket.gethostname(), "git_sha": git_sha()}
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
