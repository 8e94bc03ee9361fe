"""`mocobench bench pretrain|loader|svm [--quick]`: speed benchmarks that print their figures and, as the
last line, one JSON object with them. Every speed claim is a ratio measured side by side in one run
(see docs/performance.md); none is a timed test.

  pretrain  MoCo v2 training step, official recipe (fp32, NCHW) vs the project's fast path
  loader    MoCo v2 augmentation per worker, official PIL pipeline vs the tensor pipeline
  svm       VOC07 SVM, sklearn LinearSVC reference vs the batched solver
"""
from __future__ import annotations

import importlib
import sys

BENCHMARKS = {"pretrain": "mocobench.bench.pretrain", "loader": "mocobench.bench.loader", "svm": "mocobench.bench.svm"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print("usage: mocobench bench {" + ",".join(BENCHMARKS) + "} [--quick] [options]\n\n" + __doc__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"mocobench bench: unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    return int(importlib.import_module(BENCHMARKS[name]).main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
