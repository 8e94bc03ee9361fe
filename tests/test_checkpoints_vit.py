"""ViT checkpoints in the layouts their projects write: detected, read into timm's names, same features.

Fixtures are written here from a random timm-built ViT (core/vit.py, `vit_demo`), with each project's key
layout restated from its source: facebookresearch/moco-v3 (main_moco.py, moco/builder.py MoCo_ViT, vits.py),
facebookresearch/dino (main_dino.py save_dict), facebookresearch/mae (util/misc.py save_model,
models_mae.py), timm's CheckpointSaver, torchvision's VisionTransformer (a real one: its own forward is the
reference) and MMSelfSup/mmpretrain's VisionTransformer (`backbone.`, ln1/ln2, ffn.layers).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json

import pytest
import torch
import torchvision
from torch import nn

from mocobench.checkpoints.formats import load_backbone
from mocobench.checkpoints.models import model_from_checkpoint
from mocobench.core.backbones import build_backbone
from mocobench.core.errors import CheckpointError, ConfigError
from mocobench.evaluate.layers import LayerFeatures

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = "vit_demo"  # embed 128, depth 4, 2 heads, patch 4, 32 px
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@functools.lru_cache(maxsize=None)
def _source(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_backbone(ARCH, num_classes=10)
    with torch.no_grad():  # LayerNorm affine and biases away from their 1/0 init, so every tensor matters
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def source() -> nn.Module:
    return copy.deepcopy(_source())


def timm_names(model: nn.Module, head: str = "head") -> dict[str, torch.Tensor]:
    """The model's state dict in timm's own names (classifier `head`)."""
    return {(head + k[2:] if k.startswith("fc") else k): v for k, v in model.state_dict().items()}


def backbone_only(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith(("head", "fc"))}


def cls_feature(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return LayerFeatures(copy.deepcopy(model).eval(), ["cls"])(X)["cls"]


def _mlp(dims: list[int], last_bn: bool = True) -> nn.Sequential:
    """moco-v3 builder.py `_build_mlp`: Linear (no bias) + BN + ReLU between layers, last BN without affine."""
    layers = []
    for i in range(len(dims) - 1):
        last = i == len(dims) - 2
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=False))
        if not last:
            layers += [nn.BatchNorm1d(dims[i + 1]), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(dims[i + 1], affine=False))
    return nn.Sequential(*layers)


def write_moco_v3(path, src):
    """main_moco.py save_checkpoint: epoch, arch, state_dict (DDP), optimizer, scaler; MoCo_ViT puts the
    3-layer projector in base_encoder.head and momentum_encoder.head, the 2-layer predictor beside them."""
    enc = backbone_only(timm_names(src))
    head = _mlp([128, 64, 64, 16]).state_dict()
    sd = {f"module.base_encoder.{k}": v for k, v in enc.items()}
    sd.update({f"module.base_encoder.head.{k}": v for k, v in head.items()})
    sd.update({f"module.momentum_encoder.{k}": v + 1 for k, v in enc.items()})
    sd.update({f"module.momentum_encoder.head.{k}": v for k, v in head.items()})
    sd.update({f"module.predictor.{k}": v for k, v in _mlp([16, 64, 16], last_bn=False).state_dict().items()})
    torch.save({"epoch": 300, "arch": "vit_small", "state_dict": sd, "optimizer": {"state": {}, "param_groups": []},
                "scaler": {"scale": 65536.0}}, path)
    return 300, False


def write_dino(path, src):
    """main_dino.py save_dict: student (DDP: module.), teacher (ViT teacher not DDP-wrapped), optimizer,
    epoch, args, dino_loss; the backbone under `backbone.` (its own head an Identity), DINOHead under `head.`."""
    def wrapper(net, prefix):
        sd = {f"{prefix}backbone.{k}": v for k, v in backbone_only(timm_names(net)).items()}
        sd.update({f"{prefix}head.mlp.0.weight": torch.randn(32, 128), f"{prefix}head.mlp.0.bias": torch.zeros(32),
                   f"{prefix}head.last_layer.weight_g": torch.ones(64, 1),
                   f"{prefix}head.last_layer.weight_v": torch.randn(64, 32)})
        return sd
    student = copy.deepcopy(src)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    torch.save({"student": wrapper(student, "module."), "teacher": wrapper(src, ""), "optimizer": {},
                "epoch": 100, "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=65536),
                "dino_loss": {"center": torch.zeros(1, 64)}}, path)
    return 100, False


def write_mae(path, src):
    """mae util/misc.py save_model: model (models_mae: encoder in timm names, mask_token, decoder_*),
    optimizer, epoch, scaler, args."""
    sd = backbone_only(timm_names(src))
    sd.update({"mask_token": torch.zeros(1, 1, 64), "decoder_embed.weight": torch.randn(64, 128),
               "decoder_embed.bias": torch.zeros(64), "decoder_pos_embed": torch.zeros(1, 65, 64),
               "decoder_blocks.0.norm1.weight": torch.ones(64), "decoder_norm.weight": torch.ones(64),
               "decoder_pred.weight": torch.randn(48, 64), "decoder_pred.bias": torch.zeros(48)})
    torch.save({"model": sd, "optimizer": {}, "epoch": 799, "scaler": {}, "args": argparse.Namespace(model="mae")},
               path)
    return 799, False


def write_timm(path, src):
    """timm CheckpointSaver: epoch, arch, state_dict (with the classifier head), optimizer, version, args, EMA."""
    torch.save({"epoch": 7, "arch": "vit_small_patch16_224", "state_dict": timm_names(src), "optimizer": {},
                "version": 2, "args": argparse.Namespace(model="vit_small_patch16_224"),
                "state_dict_ema": backbone_only(timm_names(src))}, path)
    return 7, True


def write_timm_plain(path, src):
    """A plain timm state dict (what timm's hub weights hold)."""
    torch.save(timm_names(src), path)
    return None, True


_MM = [("blocks.", "layers."), (".norm1.", ".ln1."), (".norm2.", ".ln2."), (".mlp.fc1.", ".ffn.layers.0.0."),
       (".mlp.fc2.", ".ffn.layers.1."), ("patch_embed.proj.", "patch_embed.projection.")]


def mm_name(timm_name: str) -> str:
    """mmpretrain VisionTransformer names: layers.i.{ln1, attn.qkv, attn.proj, ln2, ffn.layers.0.0,
    ffn.layers.1}, patch_embed.projection, the final norm `ln1`."""
    if timm_name.startswith("norm."):
        return "ln1." + timm_name[len("norm."):]
    for old, new in _MM:
        timm_name = timm_name.replace(old, new)
    return timm_name


def write_mmselfsup(path, src):
    """MMSelfSup 1.x: meta + state_dict with backbone. (mmpretrain ViT), neck., head., momentum_encoder."""
    sd = {f"backbone.{mm_name(k)}": v for k, v in backbone_only(timm_names(src)).items()}
    sd.update({"neck.fc0.weight": torch.randn(64, 128), "neck.bn0.weight": torch.ones(64),
               "head.predictor.fc0.weight": torch.randn(64, 16), "momentum_encoder.module.0.cls_token": torch.zeros(1, 1, 128),
               "momentum_encoder.steps": torch.tensor([5])})
    torch.save({"meta": {"epoch": 300, "mmselfsup_version": "1.0.0"}, "state_dict": sd}, path)
    return 300, False


WRITERS = {
    "moco_v3": (write_moco_v3, "linear-vit-s-300ep.pth.tar", "moco_v3"),
    "dino": (write_dino, "dino_deitsmall16_pretrain_full_checkpoint.pth", "ddp"),
    "mae": (write_mae, "mae_pretrain_vit_base_full.pth", "mae"),
    "timm": (write_timm, "checkpoint-7.pth.tar", "timm"),
    "timm_plain": (write_timm_plain, "vit_small.pth", "timm"),
    "mmselfsup": (write_mmselfsup, "mocov3_vit-small.pth", "mmselfsup"),
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_vit_format_detected_loaded_and_same_features(tmp_path, name):
    writer, filename, fmt = WRITERS[name]
    src = source()
    path = tmp_path / filename
    epoch, has_fc = writer(path, src)
    ckpt = load_backbone(path)
    assert (ckpt.format, ckpt.arch, ckpt.epoch, ckpt.has_fc) == (fmt, ARCH, epoch, has_fc)
    expected = src.state_dict() if has_fc else {k: v for k, v in src.state_dict().items() if not k.startswith("fc.")}
    assert sorted(ckpt.state_dict) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(ckpt.state_dict[k], v), k
    model, _ = model_from_checkpoint(path)
    assert torch.equal(cls_feature(model), cls_feature(src))
    if has_fc:
        with torch.no_grad():
            assert torch.equal(model.eval()(X), src(X))


def test_moco_v3_vit_sets_the_projector_aside_and_drops_momentum_encoder_and_predictor(tmp_path):
    write_moco_v3(tmp_path / "v3.pth.tar", source())
    ckpt = load_backbone(tmp_path / "v3.pth.tar")
    bn = ["bias", "num_batches_tracked", "running_mean", "running_var", "weight"]
    assert sorted(ckpt.head) == sorted(["fc.0.weight", *(f"fc.1.{k}" for k in bn), "fc.3.weight",
                                        *(f"fc.4.{k}" for k in bn), "fc.6.weight",
                                        *(f"fc.7.{k}" for k in bn[1:4])])
    assert all(k.startswith(("module.momentum_encoder.", "module.predictor.", "module.base_encoder.head."))
               for k in ckpt.dropped)
    assert ckpt.meta["stored_arch"] == "vit_small"


def write_ours_moco_v3(path, src):
    """Our pretrain/train.py save_checkpoint with algorithm moco_v3 and arch vit_small (6 heads, as DeiT)."""
    sd = {f"module.base_encoder.{k}": v for k, v in backbone_only(timm_names(src)).items()}
    torch.save({"epoch": 3, "arch": "vit_small", "run_id": "pretrain-x", "config": {"arch": "vit_small"},
                "state_dict": sd, "optimizer": {}}, path)


def write_moco_v3_lincls(path, src):
    """moco-v3 main_lincls.py save_checkpoint: epoch, arch (moco-v3's name), state_dict of the DDP-wrapped
    vits.py model (its `head` the trained classifier), best_acc1, optimizer."""
    sd = {f"module.{k}": v for k, v in timm_names(src).items()}
    torch.save({"epoch": 90, "arch": "vit_small", "state_dict": sd, "best_acc1": 73.2, "optimizer": {}}, path)


def write_convert_to_deit(path, src):
    """moco-v3 convert_to_deit.py: {"model": base_encoder's keys without `module.base_encoder.` and head}."""
    torch.save({"model": backbone_only(timm_names(src))}, path)


def write_deit(path, src):
    """A DeiT release: {"model": the timm-named ViT with its classifier}."""
    torch.save({"model": timm_names(src)}, path)


def write_mmselfsup_mae(path, src):
    """MMSelfSup without MoCo v3's neck/momentum encoder (e.g. its MAE): mmpretrain's ViT-S, 6 heads."""
    sd = {f"backbone.{mm_name(k)}": v for k, v in backbone_only(timm_names(src)).items()}
    torch.save({"meta": {"epoch": 400}, "state_dict": {**sd, "neck.decoder_embed.weight": torch.randn(8, 384)}}, path)


@pytest.mark.parametrize("writer,heads", [(write_moco_v3, 12), (write_mmselfsup, 12), (write_dino, 6),
                                          (write_timm_plain, 6), (write_ours_moco_v3, 6), (write_moco_v3_lincls, 12),
                                          (write_convert_to_deit, 12), (write_deit, 6), (write_mmselfsup_mae, 6)])
def test_vit_small_heads_follow_the_format(tmp_path, writer, heads):
    """No shape tells the number of heads: MoCo v3's ViT-S (vits.py; its pretrain, linear and convert_to_deit
    files) and MMSelfSup's `mocov3-small` have 12, DINO's, timm's, DeiT's and ours `vit_small` 6, and the
    attention differs, so the format decides."""
    torch.manual_seed(0)
    src = build_backbone("vit_small_h12" if heads == 12 else "vit_small", 10).eval()
    writer(tmp_path / "s.pth", src)
    model, ckpt = model_from_checkpoint(tmp_path / "s.pth")
    assert ckpt.arch == ("vit_small_h12" if heads == 12 else "vit_small") and model.blocks[0].attn.num_heads == heads
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(LayerFeatures(model.eval(), ["cls"])(x)["cls"], LayerFeatures(src, ["cls"])(x)["cls"])


def test_moco_v3_lincls_vit_keeps_its_classifier(tmp_path):
    torch.manual_seed(0)
    src = build_backbone("vit_small_h12", 10).eval()
    write_moco_v3_lincls(tmp_path / "l.pth", src)
    model, ckpt = model_from_checkpoint(tmp_path / "l.pth")
    assert (ckpt.format, ckpt.has_fc, ckpt.epoch, ckpt.meta["moco_v3_file"]) == ("moco_v3", True, 90, "main_lincls.py")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), src(x))


def test_a_patch8_vit_with_moco_v3_heads_is_an_error_naming_the_heads(tmp_path):
    """MoCo v3 released no ViT-S/8; one in its layout would have 12 heads, which no arch here has."""
    src = build_backbone("vit_small_p8", 10)
    sd = {f"module.base_encoder.{k}": v for k, v in backbone_only(timm_names(src)).items()}
    torch.save({"epoch": 1, "state_dict": sd}, tmp_path / "p8.pth")
    with pytest.raises(CheckpointError, match=r"patch 8 with 12 heads .* vit_small_p8 arch has 6 heads"):
        load_backbone(tmp_path / "p8.pth")


def test_convert_arch_override_is_recorded_for_every_reader(tmp_path, capsys):
    """A 12-head ViT-S saved as plain timm weights reads as timm's 6-head vit_small; `convert --to moco --arch
    vit_small_h12` writes a file every evaluator reads as the 12-head model it is."""
    from mocobench.cli import main as mocobench
    torch.manual_seed(0)
    src = build_backbone("vit_small_h12", 10).eval()
    write_timm_plain(tmp_path / "plain.pth", src)
    assert load_backbone(tmp_path / "plain.pth").arch == "vit_small"
    assert mocobench(["convert", "--to", "moco", "--arch", "vit_small_h12", str(tmp_path / "plain.pth"),
                      str(tmp_path / "h12.pth")]) == 0
    model, ckpt = model_from_checkpoint(tmp_path / "h12.pth")
    assert (ckpt.format, ckpt.arch) == ("moco_v3", "vit_small_h12")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(LayerFeatures(model.eval(), ["cls"])(x)["cls"], LayerFeatures(src, ["cls"])(x)["cls"])
    assert mocobench(["convert", "--to", "moco", "--arch", "vit_base", str(tmp_path / "plain.pth"),
                      str(tmp_path / "b.pth")]) == 2
    assert "--arch vit_base: embed dim 768, depth 12, patch 16, but the checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "b.pth").exists()


def test_dino_vit_uses_the_teacher(tmp_path):
    write_dino(tmp_path / "d.pth", source())
    ckpt = load_backbone(tmp_path / "d.pth")
    assert ckpt.meta["prefix"] == "backbone." and ckpt.meta["dino_checkpoint_key"] == "teacher"
    assert "head.mlp.0.weight" in ckpt.dropped and any(k.startswith("student.module.") for k in ckpt.dropped)


def test_torchvision_vit_logits_equal_torchvision_own_forward(tmp_path):
    """A real torchvision VisionTransformer (the independent reference): its state dict read into the timm
    ViT gives its logits."""
    torch.manual_seed(1)
    tv = torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=4, num_heads=2,
                                              hidden_dim=128, mlp_dim=512, num_classes=10).eval()
    with torch.no_grad():
        for p in tv.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # zero-initialised heads and biases made non-zero
    torch.save(tv.state_dict(), tmp_path / "vit_b_16.pth")
    ckpt = load_backbone(tmp_path / "vit_b_16.pth")
    assert (ckpt.format, ckpt.arch, ckpt.has_fc) == ("torchvision", ARCH, True)
    assert ckpt.key_map["encoder.layers.encoder_layer_3.self_attention.in_proj_weight"] == "blocks.3.attn.qkv.weight"
    model, _ = model_from_checkpoint(tmp_path / "vit_b_16.pth")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(X), tv(X), rtol=1e-5, atol=1e-5)


def test_vit_keys_that_fit_nowhere_are_an_error_naming_them(tmp_path):
    sd = timm_names(source())
    sd["fc_norm.weight"] = torch.ones(128)  # a global-pool ViT: the canonical (token) ViT has no fc_norm
    torch.save(sd, tmp_path / "gap.pth")
    with pytest.raises(CheckpointError, match="match no part of a timm ViT .1.: fc_norm.weight"):
        load_backbone(tmp_path / "gap.pth")


def test_random_vit_and_layers(tmp_path):
    model, ckpt = model_from_checkpoint("random:vit_demo", num_classes=5)
    assert ckpt.arch == "vit_demo" and model.fc.out_features == 5
    with torch.no_grad():
        feats = LayerFeatures(model.eval(), ["cls", "patch_mean", "cls_last4"])(X)
        tokens = model.forward_features(X)  # timm's own path: blocks, then the final norm
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "cls": (2, 128, 1, 1), "patch_mean": (2, 128, 1, 1), "cls_last4": (2, 512, 1, 1)}
    torch.testing.assert_close(feats["cls"].flatten(1), tokens[:, 0])
    torch.testing.assert_close(feats["patch_mean"].flatten(1), tokens[:, 1:].mean(1))
    torch.testing.assert_close(feats["cls_last4"].flatten(1)[:, -128:], tokens[:, 0])  # the last block's CLS last
    with pytest.raises(ValueError, match="layer avgpool does not apply to a ViT; its layers: cls, patch_mean"):
        LayerFeatures(model, ["avgpool"])
    with pytest.raises(ValueError, match="layer cls does not apply to a ResNet"):
        LayerFeatures(build_backbone("resnet18_small", 10, 8), ["cls"])
    del model.blocks[2:]  # a 2-block ViT
    with pytest.raises(ConfigError, match="layer cls_last4 needs the last 4 blocks; this ViT has 2"):
        LayerFeatures(model, ["cls", "cls_last4"])


def test_inspect_and_convert_a_vit(tmp_path, capsys):
    from mocobench.cli import main as mocobench
    write_dino(tmp_path / "dino.pth", source())
    assert mocobench(["inspect", str(tmp_path / "dino.pth")]) == 0
    out = capsys.readouterr().out
    assert "format:      ddp" in out and "arch:        vit_demo (ViT: embed 128, 4 blocks, patch 4, 65 positions)" in out
    assert mocobench(["convert", "--to", "timm", str(tmp_path / "dino.pth"), str(tmp_path / "timm.pth")]) == 0
    written = torch.load(tmp_path / "timm.pth", weights_only=True)
    assert written.keys() == backbone_only(timm_names(source())).keys()  # timm's own names, no head
    timm_model = build_backbone(ARCH, 10)
    assert set(timm_model.load_state_dict({k: v for k, v in written.items()}, strict=False).missing_keys) == {
        "fc.weight", "fc.bias"}
    capsys.readouterr()
    assert mocobench(["convert", "--to", "detectron2", str(tmp_path / "dino.pth"), str(tmp_path / "d2.pkl")]) == 2
    assert "vit_demo is a ViT; the detectron2 layout holds ResNets here: convert with --to timm" in capsys.readouterr().err
    assert not (tmp_path / "d2.pkl").exists()


@pytest.mark.parametrize("writer", [write_moco_v3, write_dino], ids=["moco_v3", "dino"])
def test_vit_checkpoints_through_every_frozen_evaluator(writer, demo_data, tmp_path):
    """The issue's end-to-end path: a MoCo v3 (official layout) and a DINO ViT checkpoint through kNN, VOC07
    SVM, low-shot SVM and the MoCo v3 linear protocol, on the CLS token."""
    from mocobench.core.records import read_metrics
    from mocobench.evaluate.cli import main
    from mocobench.slurm.testing import tiny_imagefolder
    ckpt = tmp_path / "vit.pth"
    writer(ckpt, source())
    tiny = tiny_imagefolder(tmp_path / "tiny")
    common = ["--checkpoint", str(ckpt), "--workers", "0", "--cache-dir", str(tmp_path / "cache")]
    assert main(["knn", "--config", "demo", *common, "--data", str(tiny), "--layer", "cls",
                 "--out", str(tmp_path / "knn")]) == 0
    for evaluator in ("svm", "lowshot"):
        assert main([evaluator, "--config", "demo", *common, "--layer", "cls", "--out", str(tmp_path / evaluator)]) == 0
    assert main(["linear", "--mode", "lincls_v3", *common, "--data", str(tiny), "--epochs", "1", "--batch-size", "8",
                 "--image-size", "32", "--resize", "36", "--crop", "32", "--out", str(tmp_path / "linear")]) == 0
    knn_rec = read_metrics(tmp_path / "knn" / "metrics.json")
    assert knn_rec["provenance"]["layer"] == "cls" and knn_rec["checkpoint"]["md5"]
    assert 0 <= knn_rec["metrics"]["k20/top1"] <= 100
    assert 0 <= read_metrics(tmp_path / "svm" / "metrics.json")["metrics"]["mAP"] <= 100
    lin = read_metrics(tmp_path / "linear" / "metrics.json")
    assert set(lin["metrics"]) >= {"top1", "cls/top1", "best_top1"} and lin["metrics"]["details"]["backbone_unchanged"]
    assert lin["config"]["lr"] == 3.0 and lin["protocol"] == "linear/custom"  # 1 epoch at batch 8: not the protocol
    run_record = json.loads((tmp_path / "linear" / "run.json").read_text())
    assert (run_record["config"]["lr"], run_record["config"]["layer"]) == (3.0, "cls")  # resolved before it is written


def test_moco_v3_linear_protocol_is_the_backbones_own():
    """CONFIG.md's ViT recipe (lr 3, CLS token) run on a ResNet is not the ResNet protocol (lr 0.1, avgpool),
    nor labelled the ViT one: the layer is part of each."""
    from mocobench.evaluate import linear
    from mocobench.evaluate.layers import load_frozen_backbone
    from mocobench.evaluate.protocols import protocol_of
    from mocobench.core.config import to_dict
    vit_recipe = linear.resolve_protocol(linear.LinearConfig(mode="lincls_v3", lr=3.0, batch_size=1024))
    default = linear.resolve_protocol(linear.LinearConfig(mode="lincls_v3", batch_size=1024))
    got = {}
    for arch in ("vit_demo", "resnet18_small:16"):
        backbone = load_frozen_backbone(f"random:{arch}")
        for name, cfg in (("vit recipe", vit_recipe), ("default", default)):
            resolved = linear.single_head_config(cfg, backbone)
            got[arch, name] = (resolved.layer, resolved.lr,
                               protocol_of(to_dict(resolved), linear.NAMED_PROTOCOLS, "linear"))
    assert got == {("vit_demo", "vit recipe"): ("cls", 3.0, "linear/moco-v3-vit@1"),
                   ("vit_demo", "default"): ("cls", 3.0, "linear/moco-v3-vit@1"),
                   ("resnet18_small:16", "vit recipe"): ("avgpool", 3.0, "linear/custom"),
                   ("resnet18_small:16", "default"): ("avgpool", 0.1, "linear/moco-v3-resnet@1")}
    shipped_vit = dataclasses.replace(vit_recipe, layer="cls")  # --config moco-v3-vit
    with pytest.raises(ConfigError, match="--layer cls .* is a ResNet; .* --config moco-v3-resnet"):
        linear.single_head_config(shipped_vit, load_frozen_backbone("random:resnet18_small:16"))
    with pytest.raises(ConfigError, match="--layer patch_mean: --mode lincls_v3 trains one head"):
        linear.single_head_config(dataclasses.replace(vit_recipe, layer="patch_mean"), load_frozen_backbone("random:vit_demo"))


def test_moco_v3_linear_schedule_and_vit_guard(tmp_path):
    """moco-v3 main_lincls.py: init_lr = lr x batch / 256, then lr = init_lr x 0.5 (1 + cos(pi epoch / epochs));
    CONFIG.md's ViT command (--lr 3, batch 1024) starts at 12 and is at 6 half-way."""
    from mocobench.core.errors import ConfigError
    from mocobench.evaluate import linear
    cfg = linear.resolve_protocol(linear.LinearConfig(mode="lincls_v3", lr=3.0, batch_size=1024))
    assert (cfg.epochs, cfg.weight_decay, cfg.schedule) == (90, 0.0, [])
    assert [round(linear.lr_at(cfg, e), 6) for e in (0, 45, 90)] == [12.0, 6.0, 0.0]
    with pytest.raises(ConfigError, match="is a ViT: main_lincls.py of MoCo v1/v2 is for ResNets; use --mode lincls_v3"):
        linear.run(linear.LinearConfig(checkpoint="random:vit_demo", data=str(tmp_path / "none"), out=str(tmp_path / "o")))
