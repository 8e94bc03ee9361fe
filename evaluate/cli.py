"""`mocobench eval <evaluator> [options]`: dispatch to `evaluate.<module>:main(argv)`, and the shared
wrapper every evaluator's `main` uses (config parsing, clear one-line errors, exit codes).

    mocobench eval extract --checkpoint CKPT --data demo --layer avgpool --out runs/feat
    mocobench eval linear  --checkpoint CKPT --data /datasets/imagenet --out runs/lincls
    mocobench eval knn     --features runs/feat/features.npz --out runs/knn
    mocobench eval svm | lowshot | semisup ...
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

EVALUATORS: dict[str, tuple[str, str]] = {
    "extract": ("evaluate.features", "frozen features at any layer, cached per checkpoint/dataset/layer/transform"),
    "linear": ("evaluate.linear", "linear classification (main_lincls.py), multi-layer heads, or fast on features"),
    "knn": ("evaluate.knn", "weighted kNN (k=20, 200; T=0.07; cosine) on cached features"),
    "svm": ("evaluate.svm", "VOC07 linear SVMs (VISSL/MMSelfSup protocol)"),
    "lowshot": ("evaluate.lowshot", "low-shot VOC07 SVMs, k = 1..96 samples per class"),
    "semisup": ("evaluate.semisup", "semi-supervised fine-tuning on the 1% / 10% ImageNet subsets"),
}


def main(argv: list[str] | None = None) -> int:
    from mocobench.cli import dispatch
    argv = list(sys.argv[1:] if argv is None else argv)
    return dispatch(EVALUATORS, argv, "mocobench eval", "evaluator",
                    "Every evaluator takes --out DIR and writes DIR/metrics.json;\n"
                    "run `mocobench eval <evaluator> --help` for its options.")


def run_evaluator(config_cls: type, run: Callable[[Any], dict], argv: list[str], prog: str, description: str,
                  config_dir: Path | None = None) -> int:
    """Parse argv into `config_cls` (flags, --config YAML or a shipped name from `config_dir`, key=value),
    call `run(cfg)`, and turn bad input into one `prog: error: ...` line: exit 2 for bad config/data/
    checkpoint/feature files, 0 on success."""
    from evaluate.features import FeatureFileError
    from pretrain.checkpoints import CheckpointError
    from pretrain.config import ConfigError, parse_config
    from pretrain.data import DataError
    try:
        cfg, _ = parse_config(config_cls, argv, prog, description, search_dir=config_dir)
        run(cfg)
    except (ConfigError, DataError, CheckpointError, FeatureFileError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0
