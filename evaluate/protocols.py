"""Named, versioned evaluation protocols: which reference a result was made like, written into its record.

Each evaluator declares its protocols next to its config (`PROTOCOLS` in svm.py, lowshot.py, linear.py,
knn.py, semisup.py) as the resolved-config values that define them and the reference file they come
from; every protocol is also a shipped config (`--config vissl`, `--config mmselfsup`, ...). A run's
protocol is the first whose settings all equal its resolved config, else `<evaluator>/custom` (the demo
presets, changed grids). `mocobench results` shows a published number only next to a result of the
protocol the number was made with, and never averages two protocols into one cell.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Protocol:
    name: str                    # e.g. "voc07-svm/vissl"
    version: int                 # bumped when the settings change
    settings: dict[str, Any]     # resolved-config values that define the protocol
    source: str                  # the reference file(s)

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def protocol_of(config: dict, protocols: tuple[Protocol, ...], evaluator: str) -> str:
    """`name@version` of the first protocol whose settings all equal `config`'s, else `<evaluator>/custom`."""
    for p in protocols:
        if all(_same(config.get(k), v) for k, v in p.settings.items()):
            return p.label
    return f"{evaluator}/custom"
