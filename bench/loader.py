"""`mocobench bench loader`: images/s per data-loader worker of the MoCo v2 augmentation (aug+, two crops),
the official PIL / torchvision-v1 pipeline (`pretrain/augment.py`) against the project's tensor pipeline
(`pretrain/fast_augment.py`: torchvision.io decode + ops on uint8/float tensors).

One worker = one process with one thread (what a DataLoader worker gets), so both sides run in this
process with `torch.set_num_threads(1)`, interleaved round by round. Each item is a full sample: read and
decode the file, then two augmented 224 px views, normalised float32 tensors. The run also prints the
per-channel mean/std of both pipelines' outputs as a same-distribution check.

    mocobench bench loader                 # 64 synthetic ImageNet-sized JPEGs (500x375 etc.), 5 rounds
    mocobench bench loader --quick         # 16 images, 3 rounds
    mocobench bench loader --data DIR      # your own images (any folder tree of JPEG/PNG files)
"""
from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mocobench.bench.timing import emit, interleaved, median, paired_ratio, rate
from mocobench.core.images import decode_rgb, load_rgb
from mocobench.core.transforms import IMAGENET_STD
from mocobench.pretrain.augment import TwoCropsTransform, moco_augmentation
from mocobench.pretrain.fast_augment import TensorMocoAugmentation, reference_apply

TARGET_RATIO = 1.5
# typical ImageNet train sizes (the median image is about 500x375)
SIZES = [(500, 375), (375, 500), (500, 333), (500, 400), (400, 300), (640, 480)]
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def make_images(out: Path, n: int, seed: int = 0) -> list[Path]:
    """Deterministic natural-looking JPEGs (smooth random colour fields + texture noise) of ImageNet sizes."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        field = rng.normal(size=(h // 16 + 1, w // 16 + 1, 3)).cumsum(0).cumsum(1)
        field = (field - field.min()) / max(np.ptp(field), 1e-6) * 255
        img = Image.fromarray(field.astype(np.uint8)).resize((w, h), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 10, (h, w, 3))
        path = out / f"img_{i:04d}.jpg"
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def find_images(root: Path, limit: int) -> list[Path]:
    if not root.is_dir():
        raise SystemExit(f"mocobench bench loader: --data {root} is not a directory")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS)[:limit]
    if not paths:
        raise SystemExit(f"mocobench bench loader: no images ({', '.join(sorted(IMAGE_EXTS))}) under {root}")
    return paths


class ChannelStats:
    """Running per-channel mean and std of augmented views."""

    def __init__(self):
        self.n, self.s, self.s2 = 0, torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)

    def add(self, views) -> None:
        for v in views:
            v = v.double().flatten(1)
            self.n += v.shape[1]
            self.s += v.sum(1)
            self.s2 += (v * v).sum(1)

    def result(self) -> tuple[list[float], list[float]]:
        mean = self.s / self.n
        std = (self.s2 / self.n - mean ** 2).clamp_min(0).sqrt()
        return [round(float(x), 4) for x in mean], [round(float(x), 4) for x in std]


def paired_difference(paths: list[Path], size: int, views: int = 16) -> dict:
    """Views made by both pipelines from the same image and the same random parameters: mean |diff| and
    mean signed diff in grey levels (0..255), averaged over `views` views."""
    aug = TensorMocoAugmentation(size, aug_plus=True)
    to_grey = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255
    absd, bias = [], []
    for i in range(views):
        p = paths[i % len(paths)]
        img = decode_rgb(p)
        params = aug.sample(img.shape[1], img.shape[2])
        d = (aug.apply(img, params) - reference_apply(load_rgb(str(p)), params, aug)) * to_grey
        absd.append(d.abs().mean().item())
        bias.append(d.mean().item())
    return {"paired_views": views, "paired_mean_abs_diff_grey": round(float(np.mean(absd)), 3),
            "paired_max_view_abs_diff_grey": round(float(np.max(absd)), 3),
            "paired_bias_grey": round(float(np.mean(bias)), 3)}


def run(paths: list[Path], rounds: int, size: int = 224, seed: int = 0) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    random.seed(seed)
    official = TwoCropsTransform(moco_augmentation(size, aug_plus=True))
    project = TwoCropsTransform(TensorMocoAugmentation(size, aug_plus=True))
    stats = {"official": ChannelStats(), "project": ChannelStats()}

    def official_pass() -> int:
        for p in paths:
            stats["official"].add(official(load_rgb(str(p))))
        return len(paths)

    def project_pass() -> int:
        for p in paths:
            stats["project"].add(project(decode_rgb(p)))
        return len(paths)

    official_pass(), project_pass()  # warm-up (file cache, kernels)
    stats = {"official": ChannelStats(), "project": ChannelStats()}
    rates = interleaved({"official": lambda: rate(official_pass), "project": lambda: rate(project_pass)}, rounds)
    off, proj = median(rates["official"]), median(rates["project"])
    ratio = paired_ratio(rates["project"], rates["official"])
    (om, os_), (pm, ps) = stats["official"].result(), stats["project"].result()
    return {"benchmark": "loader", "pipeline": "moco_v2 aug+ two crops", "size": size, "images": len(paths),
            "rounds": rounds, "threads": 1,
            "official_img_s": round(off, 2), "project_img_s": round(proj, 2), "ratio": round(ratio, 3),
            "round_ratios": [round(a / b, 3) for a, b in zip(rates["project"], rates["official"])],
            "target_ratio": TARGET_RATIO, "meets_target": ratio >= TARGET_RATIO,
            "official_mean": om, "official_std": os_, "project_mean": pm, "project_std": ps,
            "max_abs_mean_diff": round(max(abs(a - b) for a, b in zip(om, pm)), 4),
            "max_abs_std_diff": round(max(abs(a - b) for a, b in zip(os_, ps)), 4),
            **paired_difference(paths, size, views=min(16, 2 * len(paths)))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mocobench bench loader", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16 images, 3 rounds")
    parser.add_argument("--data", type=Path, default=None, help="folder of images (default: synthetic JPEGs)")
    parser.add_argument("--images", type=int, default=None, help="images per round (default 64, quick 16)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5, quick 3)")
    parser.add_argument("--size", type=int, default=224, help="crop size")
    args = parser.parse_args(argv)
    n = args.images or (16 if args.quick else 64)
    rounds = args.rounds or (3 if args.quick else 5)
    with tempfile.TemporaryDirectory(prefix="mocobench-loader-") as tmp:
        paths = find_images(args.data, n) if args.data else make_images(Path(tmp), n)
        print(f"loader benchmark: {len(paths)} images, {rounds} interleaved rounds, 1 thread (= one worker), "
              f"MoCo v2 aug+ two {args.size} px crops", flush=True)
        res = run(paths, rounds, args.size)
    print(f"official PIL/torchvision-v1 : {res['official_img_s']:8.2f} img/s per worker")
    print(f"project tensor pipeline     : {res['project_img_s']:8.2f} img/s per worker")
    print(f"ratio (median of rounds)    : {res['ratio']:8.3f}x (target >= {TARGET_RATIO}x: "
          f"{'met' if res['meets_target'] else 'NOT met'})")
    print(f"same parameters, both pipelines: mean |diff| {res['paired_mean_abs_diff_grey']:.2f} grey levels "
          f"(worst view {res['paired_max_view_abs_diff_grey']:.2f}), bias {res['paired_bias_grey']:+.2f}, "
          f"over {res['paired_views']} views")
    print(f"output mean/std official {res['official_mean']} / {res['official_std']}")
    print(f"output mean/std project  {res['project_mean']} / {res['project_std']}")
    emit(res)
    return 0
