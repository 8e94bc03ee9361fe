"""Backbones: any torchvision ResNet by name, small-image variants `<resnet>_small`, and ViTs (core/vit.py).

The small variants (for 32-96 px data, like CIFAR ResNets) replace the 7x7/2 stem and max-pool with a
3x3/1 conv and take a `width` (channels of the first stage; 64 = standard). Parameter names are exactly
torchvision's (`conv1`, `bn1`, `layer1.0.conv1`, ..., `fc`), so every checkpoint converter works on them.
"""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from mocobench.core.vit import build_vit, infer_vit_arch, is_vit, vit_archs

SMALL_SUFFIX = "_small"


def is_small(arch: str) -> bool:
    return arch.endswith(SMALL_SUFFIX)


def available_archs() -> list[str]:
    names = [n for n in torchvision.models.resnet.__all__ if n.startswith(("resnet", "wide_resnet", "resnext"))
             and n[0].islower()]
    return names + [n + SMALL_SUFFIX for n in names] + vit_archs()


def check_arch(arch: str, width: int = 64) -> None:
    """A ValueError saying what is wrong unless `build_backbone(arch, width=width)` can build it."""
    if is_vit(arch):
        if width != 64:
            raise ValueError(f"width={width} is only supported for the small-image ResNets (*{SMALL_SUFFIX}); "
                             f"a ViT's size is in its name ({arch})")
        return
    base = arch[: -len(SMALL_SUFFIX)] if is_small(arch) else arch
    if base not in torchvision.models.resnet.__all__ or not base[0].islower():
        raise ValueError(f"unknown arch {arch!r}; choose one of {available_archs()}")
    if not is_small(arch) and width != 64:
        raise ValueError(f"width={width} is only supported for the small-image archs (*{SMALL_SUFFIX})")


def build_backbone(arch: str = "resnet50", num_classes: int = 1000, width: int = 64) -> nn.Module:
    """A randomly initialised torchvision ResNet (or small-stem variant, or ViT) with an `fc` of `num_classes`."""
    check_arch(arch, width)
    if is_vit(arch):
        return build_vit(arch, num_classes)
    base = arch[: -len(SMALL_SUFFIX)] if is_small(arch) else arch
    model = getattr(torchvision.models, base)(weights=None, num_classes=num_classes)
    return _small_stem(model, width, num_classes) if is_small(arch) else model


def _small_stem(model: torchvision.models.ResNet, width: int, num_classes: int) -> nn.Module:
    """Rebuild a torchvision ResNet with a 3x3/1 stem, no max-pool and stage widths w, 2w, 4w, 8w."""
    block = type(model.layer1[0])
    depths = [len(getattr(model, f"layer{i}")) for i in range(1, 5)]
    model.inplanes = width
    model.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
    model.bn1 = model._norm_layer(width)
    model.maxpool = nn.Identity()
    model.layer1 = model._make_layer(block, width, depths[0])
    model.layer2 = model._make_layer(block, width * 2, depths[1], stride=2)
    model.layer3 = model._make_layer(block, width * 4, depths[2], stride=2)
    model.layer4 = model._make_layer(block, width * 8, depths[3], stride=2)
    model.fc = nn.Linear(width * 8 * block.expansion, num_classes)
    for m in model.modules():  # torchvision's init for the rebuilt layers
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def infer_arch(state_dict: dict[str, torch.Tensor], vit_heads: dict[int, int] | None = None) -> tuple[str, int]:
    """Guess (arch, width) from a torchvision-named ResNet or timm-named ViT state dict (fc optional).

    Depth comes from the number of blocks per stage and the block type (3 convs = Bottleneck);
    the stem size tells the small variants apart; width is conv1's output channels.
    """
    if "cls_token" in state_dict:
        return infer_vit_arch(state_dict, vit_heads), 64
    if "conv1.weight" not in state_dict:
        raise ValueError("not a torchvision ResNet state dict: no 'conv1.weight' key")
    depths = []
    for stage in range(1, 5):
        blocks = {int(k.split(".")[1]) for k in state_dict if k.startswith(f"layer{stage}.")}
        depths.append(max(blocks) + 1 if blocks else 0)
    bottleneck = any(k.startswith("layer1.0.conv3.") for k in state_dict)
    table = {(2, 2, 2, 2, False): "resnet18", (3, 4, 6, 3, False): "resnet34", (3, 4, 6, 3, True): "resnet50",
             (3, 4, 23, 3, True): "resnet101", (3, 8, 36, 3, True): "resnet152"}
    key = (*depths, bottleneck)
    if key not in table:
        raise ValueError(f"unrecognised ResNet layout: blocks per stage {depths}, bottleneck={bottleneck}")
    arch = table[key]
    conv1 = state_dict["conv1.weight"]
    width = int(conv1.shape[0])
    if conv1.shape[-1] == 3:
        return arch + SMALL_SUFFIX, width
    if bottleneck:  # wide/resnext variants change inner widths; the plain name is the honest guess
        inner = int(state_dict["layer1.0.conv1.weight"].shape[0])
        if inner == 128:
            arch = "wide_" + arch + "_2"
    return arch, width

