"""Subcommand dispatch shared by `mocobench` and its command groups (`mocobench eval`, `mocobench bench`).

A table maps a name to "module:function" and a one-line help; the module is imported only when its
command runs, so `--help` stays instant (no torch import).
"""
from __future__ import annotations

import importlib
import sys


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
