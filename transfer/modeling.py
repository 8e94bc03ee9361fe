"""Model pieces the MoCo recipes need beyond stock detectron2.

`Res5ROIHeadsExtraNorm`: the C4 box head (res5 on pooled ROIs) followed by one extra normalisation
layer, of the backbone's norm type. MoCo adds it because the pre-trained res5 output feeds newly
initialised predictors whose input scale fine-tuned BN should control (He et al., CVPR 2020, Appendix
A.3; facebookresearch/moco detection/train_net.py registers the same head). The module is named
`norm` inside `roi_heads.res5`, as in the reference, so trained models stay interchangeable.
"""
from __future__ import annotations

from detectron2.layers import get_norm
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads

HEAD_NAME = "Res5ROIHeadsExtraNorm"


class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """Res5ROIHeads with a `cfg.MODEL.RESNETS.NORM` layer after the last res5 block."""

    @classmethod
    def _build_res5_block(cls, cfg):
        res5, out_channels = super()._build_res5_block(cfg)
        res5.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
        return res5, out_channels


def register() -> None:
    """Add the head to detectron2's registry (idempotent; keeps one registered by other code)."""
    if HEAD_NAME not in ROI_HEADS_REGISTRY:
        ROI_HEADS_REGISTRY.register(Res5ROIHeadsExtraNorm)
