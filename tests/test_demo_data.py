"""The embedded demo dataset: layouts, annotation consistency, determinism, concurrency and reuse.

Expectations are restated independently of pretrain/demo_data.py: the VOC devkit conventions (1-based
inclusive boxes; per-class files 1 / -1 / 0 = only difficult), the COCO instances format (bbox = the
polygon's extent), and pycocotools' own rasterisation as a reference for the mask areas.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mocobench.core import demo_data as dd

REPO = Path(__file__).resolve().parents[1]


def _voc_objects(voc: Path, image_id: str) -> tuple[ET.Element, list[dict]]:
    root = ET.parse(voc / "Annotations" / f"{image_id}.xml").getroot()
    objs = []
    for o in root.iter("object"):
        b = o.find("bndbox")
        objs.append({"name": o.findtext("name"), "difficult": int(o.findtext("difficult")),
                     "truncated": int(o.findtext("truncated")),
                     "box": tuple(int(b.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))})
    return root, objs


def _ids(voc: Path, split: str) -> list[str]:
    return (voc / "ImageSets" / "Main" / f"{split}.txt").read_text().split()


def test_imagefolder_layout_and_counts(demo_data):
    assert demo_data.class_names == dd.CLASS_NAMES and len(set(demo_data.class_names)) == 10
    for split, per_class in (("train", 200), ("val", 50)):
        split_dir = demo_data.imagefolder / split
        assert sorted(p.name for p in split_dir.iterdir()) == sorted(demo_data.class_names)
        for name in demo_data.class_names:
            files = sorted((split_dir / name).iterdir())
            assert len(files) == per_class and all(f.suffix == ".png" for f in files)
        with Image.open(split_dir / "star" / "0007.png") as im:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", (32, 32))
            a = np.asarray(im).astype(float)  # grey up to the per-channel pixel noise (sigma 3)
            assert np.abs(a[..., 0] - a[..., 1]).mean() < 5 and np.abs(a[..., 1] - a[..., 2]).mean() < 5
    counts = dd.read_manifest(demo_data.root)["counts"]
    assert counts["imagefolder"] == {"train": 2000, "val": 500}


def test_classes_are_not_separable_by_colour(demo_data):
    """Colour statistics (per-channel mean and std, 4x4x4 colour histogram) predict the class at about
    chance (10 %) with a kNN classifier: the class is in the shape only. The images are grey (equal
    channels), so this is also the grey-level test."""
    from sklearn.neighbors import KNeighborsClassifier

    def features(split):
        xs, ys = [], []
        for c, name in enumerate(demo_data.class_names):
            for p in sorted((demo_data.imagefolder / split / name).glob("*.png")):
                a = np.asarray(Image.open(p)).reshape(-1, 3)
                q = a // 64
                hist = np.bincount(q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2], minlength=64) / len(a)
                xs.append(np.concatenate([a.mean(0) / 255, a.std(0) / 255, hist]))
                ys.append(c)
        return np.array(xs), np.array(ys)

    clf = KNeighborsClassifier(n_neighbors=10).fit(*features("train"))
    assert clf.score(*features("val")) < 0.2


def test_voc_devkit(demo_data):
    voc = demo_data.voc
    assert voc.name == "VOC2007" and voc.parent.name == "VOCdevkit"
    train, val, trainval, test = (_ids(voc, s) for s in ("train", "val", "trainval", "test"))
    assert (len(trainval), len(test)) == (300, 150)
    assert sorted(train + val) == sorted(trainval) and not set(train) & set(val)
    assert not set(trainval) & set(test)
    n_obj = n_difficult = 0
    labels: dict[str, dict[str, int]] = {}
    for image_id in trainval + test:
        assert re.fullmatch(r"\d{6}", image_id)
        root, objs = _voc_objects(voc, image_id)
        assert root.findtext("filename") == f"{image_id}.jpg"
        w, h, depth = (int(root.find("size").findtext(k)) for k in ("width", "height", "depth"))
        with Image.open(voc / "JPEGImages" / f"{image_id}.jpg") as im:
            assert (im.format, im.mode, im.size, depth) == ("JPEG", "RGB", (w, h), 3)
        assert 1 <= len(objs) <= 3
        for o in objs:
            xmin, ymin, xmax, ymax = o["box"]
            assert 1 <= xmin <= xmax <= w and 1 <= ymin <= ymax <= h, (image_id, o)
            assert o["name"] in demo_data.class_names and o["difficult"] in (0, 1) and o["truncated"] in (0, 1)
            # VOC's own rule of thumb: a box under MIN_DET_SIDE pixels is always difficult
            if min(xmax - xmin + 1, ymax - ymin + 1) < dd.MIN_DET_SIDE - 1:
                assert o["difficult"] == 1, (image_id, o)
        n_obj += len(objs)
        n_difficult += sum(o["difficult"] for o in objs)
        # the devkit rule: 1 = a non-difficult object of the class, 0 = only difficult ones, -1 = none
        labels[image_id] = {c: -1 for c in demo_data.class_names}
        for o in objs:
            if o["difficult"] == 0:
                labels[image_id][o["name"]] = 1
            elif labels[image_id][o["name"]] == -1:
                labels[image_id][o["name"]] = 0
    assert 0.05 < n_difficult / n_obj < 0.2, (n_difficult, n_obj)
    for split, ids in (("train", train), ("val", val), ("trainval", trainval), ("test", test)):
        for c in demo_data.class_names:
            lines = (voc / "ImageSets" / "Main" / f"{c}_{split}.txt").read_text().splitlines()
            assert all(re.fullmatch(r"\d{6} ( 1|-1| 0)", line) for line in lines), lines[:3]
            assert [line.split()[0] for line in lines] == ids
            assert [int(line.split()[1]) for line in lines] == [labels[i][c] for i in ids]
            assert sum(labels[i][c] == 1 for i in ids) >= 5, (c, split)  # every class is evaluable


def _polygon_area(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y)))


def test_coco_json_matches_polygons_and_voc(demo_data):
    coco_dir, voc = demo_data.coco, demo_data.voc
    for split, voc_split in (("train", "trainval"), ("val", "test")):
        coco = json.loads((coco_dir / "annotations" / f"instances_{split}.json").read_text())
        assert [(c["id"], c["name"]) for c in coco["categories"]] == list(enumerate(demo_data.class_names, 1))
        images = {im["id"]: im for im in coco["images"]}
        assert len(images) == len(coco["images"]) == len(_ids(voc, voc_split))
        ann_ids = [a["id"] for a in coco["annotations"]]
        assert len(set(ann_ids)) == len(ann_ids)
        by_image: dict[int, list[dict]] = {}
        for a in coco["annotations"]:
            assert a["image_id"] in images and a["iscrowd"] == 0 and 1 <= a["category_id"] <= 10
            (poly,) = a["segmentation"]
            xy = np.array(poly).reshape(-1, 2)
            assert len(poly) % 2 == 0 and len(xy) >= 3
            x, y, w, h = a["bbox"]
            assert np.allclose([x, y, x + w, y + h], [*xy.min(0), *xy.max(0)], atol=1.0), a["id"]
            im = images[a["image_id"]]
            assert 0 <= x and 0 <= y and x + w <= im["width"] + 1e-6 and y + h <= im["height"] + 1e-6
            assert a["area"] > 0 and math.isclose(a["area"], _polygon_area(xy), rel_tol=0.01, abs_tol=0.5)
            by_image.setdefault(a["image_id"], []).append(a)
        ids = _ids(voc, voc_split)
        assert sorted(im["file_name"] for im in images.values()) == [f"{i}.jpg" for i in ids]
        for image_id, im in images.items():
            name = Path(im["file_name"]).stem
            assert (coco_dir / split / im["file_name"]).read_bytes() == (voc / "JPEGImages" / im["file_name"]).read_bytes()
            _, objs = _voc_objects(voc, name)
            anns = by_image.get(image_id, [])
            assert [demo_data.class_names[a["category_id"] - 1] for a in anns] == [o["name"] for o in objs]
            for a, o in zip(anns, objs):  # VOC 1-based inclusive pixels vs COCO continuous [x, y, w, h]
                x, y, w, h = a["bbox"]
                xmin, ymin, xmax, ymax = o["box"]
                assert np.allclose([xmin - 1, ymin - 1, xmax, ymax], [x, y, x + w, y + h], atol=1.0)


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
def test_coco_masks_with_pycocotools(demo_data):
    """pycocotools' own rasterisation of each polygon covers about the annotated area inside the bbox."""
    coco_api = pytest.importorskip("pycocotools.coco", reason="pycocotools comes with the detectron2 install")
    coco = coco_api.COCO(str(demo_data.coco / "annotations" / "instances_val.json"))
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) == dd.read_manifest(demo_data.root)["counts"]["detection"]["test"]["objects"]
    for a in anns:
        m = coco.annToMask(a)
        ys, xs = np.nonzero(m)
        x, y, w, h = a["bbox"]
        assert xs.min() >= math.floor(x) and xs.max() <= math.ceil(x + w) - 1
        assert ys.min() >= math.floor(y) and ys.max() <= math.ceil(y + h) - 1
        assert abs(int(m.sum()) - a["area"]) <= 0.1 * a["area"] + 0.5 * (w + h), a["id"]


def test_reuse_is_fast_and_rewrites_nothing(demo_data):
    files = [demo_data.root / dd.MANIFEST, demo_data.voc / "Annotations" / "000001.xml",
             demo_data.imagefolder / "val" / "heart" / "0049.png"]
    before = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in files]
    start = time.perf_counter()
    again = dd.ensure_demo_data(demo_data.root)
    assert time.perf_counter() - start < 0.5
    assert again == demo_data and [(p.stat().st_ino, p.stat().st_mtime_ns) for p in files] == before


def test_stored_images_are_the_generator_output(demo_data):
    """The cached files (written by another process, maybe another day) equal a fresh render."""
    png = (demo_data.imagefolder / "val" / "crescent" / "0013.png").read_bytes()
    assert dd._png(dd.classification_image("val", dd.CLASS_NAMES.index("crescent"), 13)) == png
    img, objs = dd.detection_image("test", 4)  # the 5th test image: id 300 + 5
    assert dd._jpeg(img) == (demo_data.voc / "JPEGImages" / "000305.jpg").read_bytes()
    assert [o["name"] for o in objs] == [o["name"] for o in _voc_objects(demo_data.voc, "000305")[1]]


_RACE = """
import json, sys
from mocobench.core.demo_data import ensure_demo_data
d = ensure_demo_data(sys.argv[1], progress=False)
print(json.dumps({"root": str(d.root), "voc": str(d.voc)}))
"""


def test_concurrent_generation_is_deterministic_and_safe(tmp_path, demo_data):
    """Two processes build the same root at once: both succeed, one copy survives, no temp dirs remain,
    and the result is byte-identical (manifest listing md5) to the shared copy built earlier."""
    root = tmp_path / "demo"
    procs = [subprocess.Popen([sys.executable, "-c", _RACE, str(root)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert json.loads(out)["voc"] == str(root / "VOCdevkit" / "VOC2007")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
    assert dd.read_manifest(root) == dd.read_manifest(demo_data.root)
    dd.verify(root)
    victim = root / "VOCdevkit" / "VOC2007" / "Annotations" / "000002.xml"
    victim.write_text(victim.read_text().replace("<difficult>0", "<difficult>1", 1))
    with pytest.raises(dd.DemoDataError, match="differ"):
        dd.verify(root)


def test_install_race_keeps_the_first_copy(tmp_path):
    """_install: a build that finishes second is discarded; --force replaces; a foreign dir is refused."""
    def fake(path: Path, tag: str) -> Path:
        path.mkdir()
        (path / dd.MANIFEST).write_text(json.dumps({"version": dd.VERSION, "seed": dd.SEED, "tag": tag}))
        return path
    root = fake(tmp_path / "root", "first")
    assert dd._install(fake(tmp_path / "tmp2", "second"), root, replace=False) is False
    assert dd.read_manifest(root)["tag"] == "first" and (tmp_path / "tmp2").exists()
    assert dd._install(tmp_path / "tmp2", root, replace=True) is True
    assert dd.read_manifest(root)["tag"] == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for force in (False, True):  # --force replaces only a dataset built here, never foreign files
        with pytest.raises(dd.DemoDataError, match=r"not a mocobench demo dataset \(notes.txt\).*nothing was changed"):
            dd.ensure_demo_data(foreign, force=force)
        assert (foreign / "notes.txt").read_text() == "mine"
    (foreign / dd.MANIFEST).write_text(json.dumps({"version": dd.VERSION - 1, "seed": dd.SEED}))
    with pytest.raises(dd.DemoDataError, match=r"not a mocobench demo dataset \(notes.txt\)"):
        dd.ensure_demo_data(foreign, force=True)  # a manifest beside foreign files does not make them ours
    assert (foreign / "notes.txt").read_text() == "mine"
    old = fake(tmp_path / "old", "old")
    (old / dd.MANIFEST).write_text(json.dumps({"version": dd.VERSION - 1, "seed": dd.SEED}))
    with pytest.raises(dd.DemoDataError, match=r"version \d+ .*pass --force to replace"):
        dd.ensure_demo_data(old)


def test_cli_prints_paths_and_verifies(demo_data, tmp_path, capsys):
    assert dd.main(["--root", str(demo_data.root), "--verify"]) == 0
    out = capsys.readouterr().out
    assert str(demo_data.voc) in out and str(demo_data.imagefolder) in out and "verified" in out
    assert "circle" in out
    (tmp_path / "x").write_text("x")
    assert dd.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a mocobench demo dataset (x)" in err and "--force" not in err and len(err.splitlines()) == 1
    assert (tmp_path / "x").read_text() == "x"


def test_dataset_finished_by_another_process_meanwhile_is_used(tmp_path, monkeypatch):
    """The first manifest read misses (the other process is still building), the second sees its
    finished copy: the caller uses it instead of refusing the non-empty dir or building again."""
    root = tmp_path / "demo"
    root.mkdir()
    (root / dd.MANIFEST).write_text(json.dumps({"version": dd.VERSION, "seed": dd.SEED}))
    real, calls = dd.read_manifest, []
    monkeypatch.setattr(dd, "read_manifest", lambda r: calls.append(r) or (None if len(calls) == 1 else real(r)))
    monkeypatch.setattr(dd, "_build", lambda *a, **k: pytest.fail("must not build"))
    assert dd.ensure_demo_data(root).root == root and len(calls) == 2
