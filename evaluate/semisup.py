"""Semi-supervised ImageNet classification: fine-tune the WHOLE pretrained network on 1% or 10% of the
labels, the MMSelfSup benchmark (configs/benchmarks/classification/imagenet/imagenet_{1,10}percent/
resnet50_head{1,10,100}_4xb64-steplr{1e-1,1e-2,1e-3}-20e_in1k-{1,10}pct.py).

Protocol (defaults are the published values):
  data     the SimCLR subsets of ImageNet train (Chen et al. 2020, `1percent.txt` / `10percent.txt`: one
           file name per line, e.g. `n01440764_10026.JPEG`), read from `--subset-list`; without a list the
           subset is made deterministically from the ImageFolder (class-balanced, seeded; see
           `mocobench.evaluate.datasets.make_subset_list`) -- a stand-in with the same size, not the published list.
  model    torchvision ResNet with the checkpoint's backbone, new fc (2048 -> classes) ~ N(0, 0.01), bias 0
           (MMSelfSup ClsHead init); BN layers train (SyncBN across GPUs in DDP on CUDA, as the configs).
  train    RandomResizedCrop(224) + horizontal flip; val Resize(256) + CenterCrop(224).
  optim    SGD momentum 0.9, weight decay 5e-4 (1%) / 1e-4 (10%) on every parameter, global batch 256
           (4 GPUs x 64), 20 epochs, lr x0.2 at epochs 12 and 16.
  grid     lr in {0.1, 0.01, 0.001} x head lr multiplier in {1, 10, 100} (the fc's lr = lr x mult):
           nine independent runs; top-1/top-5 on ImageNet val after the last epoch of each.
Metrics: `grid/lr{lr}_head{mult}/top1|top5` for every cell and `top1`/`top5` of the best cell by top-1
(the published tables report the best cell; it is selected on val, as they do).

Each finished cell is stored in OUT/cells/<cell>.json and a running cell checkpoints every epoch, so an
interrupted grid resumes where it stopped. `--lrs` / `--head-mults` run part of the grid (e.g. one cell
per Slurm job); `--amp` (bf16 autocast + channels_last) is a fast path, not the fp32 reference.

    mocobench eval semisup --checkpoint CKPT --data /datasets/imagenet --subset 1pct \\
        --subset-list 1percent.txt --out runs/semisup1
    mocobench eval semisup --config demo --checkpoint CKPT --out runs/semisup-demo
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn
from torchvision import transforms
from tqdm import tqdm

from mocobench.checkpoints.models import model_from_checkpoint
from mocobench.checkpoints.safe_load import safe_load
from mocobench.core import distributed as dist
from mocobench.core.atomic import atomic_save
from mocobench.core.config import option
from mocobench.core.errors import ConfigError
from mocobench.core.records import now_iso
from mocobench.core.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from mocobench.evaluate import datasets
from mocobench.evaluate.linear import topk_correct
from mocobench.evaluate.protocols import Protocol
from mocobench.evaluate.report import check_checkpoint, claim_out, report

WEIGHT_DECAY = {"1pct": 5e-4, "10pct": 1e-4}  # MMSelfSup imagenet_1percent / imagenet_10percent configs


NAMED_PROTOCOLS = (  # evaluate/protocols.py; 1% / 10% (and SimCLR list vs stand-in) are told by the benchmark name
    Protocol("semisup/mmselfsup", 1, {"epochs": 20, "lrs": [0.1, 0.01, 0.001], "head_mults": [1, 10, 100],
                                      "schedule": [12, 16], "gamma": 0.2, "momentum": 0.9, "batch_size": 256},
             "MMSelfSup configs/benchmarks/classification/imagenet/imagenet_1percent/, imagenet_10percent/"),
)


@dataclass
class SemisupConfig:
    """Semi-supervised fine-tuning; defaults are MMSelfSup's published recipe."""
    checkpoint: str = option("", "checkpoint path (any format `mocobench inspect` reads) or random:ARCH[:WIDTH]")
    data: str = option("demo", "'demo' (embedded dataset) or an ImageFolder root holding train/ and val/")
    out: str = option("runs/semisup", "run directory: metrics.json, per-cell results and checkpoints")
    subset: str = option("1pct", "1pct | 10pct: which SimCLR subset (sets the weight decay and, without a list, the size)")
    subset_list: str = option("", "SimCLR list file (1percent.txt / 10percent.txt); empty = make the subset from the data")
    stand_in_subset: bool = option(False, "on ImageNet-sized data (>= 100k images or 1000 classes) allow a subset "
                                          "made from the data instead of --subset-list (not comparable with "
                                          "published numbers)")
    train_split: str = option("train", "split the subset is taken from")
    val_split: str = option("val", "evaluation split")
    epochs: int = option(20, "epochs per grid cell", at_least=1)
    batch_size: int = option(256, "global batch size over all ranks", at_least=1)
    lrs: list[float] = option(None, "backbone learning rates of the grid (default [0.1, 0.01, 0.001])", above=0)
    head_mults: list[float] = option(None, "fc lr multipliers of the grid (default [1, 10, 100])", above=0)
    schedule: list[int] = option(None, "epochs where lr drops (default [12, 16])", at_least=0)
    gamma: float = option(0.2, "lr factor at each schedule step", above=0)
    momentum: float = option(0.9, "SGD momentum", at_least=0, below=1)
    weight_decay: Optional[float] = option(None, "weight decay (default 5e-4 for 1pct, 1e-4 for 10pct)", at_least=0)
    image_size: int = option(224, "train RandomResizedCrop size", at_least=8)
    resize: int = option(256, "val Resize (shorter side)", at_least=8)
    crop: int = option(224, "val CenterCrop size", at_least=8)
    workers: int = option(8, "data loader workers per rank", at_least=0)
    amp: bool = option(False, "bf16/fp16 autocast + channels_last (fast path; the reference is fp32)")
    seed: int = option(0, "seed of the subset (when made from the data), fc init and data order")
    steps_per_epoch: int = option(0, "cap on train steps per epoch (0 = full epoch); for smoke tests", at_least=0)
    print_freq: int = option(20, "log every N steps", at_least=1)
    resume: bool = option(True, "reuse finished cells and the running cell's checkpoint in OUT")
    dist_backend: str = option("auto", "nccl on GPU, gloo on CPU")
    force: bool = option(False, "start afresh when --out holds another run: move the old folder aside to OUT.replaced-<time>")

    def __post_init__(self):
        self.lrs = [0.1, 0.01, 0.001] if self.lrs is None else self.lrs
        self.head_mults = [1.0, 10.0, 100.0] if self.head_mults is None else self.head_mults
        self.schedule = [12, 16] if self.schedule is None else self.schedule


def resolve(cfg: SemisupConfig) -> SemisupConfig:
    """Check the config and fill the subset's weight decay."""
    if cfg.subset not in WEIGHT_DECAY:
        raise ConfigError(f"subset must be one of {', '.join(WEIGHT_DECAY)} (got {cfg.subset!r}); "
                          "give the official file with --subset-list")
    if not cfg.checkpoint:
        raise ConfigError("give --checkpoint (a checkpoint path or random:ARCH[:WIDTH])")
    if not cfg.lrs or not cfg.head_mults:
        raise ConfigError("the grid is empty: give at least one value in --lrs and --head-mults")
    if cfg.weight_decay is None:
        cfg.weight_decay = WEIGHT_DECAY[cfg.subset]
    return cfg


def cell_name(lr: float, mult: float) -> str:
    """`lr0.1_head10`: the grid-cell part of the metric names."""
    return f"lr{lr:g}_head{mult:g}"


def grid_cells(cfg: SemisupConfig) -> list[tuple[float, float]]:
    """The (lr, head multiplier) pairs of the grid, lr-major."""
    return list(itertools.product(cfg.lrs, cfg.head_mults))


def lr_factor(cfg: SemisupConfig, epoch: int) -> float:
    """MultiStepLR: gamma ** (number of milestones reached)."""
    return cfg.gamma ** sum(epoch >= m for m in cfg.schedule)


# --- data -----------------------------------------------------------------------------------------------
def train_transform(size: int):
    return transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def build_datasets(cfg: SemisupConfig):
    """(labelled subset of the train split, val split)."""
    root = datasets.dataset_root(cfg.data, "imagefolder")
    train = datasets.image_folder(root, cfg.train_split, train_transform(cfg.image_size))
    val = datasets.image_folder(root, cfg.val_split, eval_transform(cfg.resize, cfg.crop))
    if not cfg.subset_list and (len(train) >= IMAGENET_SIZED[0] or len(train.classes) >= IMAGENET_SIZED[1]) \
            and not cfg.stand_in_subset:
        raise ConfigError(f"{root}: {len(train)} images in {len(train.classes)} classes and no --subset-list; the "
                          "published 1%/10% numbers use SimCLR's 1percent.txt / 10percent.txt (google-research/"
                          "simclr, imagenet_subsets/; one file name per line): pass --subset-list FILE, or "
                          "--stand-in-subset for a subset drawn from the data (not comparable)")
    labelled = datasets.subset(train, cfg.subset_list or cfg.subset, seed=cfg.seed)
    return labelled, val


IMAGENET_SIZED = (100_000, 1000)  # (images, classes) from which a stand-in subset needs --stand-in-subset


# --- model and optimiser --------------------------------------------------------------------------------
def build_classifier(checkpoint: str, num_classes: int, seed: int) -> nn.Module:
    """The checkpoint's backbone + a new fc ~ N(0, 0.01), bias 0; every parameter trainable, BN in train mode."""
    torch.manual_seed(seed)  # random:ARCH baselines and the fc init
    model, _ = model_from_checkpoint(checkpoint, num_classes=num_classes)
    nn.init.normal_(model.fc.weight, mean=0.0, std=0.01)
    nn.init.zeros_(model.fc.bias)
    return model.requires_grad_(True).train()


def make_optimizer(model: nn.Module, lr: float, head_mult: float, cfg: SemisupConfig) -> torch.optim.SGD:
    """Two groups: backbone at lr, fc ('head' in MMSelfSup) at lr x head_mult; the same weight decay on all."""
    head = [p for n, p in model.named_parameters() if n.startswith("fc.")]
    body = [p for n, p in model.named_parameters() if not n.startswith("fc.")]
    groups = [{"params": body, "lr": lr, "base_lr": lr, "name": "backbone"},
              {"params": head, "lr": lr * head_mult, "base_lr": lr * head_mult, "name": "head"}]
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def set_epoch_lr(optimizer: torch.optim.Optimizer, cfg: SemisupConfig, epoch: int) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * lr_factor(cfg, epoch)


# --- train / evaluate one cell --------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: bool) -> dict[str, float]:
    """Top-1/top-5 (percent) over the val set; counts summed over ranks (each rank sees its own shard)."""
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64)
    for images, target in tqdm(loader, desc="val", disable=None if dist.is_main() else True, leave=False):
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        if amp:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dist.amp_dtype(device), enabled=amp):
            logits = model(images)
        counts += torch.cat([topk_correct(logits.float(), target), torch.tensor([len(target)], dtype=torch.float64)])
    if dist.world_size() > 1:
        counts = counts.to(device)
        tdist.all_reduce(counts)
        counts = counts.cpu()
    return {"top1": (100 * counts[0] / counts[2]).item(), "top5": (100 * counts[1] / counts[2]).item()}


def _loaders(cfg: SemisupConfig, labelled, val, device: torch.device):
    return datasets.distributed_loaders(labelled, val, cfg.batch_size, cfg.workers, cfg.seed, device)


def train_cell(cfg: SemisupConfig, lr: float, mult: float, num_classes: int, loaders, device: torch.device,
               out: Path) -> tuple[dict[str, float], nn.Module]:
    """Fine-tune a fresh copy of the checkpoint with one (lr, head multiplier); returns (val top-1/top-5,
    the fine-tuned model)."""
    train_loader, sampler, val_loader = loaders
    name = cell_name(lr, mult)
    model = build_classifier(cfg.checkpoint, num_classes, cfg.seed).to(device)
    if dist.world_size() > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.amp:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, lr, mult, cfg)
    ddp = (nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
           if dist.world_size() > 1 else model)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and dist.amp_dtype(device) == torch.float16)
    ckpt_path = out / "cells" / f"{name}.pth.tar"
    start_epoch = 0
    if cfg.resume and ckpt_path.is_file():
        state = safe_load(ckpt_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"])
    torch.manual_seed(cfg.seed + 1 + start_epoch)  # data augmentation stream, independent of the model build
    steps = len(train_loader) if cfg.steps_per_epoch <= 0 else min(len(train_loader), cfg.steps_per_epoch)
    main_rank = dist.is_main()
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        set_epoch_lr(optimizer, cfg, epoch)
        model.train()
        bar = tqdm(total=steps, desc=f"{name} epoch {epoch}", disable=None if main_rank else True, leave=False)
        for i, (images, target) in enumerate(itertools.islice(train_loader, steps)):
            images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
            if cfg.amp:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dist.amp_dtype(device), enabled=cfg.amp):
                logits = ddp(images)
            loss = F.cross_entropy(logits.float(), target)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{name}: non-finite loss at epoch {epoch} step {i}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if main_rank and (i + 1) % cfg.print_freq == 0:
                bar.write(f"{name} epoch {epoch} [{i + 1}/{steps}] loss {loss.item():.4f}")
        bar.close()
        if main_rank and epoch + 1 < cfg.epochs:
            atomic_save({"epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict()},
                        ckpt_path)
        dist.barrier()
    result = evaluate(model, val_loader, device, cfg.amp)
    if main_rank:
        ckpt_path.unlink(missing_ok=True)  # the cell is done: its result is what we keep
    return result, model


# --- the grid -------------------------------------------------------------------------------------------
def grid_metrics(cells: dict[str, dict[str, float]]) -> dict:
    """Flat metrics: every cell as grid/<cell>/top1|top5, and top1/top5 of the best cell by top-1."""
    metrics = {}
    for name, res in cells.items():
        metrics[f"grid/{name}/top1"], metrics[f"grid/{name}/top5"] = res["top1"], res["top5"]
    best = max(cells, key=lambda n: (cells[n]["top1"], cells[n]["top5"]))
    metrics["top1"], metrics["top5"] = cells[best]["top1"], cells[best]["top5"]
    metrics["details"] = {"best_cell": best}
    return metrics


def run(cfg: SemisupConfig) -> dict:
    """Fine-tune every grid cell, write OUT/metrics.json and return the metrics."""
    start = now_iso()
    cfg = resolve(cfg)
    check_checkpoint(cfg.checkpoint)
    held = claim_out(cfg, "semisup")
    if held.finished is not None:
        return held.finished["metrics"]
    device = dist.init_from_env(cfg.dist_backend)
    labelled, val = build_datasets(cfg)
    out = Path(cfg.out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    num_classes = len(labelled.classes)
    loaders = _loaders(cfg, labelled, val, device)
    main_rank = dist.is_main()
    if main_rank:
        print(f"semisup ({cfg.subset}): {cfg.checkpoint}: fine-tune on {len(labelled)} labelled images "
              f"({cfg.subset_list or 'subset made from ' + str(labelled.dataset.root)}), {num_classes} classes, "
              f"val {len(val)}; grid lr {cfg.lrs} x head {cfg.head_mults}, {cfg.epochs} epochs, "
              f"{dist.world_size()} process(es) on {device}", flush=True)
    if main_rank:  # the labelled images actually used, in the list format (reusable as --subset-list)
        names = [f"{Path(p).parent.name}/{Path(p).name}" for p, _ in labelled.samples]
        datasets.write_subset_list(names, out / "subset.txt")
    cells = {}
    for lr, mult in grid_cells(cfg):
        name = cell_name(lr, mult)
        done = out / "cells" / f"{name}.json"
        if cfg.resume and done.is_file():
            cells[name] = json.loads(done.read_text())
            continue
        cells[name], _ = train_cell(cfg, lr, mult, num_classes, loaders, device, out)
        if main_rank:
            done.write_text(json.dumps(cells[name]))
            print(f"{name}: top1 {cells[name]['top1']:.2f} top5 {cells[name]['top5']:.2f}", flush=True)
    metrics = grid_metrics(cells)
    metrics["details"] |= {"labelled_images": len(labelled), "subset_file": str(out / "subset.txt"),
                           "subset_source": cfg.subset_list or f"made from the data (seed {cfg.seed})",
                           "subset_protocol": "simclr-list" if cfg.subset_list else "stand-in"}
    if main_rank:
        report(cfg, "semisup", metrics, start, f"semisup: best {metrics['details']['best_cell']}: "
               f"top1 {metrics['top1']:.2f} top5 {metrics['top5']:.2f}", run_id=held.run_id,
               protocols=NAMED_PROTOCOLS, family="semisup")
    return metrics
