"""MoCo pretraining loop: the official `main_moco.py` recipe (a minimal diff of the PyTorch ImageNet
example) with one code path for 1 process, torchrun and Slurm, bf16/AMP + channels_last by default,
atomic resumable checkpoints and per-step metrics.

    mocobench pretrain --config moco_v2 --data /datasets/imagenet --out runs/v2     # ImageNet (root/train)
    mocobench pretrain --config demo --out runs/demo                                 # embedded demo data
    mocobench pretrain --config moco_v3_vit_small --data /datasets/imagenet --out runs/v3  # MoCo v3 (moco_v3.py)
    torchrun --nproc_per_node 8 -m mocobench.pretrain.train --config moco_v2 --data ... --out ...
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml
from torch import nn
from tqdm import tqdm

from mocobench.checkpoints.safe_load import safe_load
from mocobench.core import distributed as dist
from mocobench.core.atomic import atomic_save
from mocobench.core.backbones import build_backbone, check_arch
from mocobench.core.config import option, parse_config, to_dict
from mocobench.core.distributed import amp_dtype
from mocobench.core.errors import USER_ERRORS, CheckpointError, ConfigError, DataError, debug_enabled, one_line
from mocobench.core.imagefolder import RobustImageFolder, collate_with_skips
from mocobench.core.images import decode_rgb
from mocobench.core.records import CHECKPOINT_NAME, CHECKPOINT_RE, now_iso, write_metrics
from mocobench.core.run_folder import claim
from mocobench.core.threads import fit_threads
from mocobench.core.vit import is_vit
from mocobench.pretrain.augment import TwoCropsTransform, moco_augmentation, moco_v3_augmentations
from mocobench.pretrain.fast_augment import TensorMocoAugmentation
from mocobench.pretrain.knn_monitor import K as K_MONITOR
from mocobench.pretrain.knn_monitor import KNNMonitor
from mocobench.pretrain.lars import LARS
from mocobench.pretrain.moco import MoCo
from mocobench.pretrain.moco_v3 import (MoCoV3, MoCoV3ResNet, MoCoV3ViT, load_official_state_dict, moco_momentum,
                                        moco_v3_vit_init, official_state_dict, zero_init_residual)

CONFIG_DIR = Path(__file__).parent / "configs"
CPU_CHANNELS_LAST_MIN_SIZE = 128  # fp32 on CPUs without fast bf16: channels_last pays from here (resolve_fast_path)



@dataclass
class PretrainConfig:
    """Defaults are the official MoCo v1 `main_moco.py` ones; `--config moco_v2` gives v2, `algorithm: moco_v3`
    MoCo v3 (`--config moco_v3_vit_small`, ...), whose own fields default to moco-v3 `main_moco.py`'s flags."""
    data: str = option("demo", "dataset root with train/ in ImageFolder layout, or 'demo' for the embedded data")
    out: str = option("runs/pretrain", "run directory: checkpoints, logs, metrics, resolved config")
    arch: str = option("resnet50", "torchvision ResNet name, <name>_small (3x3 stem, no max-pool), or a ViT (core/vit.py)")
    width: int = option(64, "first-stage channels of the *_small archs (64 = standard)", at_least=1)
    epochs: int = option(200, "total epochs", at_least=1)
    batch_size: int = option(256, "global batch size over all ranks", at_least=1)
    lr: float = option(0.03, "initial learning rate (for the global batch); moco_v3: base lr, x batch_size/256 "
                             "as official", above=0)
    schedule: list[int] = option(None, "epochs at which lr drops x0.1 (step schedule)", at_least=0)
    cos: bool = option(False, "cosine lr schedule instead of steps")
    lr_warmup_epochs: int = option(0, "v1/v2: linear lr warm-up, lr x (e+1)/(N+1) in epoch e < N, on top of the "
                                      "schedule; a run shorter than N stays in it (not in main_moco.py; the demo "
                                      "recipe's)", at_least=0)
    momentum: float = option(0.9, "SGD momentum", at_least=0, below=1)
    weight_decay: float = option(1e-4, "SGD weight decay", at_least=0)
    moco_dim: int = option(128, "feature dimension", at_least=1)
    moco_k: int = option(65536, "queue size (negative keys); divisible by the global batch", at_least=1)
    moco_m: float = option(0.999, "key-encoder momentum", at_least=0, at_most=1)
    moco_t: float = option(0.07, "softmax temperature", above=0)
    mlp: bool = option(False, "MoCo v2 MLP projection head")
    aug_plus: bool = option(False, "MoCo v2 augmentation (jitter p=0.8, blur)")
    image_size: int = option(224, "crop size", at_least=8)
    crop_min: float = option(0.2, "RandomResizedCrop minimum scale", above=0, at_most=1)
    jitter: float = option(0.4, "ColorJitter brightness/contrast/saturation strength", at_least=0, at_most=1)
    blur_sigma: list[float] = option(None, "Gaussian blur sigma range (aug+), default [0.1, 2.0]", above=0)
    shuffle_bn: bool = option(True, "ShuffleBN for the key encoder")
    bn_groups: int = option(8, "BN groups per rank in single-process runs (emulated ShuffleBN); DDP uses 1 per rank", at_least=1)
    mask_false_negatives: bool = option(False, "mask queued keys of the query's own image (small datasets)")
    workers: int = option(4, "data loader workers per rank", at_least=0)
    loader: str = option("pil", "augmentation pipeline: pil (official torchvision/PIL) | tensor (pretrain/fast_augment.py)")
    seed: int = option(0, "random seed (fixed by default so runs resume exactly)")
    amp: Optional[bool] = option(None, "mixed precision true/false: bf16 autocast on CPU, bf16/fp16 AMP on GPU; "
                                   "unset = on for GPUs and for CPUs with fast bf16 (cpu_bf16_is_fast)")
    channels_last: Optional[bool] = option(None, "channels_last memory format true/false; unset = with amp, and on "
                                                 f"CPUs from {CPU_CHANNELS_LAST_MIN_SIZE} px (resolve_fast_path)")
    strict_data: bool = option(False, "make an unreadable image fatal instead of skipping it")
    knn_monitor: int = option(0, "every N epochs (and before the first): weighted kNN top-1 (k=20) of the encoder's "
                                 "features on held-out images, logged as knn_top1 (pretrain/knn_monitor.py); 0 = off",
                              at_least=0)
    knn_monitor_images: int = option(2000, "kNN monitor: memory-bank images (queries: half as many)", at_least=10)
    steps_per_epoch: int = option(0, "cap on steps per epoch (0 = full epoch); for smoke tests", at_least=0)
    print_freq: int = option(10, "log every N steps", at_least=1)
    save_freq: int = option(1, "checkpoint every N epochs (and always at the end)", at_least=1)
    keep_checkpoints: int = option(0, "keep only the newest N checkpoints (0 = keep all, as official)", at_least=0)
    stop_after: int = option(0, "return after this many epochs in this invocation (0 = all); rerun to resume", at_least=0)
    resume: str = option("auto", "'auto' = latest checkpoint in out, '' = start fresh, or a checkpoint path")
    dist_backend: str = option("auto", "nccl on GPU, gloo on CPU")
    force: bool = option(False, "start afresh when --out holds another run: move the old folder aside to OUT.replaced-<time>")
    algorithm: str = option("moco", "moco (v1/v2, pretrain/moco.py) | moco_v3 (pretrain/moco_v3.py); the fields "
                                    "below are moco_v3's")
    optimizer: str = option("lars", "moco_v3: lars (ResNets, pretrain/lars.py) | adamw (ViTs)")
    warmup_epochs: int = option(10, "moco_v3: linear lr warmup epochs before the cosine decay (per step)", at_least=0)
    mlp_dim: int = option(4096, "moco_v3: hidden dimension of the projector and predictor MLPs", at_least=1)
    moco_m_cos: bool = option(False, "moco_v3: raise the momentum from moco_m to 1 on a half-cycle cosine (per step)")
    stop_grad_conv1: bool = option(False, "moco_v3 ViTs: freeze the random patch projection")

    def __post_init__(self):
        if self.schedule is None:
            self.schedule = [120, 160]
        if self.blur_sigma is None:
            self.blur_sigma = [0.1, 2.0]


class NonFiniteLossError(RuntimeError):
    pass


V3_FIELDS = ("algorithm", "optimizer", "warmup_epochs", "mlp_dim", "moco_m_cos", "stop_grad_conv1")
V1V2_FIELDS = ("moco_k", "mlp", "aug_plus", "schedule", "cos", "lr_warmup_epochs", "shuffle_bn", "bn_groups",
               "mask_false_negatives")


def config_record(cfg: PretrainConfig) -> dict:
    """The config as recorded (run.json, checkpoints, metrics.json, stage hashes): only the fields the
    algorithm uses. v1/v2 runs leave out the moco_v3 fields (an error unless at their defaults), v3 runs the
    v1/v2 ones it ignores (no queue, its own heads, augmentation and schedule; see docs/pretrain.md), so a
    sweep may layer v1/v2 configs under a v3 variant without them showing in its record."""
    record = to_dict(cfg)
    unused = V1V2_FIELDS if cfg.algorithm == "moco_v3" else V3_FIELDS
    if not cfg.lr_warmup_epochs:  # off (the official recipes): left out, so their records keep their keys
        unused += ("lr_warmup_epochs",)
    return {k: v for k, v in record.items() if k not in unused}


def validate(cfg: PretrainConfig, world: int) -> None:
    if cfg.algorithm not in ("moco", "moco_v3"):
        raise ConfigError(f"algorithm={cfg.algorithm!r}: expected 'moco' (v1/v2) or 'moco_v3'")
    try:
        check_arch(cfg.arch, cfg.width)
    except ValueError as e:
        raise ConfigError(f"arch={cfg.arch!r}, width={cfg.width}: {e}") from None
    if cfg.algorithm == "moco_v3":
        if cfg.optimizer not in ("lars", "adamw"):
            raise ConfigError(f"optimizer={cfg.optimizer!r}: expected 'lars' or 'adamw'")
        if cfg.loader != "pil":
            raise ConfigError(f"loader={cfg.loader!r}: moco_v3 has the PIL augmentation only; use loader=pil")
        if cfg.batch_size % world:
            raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by the number of processes {world}")
        if cfg.warmup_epochs >= cfg.epochs:
            raise ConfigError(f"warmup_epochs={cfg.warmup_epochs} must be less than epochs={cfg.epochs}")
        return
    changed = [k for k in V3_FIELDS if getattr(cfg, k) != getattr(PretrainConfig, k)]
    if changed:
        raise ConfigError(f"{', '.join(changed)}: moco_v3 field(s); set algorithm=moco_v3 or leave them out")
    if cfg.loader not in ("pil", "tensor"):
        raise ConfigError(f"loader={cfg.loader!r}: expected 'pil' or 'tensor'")
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by the number of processes {world}")
    if cfg.moco_k % cfg.batch_size:
        raise ConfigError(f"moco_k={cfg.moco_k} must be divisible by batch_size={cfg.batch_size} (queue ring)")
    groups = bn_groups(cfg, world)
    if (cfg.batch_size // world) % groups:
        raise ConfigError(f"per-rank batch {cfg.batch_size // world} must be divisible by bn_groups={groups}")


def bn_groups(cfg: PretrainConfig, world: int) -> int:
    return cfg.bn_groups if world == 1 else 1


def adjust_learning_rate(optimizer, epoch: int, cfg: PretrainConfig) -> float:
    """Per-epoch schedule of main_moco.py: cosine, or x0.1 at each milestone. `lr_warmup_epochs` N > 0 (not
    official) scales epoch e < N by (e+1)/(N+1): a gradual warm-up (Goyal et al. 2017, Sec. 2.2), per epoch."""
    lr = cfg.lr
    if cfg.cos:
        lr *= 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs))
    else:
        lr *= 0.1 ** sum(epoch >= m for m in cfg.schedule)
    if epoch < cfg.lr_warmup_epochs:
        lr *= (epoch + 1) / (cfg.lr_warmup_epochs + 1)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def adjust_learning_rate_v3(optimizer, epoch: float, cfg: PretrainConfig) -> float:
    """moco-v3 main_moco.py, per step (`epoch` fractional): lr = base lr x batch/256, linear warmup over
    `warmup_epochs`, then a half-cycle cosine to 0 at `epochs`."""
    peak = cfg.lr * cfg.batch_size / 256
    if epoch < cfg.warmup_epochs:
        lr = peak * epoch / cfg.warmup_epochs
    else:
        lr = peak * 0.5 * (1.0 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / (cfg.epochs - cfg.warmup_epochs)))
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


# --- RNG state as plain types, so checkpoints open with weights_only=True -------------------------------
def rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
            "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]}}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --- checkpoints ----------------------------------------------------------------------------------------


def list_checkpoints(out: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in out.glob("checkpoint_*.pth.tar") if (m := CHECKPOINT_RE.search(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out: str | Path) -> Path | None:
    ckpts = list_checkpoints(Path(out))
    return ckpts[-1] if ckpts else None


def save_checkpoint(out: Path, model: MoCo | MoCoV3, optimizer, epoch: int, cfg: PretrainConfig, step: int,
                    train_seconds: float = 0.0, keep: int = 0, rngs: list[dict] | None = None,
                    run_id: str | None = None, epoch_stats: list[float] | None = None,
                    resume_step: int = 0, scaler=None) -> Path:
    """Official layout: epoch (epochs done), arch, state_dict with `module.` keys, optimizer; plus ours.
    MoCo v3 (moco-v3 main_moco.py): `module.base_encoder.*` (a ViT's projector as `head`), `module.momentum_encoder.*`,
    `module.predictor.*`, and the GradScaler's state as `scaler`; no queue.

    `rngs`: every rank's RNG state (rank order) for a multi-rank run; `rng` is always rank 0's (this one's).
    `run_id`: the run's identity, which every downstream metrics.json records (core/records.py).
    `epoch_stats`: the epoch's (loss sum, acc1 sum, count) so far. `resume_step` > 0: a checkpoint taken
    inside `epoch` (on SIGTERM/SIGUSR1) after that many steps; the epoch's own checkpoint replaces it."""
    v3 = isinstance(model, MoCoV3)
    state = {"epoch": epoch + (0 if resume_step else 1), "arch": cfg.arch, "run_id": run_id,
             "resume_step": resume_step, "epoch_stats": list(epoch_stats or []),
             "state_dict": {f"module.{k}": v for k, v in model_state(model).items()},
             "optimizer": optimizer.state_dict(), **({"scaler": scaler.state_dict()} if v3 else {}),
             "config": config_record(cfg), "rng": rngs[0] if rngs else rng_state(),
             **({"rng_per_rank": rngs} if rngs and len(rngs) > 1 else {}),
             "global_step": step, **({} if v3 else {"queue_ids": model.queue_ids.clone()}),
             "train_seconds": train_seconds}
    path = atomic_save(state, out / CHECKPOINT_NAME.format(epoch=epoch))
    if keep > 0:
        for old in list_checkpoints(out)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def model_state(model: MoCo | MoCoV3) -> dict:
    """The model's state dict in the official key layout of its algorithm (without `module.`)."""
    return official_state_dict(model) if isinstance(model, MoCoV3) else model.state_dict()


def load_for_resume(path: Path, model: MoCo | MoCoV3, optimizer, scaler=None) -> dict:
    """Restore a run from `path`; returns the checkpoint's bookkeeping (epoch, global_step, ...). A file that is
    damaged or not a checkpoint of this model is a CheckpointError naming it."""
    ckpt = safe_load(path)
    try:
        state = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
        if isinstance(model, MoCoV3):
            load_official_state_dict(model, state)
            if scaler is not None:
                scaler.load_state_dict(ckpt["scaler"])
        else:
            model.load_state_dict(state)
        optimizer.load_state_dict(ckpt["optimizer"])
        int(ckpt["epoch"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a checkpoint of this MoCo model ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}); expected a `mocobench pretrain` "
                              "checkpoint of the same arch and config") from None
    if "queue_ids" in ckpt:
        model.queue_ids.copy_(ckpt["queue_ids"])
    per_rank = ckpt.get("rng_per_rank") or []
    if len(per_rank) == dist.world_size():  # each rank continues its own random stream
        set_rng_state(per_rank[dist.rank()])
    elif "rng" in ckpt:  # single-process run, or resumed with another world size
        set_rng_state(ckpt["rng"])
    return {k: ckpt.get(k) for k in ("epoch", "global_step", "train_seconds", "resume_step", "epoch_stats")}


def resume_from(cfg: PretrainConfig, out: Path, model: MoCo | MoCoV3, optimizer, warn,
                scaler=None) -> tuple[Path | None, dict]:
    """Load the checkpoint to resume from: `cfg.resume` when a path is given, else (auto) the newest readable
    checkpoint in `out`: a damaged newest one is skipped with a warning naming it. (None, {}) = fresh start."""
    if not cfg.resume:
        return None, {}
    candidates = [Path(cfg.resume)] if cfg.resume != "auto" else list_checkpoints(out)[::-1]
    for i, path in enumerate(candidates):
        try:
            return path, load_for_resume(path, model, optimizer, scaler)
        except CheckpointError as e:
            if cfg.resume != "auto" or i + 1 == len(candidates):
                raise
            warn(f"warning: cannot resume from {path.name}, trying {candidates[i + 1].name}: {one_line(e)}")
    return None, {}


class StopRequest:
    """SIGTERM / SIGUSR1 on a run outside Slurm: finish the step, write a checkpoint, exit (128 + signal).

    Under submitit the job's own handlers stay (preemption requeues the job; runner.py). With several ranks the
    request is agreed on by an all-reduce each step, so every rank stops after the same step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signum, self.previous = 0, {}

    def __enter__(self) -> "StopRequest":
        if "SUBMITIT_EXECUTOR" not in os.environ and threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def requested(self, world: int) -> int:
        """The signal number to stop for (0 = go on), the same on every rank."""
        if world == 1:
            return self.signum
        return int(dist.all_reduce_max(torch.tensor(float(self.signum))).item())


class SkipFirst(torch.utils.data.Sampler):
    """The wrapped sampler, minus the first `skip` indices of its next epoch (a run resumed mid-epoch)."""

    def __init__(self, sampler):
        self.sampler, self.skip = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        skip, self.skip = self.skip, 0
        return itertools.islice(iter(self.sampler), skip, None)


class GlobalBatchSampler(torch.utils.data.Sampler):
    """This rank's part of every global batch, the global batches being the same for any number of ranks.

    The epoch's order is DistributedSampler's (`randperm` seeded with seed + epoch), cut into global batches
    of `batch_size`; rank r of `world` takes the r-th contiguous block of each. One process gets exactly
    DistributedSampler's order; W ranks train step for step on the images one process would, and rank r's
    block is BN group r of a single process run with `bn_groups=W` (the emulation of ShuffleBN).
    DistributedSampler's strided split (rank r takes every W-th image) would mix the groups.
    """

    def __init__(self, size: int, batch_size: int, world: int, rank: int, seed: int):
        self.size, self.batch_size, self.world, self.rank, self.seed = size, batch_size, world, rank, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.batch_size * (self.batch_size // self.world)

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        steps = self.size // self.batch_size
        order = torch.randperm(self.size, generator=g)[:steps * self.batch_size]
        return iter(order.view(steps, self.world, -1)[:, self.rank].reshape(-1).tolist())


# --- the fast path ----------------------------------------------------------------------------------------
def cpu_bf16_is_fast() -> bool:
    """Whether bf16 autocast speeds up CPU training here: CPUs with AMX tiles, or AMD Zen 4+ (AVX512-BF16).

    Measured: 2-3x over fp32 NCHW for ResNet training on an AMD EPYC with AVX512-BF16, 3.1-3.5x for the MoCo v2
    ResNet-50 step at 224 px on a Xeon VM with AMX; on an Intel Xeon VM exposing AVX512-BF16 without AMX, bf16
    matmuls and convolutions ran *slower* than fp32 (docs/performance.md).
    """
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return True
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "AuthenticAMD" in info and "avx512_bf16" in info


def resolve_fast_path(cfg: PretrainConfig, device: torch.device) -> PretrainConfig:
    """Fill unset `amp` / `channels_last`: both on for GPUs and fast-bf16 CPUs. Elsewhere fp32, channels_last
    from CPU_CHANNELS_LAST_MIN_SIZE px: fp32 channels_last measured 1.27-1.51x over NCHW at 224 px and
    1.06-1.24x at 128 px, but 0.91x at 64 px, on a Xeon VM without fast bf16 (docs/performance.md)."""
    amp = cfg.amp if cfg.amp is not None else device.type == "cuda" or (device.type == "cpu" and cpu_bf16_is_fast())
    channels_last = cfg.channels_last if cfg.channels_last is not None else \
        amp or (device.type == "cpu" and cfg.image_size >= CPU_CHANNELS_LAST_MIN_SIZE)
    return dataclasses.replace(cfg, amp=amp, channels_last=channels_last)


# --- one step -------------------------------------------------------------------------------------------
def train_step(model: nn.Module, optimizer, scaler, im_q: torch.Tensor, im_k: torch.Tensor, ids: torch.Tensor,
               cfg: PretrainConfig, moco_m: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One MoCo SGD step (main_moco.py's inner loop); returns (loss, instance accuracy in %). MoCo v3: the two
    views, the momentum `moco_m` of this step, and the model's own loss and accuracy.

    A non-finite loss is returned without updating the weights, so the caller can stop cleanly.
    """
    if cfg.channels_last:
        im_q, im_k = (x.contiguous(memory_format=torch.channels_last) for x in (im_q, im_k))
    if cfg.algorithm == "moco_v3":
        with torch.autocast(im_q.device.type, dtype=amp_dtype(im_q.device), enabled=cfg.amp):
            loss, acc1 = model(im_q, im_k, moco_m)
        if not torch.isfinite(loss):
            return loss.detach(), torch.tensor(0.0)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.detach(), acc1
    with torch.autocast(im_q.device.type, dtype=amp_dtype(im_q.device), enabled=cfg.amp):
        logits, labels = model(im_q, im_k, ids)
    loss = nn.functional.cross_entropy(logits.float(), labels)
    if not torch.isfinite(loss):
        return loss.detach(), torch.tensor(0.0)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    acc1 = (logits.detach().argmax(dim=1) == 0).float().mean() * 100
    return loss.detach(), acc1


# --- the run --------------------------------------------------------------------------------------------
class RunLog:
    """Plain lines to stdout (rank 0) and out/log.txt; one JSON object per logging step in metrics.jsonl."""

    def __init__(self, out: Path, enabled: bool):
        self.enabled = enabled
        self.text = open(out / "log.txt", "a") if enabled else None
        self.jsonl = open(out / "metrics.jsonl", "a") if enabled else None

    def line(self, msg: str, bar=None) -> None:
        if not self.enabled:
            return
        (bar.write if bar is not None and not bar.disable else print)(msg, flush=True)
        self.text.write(msg + "\n")
        self.text.flush()

    def record(self, **values) -> None:
        if self.enabled:
            self.jsonl.write(json.dumps(values) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        for f in (self.text, self.jsonl):
            if f:
                f.close()


def train_folder(cfg: PretrainConfig) -> Path:
    if cfg.data == "demo":
        from mocobench.core.demo_data import ensure_demo_data
        return Path(ensure_demo_data().imagefolder) / "train"
    root = Path(cfg.data)
    return root / "train" if (root / "train").is_dir() else root


def build_moco(cfg: PretrainConfig, world: int) -> MoCo:
    def encoder(num_classes):
        return build_backbone(cfg.arch, num_classes=num_classes, width=cfg.width)
    return MoCo(encoder, dim=cfg.moco_dim, K=cfg.moco_k, m=cfg.moco_m, T=cfg.moco_t, mlp=cfg.mlp,
                shuffle_bn=cfg.shuffle_bn, bn_groups=bn_groups(cfg, world),
                mask_false_negatives=cfg.mask_false_negatives)


def build_moco_v3(cfg: PretrainConfig) -> MoCoV3:
    """MoCo_ViT / MoCo_ResNet as moco-v3 main_moco.py builds them: ViTs with vits.py's sin-cos position
    embedding, init and optional frozen patch projection; ResNets with zero_init_residual=True."""
    vit = is_vit(cfg.arch)

    def encoder(num_classes):
        net = build_backbone(cfg.arch, num_classes=num_classes, width=cfg.width)
        return moco_v3_vit_init(net, cfg.stop_grad_conv1) if vit else zero_init_residual(net)
    return (MoCoV3ViT if vit else MoCoV3ResNet)(encoder, dim=cfg.moco_dim, mlp_dim=cfg.mlp_dim, T=cfg.moco_t)


def build_optimizer(cfg: PretrainConfig, model: nn.Module):
    """SGD for v1/v2; moco_v3: LARS or AdamW over all parameters (frozen ones get no gradient), as official."""
    if cfg.algorithm != "moco_v3":
        return torch.optim.SGD(model.parameters(), cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    lr = cfg.lr * cfg.batch_size / 256
    if cfg.optimizer == "lars":
        return LARS(model.parameters(), lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    return torch.optim.AdamW(model.parameters(), lr, weight_decay=cfg.weight_decay)


def run(cfg: PretrainConfig) -> dict:
    """Train (or resume) a MoCo run in `cfg.out`; returns the final metrics."""
    device = dist.init_from_env(cfg.dist_backend)
    world, main_rank = dist.world_size(), dist.is_main()
    fit_threads(cfg.workers, announce=print if main_rank else None)
    validate(cfg, world)
    cfg = resolve_fast_path(cfg, device)  # the resolved config records the choice
    held = claim(cfg.out, stage="pretrain", benchmark="moco", config=config_record(cfg), force=cfg.force,
                 write=main_rank)
    out, run_id = held.path, held.run_id
    if held.replaced is not None and main_rank:
        print(f"moved the old run in {out} aside to {held.replaced}", flush=True)
    if held.finished is not None:
        if main_rank:
            print(f"pretrain already finished in {out} ({held.finished['metrics'].get('epochs')} epochs, "
                  f"{out / 'metrics.json'}); nothing to do (--force trains again)", flush=True)
        return held.finished["metrics"]
    start_time = now_iso()
    seed_everything(cfg.seed + dist.rank())

    v3 = cfg.algorithm == "moco_v3"
    model = (build_moco_v3(cfg) if v3 else build_moco(cfg, world)).to(device)
    if v3 and world > 1 and device.type == "cuda":  # official: SyncBN over all GPUs (gloo on CPU: BN per rank)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and amp_dtype(device) == torch.float16)
    resume, restored = resume_from(cfg, out, model, optimizer,
                                   lambda msg: print(msg, file=sys.stderr, flush=True) if main_rank else None,
                                   scaler if v3 else None)
    start_epoch, step = int(restored.get("epoch") or 0), int(restored.get("global_step") or 0)
    seconds_before, skip = float(restored.get("train_seconds") or 0.0), int(restored.get("resume_step") or 0)
    ddp = (nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
           if world > 1 else model)

    augmentation = TensorMocoAugmentation if cfg.loader == "tensor" else moco_augmentation
    transform = TwoCropsTransform(*moco_v3_augmentations(cfg.image_size, cfg.crop_min, cfg.jitter, cfg.blur_sigma)) \
        if v3 else TwoCropsTransform(augmentation(cfg.image_size, cfg.aug_plus, cfg.crop_min, cfg.jitter,
                                                  blur_sigma=cfg.blur_sigma))
    dataset = RobustImageFolder(train_folder(cfg), transform, strict=cfg.strict_data)
    if cfg.loader == "tensor":
        dataset.loader = decode_rgb
    per_rank = cfg.batch_size // world
    if len(dataset) < cfg.batch_size:
        raise DataError(f"{dataset.root}: {len(dataset)} images, fewer than one batch of {cfg.batch_size}")
    sampler = SkipFirst(GlobalBatchSampler(len(dataset), cfg.batch_size, world, dist.rank(), cfg.seed))
    loader = torch.utils.data.DataLoader(dataset, batch_size=per_rank, sampler=sampler, num_workers=cfg.workers,
                                         pin_memory=device.type == "cuda", drop_last=True,
                                         collate_fn=collate_with_skips, persistent_workers=False)
    steps = len(loader) if cfg.steps_per_epoch <= 0 else min(len(loader), cfg.steps_per_epoch)

    log = RunLog(out, main_rank)
    if main_rank:
        (out / "config.yaml").write_text(yaml.safe_dump(config_record(cfg), sort_keys=False))
        log.line(f"MoCo{' v3' if v3 else ''} pretrain: {cfg.arch} (width {cfg.width}) on {dataset.root}: "
                 f"{len(dataset)} images, "
                 f"{world} process(es) on {device}, batch {cfg.batch_size}, {steps} steps/epoch"
                 + (f"; resumed from {resume} at epoch {start_epoch}" + (f" step {skip}" if skip else "")
                    if resume else ""))
    monitor = KNNMonitor(dataset.root, cfg.image_size, cfg.knn_monitor_images, cfg.seed) \
        if cfg.knn_monitor and main_rank else None
    knn_top1 = None

    def watch(epoch: int) -> None:  # rank 0; the monitor draws from no global RNG: training is unchanged
        nonlocal knn_top1, monitor
        try:
            knn_top1 = monitor(model.base_encoder if v3 else model.encoder_q, device, cfg.amp)
        except (OSError, ValueError) as e:
            log.line(f"warning: kNN monitor off: {one_line(e)}")
            monitor = None
            return
        log.record(epoch=epoch, step=step, knn_top1=knn_top1)
        log.line(f"epoch {epoch}: kNN monitor top-1 {knn_top1:.2f} (k={K_MONITOR}, {monitor.source})")

    if monitor is not None and start_epoch == 0 and not skip:
        watch(-1)  # the random-init reference
    bad_files: dict[str, None] = {}  # unique unreadable files, in order seen
    t_start = time.time()
    stats = restored.get("epoch_stats") or []
    epoch_loss, epoch_acc = (stats[0] / stats[2], stats[1] / stats[2]) if len(stats) == 3 and stats[2] else (
        float("nan"), float("nan"))
    end_epoch = cfg.epochs if cfg.stop_after <= 0 else min(cfg.epochs, start_epoch + cfg.stop_after)
    with StopRequest() as stop:
        for epoch in range(start_epoch, end_epoch):
            sampler.set_epoch(epoch)
            first = skip if epoch == start_epoch else 0
            sampler.skip = first * per_rank
            lr = None if v3 else adjust_learning_rate(optimizer, epoch, cfg)
            moco_m = cfg.moco_m
            model.train()
            sums = torch.tensor(stats, dtype=torch.float64) if first and len(stats) == 3 else torch.zeros(3)
            bar = tqdm(total=steps, initial=first, desc=f"epoch {epoch}", disable=None if main_rank else True,
                       leave=False)
            t_log, n_log = time.time(), 0
            for i, (images, _, ids, skipped) in enumerate(itertools.islice(loader, steps - first), start=first):
                bad_files.update(dict.fromkeys(skipped))
                im_q, im_k = (x.to(device, non_blocking=True) for x in images)
                if v3:  # per step, as moco-v3 main_moco.py
                    lr = adjust_learning_rate_v3(optimizer, epoch + i / steps, cfg)
                    if cfg.moco_m_cos:
                        moco_m = moco_momentum(epoch + i / steps, cfg.epochs, cfg.moco_m)
                loss, acc1 = train_step(ddp, optimizer, scaler, im_q, im_k, ids.to(device), cfg, moco_m)
                if not torch.isfinite(loss):
                    last = latest_checkpoint(out)
                    raise NonFiniteLossError(f"non-finite loss ({loss.item()}) at epoch {epoch} step {i} (weights not "
                                             f"updated); the last good checkpoint is {last or 'none (no epoch finished yet)'}"
                                             "; lower --lr or try --no-amp")
                step += 1
                n = len(ids)
                sums += torch.tensor([loss.item() * n, acc1.item() * n, n], dtype=sums.dtype)
                n_log += n * world
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", acc1=f"{acc1.item():.1f}")
                if (i + 1) % cfg.print_freq == 0 or i + 1 == steps:
                    img_s = n_log / max(time.time() - t_log, 1e-9)
                    log.record(step=step, epoch=epoch, loss=loss.item(), acc1=acc1.item(), lr=lr, img_per_s=img_s)
                    log.line(f"epoch {epoch} [{i + 1}/{steps}] loss {loss.item():.4f} acc1 {acc1.item():.2f} "
                             f"lr {lr:.4g} {img_s:.1f} img/s", bar)
                    t_log, n_log = time.time(), 0
                signum = stop.requested(world)
                if signum and i + 1 < steps:
                    bar.close()
                    rngs = dist.all_gather_object(rng_state())
                    if main_rank:
                        path = save_checkpoint(out, model, optimizer, epoch, cfg, step,
                                               seconds_before + time.time() - t_start, 0, rngs, run_id,
                                               sums.tolist(), resume_step=i + 1, scaler=scaler)
                        log.line(f"stopped by {signal.Signals(signum).name} at epoch {epoch} step {i + 1}: {path}; "
                                 "rerun the same command to resume from there")
                    dist.barrier()
                    log.close()
                    raise Interrupted(signum)
            bar.close()
            sums = dist.all_reduce_mean(sums.float())
            epoch_loss, epoch_acc = (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()
            log.record(epoch=epoch, step=step, epoch_loss=epoch_loss, epoch_acc1=epoch_acc)
            if bad_files:
                log.line(f"warning: {len(bad_files)} unreadable image(s) skipped so far, e.g. {next(iter(bad_files))}")
            if monitor is not None and ((epoch + 1) % cfg.knn_monitor == 0 or epoch + 1 == cfg.epochs):
                watch(epoch)
            signum = stop.requested(world)
            if (epoch + 1) % cfg.save_freq == 0 or epoch + 1 == cfg.epochs or signum:
                rngs = dist.all_gather_object(rng_state())  # every rank's, so a resume continues each exactly
                if main_rank:
                    save_checkpoint(out, model, optimizer, epoch, cfg, step, seconds_before + time.time() - t_start,
                                    cfg.keep_checkpoints, rngs, run_id, sums.tolist(), scaler=scaler)
            dist.barrier()
            if signum and epoch + 1 < end_epoch:
                log.line(f"stopped by {signal.Signals(signum).name} after epoch {epoch}; rerun to resume")
                log.close()
                raise Interrupted(signum)

    if end_epoch < cfg.epochs:  # paused on purpose: no metrics.json until the run is complete
        log.line(f"stopping after epoch {end_epoch - 1} as asked (stop_after={cfg.stop_after}); rerun to resume")
        log.close()
        return {"loss": epoch_loss, "acc1": epoch_acc, "epochs_done": end_epoch}
    metrics = {"loss": epoch_loss, "acc1": epoch_acc, "epochs": cfg.epochs,
               "hours": (seconds_before + time.time() - t_start) / 3600, "bad_images": len(bad_files),
               **({"knn_top1": knn_top1} if knn_top1 is not None else {})}
    if main_rank:
        last = latest_checkpoint(out)
        write_metrics(out, stage="pretrain", benchmark="moco", metrics=metrics, config=config_record(cfg),
                      start=start_time, checkpoint=last, run_id=run_id)
        log.line(f"done: {last}; `mocobench results {out}` tabulates it and plots its loss curve"
                 + (f"; {len(bad_files)} unreadable images skipped" if bad_files else ""))
    log.close()
    return metrics


class Interrupted(Exception):
    """The run stopped on a signal after writing a checkpoint; exit code 128 + the signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg, _ = parse_config(PretrainConfig, argv, "mocobench pretrain", __doc__.split("\n\n")[0],
                              search_dir=CONFIG_DIR)
        run(cfg)
    except Interrupted as e:
        return 128 + e.signum
    except (*USER_ERRORS, NonFiniteLossError) as e:
        if debug_enabled():
            raise
        print(f"mocobench pretrain: error: {one_line(e)}", file=sys.stderr)
        return 2 if not isinstance(e, NonFiniteLossError) else 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
