"""Checkpoint format detection and readers: any supported layout -> the canonical torchvision ResNet form.

`load_backbone` reads a file through `safe_load`, asks each reader in turn whether it knows the layout,
and renames the ResNet's keys to torchvision's (see `LoadedCheckpoint`); a projection head, if any, is
kept aside. A new input format is one reader. Supported layouts (sources in docs/checkpoints.md): MoCo
v1/v2 (ours and facebookresearch/moco), MoCo v3 ResNet, MMSelfSup/OpenSelfSup, VISSL, torchvision, timm
training checkpoints, `module.`-prefixed DDP dumps (SwAV, DINO, BYOL style) and detectron2 `.pkl` files; and ViTs (into timm's
names, core/vit.py): MoCo v3, DINO, MAE, timm, torchvision `vit_*` and MMSelfSup.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mocobench.checkpoints.canonical import LoadedCheckpoint
from mocobench.checkpoints.detectron2_names import d2_to_tv
from mocobench.checkpoints.random_init import parse_random_spec, random_model
from mocobench.checkpoints.safe_load import safe_load
from mocobench.checkpoints.vit_names import mmselfsup_to_timm, timm_to_canonical, torchvision_to_timm
from mocobench.core.backbones import infer_arch
from mocobench.core.errors import CheckpointError
from mocobench.core.vit import is_vit, vit_shape
from mocobench.core.records import file_md5

_BACKBONE_KEY = re.compile(r"^(conv1|bn1)\.[^.]+$|^layer[1-4]\.\d+\.")
_VIT_KEY = re.compile(r"^(cls_token|pos_embed)$|^patch_embed\.proj\.|^blocks\.\d+\.|^norm\.(weight|bias)$")


@dataclass
class _Layout:
    """What a reader found: where the ResNet lives in which flat dict, and how to rename its keys."""

    format: str
    weights: Mapping[str, Any]
    prefix: str = ""
    fc_is_head: bool = True        # `fc` under the prefix is a projection head, not a classifier
    rename: Callable[[str], str] = lambda k: k
    epoch: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    outside: list[str] = field(default_factory=list)  # other source keys, reported as dropped
    droppable: tuple[str, ...] = ()  # ViT layouts: names under the prefix that are not the backbone (MAE decoder)
    vit_heads: dict[int, int] = field(default_factory=dict)  # embed dim -> heads where the format's differ


def _sub(obj: Any, key: str) -> Mapping | None:
    value = obj.get(key) if isinstance(obj, Mapping) else None
    return value if isinstance(value, Mapping) else None


def _names(obj: Mapping | None, prefix: str = "") -> list[str]:
    return [prefix + str(k) for k in obj] if obj else []


def _with_prefix(sd: Mapping, *prefixes: str) -> str | None:
    return next((p for p in prefixes if f"{p}conv1.weight" in sd), None)


def _vit_prefix(sd: Mapping, *prefixes: str) -> str | None:
    """The prefix under which a timm-named ViT lives (its class token and patch embedding)."""
    return next((p for p in prefixes if f"{p}cls_token" in sd and f"{p}patch_embed.proj.weight" in sd), None)


def _read_detectron2(obj: Any) -> _Layout | None:
    model = _sub(obj, "model") if _sub(obj, "model") is not None else obj
    if not isinstance(model, Mapping):
        return None
    if "stem.conv1.weight" not in model:
        if any(k in model for k in ("conv1_w", "res_conv1_bn_s", "res2_0_branch2a_w")):
            raise ValueError("Caffe2/Detectron1-named weights (e.g. 'res2_0_branch2a_w', MSRA's R-50.pkl) are "
                             "not supported: they use BGR 0-255 input and frozen BN, not a torchvision ResNet")
        return None
    author = obj.get("__author__") if isinstance(obj, Mapping) else None
    return _Layout("detectron2", model, fc_is_head=(author == "MOCO"), rename=d2_to_tv, meta={"author": author})


def _read_vissl(obj: Any) -> _Layout | None:
    classy = _sub(obj, "classy_state_dict")
    if classy is None:
        return None
    model = _sub(_sub(classy, "base_model"), "model")
    trunk = _sub(model, "trunk")
    if trunk is None:
        raise ValueError("VISSL checkpoint without classy_state_dict.base_model.model.trunk")
    phase = obj.get("train_phase_idx")
    return _Layout("vissl", trunk, prefix=_with_prefix(trunk, "_feature_blocks.", "") or "_feature_blocks.",
                   epoch=phase + 1 if isinstance(phase, int) else None,
                   outside=_names(_sub(model, "heads"), "heads."))


def _read_moco(obj: Any) -> _Layout | None:
    sd = _sub(obj, "state_dict")
    prefix = _with_prefix(sd or {}, "module.encoder_q.", "encoder_q.")
    if prefix is None:
        return None
    fc = [k for k in sd if k.startswith(prefix + "fc.")]
    version = "v2" if any(k.startswith(prefix + "fc.0.") for k in fc) else "v1" if fc else "unknown"
    config = obj.get("config") if isinstance(obj.get("config"), Mapping) else {}
    return _Layout("moco", sd, prefix=prefix, epoch=obj.get("epoch"),
                   meta={"moco_version": version, "stored_arch": obj.get("arch"), "config": dict(config)})


# No tensor shape tells a ViT's number of heads (core/vit.py), so each reader says it where its format differs
# from DeiT/timm's: moco-v3 vits.py `vit_small` and mmpretrain's `mocov3-small` (MMSelfSup's MoCo v3 ViT-S)
# have 12 heads, not 6. moco-v3's own arch names (main_moco.py/main_lincls.py `--arch`) -> ours:
MOCO_V3_VIT_HEADS = {384: 12}
_MOCO_V3_ARCHS = {"vit_small": "vit_small_h12", "vit_base": "vit_base"}


def _heads_of(arch: str) -> dict[int, int]:
    """{embed dim: heads} of one of our ViT arch names."""
    embed, _, heads, _, _ = vit_shape(arch)
    return {embed: heads}


def _moco_v3_heads(obj: Mapping) -> dict[int, int]:
    """Our files (runs and `convert --to moco`) record our arch name in `config.arch` (vit_small is 6 heads
    here); official moco-v3 files have no `config` and record moco-v3's name (`arch`: vit_small = 12 heads);
    neither: MoCo v3's default."""
    config = obj.get("config") if isinstance(obj.get("config"), Mapping) else {}
    ours, stored = config.get("arch"), obj.get("arch")
    if isinstance(ours, str) and is_vit(ours):
        return _heads_of(ours)
    if isinstance(stored, str) and stored in _MOCO_V3_ARCHS:
        return _heads_of(_MOCO_V3_ARCHS[stored])
    return MOCO_V3_VIT_HEADS


def _read_moco_v3(obj: Any) -> _Layout | None:
    """facebookresearch/moco-v3 `main_moco.py` (and ours, algorithm: moco_v3): ResNet (`fc` = projector) or
    ViT (`head` = projector)."""
    sd = _sub(obj, "state_dict") or {}
    prefix = _with_prefix(sd, "module.base_encoder.", "base_encoder.")
    vit = _vit_prefix(sd, "module.base_encoder.", "base_encoder.")
    if prefix is None and vit is None:
        return None
    return _Layout("moco_v3", sd, prefix=prefix or vit, epoch=obj.get("epoch"), vit_heads=_moco_v3_heads(obj),
                   rename=timm_to_canonical if vit else (lambda k: k), meta={"stored_arch": obj.get("arch")})


def _read_moco_v3_lincls(obj: Any) -> _Layout | None:
    """moco-v3 `main_lincls.py` checkpoints of a ViT: epoch, arch (moco-v3's name), DDP state_dict of vits.py's
    model (`module.` + timm names, `head` = the trained classifier), best_acc1, optimizer."""
    sd = _sub(obj, "state_dict")
    if sd is None or "best_acc1" not in obj or obj.get("arch") not in _MOCO_V3_ARCHS:
        return None
    prefix = _vit_prefix(sd, "module.", "")
    if prefix is None:
        return None
    return _Layout("moco_v3", sd, prefix=prefix, fc_is_head=False, epoch=obj.get("epoch"),
                   vit_heads=_moco_v3_heads(obj), rename=timm_to_canonical,
                   meta={"stored_arch": obj.get("arch"), "moco_v3_file": "main_lincls.py"})


def _read_mmselfsup(obj: Any) -> _Layout | None:
    """MMSelfSup/OpenSelfSup: `backbone.` ResNet (torchvision names) or ViT (mmpretrain names). Its MoCo v3
    (neck `fc0`, `momentum_encoder.module.`) ViT-S is `mocov3-small`, 12 heads; its other ViTs have timm's."""
    sd = _sub(obj, "state_dict")
    if sd is None or not ("backbone.conv1.weight" in sd or "backbone.patch_embed.projection.weight" in sd):
        return None
    meta = _sub(obj, "meta") or {}
    vit = "backbone.patch_embed.projection.weight" in sd
    mocov3 = any(str(k).startswith(("neck.fc0.", "momentum_encoder.module.")) for k in sd)
    return _Layout("mmselfsup", sd, prefix="backbone.", epoch=meta.get("epoch"),
                   vit_heads=MOCO_V3_VIT_HEADS if mocov3 else {},
                   rename=mmselfsup_to_timm if vit else (lambda k: k))


def _is_headless_vit_small(sd: Mapping) -> bool:
    cls = sd.get("cls_token")
    return (isinstance(cls, torch.Tensor) and cls.shape[-1] == 384
            and not any(str(k).startswith(("head.", "fc.")) for k in sd))


def _read_timm(obj: Any) -> _Layout | None:
    """timm CheckpointSaver files (ResNet or ViT), and plain timm-named ViT state dicts."""
    sd = _sub(obj, "state_dict")
    if sd is not None and "arch" in obj and {"version", "args"} & set(obj) and (
            "conv1.weight" in sd or _vit_prefix(sd, "") == ""):
        return _Layout("timm", sd, fc_is_head=False, epoch=obj.get("epoch"), rename=timm_to_canonical,
                       meta={"stored_arch": obj.get("arch")}, outside=_names(_sub(obj, "state_dict_ema"), "state_dict_ema."))
    for wrapper in (None, "state_dict", "model"):
        sd = obj if wrapper is None else _sub(obj, wrapper)
        if sd is not None and _vit_prefix(sd, "") == "" and "blocks.0.attn.qkv.weight" in sd:
            if wrapper == "model" and set(obj) == {"model"} and _is_headless_vit_small(sd):
                # moco-v3 convert_to_deit.py output: {"model": base_encoder without its projector}. DeiT's
                # ViT-S files keep their classifier and MAE's headless {"model"} releases are ViT-B/L/H.
                return _Layout("moco_v3", sd, fc_is_head=False, rename=timm_to_canonical,
                               vit_heads=MOCO_V3_VIT_HEADS, meta={"moco_v3_file": "convert_to_deit.py"})
            return _Layout("timm", sd, fc_is_head=False, rename=timm_to_canonical, epoch=obj.get("epoch"),
                           meta={"wrapper": wrapper})
    return None


def _read_mae(obj: Any) -> _Layout | None:
    """facebookresearch/mae `main_pretrain.py`: `model` (encoder in timm names + decoder_*, mask_token),
    `optimizer`, `epoch`, `scaler`, `args`; the encoder is kept, the decoder dropped."""
    sd = _sub(obj, "model")
    if sd is None or _vit_prefix(sd, "") != "" or not ("mask_token" in sd or "decoder_embed.weight" in sd):
        return None
    return _Layout("mae", sd, rename=timm_to_canonical, epoch=obj.get("epoch"), droppable=("mask_token", "decoder_"))


def _read_torchvision(obj: Any) -> _Layout | None:
    for wrapper in (None, "state_dict", "model", "model_state_dict"):
        sd = obj if wrapper is None else _sub(obj, wrapper)
        if sd is not None and "conv1.weight" in sd and "layer1.0.conv1.weight" in sd:
            return _Layout("torchvision", sd, fc_is_head=False, meta={"wrapper": wrapper})
        if sd is not None and "class_token" in sd and "conv_proj.weight" in sd:  # torchvision vit_*
            return _Layout("torchvision", sd, fc_is_head=False, rename=torchvision_to_timm, meta={"wrapper": wrapper})
    return None


_PREFERRED = ("", "backbone.", "encoder.", "online_encoder.", "online_network.", "encoder_q.", "base_encoder.",
              "student.", "net.", "model.", "trunk.")


def _rank(prefix: str) -> int:
    bare = prefix[len("module."):] if prefix.startswith("module.") else prefix
    return _PREFERRED.index(bare) if bare in _PREFERRED else len(_PREFERRED)


def _read_ddp(obj: Any) -> _Layout | None:
    """`module.`-prefixed dumps: SwAV (module.conv1, module.projection_head), DINO (student/teacher with
    module.backbone., module.head.), BYOL-style online/target networks. The ResNet is the prefix P with
    both P+conv1.weight and P+layer1.0.conv1.weight; DINO's teacher is used, as DINO's eval scripts do."""
    meta, outside, dino = {}, [], False
    sd = _sub(obj, "state_dict")
    if _sub(obj, "teacher") is not None and _sub(obj, "student") is not None:
        sd, dino, meta = _sub(obj, "teacher"), True, {"dino_checkpoint_key": "teacher"}
        outside = _names(_sub(obj, "student"), "student.")
    elif sd is None:
        sd = obj
    if not dino and not any(str(k).startswith("module.") for k in sd):
        return None
    found = [str(k)[: -len("conv1.weight")] for k in sd if str(k).endswith("conv1.weight")]
    found += [str(k)[: -len("cls_token")] for k in sd if str(k).endswith("cls_token")]
    candidates = sorted((p for p in found if (f"{p}layer1.0.conv1.weight" in sd or _vit_prefix(sd, p) == p)
                         and (dino or p.startswith("module."))), key=_rank)
    if not candidates:
        return None
    if len(candidates) > 1 and _rank(candidates[0]) == _rank(candidates[1]):
        raise ValueError(f"several ResNets in one state dict ({', '.join(candidates)}) and no rule to pick one; "
                         f"extract the one you want into a plain torchvision state dict first")
    vit = _vit_prefix(sd, candidates[0]) is not None
    return _Layout("ddp", sd, prefix=candidates[0], fc_is_head=False, epoch=obj.get("epoch"), meta=meta,
                   outside=outside, rename=timm_to_canonical if vit else (lambda k: k))


_READERS = (_read_detectron2, _read_vissl, _read_moco, _read_moco_v3, _read_moco_v3_lincls, _read_mmselfsup, _read_mae, _read_timm,
            _read_torchvision, _read_ddp)


def _tensor_names(obj: Any, prefix: str = "", limit: int = 8) -> list[str]:
    """A sample of dotted paths to tensors/arrays anywhere in a nested checkpoint."""
    out: list[str] = []
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if isinstance(v, (torch.Tensor, np.ndarray)):
                out.append(f"{prefix}{k}")
            elif isinstance(v, Mapping):
                out += _tensor_names(v, f"{prefix}{k}.", limit - len(out))
            if len(out) >= limit:
                break
    return out[:limit]


def _as_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (np.ndarray, np.generic)) and value.dtype != object:
        return torch.from_numpy(np.array(value, copy=True))
    return None


def _is_classifier(fc: Mapping[str, torch.Tensor]) -> bool:
    return set(fc) in ({"fc.weight", "fc.bias"}, {"fc.weight"}) and fc["fc.weight"].ndim == 2


def load_backbone(path: str | Path, trust: bool = False) -> LoadedCheckpoint:
    """Read any supported checkpoint into the canonical torchvision form (see module docstring).

    `path` may also be `random:ARCH[:WIDTH]` for a random-init baseline.
    """
    spec = parse_random_spec(str(path))
    if spec is not None:
        return random_model(*spec)[1]
    path = Path(path)
    obj = safe_load(path, trust=trust)
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: not a checkpoint: expected a dict of weights, got "
                              f"{'an empty dict' if isinstance(obj, Mapping) else type(obj).__name__}")
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj.get(key), Mapping) and not obj[key]:
            raise CheckpointError(f"{path}: the checkpoint's {key!r} is an empty state dict")
    try:
        layout = next((found for read in _READERS if (found := read(obj)) is not None), None)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if layout is None:
        raise CheckpointError(
            f"{path}: unknown checkpoint format. Top-level keys: {sorted(map(str, obj))[:20]}; sample of "
            f"parameter names: {_tensor_names(obj) or 'none found'}. Supported: MoCo v1/v2/v3, MMSelfSup, "
            f"VISSL, torchvision, timm, MAE, module.-prefixed DDP (SwAV/DINO/BYOL), detectron2 .pkl")
    return _canonicalise(path, layout)


def _canonicalise(path: Path, layout: _Layout) -> LoadedCheckpoint:
    state, fc, kept, dropped, key_map, unmatched = {}, {}, [], list(), {}, []
    for src, value in layout.weights.items():
        src = str(src)
        name = layout.rename(src[len(layout.prefix):]) if src.startswith(layout.prefix) else None
        tensor = _as_tensor(value)
        if name is None or tensor is None:
            dropped.append(src)
        elif _BACKBONE_KEY.match(name) or _VIT_KEY.match(name):
            state[name], key_map[src] = tensor, name
            kept.append(src)
        elif name.startswith("fc."):
            fc[name], key_map[src] = tensor, name
        else:
            dropped.append(src)
            if not name.startswith(layout.droppable or ("\0",)):
                unmatched.append(src)
    if "cls_token" in state and unmatched:  # a ViT with parts the canonical timm ViT has no place for
        raise CheckpointError(f"{path}: {layout.format} ViT checkpoint with keys that match no part of a timm "
                              f"ViT ({len(unmatched)}): {', '.join(unmatched[:8])}" + (" ..." if len(unmatched) > 8 else ""))
    has_fc = not layout.fc_is_head and _is_classifier(fc)
    fc_src = [s for s, n in key_map.items() if n.startswith("fc.")]
    if has_fc:
        state.update(fc)
        kept += fc_src
        head = {}
    else:
        head = fc
        dropped += fc_src
    if not state:
        raise CheckpointError(f"{path}: {layout.format} checkpoint with an empty backbone state dict "
                              f"(no ResNet or ViT weights under {layout.prefix or 'the top level'!r})")
    try:
        arch, width = infer_arch(state, layout.vit_heads)
    except ValueError as e:
        raise CheckpointError(f"{path}: {layout.format} checkpoint, but the weights are not a torchvision "
                              f"ResNet or a ViT: {e}; sample of names: {list(state)[:6]}") from None
    epoch = layout.epoch if isinstance(layout.epoch, int) and not isinstance(layout.epoch, bool) else None
    return LoadedCheckpoint(source=str(path), format=layout.format, arch=arch, width=width, state_dict=state,
                            has_fc=has_fc, epoch=epoch, md5=file_md5(path), kept=kept,
                            dropped=dropped + layout.outside, head=head, key_map=key_map,
                            meta={"prefix": layout.prefix, **layout.meta})
