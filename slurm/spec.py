"""The sweep spec: one YAML file naming pretrain variants × grid × trials, the benchmarks to run on every
resulting checkpoint, third-party checkpoints evaluated alongside, per-stage resources and an output root.

    output_root: runs/ablation            # sweep dir (relative to the current directory)
    cluster: auto                         # auto | slurm | local | debug  (--cluster overrides)
    resources: {cpus_per_task: 10, timeout_min: 240}      # defaults for every stage
    pretrain:
      config: [moco_v2]                   # shipped PretrainConfig YAMLs (or paths), in order
      overrides: {data: /datasets/imagenet, epochs: 200}  # any PretrainConfig field, for every variant
      variants: {v1: {config: moco_v1}, v2: {}}           # name -> extra config files / fields
      grid: {moco_m: [0, 0.9, 0.999], shuffle_bn: [true, false]}   # cartesian product per variant
      trials: 1                           # seeds seed+0 .. seed+trials-1 (or seeds: [..])
      resources: {nodes: 1, gpus_per_node: 8, timeout_min: 4320}
    benchmarks:                           # entry name -> evaluator / detectron2 recipe + its fields
      linear: {data: /datasets/imagenet}
      semisup-1pct: {benchmark: semisup, subset: 1pct}
      voc07-c4: {data_root: /datasets, trials: 5, resources: {gpus_per_node: 8}}
    checkpoints:                          # evaluated like our own (no pretrain stage)
      - {name: official-v2-800ep, path: /ckpt/moco_v2_800ep_pretrain.pth.tar}

Unknown keys anywhere are errors that name the key and the file (the stage config fields are checked
against each stage's config dataclass in `slurm/stages.py`).
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mocobench.core.config import apply_overrides, load_yaml, option
from mocobench.core.errors import ConfigError

CLUSTERS = ("auto", "slurm", "local", "debug")


@dataclass
class Resources:
    """What one stage's job asks the scheduler for. `None` = inherit (stage -> spec -> built-in default).

    Mapped onto submitit's Slurm parameters; the local executor uses tasks_per_node, gpus_per_node and
    timeout_min only."""
    nodes: int | None = option(None, "nodes per job (default 1)")
    gpus_per_node: int | None = option(None, "GPUs per node (default 0)")
    tasks_per_node: int | None = option(None, "processes per node; default one per GPU (DDP), 1 without GPUs")
    cpus_per_task: int | None = option(None, "CPUs per process (default 2)")
    mem_gb: float | None = option(None, "memory per node in GB (default: the partition's)")
    timeout_min: int | None = option(None, "time limit per run in minutes (default 60); keep it >= 60 so a "
                                       "preemption is not counted as a time-out by submitit")
    partition: str | None = option(None, "Slurm partition")
    account: str | None = option(None, "Slurm account")
    qos: str | None = option(None, "Slurm QOS")
    constraint: str | None = option(None, "Slurm node constraint, e.g. volta32gb")
    signal_delay_s: int | None = option(None, "USR2 this long before the time limit, to checkpoint and "
                                          "requeue (default 120: Slurm checks time limits every ~30-60 s)")
    max_timeouts: int | None = option(None, "requeues after a time-out (default 3; submitit counts any "
                                        "signal in a job of < ~50 min as a time-out)")
    sbatch_args: dict | None = option(None, "extra sbatch options, e.g. {exclusive: true, mail-type: END}")
    setup: list[str] | None = option(None, "shell lines run before the job's srun (module load ..., env)")


RESOURCE_DEFAULTS = Resources(nodes=1, gpus_per_node=0, cpus_per_task=2, timeout_min=60, signal_delay_s=120,
                              max_timeouts=3, sbatch_args={}, setup=[])


def merge_resources(*layers: Resources) -> Resources:
    """Later layers win field by field; unset (None) fields fall through; tasks_per_node defaults to
    one task per GPU (one DDP process per GPU, as official MoCo) or 1 without GPUs."""
    out = {}
    for f in dataclasses.fields(Resources):
        values = [getattr(layer, f.name) for layer in layers if getattr(layer, f.name) is not None]
        out[f.name] = values[-1] if values else getattr(RESOURCE_DEFAULTS, f.name)
    res = Resources(**out)
    if res.tasks_per_node is None:
        res.tasks_per_node = max(1, res.gpus_per_node or 0)
    if res.nodes < 1 or res.tasks_per_node < 1 or res.gpus_per_node < 0:
        raise ConfigError(f"resources: need nodes >= 1, tasks_per_node >= 1, gpus_per_node >= 0, got {res}")
    return res


@dataclass
class PretrainSection:
    config: list[str] = option([], "PretrainConfig YAML files or shipped names (pretrain/configs), in order")
    overrides: dict = option({}, "PretrainConfig fields set for every variant")
    variants: dict = option({}, "variant name -> {config: [...], resources: {...}, field: value, ...} (default: one "
                                "variant 'moco'); a variant's resources override the section's")
    grid: dict = option({}, "field -> list of values; every combination is run for every variant")
    trials: int = option(1, "trials (seeds) per variant x grid point")
    seeds: list[int] | None = option(None, "explicit seeds, one trial each (default: seed, seed+1, ...)")
    resources: dict = option({}, "resources of pretrain jobs")


@dataclass
class BenchmarkSection:
    benchmark: str = option("", "evaluator (linear, knn, svm, lowshot, semisup, extract) or detectron2 recipe "
                            "(voc07-c4, coco-c4-1x, ...); default: the entry's name")
    config: list[str] = option([], "config YAML files for the evaluator, in order")
    trials: int = option(1, "repeats per checkpoint (seeds 0..trials-1), e.g. 5 for VOC detection")
    models: list[str] = option([], "run only on these pretrain variants / baselines / checkpoints (their names in "
                                   "this spec), e.g. the ViTs for a CLS-token protocol; default: all")
    resources: dict = option({}, "resources of this benchmark's jobs")
    fields: dict = option({}, "(filled from the remaining keys) the stage config fields")


@dataclass
class CheckpointEntry:
    name: str = option("", "name used in the stage directory and tables")
    path: str = option("", "checkpoint file in any format `mocobench inspect` reads")


@dataclass
class SweepSpec:
    name: str = option("", "sweep name (default: the spec file's stem)")
    output_root: str = option("runs/sweep", "sweep directory: one sub-directory per stage, logs/, tables/")
    cluster: str = option("auto", "auto (Slurm where it answers, else local) | slurm | local | debug")
    local_parallel: int = option(1, "local executor: stages run at the same time")
    results: bool = option(True, "gather tables and plots (mocobench results) when the sweep ends")
    resources: dict = option({}, "default resources of every stage")
    pretrain: dict | None = option(None, "pretrain section (omit to evaluate `checkpoints` only)")
    benchmarks: dict = option({}, "entry name -> benchmark settings")
    checkpoints: list = option([], "third-party checkpoints: [{name, path}, ...]")
    baselines: list = option([], "baselines evaluated next to the pretrained variants: 'random' (the pretrain's "
                                 "architecture at random init) or {name, checkpoint: random:ARCH[:WIDTH]}")
    source: str = option("", "(set by the loader) the spec file")


def _section(cls, data: Any, where: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    return apply_overrides(cls(), data, source=where)


def as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def parse_resources(data: Any, where: str) -> Resources:
    return _section(Resources, data, where)


def parse_benchmark(name: str, data: Any, where: str) -> BenchmarkSection:
    """Reserved keys (benchmark, config, trials, resources) configure the entry; the rest are stage fields."""
    data = dict(data or {})
    reserved = {f.name for f in dataclasses.fields(BenchmarkSection)} - {"fields"}
    fields = {k: data.pop(k) for k in list(data) if k.replace("-", "_") not in reserved}
    entry = _section(BenchmarkSection, data, where)
    entry.benchmark = entry.benchmark or name
    entry.config = as_list(entry.config)
    entry.fields = fields
    if entry.trials < 1:
        raise ConfigError(f"{where}: trials must be >= 1, got {entry.trials}")
    return entry


def load_spec(path: str | Path, overrides: dict | None = None) -> SweepSpec:
    """Read and check a sweep spec (structure and types; stage fields are checked when stages resolve)."""
    path = Path(path)
    data = load_yaml(path, search_dir=Path(__file__).parent / "specs")
    spec = apply_overrides(SweepSpec(), {**data, **(overrides or {})}, source=str(path))
    spec.source = str(path)
    spec.name = spec.name or path.stem
    if spec.cluster not in CLUSTERS:
        raise ConfigError(f"{path}: cluster must be one of {', '.join(CLUSTERS)}, got {spec.cluster!r}")
    if spec.local_parallel < 1:
        raise ConfigError(f"{path}: local_parallel must be >= 1")
    if spec.pretrain is None and not spec.checkpoints:
        raise ConfigError(f"{path}: nothing to do: give a pretrain section and/or checkpoints")
    # parse every section now so that a typo fails before anything is submitted
    parse_resources(spec.resources, f"{path}: resources")
    if spec.pretrain is not None:
        pretrain_section(spec)
    for name, data in spec.benchmarks.items():
        parse_benchmark(name, data, f"{path}: benchmarks.{name}")
    checkpoints(spec)
    return spec


def pretrain_section(spec: SweepSpec) -> PretrainSection:
    where = f"{spec.source}: pretrain"
    sec = _section(PretrainSection, spec.pretrain, where)
    sec.config = as_list(sec.config)
    if sec.trials < 1:
        raise ConfigError(f"{where}: trials must be >= 1, got {sec.trials}")
    for key, values in sec.grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.grid.{key}: expected a non-empty list of values, got {values!r}")
    for name, variant in sec.variants.items():
        if variant is not None and not isinstance(variant, dict):
            raise ConfigError(f"{where}.variants.{name}: expected a mapping of fields, got {variant!r}")
        if variant and "resources" in variant:
            parse_resources(variant["resources"], f"{where}.variants.{name}.resources")
    parse_resources(sec.resources, f"{where}.resources")
    return sec


@dataclass
class BaselineEntry:
    name: str = option("random init", "row label in the tables")
    checkpoint: str = option("random", "'random' (the pretrain's arch and width at random init) or random:ARCH[:WIDTH]")


def baselines(spec: SweepSpec) -> list[BaselineEntry]:
    """The spec's baselines; a bare 'random' is `{name: random init, checkpoint: random}`."""
    if not isinstance(spec.baselines, list):
        raise ConfigError(f"{spec.source}: baselines must be a list ('random' or {{name, checkpoint}}), "
                          f"got {spec.baselines!r}")
    out, seen = [], set()
    for i, data in enumerate(spec.baselines):
        where = f"{spec.source}: baselines[{i}]"
        entry = BaselineEntry() if data == "random" else _section(BaselineEntry, data, where)
        if entry.checkpoint != "random" and not entry.checkpoint.startswith("random:"):
            raise ConfigError(f"{where}: checkpoint {entry.checkpoint!r}; expected 'random' or random:ARCH[:WIDTH] "
                              "(a released checkpoint goes under `checkpoints`)")
        if entry.name in seen:
            raise ConfigError(f"{where}: baseline name {entry.name!r} appears twice")
        seen.add(entry.name)
        out.append(entry)
    return out


def checkpoints(spec: SweepSpec) -> list[CheckpointEntry]:
    out, seen = [], set()
    if not isinstance(spec.checkpoints, list):
        raise ConfigError(f"{spec.source}: checkpoints must be a list of {{name, path}}, got {spec.checkpoints!r}")
    for i, data in enumerate(spec.checkpoints):
        entry = _section(CheckpointEntry, data, f"{spec.source}: checkpoints[{i}]")
        if not entry.name or not entry.path:
            raise ConfigError(f"{spec.source}: checkpoints[{i}] needs both name and path, got {data!r}")
        if entry.name in seen:
            raise ConfigError(f"{spec.source}: checkpoint name {entry.name!r} appears twice")
        seen.add(entry.name)
        out.append(entry)
    return out


@dataclass
class PretrainPoint:
    """One pretrain run: variant x grid point x trial, with the config layers that produce it."""
    variant: str          # table label: "v2 moco_m=0.9 shuffle_bn=false"
    name: str             # the variant's name in the spec: "v2" (what a benchmark's `models` lists)
    slug: str             # directory name: "v2_moco_m=0.9_shuffle_bn=false"
    trial: int
    seed: int | None      # None: keep the config's seed (+ trial)
    configs: list[str]    # YAML files / shipped names, in order
    fields: dict          # field overrides, applied after the YAMLs
    resources: dict = dataclasses.field(default_factory=dict)  # the variant's own, over the section's


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    return str(value)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._=-+" else "_" for c in text)


def pretrain_points(spec: SweepSpec) -> list[PretrainPoint]:
    """Expand variants x grid x trials, in a stable order (variants as written, grid row-major)."""
    if spec.pretrain is None:
        return []
    sec = pretrain_section(spec)
    variants = sec.variants or {"moco": {}}
    keys = list(sec.grid)
    points = []
    for vname, vdata in variants.items():
        vdata = dict(vdata or {})
        vconfigs = as_list(vdata.pop("config", []))
        vresources = vdata.pop("resources", None) or {}
        for combo in itertools.product(*(sec.grid[k] for k in keys)):
            grid = dict(zip(keys, combo))
            parts = [f"{k}={_fmt(v)}" for k, v in grid.items()]
            if sec.variants or not parts:  # the implicit single variant is not named when a grid names the runs
                parts.insert(0, vname)
            label, slug = " ".join(parts), _slug("_".join(parts))
            seeds = sec.seeds if sec.seeds is not None else [None] * sec.trials
            for trial, seed in enumerate(seeds):
                points.append(PretrainPoint(variant=label, name=vname, slug=slug, trial=trial, seed=seed,
                                            configs=sec.config + vconfigs,
                                            fields={**sec.overrides, **vdata, **grid}, resources=vresources))
    return points
