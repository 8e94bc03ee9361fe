"""Gather every `metrics.json` below a sweep directory into one tidy pandas DataFrame.

One row per (checkpoint, variant, benchmark, metric, trial) with its value, plus run-level columns
(model, method, arch, epochs, setting, official, stage, run, link, ...). How a record is identified:

* variant / trial: from the sweep's `stage.json` next to metrics.json when present; otherwise a pretrain
  run's variant is derived from its config — the method (v1 / v2 from mlp, aug_plus, cos) plus the config
  fields whose values differ between the sweep's runs of that method (seeds and bookkeeping excluded) —
  and its trial is the config's `trial` or `seed` (renumbered by path when those collide);
* an evaluator / transfer record is linked to its pretrain run by identity, never by where files lie:
  the `run_id` its checkpoint carries (every mocobench pretrain checkpoint stores its run's id, and the
  record's `checkpoint.run_id` repeats it), else the checkpoint md5 (a foreign checkpoint that a pretrain
  record also names). Checkpoints of the official releases are recognised by md5; anything else is
  listed as "unlinked" with a warning. A sweep's stage.json only names the variant, trial and checkpoint.

Aggregation over trials is mean ± population std (ddof=0), which reproduces the official README's
"60.8±0.2 / 67.5±0.1" from its listed trials (facebookresearch/moco README).
"""
from __future__ import annotations

import json
import math
import warnings as _warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from mocobench.core.records import ATTEMPTS_FILE, CHECKPOINT_RE, STAGE_FILE, read_metrics
from mocobench.core.run_folder import is_replaced
from mocobench.results import published

TIDY_COLUMNS = ["checkpoint", "variant", "benchmark", "metric", "trial", "value"]
RUN_COLUMNS = ["model", "method", "official", "arch", "epochs", "setting", "stage", "run", "link",
               "ckpt_md5", "ckpt_path", "mlp", "aug_plus", "cos", "layer", "status", "protocol"]
BASELINE_LINK = "baseline"  # Ident.link of a random-init baseline (listed after the models it is compared with)
ANY_METRIC = "*"  # the metric of a placeholder row: a stage of this model and benchmark has no result (status)
# Config fields that never distinguish variants: seeds, paths, logging, pure speed switches.
BOOKKEEPING = {"seed", "trial", "out", "resume", "force", "workers", "print_freq", "save_freq", "keep_checkpoints",
               "dist_backend", "strict_data", "channels_last", "mlp", "aug_plus", "cos"}


@dataclass
class Record:
    """One metrics.json (plus its stage.json) as read from disk."""
    path: Path
    run: str                      # run directory relative to the sweep root
    stage: str
    benchmark: str
    metrics: dict[str, float]
    config: dict
    ckpt_path: str | None
    ckpt_md5: str | None
    stage_info: dict | None
    run_id: str | None = None         # the record's own run (a pretrain's id is in its checkpoints)
    ckpt_run_id: str | None = None    # the pretrain run that wrote the evaluated checkpoint
    ckpt_epoch: int | None = None     # epochs done by the evaluated checkpoint
    protocol: str | None = None       # evaluate/protocols.py name@version; None for pretraining


@dataclass
class Ident:
    """How a record is named in tables: variant, trial, checkpoint and the facts about its pretraining."""
    variant: str
    trial: int
    checkpoint: str
    method: str | None = None
    official: str | None = None   # "v1"/"v2" when the pretraining is the official recipe (published applies)
    arch: str | None = None
    epochs: int | None = None
    setting: str = ""             # differing config fields other than arch/epochs, e.g. "moco_m=0.0"
    link: str = ""
    flags: dict = field(default_factory=dict)
    run_epochs: int | None = None


@dataclass
class Gathered:
    frame: pd.DataFrame                       # tidy rows, TIDY_COLUMNS + RUN_COLUMNS
    root: Path
    pretrain_dirs: dict[str, list[Path]]      # variant -> pretrain run dirs (trial order), for curves
    warnings: list[str]
    unfinished: list[dict] = field(default_factory=list)  # sweep stages without a result (`unfinished_stages`)


def flat_numbers(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a metrics dict; nested dicts become `a/b`; the free-form "details" is skipped."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key == "details" and not prefix:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (int, float)):
            out[name] = float(value)
        elif isinstance(value, dict):
            out.update(flat_numbers(value, name + "/"))
    return out


def find_metrics(root: str | Path) -> list[Path]:
    """Every metrics.json below `root`, sorted by path (detectron2's own log of the same name, inside a
    transfer run's `detectron2/` folder, is not one of ours)."""
    return sorted(p for p in Path(root).rglob("metrics.json")
                  if p.parent.name != "detectron2" and not is_replaced(p.relative_to(root)))


def _events(stage_dir: Path) -> list[dict]:
    try:
        lines = (stage_dir / ATTEMPTS_FILE).read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    return out


def unfinished_stages(root: str | Path) -> list[dict]:
    """Sweep stages below `root` (folders with a stage.json) that hold no metrics.json, with their state from
    the stage's events: "failed" (and the error), "running or killed" (started, never ended), or "not run"
    (never started: waiting, cancelled, or its upstream stage failed)."""
    root = Path(root)
    out = []
    for info_path in sorted(root.rglob(STAGE_FILE)):
        d = info_path.parent
        if (d / "metrics.json").exists() or is_replaced(d.relative_to(root)):
            continue
        try:
            info = json.loads(info_path.read_text())
        except (OSError, json.JSONDecodeError):
            info = {}
        events = [e for e in _events(d) if e.get("event") in ("start", "requeue", "failed", "done")]
        last = events[-1] if events else {}
        state = {"failed": "failed", "start": "running or killed", "requeue": "running or killed"}.get(
            last.get("event"), "not run")
        out.append({"stage": d.relative_to(root).as_posix(), "variant": info.get("variant"),
                    "trial": _stage_trial(info), "kind": info.get("stage"), "benchmark": _record_benchmark(info),
                    "state": state, "error": last.get("error", ""), "baseline": bool(info.get("baseline"))})
    return out


LINEAR_MODES = {"lincls": "linear", "multihead": "linear_multihead", "fast": "linear_fast"}  # evaluate/linear.py


def _record_benchmark(info: dict) -> str | None:
    """The benchmark key the stage's record would have had (stage.json names the sweep's benchmark)."""
    bench = info.get("benchmark")
    config = (info.get("payload") or {}).get("config") or {}
    if bench == "linear":
        return LINEAR_MODES.get(config.get("mode") or "lincls", "linear")
    if bench == "semisup":
        return benchmark_name("eval", "semisup", config)
    return bench


def benchmark_name(stage: str, benchmark: str, config: dict) -> str:
    """The table key of a record's benchmark: semisup splits by its label subset ("semisup-1pct"), and a
    subset drawn from the data instead of SimCLR's list files is another protocol ("semisup-1pct-stand-in")."""
    if benchmark == "semisup" and config.get("subset"):
        return f"semisup-{config['subset']}" + ("" if config.get("subset_list") else STAND_IN)
    return benchmark


STAND_IN = "-stand-in"  # semisup on a seeded class-balanced subset, not SimCLR's 1percent/10percent.txt


def load_record(path: Path, root: Path) -> Record:
    rec = read_metrics(path)
    if not isinstance(rec.get("metrics"), dict):
        raise ValueError(f"{path}: 'metrics' must be a mapping of name -> number, got {type(rec['metrics']).__name__}")
    stage_info = None
    stage_path = path.parent / STAGE_FILE
    if stage_path.exists():
        try:
            stage_info = json.loads(stage_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{stage_path}: not readable JSON ({e}); expected "
                             '{"variant": ..., "trial": ..., "stage": ..., "checkpoint_id": ...}') from None
    ckpt = rec.get("checkpoint") or {}
    config = rec.get("config") or {}
    try:
        run = path.parent.relative_to(root).as_posix()
    except ValueError:
        run = str(path.parent)
    return Record(path=path, run=run or ".", stage=str(rec["stage"]),
                  benchmark=benchmark_name(str(rec["stage"]), str(rec["benchmark"]), config),
                  metrics=flat_numbers(rec["metrics"]), config=config,
                  ckpt_path=ckpt.get("path"), ckpt_md5=ckpt.get("md5"), stage_info=stage_info,
                  run_id=rec.get("run_id"), ckpt_run_id=ckpt.get("run_id"), ckpt_epoch=ckpt.get("epoch"),
                  protocol=rec.get("protocol"))


def _fmt_value(v) -> str:
    if isinstance(v, float) and v.is_integer() and abs(v) >= 1000:
        return str(int(v))
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt_value(x) for x in v) + "]"
    return str(v)


def _differing_keys(configs: list[dict]) -> list[str]:
    """Config keys (in first-seen order) whose values are not all equal across `configs`."""
    keys: dict[str, None] = {}
    for c in configs:
        keys.update(dict.fromkeys(c))
    out = []
    for k in keys:
        if k in BOOKKEEPING:
            continue
        values = {json.dumps(c.get(k), sort_keys=True) for c in configs}
        if len(values) > 1:
            out.append(k)
    return out


def _short(md5: str | None) -> str:
    return md5[:8] if md5 else ""


def _ckpt_epoch(path: str | None) -> int | None:
    """Epochs done by a `checkpoint_NNNN.pth.tar` (NNNN is the 0-based epoch index)."""
    m = CHECKPOINT_RE.search(path or "")
    return int(m.group(1)) + 1 if m else None


def _stage_trial(info: dict | None) -> int | None:
    if info and info.get("trial") is not None:
        try:
            return int(info["trial"])
        except (TypeError, ValueError):
            return None
    return None


def identify_pretrain(records: list[Record]) -> dict[int, Ident]:
    """Variant / trial / method for every pretrain record (keyed by index in `records`)."""
    pre = [i for i, r in enumerate(records) if r.stage == "pretrain"]
    by_method: dict[str, list[int]] = {}
    for i in pre:
        by_method.setdefault(published.method_of(records[i].config), []).append(i)
    idents: dict[int, Ident] = {}
    for method, idx in by_method.items():
        differing = _differing_keys([records[i].config for i in idx])
        for i in idx:
            r, cfg = records[i], records[i].config
            fields = [f"{k}={_fmt_value(cfg.get(k))}" for k in differing]
            setting = " ".join(f"{k}={_fmt_value(cfg.get(k))}" for k in differing if k not in ("arch", "epochs"))
            variant = " ".join([method] + fields)
            if r.stage_info and r.stage_info.get("variant"):
                variant = str(r.stage_info["variant"])
            trial = _stage_trial(r.stage_info)
            if trial is None:
                trial = int(cfg.get("trial", cfg.get("seed", 0)) or 0)
            epochs = cfg.get("epochs", r.metrics.get("epochs"))
            epochs = int(epochs) if epochs is not None else None
            idents[i] = Ident(variant=variant, trial=trial,
                              checkpoint=(r.stage_info or {}).get("checkpoint_id") or _short(r.ckpt_md5) or r.run,
                              method=method, official=published.official_method(cfg), arch=cfg.get("arch"),
                              epochs=epochs, run_epochs=epochs, setting=setting, link="self",
                              flags={k: bool(cfg.get(k)) for k in ("mlp", "aug_plus", "cos")})
    # Trials must be unique within a variant; when seeds collide (no stage.json), number runs by path.
    by_variant: dict[str, list[int]] = {}
    for i, ident in idents.items():
        by_variant.setdefault(ident.variant, []).append(i)
    for idx in by_variant.values():
        if len({idents[i].trial for i in idx}) < len(idx):
            for n, i in enumerate(sorted(idx, key=lambda j: records[j].run)):
                idents[i].trial = n
    return idents


def _link(rec: Record, records: list[Record], pre: dict[int, Ident]) -> tuple[int | None, str]:
    """Index of the pretrain record an evaluator record belongs to, and by which identity ("run id", "md5")."""
    if rec.ckpt_run_id:
        hits = [i for i in pre if records[i].run_id == rec.ckpt_run_id]
        if len(hits) == 1:
            return hits[0], "run id"
    if rec.ckpt_md5:
        hits = [i for i in pre if records[i].ckpt_md5 == rec.ckpt_md5]
        if len(hits) == 1:
            return hits[0], "md5"
    return None, ""


def identify_eval(rec: Record, records: list[Record], pre: dict[int, Ident]) -> Ident:
    """Variant / trial / checkpoint of an evaluator or transfer record."""
    i, how = _link(rec, records, pre)
    ckpt_id = (rec.stage_info or {}).get("checkpoint_id") or _short(rec.ckpt_md5)
    if i is not None:
        base = pre[i]
        epochs = rec.ckpt_epoch or _ckpt_epoch(rec.ckpt_path) or base.epochs
        ident = Ident(variant=base.variant, trial=base.trial, checkpoint=ckpt_id or base.checkpoint,
                      method=base.method, official=base.official, arch=base.arch, epochs=epochs,
                      run_epochs=base.run_epochs, setting=base.setting, link=how, flags=dict(base.flags))
    elif str(rec.config.get("checkpoint", "")).startswith("random:"):  # a random-init baseline
        spec = str(rec.config["checkpoint"])
        ident = Ident(variant=f"random init {spec.split(':', 1)[1]}", trial=0, checkpoint=spec, method="random init",
                      arch=spec.split(":")[1], link=BASELINE_LINK, setting="baseline: random init")
    elif _short(rec.ckpt_md5) in published.RELEASED:
        method, epochs, _ = published.RELEASED[_short(rec.ckpt_md5)]
        ident = Ident(variant=f"released {method} {epochs}ep", trial=0, checkpoint=ckpt_id, method=method,
                      official=method, arch="resnet50", epochs=epochs, run_epochs=epochs, link="released md5",
                      setting="released checkpoint",
                      flags={k: method == "v2" for k in ("mlp", "aug_plus", "cos")})
    else:
        name = Path(rec.ckpt_path).name if rec.ckpt_path else rec.run
        ident = Ident(variant=f"unlinked {name}", trial=0, checkpoint=ckpt_id or rec.run, link="none")
    if rec.stage_info:
        if rec.stage_info.get("variant") is not None:
            ident.variant = str(rec.stage_info["variant"])
        if _stage_trial(rec.stage_info) is not None:
            ident.trial = _stage_trial(rec.stage_info)
    return ident


def model_name(ident: Ident) -> str:
    """The row label of tables: the variant, plus the checkpoint epoch when it is not the run's last;
    a baseline says so."""
    if ident.link == BASELINE_LINK:
        return f"{ident.variant} (baseline)"
    if ident.epochs is not None and ident.run_epochs is not None and ident.epochs != ident.run_epochs:
        return f"{ident.variant} @{ident.epochs}ep"
    return ident.variant


def gather(root: str | Path, strict: bool = False, progress: bool = True) -> Gathered:
    """Read every metrics.json below `root` into a tidy DataFrame (see module docstring).

    Unreadable records are skipped with a warning (listed in `.warnings`), or raise with strict=True.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep directory {root} does not exist or is not a directory")
    paths = find_metrics(root)
    records: list[Record] = []
    notes: list[str] = []
    for p in tqdm(paths, desc="reading metrics.json", disable=not progress or None, leave=False):
        try:
            records.append(load_record(p, root))
        except ValueError as e:
            if strict:
                raise
            notes.append(f"skipped {e}")
    pre = identify_pretrain(records)
    rows = []
    idents: dict[int, Ident] = {}
    for i, rec in enumerate(records):
        ident = pre[i] if i in pre else identify_eval(rec, records, pre)
        idents[i] = ident
        if ident.link == "none":
            notes.append(f"{rec.path}: no pretrain run found for checkpoint {rec.ckpt_path!r}; "
                         f"listed as {ident.variant!r}")
        base = {"checkpoint": ident.checkpoint, "variant": ident.variant, "benchmark": rec.benchmark,
                "trial": ident.trial, "model": model_name(ident), "method": ident.method,
                "official": ident.official, "arch": ident.arch, "epochs": ident.epochs, "setting": ident.setting,
                "stage": rec.stage, "run": rec.run, "link": ident.link, "ckpt_md5": rec.ckpt_md5,
                "ckpt_path": rec.ckpt_path, **{k: ident.flags.get(k) for k in ("mlp", "aug_plus", "cos")},
                "layer": rec.config.get("layer", rec.config.get("feature")), "protocol": rec.protocol}
        for metric, value in rec.metrics.items():
            rows.append({**base, "metric": metric, "value": value})
    unfinished = unfinished_stages(root)
    for u in unfinished:
        notes.append(f"{u['stage']}: {u['state']}" + (f" ({u['error']})" if u["error"] else "") + "; no result")
        if u["variant"] and u["benchmark"]:  # a marked cell in its table, not a silently missing one
            base = u["baseline"]
            rows.append({"variant": u["variant"], "benchmark": u["benchmark"], "metric": ANY_METRIC,
                         "model": f"{u['variant']} (baseline)" if base else u["variant"],
                         "trial": u["trial"] or 0, "value": np.nan, "status": u["state"],
                         "run": u["stage"], "stage": u["kind"], "link": BASELINE_LINK if base else "none"})
    frame = pd.DataFrame(rows, columns=TIDY_COLUMNS + RUN_COLUMNS)
    frame["trial"] = frame["trial"].astype(int)
    frame["epochs"] = frame["epochs"].astype("Int64")
    frame["_baseline"] = frame["link"] == BASELINE_LINK
    frame = frame.sort_values(["_baseline", "variant", "benchmark", "metric", "trial", "checkpoint"], kind="stable")
    frame = frame.drop(columns="_baseline").reset_index(drop=True)
    dup = frame.duplicated(["model", "benchmark", "metric", "trial"], keep=False) & (frame["metric"] != ANY_METRIC)
    for (model, bench, trial), grp in frame[dup].groupby(["model", "benchmark", "trial"]):
        notes.append(f"{model!r} trial {trial} has {grp['run'].nunique()} {bench} records "
                     f"({', '.join(sorted(grp['run'].unique()))}); each counts as a trial in mean±std")
    pretrain_dirs: dict[str, list[Path]] = {}
    for i in sorted(pre, key=lambda j: (pre[j].variant, pre[j].trial)):
        pretrain_dirs.setdefault(pre[i].variant, []).append(records[i].path.parent)
    return Gathered(frame=frame, root=root, pretrain_dirs=pretrain_dirs, warnings=notes, unfinished=unfinished)


def population_std(values) -> float:
    """Std over trials as the official README reports it (ddof=0); NaN for no values."""
    arr = np.asarray([v for v in values if not (isinstance(v, float) and math.isnan(v))], dtype=float)
    return float(arr.std()) if arr.size else float("nan")


AGG_KEYS = ["model", "benchmark", "protocol", "metric"]  # two protocols never share a mean


def aggregate(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std (ddof=0), n, min, max over trials per (model, benchmark, metric), with the published
    number (and its std), the difference measured − published and the source key where one exists."""
    cols = AGG_KEYS + ["variant", "method", "official", "arch", "epochs", "setting", "mean", "std", "n",
                       "min", "max", "published", "published_std", "diff", "source"]
    frame = frame[frame["metric"] != ANY_METRIC]
    if frame.empty:
        return pd.DataFrame(columns=cols)
    with _warnings.catch_warnings():
        _warnings.simplefilter("ignore", RuntimeWarning)
        grouped = frame.groupby(AGG_KEYS, sort=False, dropna=False)
        agg = grouped["value"].agg(mean="mean", std=lambda v: population_std(v), n="count", min="min", max="max")
        first = grouped[["variant", "method", "official", "arch", "epochs", "setting"]].first()
    agg = first.join(agg).reset_index()
    refs = [published.lookup(b, m, o if isinstance(o, str) else None, None if pd.isna(e) else int(e),
                             p if isinstance(p, str) else None)
            for b, m, o, e, p in zip(agg["benchmark"], agg["metric"], agg["official"], agg["epochs"],
                                     agg["protocol"])]
    agg["published"] = [r.value if r else np.nan for r in refs]
    agg["published_std"] = [r.std if r and r.std is not None else np.nan for r in refs]
    agg["diff"] = agg["mean"] - agg["published"]
    agg["source"] = [r.source if r else None for r in refs]
    return agg[cols]


def read_knn_monitor(run_dir: str | Path) -> pd.DataFrame:
    """The kNN monitor's records (step, epoch, knn_top1) of a pretrain run's metrics.jsonl (epoch -1: before
    training); later lines win on a repeated epoch. Empty if the monitor was off."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and "knn_top1" in obj:
                rows.append(obj)
    frame = pd.DataFrame(rows).reindex(columns=["step", "epoch", "knn_top1"])
    if not frame.empty:
        frame = frame.drop_duplicates("epoch", keep="last").sort_values("epoch").reset_index(drop=True)
    return frame


def read_curve(run_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-step, per-epoch) records of a pretrain run's metrics.jsonl; later lines win on repeated steps
    (a resumed run re-logs the steps after its last checkpoint). Empty frames if there is no log."""
    path = Path(run_dir) / "metrics.jsonl"
    steps, epochs = [], []
    if path.exists():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{n}: not a JSON object per line ({line[:60]!r})") from None
            if "epoch_loss" in obj:
                epochs.append(obj)
            elif "loss" in obj:
                steps.append(obj)
    step_cols, epoch_cols = ["step", "epoch", "loss", "acc1"], ["epoch", "step", "epoch_loss", "epoch_acc1"]
    s = pd.DataFrame(steps).reindex(columns=step_cols + [c for c in pd.DataFrame(steps).columns
                                                         if c not in step_cols])
    e = pd.DataFrame(epochs).reindex(columns=epoch_cols)
    if not s.empty:
        s = s.drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)
    if not e.empty:
        e = e.drop_duplicates("epoch", keep="last").sort_values("epoch").reset_index(drop=True)
    return s, e
