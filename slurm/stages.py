"""Turn a sweep spec into stages: one pretrain stage per variant x grid point x trial, and per resulting
(or third-party) checkpoint one stage per benchmark entry and trial. Each stage has a directory, a fully
resolved config (checked against the stage's config dataclass: unknown fields are errors), its resources,
its dependencies and a hash of the resolved config that decides whether a finished result is reused.

Stage kinds and what runs inside the job (`slurm/runner.py`):
  pretrain   `mocobench.pretrain.train.run(PretrainConfig)`             (DDP: one task per GPU)
  eval       `evaluate.<evaluator>.run(<Config>)`             evaluators listed in evaluate/registry.py
  transfer   `mocobench transfer detectron2 --recipe R ...`   (one task per node; detectron2 launches
                                                               its per-GPU workers itself)
Layout below the sweep dir: `<variant>/trial<t>/pretrain`, `<variant>/trial<t>/<benchmark entry>`
(`...-trial<k>` when the entry has several trials), `external/<name>/<benchmark entry>`, and
`baseline/<weights>/<entry>` for a detectron2 entry with fixed `weights`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mocobench.core.config import apply_overrides, load_yaml, option, to_dict
from mocobench.core.errors import ConfigError
from mocobench.evaluate.registry import EVALUATORS
from mocobench.slurm import spec as sp
from mocobench.transfer.recipes import RECIPES

EXTERNAL_DIR = "external"
BASELINE_DIR = "baseline"
SMOKE_LABEL = "pipeline smoke run"  # the table label of a `smoke: true` transfer with fixed weights


@dataclass
class Stage:
    id: str                  # path of the stage dir relative to the sweep dir
    kind: str                # pretrain | eval | transfer
    benchmark: str           # moco | linear | knn | ... | voc07-c4 ...
    group: str               # jobs of one group with equal resources go into one job array
    dir: str                 # absolute stage dir (the stage's --out)
    payload: dict            # what the job runs (see slurm/runner.py)
    resources: sp.Resources
    deps: list[str] = field(default_factory=list)      # stage ids this one needs (afterok)
    hash: str = ""
    info: dict = field(default_factory=dict)           # stage.json identity: variant, trial, checkpoint_id
    produces: str | None = None                        # pretrain: the final checkpoint path

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["resources"] = dataclasses.asdict(self.resources)
        return d


# ------------------------------------------------------------------ stage kinds
@dataclass
class TransferFields:
    """The fields a detectron2 benchmark entry takes (mocobench transfer detectron2 options)."""
    data_root: str = option("datasets", "folder with VOC2007/, VOC2012/, coco/; 'demo' = the embedded demo data")
    smoke: bool = option(False, "tiny CPU-sized settings (transfer/configs/smoke.yaml)")
    opts: list[str] = option([], "detectron2 KEY VALUE overrides, applied last")
    linear_scaling: bool = option(False, "scale batch/lr/iterations linearly off the 8-GPU reference "
                                         "(--linear-scaling); default: the reference's values at any GPU count")
    weights: str = option("", "'' = each checkpoint of the sweep; else one run on these --weights "
                             "(none, random:resnet50, a file), e.g. a pipeline smoke test")


@dataclass
class Kind:
    kind: str
    module: str
    function: str = "run"
    config_class: type | None = None
    search_dir: Path | None = None
    recipe: Any = None


def stage_kind(benchmark: str, where: str) -> Kind:
    """Pretraining, the evaluator of evaluate/registry.py or the detectron2 recipe named `benchmark`, or a
    ConfigError listing the valid names."""
    if benchmark in ("pretrain", "moco"):
        from mocobench.pretrain import train
        return Kind("pretrain", "mocobench.pretrain.train", "run", train.PretrainConfig, train.CONFIG_DIR)
    if benchmark in EVALUATORS:
        ev = EVALUATORS[benchmark]
        config_class, _ = ev.load()
        return Kind("eval", ev.module, "run", config_class, ev.config_dir)
    if benchmark in RECIPES:
        return Kind("transfer", "mocobench.transfer.cli", "main", TransferFields, recipe=RECIPES[benchmark])
    raise ConfigError(f"{where}: unknown benchmark {benchmark!r}; evaluators: {', '.join(EVALUATORS)}; "
                      f"detectron2 recipes: {', '.join(RECIPES)}")


def _config_file(name: str, spec_dir: Path) -> str:
    """Config files are relative to the spec's folder, else the current dir, else a shipped name."""
    p = Path(name)
    if not p.is_absolute() and (spec_dir / p).is_file():
        return str(spec_dir / p)
    return name


def build_config(kind: Kind, configs: list[str], fields: dict, spec_dir: Path, where: str):
    cfg = kind.config_class()
    for name in configs:
        cfg = apply_overrides(cfg, load_yaml(_config_file(name, spec_dir), kind.search_dir), source=name)
    return apply_overrides(cfg, fields, source=where)


def config_hash(benchmark: str, config: dict, upstream: dict[str, str]) -> str:
    """sha256 over the benchmark, the resolved config (without its output dir) and the upstream hashes."""
    blob = json.dumps({"benchmark": benchmark, "config": config, "upstream": upstream}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------ expansion
@dataclass
class Source:
    """A checkpoint the benchmarks run on: the output of a pretrain stage, or a third-party file."""
    model_dir: str           # relative dir holding the benchmark stage dirs
    checkpoint: str          # path
    info: dict               # variant, trial, checkpoint_id
    stage: Stage | None      # producing pretrain stage (None: third-party)
    ident: str               # stands for the checkpoint in hashes


def _pretrain_stages(spec: sp.SweepSpec, root: Path, spec_dir: Path) -> list[Stage]:
    if spec.pretrain is None:
        return []
    from mocobench.pretrain import train
    sec = sp.pretrain_section(spec)
    kind = stage_kind("pretrain", f"{spec.source}: pretrain")
    res = sp.merge_resources(sp.parse_resources(spec.resources, spec.source),
                             sp.parse_resources(sec.resources, f"{spec.source}: pretrain.resources"))
    stages = []
    for point in sp.pretrain_points(spec):
        where = f"{spec.source}: pretrain variant {point.variant!r}"
        cfg = build_config(kind, point.configs, point.fields, spec_dir, where)
        sid = f"{point.slug}/trial{point.trial}/pretrain"
        seed = point.seed if point.seed is not None else cfg.seed + point.trial
        cfg = dataclasses.replace(cfg, out=str(root / sid), seed=seed)
        config = train.config_record(cfg)  # only the fields the algorithm uses: only they change the hash
        hashed = {k: v for k, v in config.items() if k != "out"}
        stages.append(Stage(
            id=sid, kind="pretrain", benchmark="moco", group="pretrain", dir=str(root / sid),
            payload={"call": "dataclass", "module": kind.module, "function": kind.function,
                     "config_class": kind.config_class.__name__, "config": config},
            resources=sp.merge_resources(res, sp.parse_resources(point.resources, f"{where}.resources")),
            hash=config_hash("moco", hashed, {}),
            info={"variant": point.variant, "model": point.name, "trial": point.trial, "stage": "pretrain",
                  "checkpoint_id": f"{point.slug}/trial{point.trial}"},
            produces=str(root / sid / f"checkpoint_{cfg.epochs - 1:04d}.pth.tar")))
    return stages


def _random_spec(entry: sp.BaselineEntry, pretrains: list[Stage], where: str) -> str:
    """random:ARCH:WIDTH of a baseline; 'random' takes the (single) architecture of the spec's pretrains."""
    if entry.checkpoint != "random":
        return entry.checkpoint
    archs = {(s.payload["config"]["arch"], s.payload["config"]["width"]) for s in pretrains}
    if len(archs) != 1:
        raise ConfigError(f"{where}: 'random' needs the pretrain variants to share one arch and width, found "
                          f"{sorted(archs) or 'no pretrain section'}; give checkpoint: random:ARCH[:WIDTH]")
    arch, width = archs.pop()
    return f"random:{arch}:{width}" if width != 64 else f"random:{arch}"


def _sources(spec: sp.SweepSpec, pretrains: list[Stage], spec_dir: Path) -> list[Source]:
    out = [Source(model_dir=str(Path(s.id).parent), checkpoint=s.produces, info=dict(s.info), stage=s,
                  ident=f"stage:{s.id}@{s.hash}") for s in pretrains]
    for i, entry in enumerate(sp.baselines(spec)):  # random init, through every evaluator like a variant
        ckpt = _random_spec(entry, pretrains, f"{spec.source}: baselines[{i}]")
        out.append(Source(model_dir=f"{BASELINE_DIR}/{sp._slug(entry.name)}", checkpoint=ckpt,
                          info={"variant": entry.name, "model": entry.name, "trial": 0, "stage": "eval",
                                "checkpoint_id": ckpt, "baseline": True}, stage=None, ident=f"weights:{ckpt}"))
    for entry in sp.checkpoints(spec):
        path = Path(os.path.expandvars(entry.path)).expanduser()
        if not path.is_absolute():
            path = (spec_dir / path) if (spec_dir / path).exists() else path.absolute()
        if not path.is_file():
            raise ConfigError(f"{spec.source}: checkpoint {entry.name!r}: {path} is not a file")
        st = path.stat()
        out.append(Source(model_dir=f"{EXTERNAL_DIR}/{sp._slug(entry.name)}", checkpoint=str(path),
                          info={"variant": entry.name, "model": entry.name, "trial": 0, "stage": "eval",
                                "checkpoint_id": entry.name},
                          stage=None, ident=f"file:{path}:{st.st_size}:{int(st.st_mtime)}"))
    return out


def _benchmark_stages(spec: sp.SweepSpec, root: Path, spec_dir: Path, sources: list[Source]) -> list[Stage]:
    stages = []
    base_res = sp.parse_resources(spec.resources, spec.source)
    for name, data in spec.benchmarks.items():
        where = f"{spec.source}: benchmarks.{name}"
        entry = sp.parse_benchmark(name, data, where)
        kind = stage_kind(entry.benchmark, where)
        res_layer = sp.parse_resources(entry.resources, f"{where}.resources")
        if kind.kind == "transfer" and res_layer.tasks_per_node is None:
            res_layer.tasks_per_node = 1  # detectron2's launch starts one worker per GPU itself
        res = sp.merge_resources(base_res, res_layer)
        fields_cfg = build_config(kind, entry.config, entry.fields, spec_dir, where)
        targets = sources
        if entry.models:
            known = list(dict.fromkeys(src.info["model"] for src in sources))
            unknown = [m for m in entry.models if m not in known]
            if unknown:
                raise ConfigError(f"{where}.models: {', '.join(unknown)} not in this spec; its models: {', '.join(known)}")
            targets = [src for src in sources if src.info["model"] in entry.models]
        if kind.kind == "transfer" and fields_cfg.weights:  # fixed weights: one run, not one per checkpoint
            w = fields_cfg.weights
            label = f"{SMOKE_LABEL} ({w})" if fields_cfg.smoke else f"baseline {w}"  # a smoke AP is no model's AP
            targets = [Source(model_dir=f"{BASELINE_DIR}/{sp._slug(w)}", checkpoint=w,
                              info={"variant": label, "trial": 0, "stage": "transfer", "checkpoint_id": w},
                              stage=None, ident=f"weights:{w}")]
        for src in targets:
            for k in range(entry.trials):
                suffix = f"-trial{k}" if entry.trials > 1 else ""
                sid = f"{src.model_dir}/{sp._slug(name)}{suffix}"
                out = str(root / sid)
                deps = [src.stage.id] if src.stage else []
                upstream = {"checkpoint": src.ident}
                trial = src.info["trial"] * entry.trials + k if entry.trials > 1 else src.info["trial"]
                info = {**src.info, "trial": trial, "stage": kind.kind, "benchmark_trial": k}
                if kind.kind == "transfer":
                    payload, hashed = _transfer_payload(kind, fields_cfg, src.checkpoint, out, k, res)
                else:
                    payload, hashed = _eval_payload(kind, fields_cfg, src.checkpoint, out, k, entry.trials, where)
                stages.append(Stage(id=sid, kind=kind.kind, benchmark=entry.benchmark, group=name, dir=out,
                                    payload=payload, resources=res, deps=deps,
                                    hash=config_hash(entry.benchmark, hashed, upstream), info=info))
    return stages


def _eval_payload(kind: Kind, cfg, checkpoint: str, out: str, k: int, trials: int, where: str):
    names = {f.name for f in dataclasses.fields(cfg)}
    missing = {"checkpoint", "out"} - names
    if missing:
        raise ConfigError(f"{where}: {kind.config_class.__name__} lacks field(s) {sorted(missing)}; "
                          "a sweep stage needs both")
    changes = {"checkpoint": checkpoint, "out": out}
    if trials > 1 and "seed" in names:
        changes["seed"] = cfg.seed + k
    config = to_dict(dataclasses.replace(cfg, **changes))
    hashed = {key: v for key, v in config.items() if key not in ("out", "checkpoint")}
    return ({"call": "dataclass", "module": kind.module, "function": kind.function,
             "config_class": kind.config_class.__name__, "config": config}, hashed)


def _transfer_payload(kind: Kind, fields: TransferFields, checkpoint: str, out: str, k: int, res: sp.Resources):
    argv = ["transfer", "detectron2", "--recipe", kind.recipe.name, "--weights", checkpoint, "--out", out,
            "--trial", str(k), "--num-gpus", str(res.gpus_per_node)]
    if fields.smoke:
        argv.append("--smoke")
    if fields.linear_scaling:
        argv.append("--linear-scaling")
    payload = {"call": "cli", "argv": argv, "data_root": fields.data_root, "task": kind.recipe.task,
               "opts": list(fields.opts), "multinode": res.nodes > 1}
    hashed = {"recipe": kind.recipe.name, "trial": k, "smoke": fields.smoke, "data_root": fields.data_root,
              **({"linear_scaling": True} if fields.linear_scaling else {}),
              "opts": list(fields.opts), "gpus": res.gpus_per_node * res.nodes}
    return payload, hashed


def build_stages(spec: sp.SweepSpec, root: str | Path) -> list[Stage]:
    """All stages of a sweep, pretrain stages first; stage ids are unique."""
    root = Path(root).absolute()
    spec_dir = Path(spec.source).parent if spec.source else Path.cwd()
    pretrains = _pretrain_stages(spec, root, spec_dir)
    stages = pretrains + _benchmark_stages(spec, root, spec_dir, _sources(spec, pretrains, spec_dir))
    seen: dict[str, Stage] = {}
    for s in stages:
        if s.id in seen:
            raise ConfigError(f"{spec.source}: two stages share the directory {s.id!r}; give the variants or "
                              "benchmark entries distinct names")
        seen[s.id] = s
    return stages
