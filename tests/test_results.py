"""results/: gathering metrics.json trees, mean±std, model-zoo tables (published vs measured), CSV, PNGs.

Fixture sweeps are hand-made metrics.json / metrics.jsonl files (written through mocobench.core.records so they
follow the real schema); every expected number below is computed by hand in the comments.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mocobench.core.records import write_metrics
from mocobench.results import published
from mocobench.results.cli import main as results_main
from mocobench.results.gather import aggregate, gather, population_std, read_curve
from mocobench.results.plots import plot_linear_layers, plot_lowshot, plot_pretrain_curves, plot_pretrain_grid
from mocobench.results.tables import (
    build_tables,
    checkpoint_table,
    coco_table,
    fmt_mean_std,
    linear_table,
    lowshot_table,
    pretrain_table,
    readme_table,
    semisup_table,
    write_tables,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

V1 = dict(arch="resnet50", width=64, epochs=200, batch_size=256, lr=0.03, cos=False, moco_dim=128, moco_k=65536,
          moco_m=0.999, moco_t=0.07, mlp=False, aug_plus=False, image_size=224, shuffle_bn=True, data="/imagenet",
          seed=0, out="x", workers=8)
V2 = {**V1, "cos": True, "moco_t": 0.2, "mlp": True, "aug_plus": True}


def md5_of(tag: str) -> str:
    return (tag * 32)[:32]


def fake_checkpoint(path, run_id, epoch):
    """A file carrying what a mocobench pretrain checkpoint carries for identity (no weights needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": epoch, "arch": "resnet50", "run_id": run_id, "state_dict": {}}, path)
    return path


def pretrain_run(d, config, *, md5, loss=7.0, acc1=90.0, hours=1.0, ckpt_epoch=None, curve=None):
    """A finished pretrain run whose checkpoint(s) carry run id `run-<md5>`; returns the last checkpoint."""
    epochs = config["epochs"]
    run_id = f"run-{md5[:8]}"
    ckpt = fake_checkpoint(d / f"checkpoint_{(ckpt_epoch or epochs) - 1:04d}.pth.tar", run_id, ckpt_epoch or epochs)
    write_metrics(d, stage="pretrain", benchmark="moco", config=config, start="t",
                  metrics={"loss": loss, "acc1": acc1, "epochs": epochs, "hours": hours, "bad_images": 0},
                  checkpoint=ckpt, checkpoint_md5=md5, run_id=run_id)
    if curve is not None:
        (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in curve))
    return ckpt


# the protocol each published number was made with (results/published.py), as the evaluators name them
PUBLISHED_PROTOCOL = {"linear": "linear/moco@1", "linear_multihead": "linear/mmselfsup-multihead@1",
                      "svm": "voc07-svm/mmselfsup@1", "lowshot": "lowshot/mmselfsup@1", "semisup": "semisup/mmselfsup@1",
                      "voc07-c4": "detectron2/voc07-c4@1", "coco-c4-2x": "detectron2/coco-c4-2x@1"}


def eval_run(d, benchmark, metrics, *, ckpt, md5, stage="eval", config=None, protocol="published"):
    protocol = PUBLISHED_PROTOCOL.get(benchmark) if protocol == "published" else protocol
    write_metrics(d, stage=stage, benchmark=benchmark, metrics=metrics, config=config or {}, start="t",
                  checkpoint=ckpt, checkpoint_md5=md5, protocol=protocol)


def curve(n_epochs=3, steps_per_epoch=4, loss0=8.0, osc=0.0):
    """Per-step + per-epoch records like pretrain/train.py's RunLog; `osc` adds a ±osc sawtooth."""
    out, step = [], 0
    for e in range(n_epochs):
        losses = []
        for i in range(steps_per_epoch):
            step += 1
            loss = loss0 - 0.5 * step / steps_per_epoch + (osc if step % 2 else -osc)
            losses.append(loss)
            out.append({"step": step, "epoch": e, "loss": loss, "acc1": 5.0 * step, "lr": 0.03, "img_per_s": 1.0})
        out.append({"epoch": e, "step": step, "epoch_loss": float(np.mean(losses)), "epoch_acc1": 5.0 * step})
    return out


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Official-recipe v1/v2, 200 epochs, 2 trials each (seeds 0/1), with linear/svm/lowshot/semisup/detection
    evaluations; evaluators link by the run id in their checkpoint (v1; v2 trial 0 through a re-saved file
    with another md5), or by md5 alone (v2 trial 1: a copy without a run id, e.g. from another tool).
    Shared by the module's tests (read-only; the CLI test works on a copy)."""
    tmp_path = tmp_path_factory.mktemp("zoo")
    root = tmp_path / "sweep"
    top1 = {("v1", 0): 61.0, ("v1", 1): 61.4, ("v2", 0): 67.0, ("v2", 1): 67.2}
    for method, cfg in (("v1", V1), ("v2", V2)):
        for seed in (0, 1):
            base = root / method / f"trial{seed}"
            md5 = md5_of(f"{method[1]}{seed}")
            ckpt = pretrain_run(base / "pretrain", {**cfg, "seed": seed}, md5=md5, hours=50.0 + 2 * seed,
                                loss=6.0 + seed, curve=curve())
            link = {"md5": md5, "ckpt": ckpt}
            if method == "v2" and seed == 0:  # re-saved elsewhere: another md5, the same run id inside
                link = {"md5": md5_of("c"), "ckpt": fake_checkpoint(tmp_path / "moved" / "v2_0.pth.tar",
                                                                    f"run-{md5[:8]}", 200)}
            if method == "v2" and seed == 1:  # a copy without a run id, but the md5 the pretrain recorded
                link = {"md5": md5, "ckpt": tmp_path / "converted" / "v2_1.pth"}
            eval_run(base / "linear", "linear", {"top1": top1[(method, seed)], "top5": 85.0,
                                                 "feature5/top1": 60.0 + seed, "avgpool/top1": 62.0 + seed},
                     ckpt=link["ckpt"], md5=link["md5"])
            eval_run(base / "svm", "svm", {"mAP": 80.0 + seed, "AP/cat": 70.0, "details": {"C": 1.0}},
                     ckpt=link["ckpt"], md5=link["md5"], config={"layer": "res5"})
            eval_run(base / "lowshot", "lowshot",
                     {f"k{k}/mAP_mean": 40.0 + k / 10 + seed for k in published.LOWSHOT_K},
                     ckpt=link["ckpt"], md5=link["md5"])
            eval_run(base / "semisup1", "semisup", {"top1": 30.0 + seed, "top5": 60.0,
                                                    "grid/lr0.01_head100/top1": 30.0 + seed,
                                                    "grid/lr0.1_head1/top1": 20.0},
                     ckpt=link["ckpt"], md5=link["md5"], config={"subset": "1pct", "subset_list": "1percent.txt"})
            if method == "v2" and seed == 0:  # MMSelfSup multi-head run: Feature1..5
                eval_run(base / "multihead", "linear_multihead",
                         {f"feature{i}/top1": 10.0 * i for i in range(1, 6)}, ckpt=link["ckpt"], md5=link["md5"])
            eval_run(base / "voc", "voc07-c4", {"AP": 55.0 + seed, "AP50": 81.0, "AP75": 62.0},
                     ckpt=link["ckpt"], md5=link["md5"], stage="transfer")
    return root


def test_gather_tidy_rows_and_links(zoo):
    g = gather(zoo, progress=False)
    df = g.frame
    assert list(df.columns[:6]) == ["checkpoint", "variant", "benchmark", "metric", "trial", "value"]
    assert set(df["variant"]) == {"v1", "v2"}  # only seeds differ within each method
    assert set(df["trial"]) == {0, 1}
    # 4 pretrain runs x 5 numbers + 4 x (4 linear + 2 svm + 8 lowshot + 4 semisup + 3 voc) + 5 multihead;
    # "details" is skipped
    assert len(df) == 4 * 5 + 4 * (4 + 2 + 8 + 4 + 3) + 5
    assert set(df["benchmark"]) == {"moco", "linear", "linear_multihead", "svm", "lowshot", "semisup-1pct",
                                    "voc07-c4"}
    links = df[df["stage"] != "pretrain"].groupby(["variant", "trial"])["link"].first().to_dict()
    assert links == {("v1", 0): "run id", ("v1", 1): "run id", ("v2", 0): "run id", ("v2", 1): "md5"}
    row = df[(df["variant"] == "v1") & (df["trial"] == 1) & (df["metric"] == "top1")].iloc[0]
    assert (row["value"], row["checkpoint"], row["official"], row["epochs"]) == (61.4, "11111111", "v1", 200)
    assert g.warnings == []
    assert [p.parent.name for p in g.pretrain_dirs["v2"]] == ["trial0", "trial1"]


def test_mean_std_by_hand_and_official_trials():
    # README trials: v1 mean 60.78, population std sqrt(0.188/5)=0.194 -> "60.8±0.2";
    # v2 mean 67.52, sqrt(0.108/5)=0.147 -> "67.5±0.1" (the sample std 0.164 would print 0.2).
    for ref in (r for r in published.REFERENCES if r.trials):
        text = fmt_mean_std(np.mean(ref.trials), population_std(ref.trials), len(ref.trials), 1)
        assert text == f"{ref.value:.1f}±{ref.std:.1f}"
    assert population_std([61.0, 61.4]) == pytest.approx(0.2)
    assert fmt_mean_std(61.2, 0.0, 1, 1) == "61.2" and fmt_mean_std(float("nan"), 0, 0) == "—"


def test_aggregate_and_published(zoo):
    agg = aggregate(gather(zoo, progress=False).frame)
    top1 = agg[(agg["benchmark"] == "linear") & (agg["metric"] == "top1")].set_index("model")
    # v1: (61.0 + 61.4) / 2 = 61.2, std 0.2, published 60.8 -> diff +0.4; v2: 67.1 ± 0.1 vs 67.5 -> -0.4
    assert top1.loc["v1", ["mean", "std", "n", "published", "published_std"]].tolist() == pytest.approx(
        [61.2, 0.2, 2, 60.8, 0.2])
    assert top1.loc["v1", "diff"] == pytest.approx(0.4) and top1.loc["v2", "diff"] == pytest.approx(-0.4)
    assert top1.loc["v2", "source"] == "moco-readme"
    voc = agg[(agg["benchmark"] == "voc07-c4") & (agg["metric"] == "AP")].set_index("model")
    assert voc.loc["v2", "mean"] == pytest.approx(55.5) and voc.loc["v2", "published"] == 57.0


def test_readme_table_markdown(zoo):
    t = readme_table(gather(zoo, progress=False).frame)
    md = t.to_markdown()
    header = next(line for line in md.splitlines() if line.startswith("| Arch"))
    assert header == ("| Arch | Setting | pre-train epochs | Protocol | pre-train time (h) | pre-train time (h) "
                      "(published) | Δ pre-train time (h) | MoCo v1 top-1 | MoCo v1 top-1 (published) | "
                      "Δ MoCo v1 top-1 | MoCo v2 top-1 | MoCo v2 top-1 (published) | Δ MoCo v2 top-1 |")
    # hours: 50, 52, 50, 52 -> 51.0±1.0 vs 53 -> -2.0
    assert ("| resnet50 | — | 200 | linear/moco@1 | 51.0±1.0 | 53.0 | -2.0 | 61.2±0.2 | 60.8±0.2 | +0.4 | "
            "67.1±0.1 | 67.5±0.1 | -0.4 |") in md


def test_family_tables(zoo):
    frame = gather(zoo, progress=False).frame
    low = lowshot_table(frame).frame.set_index("Model")
    # v2 k=1: trials 40.1 and 41.1 -> 40.6; published (OpenSelfSup) 43.0 -> -2.4
    assert low.loc["v2", ["k=1", "k=1 published", "k=1 diff"]].tolist() == pytest.approx([40.6, 43.0, -2.4])
    lin = linear_table(frame)
    md = lin.to_markdown()
    # one row per model and protocol: the multi-head run (v2 only) and main_lincls are different protocols,
    # each next to the published numbers of its own protocol only
    lf = lin.frame.set_index(["Model", "Protocol"])
    mh, lc = ("v2", "linear/mmselfsup-multihead@1"), ("v2", "linear/moco@1")
    assert lf.loc[mh, ["Feature1", "Feature1 n", "Feature1 published"]].tolist() == [10.0, 1, 15.96]
    assert lf.loc[mh, "Feature5"] == 50.0 and lf.loc[mh, "AvgPool published"] == 67.56
    assert lf.loc[("v1", "linear/moco@1"), "Feature5"] == pytest.approx(60.5)
    assert math.isnan(lf.loc[("v1", "linear/moco@1"), "Feature1"])
    assert math.isnan(lf.loc[("v1", "linear/moco@1"), "Feature1 published"])  # a multi-head number: not here
    assert math.isnan(lf.loc[lc, "Feature1"]) and len(lf) == 3
    assert "| Feature5 | Feature5 (published) | Δ Feature5 | AvgPool |" in md
    semi = semisup_table(frame)
    row = semi.frame.set_index("Model").loc["v1"]  # one protocol: one row per model
    assert row["best 1% cell"] == "lr0.01_head100" and row["1% top-1"] == pytest.approx(30.5)
    assert row["1% top-1 published"] == 33.15 and math.isnan(row["10% top-1"])
    assert "| v1 |" in semi.to_markdown()
    svm = build_tables(frame)
    names = [t.name for t in svm]
    assert names == ["readme", "pretrain", "linear", "svm", "lowshot", "semisup", "detection", "checkpoints"]
    svm_row = next(t for t in svm if t.name == "svm").frame.iloc[0]
    assert svm_row["Layer"] == "res5"
    assert coco_table(frame).frame.empty


def test_checkpoint_table(zoo):
    t = checkpoint_table(gather(zoo, progress=False).frame)
    df = t.frame
    # 4 pretrain checkpoints + the re-saved copy (md5 c...); the md5-linked copy counts as its pretrain's file
    assert len(df) == 5
    v1 = df[(df["Model"] == "v1") & (df["md5"] == "11111111")].iloc[0]
    assert (v1["trial"], v1["epochs"], v1["mlp"], v1["top-1"], v1["top-1 published"]) == (1, 200, False, 61.4, 60.6)
    v2 = df[df["md5"] == "cccccccc"].iloc[0]
    assert (v2["Model"], bool(v2["mlp"]), v2["top-1"], v2["top-1 published"]) == ("v2", True, 67.0, 67.7)
    assert "| v1 | 1 | 200 |  |  |  | 11111111 |" in t.to_markdown()


def test_csv_round_trip(zoo, tmp_path):
    g = gather(zoo, progress=False)
    written = write_tables(g, tmp_path / "out")
    for t in build_tables(g.frame):
        back = pd.read_csv(written[f"{t.name}.csv"])
        want = t.csv_frame().reset_index(drop=True)
        assert list(back.columns) == list(want.columns)
        for col in want.columns:
            if pd.api.types.is_numeric_dtype(back[col]) and not pd.api.types.is_bool_dtype(back[col]):
                np.testing.assert_allclose(back[col].astype(float), pd.to_numeric(want[col]).astype(float),
                                           err_msg=f"{t.name}:{col}")
            else:
                assert back[col].fillna("").astype(str).tolist() == want[col].fillna("").astype(str).tolist()
    long = pd.read_csv(written["results_long.csv"])
    assert len(long) == len(g.frame) and long["value"].sum() == pytest.approx(g.frame["value"].sum())
    assert (tmp_path / "out" / "tables.md").read_text().count("### ") == len(build_tables(g.frame))


@pytest.fixture
def ablation(tmp_path):
    """MoCo v1 demo-size runs, m in {0, 0.9, 0.999} x ShuffleBN on/off; m=0 oscillates."""
    root = tmp_path / "ablation"
    small = {**V1, "arch": "resnet18_small", "epochs": 3, "data": "demo"}
    for m in (0.0, 0.9, 0.999):
        for sbn in (True, False):
            d = root / f"m{m}_sbn{int(sbn)}"
            c = curve(osc=2.0 if m == 0.0 else 0.0)
            if m == 0.0 and not sbn:
                c[3]["loss"] = float("nan")  # one diverged step: must be left out, not crash
            pretrain_run(d, {**small, "moco_m": m, "shuffle_bn": sbn}, md5=md5_of(f"{int(m * 1000) % 10}{int(sbn)}"),
                         curve=c, loss=c[-1]["epoch_loss"], acc1=c[-1]["epoch_acc1"])
    return root


def test_ablation_variants_and_tables(ablation):
    g = gather(ablation, progress=False)
    variants = sorted(g.pretrain_dirs)
    assert variants == sorted(f"v1 moco_m={m} shuffle_bn={s}" for m in (0.0, 0.9, 0.999) for s in (True, False))
    t = pretrain_table(g.frame)
    md = t.to_markdown()
    assert "(published)" not in md  # demo data, resnet18_small: no published number applies
    # last epoch: steps 9..12, loss 8 - step/8 (+-2 for m=0, cancelling) -> mean 6.6875; acc 5 * 12 = 60
    assert "| v1 moco_m=0.0 shuffle_bn=False | resnet18_small 3ep | 6.688 | 60.0 | 1.00 |" in md


def test_plots_write_pngs(ablation, zoo, tmp_path):
    g = gather(ablation, progress=False)
    out = plot_pretrain_curves(g.pretrain_dirs, tmp_path / "p" / "curves.png")
    grid = plot_pretrain_grid(g.pretrain_dirs, tmp_path / "p" / "grid.png")
    agg = aggregate(gather(zoo, progress=False).frame)
    low = plot_lowshot(agg, tmp_path / "p" / "lowshot.png")
    lin = plot_linear_layers(agg, tmp_path / "p" / "linear.png")
    for png in (out, grid, low, lin):
        data = png.read_bytes()
        assert len(data) > 1000 and data[:8] == PNG_MAGIC
    import matplotlib.image as mpimg
    img = mpimg.imread(grid)
    assert img.shape[0] > 300 and img.shape[1] > 600  # 2 rows of panels, 4 columns
    assert plot_lowshot(aggregate(g.frame), tmp_path / "none.png") is None


def test_single_run_curve_for_lead(tmp_path):
    """The call pretrain/train.py makes at the end of one run: one label, one directory."""
    d = tmp_path / "run"
    d.mkdir()
    c = curve()
    # killed after logging epoch 1, resumed from the epoch-0 checkpoint: epoch 1 (steps 5..8 and its
    # epoch record) is logged twice and the later lines win
    relog = [{**x, **({"loss": x["loss"] - 1} if "loss" in x else {"epoch_loss": x["epoch_loss"] - 1})}
             for x in c[5:10]]
    resumed = c[:10] + relog + c[10:]
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in resumed))
    steps, epochs = read_curve(d)
    assert steps["step"].tolist() == list(range(1, 13)) and epochs["epoch"].tolist() == [0, 1, 2]
    assert steps.loc[steps["step"] == 6, "loss"].item() == pytest.approx(c[6]["loss"] - 1)
    assert epochs.loc[1, "epoch_loss"] == pytest.approx(c[9]["epoch_loss"] - 1)
    png = plot_pretrain_curves({"demo": d}, d / "loss_curve.png")
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_stage_json_precedence(tmp_path):
    """The sweep's stage.json (slurm/stages.py): a benchmark with 2 trials per pretrain trial t gets trials
    2t + k and the pretrain's checkpoint_id as its label; the run id inside the checkpoint links it even
    though the file moved and its md5 matches nothing."""
    root = tmp_path / "s"
    for t in (0, 1):
        p = root / "mocov2-r50" / f"trial{t}" / "pretrain"
        ckpt = pretrain_run(p, {**V2, "seed": 0}, md5=md5_of(str(t)))
        moved = tmp_path / f"elsewhere{t}.pth"
        shutil.copy(ckpt, moved)
        ident = {"variant": "mocov2-r50", "checkpoint_id": f"mocov2-r50/trial{t}"}
        (p / "stage.json").write_text(json.dumps({**ident, "trial": t, "stage": "pretrain", "id": "x"}))
        for k in (0, 1):
            e = root / "evals" / f"lin{t}{k}"  # not below the pretrain dir
            eval_run(e, "linear", {"top1": 67.0 + 2 * t + k}, ckpt=moved, md5=md5_of("e"))
            (e / "stage.json").write_text(json.dumps({**ident, "trial": 2 * t + k, "benchmark_trial": k,
                                                      "stage": "eval"}))
    df = gather(root, progress=False).frame
    lin = df[df["benchmark"] == "linear"].sort_values("trial")
    assert lin["variant"].tolist() == ["mocov2-r50"] * 4 and lin["trial"].tolist() == [0, 1, 2, 3]
    assert lin["link"].tolist() == ["run id"] * 4 and lin["official"].tolist() == ["v2"] * 4
    assert lin["checkpoint"].tolist() == ["mocov2-r50/trial0"] * 2 + ["mocov2-r50/trial1"] * 2
    agg = aggregate(df).set_index(["model", "metric"])
    assert agg.loc[("mocov2-r50", "top1"), ["mean", "n"]].tolist() == pytest.approx([68.5, 4])


def test_intermediate_released_and_unlinked(tmp_path):
    root = tmp_path / "s"
    ckpt = pretrain_run(root / "run", V2, md5=md5_of("a"))
    mid = fake_checkpoint(ckpt.parent / "checkpoint_0099.pth.tar", f"run-{md5_of('a')[:8]}", 100)
    eval_run(root / "lin_ep100", "linear", {"top1": 50.0}, ckpt=mid, md5=md5_of("b"))
    eval_run(tmp_path / "other" / "released", "linear", {"top1": 67.6},
             ckpt=tmp_path / "moco_v2_200ep_pretrain.pth.tar", md5="59fd9945" + "0" * 24)
    eval_run(tmp_path / "other" / "mystery", "knn", {"k20/top1": 10.0}, ckpt=tmp_path / "m.pth", md5=md5_of("f"))
    g = gather(root, progress=False)
    agg = aggregate(g.frame).set_index(["model", "metric"])
    assert agg.loc[("v2 @100ep", "top1"), "epochs"] == 100
    assert math.isnan(agg.loc[("v2 @100ep", "top1"), "published"])  # no published number at 100 epochs
    g2 = gather(tmp_path / "other", progress=False)
    agg2 = aggregate(g2.frame).set_index("model")
    assert agg2.loc["released v2 200ep", "published"] == 67.5
    readme = readme_table(g2.frame).frame.iloc[0]  # its own row, never averaged with a sweep's own runs
    assert (readme["Setting"], readme["MoCo v2 top-1"], readme["MoCo v2 top-1 diff"]) == pytest.approx(
        ("released checkpoint", 67.6, 0.1))
    assert "unlinked m.pth" in agg2.index and any("no pretrain run" in w for w in g2.warnings)


def test_official_recipe_detection():
    assert published.official_method(V1) == "v1" and published.official_method(V2) == "v2"
    assert published.official_method({**V2, "batch_size": 128, "lr": 0.015}) == "v2"  # linear lr scaling
    assert published.official_method({**V2, "moco_m": 0.99}) is None
    assert published.official_method({**V1, "arch": "resnet18"}) is None
    assert published.official_method({**V1, "mlp": True}) is None and published.method_of({**V1, "mlp": True}) == "v1+mlp"
    assert published.official_method({}) is None


def test_bad_records_and_cli(zoo, tmp_path, capsys):
    zoo = Path(shutil.copytree(zoo, tmp_path / "copy"))
    bad = zoo / "v1" / "broken"
    bad.mkdir()
    (bad / "metrics.json").write_text("{not json")
    g = gather(zoo, progress=False)
    assert len(g.warnings) == 1 and "broken" in g.warnings[0]
    with pytest.raises(ValueError, match="broken"):
        gather(zoo, strict=True, progress=False)
    assert results_main([str(zoo), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert str(zoo / "tables" / "tables.md") in out and (zoo / "tables" / "readme.csv").exists()
    assert results_main([str(zoo), "--strict"]) == 2
    assert "broken" in capsys.readouterr().err
    assert results_main([str(tmp_path / "missing")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert results_main([str(empty)]) == 2
    assert "no metrics.json" in capsys.readouterr().err


def test_random_init_baseline_is_a_labelled_row_listed_last(tmp_path):
    """An evaluation of random:ARCH (a sweep baseline, or by hand) is a baseline row, after the models, with
    no "no pretrain run found" warning."""
    ckpt = pretrain_run(tmp_path / "v2" / "pretrain", V2, md5=md5_of("a"))
    eval_run(tmp_path / "v2" / "knn", "knn", {"k20/top1": 61.0}, ckpt=ckpt, md5=md5_of("a"))
    eval_run(tmp_path / "by-hand" / "knn", "knn", {"k20/top1": 11.0}, ckpt=None, md5=None,
             config={"checkpoint": "random:resnet50"})
    swept = tmp_path / "baseline" / "random_init" / "knn"
    eval_run(swept, "knn", {"k20/top1": 12.0}, ckpt=None, md5=None, config={"checkpoint": "random:resnet50"})
    (swept / "stage.json").write_text(json.dumps({"variant": "random init", "trial": 0, "stage": "eval",
                                                  "baseline": True}))
    g = gather(tmp_path, progress=False)
    assert not [w for w in g.warnings if "no pretrain run" in w]
    knn = g.frame[(g.frame["benchmark"] == "knn") & (g.frame["metric"] == "k20/top1")]
    assert list(knn["model"]) == ["v2", "random init (baseline)", "random init resnet50 (baseline)"]
    assert list(knn["value"]) == [61.0, 12.0, 11.0]


def test_stand_in_semisup_subsets_are_their_own_columns_without_published_numbers(tmp_path):
    ckpt = pretrain_run(tmp_path / "v2" / "pretrain", {**V2, "epochs": 200}, md5=md5_of("b"))
    for name, config in (("listed", {"subset": "1pct", "subset_list": "1percent.txt"}),
                         ("made", {"subset": "1pct", "subset_list": ""})):
        eval_run(tmp_path / "v2" / name, "semisup", {"top1": 40.0 if name == "listed" else 55.0, "top5": 70.0},
                 ckpt=ckpt, md5=md5_of("b"), config=config)
    g = gather(tmp_path, progress=False)
    assert set(g.frame["benchmark"]) == {"moco", "semisup-1pct", "semisup-1pct-stand-in"}
    table = semisup_table(g.frame)
    md = table.to_markdown()
    assert "1% top-1 (stand-in)" in md and "stand-in: a seeded class-balanced subset" in md
    row = table.frame.iloc[0]
    assert row["1% top-1"] == 40.0 and row["1% top-1 (stand-in)"] == 55.0
    assert row["1% top-1 published"] == 39.07 and np.isnan(row["1% top-1 (stand-in) published"])


def test_published_numbers_only_next_to_their_protocol_and_protocols_never_averaged(tmp_path):
    """OpenSelfSup's SVM mAP was made with costs 1, 10, 100: a VISSL-protocol result gets its own row and no
    published number; the two are not averaged."""
    ckpt = pretrain_run(tmp_path / "v2" / "pretrain", V2, md5=md5_of("c"))
    eval_run(tmp_path / "v2" / "svm-mm", "svm", {"mAP": 84.0}, ckpt=ckpt, md5=md5_of("c"))
    eval_run(tmp_path / "v2" / "svm-vissl", "svm", {"mAP": 80.0}, ckpt=ckpt, md5=md5_of("c"),
             protocol="voc07-svm/vissl@1")
    g = gather(tmp_path, progress=False)
    rows = {r["Protocol"]: r for _, r in build_tables(g.frame)[[t.name for t in build_tables(g.frame)].index("svm")]
            .frame.iterrows()}
    assert set(rows) == {"voc07-svm/mmselfsup@1", "voc07-svm/vissl@1"}
    assert rows["voc07-svm/mmselfsup@1"]["VOC07 SVM"] == 84.0
    assert rows["voc07-svm/mmselfsup@1"]["VOC07 SVM published"] == 84.26
    assert rows["voc07-svm/vissl@1"]["VOC07 SVM"] == 80.0 and np.isnan(rows["voc07-svm/vissl@1"]["VOC07 SVM published"])
    summary = aggregate(g.frame)
    svm_rows = summary[(summary["benchmark"] == "svm") & (summary["metric"] == "mAP")]
    assert sorted(svm_rows["mean"]) == [80.0, 84.0] and list(svm_rows["n"]) == [1, 1]


def test_lowshot_axis_ends_where_the_data_ends():
    """A demo sweep measures k = 1..16: the axis shows those, not the published grid up to 96."""
    from mocobench.results.plots import lowshot_ticks
    rows = pd.DataFrame({"k": [1, 2, 4, 8, 16, 1, 16], "mean": [10.0, 11, 12, 13, 14, 9, None],
                         "published": [None] * 7})
    assert lowshot_ticks(rows) == [1, 2, 4, 8, 16]
    rows.loc[len(rows)] = {"k": 96, "mean": None, "published": 70.0}  # a published curve drawn to 96
    assert lowshot_ticks(rows) == [1, 2, 4, 8, 16, 96]


def test_moco_v3_runs_are_v3_and_official_only_on_the_published_recipes():
    """method_of names a moco_v3 run 'v3' (whatever its v2 switches); official_method recognises the shipped
    moco-v3 CONFIG.md recipes (pretrain/configs/moco_v3_*.yaml) and nothing else, and lookup finds their
    published linear numbers only under the MoCo v3 linear protocols."""
    from mocobench.core.config import parse_config
    from mocobench.pretrain.train import CONFIG_DIR, PretrainConfig, config_record
    from mocobench.results import published

    def resolved(name, *extra):
        cfg, _ = parse_config(PretrainConfig, ["--config", name, "--data", "/datasets/imagenet", *extra], "t", "t",
                              search_dir=CONFIG_DIR)
        return config_record(cfg)
    assert published.method_of(resolved("moco_v3_r18_demo")) == "v3"
    assert published.official_method(resolved("moco_v3_r50")) == "v3"
    assert published.official_method(resolved("moco_v3_vit_small")) == "v3/vit_small_h12"
    assert published.official_method(resolved("moco_v3_vit_base")) == "v3/vit_base"
    assert published.official_method(resolved("moco_v3_r50", "--epochs", "1000", "--lr", "0.3", "--moco-m", "0.996",
                                              "--weight-decay", "1.5e-6")) == "v3"
    assert published.official_method(resolved("moco_v3_vit_small", "--moco-t", "0.1")) is None
    assert published.official_method(resolved("moco_v3_vit_small", "--arch", "vit_small")) is None  # 6 heads
    assert published.official_method(resolved("moco_v3_r18_demo")) is None
    ref = published.lookup("linear", "top1", "v3/vit_small_h12", 300, "linear/moco-v3-vit@1")
    assert ref is not None and ref.value == 73.2
    assert published.lookup("linear", "top1", "v3/vit_small_h12", 300, "linear/moco@1") is None
    assert published.lookup("linear", "top1", "v3", 100, "linear/moco-v3-resnet@1").value == 68.9


def test_dense_transfer_tables_with_published_and_supervised_numbers(tmp_path):
    """Segmentation, keypoint, LVIS and Cityscapes records make their own tables; the MoCo paper's number sits
    next to a v1 run of the paper's protocol only, MMSelfSup's next to a v2 run of MMSeg's, and the two
    segmentation protocols are separate rows and benchmarks; the supervised numbers are a note."""
    from mocobench.results.tables import cityscapes_table, detection_table, keypoints_table, lvis_table, segmentation_table
    root = tmp_path / "sweep"
    for method, cfg in (("v1", V1), ("v2", V2)):
        md5 = md5_of(method[1])
        ckpt = pretrain_run(root / method / "trial0" / "pretrain", cfg, md5=md5)
        runs = {"voc12-seg-fcn": ({"mIoU": 70.0, "fwIoU": 80.0, "mACC": 75.0, "pACC": 90.0}, "seg/moco-fcn@1"),
                "voc12-seg-fcn-d8": ({"mIoU": 66.0, "fwIoU": 79.0, "mACC": 74.0, "pACC": 89.0}, "seg/mmseg-fcn-d8@1"),
                "coco-keypoints-fpn-2x": ({"keypoints/AP": 65.0, "keypoints/AP50": 86.0, "keypoints/AP75": 70.0,
                                           "bbox/AP": 50.0}, "detectron2/coco-keypoints-fpn-2x@1"),
                "lvis-fpn-2x": ({"segm/AP": 23.0, "segm/APr": float("nan"), "bbox/AP": 25.0}, "detectron2/lvis-fpn-2x@1"),
                "cityscapes-fpn": ({"segm/AP": 30.0, "segm/AP50": 58.0}, "detectron2/cityscapes-fpn@1")}
        for bench, (metrics, protocol) in runs.items():
            eval_run(root / method / "trial0" / bench, bench, metrics, ckpt=ckpt, md5=md5, stage="transfer",
                     protocol=protocol)
    frame = gather(root, progress=False).frame
    seg = segmentation_table(frame).frame.set_index(["Model", "Benchmark"])
    assert seg.loc[("v1", "voc12-seg-fcn"), "mIoU"] == 70.0 and seg.loc[("v1", "voc12-seg-fcn"), "mIoU published"] == 72.5
    assert math.isnan(seg.loc[("v2", "voc12-seg-fcn"), "mIoU published"])         # the paper's number is v1's
    assert seg.loc[("v2", "voc12-seg-fcn-d8"), "mIoU published"] == 67.55          # MMSelfSup, MMSeg's protocol
    assert seg.loc[("v2", "voc12-seg-fcn-d8"), "Protocol"] == "seg/mmseg-fcn-d8@1"
    assert "voc12-seg-fcn mIoU 74.4" in "\n".join(segmentation_table(frame).notes)
    kp = keypoints_table(frame).frame.set_index("Model")
    assert kp.loc["v1", "kp AP"] == 65.0 and kp.loc["v1", "kp AP published"] == 66.8
    lv = lvis_table(frame).frame.set_index("Model")
    assert lv.loc["v1", "mask AP published"] == 24.1 and math.isnan(lv.loc["v1", "mask APr"])
    cs = cityscapes_table(frame).frame.set_index("Model")
    assert cs.loc["v1", "mask AP50 published"] == 59.3 and set(cs["Benchmark"]) == {"cityscapes-fpn"}
    assert detection_table(frame).frame.empty  # voc12-seg-* are not VOC detection
    assert [t.name for t in build_tables(frame)][-5:] == ["keypoints", "lvis", "cityscapes", "segmentation", "checkpoints"]
