"""Model-zoo tables from a gathered sweep: Markdown for reading, CSV (numbers only) for tools.

Families (layouts of the official MoCo README and of the MMSelfSup / OpenSelfSup model zoos):
  readme       pre-train epochs | time | MoCo v1 top-1 | MoCo v2 top-1  (mean±std over trials)
  pretrain     final loss / instance accuracy / hours per variant (ablations such as m × ShuffleBN)
  svm          VOC07 SVM mAP;   lowshot  VOC07 low-shot SVM mAP for k = 1 .. 96
  linear       Feature1..Feature5 + AvgPool (+ top-1/top-5);   linear_fast  the cached-feature proxy
  knn          k=20 / k=200 top-1
  semisup      1% and 10% labels, top-1 / top-5 and the chosen grid cell
  detection    VOC07 AP50 / AP / AP75;   coco  box and mask AP / AP50 / AP75
  checkpoints  epochs, mlp/aug+/cos, top-1, md5 prefix (official "Models" table)
Every measured column gets "(published)" and "Δ" columns next to it when any of its rows has a published
number (results/published.py); cells without one show "—". A sweep stage without a result shows its state
in its cell (**failed**, **running or killed**, **not run**) instead of leaving the cell or the row out.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mocobench.results import published
from mocobench.results.gather import ANY_METRIC, STAND_IN, Gathered, aggregate, population_std

DASH = "—"
SMOKE_NOTE = ("A smoke run trains a few iterations on small images (transfer/configs/smoke.yaml and the recipe's "
              "smoke options) to check the transfer pipeline end to end; its numbers measure no model.")


@dataclass(frozen=True)
class Col:
    """A measured column: `metric` read from the first of `benchmarks` that has it (None: the row's own
    benchmark, or any benchmark of the table); published numbers are looked up under `ref` (default: the
    benchmark read)."""
    label: str
    metric: str
    benchmarks: tuple[str, ...] | None = None
    decimals: int = 2
    ref: str | None = None


@dataclass
class Table:
    """A table as numbers (`frame`, written to CSV) plus what is needed to render it as Markdown."""
    name: str
    title: str
    ids: list[str]
    cols: list[Col]
    frame: pd.DataFrame
    notes: list[str] = field(default_factory=list)

    def has_published(self, col: Col) -> bool:
        return bool(self.frame[f"{col.label} published"].notna().any())

    def shown(self) -> list[Col]:
        """Columns with at least one measured value or marked stage (a family's other columns are left out)."""
        return [c for c in self.cols if (self.frame[f"{c.label} n"].fillna(0) > 0).any()
                or self.frame[f"{c.label} status"].notna().any()]

    def csv_frame(self) -> pd.DataFrame:
        """Id columns and, per measured column: mean, std, n and (when any exists) published and diff."""
        keep = list(self.ids)
        for c in self.shown():
            keep += [c.label, f"{c.label} std", f"{c.label} n"]
            if self.frame[f"{c.label} status"].notna().any():
                keep.append(f"{c.label} status")
            if self.has_published(c):
                keep += [f"{c.label} published", f"{c.label} diff"]
        return self.frame[keep]

    def to_markdown(self) -> str:
        header = list(self.ids)
        for c in self.shown():
            header.append(c.label)
            if self.has_published(c):
                header += [f"{c.label} (published)", f"Δ {c.label}"]
        lines = [f"### {self.title}", "", "| " + " | ".join(header) + " |",
                 "|" + "|".join(["---"] * len(self.ids) + [":-:"] * (len(header) - len(self.ids))) + "|"]
        for _, row in self.frame.iterrows():
            cells = [_text(row[i]) for i in self.ids]
            for c in self.shown():
                status = row[f"{c.label} status"]
                cells.append(f"**{status}**" if isinstance(status, str) and not row[f"{c.label} n"] else
                             fmt_mean_std(row[c.label], row[f"{c.label} std"], row[f"{c.label} n"], c.decimals))
                if self.has_published(c):
                    pub, pub_std = row[f"{c.label} published"], row[f"{c.label} published std"]
                    cells.append(fmt_mean_std(pub, pub_std, 2 if pd.notna(pub_std) else 1, c.decimals))
                    cells.append(fmt_diff(row[f"{c.label} diff"], c.decimals))
            lines.append("| " + " | ".join(cells) + " |")
        lines += [""] + [f"{n}" for n in self.notes] + ([""] if self.notes else [])
        return "\n".join(lines)


def _text(v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA:
        return DASH
    if isinstance(v, (bool, np.bool_)):
        return "✓" if v else ""
    return str(v).replace("|", "\\|")


def fmt_mean_std(mean, std, n, decimals: int = 2) -> str:
    """'60.8±0.2' (std shown when there are ≥ 2 trials), '60.8' for one, '—' for none."""
    if mean is None or pd.isna(mean):
        return DASH
    text = f"{mean:.{decimals}f}"
    if n is not None and not pd.isna(n) and n >= 2 and std is not None and not pd.isna(std):
        text += f"±{std:.{decimals}f}"
    return text


def fmt_diff(diff, decimals: int = 2) -> str:
    if diff is None or pd.isna(diff):
        return DASH
    return f"{diff:+.{decimals}f}"


def _cell(values: pd.Series, ref: published.Ref | None) -> dict:
    vals = values.dropna()
    mean = float(vals.mean()) if len(vals) else np.nan
    out = {"mean": mean, "std": population_std(vals) if len(vals) else np.nan, "n": int(len(vals)),
           "published": ref.value if ref else np.nan,
           "published std": ref.std if ref and ref.std is not None else np.nan}
    out["diff"] = mean - out["published"]
    return out


def _put(row: dict, label: str, cell: dict) -> None:
    row[label] = cell["mean"]
    row[f"{label} std"] = cell["std"]
    row[f"{label} n"] = cell["n"]
    row[f"{label} published"] = cell["published"]
    row[f"{label} published std"] = cell["published std"]
    row[f"{label} diff"] = cell["diff"]


def _empty_cols(cols: list[Col]) -> list[str]:
    out = []
    for c in cols:
        out += [c.label] + [f"{c.label} {s}" for s in ("std", "n", "published", "published std", "diff", "status")]
    return out


def _official(group: pd.DataFrame) -> tuple[str | None, int | None]:
    o = group["official"].dropna()
    e = group["epochs"].dropna()
    return (o.iloc[0] if len(o) else None), (int(e.iloc[0]) if len(e) else None)


def family_table(frame: pd.DataFrame, name: str, title: str, benchmarks: list[str], cols: list[Col],
                 per_benchmark: bool = False, extra: dict | None = None, notes: list[str] | None = None) -> Table:
    """One row per model and protocol (or per model × benchmark × protocol), one group of columns per Col,
    mean±std over trials; published numbers only where the row's protocol is the one they were made with."""
    sub = frame[frame["benchmark"].isin(benchmarks)]
    wanted = {c.metric for c in cols}
    sub = sub[sub["metric"].isin(wanted) | (sub["metric"] == ANY_METRIC)]
    with_protocol = bool(sub["protocol"].notna().any())
    ids = ["Model"] + (["Benchmark"] if per_benchmark else []) + (["Protocol"] if with_protocol else []) \
        + list((extra or {}).keys())
    rows = []
    keys = (["model", "benchmark"] if per_benchmark else ["model"]) + ["protocol"]
    for key, group in sub.groupby(keys, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        official, epochs = _official(group)
        protocol = key[-1] if isinstance(key[-1], str) else None
        row = {"Model": key[0]}
        if per_benchmark:
            row["Benchmark"] = key[1]
        if with_protocol:
            row["Protocol"] = protocol or DASH
        for label, fn in (extra or {}).items():
            row[label] = fn(group)
        for c in cols:
            candidates = c.benchmarks or ((key[1],) if per_benchmark else tuple(dict.fromkeys(group["benchmark"])))
            values, bench = group.iloc[0:0], candidates[0]
            for b in candidates:
                v = group[(group["metric"] == c.metric) & (group["benchmark"] == b)]
                if len(v):
                    values, bench = v, b
                    break
            ref = published.lookup(c.ref or bench, c.metric, official, epochs, protocol)
            _put(row, c.label, _cell(values["value"], ref))
            if not len(values):  # no value: a stage of this model and benchmark without a result?
                marks = group[(group["metric"] == ANY_METRIC) & group["benchmark"].isin(candidates)]["status"]
                row[f"{c.label} status"] = marks.iloc[0] if len(marks) else None
        rows.append(row)
    df = pd.DataFrame(rows, columns=ids + _empty_cols(cols))
    return Table(name, title, ids, cols, df, notes or [])


def _config_summary(group: pd.DataFrame) -> str:
    """Short config of a model: arch, epochs and the v2 switches, e.g. 'resnet50 200ep mlp aug+ cos'."""
    g = group.iloc[0]
    parts = [str(g["arch"]) if pd.notna(g["arch"]) and g["arch"] else "", f"{g['epochs']}ep" if pd.notna(g["epochs"]) else ""]
    parts += [flag for col, flag in (("mlp", "mlp"), ("aug_plus", "aug+"), ("cos", "cos")) if g[col] is True]
    return " ".join(p for p in parts if p) or DASH


# --- the families ---------------------------------------------------------------------------------------
METHOD_LABEL = {"v1": "MoCo v1", "v2": "MoCo v2"}


def readme_table(frame: pd.DataFrame) -> Table:
    """Official README layout: rows (arch, setting, epochs), a top-1 column per method, plus time."""
    lin = frame[(frame["benchmark"] == "linear") & (frame["metric"] == "top1") & frame["method"].notna()]
    pre = frame[(frame["stage"] == "pretrain") & (frame["metric"] == "hours")]
    methods = sorted(lin["method"].unique(), key=lambda m: (m not in METHOD_LABEL, m))
    cols = [Col("pre-train time (h)", "hours", ("moco",), 1)]
    cols += [Col(f"{METHOD_LABEL.get(m, m)} top-1", "top1", ("linear",), 1) for m in methods]
    ids = ["Arch", "Setting", "pre-train epochs", "Protocol"]
    rows = []
    keys = ["arch", "setting", "epochs", "protocol"]
    for (arch, setting, epochs, protocol), group in lin.groupby(keys, sort=True, dropna=False):
        protocol = protocol if isinstance(protocol, str) else None
        row = {"Arch": arch, "Setting": setting or DASH, "pre-train epochs": epochs, "Protocol": protocol or DASH}
        hours = pre[(pre["arch"] == arch) & (pre["setting"] == setting) & (pre["epochs"] == epochs)]
        officials = group["official"].dropna().unique()
        time_ref = published.lookup("moco", "hours", officials[0], epochs) if len(officials) else None
        _put(row, cols[0].label, _cell(hours["value"], time_ref))
        for m, col in zip(methods, cols[1:]):
            g = group[group["method"] == m]
            official, _ = _official(g) if len(g) else (None, None)
            _put(row, col.label, _cell(g["value"], published.lookup("linear", "top1", official, epochs, protocol)))
        rows.append(row)
    df = pd.DataFrame(rows, columns=ids + _empty_cols(cols))
    notes = ["Top-1: ImageNet-protocol linear classification on frozen features, mean±std (ddof=0) over "
             "trials of pretraining + linear evaluation. Published: facebookresearch/moco README (ResNet-50, "
             "ImageNet, 8 V100: 53 h for 200 epochs); shown only for runs of the official recipe."]
    return Table("readme", "Linear classification (official README layout)", ids, cols, df, notes)


def pretrain_table(frame: pd.DataFrame) -> Table:
    cols = [Col("loss", "loss", decimals=3), Col("inst. acc@1", "acc1", decimals=1),
            Col("kNN monitor", "knn_top1", decimals=1), Col("hours", "hours", decimals=2)]
    return family_table(frame[frame["stage"] == "pretrain"], "pretrain", "Pretraining (final epoch, per variant)",
                        ["moco"], cols, extra={"Config": _config_summary},
                        notes=["loss / inst. acc@1: mean over the last epoch of the InfoNCE loss and of the "
                               "instance-discrimination accuracy (positive key ranked first). kNN monitor: "
                               "weighted kNN top-1 (k=20) on held-out images at the end (pretrain/knn_monitor.py)."])


def svm_table(frame: pd.DataFrame) -> Table:
    def layer(group):
        layers = sorted({str(v) for v in group["layer"].dropna()})
        return ",".join(layers) or DASH
    return family_table(frame, "svm", "VOC07 SVM (mAP)", ["svm"], [Col("VOC07 SVM", "mAP")],
                        extra={"Config": _config_summary, "Layer": layer})


def lowshot_table(frame: pd.DataFrame) -> Table:
    cols = [Col(f"k={k}", f"k{k}/mAP_mean") for k in published.LOWSHOT_K]
    return family_table(frame, "lowshot", "VOC07 low-shot SVM (mAP, mean over trials of the per-k sample mean)",
                        ["lowshot"], cols, extra={"Config": _config_summary})


LINEAR = ("linear", "linear_multihead")


def linear_table(frame: pd.DataFrame) -> Table:
    """MMSelfSup layout: Feature1..5 from the multi-head run (ImageNet "Multi"), AvgPool / top-1 / top-5 from
    main_lincls (ImageNet "Last"); either benchmark fills in when the other is missing."""
    cols = [Col(f"Feature{i}", f"feature{i}/top1", LINEAR[::-1], ref="linear") for i in range(1, 6)]
    cols += [Col("AvgPool", "avgpool/top1", LINEAR, ref="linear"), Col("top-1", "top1", ("linear",)),
             Col("top-5", "top5", ("linear",))]
    return family_table(frame, "linear", "Linear classification per layer (top-1)", list(LINEAR), cols,
                        extra={"Config": _config_summary})


def linear_fast_table(frame: pd.DataFrame) -> Table:
    """The cached-feature proxy (evaluate/linear.py mode "fast"): never compared with published numbers."""
    cols = [Col(f"Feature{i}", f"feature{i}/top1") for i in range(1, 6)]
    cols += [Col("AvgPool", "avgpool/top1"), Col("top-1", "top1"), Col("top-5", "top5")]
    return family_table(frame, "linear_fast", "Linear classification, fast proxy on cached features (top-1)",
                        ["linear_fast"], cols, extra={"Config": _config_summary},
                        notes=["A proxy of the linear protocol (cached features, short schedule): no published "
                               "numbers apply."])


def knn_table(frame: pd.DataFrame) -> Table:
    return family_table(frame, "knn", "kNN classification (top-1)", ["knn"],
                        [Col(f"k={k}", f"k{k}/top1") for k in (10, 20, 100, 200)], extra={"Config": _config_summary})


GRID_RE = re.compile(r"^grid/(.+)/top1$")


def _best_cells(frame: pd.DataFrame, bench: str):
    """The semi-supervised grid cell with the best top-1, per trial (joined when trials disagree)."""
    def fn(group):
        g = frame[(frame["benchmark"] == bench) & (frame["model"] == group["model"].iloc[0])]
        g = g[g["metric"].str.match(GRID_RE)]
        if g.empty:
            return DASH
        best = g.loc[g.groupby("trial")["value"].idxmax(), "metric"].map(lambda m: GRID_RE.match(m).group(1))
        return ",".join(sorted(set(best)))
    return fn


def semisup_table(frame: pd.DataFrame) -> Table:
    """SimCLR's subset lists and stand-in subsets (drawn from the data) are different protocols: their own
    columns, and published numbers only next to the list-file ones."""
    cols, extra, benches, notes = [], {"Config": _config_summary}, [], []
    for pct in ("1", "10"):
        for suffix, label in (("", ""), (STAND_IN, " (stand-in)")):
            bench = f"semisup-{pct}pct{suffix}"
            if suffix and not (frame["benchmark"] == bench).any():
                continue
            benches.append(bench)
            cols += [Col(f"{pct}% top-1{label}", "top1", (bench,)), Col(f"{pct}% top-5{label}", "top5", (bench,))]
            extra[f"best {pct}% cell{label}"] = _best_cells(frame, bench)
    if any(b.endswith(STAND_IN) for b in benches):
        notes.append("stand-in: a seeded class-balanced subset drawn from the data (mocobench's demo), not "
                     "SimCLR's 1percent.txt / 10percent.txt; not comparable with published numbers.")
    return family_table(frame, "semisup", "Semi-supervised fine-tuning (ImageNet 1% / 10% labels)", benches, cols,
                        extra=extra, notes=notes)


def detection_table(frame: pd.DataFrame) -> Table:
    benches = sorted(b for b in frame["benchmark"].unique() if str(b).startswith("voc") and "-seg-" not in str(b))
    cols = [Col("AP50", "AP50", decimals=1), Col("AP", "AP", decimals=1), Col("AP75", "AP75", decimals=1)]
    notes = [SMOKE_NOTE] if frame[frame["benchmark"].isin(benches)]["model"].str.contains("smoke").any() else []
    return family_table(frame, "detection", "VOC detection (Faster R-CNN)", benches, cols, per_benchmark=True,
                        notes=notes)


def coco_table(frame: pd.DataFrame) -> Table:
    benches = sorted(b for b in frame["benchmark"].unique() if str(b).startswith("coco") and "keypoints" not in str(b))
    cols = [Col(f"{label} {k}", f"{task}/{k}", decimals=1)
            for task, label in (("bbox", "box"), ("segm", "mask")) for k in ("AP", "AP50", "AP75")]
    return family_table(frame, "coco", "COCO detection and segmentation (Mask R-CNN)", benches, cols,
                        per_benchmark=True)


def _supervised_notes(frame: pd.DataFrame, benches: list[str]) -> list[str]:
    """The MoCo paper's ImageNet-supervised numbers for these benchmarks (results/published.py)."""
    found = [f"{b} {m} {v}" for (b, m), v in published.SUPERVISED_IN1M.items() if b in benches]
    notes = [f"ImageNet-supervised R50, same protocol (MoCo paper Table 6): {', '.join(found)}."] if found else []
    if frame[frame["benchmark"].isin(benches)]["model"].str.contains("smoke").any():
        notes.append(SMOKE_NOTE)
    return notes


def _dense_table(frame: pd.DataFrame, name: str, title: str, match, cols: list[Col]) -> Table:
    benches = sorted(b for b in frame["benchmark"].unique() if match(str(b)))
    return family_table(frame, name, title, benches, cols, per_benchmark=True, notes=_supervised_notes(frame, benches))


def segmentation_table(frame: pd.DataFrame) -> Table:
    """VOC 2012 and Cityscapes semantic segmentation; seg/moco-fcn and seg/mmseg-fcn-d8 are separate rows
    (Protocol column) and their own benchmarks."""
    cols = [Col(k, k, decimals=1) for k in ("mIoU", "fwIoU", "mACC", "pACC")]
    return _dense_table(frame, "segmentation", "Semantic segmentation (FCN)", lambda b: "-seg-" in b, cols)


def keypoints_table(frame: pd.DataFrame) -> Table:
    cols = [Col(f"kp {k}", f"keypoints/{k}", decimals=1) for k in ("AP", "AP50", "AP75")] + [
        Col("box AP", "bbox/AP", decimals=1)]
    return _dense_table(frame, "keypoints", "COCO keypoint detection (Keypoint R-CNN)", lambda b: "keypoints" in b, cols)


def lvis_table(frame: pd.DataFrame) -> Table:
    cols = [Col(f"mask {k}", f"segm/{k}", decimals=1) for k in ("AP", "AP50", "AP75", "APr", "APc", "APf")] + [
        Col("box AP", "bbox/AP", decimals=1)]
    return _dense_table(frame, "lvis", "LVIS v0.5 instance segmentation (Mask R-CNN)", lambda b: b.startswith("lvis"), cols)


def cityscapes_table(frame: pd.DataFrame) -> Table:
    cols = [Col("mask AP", "segm/AP", decimals=1), Col("mask AP50", "segm/AP50", decimals=1)]
    return _dense_table(frame, "cityscapes", "Cityscapes instance segmentation (Mask R-CNN)",
                        lambda b: b.startswith("cityscapes") and "-seg-" not in b, cols)


def checkpoint_table(frame: pd.DataFrame) -> Table:
    """One row per checkpoint file seen (by md5): flags, epochs, top-1 of its linear evaluations, md5."""
    cols = [Col("top-1", "top1", ("linear",), 1)]
    ids = ["Model", "trial", "epochs", "mlp", "aug+", "cos", "md5", "path"]
    rows = []
    with_ckpt = frame[frame["ckpt_md5"].notna()]
    for md5, group in with_ckpt.groupby("ckpt_md5", sort=False):
        first = group.sort_values("stage", key=lambda s: s != "pretrain").iloc[0]
        row = {"Model": first["model"], "trial": first["trial"], "epochs": first["epochs"],
               "mlp": first["mlp"], "aug+": first["aug_plus"], "cos": first["cos"], "md5": md5[:8],
               "path": first["ckpt_path"]}
        lin = group[(group["benchmark"] == "linear") & (group["metric"] == "top1")]
        official = first["official"] if isinstance(first["official"], str) else None
        released = published.RELEASED.get(md5[:8])
        ref = None
        if released:
            ref = published.Ref("linear", "top1", released[0], released[1], released[2], "moco-readme")
        elif official:
            for m, ep, top1 in published.RELEASED.values():
                if (m, ep) == (official, first["epochs"]):
                    ref = published.Ref("linear", "top1", m, ep, top1, "moco-readme")
        _put(row, cols[0].label, _cell(lin["value"], ref))
        rows.append(row)
    df = pd.DataFrame(rows, columns=ids + _empty_cols(cols))
    if not df.empty:
        df = df.sort_values(["Model", "trial", "epochs"], kind="stable").reset_index(drop=True)
    notes = ["Published: top-1 of the released checkpoint of the same recipe (facebookresearch/moco README, "
             "'Models'; released md5 prefixes b251726a, 59fd9945, a04e12f8)."]
    if df.empty or not df["top-1 published"].notna().any():
        notes = []
    return Table("checkpoints", "Checkpoints", ids, cols, df, notes)


FAMILIES = (readme_table, pretrain_table, linear_table, linear_fast_table, knn_table, svm_table, lowshot_table, semisup_table,
            detection_table, coco_table, keypoints_table, lvis_table, cityscapes_table, segmentation_table,
            checkpoint_table)


def build_tables(frame: pd.DataFrame) -> list[Table]:
    """Every family that has at least one row in `frame`."""
    return [t for t in (f(frame) for f in FAMILIES) if not t.frame.empty]


def write_tables(gathered: Gathered, out_dir: str | Path) -> dict[str, Path]:
    """Write `<family>.md` / `<family>.csv` per table, `tables.md` (all of them), `results_long.csv`
    (the tidy frame) and `summary.csv` (mean±std per model/benchmark/metric). Returns name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    tables = build_tables(gathered.frame)
    sections = [f"# Results for {gathered.root}", "",
                "Measured values are mean±std over trials (population std); published values and their "
                "sources are listed in docs/results.md.", ""]
    for t in tables:
        md = t.to_markdown()
        (out / f"{t.name}.md").write_text(md)
        t.csv_frame().to_csv(out / f"{t.name}.csv", index=False)
        written[f"{t.name}.md"] = out / f"{t.name}.md"
        written[f"{t.name}.csv"] = out / f"{t.name}.csv"
        sections.append(md)
    if gathered.unfinished:
        sections += ["### Stages without a result", "",
                     "Their cells in the tables above show the state instead of a number.", "",
                     "| stage | variant | state | error |", "|---|---|---|---|"]
        sections += [f"| {u['stage']} | {u['variant'] or ''} | **{u['state']}** | {u['error'].replace('|', '/')} |"
                     for u in gathered.unfinished] + [""]
    if gathered.warnings:
        sections += ["### Warnings", ""] + [f"- {w}" for w in gathered.warnings] + [""]
    (out / "tables.md").write_text("\n".join(sections))
    written["tables.md"] = out / "tables.md"
    gathered.frame.to_csv(out / "results_long.csv", index=False)
    written["results_long.csv"] = out / "results_long.csv"
    aggregate(gathered.frame).to_csv(out / "summary.csv", index=False)
    written["summary.csv"] = out / "summary.csv"
    return written
