"""LARS (You et al. 2017) as facebookresearch/moco-v3 `moco/optimizer.py` uses it for ResNets.

For every parameter with more than one dimension (weights of convolutions and linear layers):
    g <- g + wd · p;   g <- g · (η ||p|| / ||g||)   (η = trust_coefficient; the factor is 1 if either norm is 0)
Parameters with ndim <= 1 (biases, BN/LN gamma and beta) get neither weight decay nor the trust ratio. Then
heavy-ball momentum without dampening, mu <- momentum · mu + g, and p <- p - lr · mu (state key `mu`, official).
"""
from __future__ import annotations

import torch


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:  # not a bias or a normalisation gamma/beta
                    dp = dp.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0,
                                    torch.where(update_norm > 0, group["trust_coefficient"] * param_norm / update_norm,
                                                one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(dp)
                p.add_(mu, alpha=-group["lr"])
        return loss
