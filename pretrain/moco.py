"""MoCo: Momentum Contrast (He et al. 2019, arXiv:1911.05722, Algorithm 1), with the MoCo v2 MLP head
(Chen et al. 2020, arXiv:2003.04297). Mirrors facebookresearch/moco `moco/builder.py`.

    q = normalize(f_q(x_q))                       # queries
    k = normalize(f_k(x_k)), no gradient           # keys, with ShuffleBN
    logits = [q·k+ , q·queue] / T                  # positive at index 0
    loss = CrossEntropy(logits, 0)
    f_k <- m f_k + (1 - m) f_q;  enqueue k (from all ranks), dequeue the oldest

ShuffleBN: across ranks exactly as the paper (gather key inputs, shuffle, forward the local slice,
unshuffle). Within one rank the batch is additionally split into `bn_groups` groups that each get their
own BN statistics; with a single process this *emulates* multi-GPU ShuffleBN: on the same pixels its weights
match those of a `bn_groups`-rank run to fp32 rounding (tests/test_slurm_multinode.py), while BN running
statistics differ (updated once per group).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mocobench.core.distributed import broadcast, concat_all_gather, rank, world_size


class MoCo(nn.Module):
    def __init__(self, base_encoder: Callable[..., nn.Module], dim: int = 128, K: int = 65536, m: float = 0.999,
                 T: float = 0.07, mlp: bool = False, shuffle_bn: bool = True, bn_groups: int = 1,
                 mask_false_negatives: bool = False):
        super().__init__()
        self.K, self.m, self.T = K, m, T
        self.shuffle_bn, self.bn_groups, self.mask_false_negatives = shuffle_bn, bn_groups, mask_false_negatives

        self.encoder_q = base_encoder(num_classes=dim)
        self.encoder_k = base_encoder(num_classes=dim)
        if mlp:  # MoCo v2: fc -> Linear(dim_mlp, dim_mlp), ReLU, fc
            for enc in (self.encoder_q, self.encoder_k):
                dim_mlp = enc.fc.weight.shape[1]
                enc.fc = nn.Sequential(nn.Linear(dim_mlp, dim_mlp), nn.ReLU(), enc.fc)
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.copy_(param_q.data)  # key encoder starts as a copy and gets no gradient
            param_k.requires_grad = False

        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        # image id of each queued key, for the optional false-negative mask (not in the official state_dict)
        self.register_buffer("queue_ids", torch.full((K,), -1, dtype=torch.long), persistent=False)

    @torch.no_grad()
    def momentum_update_key_encoder(self) -> None:
        params_q = [p.data for p in self.encoder_q.parameters()]
        params_k = [p.data for p in self.encoder_k.parameters()]
        torch._foreach_mul_(params_k, self.m)
        torch._foreach_add_(params_k, params_q, alpha=1.0 - self.m)

    @torch.no_grad()
    def dequeue_and_enqueue(self, keys: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        keys = concat_all_gather(keys)
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr)
        assert self.K % batch_size == 0, f"queue size K={self.K} must be divisible by the global batch {batch_size}"
        self.queue[:, ptr:ptr + batch_size] = keys.T
        if ids is not None:
            self.queue_ids[ptr:ptr + batch_size] = concat_all_gather(ids)
        self.queue_ptr[0] = (ptr + batch_size) % self.K

    @torch.no_grad()
    def batch_shuffle(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather inputs from all ranks, apply one random permutation (rank 0's), keep this rank's slice."""
        x_all = concat_all_gather(x)
        idx_shuffle = broadcast(torch.randperm(x_all.shape[0]).to(x.device), src=0)
        idx_unshuffle = torch.argsort(idx_shuffle)
        idx_this = idx_shuffle.view(world_size(), -1)[rank()]
        return x_all[idx_this], idx_unshuffle

    @torch.no_grad()
    def batch_unshuffle(self, x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
        x_all = concat_all_gather(x)
        return x_all[idx_unshuffle.view(world_size(), -1)[rank()]]

    def grouped(self, encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Forward in `bn_groups` chunks so that each chunk has its own BN statistics."""
        if self.bn_groups <= 1:
            return encoder(x)
        return torch.cat([encoder(chunk) for chunk in x.chunk(self.bn_groups)])

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor, ids: torch.Tensor | None = None):
        """Returns (logits, labels): logits N x (1+K) with the positive at index 0, labels all zero."""
        q = F.normalize(self.grouped(self.encoder_q, im_q).float(), dim=1)

        with torch.no_grad():
            self.momentum_update_key_encoder()
            if self.shuffle_bn:
                im_k, idx_unshuffle = self.batch_shuffle(im_k)
            k = F.normalize(self.grouped(self.encoder_k, im_k).float(), dim=1)
            if self.shuffle_bn:
                k = self.batch_unshuffle(k, idx_unshuffle)

        with torch.autocast(q.device.type, enabled=False):  # logits in fp32, also under bf16/fp16 autocast
            l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
            l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach())
        if self.mask_false_negatives and ids is not None:
            # small data: an older key of the query's own image may still be queued (a false negative)
            l_neg = l_neg.masked_fill(self.queue_ids.unsqueeze(0) == ids.unsqueeze(1), float("-inf"))
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)

        self.dequeue_and_enqueue(k, ids)
        return logits, labels
