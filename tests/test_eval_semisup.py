"""Semi-supervised fine-tuning (MMSelfSup 1%/10% recipe): subset lists, optimiser groups and schedule by hand,
whole-network training, grid metrics, and end to end on the embedded demo data."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mocobench.core.backbones import build_backbone
from mocobench.core.errors import DataError
from mocobench.core.records import read_metrics
from mocobench.evaluate import semisup
from mocobench.evaluate.semisup import SemisupConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


def imagenet_like(root, per_class=3):
    """root/{train,val}/<wnid>/<wnid>_<n>.JPEG, the ImageNet file naming SimCLR's lists use."""
    wnids = ["n01440764", "n01443537"]
    for split in ("train", "val"):
        for c, wnid in enumerate(wnids):
            d = root / split / wnid
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (12, 12), (40 + 100 * c, 20 * i, 90)).save(d / f"{wnid}_{1000 + i}.JPEG")
    return wnids


def test_simclr_subset_list_is_parsed(tmp_path):
    imagenet_like(tmp_path)
    lst = tmp_path / "1percent.txt"
    lst.write_text("n01440764_1001.JPEG\nn01443537_1000.JPEG\n\nn01443537_1002.JPEG\n")  # blank lines ignored
    cfg = SemisupConfig(checkpoint="random:resnet18", data=str(tmp_path), subset="1pct", subset_list=str(lst),
                        image_size=8, resize=8, crop=8)
    labelled, val = semisup.build_datasets(cfg)
    assert sorted(labelled.names) == ["n01440764_1001.JPEG", "n01443537_1000.JPEG", "n01443537_1002.JPEG"]
    assert sorted(labelled.targets) == [0, 1, 1] and len(val) == 6
    lst.write_text("n01440764_1001.JPEG\nn09999999_1.JPEG\n")
    with pytest.raises(DataError, match="1percent.txt.*match no image"):
        semisup.build_datasets(cfg)


def test_published_defaults_and_weight_decay_per_subset():
    cfg = SemisupConfig(checkpoint="random:resnet18")
    assert (cfg.epochs, cfg.batch_size, cfg.momentum, cfg.gamma) == (20, 256, 0.9, 0.2)
    assert cfg.lrs == [0.1, 0.01, 0.001] and cfg.head_mults == [1, 10, 100] and cfg.schedule == [12, 16]
    assert semisup.resolve(SemisupConfig(checkpoint="x", subset="1pct")).weight_decay == 5e-4
    assert semisup.resolve(SemisupConfig(checkpoint="x", subset="10pct")).weight_decay == 1e-4
    assert semisup.resolve(SemisupConfig(checkpoint="x", subset="10pct", weight_decay=0.0)).weight_decay == 0.0
    with pytest.raises(Exception, match="subset must be one of"):
        semisup.resolve(SemisupConfig(checkpoint="x", subset="5pct"))


def test_head_multiplier_and_step_schedule_by_hand():
    cfg = semisup.resolve(SemisupConfig(checkpoint="x"))
    model = build_backbone("resnet18", num_classes=5)
    opt = semisup.make_optimizer(model, lr=0.01, head_mult=100, cfg=cfg)
    body, head = opt.param_groups
    assert {id(p) for p in head["params"]} == {id(model.fc.weight), id(model.fc.bias)}
    assert len(body["params"]) == len(list(model.parameters())) - 2
    assert all(g["weight_decay"] == 5e-4 and g["momentum"] == 0.9 for g in opt.param_groups)
    expected = {0: 1.0, 11: 1.0, 12: 0.2, 15: 0.2, 16: 0.04, 19: 0.04}  # x0.2 at 12 and 16
    for epoch, factor in expected.items():
        semisup.set_epoch_lr(opt, cfg, epoch)
        assert body["lr"] == pytest.approx(0.01 * factor) and head["lr"] == pytest.approx(1.0 * factor)
    assert semisup.cell_name(0.01, 100) == "lr0.01_head100" and semisup.cell_name(0.1, 1.0) == "lr0.1_head1"
    names = [semisup.cell_name(*c) for c in semisup.grid_cells(cfg)]
    assert names == [f"lr{lr}_head{h}" for lr in ("0.1", "0.01", "0.001") for h in (1, 10, 100)]


def test_grid_metrics_report_every_cell_and_the_best():
    cells = {"lr0.1_head1": {"top1": 40.0, "top5": 70.0}, "lr0.01_head10": {"top1": 52.5, "top5": 80.0},
             "lr0.001_head100": {"top1": 52.5, "top5": 79.0}}
    m = semisup.grid_metrics(cells)
    assert m["grid/lr0.1_head1/top1"] == 40.0 and m["grid/lr0.001_head100/top5"] == 79.0
    assert (m["top1"], m["top5"], m["details"]["best_cell"]) == (52.5, 80.0, "lr0.01_head10")  # tie -> top-5


@pytest.fixture(scope="module")
def checkpoint(demo_checkpoints):
    return demo_checkpoints["pretrained"]


def demo_list(demo_data, tmp_path, per_class=2):
    """A subset list of the demo train split as `<class>/<file>` lines."""
    from pathlib import Path
    train = Path(demo_data.imagefolder) / "train"
    lines = [f"{c.name}/{f.name}" for c in sorted(train.iterdir()) for f in sorted(c.iterdir())[:per_class]]
    path = tmp_path / "list.txt"
    path.write_text("\n".join(lines) + "\n")
    return path, len(lines)


def test_whole_network_is_fine_tuned_from_the_checkpoint(checkpoint, demo_data, tmp_path):
    from mocobench.checkpoints.formats import load_backbone
    lst, n = demo_list(demo_data, tmp_path)
    cfg = semisup.resolve(SemisupConfig(checkpoint=checkpoint, data="demo", subset="10pct", subset_list=str(lst),
                                        image_size=32, resize=36, crop=32, epochs=1, workers=0, batch_size=16))
    labelled, val = semisup.build_datasets(cfg)
    loaded = load_backbone(checkpoint).state_dict
    fresh = semisup.build_classifier(checkpoint, 10, seed=0)
    state = fresh.state_dict()
    assert all(torch.equal(state[k], v) for k, v in loaded.items())  # backbone = the checkpoint's encoder
    assert fresh.fc.bias.abs().max() == 0 and 0.007 < fresh.fc.weight.std() < 0.013  # N(0, 0.01) / 0
    loaders = semisup._loaders(cfg, labelled, torch.utils.data.Subset(val, range(20)), torch.device("cpu"))
    result, tuned = semisup.train_cell(cfg, 0.1, 10, 10, loaders, torch.device("cpu"), tmp_path)
    after = tuned.state_dict()
    assert not torch.equal(after["conv1.weight"], loaded["conv1.weight"])      # backbone trained too
    assert not torch.equal(after["bn1.running_mean"], loaded["bn1.running_mean"])  # BN in train mode
    assert 0.0 <= result["top1"] <= result["top5"] <= 100.0


@pytest.mark.parametrize("which", ["pretrained", "random"])
def test_demo_end_to_end(checkpoint, demo_data, which, tmp_path):
    from mocobench.evaluate.cli import main
    ckpt = checkpoint if which == "pretrained" else "random:resnet18_small:16"
    lst, n = demo_list(demo_data, tmp_path, per_class=2)
    out = tmp_path / "semisup"
    args = ["--config", "demo", "--checkpoint", ckpt, "--subset-list", str(lst), "--epochs", "1",
            "--steps-per-epoch", "1", "--workers", "0", "--out", str(out)]
    # part of the grid (test time; the full grid's cells are checked above)
    args += (["--lrs", "0.1,0.001", "--head-mults", "10"] if which == "pretrained" else
             ["--lrs", "0.01", "--head-mults", "1,100"])
    assert main(["semisup", *args]) == 0
    rec = read_metrics(out / "metrics.json")
    m = rec["metrics"]
    assert rec["stage"] == "eval" and rec["benchmark"] == "semisup" and rec["config"]["subset"] == "10pct"
    cells = [k[len("grid/"):-len("/top1")] for k in m if k.endswith("/top1") and k.startswith("grid/")]
    expected = ["lr0.1_head10", "lr0.001_head10"] if which == "pretrained" else ["lr0.01_head1", "lr0.01_head100"]
    assert cells == expected
    assert m["top1"] == max(m[f"grid/{c}/top1"] for c in cells) and 0 <= m["top1"] <= m["top5"] <= 100
    assert m["details"]["labelled_images"] == n
    assert (out / "subset.txt").read_text().split() == lst.read_text().split()
    assert (rec["checkpoint"] is not None) == (which == "pretrained")
    done = json.loads((out / "cells" / f"{cells[0]}.json").read_text())
    assert done == {"top1": m[f"grid/{cells[0]}/top1"], "top5": m[f"grid/{cells[0]}/top5"]}
    # a finished run is not run again; one killed before its record reuses the finished cells
    (out / "cells" / f"{cells[0]}.json").write_text(json.dumps({"top1": 100.0, "top5": 100.0}))
    assert main(["semisup", *args]) == 0
    assert read_metrics(out / "metrics.json")["metrics"]["top1"] == m["top1"]
    (out / "metrics.json").unlink()
    assert main(["semisup", *args]) == 0
    assert read_metrics(out / "metrics.json")["metrics"]["top1"] == 100.0


def test_cli_errors_are_one_line(tmp_path, capsys):
    from mocobench.evaluate.cli import main
    assert main(["semisup", "--checkpoint", "random:resnet18", "--data", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mocobench eval semisup: error:") and "nope" in err and "\n" not in err
    assert main(["semisup", "--checkpoint", "random:resnet18", "--subset", "2pct"]) == 2
    assert "subset must be one of" in capsys.readouterr().err


def test_imagenet_sized_data_needs_the_simclr_list(monkeypatch, tmp_path):
    """Without --subset-list, ImageNet-sized data is refused (the published numbers use SimCLR's files)
    unless a stand-in is asked for; the threshold is lowered here so that a tiny folder counts."""
    from mocobench.evaluate import semisup
    from mocobench.core.errors import ConfigError
    folder = tmp_path / "data"
    for split in ("train", "val"):
        for c in range(3):
            d = folder / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(np.full((8, 8, 3), 40 * c, dtype=np.uint8)).save(d / f"{c}_{i}.png")
    monkeypatch.setattr(semisup, "IMAGENET_SIZED", (10, 1000))
    cfg = semisup.SemisupConfig(data=str(folder), subset="10pct", workers=0)
    with pytest.raises(ConfigError, match=r"12 images in 3 classes and no --subset-list.*1percent.txt.*simclr"):
        semisup.build_datasets(cfg)
    labelled, _ = semisup.build_datasets(semisup.SemisupConfig(data=str(folder), subset="10pct", workers=0,
                                                               stand_in_subset=True))
    assert len(labelled) == 3  # one image per class (at least one per class)
