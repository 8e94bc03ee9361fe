"""`LoadedCheckpoint`: a checkpoint in the canonical form every reader produces and every writer starts from.

The canonical form is a torchvision ResNet state dict (`conv1`, `bn1`, `layer1.0.conv1`, ...) or a timm ViT
state dict (`cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.N...`, `norm`; core/vit.py), with `fc` only
for supervised classifiers, and the projection head, if any, kept aside.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class LoadedCheckpoint:
    """A checkpoint in canonical form: torchvision ResNet or timm ViT names, backbone only (+ fc when `has_fc`)."""

    source: str
    format: str
    arch: str
    width: int
    state_dict: dict[str, torch.Tensor]
    has_fc: bool = False
    epoch: int | None = None
    md5: str = ""
    kept: list[str] = field(default_factory=list)       # source key names that made the state dict
    dropped: list[str] = field(default_factory=list)    # source key names left out (heads included)
    head: dict[str, torch.Tensor] = field(default_factory=dict)  # projection head as `fc.*`, kept aside
    key_map: dict[str, str] = field(default_factory=dict)        # source name -> canonical name
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_params(self) -> int:
        """Parameters of the canonical state dict (BN running statistics not counted)."""
        return sum(v.numel() for k, v in self.state_dict.items() if not k.endswith(_BUFFER_SUFFIXES))
