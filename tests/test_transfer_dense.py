"""The dense-prediction transfer recipes: semantic segmentation (seg/moco-fcn, seg/mmseg-fcn-d8), COCO
keypoints, LVIS and Cityscapes instances. Registration from the real layouts (written by the demo data),
the FCN pieces against hand-checkable values and detectron2's own ResNet, weights conversion into the
dilated backbone, and a smoke run (train + real evaluator) of every recipe."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mocobench.transfer.recipes import METRIC_NAMES, RECIPES, get_recipe

pytest.importorskip("detectron2")
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")]

DENSE = [name for name, r in RECIPES.items() if r.task in ("sem_seg", "keypoints", "lvis", "cityscapes")]


def _cfg(recipe: str, **spec):
    from mocobench.transfer.train import RunSpec, build_cfg
    return build_cfg(RunSpec(recipe=recipe, out_dir="/tmp/unused", data_root="/tmp/unused", start="", **spec))


# --- registration from the real layouts ---------------------------------------------------------------
def test_voc_segmentation_lists_labels_and_classes(demo_data, tmp_path):
    from PIL import Image

    from mocobench.transfer.datasets import DatasetLayoutError, register_datasets, voc_seg_items
    from mocobench.transfer.segmentation import SegmentationMapper
    devkit = demo_data.root / "VOCdevkit" / "VOC2012"
    classes = register_datasets(["voc_seg_2012_train_aug"], ["voc_seg_2012_val"], demo_data.root / "VOCdevkit")
    assert classes == ["background", *demo_data.class_names]
    items = voc_seg_items(devkit, "train_aug")  # MMSeg's voc12aug: train.txt (SegmentationClass) + aug.txt (...Aug)
    assert len(items) == 300 and items[0]["sem_seg_file_name"].endswith(f"SegmentationClass/{Path(items[0]['file_name']).stem}.png")
    assert "SegmentationClassAug" in items[-1]["sem_seg_file_name"]
    label = Image.open(items[0]["sem_seg_file_name"])
    assert label.mode == "P"  # VOC's palette PNG: the mapper must read its indices, not grey values
    raw = np.asarray(label)
    assert set(np.unique(raw)) <= set(range(11)) | {255} and 255 in raw
    cfg = _cfg("voc12-seg-fcn")
    d = SegmentationMapper(cfg.clone(), is_train=False)(dict(items[0]))
    assert "sem_seg" not in d and tuple(d["image"].shape[1:]) == raw.shape  # test: original size, no labels
    mutable = cfg.clone()
    mutable.defrost()
    mutable.INPUT.SEG.RATIO_RANGE, mutable.INPUT.CROP.SIZE = [1.0, 1.0], (1000, 1000)  # no scale, no crop
    torch.manual_seed(0)
    np.random.seed(0)
    seen = SegmentationMapper(mutable, is_train=True)(dict(items[0]))["sem_seg"].numpy()
    assert np.array_equal(seen, raw) or np.array_equal(seen, raw[:, ::-1])  # only a flip may have happened
    # DeepLab's layout: train_aug.txt with SegmentationClassAug/ wins
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Segmentation" / "train_aug.txt").write_text(
        "000001\n/JPEGImages/000002.jpg /SegmentationClassAug/000002.png\n")  # ids, or image/label pairs
    (tmp_path / "SegmentationClassAug").mkdir()
    for i in ("000001", "000002"):
        (tmp_path / "SegmentationClassAug" / f"{i}.png").write_bytes(b"")
    assert [i["sem_seg_file_name"] for i in voc_seg_items(tmp_path, "train_aug")] == [
        str(tmp_path / "SegmentationClassAug" / f"{i}.png") for i in ("000001", "000002")]
    from mocobench.transfer.datasets import voc_seg_classes
    (tmp_path / "class_names.txt").write_text("background\ncat\ndog")  # no trailing newline
    assert voc_seg_classes(tmp_path) == ["background", "cat", "dog"]
    with pytest.raises(DatasetLayoutError, match=r"ImageSets/Segmentation/val.txt not found"):
        voc_seg_items(tmp_path, "val")


def test_cityscapes_labels_agree_with_cityscapesscripts(demo_data):
    """The demo's labelIds, labelTrainIds and instanceIds agree with cityscapesScripts' label table (the
    independent reference), and detectron2's own loaders read both tasks."""
    from cityscapesscripts.helpers.labels import id2label
    from PIL import Image

    from mocobench.transfer.datasets import CITYSCAPES_STUFF, CITYSCAPES_THINGS, register_datasets
    from detectron2.data import DatasetCatalog
    assert register_datasets(["cityscapes_fine_sem_seg_train"], ["cityscapes_fine_sem_seg_val"], demo_data.root) == list(CITYSCAPES_STUFF)
    assert list(CITYSCAPES_STUFF) == [l.name for l in sorted(id2label.values(), key=lambda l: l.trainId)
                                      if 0 <= l.trainId < 19]
    sem = DatasetCatalog.get("cityscapes_fine_sem_seg_train")
    assert len(sem) == 100
    gt = sem[3]["sem_seg_file_name"]
    ids = np.asarray(Image.open(gt.replace("labelTrainIds", "labelIds")))
    train_ids = np.asarray(Image.open(gt))
    assert np.array_equal(np.vectorize(lambda i: id2label[int(i)].trainId)(ids), train_ids)
    inst = np.asarray(Image.open(gt.replace("labelTrainIds", "instanceIds")))
    assert np.array_equal(np.where(inst >= 1000, inst // 1000, inst), ids)
    assert register_datasets(["cityscapes_fine_instance_seg_train"], [], demo_data.root) == list(CITYSCAPES_THINGS)
    dicts = DatasetCatalog.get("cityscapes_fine_instance_seg_train")  # detectron2's loader: cityscapesscripts + shapely
    n_things = sum(1 for v in np.unique(inst) if v >= 1000)
    assert len(dicts) == 100 and len(dicts[3]["annotations"]) == n_things
    assert all(0 <= a["category_id"] < 8 for d in dicts for a in d["annotations"])


def test_keypoints_and_lvis_registration(demo_data, tmp_path):
    from lvis import LVIS

    from mocobench.transfer.datasets import DatasetLayoutError, keypoint_meta, register_datasets
    from detectron2.data import DatasetCatalog, MetadataCatalog
    root = demo_data.root
    assert register_datasets(["keypoints_coco_2017_train"], ["keypoints_coco_2017_val"], root) == ["shape"]
    meta = MetadataCatalog.get("keypoints_coco_2017_train")
    assert meta.keypoint_names == ["top", "bottom", "left_point", "right_point"]
    assert meta.keypoint_flip_map == [("left_point", "right_point")] and meta.keypoint_oks_sigmas == [0.05] * 4
    record = DatasetCatalog.get("keypoints_coco_2017_val")[0]
    kps = np.array(record["annotations"][0]["keypoints"]).reshape(-1, 3)
    box = record["annotations"][0]["bbox"]  # XYWH; keypoints are polygon vertices, so on the box edges (+0.5 px)
    assert abs(kps[0, 1] - 0.5 - box[1]) < 1e-3 and abs(kps[2, 0] - 0.5 - box[0]) < 1e-3
    bad = tmp_path / "kp.json"
    bad.write_text(json.dumps({"categories": [{"id": 1, "name": "x", "keypoints": ["a", "b"]}]}))
    with pytest.raises(DatasetLayoutError, match="2 keypoints, not COCO's 17, and no 'oks_sigmas'"):
        keypoint_meta(bad)
    names = register_datasets(["lvis_v0.5_train"], ["lvis_v0.5_val"], root)
    assert names == list(demo_data.class_names)
    api = LVIS(str(root / "lvis" / "lvis_v0.5_val.json"))  # the lvis-api reads the file: the format holds
    assert len(api.get_img_ids()) == 150 and {c["frequency"] for c in api.cats.values()} <= {"r", "c", "f"}
    first = DatasetCatalog.get("lvis_v0.5_train")[0]
    assert Path(first["file_name"]).is_file() and Path(first["file_name"]).parent.name == "train"
    with pytest.raises(ValueError, match="mixes dataset families"):
        register_datasets(["voc_seg_2012_train_aug"], ["coco_2017_val"], root)


# --- FCN pieces ---------------------------------------------------------------------------------------
def test_dilated_backbone_matches_detectron2_resnet_and_strides():
    """Without dilation it is detectron2's build_resnet_backbone (same keys, same outputs from the same
    weights); D8 keeps res4 / res5 at stride 8, MoCo's FCN res5 at 16."""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import build_backbone

    from mocobench.transfer import segmentation
    segmentation.register()
    d8 = _cfg("voc12-seg-fcn-d8")
    plain = d8.clone()
    plain.defrost()
    plain.MODEL.RESNETS.RES4_DILATION = plain.MODEL.RESNETS.RES5_DILATION = 1
    ours = segmentation.build_dilated_resnet_backbone(plain, ShapeSpec(channels=3)).eval()
    plain.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    ref = build_backbone(plain).eval()
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = ours(x), ref(x)
        torch.testing.assert_close(a["res5"], b["res5"])
        assert tuple(a["res5"].shape[-2:]) == (2, 2)
        dilated = segmentation.build_dilated_resnet_backbone(d8, ShapeSpec(channels=3)).eval()(x)
        assert tuple(dilated["res4"].shape[-2:]) == (8, 8) and tuple(dilated["res5"].shape[-2:]) == (8, 8)
        moco = build_backbone(_cfg("voc12-seg-fcn")).eval()(x)
        assert tuple(moco["res5"].shape[-2:]) == (4, 4) and moco["res5"].shape[1] == 2048


def test_fcn_loss_normalisation_and_aux_weight():
    """'valid' averages over labelled pixels, 'all' (MMSeg's avg_non_ignore=False) over every pixel; the
    auxiliary loss is weighted 0.4."""
    from detectron2.layers import ShapeSpec

    from mocobench.transfer.segmentation import FCNHead
    cfg = _cfg("voc12-seg-fcn-d8")
    head = FCNHead(cfg, {"res4": ShapeSpec(channels=8, stride=8), "res5": ShapeSpec(channels=8, stride=8)})
    logits = torch.zeros(1, 21, 4, 4)
    logits[:, 3] = 2.0
    targets = torch.full((1, 4, 4), 3, dtype=torch.long)
    targets[:, :2] = 255  # half the pixels ignored
    per_pixel = -torch.log_softmax(logits[0, :, 0, 0], 0)[3]
    losses = head.losses({"sem_seg": logits, "aux": logits}, targets)
    torch.testing.assert_close(losses["loss_sem_seg"], per_pixel / 2)      # 'all': sum over 8 / 16 pixels
    torch.testing.assert_close(losses["loss_aux"], 0.4 * per_pixel / 2)
    head.normalize = "valid"
    torch.testing.assert_close(head.losses({"sem_seg": logits}, targets)["loss_sem_seg"], per_pixel)


def test_slide_inference_windows_are_mmsegs_and_overlaps_average():
    """MMSeg slide_inference: windows at multiples of the stride, the last one moved back to end at the
    border (1025 rows, crop 769, stride 513: rows [0, 769) and [256, 1025)); logits averaged where windows
    overlap (a network that returns its input gives the image back)."""
    from mocobench.transfer.segmentation import FCNSegmentor
    seg = FCNSegmentor.__new__(FCNSegmentor)
    torch.nn.Module.__init__(seg)
    seg.slide_crop, seg.slide_stride = (769, 769), (513, 513)
    windows = []

    def record(crop):
        windows.append(tuple(crop.shape[-2:]))
        return torch.full_like(crop[:, :1], float(len(windows)))
    seg._whole = record
    out = seg._slide(torch.zeros(1, 3, 1025, 2049))
    assert windows == [(769, 769)] * 8  # 2 rows x 4 columns (x from 0, 513, 1026, and 1280 to end at 2049)
    # row-0 windows are calls 1-4, row-1 windows 5-8; pixel (500, 0) lies in the first column of both rows
    assert out[0, 0, 0, 0] == 1 and out[0, 0, 1024, 2048] == 8 and out[0, 0, 500, 0] == (1 + 5) / 2
    assert out[0, 0, 0, 1100] == (2 + 3) / 2 and out[0, 0, 0, 1290] == (3 + 4) / 2  # windows from 513/1026, 1026/1280
    seg.slide_crop, seg.slide_stride = (5, 6), (3, 4)
    seg._whole = lambda crop: crop * 1.0
    image = torch.arange(2 * 11 * 13, dtype=torch.float32).reshape(1, 2, 11, 13)
    torch.testing.assert_close(seg._slide(image), image)


def test_training_batches_are_padded_to_the_crop():
    """MMSeg's Pad(size=crop_size): a crop smaller than the crop size is padded (images 0, labels ignore),
    so 'all' normalisation divides by the crop's pixel count."""
    from mocobench.transfer.segmentation import FCNSegmentor
    seg = FCNSegmentor.__new__(FCNSegmentor)
    torch.nn.Module.__init__(seg)
    seg.train_size = (8, 8)
    labels = seg._pad_to_crop(torch.zeros(1, 4, 8, dtype=torch.long), 255)
    assert tuple(labels.shape) == (1, 8, 8) and (labels[:, 4:] == 255).all() and (labels[:, :4] == 0).all()
    assert tuple(seg._pad_to_crop(torch.ones(1, 3, 10, 6), 0.0).shape) == (1, 3, 10, 8)  # larger sides kept


def test_keep_ratio_resize_poly_lr_and_photometric():
    from mocobench.transfer.segmentation import KeepRatioResize, PolyParamScheduler, _distort
    landscape, portrait = np.zeros((375, 500, 3), np.uint8), np.zeros((500, 375, 3), np.uint8)
    resize = KeepRatioResize((2048, 512), (1.0, 1.0))  # mmcv.imrescale: factor min(2048 / long, 512 / short)
    assert (resize.get_transform(landscape).new_h, resize.get_transform(landscape).new_w) == (512, 683)
    assert (resize.get_transform(portrait).new_h, resize.get_transform(portrait).new_w) == (683, 512)
    assert KeepRatioResize(None, (2.0, 2.0)).get_transform(landscape).new_h == 750  # MoCo: the image x ratio
    poly = PolyParamScheduler(0.9, 1e-4 / 0.01)  # mmcv PolyLrUpdaterHook: (base - min) (1 - t)^0.9 + min
    assert poly(0.0) == 1.0 and math.isclose(poly(1.0), 0.01)
    assert math.isclose(0.01 * poly(0.5), (0.01 - 1e-4) * 0.5 ** 0.9 + 1e-4)
    img = np.full((2, 2, 3), 250, np.uint8)
    assert _distort(img, 20.0, None, True, None, None).max() == 255  # brightness, clipped
    assert np.array_equal(_distort(img, None, None, True, None, None), img)
    import cv2  # MMSeg's reference: mmcv.bgr2hsv / hsv2bgr are cv2.cvtColor on the BGR image
    rgb = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    hsv = cv2.cvtColor(rgb[..., ::-1].copy(), cv2.COLOR_BGR2HSV)
    hsv[..., 1] = np.clip(hsv[..., 1].astype(np.float32) * 1.3, 0, 255).astype(np.uint8)
    hsv[..., 0] = (hsv[..., 0].astype(int) + 10) % 180
    want = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[..., ::-1]
    assert np.array_equal(_distort(rgb, None, None, True, 1.3, 10), want)


def test_converted_checkpoint_fills_the_dilated_backbone(tmp_path):
    """A torchvision ResNet-50 through `convert --to detectron2` loads into the FCN-D8 model: every backbone
    tensor is the source's (the head is new)."""
    import torchvision
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from mocobench.checkpoints.convert import convert
    from mocobench.transfer import segmentation
    segmentation.register()
    torch.manual_seed(0)
    src = torchvision.models.resnet50()
    torch.save(src.state_dict(), tmp_path / "r50.pth")
    convert(tmp_path / "r50.pth", "detectron2", tmp_path / "r50.pkl")
    cfg = _cfg("voc12-seg-fcn-d8")
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    DetectionCheckpointer(model).load(str(tmp_path / "r50.pkl"))
    torch.testing.assert_close(model.backbone.stem.conv1.weight, src.conv1.weight)
    torch.testing.assert_close(model.backbone.res4[2].conv2.weight, src.layer3[2].conv2.weight)
    torch.testing.assert_close(model.backbone.res5[0].conv2.norm.running_var, src.layer4[0].bn2.running_var)


# --- recipes and smoke runs ---------------------------------------------------------------------------
def test_dense_recipes_resolve_to_their_sources():
    fcn, d8, city_d8 = _cfg("voc12-seg-fcn"), _cfg("voc12-seg-fcn-d8"), _cfg("cityscapes-seg-fcn-d8")
    h = fcn.MODEL.SEM_SEG_HEAD  # MoCo A.5: stride 16, two 3x3 256-d convs at dilation 6, 513 crops, lr .003, 30k
    assert (fcn.MODEL.RESNETS.RES5_DILATION, h.CONVS_DIM, h.NUM_CONVS, h.DILATION, h.AUX_IN_FEATURE) == (2, 256, 2, 6, "")
    assert (tuple(fcn.INPUT.CROP.SIZE), fcn.SOLVER.BASE_LR, fcn.SOLVER.MAX_ITER, tuple(fcn.SOLVER.STEPS)) == (
        (513, 513), 0.003, 30000, (21000, 27000))
    assert (fcn.SOLVER.IMS_PER_BATCH, fcn.SOLVER.WEIGHT_DECAY, fcn.INPUT.MIN_SIZE_TEST) == (16, 1e-4, 0)
    city = _cfg("cityscapes-seg-fcn")
    assert (tuple(city.INPUT.CROP.SIZE), city.SOLVER.BASE_LR, city.SOLVER.MAX_ITER) == ((769, 769), 0.01, 90000)
    h = d8.MODEL.SEM_SEG_HEAD  # MMSeg fcn_r50-d8
    assert (d8.MODEL.RESNETS.RES4_DILATION, d8.MODEL.RESNETS.RES5_DILATION, h.CONVS_DIM, h.CONCAT_INPUT, h.DROPOUT,
            h.AUX_IN_FEATURE, h.AUX_LOSS_WEIGHT, h.LOSS_NORMALIZE) == (2, 4, 512, True, 0.1, "res4", 0.4, "all")
    assert (d8.SOLVER.LR_SCHEDULER_NAME, d8.SOLVER.WEIGHT_DECAY, d8.SOLVER.WEIGHT_DECAY_NORM, d8.SOLVER.MAX_ITER,
            d8.SOLVER.IMS_PER_BATCH) == ("WarmupPolyLR", 5e-4, 5e-4, 20000, 16)
    assert (list(d8.INPUT.SEG.SCALE), d8.INPUT.SEG.CAT_MAX_RATIO, d8.INPUT.SEG.PHOTOMETRIC) == ([2048, 512], 0.75, True)
    assert (list(city_d8.TEST.SLIDE.CROP), list(city_d8.TEST.SLIDE.STRIDE), city_d8.SOLVER.IMS_PER_BATCH) == (
        [769, 769], [513, 513], 8)
    kp, lvis, cs = _cfg("coco-keypoints-fpn-2x"), _cfg("lvis-fpn-2x"), _cfg("cityscapes-fpn")
    assert kp.MODEL.KEYPOINT_ON and kp.MODEL.ROI_HEADS.NUM_CLASSES == 1 and kp.SOLVER.MAX_ITER == 180000
    assert (lvis.DATALOADER.SAMPLER_TRAIN, lvis.DATALOADER.REPEAT_THRESHOLD, lvis.TEST.DETECTIONS_PER_IMAGE) == (
        "RepeatFactorTrainingSampler", 0.001, 300)
    assert (cs.MODEL.ROI_HEADS.NUM_CLASSES, cs.SOLVER.MAX_ITER, cs.SOLVER.IMS_PER_BATCH) == (8, 24000, 8)
    for cfg in (fcn, d8, kp, lvis, cs):
        assert cfg.MODEL.RESNETS.NORM == "naiveSyncBN" and cfg.INPUT.FORMAT == "RGB"
    # --linear-scaling starts from each schedule's own GPU count: MMSeg's are 4-GPU schedules
    assert _cfg("voc12-seg-fcn-d8", linear_scaling=True).SOLVER.REFERENCE_WORLD_SIZE == 4
    assert _cfg("voc12-seg-fcn", linear_scaling=True).SOLVER.REFERENCE_WORLD_SIZE == 8
    assert "INPUT.SEG" not in kp.dump() and "SEG:" not in kp.INPUT.dump()  # FCN keys only in FCN configs


@pytest.mark.parametrize("recipe", DENSE)
def test_dense_smoke_run(recipe, smoke_root, tmp_path):
    """`mocobench transfer detectron2 --recipe R --smoke` trains 2 iterations and scores the demo test images
    with the recipe's real evaluator; metrics.json has the task's metric names and protocol. The values of a
    2-iteration random-init model only show that the evaluator produced numbers in range."""
    from mocobench.core.records import read_metrics
    from mocobench.transfer.cli import main
    assert main(["detectron2", "--recipe", recipe, "--weights", "random:resnet50", "--out", str(tmp_path / "run"),
                 "--data-root", str(smoke_root), "--smoke", "--num-gpus", "0"]) == 0
    record = read_metrics(tmp_path / "run" / "metrics.json")
    r = get_recipe(recipe)
    assert record["protocol"] == f"{r.protocol_name}-smoke" and record["benchmark"] == recipe
    names = [k for k in record["metrics"] if k != "details"]
    assert names == list(METRIC_NAMES[r.task])
    finite = [record["metrics"][k] for k in names if math.isfinite(record["metrics"][k])]
    assert finite and all(0 <= v <= 100 for v in finite)
    if r.task == "sem_seg":
        cfg = record["config"]["detectron2"]
        assert cfg["MODEL"]["SEM_SEG_HEAD"]["NUM_CLASSES"] == len(record["config"]["classes"])
        assert any(k.startswith("IoU-") for k in record["metrics"]["details"])
    (tmp_path / "run" / "detectron2" / "model_final.pth").unlink()
