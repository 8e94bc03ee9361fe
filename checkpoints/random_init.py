"""Random-init baselines: the `random:ARCH[:WIDTH]` checkpoint spec and the backbone it stands for."""
from __future__ import annotations

from torch import nn

from mocobench.checkpoints.canonical import LoadedCheckpoint
from mocobench.core.errors import CheckpointError


def parse_random_spec(spec: str) -> tuple[str, int] | None:
    """`random:ARCH[:WIDTH]` -> (arch, width); None when `spec` is not a random-init spec."""
    if not isinstance(spec, str) or not (spec == "random" or spec.startswith("random:")):
        return None
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[1]:
        raise CheckpointError(f"{spec!r}: a random-init checkpoint spec needs an arch: random:ARCH[:WIDTH], "
                              f"e.g. random:resnet50 or random:resnet18_small:16")
    try:
        width = int(parts[2]) if len(parts) == 3 else 64
    except ValueError:
        raise CheckpointError(f"{spec!r}: WIDTH must be an integer (random:ARCH[:WIDTH])") from None
    return parts[1], width


def random_model(arch: str, width: int = 64, num_classes: int = 1000) -> tuple[nn.Module, LoadedCheckpoint]:
    """A randomly initialised backbone (torch's global RNG; seed it first), described like a checkpoint."""
    from mocobench.core.backbones import build_backbone  # torchvision: only when a network is built
    try:
        model = build_backbone(arch, num_classes, width)
    except ValueError as e:
        raise CheckpointError(f"random:{arch}:{width}: {e}") from None
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    info = LoadedCheckpoint(source=f"random:{arch}:{width}", format="random", arch=arch, width=width,
                            state_dict=sd, kept=list(sd), key_map={k: k for k in sd})
    return model, info
