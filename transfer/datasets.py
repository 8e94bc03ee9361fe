"""Register the recipes' datasets from the standard layouts under a user data root (detectron2's
`datasets/README.md` layout):

  ROOT/VOC2007/{Annotations,JPEGImages,ImageSets/Main/{trainval,test}.txt}   voc_2007_<split>
  ROOT/VOC2012/...                                                           voc_2012_<split>
  ROOT/coco/annotations/instances_{train,val}2017.json, ROOT/coco/{train,val}2017/   coco_2017_<split>

Also accepted: the devkit tarball's `ROOT/VOCdevkit/VOC2007/`, and year-less COCO files
`ROOT/coco/annotations/instances_{train,val}.json` with `ROOT/coco/{train,val}/` (the demo data's layout).

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


def coco_paths(root: Path, year: str, split: str) -> tuple[Path, Path]:
    """(annotation json, image dir): coco/annotations/instances_<split><year>.json and coco/<split><year>/,
    else the year-less coco/annotations/instances_<split>.json and coco/<split>/."""
    coco = root / "coco"
    for tag in (f"{split}{year}", split):
        json_file, image_root = coco / "annotations" / f"instances_{tag}.json", coco / tag
        if json_file.is_file() and image_root.is_dir():
            return json_file, image_root
    raise DatasetLayoutError(f"COCO {split}{year} not found under {coco}: expected annotations/instances_"
                             f"{split}{year}.json with images in {split}{year}/ (or instances_{split}.json "
                             f"with {split}/)")


def coco_class_names(json_file: Path) -> list[str]:
    """Category names in id order: load_coco_json maps sorted category ids to contiguous ids."""
    cats = json.loads(json_file.read_text()).get("categories")
    if not cats:
        raise DatasetLayoutError(f"{json_file}: no 'categories' in the COCO json")
    return [c["name"] for c in sorted(cats, key=lambda c: c["id"])]


def _replace(name: str) -> None:
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def register_datasets(train: list[str], test: list[str], root: str | Path,
                      classes: list[str] | None = None) -> list[str]:
    """Register every dataset name of a recipe from `root`; return the (shared) class names.

    `classes` skips reading them from the annotations (workers get them from the launcher).
    Raises DatasetLayoutError for a missing file and ValueError for an unsupported name or for train/test
    sets whose classes differ.
    """
    root = Path(root).expanduser().resolve()
    names = list(dict.fromkeys([*train, *test]))
    voc = [(n, *VOC_NAME.match(n).groups()) for n in names if VOC_NAME.match(n)]
    coco = [(n, *COCO_NAME.match(n).groups()) for n in names if COCO_NAME.match(n)]
    unknown = sorted(set(names) - {n for n, *_ in voc + coco})
    if unknown:
        raise ValueError(f"unsupported dataset names {unknown}: use voc_<year>_<split> or coco_<year>_<split>")
    if voc and coco:
        raise ValueError(f"a recipe mixes VOC and COCO datasets: {names}")

    per_set: dict[str, list[str]] = {}
    if voc:
        devkits = {year: voc_devkit(root, year) for _, year, _ in voc}
        for _, year, split in voc:  # fail now, not inside a data loader
            voc_split_ids(devkits[year], split)
        if classes is None:  # one class list for all VOC sets, so that train and test indices agree
            found: set[str] = set()
            for _, year, split in voc:
                found |= voc_annotated_names(devkits[year], [split])
            if not found:
                raise DatasetLayoutError(f"{root}: no annotated objects in {[n for n, *_ in voc]}")
            classes = voc_class_names(found)
        for name, year, split in voc:
            devkit = str(devkits[year])
            _replace(name)
            DatasetCatalog.register(name, lambda d=devkit, s=split, c=tuple(classes): load_voc_instances(d, s, c))
            MetadataCatalog.get(name).set(thing_classes=list(classes), dirname=devkit, year=int(year),
                                          split=split, evaluator_type="pascal_voc")
            per_set[name] = list(classes)
    for name, year, split in coco:
        json_file, image_root = coco_paths(root, year, split)
        names_here = list(classes) if classes is not None else coco_class_names(json_file)
        _replace(name)
        DatasetCatalog.register(name, lambda j=str(json_file), i=str(image_root), n=name: load_coco_json(j, i, n))
        MetadataCatalog.get(name).set(json_file=str(json_file), image_root=str(image_root),
                                      evaluator_type="coco", thing_classes=names_here)
        per_set[name] = names_here

    distinct = {tuple(c) for c in per_set.values()}
    if len(distinct) != 1:
        raise ValueError(f"train and test datasets have different classes: {per_set}")
    return list(distinct.pop())
