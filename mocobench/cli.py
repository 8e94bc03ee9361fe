"""The `mocobench` command: a thin table that wires each subcommand to the stage package doing the work.

Each entry names a `module:function` taking the remaining argv and returning an exit code. Modules are
imported only when their command runs, so `mocobench --help` stays instant (no torch import).
"""
from __future__ import annotations

import os
import sys

from mocobench.core.commands import dispatch
from mocobench.core.errors import DEBUG_ENV, USER_ERRORS, debug_enabled, one_line

# name -> (module:function, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("mocobench.pretrain.train:main", "MoCo v1/v2 pretraining (single process, torchrun or Slurm)"),
    "eval": ("mocobench.evaluate.cli:main", "evaluators: extract | linear | knn | svm | lowshot | semisup"),
    "transfer": ("mocobench.transfer.cli:main", "detectron2 transfer: Faster/Mask R-CNN recipes on VOC/COCO"),
    "convert": ("mocobench.checkpoints.cli:convert_main", "convert a checkpoint: --to torchvision|moco|detectron2"),
    "inspect": ("mocobench.checkpoints.cli:inspect_main", "detect a checkpoint's format and summarise it"),
    "sweep": ("mocobench.slurm.sweep:main", "submit a pretrain-plus-benchmark sweep (Slurm, local or debug)"),
    "status": ("mocobench.slurm.status:main", "show the state of every stage of a sweep"),
    "results": ("mocobench.results.cli:main", "gather metrics.json files into model-zoo tables and plots"),
    "bench": ("mocobench.bench.cli:main", "speed benchmarks: pretrain | loader | svm"),
    "data": ("mocobench.core.demo_data:main", "generate the embedded demo dataset (ImageFolder, VOC, COCO layouts)"),
}


def main(argv: list[str] | None = None) -> int:
    """Run one command. Bad input (a user error, or a file-system error naming its file) is one
    `mocobench <command>: error: ...` line and exit code 2; `--debug` anywhere shows the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:
        argv.remove("--debug")
        os.environ[DEBUG_ENV] = "1"
    prog = f"mocobench {argv[0]}" if argv else "mocobench"
    try:
        return dispatch(COMMANDS, argv, "mocobench", "command",
                        "Run `mocobench <command> --help` for the options of one command; "
                        "`--debug` shows tracebacks.")
    except (*USER_ERRORS, OSError) as e:
        if debug_enabled() or (isinstance(e, OSError) and not e.filename):
            raise
        what = one_line(e) if not isinstance(e, OSError) else f"{e.strerror or e}: {e.filename}"
        print(f"{prog}: error: {what} (--debug shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
