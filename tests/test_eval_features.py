"""Dataset readers, feature extraction at every layer, the feature cache and the .npz feature files."""
import json
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mocobench.core.backbones import build_backbone
from mocobench.core.errors import FeatureFileError
from mocobench.core.transforms import eval_transform
from mocobench.evaluate import datasets, feature_cache, feature_file, layers
from mocobench.evaluate.datasets import DataError

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


COLOURS = {"blue": (20, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}


def write_image(path, colour, seed, size=20):
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour)[None, None] + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def make_image_folder(root, per_class=(6, 3)):
    """root/{train,val}/<colour>/<i>.png: three classes of noisy single-colour images."""
    for split, n in zip(("train", "val"), per_class):
        for c, colour in COLOURS.items():
            for i in range(n):
                write_image(root / split / c / f"{c}_{split}_{i}.png", colour, hash((split, c, i)) % 2**31)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("folder"))


VOC_OBJECTS = {  # image id -> [(class, difficult)]
    "000001": [("dog", False), ("person", False)],
    "000002": [("dog", True)],                     # only a difficult dog -> -1
    "000003": [("cat", False), ("cat", True)],     # a difficult and a clear cat -> 1
    "000004": [("person", True), ("cat", False)],
    "000005": [("dog", False)],
}


def make_voc(root, splits=None, per_class_files=True):
    splits = splits or {"trainval": ["000001", "000002", "000003"], "test": ["000004", "000005"]}
    voc = root / "VOC2007"
    for img_id, objs in VOC_OBJECTS.items():
        write_image(voc / "JPEGImages" / f"{img_id}.jpg", (120, 120, 120), int(img_id))
        body = "".join(f"<object><name>{n}</name><difficult>{int(d)}</difficult></object>" for n, d in objs)
        (voc / "Annotations").mkdir(parents=True, exist_ok=True)
        (voc / "Annotations" / f"{img_id}.xml").write_text(f"<annotation><filename>{img_id}.jpg</filename>{body}</annotation>")
    main = voc / "ImageSets" / "Main"
    main.mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        (main / f"{split}.txt").write_text("\n".join(ids) + "\n")
        if per_class_files:
            for c in ("cat", "dog", "person"):
                lines = []
                for i in ids:
                    flags = [d for n, d in VOC_OBJECTS[i] if n == c]
                    lines.append(f"{i} {1 if (flags and not all(flags)) else (0 if flags else -1):>2}")
                (main / f"{c}_{split}.txt").write_text("\n".join(lines) + "\n")
    return voc


# --- ImageFolder --------------------------------------------------------------------------------------------
def test_image_folder_labels_follow_train_classes(folder):
    ds = datasets.image_folder(folder, "val", eval_transform(20, 16))
    assert ds.classes == ["blue", "green", "red"] and len(ds) == 9
    img, label = ds[3]
    assert img.shape == (3, 16, 16) and label == 1


def test_image_folder_errors_name_the_path(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=(2, 1))
    with pytest.raises(DataError, match=r"split 'test' not found.*train.*val"):
        datasets.image_folder(root, "test")
    (root / "val" / "red").rename(root / "val" / "rouge")
    with pytest.raises(DataError, match=r"classes differ.*missing \['red'\].*extra \['rouge'\]"):
        datasets.image_folder(root, "val")
    for f in (root / "train" / "green").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"empty class: .*train/green"):
        datasets.image_folder(root, "train")
    with pytest.raises(DataError, match="does not exist"):
        datasets.image_folder(tmp_path / "nowhere", "train")


def test_unreadable_image_is_a_data_error_naming_it(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=(1, 1))
    bad = root / "train" / "red" / "broken.png"
    bad.write_bytes(b"not a png")
    ds = datasets.image_folder(root, "train")
    idx = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("broken.png")][0]
    with pytest.raises(DataError, match="unreadable image .*broken.png"):
        ds[idx]


# --- VOC2007 ------------------------------------------------------------------------------------------------
def test_voc_labels_present_absent_difficult(tmp_path):
    voc = make_voc(tmp_path)
    ds = datasets.voc2007(tmp_path, "trainval")  # parent dir is accepted too
    assert ds.class_names == ["cat", "dog", "person"]  # from the per-class files
    #                                  cat dog person
    assert ds.labels.tolist() == [[0, 1, 1],    # 000001
                                  [0, -1, 0],   # 000002: only a difficult dog
                                  [1, 0, 0]]    # 000003: clear cat wins over the difficult one
    test = datasets.voc2007(voc, "test", eval_transform(20, 16))
    assert test.labels.tolist() == [[1, 0, -1], [0, 1, 0]]
    img, label = test[1]
    assert img.shape == (3, 16, 16) and label.tolist() == [0, 1, 0]


def test_voc_class_order_without_per_class_files(tmp_path):
    make_voc(tmp_path, per_class_files=False)
    ds = datasets.voc2007(tmp_path / "VOC2007", "trainval")
    assert ds.class_names == list(datasets.VOC_CLASSES)  # all names are VOC classes: the standard 20
    j = datasets.VOC_CLASSES.index("dog")
    assert ds.labels[:, j].tolist() == [1, -1, 0] and ds.labels.shape == (3, 20)


def test_voc_errors_name_the_file(tmp_path):
    voc = make_voc(tmp_path)
    with pytest.raises(DataError, match=r"missing split file .*Main/val.txt.*test.txt"):
        datasets.voc2007(voc, "val")
    (voc / "ImageSets" / "Main" / "test.txt").write_text("000004\n000099\n")
    with pytest.raises(DataError, match=r"test.txt lists 1 image.*000099.jpg.*does not match"):
        datasets.voc2007(voc, "test")
    (voc / "ImageSets" / "Main" / "dog_trainval.txt").write_text("000001  1\n000002  1\n000003 -1\n")
    with pytest.raises(DataError, match=r"dog_trainval.txt: image 000002 has label -1 .* but 1"):
        datasets.voc2007(voc, "trainval")
    with pytest.raises(DataError, match="not a VOC2007 devkit"):
        datasets.voc2007(tmp_path / "elsewhere", "trainval")


# --- subsets ------------------------------------------------------------------------------------------------
def test_subset_list_file_and_errors(folder, tmp_path):
    train = datasets.image_folder(folder, "train")
    lst = datasets.write_subset_list(["red_train_1.png", "blue/blue_train_4.png", ""], tmp_path / "1percent.txt")
    assert datasets.read_subset_list(lst) == ["red_train_1.png", "blue/blue_train_4.png"]
    sub = datasets.subset(train, lst)
    assert sorted(sub.names) == ["blue_train_4.png", "red_train_1.png"] and sorted(sub.targets) == [0, 2]
    assert sub[0][1] == sub.targets[0]
    bad = datasets.write_subset_list(["red_train_1.png", "n01440764_10026.JPEG"], tmp_path / "bad.txt")
    with pytest.raises(DataError, match=r"1 of 2 names match no image.*n01440764_10026.JPEG"):
        datasets.subset(train, bad)
    with pytest.raises(DataError, match="not found"):
        datasets.subset(train, tmp_path / "missing.txt")


def test_made_subsets_are_class_balanced_and_seeded(folder):
    train = datasets.image_folder(folder, "train")  # 6 images per class
    half = datasets.make_subset_list(train, 0.5, seed=3)
    assert len(half) == 9 and half == datasets.make_subset_list(train, 0.5, seed=3)
    assert half != datasets.make_subset_list(train, 0.5, seed=4)
    assert sorted(datasets.subset(train, "0.5", seed=3).targets) == [0] * 3 + [1] * 3 + [2] * 3
    assert len(datasets.subset(train, "1pct").names) == 3  # at least one image per class


def test_made_subsets_work_when_file_names_repeat_across_classes(tmp_path):
    for cls in ("a", "b"):  # like the demo data: 0000.png in every class
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8)).save(tmp_path / "train" / cls / f"{i:04d}.png")
    train = datasets.image_folder(tmp_path, "train")
    names = datasets.make_subset_list(train, 0.5, seed=0)
    assert len(names) == 4 and all(n.split("/")[0] in ("a", "b") for n in names)
    assert sorted(datasets.subset(train, "0.5", seed=0).targets) == [0, 0, 1, 1]


# --- layers and pooling -------------------------------------------------------------------------------------
def test_layer_dimensions_of_resnet50_at_224():
    """MMSelfSup's published dims 9216/9216/8192/9216/8192, avgpool 2048, VISSL's VOC res5 pool 8192."""
    model = build_backbone("resnet50").to("meta").eval()
    net = layers.LayerFeatures(model, layers.RESNET_LAYERS)
    out = net(torch.zeros(2, 3, 224, 224, device="meta"))
    dims = {k: v[0].numel() for k, v in out.items()}
    assert dims == {"feature1": 9216, "feature2": 9216, "feature3": 8192, "feature4": 9216, "feature5": 8192,
                    "avgpool": 2048, "voc_svm": 8192}


def test_voc_svm_pool_is_6x6_stride_1_on_res5():
    fmap = torch.arange(49.0).view(1, 1, 7, 7)
    pooled = layers.pool_map("voc_svm", fmap)
    by_hand = [[20.0, 21.0], [27.0, 28.0]]  # centres of the four 6x6 windows of a 7x7 ramp 0..48
    assert pooled[0, 0].tolist() == by_hand
    assert layers.pool_map("feature5", fmap)[0, 0].tolist() == by_hand  # MMSelfSup's feat5 pool is the same
    assert layers.pool_map("avgpool", fmap).item() == pytest.approx(24.0)


def test_extract_matches_a_plain_forward_and_keeps_bn_frozen(folder):
    torch.manual_seed(0)
    model = build_backbone("resnet18_small", num_classes=3, width=8)
    model.train()  # extract must switch to eval()
    bn_before = model.bn1.running_mean.clone()
    ds = datasets.image_folder(folder, "val", eval_transform(20, 16))
    feats, labels = layers.extract(model, ds, "avgpool", batch_size=4, workers=0)
    assert feats.dtype == np.float32 and feats.shape == (9, 64) and labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    assert torch.equal(model.bn1.running_mean, bn_before) and not model.training
    with torch.no_grad():
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        trunk = torch.nn.Sequential(*list(model.children())[:-1])  # torchvision forward up to avgpool
        ref = trunk(x).flatten(1).numpy()
        stem = F.relu(model.bn1(model.conv1(x)))
    np.testing.assert_allclose(feats, ref, rtol=1e-4, atol=1e-5)
    f1, _ = layers.extract(model, ds, "feature1", batch_size=5, workers=0)
    np.testing.assert_allclose(f1, F.adaptive_avg_pool2d(stem, 12).flatten(1).numpy(), rtol=1e-4, atol=1e-5)


# --- npz files and the cache --------------------------------------------------------------------------------
def _arrays(n=6, d=4, multilabel=False):
    rng = np.random.default_rng(0)
    lab = (rng.integers(-1, 2, (n, 3)) if multilabel else rng.integers(0, 3, n)).astype(np.int64)
    return {"train_feats": rng.normal(size=(n, d)).astype(np.float32), "train_labels": lab,
            "test_feats": rng.normal(size=(n - 1, d)).astype(np.float32), "test_labels": lab[:-1]}


def test_npz_is_memory_mapped_and_round_trips(tmp_path):
    arrays = _arrays(multilabel=True)
    for name, write in (("ours.npz", lambda p: feature_file.write_npz(p, arrays)),
                        ("savez.npz", lambda p: np.savez(p, **arrays))):
        fs = feature_file.load_features(write(tmp_path / name) or tmp_path / name)
        assert isinstance(fs.train_feats, np.memmap) and isinstance(fs.test_feats, np.memmap)
        for k, v in arrays.items():
            np.testing.assert_array_equal(getattr(fs, k), v)
        assert fs.multilabel and fs.class_names is None
    np.savez_compressed(tmp_path / "z.npz", **arrays)  # compressed: read into memory, same values
    fs = feature_file.load_features(tmp_path / "z.npz")
    assert not isinstance(fs.train_feats, np.memmap)
    np.testing.assert_array_equal(fs.train_feats, arrays["train_feats"])


@pytest.mark.parametrize("change, match", [
    (lambda a: a.pop("test_labels"), r"lacks arrays \['test_labels'\]"),
    (lambda a: a.update(train_labels=a["train_labels"][:-1]), r"train_labels has shape \(5,\) for 6 train"),
    (lambda a: a.update(test_feats=a["test_feats"][:, :3]), "train_feats are 4-d but test_feats 3-d"),
    (lambda a: a.update(train_labels=np.full((6, 3), 2), test_labels=np.ones((5, 3))), r"1 \(present\), 0 \(absent\) or -1"),
    (lambda a: a.update(train_labels=np.linspace(0, 1, 6)), "non-integer"),
    (lambda a: a.update(train_feats=a["train_feats"][0]), "expected N x D"),
])
def test_bad_feature_files_are_named(tmp_path, change, match):
    arrays = _arrays()
    change(arrays)
    np.savez(tmp_path / "f.npz", **arrays)
    with pytest.raises(FeatureFileError, match=match) as e:
        feature_file.load_features(tmp_path / "f.npz")
    assert "f.npz" in str(e.value)


def test_not_a_zip_is_a_clear_error(tmp_path):
    (tmp_path / "f.npz").write_text("hello")
    with pytest.raises(FeatureFileError, match="not a .npz file"):
        feature_file.load_features(tmp_path / "f.npz")


def test_cache_reuses_and_invalidates(folder, tmp_path, capsys):
    torch.manual_seed(0)
    model = build_backbone("resnet18_small", num_classes=3, width=8)
    ckpt = tmp_path / "model.pth"
    torch.save(model.state_dict(), ckpt)
    t = eval_transform(20, 16)
    train, val = datasets.image_folder(folder, "train", t), datasets.image_folder(folder, "val", t)
    kw = dict(cache_dir=tmp_path / "cache", batch_size=8, workers=0)
    path = feature_cache.cached_features(ckpt, "tiny", train, val, "avgpool", "r20c16", **kw)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["n_train"] == 18 and meta["dim"] == 64 and meta["peak_rss_mb"]["self"] > 0
    assert path.parent.parent.name == feature_cache.checkpoint_key(ckpt)
    fs = feature_file.load_features(path)
    assert fs.class_names == ["blue", "green", "red"] and fs.train_labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    mtime = path.stat().st_mtime_ns
    capsys.readouterr()
    # the same request is served from the cache (the checkpoint is not even read)
    assert feature_cache.cached_features(ckpt, "tiny", train, val, "avgpool", "r20c16", model=None, **kw) == path
    assert "reusing cache" in capsys.readouterr().out and path.stat().st_mtime_ns == mtime
    # another layer is another entry; a changed image list is re-extracted
    assert feature_cache.cached_features(ckpt, "tiny", train, val, "voc_svm", "r20c16", **kw) != path
    train.samples = train.samples[:-1]
    feature_cache.cached_features(ckpt, "tiny", train, val, "avgpool", "r20c16", **kw)
    assert "dataset changed" in capsys.readouterr().out
    assert len(feature_file.load_features(path).train_feats) == 17
    assert not list(path.parent.glob(".*"))  # no temporary files left behind


def test_bf16_extraction_stays_close_to_fp32(folder):
    """The bf16 fast path against the fp32 reference: per-image relative error and identical neighbours."""
    torch.manual_seed(0)
    model = build_backbone("resnet18_small", num_classes=3, width=16)
    ds = datasets.image_folder(folder, "train", eval_transform(20, 16))
    ref, _ = layers.extract(model, ds, "avgpool", batch_size=18, workers=0, amp=False)
    fast, _ = layers.extract(model, ds, "avgpool", batch_size=18, workers=0, amp=True)
    rel = np.linalg.norm(fast - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert rel.max() < 0.03, rel.max()
    cos = lambda f: (f / np.linalg.norm(f, axis=1, keepdims=True)) @ (f / np.linalg.norm(f, axis=1, keepdims=True)).T
    assert np.abs(cos(fast) - cos(ref)).max() < 0.01


def test_extract_cli_writes_features_and_metrics(folder, tmp_path):
    from mocobench.core.records import read_metrics
    from mocobench.evaluate.cli import main
    torch.manual_seed(0)
    ckpt = tmp_path / "m.pth"
    torch.save(build_backbone("resnet18_small", num_classes=3, width=8).state_dict(), ckpt)
    argv = ["extract", "--checkpoint", str(ckpt), "--data", str(folder), "--layer", "voc_svm", "--resize", "20",
            "--crop", "16", "--workers", "0", "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    rec = read_metrics(tmp_path / "run" / "metrics.json")
    assert rec["benchmark"] == "extract" and rec["metrics"]["dim"] == 64 * 4  # 2x2 pool of a 2x2 res5 map
    assert rec["checkpoint"]["md5"] == feature_cache.checkpoint_key(ckpt)
    fs = feature_file.load_features(tmp_path / "run")
    assert fs.train_feats.shape == (18, 256) and zipfile.is_zipfile(tmp_path / "run" / "features.npz")


def test_extract_cli_errors_are_one_line(tmp_path, capsys):
    from mocobench.evaluate.cli import main
    assert main(["extract", "--checkpoint", "random:resnet18_small:8", "--layer", "res5"]) == 2
    assert "unknown feature layer 'res5'" in capsys.readouterr().err
    assert main(["extract", "--checkpoint", str(tmp_path / "none.pth"), "--data", str(tmp_path)]) == 2
    assert "checkpoint " + str(tmp_path / "none.pth") + " not found" in capsys.readouterr().err
    assert main(["nosuch"]) == 2


def test_svm_and_lowshot_features_are_the_whole_image_resized_as_the_references(tmp_path):
    """svm: Resize(256) + Resize((224, 224)) (VISSL / MMSelfSup VOC07), lowshot: Resize((224, 224)) (VISSL
    low-shot), here at 20 / 16 px; checked against torchvision.transforms.functional applied by hand, on
    non-square images where a center crop would differ."""
    import torchvision.transforms.functional as TF

    from mocobench.core.transforms import IMAGENET_MEAN, IMAGENET_STD
    from mocobench.evaluate.lowshot import LowShotConfig
    from mocobench.evaluate.svm import SVMConfig
    voc = make_voc(tmp_path)
    rng = np.random.default_rng(0)
    for p in sorted((voc / "JPEGImages").glob("*.jpg")):
        Image.fromarray(rng.integers(0, 255, (20, 34, 3), dtype=np.uint8)).save(p)
    test_images = [Image.open(voc / "JPEGImages" / f"{i}.jpg").convert("RGB") for i in ("000004", "000005")]
    common = dict(checkpoint="random:resnet18_small:8", data=str(voc), layer="avgpool", resize=20, crop=16,
                  workers=0, cache_dir=str(tmp_path / "cache"))
    model = layers.load_frozen_backbone("random:resnet18_small:8", 0)
    trunk = torch.nn.Sequential(*list(model.children())[:-1])
    found = {}
    for cls, kind in ((SVMConfig, "resize"), (LowShotConfig, "square"), (SVMConfig, "center_crop")):
        cfg = cls(**common) if kind != "center_crop" else cls(**common, image_transform="center_crop")
        assert cfg.image_transform == kind
        fs = feature_file.load_features(feature_cache.resolve_features(cfg))

        def reference(img):
            if kind in ("resize", "center_crop"):
                img = TF.resize(img, 20)
            img = TF.center_crop(img, 16) if kind == "center_crop" else TF.resize(img, [16, 16])
            return TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)
        with torch.no_grad():
            ref = trunk(torch.stack([reference(img) for img in test_images])).flatten(1).numpy()
        np.testing.assert_allclose(fs.test_feats, ref, rtol=1e-4, atol=1e-5)
        found[kind] = np.asarray(fs.test_feats)
    assert not np.allclose(found["resize"], found["center_crop"], atol=1e-3)  # the transform matters here


def test_layer_dimensions_of_vit_small_at_224():
    """ViT-S/16: 384-d CLS and patch mean (MoCo v3 main_lincls.py, DINO), 4 x 384 for DINO's n_last_blocks 4."""
    model = build_backbone("vit_small").to("meta").eval()
    out = layers.LayerFeatures(model, layers.VIT_LAYERS)(torch.zeros(2, 3, 224, 224, device="meta"))
    assert {k: v[0].numel() for k, v in out.items()} == {"cls": 384, "patch_mean": 384, "cls_last4": 1536}
