"""Linear classification on a frozen backbone: three modes.

lincls (default) - facebookresearch/moco `main_lincls.py`, what the MoCo model-zoo numbers use: a
    torchvision ResNet whose backbone is loaded from the checkpoint (only fc.weight/fc.bias may be missing),
    every parameter but fc frozen, fc initialised N(0, 0.01) / 0, and the whole model kept in eval() mode
    during training so BN statistics never change. SGD lr 30, momentum 0.9, weight decay 0, global batch 256,
    100 epochs, lr x0.1 at epochs 60 and 80. Train: RandomResizedCrop(224) + flip; val: Resize(256) +
    CenterCrop(224). Top-1/top-5 on val after every epoch; at the end the backbone is compared tensor by
    tensor with a fresh load of the checkpoint (main_lincls.py `sanity_check`).
multihead - MMSelfSup's multi-layer linear heads (configs/benchmarks/linear_classification/imagenet/
    r50_multihead.py, heads/multi_cls_head.py): one classifier per layer feature1..feature5 on the
    `mocobench.evaluate.layers` pooled maps, each BatchNorm(affine=False, momentum 0.1) -> Linear, trained jointly
    (summed losses); SGD lr 0.01, Nesterov momentum 0.9, weight decay 1e-4, batch 256, 90 epochs, x0.1 at
    30/60/90; train crop + flip + ColorJitter(0.4, 0.4, 0.4, 0) + AlexNet PCA lighting (0.1).
lincls_v3 - facebookresearch/moco-v3 `main_lincls.py` (CONFIG.md): the same frozen-backbone recipe on the CLS token
    of a ViT (after the final norm; no BatchNorm before the head) or a ResNet's avgpool: SGD momentum 0.9,
    weight decay 0, lr = base lr x batch / 256 with base lr 3 for ViTs and 0.1 for ResNets, batch 1024,
    90 epochs of half-cycle cosine (per epoch, no warmup); head N(0, 0.01) / 0; the same crops as lincls.
fast - a proxy, NOT the protocol: the lincls optimiser and schedule on cached center-crop features
    (no augmentation), minutes instead of hours; useful to rank checkpoints, not to report.

Unset optimiser fields take the chosen mode's published values. DDP through `mocobench.core.distributed`
(torchrun / Slurm env): global batch split over ranks, DistributedSampler, val sharded and counts summed.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mocobench.checkpoints.safe_load import safe_load
from mocobench.core import distributed as dist
from mocobench.core.atomic import atomic_save
from mocobench.core.config import option, to_dict
from mocobench.core.errors import ConfigError, FeatureFileError
from mocobench.core.records import now_iso
from mocobench.core.run_folder import Claim
from mocobench.evaluate.feature_cache import FeatureSourceConfig, resolve_features
from mocobench.evaluate.feature_file import load_features
from mocobench.evaluate.layers import LayerFeatures, check_layer, is_vit_model, load_frozen_backbone
from mocobench.evaluate.protocols import Protocol
from mocobench.evaluate.report import check_checkpoint, claim_out, report

MODES = ("lincls", "lincls_v3", "multihead", "fast")
PROTOCOLS = {
    "lincls": dict(epochs=100, lr=30.0, schedule=[60, 80], weight_decay=0.0, nesterov=False, jitter=0.0,
                   lighting=0.0),
    "multihead": dict(epochs=90, lr=0.01, schedule=[30, 60, 90], weight_decay=1e-4, nesterov=True, jitter=0.4,
                      lighting=0.1),
}
PROTOCOLS["lincls_v3"] = dict(epochs=90, schedule=[], weight_decay=0.0, nesterov=False, jitter=0.0, lighting=0.0)
V3_BASE_LR = {"vit": 3.0, "resnet": 0.1}  # moco-v3 CONFIG.md `--lr 3` (ViT-S, ViT-B); main_lincls.py default 0.1
PROTOCOLS["fast"] = dict(PROTOCOLS["lincls"])
BENCHMARK = {"lincls": "linear", "lincls_v3": "linear", "multihead": "linear_multihead", "fast": "linear_fast"}
NAMED_PROTOCOLS = (  # evaluate/protocols.py
    Protocol("linear/moco", 1, {"mode": "lincls", **PROTOCOLS["lincls"], "batch_size": 256, "momentum": 0.9},
             "facebookresearch/moco main_lincls.py"),
    Protocol("linear/moco-v3-vit", 1, {"mode": "lincls_v3", **PROTOCOLS["lincls_v3"], "lr": V3_BASE_LR["vit"],
                                       "batch_size": 1024, "momentum": 0.9, "layer": "cls"},
             "facebookresearch/moco-v3 main_lincls.py, CONFIG.md (ViT-S/ViT-B: --lr 3, batch 1024)"),
    Protocol("linear/moco-v3-resnet", 1, {"mode": "lincls_v3", **PROTOCOLS["lincls_v3"], "lr": V3_BASE_LR["resnet"],
                                          "batch_size": 1024, "momentum": 0.9, "layer": "avgpool"},
             "facebookresearch/moco-v3 main_lincls.py, CONFIG.md (ResNet-50: default --lr 0.1, batch 1024)"),
    Protocol("linear/mmselfsup-multihead", 1,
             {"mode": "multihead", **PROTOCOLS["multihead"], "batch_size": 256, "momentum": 0.9},
             "MMSelfSup configs/benchmarks/classification/imagenet/resnet50_mhead_linear-8xb32-steplr-90e_in1k.py"),
    Protocol("linear/fast-proxy", 1, {"mode": "fast"},
             "mocobench: main_lincls.py's recipe on cached center-crop features (a proxy, no published protocol)"),
)
MULTIHEAD_LAYERS = ["feature1", "feature2", "feature3", "feature4", "feature5"]


@dataclass
class LinearConfig(FeatureSourceConfig):
    """Linear evaluation; optimiser fields left unset take the mode's published values."""
    out: str = option("runs/linear", "run directory: metrics.json, log, resumable head checkpoint")
    mode: str = option("lincls", "lincls (main_lincls.py) | lincls_v3 (moco-v3 main_lincls.py: ViT CLS or ResNet avgpool, "
                               "cosine) | multihead (MMSelfSup feature1..5) | fast (cached features, proxy)")
    layers: list[str] = field(default_factory=lambda: list(MULTIHEAD_LAYERS),
                              metadata={"help": "multihead: layers with a head (feature1..feature5, avgpool)"})
    batch_size: int = option(256, "global batch size over all ranks", at_least=1)
    epochs: Optional[int] = option(None, "epochs (lincls/fast 100, multihead 90, lincls_v3 90)", at_least=1)
    lr: Optional[float] = option(None, "learning rate (lincls/fast 30, multihead 0.01; lincls_v3: base lr per 256 images, "
                                       "3 for ViTs, 0.1 for ResNets)", above=0)
    schedule: Optional[list[int]] = option(None, "epochs where lr drops x0.1 (lincls/fast [60, 80], multihead [30, 60, 90]; lincls_v3: none, cosine)", at_least=0)
    momentum: float = option(0.9, "SGD momentum", at_least=0, below=1)
    weight_decay: Optional[float] = option(None, "weight decay (lincls/fast 0, multihead 1e-4, lincls_v3 0)", at_least=0)
    nesterov: Optional[bool] = option(None, "Nesterov momentum: true/false (multihead true)")
    jitter: Optional[float] = option(None, "train ColorJitter strength, 0 = off (multihead 0.4)", at_least=0, at_most=1)
    lighting: Optional[float] = option(None, "train PCA lighting alphastd, 0 = off (multihead 0.1)", at_least=0)
    image_size: int = option(224, "train RandomResizedCrop size", at_least=8)
    workers: int = option(8, "data loader workers per rank", at_least=0)
    eval_freq: int = option(1, "validate every N epochs (and after the last)", at_least=1)
    steps_per_epoch: int = option(0, "cap on train steps per epoch (0 = full epoch); for smoke tests", at_least=0)
    print_freq: int = option(50, "log every N steps", at_least=1)
    resume: str = option("auto", "'auto' = resume from OUT/linear_checkpoint.pth.tar if present, '' = fresh")
    dist_backend: str = option("auto", "nccl on GPU, gloo on CPU")


def resolve_protocol(cfg: LinearConfig) -> LinearConfig:
    """Fill unset optimiser fields with the published values of cfg.mode."""
    if cfg.mode not in MODES:
        raise ConfigError(f"unknown linear mode {cfg.mode!r}; choose one of {', '.join(MODES)}")
    defaults = PROTOCOLS[cfg.mode]
    return replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) is None})


# --- transforms -----------------------------------------------------------------------------------------
class Lighting:
    """AlexNet-style PCA lighting noise on a [0, 1] tensor (Krizhevsky et al. 2012; MMSelfSup `Lighting`):
    adds eigvec @ (alpha * eigval) to every pixel, alpha ~ N(0, alphastd) per image."""
    EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
    EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])

    def __init__(self, alphastd: float = 0.1):
        self.alphastd = alphastd

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        alpha = torch.randn(3) * self.alphastd
        rgb = self.EIGVEC @ (alpha * self.EIGVAL)
        return img + rgb.view(3, 1, 1)


def train_transform(cfg: LinearConfig):
    from torchvision import transforms  # here, not at import: `--mode fast` on a features file reads no images

    from mocobench.core.transforms import IMAGENET_MEAN, IMAGENET_STD
    ops = [transforms.RandomResizedCrop(cfg.image_size), transforms.RandomHorizontalFlip()]
    if cfg.jitter:
        ops.append(transforms.ColorJitter(cfg.jitter, cfg.jitter, cfg.jitter, 0.0))
    ops.append(transforms.ToTensor())
    if cfg.lighting:
        ops.append(Lighting(cfg.lighting))
    ops.append(transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    return transforms.Compose(ops)


# --- the model ------------------------------------------------------------------------------------------
class LinearEval(nn.Module):
    """A frozen backbone (always in eval mode) + one linear classifier per layer; forward -> {layer: logits}.

    lincls: the single head is the torchvision model's own `fc` on the avgpool feature, re-initialised
    N(0, 0.01) / 0, so the model is exactly main_lincls.py's. multihead: BatchNorm(affine=False) -> Linear
    per layer, as MMSelfSup's MultiClsHead (Linear init N(0, 0.01) / 0 too).
    """

    def __init__(self, backbone: nn.Module, layers: list[str], num_classes: int, bn_heads: bool,
                 input_size: int, amp: bool = False):
        super().__init__()
        backbone.requires_grad_(False)
        self.features = LayerFeatures(backbone, layers)
        self.amp = amp
        with torch.no_grad():
            shapes = {k: v.shape[1:] for k, v in self.features.eval()(torch.zeros(1, 3, input_size, input_size)).items()}
        heads = {}
        for layer in layers:
            c, h, w = shapes[layer]
            if layer in ("avgpool", "cls") and not bn_heads:  # the model's own classifier, as main_lincls.py
                backbone.fc = nn.Linear(c, num_classes)
                heads[layer] = backbone.fc
            else:
                heads[layer] = nn.Sequential(nn.BatchNorm2d(c, affine=False, momentum=0.1), nn.Flatten(),
                                             nn.Linear(c * h * w, num_classes))
        self.heads = nn.ModuleDict(heads)
        for m in self.heads.modules():
            if isinstance(m, nn.Linear):
                m.weight.requires_grad_(True)
                m.bias.requires_grad_(True)
                nn.init.normal_(m.weight, mean=0.0, std=0.01)
                nn.init.zeros_(m.bias)

    @property
    def backbone(self) -> nn.Module:
        return self.features.backbone

    def train(self, mode: bool = True):
        super().train(mode)
        self.features.eval()  # main_lincls.py: BN statistics of the pretrained model must not change
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad(), torch.autocast(x.device.type, dtype=dist.amp_dtype(x.device), enabled=self.amp):
            pooled = self.features(x)
        return {layer: head(pooled[layer].float().flatten(1) if isinstance(head, nn.Linear) else pooled[layer].float())
                for layer, head in self.heads.items()}


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def backbone_state(backbone: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items() if not k.startswith("fc.")}


class BackboneChangedError(AssertionError):
    """The frozen backbone differs from the checkpoint after training: the protocol was violated."""


def sanity_check(backbone: nn.Module, checkpoint: str, seed: int = 0) -> None:
    """main_lincls.py `sanity_check`: every backbone tensor (BN running statistics included) still equals
    a fresh load of the checkpoint."""
    reference = backbone_state(load_frozen_backbone(checkpoint, seed))
    current = backbone_state(backbone)
    changed = [k for k, v in reference.items() if k not in current or not torch.equal(current[k], v)]
    if changed:
        raise BackboneChangedError(f"{len(changed)} backbone tensors changed during linear training "
                                   f"(e.g. {changed[:4]}); the backbone must stay frozen")


# --- training -------------------------------------------------------------------------------------------
def lr_at(cfg: LinearConfig, epoch: int) -> float:
    """Step schedule of main_lincls.py / MMSelfSup: lr x0.1 at each milestone reached; lincls_v3: moco-v3's
    lr x batch / 256, half-cycle cosine over the epochs."""
    if cfg.mode == "lincls_v3":
        return cfg.lr * cfg.batch_size / 256 * 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs))
    return cfg.lr * 0.1 ** sum(epoch >= m for m in cfg.schedule)


def make_optimizer(cfg: LinearConfig, params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=bool(cfg.nesterov))


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.world_size() > 1:
        tdist.all_reduce(t)
    return t


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, layers: list[str]) -> dict[str, float]:
    """Top-1/top-5 (percent) per layer; counts summed over ranks (each rank sees its own shard)."""
    model.eval()
    counts = torch.zeros(len(layers), 2, dtype=torch.float64)
    n = torch.zeros(1, dtype=torch.float64)
    for images, target in tqdm(loader, desc="val", disable=None if dist.is_main() else True, leave=False):
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        target = target.to(device, non_blocking=True)
        out = model(images)
        for i, layer in enumerate(layers):
            counts[i] += topk_correct(out[layer], target).cpu()
        n += len(target)
    counts, n = _all_reduce_sum(counts.to(device)).cpu(), _all_reduce_sum(n.to(device)).cpu()
    res = {}
    for i, layer in enumerate(layers):
        res[f"{layer}/top1"] = (100.0 * counts[i, 0] / n).item()
        res[f"{layer}/top5"] = (100.0 * counts[i, 1] / n).item()
    return res


def topk_correct(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Number of samples whose target is the top-1 / among the top-5 (top-min(5, C)) logits."""
    ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hit = ranked == target[:, None]
    return torch.tensor([hit[:, 0].sum().item(), hit.any(dim=1).sum().item()], dtype=torch.float64)


def _loaders(cfg: LinearConfig, device: torch.device):
    from mocobench.core.transforms import eval_transform
    from mocobench.evaluate import datasets
    root = datasets.dataset_root(cfg.data, "imagefolder")
    train_ds = datasets.image_folder(root, cfg.train_split or "train", train_transform(cfg))
    val_ds = datasets.image_folder(root, cfg.test_split or "val", eval_transform(cfg.resize, cfg.crop))
    train_loader, sampler, val_loader = datasets.distributed_loaders(train_ds, val_ds, cfg.batch_size, cfg.workers,
                                                                     cfg.seed, device)
    return train_ds, train_loader, sampler, val_loader


def single_head_config(cfg: LinearConfig, backbone: nn.Module) -> LinearConfig:
    """lincls / lincls_v3 train one head, on avgpool (ResNet) or the CLS token (ViT, moco-v3 main_lincls.py):
    `layer` says which, and lincls_v3's unset lr is moco-v3's base lr for the backbone (V3_BASE_LR), so the
    run record and its protocol (the ViT and ResNet ones differ in layer and lr) tell what was trained."""
    vit = is_vit_model(backbone)
    if cfg.mode == "lincls" and vit:
        raise ConfigError(f"{cfg.checkpoint} is a ViT: main_lincls.py of MoCo v1/v2 is for ResNets; use --mode lincls_v3 "
                          "(moco-v3 main_lincls.py, the CLS token)")
    if cfg.layer == "cls" and not vit:
        raise ConfigError(f"--layer cls (the ViT protocol, --config moco-v3-vit) but {cfg.checkpoint} is a ResNet; "
                          "moco-v3's ResNet protocol is --config moco-v3-resnet (avgpool)")
    if cfg.layer not in ("avgpool", "cls"):
        raise ConfigError(f"--layer {cfg.layer}: --mode {cfg.mode} trains one head, on avgpool (ResNets) or the "
                          "CLS token (ViTs); other layers: --mode multihead, or the feature evaluators")
    cfg = replace(cfg, layer="cls" if vit else "avgpool")
    if cfg.mode == "lincls_v3" and cfg.lr is None:
        cfg = replace(cfg, lr=V3_BASE_LR["vit" if vit else "resnet"])
    return cfg


def run_images(cfg: LinearConfig, held: Claim, backbone: nn.Module | None = None) -> dict:
    """lincls / multihead: train linear heads on the frozen backbone from images (`backbone`: already loaded)."""
    start = now_iso()
    device = dist.init_from_env(cfg.dist_backend)
    torch.manual_seed(cfg.seed)
    if backbone is None:
        backbone = load_frozen_backbone(cfg.checkpoint, cfg.seed)
    train_ds, train_loader, sampler, val_loader = _loaders(cfg, device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    single = cfg.layer
    layers = [single] if cfg.mode in ("lincls", "lincls_v3") else [check_layer(x) for x in cfg.layers]
    torch.manual_seed(cfg.seed + 1)  # head init and data order, independent of how the backbone was built
    model = LinearEval(backbone, layers, len(train_ds.classes), bn_heads=cfg.mode == "multihead",
                       input_size=cfg.crop, amp=cfg.amp).to(device)
    params = trainable_parameters(model)
    expected = 2 * len(layers)  # weight + bias per head (main_lincls.py asserts 2)
    assert len(params) == expected, f"{len(params)} trainable tensors, expected {expected} (the heads only)"
    optimizer = make_optimizer(cfg, params)
    ddp = (nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
           if dist.world_size() > 1 else model)
    start_epoch, best, history = 0, {}, []
    ckpt_path = out / "linear_checkpoint.pth.tar"
    if cfg.resume and (ckpt_path.is_file() if cfg.resume == "auto" else True):
        resume_path = ckpt_path if cfg.resume == "auto" else Path(cfg.resume)
        state = safe_load(resume_path)
        prev = state.get("config", {})
        differ = [k for k in ("checkpoint", "mode", "layers", "data") if prev.get(k) != getattr(cfg, k)]
        if differ or set(state["heads"]) != set(model.heads.state_dict()):
            raise ConfigError(f"{resume_path} is from a different linear run (differs in {differ or 'heads'}); "
                              f"use another --out or --resume ''")
        model.heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best, history = int(state["epoch"]), dict(state["best"]), list(state["history"])
    steps = len(train_loader) if cfg.steps_per_epoch <= 0 else min(len(train_loader), cfg.steps_per_epoch)
    main_rank = dist.is_main()
    if main_rank:
        print(f"linear ({cfg.mode}): {cfg.checkpoint} on {train_ds.root}: {len(train_ds)} images, "
              f"{len(train_ds.classes)} classes, heads on {layers}, {dist.world_size()} process(es) on {device}, "
              f"{steps} steps/epoch" + (f"; resumed at epoch {start_epoch}" if start_epoch else ""), flush=True)
    result = {}
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        lr = lr_at(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        bar = tqdm(total=steps, desc=f"epoch {epoch}", disable=None if main_rank else True, leave=False)
        for i, (images, target) in enumerate(itertools.islice(train_loader, steps)):
            images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            target = target.to(device, non_blocking=True)
            logits = ddp(images)
            loss = sum(F.cross_entropy(logits[layer], target) for layer in layers)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at epoch {epoch} step {i}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.3g}")
            if main_rank and (i + 1) % cfg.print_freq == 0:
                bar.write(f"epoch {epoch} [{i + 1}/{steps}] loss {loss.item():.4f} lr {lr:.4g}")
        bar.close()
        if (epoch + 1) % cfg.eval_freq == 0 or epoch + 1 == cfg.epochs:
            result = evaluate(model, val_loader, device, layers)
            history.append({"epoch": epoch + 1, **result})
            for k, v in result.items():
                best[k] = max(best.get(k, -math.inf), v)
            if main_rank:
                print(f"epoch {epoch}: " + ", ".join(f"{k} {v:.2f}" for k, v in result.items()), flush=True)
        if main_rank:
            atomic_save({"epoch": epoch + 1, "heads": model.heads.state_dict(), "optimizer": optimizer.state_dict(),
                         "best": best, "history": history, "config": to_dict(cfg)}, ckpt_path)
        dist.barrier()
    if not result and history:
        result = {k: v for k, v in history[-1].items() if k != "epoch"}
    sanity_check(model.backbone, cfg.checkpoint, cfg.seed)
    metrics = dict(result)
    if cfg.mode in ("lincls", "lincls_v3") and result:
        metrics["top1"], metrics["top5"] = result[f"{single}/top1"], result[f"{single}/top5"]
        metrics["best_top1"] = best.get(f"{single}/top1")
    metrics["details"] = {"history": history, "best": best, "backbone_unchanged": True}
    if main_rank:
        report(cfg, BENCHMARK[cfg.mode], metrics, start,
               f"linear ({cfg.mode}): " + ", ".join(f"{k} {v:.2f}" for k, v in result.items()), run_id=held.run_id,
               protocols=NAMED_PROTOCOLS, family="linear")
    return metrics


# --- fast mode on cached features -----------------------------------------------------------------------
def fit_linear(train_feats: np.ndarray, train_labels: np.ndarray, num_classes: int, cfg: LinearConfig,
               device: torch.device | None = None) -> nn.Linear:
    """SGD on a Linear(D, C) over (memory-mapped) features with cfg's optimiser and step schedule."""
    device = device or torch.device("cpu")
    gen = torch.Generator().manual_seed(cfg.seed)
    head = nn.Linear(train_feats.shape[1], num_classes).to(device)
    nn.init.normal_(head.weight, mean=0.0, std=0.01, generator=gen)
    nn.init.zeros_(head.bias)
    optimizer = make_optimizer(cfg, head.parameters())
    labels = torch.as_tensor(train_labels)
    n = len(train_feats)
    for epoch in tqdm(range(cfg.epochs), desc="linear (fast)", disable=None, leave=False):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, epoch)
        perm = torch.randperm(n, generator=gen)
        batches = perm.split(cfg.batch_size)
        if cfg.steps_per_epoch > 0:
            batches = batches[:cfg.steps_per_epoch]
        for idx in batches:
            idx = idx.sort().values.numpy()  # sorted rows read a memory map sequentially
            x = torch.from_numpy(np.asarray(train_feats[idx], dtype=np.float32)).to(device)
            loss = F.cross_entropy(head(x), labels[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return head


@torch.no_grad()
def accuracy_on_features(head: nn.Linear, feats: np.ndarray, labels: np.ndarray, chunk: int = 8192) -> dict:
    device = head.weight.device
    counts = torch.zeros(2, dtype=torch.float64)
    for s in range(0, len(feats), chunk):
        x = torch.from_numpy(np.array(feats[s:s + chunk], dtype=np.float32)).to(device)  # copy of a chunk
        counts += topk_correct(head(x), torch.as_tensor(labels[s:s + chunk]).to(device))
    return {"top1": (100 * counts[0] / len(feats)).item(), "top5": (100 * counts[1] / len(feats)).item()}


def run_fast(cfg: LinearConfig, held: Claim) -> dict:
    """The fast proxy: the lincls recipe on cached center-crop features (single process)."""
    start = now_iso()
    path = resolve_features(cfg)
    fs = load_features(path)
    if fs.multilabel:
        raise FeatureFileError(f"{path}: linear evaluation needs single-label features (1-d class ids)")
    num_classes = int(max(fs.train_labels.max(), fs.test_labels.max())) + 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    head = fit_linear(fs.train_feats, fs.train_labels, num_classes, cfg, device)
    acc = accuracy_on_features(head, fs.test_feats, fs.test_labels)
    layer = fs.meta.get("layer", cfg.layer)
    metrics = {"top1": acc["top1"], "top5": acc["top5"], f"{layer}/top1": acc["top1"], f"{layer}/top5": acc["top5"],
               "details": {"features": str(path), "proxy": "fast mode: cached center-crop features, no augmentation; "
                           "not the main_lincls.py protocol"}}
    summary = f"linear (fast, proxy): top1 {acc['top1']:.2f} top5 {acc['top5']:.2f} on {path}"
    report(cfg, BENCHMARK[cfg.mode], metrics, start, summary, fs.meta.get("checkpoint_key"), held.run_id,
           NAMED_PROTOCOLS, "linear")
    return metrics


def run(cfg: LinearConfig) -> dict:
    cfg = resolve_protocol(cfg)
    for layer in cfg.layers:
        check_layer(layer)
    if "voc_svm" in cfg.layers and cfg.mode == "multihead":
        raise ConfigError("multihead layers are feature1..feature5 and avgpool; voc_svm is the SVM feature")
    if cfg.mode != "fast":
        if cfg.features:
            raise ConfigError("--features is only used by --mode fast; lincls/multihead train on images")
        if not cfg.checkpoint:
            raise ConfigError("give --checkpoint (a checkpoint path or random:ARCH[:WIDTH])")
        check_checkpoint(cfg.checkpoint)
        if cfg.dataset != "imagefolder":
            raise ConfigError("linear evaluation reads an ImageFolder dataset (--dataset imagefolder)")
    backbone = None
    if cfg.mode in ("lincls", "lincls_v3"):
        backbone = load_frozen_backbone(cfg.checkpoint, cfg.seed)
        cfg = single_head_config(cfg, backbone)
    held = claim_out(cfg, BENCHMARK[cfg.mode])
    if held.finished is not None:
        return held.finished["metrics"]
    return run_fast(cfg, held) if cfg.mode == "fast" else run_images(cfg, held, backbone)
