"""Typed configs as data: a dataclass per stage, filled from YAML files and command-line overrides.

Every field of a stage's dataclass is settable three ways, applied in this order:
  1. `--config FILE.yaml` (repeatable; a bare name like `moco_v2` means a YAML shipped next to the stage),
  2. flags: `--batch-size 128`, booleans as `--mlp` / `--no-mlp`,
  3. `key=value` words: `batch_size=128 schedule=[120,160]` (values parsed as YAML).
Unknown keys anywhere are errors that name the key; the resolved config is plain data (`to_dict`).
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from mocobench.core.errors import ConfigError


def option(default: Any, help_: str, *, at_least: float | None = None, above: float | None = None,
           at_most: float | None = None, below: float | None = None) -> Any:
    """A dataclass field with help text for `--help`; list/dict defaults are copied per instance.

    The bounds (inclusive `at_least`/`at_most`, exclusive `above`/`below`) hold for a number and for every
    number of a list; a value outside them is a ConfigError naming the key, checked before any work starts."""
    bounds = {k: v for k, v in (("at_least", at_least), ("above", above), ("at_most", at_most), ("below", below))
              if v is not None}
    metadata = {"help": help_, "bounds": bounds}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


_BOUND_TEXT = {"at_least": ">=", "above": ">", "at_most": "<=", "below": "<"}
_BOUND_OK = {"at_least": lambda x, b: x >= b, "above": lambda x, b: x > b,
             "at_most": lambda x, b: x <= b, "below": lambda x, b: x < b}


def bounds_text(bounds: dict) -> str:
    """`{"at_least": 1}` -> ">= 1"; several bounds joined with " and "."""
    return " and ".join(f"{_BOUND_TEXT[k]} {v:g}" for k, v in bounds.items())


def _check_bounds(key: str, value: Any, bounds: dict, source: str) -> None:
    values = value if isinstance(value, (list, tuple)) else [value]
    for x in values:
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            if not all(_BOUND_OK[k](x, b) for k, b in bounds.items()):
                raise ConfigError(f"config key {key!r} in {source}: expected a value {bounds_text(bounds)}, got {x!r}")


def to_dict(cfg: Any) -> dict:
    """The resolved config as plain types (safe for YAML/JSON and `torch.load(weights_only=True)`)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check/convert one value against a field type; raise ConfigError naming the key."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is typing.Union or origin is types.UnionType:  # Optional[X] / X | None
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(key, v, args[0]) for v in value] if args else list(value)
    if origin is dict or typ is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
        return dict(value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"config key {key!r}: expected true/false, got {value!r}")
    if typ in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
        try:
            out = typ(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"config key {key!r}: expected {typ.__name__}, got {value!r}") from None
        if typ is int and isinstance(value, float) and value != out:
            raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
        return out
    if typ is str:
        return str(value)
    return value


def apply_overrides(cfg: Any, overrides: dict[str, Any], source: str = "override") -> Any:
    """Return a copy of `cfg` with `overrides` applied; unknown keys are errors naming the key."""
    types = _field_types(type(cfg))
    clean = {}
    for key, value in overrides.items():
        key = key.replace("-", "_")
        if key not in types:
            close = [k for k in types if k.startswith(key[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r} in {source}{hint}; valid keys: {', '.join(types)}")
        clean[key] = _coerce(key, value, types[key])
        bounds = _field_bounds(type(cfg)).get(key)
        if bounds:
            _check_bounds(key, clean[key], bounds, source)
    return dataclasses.replace(cfg, **clean)


def _field_bounds(cls) -> dict[str, dict]:
    return {f.name: f.metadata.get("bounds") for f in dataclasses.fields(cls) if f.metadata.get("bounds")}


def load_yaml(path: str | Path, search_dir: Path | None = None) -> dict:
    """Read a YAML config; a bare name (`moco_v2`) is looked up as `search_dir/NAME.yaml`."""
    p = Path(path)
    if not p.is_file() and search_dir is not None and (search_dir / f"{p.name}.yaml").is_file():
        p = search_dir / f"{p.name}.yaml"
    if not p.is_file():
        shipped = sorted(x.stem for x in search_dir.glob("*.yaml")) if search_dir else []
        raise ConfigError(f"config file {str(path)!r} not found" + (f"; shipped configs: {shipped}" if shipped else ""))
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: expected a mapping of key: value, got {type(data).__name__}")
    return data


def build_parser(cls, prog: str, description: str, positionals: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per dataclass field (help shows type and default)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for name, help_ in (positionals or {}).items():
        parser.add_argument(name, help=help_)
    parser.add_argument("--config", action="append", default=[], metavar="YAML",
                        help="YAML config file or shipped config name (repeatable, later wins)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, values parsed as YAML")
    types = _field_types(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        doc = f.metadata.get("help", "")
        if f.metadata.get("bounds"):
            doc = f"{doc}; {bounds_text(f.metadata['bounds'])}"
        if types[f.name] is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{doc} (default: {default})")
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(),
                                help=f"{doc} (default: {default})")
    return parser


def parse_config(cls, argv: list[str], prog: str, description: str, search_dir: Path | None = None,
                 positionals: dict[str, str] | None = None):
    """Parse argv into (cfg, namespace). Raises ConfigError with a message naming the bad key."""
    parser = build_parser(cls, prog, description, positionals)
    ns = parser.parse_intermixed_args(argv)
    cfg = cls()
    for path in ns.config:
        cfg = apply_overrides(cfg, load_yaml(path, search_dir), source=str(path))
    flags = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if getattr(ns, f.name) is not None}
    cfg = apply_overrides(cfg, flags, source="command-line flags")
    words = {}
    for word in ns.overrides:
        if "=" not in word:
            raise ConfigError(f"expected key=value, got {word!r}")
        key, value = word.split("=", 1)
        words[key] = yaml.safe_load(value) if value else ""
    cfg = apply_overrides(cfg, words, source="key=value overrides")
    return cfg, ns
