"""ViT parameter names of other libraries -> timm's (the canonical ViT form, core/vit.py).

Only names change: torchvision's `in_proj_weight` and MMSelfSup's `attn.qkv` already stack q, k, v in timm's
order, and every library stores the class token as (1, 1, D) and the position embedding with the class
position first. The classifier `head` becomes `fc` (core/vit.py). Sources: torchvision
`models/vision_transformer.py`; mmpretrain `models/backbones/vision_transformer.py` (MMSelfSup 1.x).
"""
from __future__ import annotations

import re

_TV_BLOCK = re.compile(r"^encoder\.layers\.encoder_layer_(\d+)\.(.+)$")
_TV_IN_BLOCK = {"ln_1.": "norm1.", "ln_2.": "norm2.", "self_attention.in_proj_weight": "attn.qkv.weight",
                "self_attention.in_proj_bias": "attn.qkv.bias", "self_attention.out_proj.": "attn.proj.",
                "mlp.0.": "mlp.fc1.", "mlp.3.": "mlp.fc2.", "mlp.linear_1.": "mlp.fc1.", "mlp.linear_2.": "mlp.fc2."}
_TV_TOP = {"class_token": "cls_token", "conv_proj.": "patch_embed.proj.", "encoder.pos_embedding": "pos_embed",
           "encoder.ln.": "norm.", "heads.head.": "fc."}

_MM_BLOCK = re.compile(r"^layers\.(\d+)\.(.+)$")
_MM_IN_BLOCK = {"ln1.": "norm1.", "ln2.": "norm2.", "attn.qkv.": "attn.qkv.", "attn.proj.": "attn.proj.",
                "ffn.layers.0.0.": "mlp.fc1.", "ffn.layers.1.": "mlp.fc2."}
_MM_TOP = {"cls_token": "cls_token", "pos_embed": "pos_embed", "patch_embed.projection.": "patch_embed.proj.",
           "ln1.": "norm."}


def _swap(name: str, table: dict[str, str]) -> str | None:
    for old, new in table.items():
        if name == old or (old.endswith(".") and name.startswith(old)):
            return new + name[len(old):]
    return None


def timm_to_canonical(name: str) -> str:
    """timm (and DINO, MAE, MoCo v3 `vits.py`, which subclass or mirror it): only `head` -> `fc`."""
    return "fc." + name[len("head."):] if name.startswith("head.") else name


def canonical_to_timm(name: str) -> str:
    """The inverse of `timm_to_canonical` (`fc` -> `head`), for ViT names only: timm's ResNets call their
    classifier `fc` too."""
    return "head." + name[len("fc."):] if name.startswith("fc.") else name


def torchvision_to_timm(name: str) -> str:
    m = _TV_BLOCK.match(name)
    if m:
        inner = _swap(m.group(2), _TV_IN_BLOCK)
        return f"blocks.{m.group(1)}.{inner}" if inner else name
    return _swap(name, _TV_TOP) or name


def mmselfsup_to_timm(name: str) -> str:
    m = _MM_BLOCK.match(name)
    if m:
        inner = _swap(m.group(2), _MM_IN_BLOCK)
        return f"blocks.{m.group(1)}.{inner}" if inner else name
    return _swap(name, _MM_TOP) or name
