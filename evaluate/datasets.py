"""Dataset readers for the evaluators, with errors that name the path and what was expected.

* `image_folder(root, split, transform)`: ImageNet-style `root/<split>/<class>/<image>` (torchvision
  ImageFolder). Every split takes its class list from `root/train` so label ids agree across splits.
* `voc2007(root, split, transform)`: a PASCAL VOC2007 devkit (`JPEGImages/`, `Annotations/*.xml`,
  `ImageSets/Main/<split>.txt`). Image labels are an N x C matrix in VISSL's convention
  (vissl `extra_scripts/datasets/create_voc_data_files.py`): 1 = an object of the class is present,
  0 = absent, -1 = only *difficult* objects of the class. When the devkit's per-class files
  `ImageSets/Main/<class>_<split>.txt` (values 1 / -1 / 0 = present / absent / difficult) exist they must
  agree with the annotations.
* `subset(dataset, spec, seed)`: the SimCLR semi-supervised subsets (`1percent.txt` / `10percent.txt`,
  one image file name per line) read from a path, or made deterministically from any ImageFolder
  (`1pct`, `10pct`, or a fraction: class-balanced, as SimCLR's lists are ~1% / 10% of every class).

Every reader checks its input up front (missing split files, empty classes, split lists that name images
that do not exist) and raises `DataError`, never an exception from deep inside a data loader.
"""
from __future__ import annotations

import hashlib
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from mocobench.core import distributed as dist
from mocobench.core.demo_data import ensure_demo_data
from mocobench.core.errors import ConfigError, DataError
from mocobench.core.images import load_rgb_or_error

__all__ = ["DataError", "image_folder", "voc2007", "subset", "read_subset_list", "make_subset_list",
           "write_subset_list", "dataset_root", "VOC_CLASSES", "SUBSET_FRACTIONS"]

# The 20 PASCAL VOC classes in the devkit's (alphabetical) order.
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
SUBSET_FRACTIONS = {"1pct": 0.01, "10pct": 0.10}


def dataset_root(data: str, kind: str) -> Path:
    """`data` is 'demo' (the embedded dataset) or a path. kind: 'imagefolder' (the root holding train/ and
    val/) or 'voc' (the VOC2007 devkit dir)."""
    if data != "demo":
        return Path(data)
    demo = ensure_demo_data()
    if kind == "imagefolder":
        return Path(demo.imagefolder)
    if kind == "voc":
        return Path(demo.voc)
    raise ValueError(f"unknown dataset kind {kind!r}; expected 'imagefolder' or 'voc'")


# --- ImageFolder ----------------------------------------------------------------------------------------
def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


class EvalImageFolder(ImageFolder):
    """torchvision ImageFolder with a fixed class list, items (image, int label), and a fingerprint."""

    def __init__(self, split_dir: Path, classes: list[str], transform=None):
        self._fixed_classes = classes
        super().__init__(str(split_dir), transform=transform, loader=load_rgb_or_error)

    def find_classes(self, directory):
        return list(self._fixed_classes), {c: i for i, c in enumerate(self._fixed_classes)}

    def fingerprint(self) -> str:
        """md5 of the (relative path, label) list: identifies the images a feature cache was made from."""
        h = hashlib.md5()
        for path, label in self.samples:
            h.update(f"{Path(path).relative_to(self.root)}\t{label}\n".encode())
        return h.hexdigest()


def image_folder(root: str | Path, split: str = "train", transform=None) -> EvalImageFolder:
    """`root/<split>/<class>/<image>`; classes (and label ids) come from `root/train` when it exists.

    Raises DataError for a missing split, a split whose classes differ from train's, or an empty class.
    """
    root = Path(root)
    split_dir = root / split
    if not root.is_dir():
        raise DataError(f"dataset root {root} does not exist; expected an ImageFolder layout "
                        f"root/{{train,val}}/<class>/<image>")
    if not split_dir.is_dir():
        have = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DataError(f"split {split!r} not found: {split_dir} is not a directory (subdirectories of {root}: "
                        f"{have or 'none'}); expected root/{split}/<class>/<image>")
    classes = _class_dirs(split_dir)
    if not classes:
        raise DataError(f"{split_dir} has no class subdirectories; expected {split_dir}/<class>/<image>")
    ref_dir = root / "train"
    if split != "train" and ref_dir.is_dir():
        ref = _class_dirs(ref_dir)
        if ref != classes:
            missing, extra = sorted(set(ref) - set(classes)), sorted(set(classes) - set(ref))
            raise DataError(f"{split_dir}: classes differ from {ref_dir} (missing {missing[:5]}, extra {extra[:5]}); "
                            "every split must have the same class folders so label ids agree")
        classes = ref
    for c in classes:
        d = split_dir / c
        if d.is_dir() and not any(has_file_allowed_extension(f.name, IMG_EXTENSIONS) for f in d.iterdir()):
            raise DataError(f"empty class: {d} has no images with extensions {', '.join(IMG_EXTENSIONS)}")
    return EvalImageFolder(split_dir, classes, transform)


# --- VOC2007 devkit -------------------------------------------------------------------------------------
def _voc_dir(root: Path) -> Path:
    """Accept the devkit dir itself (holding JPEGImages/) or a VOCdevkit/ parent holding VOC2007/."""
    for cand in (root, root / "VOC2007", root / "VOCdevkit" / "VOC2007"):
        if (cand / "JPEGImages").is_dir():
            return cand
    raise DataError(f"{root} is not a VOC2007 devkit: expected {root}/JPEGImages/, {root}/Annotations/ and "
                    f"{root}/ImageSets/Main/<split>.txt (or the same under {root}/VOC2007/)")


def _read_ids(path: Path) -> list[str]:
    if not path.is_file():
        have = sorted(p.name for p in path.parent.glob("*.txt") if "_" not in p.name) if path.parent.is_dir() else []
        raise DataError(f"missing split file {path}; expected one image id per line (split files found: {have or 'none'})")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"split file {path} is empty; expected one image id per line")
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"split file {path} lists image id {dup!r} more than once")
    return ids


def _parse_objects(xml_path: Path) -> list[tuple[str, bool]]:
    """(class name, difficult) of every <object> in a VOC annotation file."""
    if not xml_path.is_file():
        raise DataError(f"missing annotation {xml_path} for an image listed in the split file")
    try:
        tree = ET.parse(xml_path)
    except ET.ParseError as e:
        raise DataError(f"annotation {xml_path} is not valid XML: {e}") from None
    objects = []
    for obj in tree.getroot().iter("object"):
        name = obj.findtext("name")
        if name is None:
            raise DataError(f"annotation {xml_path}: an <object> has no <name>")
        objects.append((name.strip(), (obj.findtext("difficult") or "0").strip() == "1"))
    return objects


def _per_class_classes(main: Path, split: str) -> list[str]:
    suffix = f"_{split}.txt"
    return sorted(p.name[: -len(suffix)] for p in main.glob(f"*{suffix}"))


class VOC2007(torch.utils.data.Dataset):
    """VOC2007 images with image-level labels (N x C int8 in {1, 0, -1}); items (image, label vector)."""

    def __init__(self, voc_dir: Path, split: str, ids: list[str], labels: np.ndarray, class_names: list[str],
                 transform=None):
        self.root, self.split, self.ids, self.labels = voc_dir, split, ids, labels
        self.class_names, self.transform = list(class_names), transform

    @property
    def classes(self) -> list[str]:
        return self.class_names

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, i: int) -> Path:
        return self.root / "JPEGImages" / f"{self.ids[i]}.jpg"

    def __getitem__(self, i: int):
        img = load_rgb_or_error(self.image_path(i))
        if self.transform is not None:
            img = self.transform(img)
        return img, torch.from_numpy(self.labels[i].astype(np.int64))

    def fingerprint(self) -> str:
        h = hashlib.md5(" ".join(self.class_names).encode())
        for img_id, row in zip(self.ids, self.labels):
            h.update(f"{img_id}\t{row.tobytes().hex()}\n".encode())
        return h.hexdigest()


def voc2007(root: str | Path, split: str = "trainval", transform=None,
            class_names: list[str] | None = None) -> VOC2007:
    """Read a VOC2007 devkit split into (image, label) items; labels N x C in {1 present, 0 absent, -1 difficult}.

    Class order: `class_names` if given, else the devkit's per-class files `<class>_<split>.txt`, else the
    standard 20 VOC classes when every annotated name is one of them, else the sorted annotated names.
    """
    voc = _voc_dir(Path(root))
    main = voc / "ImageSets" / "Main"
    ids = _read_ids(main / f"{split}.txt")
    missing = [i for i in ids if not (voc / "JPEGImages" / f"{i}.jpg").is_file()]
    if missing:
        raise DataError(f"{main / f'{split}.txt'} lists {len(missing)} image(s) with no file in {voc / 'JPEGImages'} "
                        f"(e.g. {missing[0]}.jpg); the split file does not match the images")
    objects = {i: _parse_objects(voc / "Annotations" / f"{i}.xml") for i in ids}
    names_seen = sorted({name for objs in objects.values() for name, _ in objs})
    per_class = _per_class_classes(main, split)
    if class_names is None:
        if per_class:
            class_names = per_class
        elif set(names_seen) <= set(VOC_CLASSES):
            class_names = list(VOC_CLASSES)
        else:
            class_names = names_seen
    unknown = sorted(set(names_seen) - set(class_names))
    if unknown:
        raise DataError(f"annotations in {voc / 'Annotations'} name classes {unknown} that are not among the "
                        f"{len(class_names)} classes {class_names}")
    col = {c: j for j, c in enumerate(class_names)}
    labels = np.zeros((len(ids), len(class_names)), dtype=np.int8)
    for r, i in enumerate(ids):
        for name, difficult in objects[i]:
            j = col[name]
            if not difficult:
                labels[r, j] = 1
            elif labels[r, j] == 0:
                labels[r, j] = -1
    for c in per_class:
        if c in col:
            _check_per_class_file(main / f"{c}_{split}.txt", ids, labels[:, col[c]])
    return VOC2007(voc, split, ids, labels, class_names, transform)


def _check_per_class_file(path: Path, ids: list[str], column: np.ndarray) -> None:
    """The devkit's `<class>_<split>.txt` (1 present / -1 absent / 0 difficult) must match the annotations."""
    devkit_to_vissl = {1: 1, -1: 0, 0: -1}
    values = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("1", "-1", "0"):
            raise DataError(f"{path}:{n}: expected '<image id> <1|-1|0>', got {line!r}")
        values[parts[0]] = devkit_to_vissl[int(parts[1])]
    if set(values) != set(ids):
        raise DataError(f"{path} lists {len(values)} image ids but the split file lists {len(ids)}; "
                        "the per-class label file does not match the split")
    for img_id, v in zip(ids, column):
        if values[img_id] != v:
            raise DataError(f"{path}: image {img_id} has label {v} from its annotation (1 present, 0 absent, "
                            f"-1 difficult) but {values[img_id]} in the per-class file")


# --- semi-supervised subsets ----------------------------------------------------------------------------
class SubsetDataset(torch.utils.data.Subset):
    """A Subset that keeps `classes`, `samples`, `targets` and the chosen file names."""

    def __init__(self, dataset: ImageFolder, indices: list[int]):
        super().__init__(dataset, indices)
        self.classes = dataset.classes
        self.samples = [dataset.samples[i] for i in indices]
        self.targets = [label for _, label in self.samples]
        self.names = [Path(p).name for p, _ in self.samples]

    def fingerprint(self) -> str:
        return hashlib.md5("\n".join(f"{p}\t{t}" for p, t in self.samples).encode()).hexdigest()


def read_subset_list(path: str | Path) -> list[str]:
    """Image file names, one per line (SimCLR's `1percent.txt` format, e.g. `n01440764_10026.JPEG`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"subset list {path} not found; expected a text file with one image file name per line "
                        "(e.g. SimCLR's 1percent.txt)")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"subset list {path} is empty; expected one image file name per line")
    return names


def make_subset_list(dataset: ImageFolder, fraction: float, seed: int = 0) -> list[str]:
    """A class-balanced subset: from each class, round(fraction * n_c) images (at least 1), drawn by a
    seeded permutation of the class's sorted file names. Same dataset + fraction + seed -> same list."""
    if not 0 < fraction <= 1:
        raise ValueError(f"subset fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[str]] = {}
    for path, label in dataset.samples:
        by_class.setdefault(label, []).append(f"{Path(path).parent.name}/{Path(path).name}")  # names can repeat across classes
    chosen = []
    for label in sorted(by_class):
        names = sorted(by_class[label])
        k = max(1, int(math.floor(fraction * len(names) + 0.5)))
        chosen += [names[i] for i in sorted(rng.permutation(len(names))[:k])]
    return chosen


def write_subset_list(names: list[str], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(names) + "\n")
    return path


def subset(dataset: ImageFolder, spec: str | Path, seed: int = 0) -> SubsetDataset:
    """The images of `dataset` named by `spec`: a subset-list file, or '1pct' / '10pct' / a fraction like
    '0.05' to make a class-balanced subset deterministically (see `make_subset_list`).

    A list entry may be a bare file name or `<class>/<file>`; an entry matching no image is a DataError.
    """
    spec_s = str(spec)
    fraction = SUBSET_FRACTIONS.get(spec_s)
    if fraction is None:
        try:
            fraction = float(spec_s)
        except ValueError:
            fraction = None
    if fraction is not None:
        names, source = make_subset_list(dataset, fraction, seed), f"a {fraction:g} subset"
    else:
        names, source = read_subset_list(spec_s), spec_s
    index: dict[str, list[int]] = {}
    for i, (path, _) in enumerate(dataset.samples):
        p = Path(path)
        index.setdefault(p.name, []).append(i)
        index.setdefault(f"{p.parent.name}/{p.name}", []).append(i)
    indices, unknown, ambiguous = [], [], []
    for name in names:
        hits = index.get(name, [])
        if not hits:
            unknown.append(name)
        elif len(hits) > 1:
            ambiguous.append(name)
        else:
            indices.append(hits[0])
    root = getattr(dataset, "root", "the dataset")
    if unknown:
        raise DataError(f"subset list {source}: {len(unknown)} of {len(names)} names match no image under {root} "
                        f"(e.g. {unknown[:3]}); the list does not match the images")
    if ambiguous:
        raise DataError(f"subset list {source}: names {ambiguous[:3]} match several images under {root}; "
                        "write them as <class>/<file>")
    if len(set(indices)) != len(indices):
        raise DataError(f"subset list {source} names the same image more than once")
    return SubsetDataset(dataset, sorted(indices))


def distributed_loaders(train_ds, val_ds, batch_size: int, workers: int, seed: int, device,
                        drop_last: bool = False):
    """(train loader, its DistributedSampler, val loader) for this rank; `batch_size` is global.

    Train: a seeded DistributedSampler shard (call `sampler.set_epoch`). Val: an unpadded strided shard, so
    summing correct counts over ranks gives exact accuracy (DistributedSampler would pad with repeats).
    """
    world, rank = dist.world_size(), dist.rank()
    if batch_size % world:
        raise ConfigError(f"batch_size={batch_size} must be divisible by the number of processes {world}")
    per_rank = batch_size // world
    pin = device.type == "cuda"
    sampler = torch.utils.data.DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    train_loader = torch.utils.data.DataLoader(train_ds, batch_size=per_rank, sampler=sampler, num_workers=workers,
                                               pin_memory=pin, drop_last=drop_last)
    val_shard = torch.utils.data.Subset(val_ds, range(rank, len(val_ds), world))
    val_loader = torch.utils.data.DataLoader(val_shard, batch_size=per_rank, shuffle=False, num_workers=workers,
                                             pin_memory=pin)
    return train_loader, sampler, val_loader
