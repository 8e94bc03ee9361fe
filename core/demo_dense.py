"""The demo detection images in the dense-prediction layouts: VOC2012 segmentation, Cityscapes, COCO keypoints
and LVIS (called by core/demo_data.py's build; no import of it, so no cycle).

  ROOT/VOCdevkit/VOC2012/JPEGImages/<id>.jpg, SegmentationClass/<id>.png (VOC's 255 band around objects),
      SegmentationClassAug/<id>.png (no band, as SBD's), ImageSets/Segmentation/{train,aug,val}.txt,
      class_names.txt (background + the shapes; mocobench's extension for non-VOC classes)
  ROOT/cityscapes/leftImg8bit/<split>/shapeville/shapeville_000000_<NNNNNN>_leftImg8bit.png and gtFine/<split>/...
      _gtFine_{labelIds,labelTrainIds,instanceIds}.png, _gtFine_polygons.json: each shape class stands for a
      Cityscapes class (SHAPE_TO_CITYSCAPES), the background is road
  ROOT/coco/annotations/person_keypoints_{train,val}.json   one category "shape" with 4 keypoints: the
      polygon's top, bottom, leftmost and rightmost vertices (left_point/right_point swap under a flip)
  ROOT/lvis/lvis_v0.5_{train,val}.json                       LVIS v0.5 format over the coco/{train,val} images

Layouts: VOC2012 devkit + SBD "aug" lists as MMSegmentation's voc12aug; cityscapesScripts' file naming and
label ids (helpers/labels.py); COCO keypoints (cocodataset.org/#format-data); LVIS v0.5 (lvisdataset.org).
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

VOID = 255
# shape class index -> (Cityscapes label name, labelId, trainId, has instances); background: road (7, 0)
SHAPE_TO_CITYSCAPES = (("person", 24, 11, True), ("rider", 25, 12, True), ("car", 26, 13, True),
                       ("truck", 27, 14, True), ("bus", 28, 15, True), ("train", 31, 16, True),
                       ("motorcycle", 32, 17, True), ("bicycle", 33, 18, True), ("building", 11, 2, False),
                       ("vegetation", 21, 8, False))
ROAD = ("road", 7, 0)
CITY = "shapeville"
CITYSCAPES_COUNTS = {"train": 100, "val": 50}  # first N images of trainval / test
KEYPOINT_NAMES = ("top", "bottom", "left_point", "right_point")
KEYPOINT_SIGMA = 0.05  # OKS sigma per keypoint (COCO's person keypoints: 0.025-0.107)
LVIS_FREQUENCY = ((10, "r"), (100, "c"))  # images per category in train: <= 10 rare, <= 100 common, else frequent


@dataclass
class DetImage:
    """One demo detection image: its ids, split ("trainval" / "test"), pixels, objects (core/demo_data.py
    `detection_image`) and label map (object index per pixel, -1 = background, later objects on top)."""
    image_id: str
    number: int
    split: str
    image: Image.Image
    objects: list[dict]
    labels: np.ndarray


def _png(array: np.ndarray, palette: list[int] | None = None) -> bytes:
    img = Image.fromarray(array)
    if palette is not None:
        img = img.convert("P") if img.mode != "P" else img
        img.putpalette(palette)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _voc_palette() -> list[int]:
    """VOC's colour map (VOCdevkit VOClabelcolormap.m): bit-interleaved class index, 255 = cream void."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    pal[VOID * 3:VOID * 3 + 3] = [224, 224, 192]
    return pal


def class_map(det: DetImage) -> np.ndarray:
    """Per pixel: 0 = background, 1 + shape class of the object on top."""
    out = np.zeros(det.labels.shape, np.uint8)
    for k, o in enumerate(det.objects):
        out[det.labels == k] = o["category"] + 1
    return out


def _boundary(labels: np.ndarray) -> np.ndarray:
    """Pixels next to a different label (4-neighbourhood): VOC marks such a band as void."""
    edge = np.zeros(labels.shape, bool)
    edge[1:] |= labels[1:] != labels[:-1]
    edge[:-1] |= labels[1:] != labels[:-1]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[:, :-1] |= labels[:, 1:] != labels[:, :-1]
    return edge


def write_voc_segmentation(root: Path, dets: list[DetImage], class_names: tuple[str, ...]) -> dict:
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    pal = _voc_palette()
    trainval = [d for d in dets if d.split == "trainval"]
    lists = {"train": trainval[: len(trainval) // 2], "aug": trainval[len(trainval) // 2:],
             "val": [d for d in dets if d.split == "test"]}
    for d in dets:
        buf = io.BytesIO()
        d.image.save(buf, format="JPEG", quality=90, subsampling=0, optimize=False)
        (voc / "JPEGImages" / f"{d.image_id}.jpg").write_bytes(buf.getvalue())
        labels = class_map(d)
        (voc / "SegmentationClassAug" / f"{d.image_id}.png").write_bytes(_png(labels, pal))
        banded = np.where(_boundary(labels), VOID, labels).astype(np.uint8)
        (voc / "SegmentationClass" / f"{d.image_id}.png").write_bytes(_png(banded, pal))
    for name, items in lists.items():
        (voc / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("".join(f"{d.image_id}\n" for d in items))
    (voc / "class_names.txt").write_text("".join(f"{n}\n" for n in ("background", *class_names)))
    return {name: len(items) for name, items in lists.items()}


def write_cityscapes(root: Path, dets: list[DetImage]) -> dict:
    counts = {}
    for split, src in (("train", "trainval"), ("val", "test")):
        chosen = [d for d in dets if d.split == src][: CITYSCAPES_COUNTS[split]]
        img_dir, gt_dir = (root / "cityscapes" / kind / split / CITY for kind in ("leftImg8bit", "gtFine"))
        img_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        for n, d in enumerate(chosen):
            stem = f"{CITY}_000000_{n:06d}"
            h, w = d.labels.shape
            label_ids = np.full((h, w), ROAD[1], np.uint8)
            train_ids = np.full((h, w), ROAD[2], np.uint8)
            instance_ids = np.full((h, w), ROAD[1], np.uint16)  # 16-bit PNG, as Cityscapes
            seen: dict[int, int] = {}
            objects = [{"label": ROAD[0], "polygon": [[0, 0], [w, 0], [w, h], [0, h]]}]
            for k, o in enumerate(d.objects):
                name, label_id, train_id, things = SHAPE_TO_CITYSCAPES[o["category"]]
                mask = d.labels == k
                label_ids[mask], train_ids[mask] = label_id, train_id
                if things and mask.any():
                    instance_ids[mask] = label_id * 1000 + seen.get(label_id, 0)
                    seen[label_id] = seen.get(label_id, 0) + 1
                else:
                    instance_ids[mask] = label_id
                poly = np.array(o["polygon"]).reshape(-1, 2)
                objects.append({"label": name, "polygon": poly.tolist()})
            buf = io.BytesIO()
            d.image.save(buf, format="PNG", compress_level=1)
            (img_dir / f"{stem}_leftImg8bit.png").write_bytes(buf.getvalue())
            (gt_dir / f"{stem}_gtFine_labelIds.png").write_bytes(_png(label_ids))
            (gt_dir / f"{stem}_gtFine_labelTrainIds.png").write_bytes(_png(train_ids))
            (gt_dir / f"{stem}_gtFine_instanceIds.png").write_bytes(_png(instance_ids))
            (gt_dir / f"{stem}_gtFine_polygons.json").write_text(
                json.dumps({"imgHeight": h, "imgWidth": w, "objects": objects}))
        counts[split] = len(chosen)
    return counts


def _keypoints(det: DetImage, k: int) -> list[float]:
    """[x, y, v] x 4: the clipped polygon's top, bottom, leftmost and rightmost vertices; v = 2 where the
    object is on top at that pixel, else 1 (labelled, not visible)."""
    poly = np.array(det.objects[k]["polygon"]).reshape(-1, 2)
    picks = (poly[:, 1].argmin(), poly[:, 1].argmax(), poly[:, 0].argmin(), poly[:, 0].argmax())
    h, w = det.labels.shape
    out = []
    for i in picks:
        x, y = float(poly[i, 0]), float(poly[i, 1])
        px, py = min(int(x), w - 1), min(int(y), h - 1)
        out += [round(x, 2), round(y, 2), 2 if det.labels[py, px] == k else 1]
    return out


def _coco_style(dets: list[DetImage], image_fields, annotation_fields) -> dict[str, tuple[list, list]]:
    """split -> (images, annotations) in COCO's shape (train <- trainval, val <- test; annotation ids run on
    across splits); `image_fields(det, split)` and `annotation_fields(det, k, obj)` add each format's own."""
    out, ann_id = {}, 1
    for split, src in (("train", "trainval"), ("val", "test")):
        images, annotations = [], []
        for d in (d for d in dets if d.split == src):
            h, w = d.labels.shape
            images.append({"id": d.number, "width": w, "height": h, **image_fields(d, split)})
            for k, o in enumerate(d.objects):
                x0, y0, x1, y1 = o["bbox"]
                annotations.append({"id": ann_id, "image_id": d.number, "bbox": [x0, y0, round(x1 - x0, 2),
                                    round(y1 - y0, 2)], "area": o["area"], "segmentation": [o["polygon"]],
                                    **annotation_fields(d, k, o)})
                ann_id += 1
        out[split] = (images, annotations)
    return out


def _keypoint_fields(d: DetImage, k: int, o: dict) -> dict:
    kps = _keypoints(d, k)
    return {"category_id": 1, "iscrowd": 0, "keypoints": kps, "num_keypoints": sum(v > 0 for v in kps[2::3])}


def write_coco_keypoints(root: Path, dets: list[DetImage]) -> dict:
    cat = {"id": 1, "name": "shape", "supercategory": "shape", "keypoints": list(KEYPOINT_NAMES),
           "skeleton": [[1, 3], [3, 2], [2, 4], [4, 1]], "oks_sigmas": [KEYPOINT_SIGMA] * len(KEYPOINT_NAMES)}
    counts = {}
    splits = _coco_style(dets, lambda d, split: {"file_name": f"{d.image_id}.jpg"}, _keypoint_fields)
    for split, (images, annotations) in splits.items():
        data = {"info": {"description": "mocobench synthetic shapes, keypoints"}, "licenses": [], "images": images,
                "annotations": annotations, "categories": [cat]}
        (root / "coco" / "annotations" / f"person_keypoints_{split}.json").write_text(json.dumps(data))
        counts[split] = len(annotations)
    return counts


def write_lvis(root: Path, dets: list[DetImage], class_names: tuple[str, ...]) -> dict:
    (root / "lvis").mkdir(parents=True, exist_ok=True)
    train_images = {c: set() for c in range(len(class_names))}
    for d in dets:
        if d.split == "trainval":
            for o in d.objects:
                train_images[o["category"]].add(d.number)

    def frequency(n: int) -> str:
        return next((tag for limit, tag in LVIS_FREQUENCY if n <= limit), "f")
    cats = [{"id": c + 1, "name": name, "synonyms": [name], "def": f"a {name} shape", "synset": f"{name}.n.01",
             "frequency": frequency(len(train_images[c])), "image_count": len(train_images[c])}
            for c, name in enumerate(class_names)]
    counts = {}
    splits = _coco_style(dets, lambda d, split: {
        "not_exhaustive_category_ids": [], "neg_category_ids": [],
        "coco_url": f"http://images.cocodataset.org/{split}/{d.image_id}.jpg"},
        lambda d, k, o: {"category_id": o["category"] + 1})
    for split, (images, annotations) in splits.items():
        data = {"info": {"description": "mocobench synthetic shapes, LVIS v0.5 format"}, "licenses": [],
                "images": images, "annotations": annotations, "categories": cats}
        (root / "lvis" / f"lvis_v0.5_{split}.json").write_text(json.dumps(data))
        counts[split] = len(annotations)
    return counts


def write_dense_layouts(root: Path, dets: list[DetImage], class_names: tuple[str, ...]) -> dict:
    """Every layout above; returns counts for the manifest."""
    return {"voc_segmentation": write_voc_segmentation(root, dets, class_names),
            "cityscapes": write_cityscapes(root, dets), "coco_keypoints": write_coco_keypoints(root, dets),
            "lvis": write_lvis(root, dets, class_names)}
