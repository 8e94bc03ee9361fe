"""Shared pytest fixtures.

`demo_data`: the embedded demo dataset (core/demo_data.py), generated once per machine into
REPO/.cache/demo-data (gitignored) and reused by every later test run. $MOCOBENCH_DATA is pointed there
for the whole test session, so code under test that asks for the demo data (`--data demo`,
`ensure_demo_data()` with no root, subprocesses and submitit jobs) uses the same copy. `smoke_root`: a
slice of it in detectron2's layouts for the detectron2 smoke runs.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_ROOT = REPO / ".cache" / "demo-data"
os.environ["MOCOBENCH_DATA"] = str(DEMO_ROOT)
# One CPU per test process for core/threads.py's fit (tiny tensors: contending threads only slow them down);
# tests of the thread fit itself set their own environment.
os.environ.setdefault("MOCOBENCH_CPUS", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module of tiny-tensor tests: on a shared 2-core machine two
    contending OpenMP threads made tiny convs up to ~30x slower. Use: pytestmark = usefixtures("one_thread")."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def demo_data():
    """mocobench.core.demo_data.DemoData for the shared test copy (first use on a machine: ~10 s to build)."""
    from mocobench.core.demo_data import ensure_demo_data
    return ensure_demo_data(DEMO_ROOT)


@pytest.fixture(scope="session")
def demo_checkpoints(tmp_path_factory, demo_data):
    """A 3-step MoCo v2 demo pretrain checkpoint (`pretrain --config demo`) and a random init of the same
    arch, shared by the evaluator end-to-end tests."""
    from mocobench.core.config import parse_config
    from mocobench.pretrain.train import CONFIG_DIR, PretrainConfig, run
    out = tmp_path_factory.mktemp("demo_pretrain")
    cfg, _ = parse_config(PretrainConfig, ["--config", "demo", "--epochs", "1", "--steps-per-epoch", "3",
                                           "--workers", "0", "--out", str(out)], "t", "t", search_dir=CONFIG_DIR)
    run(cfg)
    return {"pretrained": str(out / "checkpoint_0000.pth.tar"), "random": "random:resnet18_small:16"}


SMOKE_TRAIN, SMOKE_TEST = 12, 12  # demo images per split used by the detectron2 CPU smoke runs


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src, target_is_directory=src.is_dir())


@pytest.fixture(scope="session")
def smoke_root(demo_data, tmp_path_factory):
    """The first demo images of each split, in detectron2's standard layout (VOC2007/, *2017 COCO names,
    VOC2012/ segmentation, cityscapes/, lvis/), for the detectron2 smoke runs; images and annotation files are
    links into the demo data, split lists and json files are cut down."""
    demo = demo_data
    root = tmp_path_factory.mktemp("smoke-data")
    voc = root / "VOC2007"
    for sub in ("Annotations", "JPEGImages"):
        _link(demo.voc / sub, voc / sub)
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    for split, n in (("trainval", SMOKE_TRAIN), ("test", SMOKE_TEST)):
        ids = (demo.voc / "ImageSets" / "Main" / f"{split}.txt").read_text().split()[:n]
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    for split, n in (("train", SMOKE_TRAIN), ("val", SMOKE_TEST)):
        data = json.loads((demo.coco / "annotations" / f"instances_{split}.json").read_text())
        data["images"] = data["images"][:n]
        keep = {im["id"] for im in data["images"]}
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
        out = root / "coco" / "annotations" / f"instances_{split}2017.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data))
        _link(demo.coco / split, root / "coco" / f"{split}2017")
    _dense_slice(demo.root, root)
    return root


def _cut_json(src: Path, dst: Path, n: int) -> None:
    data = json.loads(src.read_text())
    data["images"] = data["images"][:n]
    keep = {im["id"] for im in data["images"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(data))


def _dense_slice(demo: Path, root: Path) -> None:
    """The same cut of the demo's VOC2012 segmentation, Cityscapes, COCO keypoints and LVIS layouts."""
    voc, src = root / "VOC2012", demo / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "class_names.txt"):
        _link(src / sub, voc / sub)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    for split, n in (("train", SMOKE_TRAIN // 2), ("aug", SMOKE_TRAIN // 2), ("val", SMOKE_TEST)):
        ids = (src / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()[:n]
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    for split, n in (("train", SMOKE_TRAIN), ("val", SMOKE_TEST)):
        for kind in ("leftImg8bit", "gtFine"):
            city = next((demo / "cityscapes" / kind / split).iterdir())
            stems = sorted({f.name.split("_")[2] for f in city.iterdir()})[:n]
            for f in city.iterdir():
                if f.name.split("_")[2] in stems:
                    _link(f, root / "cityscapes" / kind / split / city.name / f.name)
        _cut_json(demo / "coco" / "annotations" / f"person_keypoints_{split}.json",
                  root / "coco" / "annotations" / f"person_keypoints_{split}2017.json", n)
        _cut_json(demo / "lvis" / f"lvis_v0.5_{split}.json", root / "lvis" / f"lvis_v0.5_{split}.json", n)
        _link(demo / "coco" / split, root / "coco" / split)  # LVIS: the coco_url's split folder
