"""What every evaluator checks and reports: `claim_out`, the shared beginning that claims `--out` for this
run before any work (core/run_folder.py), the `--checkpoint` argument (a file or a random:ARCH[:WIDTH]
spec), peak memory, and `report`, the shared ending that writes OUT/metrics.json (core/records.py schema)
and prints the result line with the path of that file.
"""
from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

from mocobench.checkpoints.random_init import parse_random_spec
from mocobench.core.config import to_dict
from mocobench.core.errors import CheckpointError
from mocobench.core.records import file_md5, write_metrics
from mocobench.core.run_folder import Claim, claim
from mocobench.evaluate.protocols import Protocol, protocol_of


def claim_out(cfg, benchmark: str) -> Claim:
    """Claim `cfg.out` for this evaluation (resume, refuse or --force: core/run_folder.py); rank 0 writes the
    claim, other ranks only check. A finished run with the same config is reported and left as it is."""
    main = int(os.environ.get("RANK", "0")) == 0
    held = claim(cfg.out, stage="eval", benchmark=benchmark, config=to_dict(cfg), force=cfg.force, write=main)
    if main and held.replaced is not None:
        print(f"{benchmark}: moved the old run in {cfg.out} aside to {held.replaced}", flush=True)
    if main and held.finished is not None:
        print(f"{benchmark}: already done with this config -> {Path(cfg.out) / 'metrics.json'}; nothing to do "
              "(--force runs it again)", flush=True)
    return held


def check_checkpoint(checkpoint: str | Path) -> bool:
    """True for a `random:ARCH[:WIDTH]` spec, True for an existing file, else a CheckpointError."""
    if parse_random_spec(str(checkpoint)) is not None or Path(checkpoint).is_file():
        return True
    raise CheckpointError(f"checkpoint {checkpoint} not found; expected a checkpoint file or random:ARCH[:WIDTH]")


def peak_rss_mb() -> dict[str, float]:
    """Peak resident memory so far (MiB) of this process and of its finished children (loader workers)."""
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20  # ru_maxrss: KiB on Linux, bytes on macOS
    return {"self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
            "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale}


GRID_KEYS = ("costs", "ks", "temperature", "lrs", "head_mults", "k_values", "samples", "selection", "epochs", "lr",
             "schedule", "weight_decay", "mode", "layers")
CHOSEN_KEYS = ("chosen_cost", "best_cell", "best")


def provenance(config: dict, metrics: dict, protocol: str) -> dict:
    """The fingerprint of a result (core/records.py): protocol, layer, image transform, the searched grid and
    the values it chose, batch, world size, seed, subset-file md5."""
    details = metrics.get("details") or {}
    out = {"protocol": protocol, "layer": config.get("layer"),
           "image_transform": {k: config[k] for k in ("image_transform", "resize", "crop", "image_size") if k in config},
           "grid": {k: config[k] for k in GRID_KEYS if k in config},
           "chosen": {k: details[k] for k in CHOSEN_KEYS if k in details},
           "batch_size": config.get("batch_size"), "world_size": int(os.environ.get("WORLD_SIZE", "1")),
           "seed": config.get("seed")}
    if config.get("subset_list") and Path(config["subset_list"]).is_file():
        out["subset_file_md5"] = file_md5(config["subset_list"])
    return out


def report(cfg, benchmark: str, metrics: dict, start: str, summary: str, checkpoint_md5: str | None = None,
           run_id: str | None = None, protocols: tuple[Protocol, ...] = (), family: str | None = None) -> Path:
    """Write `cfg.out`/metrics.json for an evaluator run and print `summary -> <that path>`.

    The record names `cfg.checkpoint` when it is a file (with `checkpoint_md5` when the caller knows it,
    e.g. the feature cache key, else the file's md5); a random:ARCH spec or a run on a features file alone
    records no checkpoint. `run_id`: the run's claim (`claim_out`). `protocols`: the evaluator's named
    protocols; the record names the one the config matches (`family/custom` if none) and its provenance.
    Returns the path of metrics.json."""
    ckpt = cfg.checkpoint if cfg.checkpoint and Path(cfg.checkpoint).is_file() else None
    config = to_dict(cfg)
    protocol = protocol_of(config, protocols, family or benchmark) if protocols else None
    path = write_metrics(cfg.out, stage="eval", benchmark=benchmark, metrics=metrics, config=config,
                         start=start, checkpoint=ckpt, checkpoint_md5=checkpoint_md5 if ckpt else None,
                         run_id=run_id, protocol=protocol, provenance=provenance(config, metrics, protocol))
    print(f"{summary} -> {path}", flush=True)
    return path
