"""`mocobench eval <evaluator> [options]`: run an evaluator of the registry (evaluate/registry.py).

    mocobench eval extract --checkpoint CKPT --data demo --layer avgpool --out runs/feat
    mocobench eval linear  --checkpoint CKPT --data /datasets/imagenet --out runs/lincls
    mocobench eval knn     --features runs/feat/features.npz --out runs/knn
    mocobench eval svm | lowshot | semisup ...
"""
from __future__ import annotations

import sys

from mocobench.core.commands import dispatch
from mocobench.evaluate.registry import EVALUATORS, run_evaluator

FOOTER = ("Every evaluator takes --out DIR and writes DIR/metrics.json;\n"
          "run `mocobench eval <evaluator> --help` for its options.")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EVALUATORS:
        return run_evaluator(argv[0], argv[1:])
    # no evaluator named: the shared dispatcher prints the usage (-h) or the unknown-name error (exit 2)
    table = {name: (ev.module, ev.help) for name, ev in EVALUATORS.items()}
    return dispatch(table, argv, "mocobench eval", "evaluator", FOOTER)


if __name__ == "__main__":
    sys.exit(main())
