"""Vision Transformers: timm's `VisionTransformer` with its classifier named `fc`, as the ResNets' is.

Arch names (Dosovitskiy et al. 2021, Table 1; DeiT's Tiny; heads of 64 dims except where said):

  vit_tiny, vit_small, vit_base, vit_large   embed 192 / 384 / 768 / 1024, depth 12/12/12/24, patch 16, 224 px
  <any of them>_p8                           the same with patch 8 (DINO's ViT-S/8, ViT-B/8)
  vit_small_h12                              MoCo v3's ViT-Small: 12 heads of 32 (moco-v3 vits.py; DeiT, DINO, timm: 6)
  vit_demo                                   embed 128, depth 4, 2 heads of 64, patch 4, 32 px: the CPU demo size

Parameter names are timm's (`cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.N.{norm1,attn.qkv,attn.proj,
norm2,mlp.fc1,mlp.fc2}`, `norm`) except the classifier, `fc` (timm: `head`), so the code that swaps a ResNet's
`fc` for a new head or an Identity works unchanged. Other input sizes than the arch's are accepted
(`dynamic_img_size`: the position embedding is interpolated), as DINO and MoCo v3 evaluate at 224 px.
"""
from __future__ import annotations

import functools
import re

import torch
from torch import nn

# name -> (embed_dim, depth, num_heads, patch, img_size)
VIT_ARCHS = {"vit_tiny": (192, 12, 3, 16, 224), "vit_small": (384, 12, 6, 16, 224),
             "vit_base": (768, 12, 12, 16, 224), "vit_large": (1024, 24, 16, 16, 224),
             "vit_small_h12": (384, 12, 12, 16, 224), "vit_demo": (128, 4, 2, 4, 32)}
_P8 = re.compile(r"^(vit_(?:tiny|small|base|large))_p8$")


def is_vit(arch: str) -> bool:
    return arch in VIT_ARCHS or bool(_P8.match(arch))


def vit_archs() -> list[str]:
    return list(VIT_ARCHS) + [f"{n}_p8" for n in VIT_ARCHS if n not in ("vit_demo", "vit_small_h12")]


def vit_shape(arch: str) -> tuple[int, int, int, int, int]:
    """(embed_dim, depth, num_heads, patch, img_size) of a ViT arch name."""
    m = _P8.match(arch)
    if m:
        embed, depth, heads, _, img = VIT_ARCHS[m.group(1)]
        return embed, depth, heads, 8, img
    if arch not in VIT_ARCHS:
        raise ValueError(f"unknown ViT arch {arch!r}; choose one of {vit_archs()}")
    return VIT_ARCHS[arch]


@functools.cache
def _timm_vit_class():
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    class VisionTransformer(TimmViT):
        """timm's ViT with the classifier registered as `fc`."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.fc = self.head
            del self.head

        def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
            x = self.head_drop(self.fc_norm(self.pool(x)))
            return x if pre_logits else self.fc(x)

        def get_classifier(self) -> nn.Module:
            return self.fc

        def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
            self.head = self.fc
            super().reset_classifier(num_classes, global_pool)
            self.fc = self.head
            del self.head

    return VisionTransformer


def build_vit(arch: str, num_classes: int = 1000) -> nn.Module:
    """A randomly initialised ViT (timm's default init) with an `fc` of `num_classes`."""
    embed, depth, heads, patch, img = vit_shape(arch)
    return _timm_vit_class()(img_size=img, patch_size=patch, embed_dim=embed, depth=depth, num_heads=heads,
                             num_classes=num_classes, global_pool="token", dynamic_img_size=True)


def infer_vit_arch(state_dict: dict[str, torch.Tensor], heads: dict[int, int] | None = None) -> str:
    """The arch name of a canonical (timm-named) ViT state dict, from its embed dim, depth and patch size.

    No tensor shape depends on the number of heads, so it is the standard one for the embed dim unless
    `heads` (embed dim -> heads, known from the checkpoint's format) says otherwise."""
    if "cls_token" not in state_dict or "patch_embed.proj.weight" not in state_dict:
        raise ValueError("not a ViT state dict: no 'cls_token' / 'patch_embed.proj.weight'")
    embed = int(state_dict["cls_token"].shape[-1])
    depth = len({int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")})
    patch = int(state_dict["patch_embed.proj.weight"].shape[-1])
    shaped = [name for name in vit_archs() if vit_shape(name)[:2] + vit_shape(name)[3:4] == (embed, depth, patch)]
    want = (heads or {}).get(embed)
    for name in shaped:
        if want is None or vit_shape(name)[2] == want:
            return name
    if shaped:
        raise ValueError(f"a ViT of embed dim {embed}, depth {depth}, patch {patch} with {want} heads (what its "
                         f"format has) is not an arch here; the {', '.join(shaped)} arch has "
                         f"{vit_shape(shaped[0])[2]} heads")
    raise ValueError(f"unrecognised ViT: embed dim {embed}, depth {depth}, patch {patch} "
                     f"(known: {', '.join(vit_archs())})")
