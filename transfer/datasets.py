"""Register the recipes' datasets from the standard layouts under a user data root (detectron2's
`datasets/README.md` layout):

  ROOT/VOC2007/{Annotations,JPEGImages,ImageSets/Main/{trainval,test}.txt}   voc_2007_<split>
  ROOT/VOC2012/...                                                           voc_2012_<split>
  ROOT/coco/annotations/instances_{train,val}2017.json, ROOT/coco/{train,val}2017/   coco_2017_<split>
  ROOT/coco/annotations/person_keypoints_{train,val}2017.json                keypoints_coco_2017_<split>
  ROOT/VOC2012/{JPEGImages,SegmentationClass,SegmentationClassAug,ImageSets/Segmentation}   voc_seg_2012_<split>
  ROOT/cityscapes/{leftImg8bit,gtFine}/<split>/<city>/                       cityscapes_fine_{sem,instance}_seg_<split>
  ROOT/lvis/lvis_v0.5_{train,val}.json with images under ROOT/coco/          lvis_v0.5_<split>

Also accepted: the devkit tarball's `ROOT/VOCdevkit/VOC20xx/`, and year-less COCO files
`ROOT/coco/annotations/instances_{train,val}.json` with `ROOT/coco/{train,val}/` (the demo data's layout).

VOC segmentation (`voc_seg_2012_<split>`): `train_aug` is ImageSets/Segmentation/train_aug.txt (or trainaug.txt) with
SegmentationClassAug/ when that list exists (DeepLab's layout), else train.txt with SegmentationClass/ plus
aug.txt with SegmentationClassAug/ (MMSegmentation's `voc12aug`, 1,464 + 9,118 = 10,582 images); other
splits read <split>.txt with SegmentationClass/. Label PNGs hold class indices (0 = background), 255 =
ignore. Classes: background + the 20 VOC classes, or the lines of VOC2012/class_names.txt for other
VOC-format datasets. Cityscapes: semantic labels from `*_gtFine_labelTrainIds.png` (19 classes, made by
cityscapesscripts' createTrainIdLabelImgs.py), instances from `*_gtFine_polygons.json` (8 classes, detectron2's
loader, which needs cityscapesscripts and shapely).

The recipes use detectron2's builtin names; they are re-registered here to point at ROOT, so a run
never depends on $DETECTRON2_DATASETS. VOC class names are the 20 standard ones when every annotated
name is one of them, else the sorted names found in the XML files (for other VOC-format datasets).
"""
from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, load_voc_instances
from detectron2.data.datasets.pascal_voc import CLASS_NAMES as VOC_CLASSES

VOC_NAME = re.compile(r"^voc_(\d{4})_(\w+)$")
COCO_NAME = re.compile(r"^coco_(\d{4})_(\w+)$")
KEYPOINTS_NAME = re.compile(r"^keypoints_coco_(\d{4})_(\w+)$")
VOC_SEG_NAME = re.compile(r"^voc_seg_(\d{4})_(\w+)$")
CITYSCAPES_NAME = re.compile(r"^cityscapes_fine_(sem_seg|instance_seg)_(train|val|test)$")
LVIS_NAME = re.compile(r"^lvis_(v0\.5|v1)_(\w+)$")
IGNORE_LABEL = 255
# cityscapesscripts helpers/labels.py: the 19 trainId classes (semantic) and the 8 with instances
CITYSCAPES_STUFF = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                    "motorcycle", "bicycle")
CITYSCAPES_THINGS = ("person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
COCO_PERSON_KEYPOINTS = 17  # pycocotools' default OKS sigmas are for these


class DatasetLayoutError(FileNotFoundError):
    """A dataset is missing or not in the expected layout; the message names the path and layout."""


def voc_devkit(root: Path, year: str) -> Path:
    """ROOT/VOC<year>, or ROOT/VOCdevkit/VOC<year> as the VOC tarballs extract."""
    candidates = [root / f"VOC{year}", root / "VOCdevkit" / f"VOC{year}"]
    found = next((c for c in candidates if c.is_dir()), None)
    if found is None:
        raise DatasetLayoutError(f"VOC{year} devkit not found under {root}: expected one of "
                                 f"{', '.join(map(str, candidates))} with Annotations/, JPEGImages/, ImageSets/Main/")
    return found


def voc_split_ids(devkit: Path, split: str) -> list[str]:
    path = devkit / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        raise DatasetLayoutError(f"VOC split file {path} not found; expected a VOC devkit "
                                 f"({devkit}/Annotations, JPEGImages, ImageSets/Main/{split}.txt)")
    return path.read_text().split()


def voc_annotated_names(devkit: Path, splits: list[str]) -> set[str]:
    """Every object name in the XML files of the given splits of one devkit."""
    found: set[str] = set()
    for split in splits:
        for image_id in voc_split_ids(devkit, split):
            xml = devkit / "Annotations" / f"{image_id}.xml"
            try:
                root = ET.parse(xml).getroot()
            except (OSError, ET.ParseError) as e:
                raise DatasetLayoutError(f"{xml}: cannot read the VOC annotation ({e})") from None
            found.update(obj.findtext("name") for obj in root.iter("object"))
    return found


def voc_class_names(found: set[str]) -> list[str]:
    """The standard 20 VOC classes when they cover every annotated name, else the sorted names."""
    return list(VOC_CLASSES) if found <= set(VOC_CLASSES) else sorted(found)


def coco_paths(root: Path, year: str, split: str, kind: str = "instances") -> tuple[Path, Path]:
    """(annotation json, image dir): coco/annotations/<kind>_<split><year>.json and coco/<split><year>/,
    else the year-less coco/annotations/<kind>_<split>.json and coco/<split>/ (kind: instances, person_keypoints)."""
    coco = root / "coco"
    for tag in (f"{split}{year}", split):
        json_file, image_root = coco / "annotations" / f"{kind}_{tag}.json", coco / tag
        if json_file.is_file() and image_root.is_dir():
            return json_file, image_root
    raise DatasetLayoutError(f"COCO {kind} {split}{year} not found under {coco}: expected annotations/{kind}_"
                             f"{split}{year}.json with images in {split}{year}/ (or {kind}_{split}.json "
                             f"with {split}/)")


def coco_class_names(json_file: Path) -> list[str]:
    """Category names in id order: load_coco_json maps sorted category ids to contiguous ids."""
    cats = json.loads(json_file.read_text()).get("categories")
    if not cats:
        raise DatasetLayoutError(f"{json_file}: no 'categories' in the COCO json")
    return [c["name"] for c in sorted(cats, key=lambda c: c["id"])]


def keypoint_meta(json_file: Path) -> dict:
    """Keypoint names, flip map (`left_X` <-> `right_X`, COCO's convention) and OKS sigmas of a COCO keypoints
    json's (single) category; sigmas: pycocotools' own for COCO's 17 person keypoints, else the category's
    `oks_sigmas` list (a mocobench extension the demo data writes)."""
    cats = json.loads(json_file.read_text()).get("categories") or []
    if len(cats) != 1 or not cats[0].get("keypoints"):
        raise DatasetLayoutError(f"{json_file}: expected one category with a 'keypoints' list (COCO keypoints "
                                 f"format), got {[c.get('name') for c in cats]}")
    names = list(cats[0]["keypoints"])
    flip = [(n, "right_" + n[5:]) for n in names if n.startswith("left_") and "right_" + n[5:] in names]
    sigmas = cats[0].get("oks_sigmas")
    if sigmas is None and len(names) != COCO_PERSON_KEYPOINTS:
        raise DatasetLayoutError(f"{json_file}: {len(names)} keypoints, not COCO's 17, and no 'oks_sigmas' in the "
                                 f"category: the evaluator needs one OKS sigma per keypoint")
    return {"keypoint_names": names, "keypoint_flip_map": flip, "keypoint_oks_sigmas": list(sigmas or [])}


def voc_seg_items(devkit: Path, split: str) -> list[dict]:
    """(image, label PNG) dicts of one VOC segmentation split (module docstring: train_aug, other splits)."""
    sets = devkit / "ImageSets" / "Segmentation"
    deeplab = next((n for n in ("train_aug", "trainaug") if (sets / f"{n}.txt").is_file()), None)
    if split == "train_aug" and deeplab is None:
        parts = [("train", "SegmentationClass"), ("aug", "SegmentationClassAug")]
    elif split == "train_aug":
        parts = [(deeplab, "SegmentationClassAug")]
    else:
        parts = [(split, "SegmentationClass")]
    items = []
    for list_name, label_dir in parts:
        path = sets / f"{list_name}.txt"
        if not path.is_file():
            raise DatasetLayoutError(f"VOC segmentation list {path} not found; expected {devkit}/ImageSets/"
                                     f"Segmentation/{{train,aug,val}}.txt (or train_aug.txt) with JPEGImages/ "
                                     f"and SegmentationClass[Aug]/")
        # a line is an id, or (some DeepLab lists) "/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png"
        ids = [Path(line.split()[0]).stem for line in path.read_text().splitlines() if line.strip()]
        items += [{"file_name": str(devkit / "JPEGImages" / f"{i}.jpg"),
                   "sem_seg_file_name": str(devkit / label_dir / f"{i}.png")} for i in ids]
    missing = [d["sem_seg_file_name"] for d in items[:1] + items[-1:] if not Path(d["sem_seg_file_name"]).is_file()]
    if missing:
        raise DatasetLayoutError(f"VOC segmentation label {missing[0]} not found (listed in {sets})")
    return items


def voc_seg_classes(devkit: Path) -> list[str]:
    custom = devkit / "class_names.txt"
    if not custom.is_file():
        return ["background", *VOC_CLASSES]
    return [line.strip() for line in custom.read_text().splitlines() if line.strip()]


def cityscapes_dirs(root: Path, split: str) -> tuple[Path, Path]:
    base = root / "cityscapes"
    image_dir, gt_dir = base / "leftImg8bit" / split, base / "gtFine" / split
    if not image_dir.is_dir() or not gt_dir.is_dir():
        raise DatasetLayoutError(f"Cityscapes {split} not found: expected {image_dir}/<city>/*_leftImg8bit.png and "
                                 f"{gt_dir}/<city>/*_gtFine_{{labelIds,instanceIds,labelTrainIds}}.png, *_polygons.json")
    return image_dir, gt_dir


def lvis_paths(root: Path, version: str, split: str) -> tuple[Path, Path]:
    json_file, image_root = root / "lvis" / f"lvis_{version}_{split}.json", root / "coco"
    if not json_file.is_file() or not image_root.is_dir():
        raise DatasetLayoutError(f"LVIS {version} {split} not found: expected {json_file} with the COCO images "
                                 f"under {image_root}/<split folder of each image's coco_url>/")
    return json_file, image_root


def lvis_class_names(json_file: Path) -> list[str]:
    """Category names in id order (LVIS ids are 1..N; detectron2's loader maps id to id - 1)."""
    cats = sorted(json.loads(json_file.read_text())["categories"], key=lambda c: c["id"])
    if [c["id"] for c in cats] != list(range(1, len(cats) + 1)):
        raise DatasetLayoutError(f"{json_file}: LVIS category ids must be 1..{len(cats)}")
    return [(c.get("synonyms") or [c["name"]])[0] for c in cats]


def _replace(name: str) -> None:
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)


def register_datasets(train: list[str], test: list[str], root: str | Path,
                      classes: list[str] | None = None) -> list[str]:
    """Register every dataset name of a recipe from `root`; return the (shared) class names (semantic
    segmentation: its classes, background first).

    `classes` skips reading them from the annotations (workers get them from the launcher).
    Raises DatasetLayoutError for a missing file and ValueError for an unsupported name or for train/test
    sets whose classes differ.
    """
    root = Path(root).expanduser().resolve()
    names = list(dict.fromkeys([*train, *test]))
    families = {"voc": VOC_NAME, "coco": COCO_NAME, "keypoints": KEYPOINTS_NAME, "voc_seg": VOC_SEG_NAME,
                "cityscapes": CITYSCAPES_NAME, "lvis": LVIS_NAME}
    found = {fam: [(n, *rx.match(n).groups()) for n in names if rx.match(n)] for fam, rx in families.items()}
    unknown = sorted(set(names) - {n for items in found.values() for n, *_ in items})
    if unknown:
        raise ValueError(f"unsupported dataset names {unknown}: use voc_<year>_<split>, coco_<year>_<split>, "
                         f"keypoints_coco_<year>_<split>, voc_seg_<year>_<split>, cityscapes_fine_<sem_seg|"
                         f"instance_seg>_<split> or lvis_<v0.5|v1>_<split>")
    used = [fam for fam, items in found.items() if items]
    if len(used) > 1:
        raise ValueError(f"a recipe mixes dataset families ({', '.join(used)}): {names}")

    per_set: dict[str, list[str]] = {}
    voc = found["voc"]
    if voc:
        devkits = {year: voc_devkit(root, year) for _, year, _ in voc}
        for _, year, split in voc:  # fail now, not inside a data loader
            voc_split_ids(devkits[year], split)
        if classes is None:  # one class list for all VOC sets, so that train and test indices agree
            found_names: set[str] = set()
            for _, year, split in voc:
                found_names |= voc_annotated_names(devkits[year], [split])
            if not found_names:
                raise DatasetLayoutError(f"{root}: no annotated objects in {[n for n, *_ in voc]}")
            classes = voc_class_names(found_names)
        for name, year, split in voc:
            devkit = str(devkits[year])
            _replace(name)
            DatasetCatalog.register(name, lambda d=devkit, s=split, c=tuple(classes): load_voc_instances(d, s, c))
            MetadataCatalog.get(name).set(thing_classes=list(classes), dirname=devkit, year=int(year),
                                          split=split, evaluator_type="pascal_voc")
            per_set[name] = list(classes)
    for name, year, split in found["coco"]:
        json_file, image_root = coco_paths(root, year, split)
        names_here = list(classes) if classes is not None else coco_class_names(json_file)
        _replace(name)
        DatasetCatalog.register(name, lambda j=str(json_file), i=str(image_root), n=name: load_coco_json(j, i, n))
        MetadataCatalog.get(name).set(json_file=str(json_file), image_root=str(image_root),
                                      evaluator_type="coco", thing_classes=names_here)
        per_set[name] = names_here
    for name, year, split in found["keypoints"]:
        json_file, image_root = coco_paths(root, year, split, kind="person_keypoints")
        names_here = list(classes) if classes is not None else coco_class_names(json_file)
        meta = keypoint_meta(json_file)
        _replace(name)
        DatasetCatalog.register(name, lambda j=str(json_file), i=str(image_root), n=name: load_coco_json(j, i, n))
        MetadataCatalog.get(name).set(json_file=str(json_file), image_root=str(image_root), evaluator_type="coco",
                                      thing_classes=names_here, **meta)
        per_set[name] = names_here
    for name, year, split in found["voc_seg"]:
        devkit = voc_devkit(root, year)
        voc_seg_items(devkit, split)  # fail now, not inside a data loader
        names_here = list(classes) if classes is not None else voc_seg_classes(devkit)
        _replace(name)
        DatasetCatalog.register(name, lambda d=devkit, s=split: voc_seg_items(d, s))
        MetadataCatalog.get(name).set(stuff_classes=names_here, ignore_label=IGNORE_LABEL, evaluator_type="sem_seg")
        per_set[name] = names_here
    for name, kind, split in found["cityscapes"]:
        image_dir, gt_dir = cityscapes_dirs(root, split)
        _replace(name)
        if kind == "sem_seg":
            from detectron2.data.datasets.cityscapes import load_cityscapes_semantic
            DatasetCatalog.register(name, lambda i=str(image_dir), g=str(gt_dir): load_cityscapes_semantic(i, g))
            MetadataCatalog.get(name).set(image_dir=str(image_dir), gt_dir=str(gt_dir), stuff_classes=list(CITYSCAPES_STUFF),
                                          ignore_label=IGNORE_LABEL, evaluator_type="sem_seg")
            per_set[name] = list(CITYSCAPES_STUFF)
        else:
            from detectron2.data.datasets.cityscapes import load_cityscapes_instances
            DatasetCatalog.register(name, lambda i=str(image_dir), g=str(gt_dir): load_cityscapes_instances(
                i, g, from_json=True, to_polygons=True))
            MetadataCatalog.get(name).set(image_dir=str(image_dir), gt_dir=str(gt_dir),
                                          thing_classes=list(CITYSCAPES_THINGS), evaluator_type="cityscapes_instance")
            per_set[name] = list(CITYSCAPES_THINGS)
    for name, version, split in found["lvis"]:
        json_file, image_root = lvis_paths(root, version, split)
        names_here = list(classes) if classes is not None else lvis_class_names(json_file)
        from detectron2.data.datasets.lvis import load_lvis_json
        _replace(name)  # image_root + the coco_url's split folder: detectron2 joins them as strings
        DatasetCatalog.register(name, lambda j=str(json_file), i=str(image_root) + "/": load_lvis_json(j, i))
        MetadataCatalog.get(name).set(json_file=str(json_file), image_root=str(image_root), evaluator_type="lvis",
                                      thing_classes=names_here)
        per_set[name] = names_here

    distinct = {tuple(c) for c in per_set.values()}
    if len(distinct) != 1:
        raise ValueError(f"train and test datasets have different classes: {per_set}")
    return list(distinct.pop())
