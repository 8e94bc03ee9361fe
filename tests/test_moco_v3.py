"""MoCo v3 against its definition (Chen, Xie, He 2021, Algorithm 1) and facebookresearch/moco-v3: loss, MLPs,
momentum schedule, LARS, ViT position embedding and frozen patch projection, checkpoint layout, exact resume."""
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mocobench.core.config import parse_config
from mocobench.core.errors import ConfigError
from mocobench.pretrain.augment import Solarize, moco_v3_augmentations
from mocobench.pretrain.lars import LARS
from mocobench.pretrain.moco_v3 import (MoCoV3ResNet, MoCoV3ViT, moco_momentum, moco_v3_vit_init,
                                        sincos_pos_embed_2d, zero_init_residual)
from mocobench.pretrain.train import (CONFIG_DIR, PretrainConfig, adjust_learning_rate_v3, config_record,
                                      latest_checkpoint, run, validate)


class LinearEncoder(nn.Module):
    def __init__(self, num_classes, in_dim=12):
        super().__init__()
        self.fc = nn.Linear(in_dim, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


def make(cls=MoCoV3ResNet, **kw):
    torch.manual_seed(0)
    return cls(LinearEncoder, **({"dim": 4, "mlp_dim": 8, "T": 0.5} | kw))


def hand_ctr(q, k, T, offset=0):
    """-log softmax of the positive (key i + offset) among all keys, averaged, times 2T."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    total = 0.0
    for i in range(q.shape[0]):
        sims = torch.stack([q[i] @ k[j] / T for j in range(k.shape[0])])
        total += -(sims[i + offset] - torch.log(torch.exp(sims).sum()))
    return total / q.shape[0] * 2 * T


# --- the algorithm ---------------------------------------------------------------------------------------
def test_symmetric_loss_equals_hand_infonce():
    model = make(T=0.5)
    x1, x2 = torch.randn(6, 12), torch.randn(6, 12)
    loss, acc = model(x1, x2, m=0.9)
    with torch.no_grad():  # the momentum encoder is still a copy of the base after the update
        q1, q2 = model.predictor(model.base_encoder(x1)), model.predictor(model.base_encoder(x2))
        k1, k2 = model.base_encoder(x1), model.base_encoder(x2)
    assert torch.allclose(loss, hand_ctr(q1, k2, 0.5) + hand_ctr(q2, k1, 0.5), atol=1e-5)
    assert 0 <= acc <= 100 and loss.requires_grad


def test_mlps_match_official_build_mlp():
    resnet, vit = make(MoCoV3ResNet), make(MoCoV3ViT)
    kinds = lambda seq: [type(m).__name__ + ("" if not isinstance(m, nn.BatchNorm1d) or m.affine else "-noaffine")
                         for m in seq]
    assert kinds(resnet.base_encoder.fc) == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d-noaffine"]
    assert kinds(resnet.predictor) == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert kinds(vit.base_encoder.fc) == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d-noaffine"]
    assert kinds(vit.predictor) == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d-noaffine"]
    assert all(m.bias is None for m in resnet.modules() if isinstance(m, nn.Linear))
    # hidden 12 (the replaced fc's input) -> mlp_dim 8 -> dim 4; predictor 4 -> 8 -> 4
    assert [m.weight.shape for m in resnet.base_encoder.fc if isinstance(m, nn.Linear)] == [(8, 12), (4, 8)]
    assert [m.weight.shape for m in resnet.predictor if isinstance(m, nn.Linear)] == [(8, 4), (4, 8)]


def test_momentum_encoder_is_a_copy_without_grad_and_ema_arithmetic():
    model = make()
    for pb, pm in zip(model.base_encoder.parameters(), model.momentum_encoder.parameters()):
        assert torch.equal(pb, pm) and pb.requires_grad and not pm.requires_grad
    with torch.no_grad():
        for p in model.base_encoder.parameters():
            p.fill_(2.0)
        for p in model.momentum_encoder.parameters():
            p.fill_(-2.0)
    model.update_momentum_encoder(0.75)
    assert all(torch.allclose(p, torch.full_like(p, -1.0)) for p in model.momentum_encoder.parameters())


def test_cosine_momentum_schedule():
    assert moco_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert moco_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert moco_momentum(100, 100, 0.99) == pytest.approx(1.0)
    assert moco_momentum(25, 100, 0.99) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)


def test_lr_warmup_then_cosine_per_step():
    cfg = PretrainConfig(algorithm="moco_v3", lr=1.5e-4, batch_size=1024, epochs=300, warmup_epochs=40)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    peak = 1.5e-4 * 1024 / 256
    assert adjust_learning_rate_v3(opt, 0.0, cfg) == 0.0
    assert adjust_learning_rate_v3(opt, 20.0, cfg) == pytest.approx(peak / 2)
    assert adjust_learning_rate_v3(opt, 40.0, cfg) == pytest.approx(peak)
    assert adjust_learning_rate_v3(opt, 170.0, cfg) == pytest.approx(peak / 2)
    assert adjust_learning_rate_v3(opt, 300.0, cfg) == pytest.approx(0.0, abs=1e-12)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


# --- LARS ------------------------------------------------------------------------------------------------
def test_lars_trust_ratio_on_a_hand_example_and_no_adaptation_for_1d():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))    # ||w|| = 5
    b = nn.Parameter(torch.tensor([1.0, 2.0]))      # 1-d: plain momentum SGD, no weight decay
    z = nn.Parameter(torch.zeros(2, 2))             # ||z|| = 0: trust ratio 1
    opt = LARS([w, b, z], lr=1.0, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
    w.grad, b.grad, z.grad = torch.tensor([[0.3, 0.4]]), torch.tensor([0.5, 0.5]), torch.ones(2, 2)
    opt.step()
    # w: g + 0.1 w = [0.6, 0.8] (norm 1), x 0.001 * 5 / 1 = [0.003, 0.004]
    assert torch.allclose(w, torch.tensor([[2.997, 3.996]]))
    assert torch.allclose(b, torch.tensor([0.5, 1.5]))
    assert torch.allclose(z, -torch.ones(2, 2))
    assert set(opt.state[w]) == {"mu"} and torch.allclose(opt.state[w]["mu"], torch.tensor([[0.003, 0.004]]))
    b.grad = torch.tensor([0.0, 0.0])
    opt.step()  # momentum: mu = 0.9 * 0.5 + 0
    assert torch.allclose(b, torch.tensor([0.05, 1.05]))


# --- ViT -------------------------------------------------------------------------------------------------
def test_vit_sincos_pos_embed_equals_formula_and_is_frozen():
    from mocobench.core.backbones import build_backbone
    vit = moco_v3_vit_init(build_backbone("vit_demo", 10), stop_grad_conv1=True)
    D, (h, w) = vit.embed_dim, vit.patch_embed.grid_size
    pe = vit.pos_embed[0]
    assert pe.shape == (1 + h * w, D) and not vit.pos_embed.requires_grad and torch.all(pe[0] == 0)
    d4 = D // 4
    for t in (0, 1, 7, 9, 63):
        a, b = t // h, t % h  # torch.meshgrid(w, h) flattened, as vits.py
        for d in (0, 1, d4 - 1):
            omega = 10000.0 ** (-d / d4)
            expected = [math.sin(a * omega), math.cos(a * omega), math.sin(b * omega), math.cos(b * omega)]
            got = [pe[1 + t, d + j * d4].item() for j in range(4)]
            assert got == pytest.approx(expected, abs=1e-5), (t, d)
    assert torch.equal(sincos_pos_embed_2d((h, w), D), vit.pos_embed.data)
    assert not vit.patch_embed.proj.weight.requires_grad and not vit.patch_embed.proj.bias.requires_grad
    assert vit.cls_token.std() < 1e-5 and torch.all(vit.blocks[0].attn.qkv.bias == 0)


def test_zero_init_residual():
    from mocobench.core.backbones import build_backbone
    net = zero_init_residual(build_backbone("resnet18_small", 10, width=8))
    assert all(torch.all(blk.bn2.weight == 0) for layer in (net.layer1, net.layer4) for blk in layer)
    assert torch.all(net.bn1.weight == 1)


def test_v3_views_blur_solarize_asymmetric():
    img = Image.fromarray(np.array([[[200, 100, 0]]], dtype=np.uint8))
    assert np.array(Solarize()(img)).tolist() == [[[55, 100, 0]]]  # >= 128 inverted
    v1, v2 = moco_v3_augmentations(16, 0.5, 0.2, (0.1, 0.5))
    probs = lambda view: {type(t.transforms[0]).__name__: t.p for t in view.transforms
                          if type(t).__name__ == "RandomApply"}
    assert probs(v1) == {"ColorJitter": 0.8, "GaussianBlur": 1.0}
    assert probs(v2) == {"ColorJitter": 0.8, "GaussianBlur": 0.1, "Solarize": 0.2}
    jitter = v1.transforms[1].transforms[0]
    assert (jitter.brightness, jitter.saturation, jitter.hue) == ((0.8, 1.2), (0.9, 1.1), (-0.1, 0.1))


# --- configs ---------------------------------------------------------------------------------------------
def test_shipped_configs_carry_the_official_values():
    load = lambda name: parse_config(PretrainConfig, ["--config", name], "t", "t", search_dir=CONFIG_DIR)[0]
    for name, arch in (("moco_v3_vit_small", "vit_small_h12"), ("moco_v3_vit_base", "vit_base")):
        c = load(name)
        assert (c.algorithm, c.arch, c.optimizer, c.lr, c.weight_decay, c.epochs, c.warmup_epochs, c.batch_size,
                c.moco_t, c.moco_m, c.moco_m_cos, c.stop_grad_conv1, c.moco_dim, c.mlp_dim, c.crop_min) == \
            ("moco_v3", arch, "adamw", 1.5e-4, 0.1, 300, 40, 4096, 0.2, 0.99, True, True, 256, 4096, 0.08)
    c = load("moco_v3_r50")
    assert (c.arch, c.optimizer, c.lr, c.weight_decay, c.epochs, c.warmup_epochs, c.batch_size, c.moco_t,
            c.moco_m_cos, c.crop_min, c.momentum) == ("resnet50", "lars", 0.6, 1e-6, 100, 10, 4096, 1.0, True, 0.2, 0.9)
    for demo in ("moco_v3_vit_demo", "moco_v3_r18_demo"):
        assert load(demo).algorithm == "moco_v3" and load(demo).data == "demo"


def test_v3_fields_need_the_v3_algorithm_and_v1v2_records_leave_them_out():
    with pytest.raises(ConfigError, match="optimizer: moco_v3 field"):
        validate(PretrainConfig(optimizer="adamw"), 1)
    with pytest.raises(ConfigError, match="loader='tensor': moco_v3"):
        validate(PretrainConfig(algorithm="moco_v3", loader="tensor"), 1)
    with pytest.raises(ConfigError, match=r"arch='resnet51', width=64: unknown arch 'resnet51'; choose one of"):
        validate(PretrainConfig(arch="resnet51"), 1)
    with pytest.raises(ConfigError, match=r"arch='vit_demo', width=16: width=16 is only supported for the small"):
        validate(PretrainConfig(algorithm="moco_v3", arch="vit_demo", width=16), 1)
    assert "algorithm" not in config_record(PretrainConfig())
    assert config_record(PretrainConfig(algorithm="moco_v3"))["optimizer"] == "lars"
    v3_on_v2 = config_record(PretrainConfig(algorithm="moco_v3", mlp=True, aug_plus=True, cos=True, moco_k=4096))
    assert not {"moco_k", "mlp", "aug_plus", "cos", "schedule", "shuffle_bn", "bn_groups"} & set(v3_on_v2)
    assert {"moco_k", "mlp", "shuffle_bn"} <= set(config_record(PretrainConfig()))


# --- training runs ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    for c in range(3):
        d = root / "train" / f"class{c}"
        d.mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def tiny_cfg(data, out, **kw):
    base = dict(algorithm="moco_v3", data=str(data), out=str(out), arch="resnet18_small", width=8, image_size=16,
                batch_size=8, moco_dim=8, mlp_dim=16, optimizer="lars", lr=0.6, weight_decay=1e-6, moco_t=1.0,
                moco_m=0.9, moco_m_cos=True, epochs=2, warmup_epochs=1, crop_min=0.5, blur_sigma=[0.1, 0.3],
                workers=0, print_freq=2, steps_per_epoch=3, seed=3, amp=False, channels_last=False)
    return PretrainConfig(**(base | kw))


VIT = dict(arch="vit_demo", width=64, optimizer="adamw", lr=1.5e-3, weight_decay=0.05, moco_t=0.2,
           stop_grad_conv1=True)


def _backbone_keys(arch, width):
    from mocobench.core.backbones import build_backbone
    return [k for k in build_backbone(arch, 10, width=width).state_dict() if not k.startswith("fc.")]


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_checkpoint_has_the_official_v3_layout(tiny_folder, tmp_path, kind):
    extra = VIT if kind == "vit" else {}
    cfg = tiny_cfg(tiny_folder, tmp_path, **extra)
    run(cfg)
    ckpt = torch.load(tmp_path / "checkpoint_0001.pth.tar", weights_only=True)
    assert set(ckpt) == {"epoch", "arch", "state_dict", "optimizer", "scaler", "config", "rng", "run_id",
                         "global_step", "train_seconds", "resume_step", "epoch_stats"}
    assert (ckpt["epoch"], ckpt["arch"], ckpt["global_step"]) == (2, cfg.arch, 6)
    head = "head" if kind == "vit" else "fc"  # MoCo_ViT names the projector `head`, MoCo_ResNet `fc`
    if kind == "vit":
        proj = ["0.weight", *[f"{i}.{s}" for i in (1, 4) for s in ("weight", "bias", "running_mean", "running_var",
                                                                   "num_batches_tracked")],
                "3.weight", "6.weight", "7.running_mean", "7.running_var", "7.num_batches_tracked"]
        pred = ["0.weight", *[f"1.{s}" for s in ("weight", "bias", "running_mean", "running_var",
                                                  "num_batches_tracked")],
                "3.weight", "4.running_mean", "4.running_var", "4.num_batches_tracked"]
    else:
        proj = ["0.weight", *[f"1.{s}" for s in ("weight", "bias", "running_mean", "running_var",
                                                  "num_batches_tracked")],
                "3.weight", "4.running_mean", "4.running_var", "4.num_batches_tracked"]
        pred = ["0.weight", *[f"1.{s}" for s in ("weight", "bias", "running_mean", "running_var",
                                                  "num_batches_tracked")], "3.weight"]
    expected = {f"module.{enc}.{k}" for enc in ("base_encoder", "momentum_encoder")
                for k in _backbone_keys(cfg.arch, cfg.width) + [f"{head}.{p}" for p in proj]}
    expected |= {f"module.predictor.{p}" for p in pred}
    assert set(ckpt["state_dict"]) == expected
    if kind == "vit":  # the frozen patch projection and position embedding stay as initialised
        first = torch.load(tmp_path / "checkpoint_0000.pth.tar", weights_only=True)["state_dict"]
        sd = ckpt["state_dict"]
        for key in ("patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed"):
            assert torch.equal(sd[f"module.base_encoder.{key}"], first[f"module.base_encoder.{key}"]), key
            # the momentum copy only moves by the EMA's rounding (m p + (1 - m) p)
            assert torch.allclose(sd[f"module.base_encoder.{key}"], sd[f"module.momentum_encoder.{key}"]), key
        assert not torch.equal(sd["module.base_encoder.blocks.0.attn.qkv.weight"],
                               first["module.base_encoder.blocks.0.attn.qkv.weight"])
        D = sd["module.base_encoder.cls_token"].shape[-1]
        assert torch.equal(sd["module.base_encoder.pos_embed"], sincos_pos_embed_2d((8, 8), D))
    # every evaluator reads it: the base encoder, the projector set aside (checkpoints/formats.py)
    from mocobench.checkpoints.formats import load_backbone
    read = load_backbone(tmp_path / "checkpoint_0001.pth.tar")
    assert (read.format, read.arch, read.epoch) == ("moco_v3", cfg.arch, 2)
    assert sorted(read.head) == sorted(f"fc.{p}" for p in proj)
    for key, value in read.state_dict.items():
        assert torch.equal(value, ckpt["state_dict"][f"module.base_encoder.{key}"]), key


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_resume_is_exact(tiny_folder, tmp_path, kind):
    extra = VIT if kind == "vit" else {}
    run(tiny_cfg(tiny_folder, tmp_path / "straight", epochs=3, **extra))
    run(tiny_cfg(tiny_folder, tmp_path / "resumed", epochs=3, stop_after=2, **extra))
    assert latest_checkpoint(tmp_path / "resumed").name == "checkpoint_0001.pth.tar"
    run(tiny_cfg(tiny_folder, tmp_path / "resumed", epochs=3, **extra))
    a = torch.load(tmp_path / "straight" / "checkpoint_0002.pth.tar", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint_0002.pth.tar", weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i][n], sb[i][n]) for i in sa for n in sa[i])


# --- two processes over gloo -----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loss_worker(rank, port, qs, ks, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    loss, _ = make(T=0.2).contrastive_loss(qs[rank], ks[rank])
    torch.save(loss, os.path.join(result_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_two_rank_loss_uses_all_keys_and_offset_labels(tmp_path):
    torch.manual_seed(1)
    qs, ks = [torch.randn(3, 4) for _ in range(2)], [torch.randn(3, 4) for _ in range(2)]
    mp.spawn(_loss_worker, args=(_free_port(), qs, ks, str(tmp_path)), nprocs=2, join=True)
    keys = torch.cat(ks)
    for r in range(2):  # rank r's queries meet all 6 keys; its positives are keys 3r .. 3r + 2
        assert torch.allclose(torch.load(tmp_path / f"rank{r}.pt"), hand_ctr(qs[r], keys, 0.2, offset=3 * r), atol=1e-5)


def _two_rank_run(rank, port, data, out, overrides):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    run(tiny_cfg(data, out, **overrides))
    torch.distributed.destroy_process_group()


def test_two_rank_resume_continues_every_rank_exactly(tiny_folder, tmp_path):
    """2 gloo ranks: 2 epochs straight == 1 epoch + resume, bitwise (each rank's RNG restored)."""
    def two_ranks(out, **overrides):
        mp.spawn(_two_rank_run, args=(_free_port(), str(tiny_folder), str(out), overrides), nprocs=2, join=True)

    two_ranks(tmp_path / "straight", epochs=2)
    two_ranks(tmp_path / "resumed", epochs=2, stop_after=1)
    first = torch.load(tmp_path / "resumed" / "checkpoint_0000.pth.tar", weights_only=True)
    assert len(first["rng_per_rank"]) == 2 and not torch.equal(*(r["torch"] for r in first["rng_per_rank"]))
    two_ranks(tmp_path / "resumed", epochs=2)
    a = torch.load(tmp_path / "straight" / "checkpoint_0001.pth.tar", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint_0001.pth.tar", weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys() and "module.predictor.0.weight" in a["state_dict"]
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
