"""Frozen-backbone features at any layer: layer names, stage maps, pooling, the multi-layer feature module,
extraction over a dataset, and the frozen backbone of a checkpoint.

Layers (MMSelfSup `MultiPooling` / VISSL naming: feature1 = stem, feature2..5 = res2..res5):

  feature1..feature5  MMSelfSup's linear-eval pooling (openselfsup/models/utils/multi_pooling.py): for a
                      ResNet-50 at 224 px ("specified") AvgPool k10/s10/p4, k16/s8, k13/s5, k8/s3, k6/s1 on
                      the 112/56/28/14/7 px maps -> 9216/9216/8192/9216/8192-d; any other map size uses the
                      same output grids 12/6/4/3/2 with adaptive average pooling.
  avgpool             global average pool of res5 (2048-d for ResNet-50): what main_lincls.py and kNN use.
  voc_svm             res5 -> AvgPool2d(6, stride 1) (8192-d at 224 px), the VOC07 SVM feature of VISSL and
                      MMSelfSup; maps smaller than 6 px (small-image demo models) use a 2x2 adaptive pool.

ViT layers (the token sequence after each block, with the final norm applied, as DINO's
`get_intermediate_layers`):

  cls                 the CLS token after the last block and the final norm: what MoCo v3 `main_lincls.py`, DINO's
                      kNN (`eval_knn.py`) and timm's `global_pool='token'` use (384-d for ViT-S).
  patch_mean          the mean of the last block's patch tokens (DINO `eval_linear.py --avgpool_patchtokens`).
  cls_last4           the CLS tokens of the last 4 blocks, concatenated (DINO `eval_linear.py` for ViT-S,
                      `n_last_blocks 4`; 1536-d for ViT-S).

ResNet layers on a ViT, or ViT layers on a ResNet, are errors naming the layers that apply.

The backbone runs in eval() mode (BN uses its running statistics) under no_grad, fp32 by default; `amp`
gives bf16 autocast (a fast path whose deviation from fp32 is bounded by a test).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mocobench.core.distributed import amp_dtype
from mocobench.core.errors import ConfigError, DataError

RESNET_LAYERS = ("feature1", "feature2", "feature3", "feature4", "feature5", "avgpool", "voc_svm")
VIT_LAYERS = ("cls", "patch_mean", "cls_last4")
FEATURE_LAYERS = RESNET_LAYERS + VIT_LAYERS
VIT_LAST_BLOCKS = {"cls": 1, "patch_mean": 1, "cls_last4": 4}
STAGE_OF_LAYER = {"feature1": 0, "feature2": 1, "feature3": 2, "feature4": 3, "feature5": 4, "avgpool": 4,
                  "voc_svm": 4}
# MMSelfSup MultiPooling for ResNet-50 at 224 px: map size -> (kernel, stride, padding), and output grids.
SPECIFIED_POOL = {0: (112, (10, 10, 4)), 1: (56, (16, 8, 0)), 2: (28, (13, 5, 0)), 3: (14, (8, 3, 0)),
                  4: (7, (6, 1, 0))}
POOL_SIZES = (12, 6, 4, 3, 2)


def check_layer(layer: str) -> str:
    if layer not in FEATURE_LAYERS:
        raise ConfigError(f"unknown feature layer {layer!r}; choose one of {', '.join(FEATURE_LAYERS)}")
    return layer


def stage_maps(model: nn.Module, x: torch.Tensor, upto: int) -> list[torch.Tensor]:
    """Feature maps of a torchvision ResNet: [stem (conv1-bn1-relu, before max-pool), res2, .., res5],
    computed only up to stage index `upto` (0 = stem)."""
    x = model.relu(model.bn1(model.conv1(x)))
    maps = [x]
    x = model.maxpool(x)
    for i in range(1, upto + 1):
        x = getattr(model, f"layer{i}")(x)
        maps.append(x)
    return maps


def pool_map(layer: str, fmap: torch.Tensor) -> torch.Tensor:
    """The pooled (N, C, h, w) map a layer's features are made of (see the module docstring)."""
    if layer == "avgpool":
        return F.adaptive_avg_pool2d(fmap, 1)
    if layer == "voc_svm":
        if min(fmap.shape[-2:]) >= 6:
            return F.avg_pool2d(fmap, kernel_size=6, stride=1)
        return F.adaptive_avg_pool2d(fmap, 2)
    stage = STAGE_OF_LAYER[layer]
    size, (k, s, p) = SPECIFIED_POOL[stage]
    if tuple(fmap.shape[-2:]) == (size, size):
        return F.avg_pool2d(fmap, kernel_size=k, stride=s, padding=p)
    return F.adaptive_avg_pool2d(fmap, POOL_SIZES[stage])


def is_vit_model(model: nn.Module) -> bool:
    return hasattr(model, "cls_token") and hasattr(model, "blocks")


def vit_last_tokens(model: nn.Module, x: torch.Tensor, n: int) -> list[torch.Tensor]:
    """The token sequences (N, 1 + patches, D) after the last `n` blocks of a timm ViT, each through the
    final norm (DINO `vision_transformer.py` `get_intermediate_layers`)."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    out = []
    for i, block in enumerate(model.blocks):
        x = block(x)
        if i >= len(model.blocks) - n:
            out.append(model.norm(x))
    return out


def vit_feature(layer: str, tokens: list[torch.Tensor]) -> torch.Tensor:
    """A ViT layer's feature (N, D, 1, 1) from `vit_last_tokens` (see the module docstring)."""
    if layer == "cls":
        f = tokens[-1][:, 0]
    elif layer == "patch_mean":
        f = tokens[-1][:, 1:].mean(dim=1)
    else:
        f = torch.cat([t[:, 0] for t in tokens[-VIT_LAST_BLOCKS[layer]:]], dim=-1)
    return f[:, :, None, None]


class LayerFeatures(nn.Module):
    """Pooled features {layer: (N, C, h, w)} of a frozen torchvision ResNet (runs only the stages needed) or a
    timm ViT (ViT layers are (N, D, 1, 1))."""

    def __init__(self, backbone: nn.Module, layers: list[str] | tuple[str, ...]):
        super().__init__()
        self.backbone = backbone
        self.layers = [check_layer(layer) for layer in layers]
        self.vit = is_vit_model(backbone)
        kind, allowed = ("ViT", VIT_LAYERS) if self.vit else ("ResNet", RESNET_LAYERS)
        wrong = [layer for layer in self.layers if layer not in allowed]
        if wrong:
            raise ConfigError(f"layer {', '.join(wrong)} does not apply to a {kind}; its layers: {', '.join(allowed)}")
        if self.vit and len(backbone.blocks) < max(VIT_LAST_BLOCKS[layer] for layer in self.layers):
            short = [x for x in self.layers if VIT_LAST_BLOCKS[x] > len(backbone.blocks)]
            raise ConfigError(f"layer {', '.join(short)} needs the last {VIT_LAST_BLOCKS[short[0]]} blocks; this "
                              f"ViT has {len(backbone.blocks)}")
        self.upto = (max(VIT_LAST_BLOCKS[layer] for layer in self.layers) if self.vit
                     else max(STAGE_OF_LAYER[layer] for layer in self.layers))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.vit:
            tokens = vit_last_tokens(self.backbone, x, self.upto)
            return {layer: vit_feature(layer, tokens) for layer in self.layers}
        maps = stage_maps(self.backbone, x, self.upto)
        return {layer: pool_map(layer, maps[STAGE_OF_LAYER[layer]]) for layer in self.layers}


@torch.no_grad()
def extract(model: nn.Module, dataset, layer: str, batch_size: int = 256, workers: int = 4, amp: bool = False,
            device: torch.device | None = None, out_path: str | Path | None = None,
            desc: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Features of every item of `dataset` (items: (image tensor, label)) at `layer`, in dataset order.

    Returns (float32 N x D features, labels as an int64 vector or N x C matrix). With `out_path` the features
    are written to a `.npy` memory map there instead of RAM. The model is put in eval() mode.
    """
    check_layer(layer)
    device = device or next(model.parameters()).device
    model.eval()
    net = LayerFeatures(model, [layer])
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    feats, labels, pos = None, [], 0
    for images, targets in tqdm(loader, desc=desc or f"extract {layer}", disable=None, leave=False):
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype(device), enabled=amp):
            f = net(images)[layer]
        f = f.float().flatten(1).cpu().numpy()
        if feats is None:
            shape = (len(dataset), f.shape[1])
            feats = (np.lib.format.open_memmap(out_path, mode="w+", dtype=np.float32, shape=shape)
                     if out_path is not None else np.empty(shape, dtype=np.float32))
        feats[pos:pos + len(f)] = f
        pos += len(f)
        labels.append(np.asarray(targets))
    if feats is None:
        raise DataError(f"cannot extract features from an empty dataset ({getattr(dataset, 'root', dataset)})")
    if isinstance(feats, np.memmap):
        feats.flush()
    return feats, np.concatenate(labels).astype(np.int64)


def load_frozen_backbone(checkpoint: str | Path, seed: int = 0, device: torch.device | None = None) -> nn.Module:
    """The checkpoint's backbone as a torchvision ResNet in eval() mode, every parameter frozen."""
    from mocobench.checkpoints.models import model_from_checkpoint  # torchvision: only when a network is built
    torch.manual_seed(seed)  # only matters for random:ARCH specs
    model, _ = model_from_checkpoint(checkpoint)
    model.requires_grad_(False)
    return model.to(device or torch.device("cpu")).eval()
