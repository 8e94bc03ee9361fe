"""`mocobench eval knn`: weighted kNN classification on frozen features, the cheap monitor of
representation quality. The classifier (Wu et al. 2018 protocol, T = 0.07) is core/knn.py; k = 10, 20,
100, 200 as MMSelfSup's tools/benchmarks/classification/knn_imagenet. Reports top-1 (and top-5) accuracy
in percent as `k{K}/top1`, `k{K}/top5`.
"""
from __future__ import annotations

from dataclasses import dataclass

from mocobench.core.config import option
from mocobench.core.errors import ConfigError
from mocobench.core.knn import knn_accuracy
from mocobench.core.records import now_iso
from mocobench.evaluate.feature_cache import FeatureSourceConfig, resolve_features
from mocobench.evaluate.feature_file import load_features
from mocobench.evaluate.protocols import Protocol
from mocobench.evaluate.report import claim_out, report


NAMED_PROTOCOLS = (  # evaluate/protocols.py
    Protocol("knn/mmselfsup", 1, {"ks": [10, 20, 100, 200], "temperature": 0.07, "image_transform": "center_crop"},
             "MMSelfSup tools/benchmarks/classification/knn_imagenet/test_knn.py (weighted kNN of InstDisc)"),
)


@dataclass
class KNNConfig(FeatureSourceConfig):
    """Weighted kNN on cached features (layer avgpool by default)."""
    out: str = option("runs/knn", "run directory for metrics.json")
    ks: list[int] = option([10, 20, 100, 200], "numbers of neighbours (MMSelfSup's knn_imagenet topk; InstDisc "
                                                "and the MoCo colab report 200, DINO 20)", at_least=1)
    temperature: float = option(0.07, "vote weight exp(similarity / T)", above=0)
    chunk: int = option(8192, "train rows per similarity block", at_least=1)


def run(cfg: KNNConfig) -> dict:
    start = now_iso()
    if not cfg.ks or min(cfg.ks) < 1:
        raise ConfigError(f"ks must be positive integers, got {cfg.ks}")
    held = claim_out(cfg, "knn")
    if held.finished is not None:
        return held.finished["metrics"]
    path = resolve_features(cfg)
    fs = load_features(path)
    metrics = knn_accuracy(fs.train_feats, fs.train_labels, fs.test_feats, fs.test_labels, cfg.ks,
                           cfg.temperature, cfg.chunk)
    capped = [k for k in cfg.ks if k > len(fs.train_feats)]
    metrics["details"] = {"features": str(path), "n_train": len(fs.train_feats), "n_test": len(fs.test_feats),
                          "dim": int(fs.train_feats.shape[1]),
                          **({"capped_k": f"k > {len(fs.train_feats)} train samples used all of them"} if capped else {})}
    summary = "knn: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if k != "details")
    report(cfg, "knn", metrics, start, summary, fs.meta.get("checkpoint_key"), held.run_id, NAMED_PROTOCOLS, "knn")
    return metrics
