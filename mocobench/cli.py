"""The `mocobench` command: a thin table that wires each subcommand to the stage package doing the work.

Each entry names a `module:function` taking the remaining argv and returning an exit code. Modules are
imported only when their command runs, so `mocobench --help` stays instant (no torch import).
"""
from __future__ import annotations

import importlib
import sys

# name -> (module:function, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("pretrain.train:main", "MoCo v1/v2 pretraining (single process, torchrun or Slurm)"),
    "eval": ("evaluate.cli:main", "evaluators: extract | linear | knn | svm | lowshot | semisup"),
    "transfer": ("transfer.cli:main", "detectron2 transfer: Faster/Mask R-CNN recipes on VOC/COCO"),
    "convert": ("pretrain.checkpoint_cli:convert_main", "convert a checkpoint: --to torchvision|moco|detectron2"),
    "inspect": ("pretrain.checkpoint_cli:inspect_main", "detect a checkpoint's format and summarise it"),
    "sweep": ("slurm.sweep:main", "submit a pretrain-plus-benchmark sweep (Slurm, local or debug)"),
    "status": ("slurm.status:main", "show the state of every stage of a sweep"),
    "results": ("results.cli:main", "gather metrics.json files into model-zoo tables and plots"),
    "bench": ("benchmarks.cli:main", "speed benchmarks: pretrain | loader | svm"),
    "data": ("pretrain.demo_data:main", "generate the embedded demo dataset (ImageFolder, VOC, COCO layouts)"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: mocobench <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `mocobench <command> --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mocobench: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    target, _ = COMMANDS[name]
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
