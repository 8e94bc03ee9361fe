"""The embedded demo dataset: one small deterministic synthetic image set in every layout the suite reads.

Ten classes of flat light-grey shapes on a flat dark-grey background that differ only by SHAPE. What
varies within a class is chosen so that MoCo can learn it away and a random network cannot:
position, scale and aspect (RandomResizedCrop's job) and the two grey levels (kept in a range that
brightness/contrast jitter spans); a rotation of up to +-25 degrees, which no augmentation removes, keeps
a random-init network's kNN accuracy well below 40 %. Colour, texture and clutter are left out on
purpose: any cue that survives the augmentations becomes the instance cue MoCo learns instead of shape
(docs/demo-data.md has the measurements). The dataset is generated once into a cache dir and written as

  ROOT/imagefolder/{train,val}/<class>/<NNNN>.png          32x32 PNGs, one object
  ROOT/VOCdevkit/VOC2007/                                   128x128 JPEGs with 1-3 objects, VOC2007 devkit
      JPEGImages/<id>.jpg  Annotations/<id>.xml             (VOC XML, 1-based pixel boxes, difficult flags)
      ImageSets/Main/{train,val,trainval,test}.txt and <class>_<split>.txt  (`<id> 1|-1|0`)
  ROOT/coco/annotations/instances_{train,val}.json          the same detection images as COCO json
  ROOT/coco/{train,val}/<id>.jpg                            (trainval -> train, test -> val; polygon masks)
  ROOT/VOCdevkit/VOC2012/, ROOT/cityscapes/, ROOT/lvis/,     the same detection images for semantic segmentation
  ROOT/coco/annotations/person_keypoints_{train,val}.json   (VOC2012 + aug lists, Cityscapes), keypoints and LVIS:
                                                            core/demo_dense.py
  ROOT/manifest.json                                        version, seed, counts, md5 of the file listing

Layouts follow the PASCAL VOC 2007 devkit (Everingham et al., VOCdevkit_08-Jun-2007: per-class files with
1 / -1 / 0 = only difficult) and the COCO instances format (Lin et al. 2014, cocodataset.org/#format-data).

Generation is deterministic (every image is drawn from its own PCG64 stream seeded by (seed, split,
index); PNG/JPEG written with fixed settings and no metadata), so two generations are byte-identical.
A build goes into a temp dir next to ROOT and is renamed into place; if another process finished first,
its copy wins and ours is discarded, so concurrent callers never see a partial dataset.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import shutil
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from mocobench.core.demo_dense import DetImage, write_dense_layouts

VERSION = 3
IMAGES_VERSION = 2  # the pixel streams: v3 only added layouts, so every image (and measured figure) is v2's
SEED = 20191113  # MoCo's arXiv date; any fixed number works
CLASS_NAMES = ("circle", "square", "triangle", "cross", "star", "diamond", "hexagon", "crescent", "arrow",
               "heart")
CLS_SIZE = 32            # ImageFolder image side
CLS_RADIUS = (0.12, 0.40)  # ImageFolder object radius (shape inside the unit disc), as a fraction of the side
MAX_ROTATION = 25.0      # degrees either way
MAX_LOG_ASPECT = 0.2     # aspect exp(U(-0.2, 0.2)): 0.82-1.22, inside RandomResizedCrop's 3/4-4/3
BACKGROUND = (0.0, 40.0)     # flat background grey level (0-255), per image
FOREGROUND = (200.0, 255.0)  # flat object grey level, per object
NOISE = 3.0              # std of the Gaussian pixel noise (grey levels)
CLS_PER_CLASS = {"train": 200, "val": 50}
DET_SIZE = 128           # detection image side
DET_COUNTS = {"trainval": 300, "test": 150}
SUPERSAMPLE = 4          # masks are drawn at 4x and box-filtered down: anti-aliased edges
JPEG_QUALITY = 90
MIN_DET_SIDE = 14        # objects whose box is smaller than this (px) are marked difficult ...
MIN_VISIBLE = 0.5        # ... and so are those with under half of their area visible (occluded/truncated)
MANIFEST = "manifest.json"
OWN_ENTRIES = frozenset({"imagefolder", "VOCdevkit", "coco", "cityscapes", "lvis", MANIFEST})  # everything a build writes at its root


class DemoDataError(RuntimeError):
    """The demo data cache is unusable (names the path and what to do)."""


@dataclass(frozen=True)
class DemoData:
    """Paths of one generated dataset. `voc` is the `VOCdevkit/VOC2007` dir; `coco` holds `annotations/`."""
    root: Path
    imagefolder: Path
    voc: Path
    coco: Path
    class_names: tuple[str, ...]

    @classmethod
    def at(cls, root: Path) -> "DemoData":
        return cls(root=root, imagefolder=root / "imagefolder", voc=root / "VOCdevkit" / "VOC2007",
                   coco=root / "coco", class_names=CLASS_NAMES)


# --- shapes: unit polygons (x right, y down), roughly inside the unit disc -----------------------------
def _regular(n: int, phase: float = -math.pi / 2, r: float = 1.0) -> np.ndarray:
    a = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


def _star() -> np.ndarray:
    outer, inner = _regular(5), _regular(5, -math.pi / 2 + math.pi / 5, 0.42)
    return np.stack([outer, inner], 1).reshape(-1, 2)


def _cross() -> np.ndarray:
    w = 0.32
    q = [(w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w),
         (-w, -1)]
    return np.array(q, float)


def _crescent() -> np.ndarray:
    """Unit disc minus a disc of radius 0.8 centred at (0.45, 0): outer arc, then the inner arc back."""
    r2, cx = 0.8, 0.45
    x = (1 - r2 ** 2 + cx ** 2) / (2 * cx)           # the two circles meet at (x, +-y)
    y = math.sqrt(1 - x * x)
    t0 = math.atan2(y, x)
    outer = np.linspace(t0, 2 * math.pi - t0, 28)
    p0 = math.atan2(-y, x - cx) % (2 * math.pi)      # inner arc runs from (x, -y) back round the left side
    p1 = math.atan2(y, x - cx)
    inner = np.linspace(p0, p1, 20)
    pts = [(math.cos(t), math.sin(t)) for t in outer] + [(cx + r2 * math.cos(p), r2 * math.sin(p)) for p in inner]
    return np.array(pts)


def _arrow() -> np.ndarray:
    return np.array([(1, 0), (0.1, -0.75), (0.1, -0.3), (-1, -0.3), (-1, 0.3), (0.1, 0.3), (0.1, 0.75)], float)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], 1)
    pts -= (pts.max(0) + pts.min(0)) / 2
    return pts / np.abs(pts).max()


SHAPES: dict[str, np.ndarray] = {
    "circle": _regular(48),
    "square": _regular(4, math.pi / 4) * 1.25,      # half-side 0.88
    "triangle": _regular(3, -math.pi / 2) * 1.1,
    "cross": _cross(),
    "star": _star() * 1.1,
    "diamond": _regular(4) * np.array([0.55, 1.05]),  # a rhombus that is not a rotated square
    "hexagon": _regular(6, 0.0),
    "crescent": _crescent(),
    "arrow": _arrow(),
    "heart": _heart(),
}
assert tuple(SHAPES) == CLASS_NAMES


def _place(rng: np.random.Generator, name: str, radius: float, cx: float, cy: float) -> np.ndarray:
    """The class polygon under a random rotation (within MAX_ROTATION) and aspect change (within
    MAX_LOG_ASPECT), scaled by `radius` and centred at (cx, cy), in pixel coords."""
    angle = math.radians(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
    aspect = math.exp(rng.uniform(-MAX_LOG_ASPECT, MAX_LOG_ASPECT))
    p = SHAPES[name] * np.array([aspect, 1 / aspect])
    c, s = math.cos(angle), math.sin(angle)
    return p @ np.array([[c, s], [-s, c]]) * radius + np.array([cx, cy])


# --- painting ------------------------------------------------------------------------------------------
def _mask(polygon: np.ndarray, size: int) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Anti-aliased coverage in [0, 1] of a polygon (pixel coords, pixel i spans [i, i+1)) over the
    polygon's bounding box within the image: (crop, (rows, cols)). Drawn at SUPERSAMPLE x resolution."""
    lo, hi = polygon.min(0), polygon.max(0)
    x0, y0 = (min(max(math.floor(v), 0), size - 1) for v in lo)
    x1, y1 = (min(max(math.ceil(v), start + 1), size) for v, start in zip(hi, (x0, y0)))
    big = Image.new("L", ((x1 - x0) * SUPERSAMPLE, (y1 - y0) * SUPERSAMPLE), 0)
    local = (polygon - np.array([x0, y0])) * SUPERSAMPLE
    ImageDraw.Draw(big).polygon([tuple(v) for v in local.tolist()], fill=255)
    crop = np.asarray(big.resize((x1 - x0, y1 - y0), Image.Resampling.BOX), np.float32) * (1 / 255)
    return crop, (slice(y0, y1), slice(x0, x1))


def _canvas(rng: np.random.Generator, size: int) -> np.ndarray:
    """A flat background of one grey level drawn from BACKGROUND (float HxWx3)."""
    return np.full((size, size, 3), rng.uniform(*BACKGROUND), np.float32)


def _paint(rng: np.random.Generator, img: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Composite one flat object of a grey level drawn from FOREGROUND over `img`; returns its coverage."""
    size = img.shape[0]
    m, box = _mask(polygon, size)
    img[box] += (np.float32(rng.uniform(*FOREGROUND)) - img[box]) * m[..., None]
    full = np.zeros((size, size), np.float32)
    full[box] = m
    return full


def _finish(rng: np.random.Generator, img: np.ndarray) -> Image.Image:
    img = img + NOISE * rng.standard_normal(img.shape, dtype=np.float32)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([SEED, IMAGES_VERSION, *key])


def classification_image(split: str, cls: int, index: int) -> Image.Image:
    """One CLS_SIZE x CLS_SIZE ImageFolder image: one object of class `cls`, fully inside the frame."""
    rng = _rng(0, ("train", "val").index(split), cls, index)
    img = _canvas(rng, CLS_SIZE)
    r = CLS_SIZE * rng.uniform(*CLS_RADIUS)
    cx, cy = rng.uniform(r, CLS_SIZE - r, 2)
    _paint(rng, img, _place(rng, CLASS_NAMES[cls], r, cx, cy))
    return _finish(rng, img)


# --- detection images ----------------------------------------------------------------------------------
def _clip(polygon: np.ndarray, size: int) -> np.ndarray:
    """Sutherland-Hodgman clip of a polygon to the image square [0, size]^2 (the region is convex)."""
    pts = [tuple(p) for p in polygon]
    for axis, bound, keep_low in ((0, 0.0, False), (0, float(size), True), (1, 0.0, False),
                                  (1, float(size), True)):
        inside = (lambda q: q[axis] <= bound) if keep_low else (lambda q: q[axis] >= bound)
        out = []
        for i, cur in enumerate(pts):
            prev = pts[i - 1]
            if inside(cur) != inside(prev):
                t = (bound - prev[axis]) / (cur[axis] - prev[axis])
                out.append(tuple(prev[k] + t * (cur[k] - prev[k]) for k in range(2)))
            if inside(cur):
                out.append(cur)
        pts = out
        if not pts:
            break
    return np.array(pts, float).reshape(-1, 2)


def _area(p: np.ndarray) -> float:
    x, y = p[:, 0], p[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _iou(a: tuple, b: tuple) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def detection_image(split: str, index: int) -> tuple[Image.Image, list[dict]]:
    """One 128x128 image with 1-3 objects of random classes, painted back to front.

    Each object: `name`, `category` (index), `polygon` (clipped to the image, rounded to 0.01 px, a flat
    [x1, y1, ...] list: the outline it was painted with), `bbox` [x0, y0, x1, y1] of that polygon,
    `area` (polygon area), `truncated` (the shape crossed the border) and `difficult` (box side under
    MIN_DET_SIDE px, or under MIN_VISIBLE of its area visible after truncation and occlusion).
    """
    rng = _rng(1, ("trainval", "test").index(split), index)
    img = _canvas(rng, DET_SIZE)
    placed: list[tuple[int, np.ndarray, tuple]] = []
    for _ in range(int(rng.integers(1, 4))):
        cls = int(rng.integers(len(CLASS_NAMES)))
        for _attempt in range(20):  # avoid heavy overlap: keep box IoU with earlier objects below 0.3
            r = DET_SIZE * rng.uniform(0.05, 0.25)
            cx, cy = rng.uniform(0.5 * r, DET_SIZE - 0.5 * r, 2)
            poly = _place(rng, CLASS_NAMES[cls], r, cx, cy)
            box = (*poly.min(0), *poly.max(0))
            if all(_iou(box, b) < 0.3 for _, _, b in placed):
                break
        placed.append((cls, poly, box))
    masks = [_paint(rng, img, poly) >= 0.5 for _, poly, _ in placed]
    objects = []
    for k, (cls, poly, _) in enumerate(placed):
        later = np.zeros_like(masks[k])
        for m in masks[k + 1:]:
            later |= m
        visible = float((masks[k] & ~later).sum()) / max(_area(poly), 1e-6)
        clipped = np.round(_clip(poly, DET_SIZE), 2)
        x0, y0 = clipped.min(0)
        x1, y1 = clipped.max(0)
        truncated = bool(((poly < 0) | (poly > DET_SIZE)).any())
        small = min(x1 - x0, y1 - y0) < MIN_DET_SIDE
        objects.append({
            "name": CLASS_NAMES[cls], "category": cls, "polygon": [float(v) for v in clipped.reshape(-1)],
            "bbox": [float(x0), float(y0), float(x1), float(y1)], "area": round(_area(clipped), 2),
            "truncated": int(truncated), "difficult": int(small or visible < MIN_VISIBLE),
        })
    return _finish(rng, img), objects


def label_map(objects: list[dict], size: int) -> np.ndarray:
    """Index of the object on top at each pixel (-1 = background): each object's (clipped) outline at
    coverage >= 0.5, later objects over earlier ones, as `detection_image` paints them."""
    out = np.full((size, size), -1, np.int16)
    for k, o in enumerate(objects):
        m, box = _mask(np.array(o["polygon"], np.float64).reshape(-1, 2), size)
        out[box][m >= 0.5] = k
    return out


def voc_box(bbox: list[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Continuous [x0, y0, x1, y1] (pixel i spans [i, i+1)) -> VOC's 1-based inclusive pixel box."""
    x0, y0, x1, y1 = bbox
    xmin, ymin = min(int(math.floor(x0)) + 1, width), min(int(math.floor(y0)) + 1, height)
    return xmin, ymin, max(min(int(math.ceil(x1)), width), xmin), max(min(int(math.ceil(y1)), height), ymin)


def write_voc_annotation(path: Path, image_id: str, width: int, height: int, objects: list[dict]) -> None:
    """A standard VOC XML annotation (folder, filename, source, size, segmented, objects with bndbox)."""
    ann = ET.Element("annotation")
    ET.SubElement(ann, "folder").text = "VOC2007"
    ET.SubElement(ann, "filename").text = f"{image_id}.jpg"
    src = ET.SubElement(ann, "source")
    ET.SubElement(src, "database").text = "mocobench synthetic shapes"
    ET.SubElement(src, "annotation").text = f"mocobench demo v{VERSION}"
    size = ET.SubElement(ann, "size")
    for tag, v in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(v)
    ET.SubElement(ann, "segmented").text = "0"
    for o in objects:
        obj = ET.SubElement(ann, "object")
        ET.SubElement(obj, "name").text = o["name"]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = str(o["truncated"])
        ET.SubElement(obj, "difficult").text = str(o["difficult"])
        bnd = ET.SubElement(obj, "bndbox")
        for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), voc_box(o["bbox"], width, height)):
            ET.SubElement(bnd, tag).text = str(v)
    ET.indent(ann, "\t")
    path.write_bytes(ET.tostring(ann, encoding="utf-8") + b"\n")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False)
    return buf.getvalue()


# --- building one dataset ------------------------------------------------------------------------------
def _build(out: Path, progress: bool) -> dict:
    """Write the whole dataset into the empty dir `out`; return the manifest."""
    n_cls = sum(CLS_PER_CLASS.values()) * len(CLASS_NAMES)
    n_det = sum(DET_COUNTS.values())
    bar = tqdm(total=n_cls + n_det, desc="demo data", unit="img", disable=not progress, leave=False)
    counts: dict = {"imagefolder": {}, "detection": {}}
    for split, per_class in CLS_PER_CLASS.items():
        for c, name in enumerate(CLASS_NAMES):
            d = out / "imagefolder" / split / name
            d.mkdir(parents=True)
            for i in range(per_class):
                (d / f"{i:04d}.png").write_bytes(_png(classification_image(split, c, i)))
                bar.update()
        counts["imagefolder"][split] = per_class * len(CLASS_NAMES)

    voc = out / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    coco_splits = {"trainval": "train", "test": "val"}
    for sub in ("annotations", *coco_splits.values()):
        (out / "coco" / sub).mkdir(parents=True)
    ids: dict[str, list[str]] = {}
    per_image: dict[str, list[dict]] = {}
    dets: list[DetImage] = []
    next_id, ann_id = 1, 1
    for split, n in DET_COUNTS.items():
        images, annotations = [], []
        ids[split] = []
        n_obj = n_difficult = 0
        for i in range(n):
            image_id = f"{next_id:06d}"
            img, objects = detection_image(split, i)
            data = _jpeg(img)
            (voc / "JPEGImages" / f"{image_id}.jpg").write_bytes(data)
            (out / "coco" / coco_splits[split] / f"{image_id}.jpg").write_bytes(data)
            write_voc_annotation(voc / "Annotations" / f"{image_id}.xml", image_id, DET_SIZE, DET_SIZE, objects)
            images.append({"id": next_id, "file_name": f"{image_id}.jpg", "width": DET_SIZE, "height": DET_SIZE})
            for o in objects:
                x0, y0, x1, y1 = o["bbox"]
                annotations.append({"id": ann_id, "image_id": next_id, "category_id": o["category"] + 1,
                                    "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)], "area": o["area"],
                                    "iscrowd": 0, "segmentation": [o["polygon"]]})
                ann_id += 1
            ids[split].append(image_id)
            per_image[image_id] = objects
            dets.append(DetImage(image_id, next_id, split, img, objects, label_map(objects, DET_SIZE)))
            n_obj += len(objects)
            n_difficult += sum(o["difficult"] for o in objects)
            next_id += 1
            bar.update()
        coco = {"info": {"description": f"mocobench synthetic shapes v{VERSION}", "version": str(VERSION)},
                "licenses": [], "images": images, "annotations": annotations,
                "categories": [{"id": c + 1, "name": name, "supercategory": "shape"}
                               for c, name in enumerate(CLASS_NAMES)]}
        (out / "coco" / "annotations" / f"instances_{coco_splits[split]}.json").write_text(json.dumps(coco))
        counts["detection"][split] = {"images": n, "objects": n_obj, "difficult": n_difficult}
    bar.close()

    half = len(ids["trainval"]) // 2  # VOC's trainval = train + val; the halves are disjoint
    splits = {"train": ids["trainval"][:half], "val": ids["trainval"][half:], **ids}
    main = voc / "ImageSets" / "Main"
    for split, split_ids in splits.items():
        (main / f"{split}.txt").write_text("".join(f"{i}\n" for i in split_ids))
        for name in CLASS_NAMES:  # 1: a non-difficult object of the class, 0: only difficult ones, -1: none
            lines = []
            for i in split_ids:
                flags = [o["difficult"] for o in per_image[i] if o["name"] == name]
                label = 1 if 0 in flags else (0 if flags else -1)
                lines.append(f"{i} {label:2d}\n")
            (main / f"{name}_{split}.txt").write_text("".join(lines))

    counts["dense"] = write_dense_layouts(out, dets, CLASS_NAMES)
    manifest = {"name": "mocobench-demo", "version": VERSION, "seed": SEED, "class_names": list(CLASS_NAMES),
                "counts": counts, **_listing(out)}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _listing(root: Path) -> dict:
    """md5 of the canonical listing: one `relative/path<TAB>md5` line per file, sorted (manifest excluded)."""
    lines = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            lines.append(f"{p.relative_to(root).as_posix()}\t{hashlib.md5(p.read_bytes()).hexdigest()}\n")
    return {"files": len(lines), "listing_md5": hashlib.md5("".join(lines).encode()).hexdigest()}


def read_manifest(root: str | Path) -> dict | None:
    """The manifest of a finished dataset at `root`, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((Path(root) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def verify(root: str | Path) -> None:
    """Re-hash every file of a finished dataset against its manifest; DemoDataError on any difference."""
    root = Path(root)
    manifest = read_manifest(root)
    if manifest is None:
        raise DemoDataError(f"{root}: no readable {MANIFEST}; not a finished demo dataset")
    now = _listing(root)
    if now != {k: manifest.get(k) for k in now}:
        raise DemoDataError(f"{root}: files differ from {MANIFEST} (manifest {manifest.get('files')} files, "
                            f"md5 {manifest.get('listing_md5')}; found {now['files']} files, md5 "
                            f"{now['listing_md5']}); regenerate with `mocobench data --root {root} --force`")


def _current(manifest: dict | None) -> bool:
    return bool(manifest) and manifest.get("version") == VERSION and manifest.get("seed") == SEED


def default_root() -> Path:
    return Path(os.environ.get("MOCOBENCH_DATA") or Path.home() / ".cache" / "mocobench" / f"demo-v{VERSION}")


def _remove_stale_temps(root: Path, max_age_s: float = 24 * 3600) -> None:
    """Temp dirs of builds killed more than a day ago (live builds are far younger)."""
    for p in root.parent.glob(f".{root.name}.tmp-*"):
        try:
            if time.time() - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def ensure_demo_data(root: str | Path | None = None, force: bool = False, progress: bool | None = None) -> DemoData:
    """Generate the demo dataset at `root` once and return its paths; later calls reuse it at once.

    root: default `$MOCOBENCH_DATA`, else `~/.cache/mocobench/demo-v{VERSION}`. force: rebuild even if present.
    progress: tqdm bar (default: when stderr is a terminal). A dir at `root` holding a demo dataset of
    another version is replaced only with force=True; one holding anything not built here (no manifest, or
    files beside the dataset's own) is never touched.
    """
    root = Path(root).expanduser().absolute() if root is not None else default_root().absolute()
    if not force and _current(read_manifest(root)):
        return DemoData.at(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        found = read_manifest(root)
        if _current(found) and not force:  # another process installed it since the first look
            return DemoData.at(root)
        foreign = sorted(p.name for p in root.iterdir() if p.name not in OWN_ENTRIES) if root.is_dir() else [root.name]
        if found is None or foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise DemoDataError(f"{root} holds files that are not a mocobench demo dataset ({shown or 'no ' + MANIFEST})"
                                f"; expected an empty or new directory: pick another --out / $MOCOBENCH_DATA "
                                "(nothing was changed)")
        if not force:
            raise DemoDataError(f"{root} holds a demo dataset of version {found.get('version')} seed "
                                f"{found.get('seed')}; expected v{VERSION} (seed {SEED}): pass --force to replace "
                                "it, or pick another --out / $MOCOBENCH_DATA")
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _build(tmp, progress=sys.stderr.isatty() if progress is None else progress)
        _install(tmp, root, replace=force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not _current(read_manifest(root)):
        raise DemoDataError(f"{root}: no current {MANIFEST} after generation; another process may be "
                            f"replacing it: retry")
    return DemoData.at(root)


def _install(tmp: Path, root: Path, replace: bool) -> bool:
    """Rename a finished build into place. Returns False (and leaves `tmp` for the caller to delete)
    when another process installed a current dataset first and `replace` is False."""
    if replace and root.exists():
        trash = root.parent / f".{root.name}.tmp-old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(root, trash)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(tmp, root)  # atomic; fails when root is a non-empty dir (someone else finished first)
        return True
    except OSError:
        if _current(read_manifest(root)):
            return False
        raise


def main(argv: list[str] | None = None) -> int:
    """`mocobench data [--out DIR] [--force] [--verify]`."""
    parser = argparse.ArgumentParser(
        prog="mocobench data", description="Generate the embedded synthetic demo dataset (10 shape classes) "
        "as ImageFolder, VOC2007 devkit and COCO json layouts, once, into a cache dir; print its paths.")
    parser.add_argument("--out", "--root", dest="root", default=None, help="dataset dir (default: $MOCOBENCH_DATA "
                        f"or ~/.cache/mocobench/demo-v{VERSION})")
    parser.add_argument("--force", action="store_true", help="replace a demo dataset built here (another version, "
                        "or damaged); a directory holding anything else is never touched")
    parser.add_argument("--verify", action="store_true", help="re-hash every file against manifest.json")
    args = parser.parse_args(argv)
    start = time.time()
    try:
        data = ensure_demo_data(args.root, force=args.force, progress=True)
        if args.verify:
            verify(data.root)
    except DemoDataError as e:
        print(f"mocobench data: error: {e}", file=sys.stderr)
        return 2
    m = read_manifest(data.root)
    det = m["counts"]["detection"]
    print(f"demo data v{m['version']} at {data.root} ({m['files']} files, listing md5 {m['listing_md5'][:12]}, "
          f"{time.time() - start:.1f} s)")
    print(f"  classes      {', '.join(data.class_names)}")
    print(f"  imagefolder  {data.imagefolder}  train {m['counts']['imagefolder']['train']}, "
          f"val {m['counts']['imagefolder']['val']} ({CLS_SIZE}x{CLS_SIZE} PNG)")
    for label, path in (("voc", data.voc), ("coco", data.coco)):
        print(f"  {label:<12} {path}  trainval/train {det['trainval']['images']} images "
              f"({det['trainval']['objects']} objects), test/val {det['test']['images']} images "
              f"({det['test']['objects']} objects)")
    if args.verify:
        print("  verified: every file matches manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
