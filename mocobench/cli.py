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


def dispatch(table: dict[str, tuple[str, str]], argv: list[str], prog: str, kind: str, footer: str) -> int:
    """Run `table[argv[0]]` ("module:function" or a module with `main`) on argv[1:]; print usage on -h."""
    width = max(map(len, table))
    usage = "\n".join([f"usage: {prog} <{kind}> [options]", "", f"{kind}s:"]
                      + [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in table.items()] + ["", footer])
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in table:
        print(f"{prog}: unknown {kind} {name!r}\n\n{usage}", file=sys.stderr)
        return 2
    module_name, _, func_name = table[name][0].partition(":")
    func = getattr(importlib.import_module(module_name), func_name or "main")
    return int(func(rest) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return dispatch(COMMANDS, argv, "mocobench", "command",
                    "Run `mocobench <command> --help` for the options of one command.")


if __name__ == "__main__":
    sys.exit(main())
