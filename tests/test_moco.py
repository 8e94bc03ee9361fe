"""The MoCo core against its definition (He et al. 2019, Algorithm 1): queue, momentum, ShuffleBN, loss."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from mocobench.pretrain.moco import MoCo


class LinearEncoder(nn.Module):
    """A BN-free encoder whose outputs are easy to recompute by hand."""

    def __init__(self, num_classes, in_dim=12):
        super().__init__()
        self.fc = nn.Linear(in_dim, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


class BNEncoder(LinearEncoder):
    """Linear + BatchNorm: outputs depend on which samples share a forward (the ShuffleBN concern)."""

    def __init__(self, num_classes, in_dim=12):
        super().__init__(num_classes, in_dim)
        self.bn = nn.BatchNorm1d(num_classes)

    def forward(self, x):
        return self.bn(self.fc(x.flatten(1)))


def make(encoder=LinearEncoder, **kw):
    torch.manual_seed(0)
    args = dict(dim=4, K=8, m=0.9, T=0.5, shuffle_bn=False, bn_groups=1) | kw
    return MoCo(encoder, **args)


def test_key_encoder_starts_as_copy_without_grad():
    model = make()
    for pq, pk in zip(model.encoder_q.parameters(), model.encoder_k.parameters()):
        assert torch.equal(pq, pk) and not pk.requires_grad and pq.requires_grad


def test_queue_enqueue_and_pointer_wrap():
    model = make()
    assert torch.allclose(model.queue.norm(dim=0), torch.ones(8))  # initial keys are L2-normalised
    batches = [F.normalize(torch.randn(4, 4), dim=1) for _ in range(3)]
    model.dequeue_and_enqueue(batches[0])
    assert int(model.queue_ptr) == 4 and torch.equal(model.queue[:, :4], batches[0].T)
    model.dequeue_and_enqueue(batches[1])
    assert int(model.queue_ptr) == 0  # 8 % 8: wrapped
    assert torch.equal(model.queue, torch.cat(batches[:2]).T)
    model.dequeue_and_enqueue(batches[2])  # overwrites the oldest keys
    assert int(model.queue_ptr) == 4
    assert torch.equal(model.queue, torch.cat([batches[2], batches[1]]).T)
    with pytest.raises(AssertionError, match="divisible"):
        model.dequeue_and_enqueue(torch.randn(3, 4))


def test_momentum_update_arithmetic():
    model = make(m=0.75)
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.fill_(2.0)
        for p in model.encoder_k.parameters():
            p.fill_(-2.0)
    model.momentum_update_key_encoder()
    for p in model.encoder_k.parameters():  # 0.75 * -2 + 0.25 * 2 = -1
        assert torch.allclose(p, torch.full_like(p, -1.0))
    for p in model.encoder_q.parameters():
        assert torch.all(p == 2.0)


def test_shuffle_unshuffle_is_identity():
    model = make()
    x = torch.arange(24.0).view(8, 3)
    shuffled, idx_unshuffle = model.batch_shuffle(x)
    assert not torch.equal(shuffled, x) and sorted(shuffled[:, 0].tolist()) == x[:, 0].tolist()
    assert torch.equal(model.batch_unshuffle(shuffled, idx_unshuffle), x)


def test_loss_equals_hand_infonce():
    model = make(T=0.2)
    queue_before = model.queue.clone()
    xq, xk = torch.randn(4, 12), torch.randn(4, 12)
    logits, labels = model(xq, xk)
    # by hand: encoders are equal after the momentum update (both start as the same copy)
    W, b = model.encoder_q.fc.weight.detach(), model.encoder_q.fc.bias.detach()
    q = F.normalize(xq @ W.T + b, dim=1)
    k = F.normalize(xk @ W.T + b, dim=1)
    loss_hand = 0.0
    for i in range(4):
        pos = torch.exp(q[i] @ k[i] / 0.2)
        neg = torch.exp(q[i] @ queue_before / 0.2).sum()
        loss_hand += -torch.log(pos / (pos + neg)) / 4
    assert logits.shape == (4, 1 + 8) and torch.all(labels == 0)
    assert torch.allclose(F.cross_entropy(logits, labels), loss_hand, atol=1e-5)
    assert torch.allclose(model.queue[:, :4], k.T, atol=1e-6)  # keys enqueued after use


def test_logits_are_fp32_under_bf16_autocast():
    """The docs promise fp32 logits: bf16 keeps 8 bits of mantissa, so cosines of 0.996 and 1.0 would tie."""
    model = make(T=0.2)
    queue_before = model.queue.clone()
    xq, xk = torch.randn(4, 12), torch.randn(4, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(xq, xk)
        q = F.normalize(model.encoder_q(xq).float(), dim=1)
    assert logits.dtype == torch.float32
    assert torch.allclose(logits[:, 1:], q @ queue_before / 0.2, atol=1e-5)  # fp32 products of the bf16 features


def test_mlp_head_matches_official_layout():
    model = MoCo(lambda num_classes: LinearEncoder(num_classes, in_dim=12), dim=4, K=8, mlp=True)
    keys = [k for k in model.state_dict() if k.startswith("encoder_q.fc")]
    assert keys == ["encoder_q.fc.0.weight", "encoder_q.fc.0.bias", "encoder_q.fc.2.weight", "encoder_q.fc.2.bias"]
    # dim_mlp = the input size of the original fc (12 here): Linear(12, 12), ReLU, Linear(12, dim=4)
    assert model.encoder_q.fc[0].weight.shape == (12, 12) and model.encoder_q.fc[2].weight.shape == (4, 12)


def test_false_negative_mask_hides_own_image_keys():
    model = make(mask_false_negatives=True)
    model.dequeue_and_enqueue(F.normalize(torch.randn(4, 4), dim=1), torch.tensor([10, 11, 12, 13]))
    logits, _ = model(torch.randn(4, 12), torch.randn(4, 12), torch.tensor([11, 20, 21, 13]))
    # query 0 is image 11, queued at slot 1 -> column 1 + 1; query 3 is image 13 at slot 3
    assert logits[0, 2] == float("-inf") and logits[3, 4] == float("-inf")
    assert torch.isfinite(logits[1]).all() and torch.isfinite(logits[2]).all()


def test_shufflebn_emulation_uses_per_group_statistics():
    model = make(encoder=BNEncoder, K=16, shuffle_bn=True, bn_groups=2)
    x = torch.randn(8, 12) * 3 + 1
    torch.manual_seed(123)
    perm = torch.randperm(8)  # the permutation forward() will draw
    torch.manual_seed(123)
    model(torch.randn(8, 12), x)
    keys = model.queue[:, :8].T
    # by hand: shuffle, BN (train mode) over each half of the shuffled batch, unshuffle
    enc = model.encoder_k
    expected = torch.empty(8, 4)
    for group in perm.chunk(2):
        z = enc.fc(x[group]).detach()
        z = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + enc.bn.eps) * enc.bn.weight + enc.bn.bias
        expected[group] = F.normalize(z.detach(), dim=1)
    assert torch.allclose(keys, expected, atol=1e-5)
    # and it differs from one BN over the whole batch (which would leak the positive's statistics)
    whole = F.normalize(nn.functional.batch_norm(enc.fc(x).detach(), None, None, enc.bn.weight, enc.bn.bias, True),
                        dim=1)
    assert not torch.allclose(keys, whole.detach(), atol=1e-3)


# --- two processes over gloo -----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, inputs, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    model = make(shuffle_bn=True, K=8)
    xq, xk = inputs[rank]
    logits, _ = model(xq, xk)
    x = torch.arange(8.0).view(4, 2) + 100 * rank
    shuffled, idx = model.batch_shuffle(x)
    torch.save({"queue": model.queue.clone(), "ptr": int(model.queue_ptr), "logits": logits.detach(),
                "roundtrip": model.batch_unshuffle(shuffled, idx), "x": x, "shuffled": shuffled},
               os.path.join(result_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_two_process_gloo_queue_holds_all_gathered_keys(tmp_path):
    torch.manual_seed(1)
    inputs = [(torch.randn(2, 12), torch.randn(2, 12)) for _ in range(2)]
    mp.spawn(_ddp_worker, args=(2, _free_port(), inputs, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    # reference by definition: every rank's keys, concatenated in rank order, enqueued on every rank
    ref = make(K=8)
    W, b = ref.encoder_k.fc.weight.detach(), ref.encoder_k.fc.bias.detach()
    keys = torch.cat([F.normalize(xk @ W.T + b, dim=1) for _, xk in inputs])
    for r in (r0, r1):
        assert r["ptr"] == 4
        assert torch.allclose(r["queue"][:, :4], keys.T, atol=1e-6)
        assert torch.equal(r["roundtrip"], r["x"])  # unshuffle(shuffle(x)) == x on each rank
    assert torch.equal(r0["queue"], r1["queue"])
    # ShuffleBN across ranks: the shuffled slices are a permutation of all ranks' inputs together
    both = torch.cat([r0["shuffled"], r1["shuffled"]])[:, 0].sort().values
    assert torch.equal(both, torch.cat([r0["x"], r1["x"]])[:, 0].sort().values)
