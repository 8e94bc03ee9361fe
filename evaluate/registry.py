"""The evaluator registry: every `mocobench eval <name>` evaluator, used by the command line
(evaluate/cli.py) and by sweeps (slurm/stages.py), and `run_evaluator`, which parses a command line into
the evaluator's config and runs it.

An entry names the module holding the evaluator's config dataclass and its `run(cfg) -> metrics` (a sweep
job imports both from that module, slurm/runner.py), so this table imports no evaluator, and no torch,
until one is used: `mocobench eval --help` stays instant. Shipped configs live in
evaluate/configs/<name>/*.yaml (`--config demo`).
"""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mocobench.core.config import parse_config
from mocobench.core.errors import USER_ERRORS, debug_enabled, one_line
from mocobench.core.threads import fit_threads

CONFIG_ROOT = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class Evaluator:
    name: str
    module: str          # holds `config` and `run(cfg) -> metrics`
    config: str          # the config dataclass's name in `module`
    help: str            # one line in `mocobench eval --help`
    description: str     # the text of `mocobench eval <name> --help`

    @property
    def prog(self) -> str:
        return f"mocobench eval {self.name}"

    @property
    def config_dir(self) -> Path | None:
        """The folder of shipped configs (`--config NAME`), None when there is none."""
        path = CONFIG_ROOT / self.name
        return path if path.is_dir() else None

    def load(self) -> tuple[type, Callable[[Any], dict]]:
        """(config dataclass, run function), importing the evaluator's module."""
        module = importlib.import_module(self.module)
        return getattr(module, self.config), module.run


EVALUATORS: dict[str, Evaluator] = {e.name: e for e in (
    Evaluator("extract", "mocobench.evaluate.extract", "ExtractConfig",
              "frozen features at any layer, cached per checkpoint/dataset/layer/transform",
              "Extract frozen-backbone features at one layer (cached per checkpoint/dataset/layer/transform)."),
    Evaluator("linear", "mocobench.evaluate.linear", "LinearConfig",
              "linear classification (main_lincls.py), multi-layer heads, or fast on features",
              "Linear classification on a frozen backbone: main_lincls.py (lincls), MMSelfSup multi-layer heads "
              "(multihead) or the fast proxy on cached features (fast)."),
    Evaluator("knn", "mocobench.evaluate.knn", "KNNConfig",
              "weighted kNN (k=10, 20, 100, 200; T=0.07; cosine) on cached features",
              "Weighted kNN (k=10/20/100/200, T=0.07, cosine) on frozen features; writes OUT/metrics.json."),
    Evaluator("svm", "mocobench.evaluate.svm", "SVMConfig",
              "VOC07 linear SVMs (VISSL/MMSelfSup protocol)",
              "VOC07 linear SVMs (VISSL/MMSelfSup protocol: per-class cost by 3-fold CV AP on trainval, "
              "all-point test AP); writes OUT/metrics.json."),
    Evaluator("lowshot", "mocobench.evaluate.lowshot", "LowShotConfig",
              "low-shot VOC07 SVMs, k = 1..96 samples per class",
              "Low-shot VOC07 SVMs (k positives + (C-1)k negatives per class, 5 samples per k, VISSL protocol); "
              "writes OUT/metrics.json and OUT/lowshot_samples.npz."),
    Evaluator("semisup", "mocobench.evaluate.semisup", "SemisupConfig",
              "semi-supervised fine-tuning on the 1% / 10% ImageNet subsets",
              "Semi-supervised fine-tuning of the whole network on the 1%/10% ImageNet subsets (MMSelfSup "
              "recipe: 20 epochs, lr x head-multiplier grid)."),
)}


def run_evaluator(name: str, argv: list[str]) -> int:
    """Parse argv into the evaluator's config (flags, --config YAML or a shipped name, key=value), call its
    `run(cfg)`, and turn bad input into one `mocobench eval <name>: error: ...` line: exit 2 for bad
    config/data/checkpoint/feature files, 0 on success."""
    ev = EVALUATORS[name]
    config_cls, run = ev.load()
    try:
        cfg, _ = parse_config(config_cls, argv, ev.prog, ev.description, search_dir=ev.config_dir)
        fit_threads(getattr(cfg, "workers", 0), getattr(cfg, "threads", 0),
                    announce=print if int(os.environ.get("RANK", "0")) == 0 else None)
        run(cfg)
    except USER_ERRORS as e:
        if debug_enabled():
            raise
        print(f"{ev.prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0
