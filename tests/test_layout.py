"""The package layout (docs/architecture.md): one installed package, imports that point one way, no circles.

Read from the source with `ast` (nothing is imported), so a violation names the file and the line.
"""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PACKAGE_DIRS: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]
LEGACY_TOP_LEVEL = {"pretrain", "evaluate", "transfer", "slurm", "results", "benchmarks", "bench", "core",
                    "checkpoints"}

# Which subpackages each subpackage may import: core <- checkpoints <- pretrain / evaluate / transfer <-
# slurm (sweeps) and bench; results <- core; the `mocobench` command itself only dispatches (core.commands).
ALLOWED = {
    "core": {"core"},
    "checkpoints": {"core", "checkpoints"},
    "pretrain": {"core", "checkpoints", "pretrain"},
    "evaluate": {"core", "checkpoints", "evaluate"},
    "transfer": {"core", "checkpoints", "transfer"},
    "results": {"core", "results"},
    "slurm": {"core", "checkpoints", "pretrain", "evaluate", "transfer", "results", "slurm"},
    "bench": {"core", "checkpoints", "pretrain", "evaluate", "bench"},
    "": {"core"},
}


def source_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the installed package."""
    out = {}
    for pkg, folder in PACKAGE_DIRS.items():
        for path in sorted((REPO / folder).glob("*.py")):
            name = pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"
            out[name] = path
    return out


MODULES = source_modules()


def imports_of(name: str, path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file, at any depth (function-level ones too)."""
    pkg = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:  # `from pkg import module` names a module; otherwise the base is imported
                found.append((f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base, node.lineno))
    return found


def subpackage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and f"mocobench.{parts[1]}" in PACKAGE_DIRS) else ""


def test_every_folder_installs_under_mocobench_only():
    assert all(pkg == "mocobench" or pkg.startswith("mocobench.") for pkg in PACKAGE_DIRS)
    assert sorted(PYPROJECT["tool"]["setuptools"]["packages"]) == sorted(PACKAGE_DIRS)
    for pkg, folder in PACKAGE_DIRS.items():  # every folder with Python code is listed, none missing
        assert (REPO / folder / "__init__.py").is_file(), f"{folder}/ of {pkg} is not a package"


def test_no_import_of_a_legacy_top_level_name():
    bad = [f"{MODULES[m].relative_to(REPO)}:{line}: import {imp}"
           for m in MODULES for imp, line in imports_of(m, MODULES[m]) if imp.split(".")[0] in LEGACY_TOP_LEVEL]
    assert not bad, "import these as mocobench.<folder>...:\n" + "\n".join(bad)


def test_imports_point_down():
    bad = []
    for m, path in MODULES.items():
        own = subpackage(m)
        for imp, line in imports_of(m, path):
            if imp.startswith("mocobench.") and subpackage(imp) not in ALLOWED[own]:
                bad.append(f"{path.relative_to(REPO)}:{line}: {own or 'mocobench'} imports {imp}")
    assert not bad, "imports against the layering of docs/architecture.md:\n" + "\n".join(bad)


def test_no_import_circles():
    graph = {m: sorted({imp for imp, _ in imports_of(m, p) if imp in MODULES and imp != m}) for m, p in MODULES.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_layering_check_catches_an_upward_import(tmp_path):
    """The checks above can fail: a core module importing a stage is reported with its file and line."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\ndef f():\n    from mocobench.pretrain.train import run\n")
    imports = imports_of("mocobench.core.bad", bad)
    assert ("mocobench.pretrain.train", 4) in imports
    assert subpackage("mocobench.pretrain.train") not in ALLOWED[subpackage("mocobench.core.bad")]


def test_command_table_resolves():
    """Every `mocobench` subcommand names an existing module:function."""
    import importlib

    from mocobench.cli import COMMANDS
    for name, (target, _) in COMMANDS.items():
        module, _, func = target.partition(":")
        assert callable(getattr(importlib.import_module(module), func or "main")), name


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to list the tracked files")
def test_wheel_installs_only_mocobench(tmp_path):
    """A wheel built from the tracked files holds `mocobench/` (with its configs and scripts) and nothing
    else at the top level."""
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, src / f)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                          "--no-index", "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("mocobench-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"mocobench", wheel.name.split("-py")[0] + ".dist-info"}
    for required in ("mocobench/cli.py", "mocobench/core/config.py", "mocobench/pretrain/configs/moco_v2.yaml",
                     "mocobench/slurm/specs/demo.yaml", "mocobench/slurm/cluster/start.sh",
                     "mocobench/transfer/configs/smoke.yaml", "mocobench/evaluate/configs/svm/demo.yaml"):
        assert required in names, required
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)
