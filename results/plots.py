"""PNG plots (matplotlib, headless Agg backend): pretraining curves, low-shot mAP vs k, linear top-1 per layer.

Curves come from a pretrain run's metrics.jsonl (per logging step: loss, acc1; per epoch: epoch_loss,
epoch_acc1). Non-finite values are left out of the lines and counted in the legend, so a diverging or
oscillating variant (e.g. key-encoder momentum m = 0, MoCo paper Table 4) still plots as a result.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mocobench.results.gather import read_curve, read_knn_monitor  # noqa: E402

LAYERS = [(f"feature{i}/top1", f"Feature{i}") for i in range(1, 6)] + [("avgpool/top1", "AvgPool")]


def _finite(x: pd.Series, y: pd.Series) -> tuple[np.ndarray, np.ndarray, int]:
    """x, y as floats with non-finite y set to NaN (the line breaks there), and how many there were."""
    x = pd.to_numeric(x, errors="coerce").to_numpy(dtype=float)
    y = pd.to_numeric(y, errors="coerce").to_numpy(dtype=float, copy=True)
    bad = ~np.isfinite(y)
    y[bad] = np.nan
    return x, y, int(bad.sum())


def _draw_runs(ax_loss, ax_acc, label: str | None, run_dirs: list[Path], color) -> tuple[bool, int]:
    """Draw every trial of one variant in one colour (legend label on the first); returns (anything drawn,
    number of non-finite values left out)."""
    drawn, dropped = False, 0
    for run_dir in run_dirs:
        steps, epochs = read_curve(run_dir)
        if steps.empty and epochs.empty:
            continue
        for ax, step_key, epoch_key in ((ax_loss, "loss", "epoch_loss"), (ax_acc, "acc1", "epoch_acc1")):
            lbl = label if not drawn and ax is ax_loss else None
            if not steps.empty:
                x, y, bad = _finite(steps["step"], steps[step_key])
                dropped += bad
                ax.plot(x, y, color=color, lw=0.9, alpha=0.45 if not epochs.empty else 0.9,
                        label=None if not epochs.empty else lbl)
            if not epochs.empty:
                x, y, bad = _finite(_epoch_x(steps, epochs), epochs[epoch_key])
                dropped += bad
                ax.plot(x, y, color=color, lw=2.0, marker="o", ms=3, label=lbl)
        knn = read_knn_monitor(run_dir)
        if not knn.empty:  # the monitor's kNN top-1 on the accuracy axis: dashed, squares
            ax_acc.plot(knn["step"], knn["knn_top1"], color=color, lw=1.5, ls="--", marker="s", ms=4,
                        label=f"{label} kNN top-1 (monitor)" if label and not drawn else None)
        drawn = True
    return drawn, dropped


def _epoch_x(steps: pd.DataFrame, epochs: pd.DataFrame) -> pd.Series:
    """Where to draw an epoch mean: the middle of that epoch's logged steps (its last step if none)."""
    if steps.empty:
        return epochs["step"]
    mid = steps.groupby("epoch")["step"].mean()
    return epochs["epoch"].map(mid).fillna(epochs["step"])


def _colors(n: int):
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _runs_dict(run_dirs: dict[str, Path | list[Path]]) -> dict[str, list[Path]]:
    return {k: [Path(p) for p in (v if isinstance(v, (list, tuple)) else [v])] for k, v in run_dirs.items()}


def plot_pretrain_curves(run_dirs: dict[str, Path | list[Path]], out_png: str | Path,
                         title: str = "MoCo pretraining") -> Path:
    """Loss and instance-discrimination accuracy vs step, one colour per label (all trials of a label share
    it). Thin lines: per logging step; thick lines with markers: epoch means (at the epoch's middle step).
    Returns the PNG path."""
    runs = _runs_dict(run_dirs)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5 + 0.22 * math.ceil(len(runs) / 3)),
                                          gridspec_kw={"hspace": 0.45, "wspace": 0.3, "left": 0.06, "right": 0.98, "top": 0.93, "bottom": 0.06})
    any_drawn = False
    for (label, dirs), color in zip(runs.items(), _colors(len(runs))):
        drawn, dropped = _draw_runs(ax_loss, ax_acc, label, dirs, color)
        any_drawn |= drawn
        if dropped:
            ax_loss.plot([], [], " ", label=f"({label}: {dropped} non-finite values omitted)")
    ax_loss.set(title="InfoNCE loss", xlabel="step", ylabel="loss")
    ax_acc.set(title="instance accuracy (positive ranked first); dashed: kNN monitor", xlabel="step",
               ylabel="acc@1 (%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    if not any_drawn:
        ax_loss.text(0.5, 0.5, "no metrics.jsonl found", ha="center", va="center", transform=ax_loss.transAxes)
    else:
        fig.legend(*ax_loss.get_legend_handles_labels(), loc="outside lower center", fontsize=8,
                   ncol=min(3, len(runs)), frameon=False)
    fig.suptitle(title)
    return _save(fig, out_png)


def plot_pretrain_grid(run_dirs: dict[str, Path | list[Path]], out_png: str | Path,
                       title: str = "MoCo pretraining per variant") -> Path:
    """The same curves as small multiples, one column per variant (loss on top, accuracy below) with shared
    y axes, so variants such as m ∈ {0, 0.9, 0.999} × ShuffleBN on/off sit side by side."""
    runs = _runs_dict(run_dirs)
    n = max(len(runs), 1)
    ncols = n if n <= 4 else (3 if n % 3 == 0 else 4)
    nblocks = math.ceil(n / ncols)
    fig, axes = plt.subplots(2 * nblocks, ncols, figsize=(3.8 * ncols, 5.2 * nblocks), squeeze=False,
                             gridspec_kw={"hspace": 0.45, "wspace": 0.3, "left": 0.06, "right": 0.98, "top": 0.93, "bottom": 0.06})
    loss_axes, acc_axes = [], []
    for idx, ((label, dirs), color) in enumerate(zip(runs.items(), _colors(len(runs)))):
        r, c = 2 * (idx // ncols), idx % ncols
        ax_loss, ax_acc = axes[r][c], axes[r + 1][c]
        drawn, dropped = _draw_runs(ax_loss, ax_acc, None, dirs, color)
        if not drawn or dropped:
            note = "no metrics.jsonl" if not drawn else f"{dropped} non-finite values omitted"
            ax_loss.text(0.98, 0.97, note, ha="right", va="top", fontsize=7, color="darkred",
                         transform=ax_loss.transAxes)
        ax_loss.set_title(label, fontsize=9)
        ax_loss.set_ylabel("loss")
        ax_acc.set(xlabel="step", ylabel="acc@1 (%)")
        loss_axes.append(ax_loss)
        acc_axes.append(ax_acc)
        for ax in (ax_loss, ax_acc):
            ax.grid(alpha=0.3)
    for group in (loss_axes, acc_axes):
        _share_y(group)
    for idx in range(len(runs), nblocks * ncols):
        r, c = 2 * (idx // ncols), idx % ncols
        axes[r][c].axis("off")
        axes[r + 1][c].axis("off")
    fig.suptitle(title)
    return _save(fig, out_png)


def _share_y(axes_list) -> None:
    lims = [ax.get_ylim() for ax in axes_list if ax.has_data()]
    if lims:
        lo, hi = min(l[0] for l in lims), max(l[1] for l in lims)
        for ax in axes_list:
            ax.set_ylim(lo, hi)


def lowshot_ticks(rows: pd.DataFrame) -> list[int]:
    """The k values the low-shot plot shows: those measured plus those with a published number drawn (the
    axis ends where the data ends: a demo run that stops at k = 16 is not drawn on an axis to 96)."""
    shown = rows[rows["mean"].notna() | rows["published"].notna()]
    return sorted(int(k) for k in set(shown["k"]))


def plot_lowshot(summary: pd.DataFrame, out_png: str | Path) -> Path | None:
    """VOC07 low-shot SVM mAP vs k (log2 axis), mean ± std over trials per model; published curves dashed
    for models of the official recipe. `summary` is `mocobench.results.gather.aggregate(frame)`. None if no data."""
    rows = summary[(summary["benchmark"] == "lowshot") & summary["metric"].str.match(r"^k\d+/mAP_mean$")]
    if rows.empty:
        return None
    rows = rows.assign(k=rows["metric"].str.extract(r"^k(\d+)/")[0].astype(int))
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    models = list(dict.fromkeys(rows["model"]))
    for model, color in zip(models, _colors(len(models))):
        g = rows[rows["model"] == model].sort_values("k")
        ax.errorbar(g["k"], g["mean"], yerr=g["std"].fillna(0), color=color, marker="o", capsize=3, label=model)
        pub = g.dropna(subset=["published"])
        if not pub.empty:
            ax.plot(pub["k"], pub["published"], color=color, ls="--", marker="x",
                    label=f"{model}: published ({g['official'].iloc[0]}, {g['epochs'].iloc[0]} ep)")
    ax.set_xscale("log", base=2)
    ticks = lowshot_ticks(rows)
    ax.set_xticks(ticks, [str(k) for k in ticks])
    ax.set(xlabel="labelled examples per class (k)", ylabel="mAP (%)", title="VOC07 low-shot SVM")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out_png)


def plot_linear_layers(summary: pd.DataFrame, out_png: str | Path) -> Path | None:
    """Linear top-1 per layer (Feature1..5, AvgPool), mean ± std over trials per model; published dashed."""
    names = dict(LAYERS)
    rows = summary[(summary["benchmark"] == "linear") & summary["metric"].isin(names)]
    if rows.empty:
        return None
    order = {m: i for i, (m, _) in enumerate(LAYERS)}
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    models = list(dict.fromkeys(rows["model"]))
    for model, color in zip(models, _colors(len(models))):
        g = rows[rows["model"] == model].copy()
        g["x"] = g["metric"].map(order)
        g = g.sort_values("x")
        ax.errorbar(g["x"], g["mean"], yerr=g["std"].fillna(0), color=color, marker="o", capsize=3, label=model)
        pub = g.dropna(subset=["published"])
        if not pub.empty:
            ax.plot(pub["x"], pub["published"], color=color, ls="--", marker="x",
                    label=f"{model}: published ({g['official'].iloc[0]}, {g['epochs'].iloc[0]} ep)")
    ax.set_xticks(range(len(LAYERS)), [label for _, label in LAYERS])
    ax.set(xlabel="layer", ylabel="top-1 (%)", title="Linear classification per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out_png)


def _save(fig, out_png: str | Path) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
