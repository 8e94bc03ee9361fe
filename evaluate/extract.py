"""`mocobench eval extract`: extract (or reuse cached) frozen features at one layer and export them as
OUT/features.npz, a hard link to the cache entry (a copy across file systems).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from mocobench.core.config import option
from mocobench.core.errors import ConfigError
from mocobench.core.records import now_iso
from mocobench.evaluate.feature_cache import FeatureSourceConfig, resolve_features
from mocobench.evaluate.feature_file import load_features
from mocobench.evaluate.layers import check_layer
from mocobench.evaluate.report import claim_out, report


@dataclass
class ExtractConfig(FeatureSourceConfig):
    """Extract (or reuse cached) features and export them as OUT/features.npz."""
    out: str = option("runs/extract", "run directory: features.npz (a link to the cache entry) and metrics.json")


def link_or_copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
    return dst


def run(cfg: ExtractConfig) -> dict:
    start = now_iso()
    check_layer(cfg.layer)
    if cfg.features:
        raise ConfigError("extract makes a features file; --features is for the evaluators that read one")
    held = claim_out(cfg, "extract")
    if held.finished is not None:
        return held.finished["metrics"]
    path = resolve_features(cfg)
    fs = load_features(path)
    out = link_or_copy(path, Path(cfg.out) / "features.npz")
    meta = fs.meta
    metrics = {"n_train": len(fs.train_feats), "n_test": len(fs.test_feats), "dim": fs.train_feats.shape[1],
               "seconds": meta.get("seconds", float("nan")), "images_per_s": meta.get("images_per_s", float("nan")),
               "peak_rss_mb": meta.get("peak_rss_mb", {}).get("self", float("nan")),
               "details": {"cache": str(path), "features": str(out), "extracted_at": meta.get("created")}}
    report(cfg, "extract", metrics, start,
           f"features: {out} ({metrics['n_train']} train + {metrics['n_test']} test, {metrics['dim']}-d)",
           meta.get("checkpoint_key"), held.run_id)
    return metrics
