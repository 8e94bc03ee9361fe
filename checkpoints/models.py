"""A torchvision ResNet or timm ViT built from a checkpoint (or `random:ARCH[:WIDTH]`) with its weights loaded.

Loading follows main_lincls.py of facebookresearch/moco: only the classifier may be missing.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from mocobench.checkpoints.canonical import LoadedCheckpoint
from mocobench.checkpoints.formats import load_backbone
from mocobench.checkpoints.random_init import parse_random_spec, random_model
from mocobench.core.backbones import SMALL_SUFFIX, build_backbone
from mocobench.core.errors import CheckpointError


def _shape_report(state: Mapping[str, torch.Tensor], model: nn.Module, arch: str, width: int) -> str | None:
    """None when `state` fits `model` (fc and BN counters may be missing), else which keys/shapes differ."""
    target = model.state_dict()
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
              for k, v in state.items() if k in target and tuple(v.shape) != tuple(target[k].shape)]
    unexpected = [k for k in state if k not in target]
    missing = [k for k in target if k not in state and not k.startswith("fc.")
               and not k.endswith("num_batches_tracked")]
    if not (shapes or unexpected or missing):
        return None
    parts = [f"architecture mismatch with {arch} (width {width})"]
    for label, items in (("shapes differ", shapes), ("keys not in the model", unexpected),
                         ("model keys missing from the checkpoint", missing)):
        if items:
            parts.append(f"{label} ({len(items)}): " + "; ".join(items[:8]) + (" ..." if len(items) > 8 else ""))
    return ". ".join(parts)


def model_from_checkpoint(path: str | Path, trust: bool = False, num_classes: int | None = None,
                arch: str | None = None, width: int | None = None) -> tuple[nn.Module, LoadedCheckpoint]:
    """A torchvision ResNet with the checkpoint's backbone loaded, as main_lincls.py of
    facebookresearch/moco does: the only keys allowed to be missing are fc.weight/fc.bias (plus BN
    `num_batches_tracked` counters some formats omit). Without a usable classifier in the checkpoint
    the fc is re-initialised N(0, 0.01), bias 0. `arch`/`width` override the inferred ones."""
    spec = parse_random_spec(str(path))
    if spec is not None:
        return random_model(arch or spec[0], width or spec[1], num_classes or 1000)
    ckpt = load_backbone(path, trust=trust)
    arch = arch or ckpt.arch
    width = width or (ckpt.width if arch.endswith(SMALL_SUFFIX) else 64)  # a width only small archs have
    state = dict(ckpt.state_dict)
    if ckpt.has_fc and num_classes is None:
        num_classes = int(state["fc.weight"].shape[0])
    try:
        model = build_backbone(arch, num_classes or 1000, width)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if ckpt.has_fc and tuple(state["fc.weight"].shape) != tuple(model.fc.weight.shape):
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # new task: new classifier
    problem = _shape_report(state, model, arch, width)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    msg = model.load_state_dict(state, strict=False)
    missing = {k for k in msg.missing_keys if not k.endswith("num_batches_tracked")}
    assert missing <= {"fc.weight", "fc.bias"} and not msg.unexpected_keys, (missing, msg.unexpected_keys)
    if "fc.weight" in missing:
        nn.init.normal_(model.fc.weight, mean=0.0, std=0.01)
        nn.init.zeros_(model.fc.bias)
    return model, ckpt
