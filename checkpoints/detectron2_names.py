"""Parameter names between torchvision and detectron2 ResNets, both directions.

Rules from facebookresearch/moco detection/convert-pretrain-to-detectron2.py and detectron2
tools/convert-torchvision-to-d2.py.
"""
from __future__ import annotations

import re


def tv_to_d2(name: str) -> str:
    """torchvision -> detectron2: no `layer` => `stem.` prefix; layerN->res{N+1}; bnK->convK.norm;
    downsample.0->shortcut, downsample.1->shortcut.norm."""
    if "layer" not in name:
        name = "stem." + name
    name = re.sub(r"layer([1-4])", lambda m: f"res{int(m.group(1)) + 1}", name)
    name = re.sub(r"bn([1-3])", r"conv\1.norm", name)
    return name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def d2_to_tv(name: str) -> str:
    """The inverse of `tv_to_d2`."""
    name = name[len("stem."):] if name.startswith("stem.") else name
    name = re.sub(r"\bres([2-5])\b", lambda m: f"layer{int(m.group(1)) - 1}", name)
    name = name.replace("shortcut.norm", "downsample.1").replace("shortcut", "downsample.0")
    return re.sub(r"conv([1-3])\.norm", r"bn\1", name)
