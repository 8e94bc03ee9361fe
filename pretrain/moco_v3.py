"""MoCo v3 (Chen, Xie, He 2021, arXiv:2104.02057, Algorithm 1). Mirrors facebookresearch/moco-v3
`moco/builder.py` (MoCo, MoCo_ResNet, MoCo_ViT), `main_moco.py` (momentum schedule) and `vits.py`.

    q1, q2 = pred(proj(f(x1))), pred(proj(f(x2)))      # base encoder + projector + predictor
    k1, k2 = proj_m(f_m(x1)), proj_m(f_m(x2))           # momentum encoder, no gradient
    loss = ctr(q1, k2) + ctr(q2, k1)                    # symmetric; no queue: keys are the batch
    ctr(q, k) = CrossEntropy(q·k_all / T, arange(N) + N·rank) · 2T, k_all gathered from all ranks
    f_m <- m f_m + (1 - m) f                            # m from 1 - (1 - m0)(cos(pi t / T) + 1) / 2

The backbone's classifier `fc` becomes the projector: a 2-layer MLP for ResNets (MoCo_ResNet), 3 layers for
ViTs (MoCo_ViT, where the official name is `head`; train.py renames it in checkpoints). BN statistics span the
whole batch of a process; the official code converts BN to SyncBatchNorm across GPUs, which train.py does on CUDA.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from mocobench.core.distributed import concat_all_gather, rank


def build_mlp(num_layers: int, input_dim: int, mlp_dim: int, output_dim: int, last_bn: bool = True) -> nn.Sequential:
    """Linear (no bias) layers with BN + ReLU between them; the last BN (SimCLR's) has no affine (official)."""
    layers = []
    for i in range(num_layers):
        dim1 = input_dim if i == 0 else mlp_dim
        dim2 = output_dim if i == num_layers - 1 else mlp_dim
        layers.append(nn.Linear(dim1, dim2, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(dim2), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(dim2, affine=False))
    return nn.Sequential(*layers)


class MoCoV3(nn.Module):
    """Base encoder (+ projector in its `fc`), momentum encoder (a copy, updated by EMA), predictor."""

    projector_layers, predictor_last_bn = 2, False

    def __init__(self, base_encoder: Callable[..., nn.Module], dim: int = 256, mlp_dim: int = 4096, T: float = 1.0):
        super().__init__()
        self.T = T
        self.base_encoder = base_encoder(num_classes=mlp_dim)
        self.momentum_encoder = base_encoder(num_classes=mlp_dim)
        hidden_dim = self.base_encoder.fc.weight.shape[1]
        for enc in (self.base_encoder, self.momentum_encoder):
            enc.fc = build_mlp(self.projector_layers, hidden_dim, mlp_dim, dim)
        self.predictor = build_mlp(2, dim, mlp_dim, dim, last_bn=self.predictor_last_bn)
        for param_b, param_m in zip(self.base_encoder.parameters(), self.momentum_encoder.parameters()):
            param_m.data.copy_(param_b.data)
            param_m.requires_grad = False

    @torch.no_grad()
    def update_momentum_encoder(self, m: float) -> None:
        params_b = [p.data for p in self.base_encoder.parameters()]
        params_m = [p.data for p in self.momentum_encoder.parameters()]
        torch._foreach_mul_(params_m, m)
        torch._foreach_add_(params_m, params_b, alpha=1.0 - m)

    def contrastive_loss(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """InfoNCE of the local queries against the keys of all ranks, scaled by 2T (official); fp32 logits.
        Returns (loss, top-1 instance accuracy in %)."""
        with torch.autocast(q.device.type, enabled=False):
            q = F.normalize(q.float(), dim=1)
            k = concat_all_gather(F.normalize(k.float(), dim=1))
            logits = torch.einsum("nc,mc->nm", q, k) / self.T
        labels = torch.arange(logits.shape[0], device=logits.device) + logits.shape[0] * rank()
        acc1 = (logits.detach().argmax(dim=1) == labels).float().mean() * 100
        return F.cross_entropy(logits, labels) * (2 * self.T), acc1

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, m: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (symmetric loss, mean instance accuracy in % of the two terms)."""
        q1 = self.predictor(self.base_encoder(x1))
        q2 = self.predictor(self.base_encoder(x2))
        with torch.no_grad():
            self.update_momentum_encoder(m)
            k1 = self.momentum_encoder(x1)
            k2 = self.momentum_encoder(x2)
        loss12, acc12 = self.contrastive_loss(q1, k2)
        loss21, acc21 = self.contrastive_loss(q2, k1)
        return loss12 + loss21, (acc12 + acc21) / 2


class MoCoV3ResNet(MoCoV3):
    """MoCo_ResNet: 2-layer projector, 2-layer predictor without the last BN."""


class MoCoV3ViT(MoCoV3):
    """MoCo_ViT: 3-layer projector, 2-layer predictor with the last BN."""

    projector_layers, predictor_last_bn = 3, True


def moco_momentum(t: float, total: float, m0: float) -> float:
    """Half-cycle cosine from m0 (t = 0) to 1 (t = total): main_moco.py `adjust_moco_momentum`, t in epochs."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * t / total)) * (1.0 - m0)


def zero_init_residual(model: nn.Module) -> nn.Module:
    """The last BN of each residual block starts at zero, as torchvision's `zero_init_residual=True` that
    main_moco.py passes for ResNets."""
    for m in model.modules():
        if isinstance(m, Bottleneck):
            nn.init.zeros_(m.bn3.weight)
        elif isinstance(m, BasicBlock):
            nn.init.zeros_(m.bn2.weight)
    return model


def sincos_pos_embed_2d(grid: tuple[int, int], embed_dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """vits.py `build_2d_sincos_position_embedding`: (1, 1 + h*w, D), a zero row for the CLS token, then per
    patch [sin(a ω), cos(a ω), sin(b ω), cos(b ω)], ω_d = temperature^(-d / (D/4)), (a, b) the grid indices
    of torch.meshgrid(w, h) (default 'ij' indexing) flattened."""
    h, w = grid
    assert embed_dim % 4 == 0, "the 2D sin-cos position embedding needs an embed dim divisible by 4"
    grid_w, grid_h = torch.meshgrid(torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32),
                                    indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(embed_dim // 4, dtype=torch.float32) / (embed_dim // 4))
    out_w = grid_w.flatten()[:, None] * omega[None]
    out_h = grid_h.flatten()[:, None] * omega[None]
    pos = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    return torch.cat([torch.zeros(1, embed_dim), pos])[None]


def moco_v3_vit_init(vit: nn.Module, stop_grad_conv1: bool = True) -> nn.Module:
    """VisionTransformerMoCo (vits.py) on a timm ViT: fixed 2D sin-cos position embedding (no gradient); Xavier
    uniform for every Linear, with q, k, v of `qkv` treated as separate matrices; zero biases; CLS token
    N(0, 1e-6); Xavier-uniform patch projection; `stop_grad_conv1` freezes the random patch projection (Sec. 4.2).
    The table is built for the arch's own patch grid (core/vit.py image size); crops of another size use timm's
    interpolation of it (`dynamic_img_size`), not a table recomputed for their grid."""
    assert vit.num_prefix_tokens == 1, "the sin-cos embedding assumes one prefix token, [cls]"
    vit.pos_embed = nn.Parameter(sincos_pos_embed_2d(vit.patch_embed.grid_size, vit.embed_dim), requires_grad=False)
    for name, m in vit.named_modules():
        if isinstance(m, nn.Linear):
            if "qkv" in name:
                val = math.sqrt(6.0 / float(m.weight.shape[0] // 3 + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -val, val)
            else:
                nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.normal_(vit.cls_token, std=1e-6)
    proj = vit.patch_embed.proj
    val = math.sqrt(6.0 / float(3 * proj.kernel_size[0] * proj.kernel_size[1] + vit.embed_dim))
    nn.init.uniform_(proj.weight, -val, val)
    nn.init.zeros_(proj.bias)
    if stop_grad_conv1:
        proj.weight.requires_grad = False
        proj.bias.requires_grad = False
    return vit


def _rename_head(state: dict, old: str, new: str) -> dict:
    prefixes = [(f"{enc}.{old}.", f"{enc}.{new}.") for enc in ("base_encoder", "momentum_encoder")]
    renamed = {}
    for key, value in state.items():
        for src, dst in prefixes:
            if key.startswith(src):
                key = dst + key[len(src):]
        renamed[key] = value
    return renamed


def official_state_dict(model: MoCoV3) -> dict:
    """model.state_dict() with the ViT projector named `head` as in MoCo_ViT (ResNets keep `fc`)."""
    state = model.state_dict()
    return _rename_head(state, "fc", "head") if isinstance(model, MoCoV3ViT) else state


def load_official_state_dict(model: MoCoV3, state: dict) -> None:
    """Inverse of `official_state_dict` (strict load)."""
    model.load_state_dict(_rename_head(state, "head", "fc") if isinstance(model, MoCoV3ViT) else state)
