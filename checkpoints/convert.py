"""Checkpoint writers (torchvision, timm, MoCo, detectron2 layouts) and `convert`: read any format, write one.

Every writer starts from the canonical torchvision form (`LoadedCheckpoint`). The detectron2 payload is
the one facebookresearch/moco detection/convert-pretrain-to-detectron2.py writes.
"""
from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch

from mocobench.checkpoints.canonical import LoadedCheckpoint
from mocobench.checkpoints.detectron2_names import tv_to_d2
from mocobench.checkpoints.formats import load_backbone
from mocobench.checkpoints.random_init import parse_random_spec
from mocobench.checkpoints.vit_names import canonical_to_timm
from mocobench.core.atomic import atomic_save, atomic_write
from mocobench.core.backbones import infer_arch
from mocobench.core.errors import CheckpointError
from mocobench.core.vit import is_vit, vit_archs, vit_shape

WRITE_FORMATS = ("torchvision", "timm", "moco", "detectron2")
RESNET_ONLY = ("torchvision", "detectron2")  # layouts that hold ResNets only


def to_detectron2(state_dict: Mapping[str, torch.Tensor], author: str = "mocobench") -> dict:
    """The detectron2 pickle payload {"model": {d2 name: numpy array}, "__author__", "matching_heuristics"}."""
    model = {}
    for name, value in state_dict.items():
        tensor = value.detach().cpu()
        model[tv_to_d2(name)] = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
    return {"model": model, "__author__": author, "matching_heuristics": True}


def write_checkpoint(state_dict: Mapping[str, torch.Tensor], fmt: str, path: str | Path, arch: str | None = None,
                     width: int | None = None, head: Mapping[str, torch.Tensor] | None = None,
                     epoch: int | None = None, author: str = "mocobench", source_format: str | None = None) -> Path:
    """Write a canonical (torchvision-named) state dict as `fmt`:

    - torchvision: the plain state dict (what torchvision's load_state_dict and MMDetection's
      `init_cfg=dict(type='Pretrained', checkpoint=...)` read); `head` is not written.
    - timm: the plain state dict in timm's names (a ViT's `fc` back to `head`; a ResNet's names are
      torchvision's), what `timm.create_model(..., pretrained_cfg_overlay=dict(file=...))` reads.
    - moco: our/official MoCo layout, weights under `module.encoder_q.` (head as `encoder_q.fc.*`),
      with `epoch`, `arch` and a `config` dict; it has no key encoder or queue (not resumable). A ViT is
      written in the MoCo v3 layout (`module.base_encoder.`, timm names), its `config.arch` naming the
      number of heads, which no tensor shape tells.
    - detectron2: the pickle of `to_detectron2(state_dict + head)`, as the official MoCo script writes.
    """
    if fmt not in WRITE_FORMATS:
        raise CheckpointError(f"unknown output format {fmt!r}; choose one of {', '.join(WRITE_FORMATS)}")
    state = {k: v.detach().cpu() for k, v in state_dict.items()}
    head = {k: v.detach().cpu() for k, v in (head or {}).items()}
    if arch is None or width is None:
        guessed = infer_arch(state)
        arch, width = arch or guessed[0], width or guessed[1]
    if "cls_token" in state and fmt in RESNET_ONLY:
        raise CheckpointError(f"{arch} is a ViT; the {fmt} layout holds ResNets here: convert with --to timm "
                              f"or --to moco")
    if fmt == "timm":  # a ViT's classifier is timm's `head`; a ResNet's keeps torchvision's `fc`, as timm's
        vit = "cls_token" in state
        return atomic_save({(canonical_to_timm(k) if vit else k): v for k, v in state.items()}, path)
    if fmt == "torchvision":
        return atomic_save(state, path)
    if fmt == "detectron2":
        payload = to_detectron2({**state, **head}, author=author)
        return atomic_write(path, lambda f: pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL))
    if "cls_token" in state:
        config = {"arch": arch, "width": width, "converted_from": source_format}
        return atomic_save({"epoch": int(epoch or 0), "arch": arch, "config": config, "state_dict": {
            f"module.base_encoder.{canonical_to_timm(k)}": v for k, v in state.items()}}, path)
    full = {**state, **head}
    linears = [v for k, v in full.items() if k.startswith("fc.") and k.endswith("weight") and v.ndim == 2]
    config = {"arch": arch, "width": width, "mlp": any(k.startswith("fc.0.") for k in full),
              "moco_dim": int(linears[-1].shape[0]) if linears else None, "converted_from": source_format}
    obj = {"epoch": int(epoch or 0), "arch": arch, "config": config,
           "state_dict": {f"module.encoder_q.{k}": v for k, v in full.items()}}
    return atomic_save(obj, path)


_D2_AUTHOR = {"moco": "MOCO", "torchvision": "torchvision"}  # what the official converters write


def with_vit_arch(ckpt: LoadedCheckpoint, arch: str) -> LoadedCheckpoint:
    """`ckpt` read as the ViT `arch`, which must have its embed dim, depth and patch: how to say a ViT's
    number of heads where its file cannot (core/vit.py)."""
    if not is_vit(ckpt.arch) or not is_vit(arch):
        raise CheckpointError(f"--arch {arch}: only a ViT's arch can be overridden (the file holds {ckpt.arch}; "
                              f"expected one of {', '.join(vit_archs())})")
    have, want = vit_shape(ckpt.arch), vit_shape(arch)
    if (have[0], have[1], have[3]) != (want[0], want[1], want[3]):
        raise CheckpointError(f"--arch {arch}: embed dim {want[0]}, depth {want[1]}, patch {want[3]}, but the "
                              f"checkpoint {ckpt.source} has {have[0]}, {have[1]}, {have[3]} ({ckpt.arch})")
    return dataclasses.replace(ckpt, arch=arch)


def convert(src: str | Path, fmt: str, out: str | Path, trust: bool = False,
            arch: str | None = None) -> LoadedCheckpoint:
    """Read `src` (any supported format) and write it as `fmt`; returns what was read. `arch` overrides a
    ViT's arch (`with_vit_arch`)."""
    if fmt not in WRITE_FORMATS:
        raise CheckpointError(f"unknown output format {fmt!r}; choose one of {', '.join(WRITE_FORMATS)}")
    if fmt == "detectron2" and not str(out).endswith(".pkl"):
        raise CheckpointError(f"{out}: detectron2 reads pickled weights only from files ending in .pkl")
    if parse_random_spec(str(src)) is None and Path(src).resolve() == Path(out).resolve():
        raise CheckpointError(f"{out}: output would overwrite the input checkpoint")
    ckpt = load_backbone(src, trust=trust)
    if arch is not None:
        ckpt = with_vit_arch(ckpt, arch)
    write_loaded(ckpt, fmt, out)
    return ckpt


def write_loaded(ckpt: LoadedCheckpoint, fmt: str, out: str | Path) -> Path:
    """Write what `load_backbone` read as `fmt` (head, epoch and the detectron2 author as `convert` does)."""
    return write_checkpoint(ckpt.state_dict, fmt, out, arch=ckpt.arch, width=ckpt.width, head=ckpt.head,
                            epoch=ckpt.epoch, author=_D2_AUTHOR.get(ckpt.format, "mocobench"),
                            source_format=ckpt.format)
