"""Checkpoint formats, safe loading, inspect and convert (checkpoints/: safe_load, formats, models, convert, cli).

Every fixture is written here, from a random torchvision ResNet, with the key layout of the project that
produces it (module structure restated from: facebookresearch/moco moco/builder.py, moco-v3
moco/builder.py, OpenSelfSup/MMSelfSup MoCo, VISSL checkpoints, SwAV/DINO main scripts, timm's
CheckpointSaver, detectron2 pickles). Nothing is written with the code under test except where a test
is about that code's own output.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import functools
import json
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from torch import nn

from mocobench.checkpoints.formats import load_backbone
from mocobench.checkpoints.models import model_from_checkpoint
from mocobench.checkpoints.safe_load import safe_load
from mocobench.cli import main as mocobench
from mocobench.core.backbones import build_backbone
from mocobench.core.errors import CheckpointError

ARCHS = [("resnet18_small", 8), ("resnet50_small", 4)]
X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


# ------------------------------------------------------------------------------------------------------
# source networks and helpers
# ------------------------------------------------------------------------------------------------------

def make_source(arch: str, width: int, seed: int = 0, num_classes: int = 10) -> nn.Module:
    """A torchvision ResNet with random weights AND random BN statistics (so buffers must load too)."""
    return copy.deepcopy(_source(arch, width, seed, num_classes))


@functools.lru_cache(maxsize=None)
def _source(arch: str, width: int, seed: int, num_classes: int) -> nn.Module:
    torch.manual_seed(seed)
    model = build_backbone(arch, num_classes, width)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(seed + 3)
    return model.eval()


def features(model: nn.Module) -> torch.Tensor:
    model = copy.deepcopy(model).eval()
    model.fc = nn.Identity()
    with torch.no_grad():
        return model(X)


def backbone_sd(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}


def perturbed(model: nn.Module) -> nn.Module:
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    return other


def feat_dim(model: nn.Module) -> int:
    return model.fc.in_features


class OfficialMoCo(nn.Module):
    """Module layout of facebookresearch/moco moco/builder.py (v2: fc = Linear, ReLU, Linear)."""

    def __init__(self, src: nn.Module, mlp: bool, dim: int = 16, K: int = 32):
        super().__init__()
        d = feat_dim(src)
        self.encoder_q = copy.deepcopy(src)
        self.encoder_q.fc = (nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, dim)) if mlp
                             else nn.Linear(d, dim))
        self.encoder_k = perturbed(self.encoder_q)
        self.register_buffer("queue", torch.randn(dim, K))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))


def _mlp_v3(n_in: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, out, bias=False), nn.BatchNorm1d(out, affine=False))


class MoCoV3(nn.Module):
    """Module layout of facebookresearch/moco-v3 moco/builder.py for ResNets."""

    def __init__(self, src: nn.Module):
        super().__init__()
        d = feat_dim(src)
        self.base_encoder = copy.deepcopy(src)
        self.base_encoder.fc = _mlp_v3(d, 32, 16)
        self.momentum_encoder = perturbed(self.base_encoder)
        self.predictor = _mlp_v3(16, 32, 16)


class OpenSelfSupMoCo(nn.Module):
    """OpenSelfSup/MMSelfSup 0.x MoCo: encoder_q = Sequential(backbone, neck), self.backbone = encoder_q[0]."""

    def __init__(self, src: nn.Module):
        super().__init__()
        backbone = copy.deepcopy(src)
        del backbone.fc  # mmcv's ResNet has no classifier
        neck = nn.Module()
        neck.mlp = nn.Sequential(nn.Linear(feat_dim(src), 32), nn.ReLU(), nn.Linear(32, 16))
        self.encoder_q = nn.Sequential(backbone, neck)
        self.encoder_k = perturbed(self.encoder_q)
        self.backbone = self.encoder_q[0]
        self.register_buffer("queue", torch.randn(16, 32))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))


def ddp(sd: dict) -> dict:
    return {f"module.{k}": v for k, v in sd.items()}


def sgd_state(model: nn.Module) -> dict:
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
    model.zero_grad()
    return opt.state_dict()


# ------------------------------------------------------------------------------------------------------
# fixture writers, one per format: (path, source network) -> expected epoch
# ------------------------------------------------------------------------------------------------------

def write_moco(path, src, mlp=True):
    net = OfficialMoCo(src, mlp)
    torch.save({"epoch": 200, "arch": "resnet50", "state_dict": ddp(net.state_dict()),
                "optimizer": sgd_state(net)}, path)
    return 200


def write_moco_ours(path, src):
    """Our train.py adds a config dict and plain-typed RNG states to the official layout."""
    net = OfficialMoCo(src, mlp=True)
    torch.save({"epoch": 3, "arch": "resnet18_small", "state_dict": ddp(net.state_dict()),
                "optimizer": sgd_state(net), "config": {"arch": "resnet18_small", "mlp": True, "moco_dim": 16},
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": [1, 2]}}, path)
    return 3


def write_moco_v3(path, src):
    net = MoCoV3(src)
    torch.save({"epoch": 100, "arch": "resnet50", "state_dict": ddp(net.state_dict()),
                "optimizer": sgd_state(net), "scaler": {"scale": 65536.0, "growth_factor": 2.0}}, path)
    return 100


def write_mmselfsup(path, src):
    net = OpenSelfSupMoCo(src)
    torch.save({"meta": {"epoch": 200, "iter": 5000, "mmcv_version": "1.3.0", "config": "model = dict()"},
                "state_dict": net.state_dict(), "optimizer": sgd_state(net)}, path)
    return 200


def write_vissl(path, src):
    trunk = {f"_feature_blocks.{k}": v for k, v in backbone_sd(src).items()}
    heads = {"0.projection_head.0.weight": torch.randn(32, feat_dim(src)), "0.prototypes0.weight": torch.randn(8, 16)}
    torch.save({"phase_idx": 399, "iteration": 1200, "iteration_num": 1200, "train_phase_idx": 199,
                "loss": {"name": "swav_loss"},
                "classy_state_dict": {"train": True, "base_model": {"model": {"trunk": trunk, "heads": heads},
                                                                    "meta": {}},
                                      "optimizer": {"name": "sgd"}}}, path)
    return 200


def write_torchvision(path, src):
    torch.save(src.state_dict(), path)
    return None


def write_swav(path, src):
    sd = backbone_sd(src)
    d = feat_dim(src)
    head = nn.Sequential(nn.Linear(d, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 16))
    sd.update({f"projection_head.{k}": v for k, v in head.state_dict().items()})
    sd["prototypes.weight"] = torch.randn(8, 16)
    torch.save({"epoch": 800, "state_dict": ddp(sd), "optimizer": {"state": {}, "param_groups": []}}, path)
    return 800


def write_dino(path, src):
    """DINO main_dino.py: student and teacher (both DDP for BN nets), backbone.fc = Identity, args Namespace."""
    def wrapper(net):
        sd = {f"backbone.{k}": v for k, v in backbone_sd(net).items()}
        sd.update({"head.mlp.0.weight": torch.randn(32, feat_dim(net)), "head.last_layer.weight_g": torch.ones(8, 1)})
        return ddp(sd)
    torch.save({"student": wrapper(perturbed(src)), "teacher": wrapper(src), "optimizer": {}, "epoch": 100,
                "args": argparse.Namespace(arch="resnet50", lr=0.3, out_dim=60000), "dino_loss": {"center": torch.zeros(1, 8)}},
               path)
    return 100


def write_timm(path, src):
    """timm's CheckpointSaver: epoch, arch, state_dict, optimizer, version, args (a Namespace), EMA."""
    torch.save({"epoch": 3, "arch": "resnet18", "state_dict": src.state_dict(), "optimizer": sgd_state(src),
                "version": 2, "args": argparse.Namespace(model="resnet18", lr=0.5), "metric": 71.2,
                "state_dict_ema": perturbed(src).state_dict()}, path)
    return 3


_ST_NAMES = {torch.float32: "F32", torch.int64: "I64", torch.float16: "F16"}


def write_safetensors(path, sd):
    """The safetensors layout (u64 header length, JSON header with data_offsets, raw bytes)."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in sd.items():
        raw = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def write_timm_safetensors(path, src):
    write_safetensors(path, src.state_dict())
    return None


# An independent restatement of facebookresearch/moco detection/convert-pretrain-to-detectron2.py:
# take every key under `module.encoder_q.` (fc included), strip that prefix, prefix `stem.` when the
# name has no "layer", then apply these substring substitutions in this order.
_OFFICIAL_SUBSTITUTIONS = ([(f"layer{i}", f"res{i + 1}") for i in (1, 2, 3, 4)]
                           + [(f"bn{i}", f"conv{i}.norm") for i in (1, 2, 3)]
                           + [("downsample.0", "shortcut"), ("downsample.1", "shortcut.norm")])


def official_d2_name(name: str) -> str:
    name = name if "layer" in name else "stem." + name
    for old, new in _OFFICIAL_SUBSTITUTIONS:
        name = name.replace(old, new)
    return name


def official_moco_to_d2(checkpoint: dict) -> dict:
    prefix = "module.encoder_q."
    model = {official_d2_name(k[len(prefix):]): v.numpy() for k, v in checkpoint["state_dict"].items()
             if k.startswith(prefix)}
    return {"model": model, "__author__": "MOCO", "matching_heuristics": True}


def write_detectron2(path, src):
    """What the official MoCo script would write for a v2 checkpoint of `src`."""
    net = OfficialMoCo(src, mlp=True)
    with open(path, "wb") as f:
        pickle.dump(official_moco_to_d2({"state_dict": ddp(net.state_dict())}), f)
    return None


WRITERS = {  # name -> (writer, file name, detected format, has_fc)
    "moco_v2": (write_moco, "ckpt.pth.tar", "moco", False),
    "moco_v1": (lambda p, s: write_moco(p, s, mlp=False), "ckpt.pth.tar", "moco", False),
    "moco_ours": (write_moco_ours, "checkpoint_0003.pth.tar", "moco", False),
    "moco_v3": (write_moco_v3, "ckpt.pth.tar", "moco_v3", False),
    "mmselfsup": (write_mmselfsup, "epoch_200.pth", "mmselfsup", False),
    "vissl": (write_vissl, "model_final_checkpoint_phase199.torch", "vissl", False),
    "torchvision": (write_torchvision, "resnet.pth", "torchvision", True),
    "swav_ddp": (write_swav, "swav.pth.tar", "ddp", False),
    "dino_ddp": (write_dino, "checkpoint.pth", "ddp", False),
    "timm": (write_timm, "checkpoint-3.pth.tar", "timm", True),
    "timm_safetensors": (write_timm_safetensors, "model.safetensors", "torchvision", True),
    "detectron2": (write_detectron2, "model.pkl", "detectron2", False),
}


# ------------------------------------------------------------------------------------------------------
# every format: detected, loaded, same features
# ------------------------------------------------------------------------------------------------------

# every format on a BasicBlock net; Bottleneck (conv3/bn3, downsample in stage 1) where renaming differs
CASES = [(name, *ARCHS[0]) for name in WRITERS] + [(name, *ARCHS[1]) for name in
                                                   ("moco_v2", "vissl", "detectron2")]


@pytest.mark.parametrize("name,arch,width", CASES)
def test_format_detected_loaded_and_same_features(tmp_path, name, arch, width):
    writer, filename, fmt, has_fc = WRITERS[name]
    src = make_source(arch, width)
    path = tmp_path / filename
    epoch = writer(path, src)

    ckpt = load_backbone(path)
    assert (ckpt.format, ckpt.arch, ckpt.width, ckpt.epoch, ckpt.has_fc) == (fmt, arch, width, epoch, has_fc)
    expected = src.state_dict() if has_fc else backbone_sd(src)
    assert list(ckpt.state_dict) == list(expected)
    for k, v in expected.items():
        assert ckpt.state_dict[k].dtype == v.dtype and torch.equal(ckpt.state_dict[k], v), k
    assert ckpt.kept and len(ckpt.md5) == 32 and ckpt.source == str(path)

    model, _ = model_from_checkpoint(path)
    assert torch.equal(features(model), features(src))
    if has_fc:  # a supervised classifier keeps its fc: the logits match too
        with torch.no_grad():
            assert torch.equal(model.eval()(X), src(X))


def test_dropped_keys_are_the_heads_and_momentum_encoder(tmp_path):
    src = make_source("resnet18_small", 8)
    write_moco(tmp_path / "m.pth.tar", src)
    ckpt = load_backbone(tmp_path / "m.pth.tar")
    assert ckpt.meta["moco_version"] == "v2"
    assert sorted(ckpt.head) == ["fc.0.bias", "fc.0.weight", "fc.2.bias", "fc.2.weight"]
    assert {k for k in ckpt.dropped if not k.startswith("module.encoder_k.")} == {
        "module.queue", "module.queue_ptr", "module.encoder_q.fc.0.weight", "module.encoder_q.fc.0.bias",
        "module.encoder_q.fc.2.weight", "module.encoder_q.fc.2.bias"}
    assert len(ckpt.kept) == len(backbone_sd(src))

    write_dino(tmp_path / "d.pth", src)
    dino = load_backbone(tmp_path / "d.pth")
    assert dino.meta["prefix"] == "module.backbone." and dino.meta["dino_checkpoint_key"] == "teacher"
    assert "module.head.mlp.0.weight" in dino.dropped and any(k.startswith("student.") for k in dino.dropped)


# ------------------------------------------------------------------------------------------------------
# detectron2 conversion: identical to the official MoCo script
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mlp,arch,width", [(True, *ARCHS[1]), (False, *ARCHS[0])], ids=["v2-r50", "v1-r18"])
def test_convert_to_detectron2_equals_official_script(tmp_path, arch, width, mlp):
    src = make_source(arch, width)
    ckpt_path, out = tmp_path / "checkpoint_0200.pth.tar", tmp_path / "moco.pkl"
    write_moco(ckpt_path, src, mlp=mlp)
    assert mocobench(["convert", "--to", "detectron2", str(ckpt_path), str(out)]) == 0

    with open(out, "rb") as f:
        ours = pickle.load(f)  # our own output: trusted
    reference = official_moco_to_d2(torch.load(ckpt_path, weights_only=True))
    assert set(ours) == {"model", "__author__", "matching_heuristics"}
    assert ours["__author__"] == "MOCO" and ours["matching_heuristics"] is True
    assert set(ours["model"]) == set(reference["model"])
    for k, ref in reference["model"].items():
        got = ours["model"][k]
        assert isinstance(got, np.ndarray) and got.dtype == ref.dtype and got.shape == ref.shape, k
        assert np.array_equal(got, ref), k
    # hand-checkable names: stem, BN -> norm, stages renumbered, shortcut, the fc head kept under stem.
    names = set(ours["model"])
    assert {"stem.conv1.weight", "stem.conv1.norm.running_var", "stem.conv1.norm.num_batches_tracked",
            "res2.0.conv1.weight", "res2.0.conv2.norm.bias", "res5.1.conv1.norm.weight",
            "res3.0.shortcut.weight", "res3.0.shortcut.norm.running_mean"} <= names
    if arch.startswith("resnet50"):
        assert {"res2.0.conv3.norm.weight", "res2.0.shortcut.weight", "res4.5.conv3.weight"} <= names
    head = {"stem.fc.0.weight", "stem.fc.0.bias", "stem.fc.2.weight", "stem.fc.2.bias"} if mlp else {
        "stem.fc.weight", "stem.fc.bias"}
    assert {n for n in names if ".fc." in n} == head
    assert not any("encoder_k" in n or "queue" in n or "layer" in n or "bn" in n for n in names)


def test_detectron2_pickle_from_numpy1_is_read(tmp_path):
    """Old pickles name `numpy.core.multiarray` (numpy 1.x); the restricted unpickler admits both."""
    src = make_source("resnet18_small", 8)
    payload = {"model": {official_d2_name(k): v.numpy() for k, v in src.state_dict().items()},
               "__author__": "torchvision", "matching_heuristics": True}
    data = pickle.dumps(payload, protocol=2)
    assert b"numpy._core.multiarray" in data
    (tmp_path / "old.pkl").write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    ckpt = load_backbone(tmp_path / "old.pkl")
    assert ckpt.format == "detectron2" and ckpt.has_fc
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in src.state_dict().items())


# ------------------------------------------------------------------------------------------------------
# round trips
# ------------------------------------------------------------------------------------------------------

def test_round_trip_moco_torchvision_moco(tmp_path):
    src = make_source("resnet50_small", 4)
    write_moco(tmp_path / "a.pth.tar", src)
    original = torch.load(tmp_path / "a.pth.tar", weights_only=True)["state_dict"]
    assert mocobench(["convert", "--to", "torchvision", str(tmp_path / "a.pth.tar"), str(tmp_path / "b.pth")]) == 0
    assert mocobench(["convert", "--to", "moco", str(tmp_path / "b.pth"), str(tmp_path / "c.pth.tar")]) == 0
    plain = torch.load(tmp_path / "b.pth", weights_only=True)
    assert isinstance(plain, dict) and "conv1.weight" in plain and not any(k.startswith("fc") for k in plain)
    back = torch.load(tmp_path / "c.pth.tar", weights_only=True)
    encoder = {k: v for k, v in original.items() if k.startswith("module.encoder_q.") and ".fc." not in k}
    assert list(back["state_dict"]) == list(encoder)  # the torchvision form has no head: it is not written
    for k, v in encoder.items():
        assert back["state_dict"][k].dtype == v.dtype and torch.equal(back["state_dict"][k], v), k
    assert back["config"]["arch"] == "resnet50_small" and back["config"]["width"] == 4


def test_round_trip_moco_moco_keeps_the_head(tmp_path):
    src = make_source("resnet18_small", 8)
    write_moco(tmp_path / "a.pth.tar", src)
    original = torch.load(tmp_path / "a.pth.tar", weights_only=True)
    assert mocobench(["convert", "--to", "moco", str(tmp_path / "a.pth.tar"), str(tmp_path / "b.pth.tar")]) == 0
    back = torch.load(tmp_path / "b.pth.tar", weights_only=True)
    encoder = {k: v for k, v in original["state_dict"].items() if k.startswith("module.encoder_q.")}
    assert set(back["state_dict"]) == set(encoder)
    assert all(torch.equal(back["state_dict"][k], v) for k, v in encoder.items())
    assert back["epoch"] == 200 and back["config"]["mlp"] is True and back["config"]["moco_dim"] == 16


def test_round_trip_torchvision_detectron2_torchvision(tmp_path):
    src = make_source("resnet50_small", 4)
    write_torchvision(tmp_path / "a.pth", src)
    assert mocobench(["convert", "--to", "detectron2", str(tmp_path / "a.pth"), str(tmp_path / "b.pkl")]) == 0
    with open(tmp_path / "b.pkl", "rb") as f:
        payload = pickle.load(f)
    assert payload["__author__"] == "torchvision"  # as detectron2's convert-torchvision-to-d2.py
    assert set(payload["model"]) == {official_d2_name(k) for k in src.state_dict()}
    assert mocobench(["convert", "--to", "torchvision", str(tmp_path / "b.pkl"), str(tmp_path / "c.pth")]) == 0
    back = torch.load(tmp_path / "c.pth", weights_only=True)
    assert list(back) == list(src.state_dict())
    for k, v in src.state_dict().items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k


# ------------------------------------------------------------------------------------------------------
# safety
# ------------------------------------------------------------------------------------------------------

class RunsCommand:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


SYSTEM = f"{os.system.__module__}.system"  # posix.system on Linux


@pytest.mark.parametrize("container", ["torch_zip", "torch_legacy", "pickle"])
def test_malicious_pickle_is_refused_and_never_executed(tmp_path, capsys, container):
    marker = tmp_path / "PWNED"
    weights = make_source("resnet18_small", 8).state_dict()
    path = tmp_path / ("evil.pkl" if container == "pickle" else "evil.pth")
    if container == "pickle":  # a detectron2-style payload of numpy arrays, plus the planted object
        model = {official_d2_name(k): v.numpy() for k, v in weights.items()}
        path.write_bytes(pickle.dumps({"model": model, "__author__": RunsCommand(marker)}))
    else:
        torch.save({"state_dict": weights, "x": RunsCommand(marker)}, path,
                   _use_new_zipfile_serialization=(container == "torch_zip"))

    with pytest.raises(CheckpointError) as err:
        load_backbone(path)
    assert SYSTEM in str(err.value) and "--trust-checkpoint" in str(err.value) and str(path) in str(err.value)
    assert mocobench(["inspect", str(path)]) == 2
    assert SYSTEM in capsys.readouterr().err
    assert mocobench(["convert", "--to", "torchvision", str(path), str(tmp_path / "out.pth")]) == 2
    assert not marker.exists() and not (tmp_path / "out.pth").exists()


def test_trust_checkpoint_opts_in(tmp_path):
    src = make_source("resnet18_small", 8)
    path = tmp_path / "dated.pth"
    torch.save({"state_dict": src.state_dict(), "date": datetime.date(2020, 1, 1)}, path)
    with pytest.raises(CheckpointError, match=r"datetime\.date.*--trust-checkpoint"):
        safe_load(path)
    assert load_backbone(path, trust=True).format == "torchvision"
    assert mocobench(["inspect", "--trust-checkpoint", str(path)]) == 0


def test_numpy_arrays_and_namespaces_are_data(tmp_path):
    path = tmp_path / "np.pth"
    torch.save({"a": np.arange(3, dtype=np.int64), "s": np.float32(2.5), "args": argparse.Namespace(lr=0.1)}, path)
    obj = safe_load(path)
    assert obj["a"].tolist() == [0, 1, 2] and float(obj["s"]) == 2.5 and obj["args"].lr == 0.1


def _truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("case,match", [
    ("missing", "no such checkpoint file"),
    ("empty_file", "empty file"),
    ("text", "not a checkpoint"),
    ("truncated_zip", "truncated or corrupt"),
    ("truncated_pkl", "truncated or corrupt"),
    ("truncated_safetensors", "truncated or corrupt"),
    ("list", "not a checkpoint"),
    ("empty_state_dict", "empty state dict"),
    ("empty_backbone", "empty backbone"),
    ("unknown", r"unknown checkpoint format.*\['epoch', 'weights'\].*weights\.encoder\.w"),
    ("caffe2", "Caffe2"),
    ("not_resnet", "not a torchvision ResNet"),
])
def test_bad_files_give_clear_errors(tmp_path, case, match):
    src = make_source("resnet18_small", 8)
    path = tmp_path / f"{case}.pth"
    if case == "empty_file":
        path.write_bytes(b"")
    elif case == "text":
        path.write_text("epoch: 3\nthis is a YAML file, not weights\n")
    elif case == "truncated_zip":
        torch.save(src.state_dict(), path)
        _truncated(path)
    elif case == "truncated_pkl":
        path = tmp_path / "x.pkl"
        path.write_bytes(pickle.dumps({"model": {"stem.conv1.weight": np.zeros((4, 3, 3, 3))}}))
        _truncated(path)
    elif case == "truncated_safetensors":
        path = tmp_path / "x.safetensors"
        write_safetensors(path, src.state_dict())
        _truncated(path)
    elif case == "list":
        torch.save([torch.zeros(1)], path)
    elif case == "empty_state_dict":
        torch.save({"epoch": 1, "state_dict": {}}, path)
    elif case == "empty_backbone":
        torch.save({"state_dict": {"module.encoder_q.conv1.weight": "not a tensor", "module.queue": torch.zeros(2)}}, path)
    elif case == "unknown":
        torch.save({"epoch": 1, "weights": {"encoder.w": torch.zeros(2)}}, path)
    elif case == "caffe2":
        path = tmp_path / "R-50.pkl"
        path.write_bytes(pickle.dumps({"blobs": 1, "model": {"conv1_w": np.zeros((64, 3, 7, 7), np.float32)}}))
    elif case == "not_resnet":
        torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3), "layer1.0.conv1.weight": torch.zeros(4, 4, 3, 3),
                    "layer7.0.x": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match=match) as err:
        load_backbone(path)
    assert str(path) in str(err.value)


def test_architecture_mismatch_names_the_shapes(tmp_path):
    write_torchvision(tmp_path / "r.pth", make_source("resnet18_small", 8))
    with pytest.raises(CheckpointError, match=r"shapes differ.*conv1\.weight: checkpoint \(8, 3, 3, 3\) vs "
                                              r"model \(16, 3, 3, 3\)"):
        model_from_checkpoint(tmp_path / "r.pth", width=16)
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint.*layer1\.2\.conv1\.weight"):
        model_from_checkpoint(tmp_path / "r.pth", arch="resnet34_small")


# ------------------------------------------------------------------------------------------------------
# model_from_checkpoint, random init, inspect
# ------------------------------------------------------------------------------------------------------

def test_build_model_reinitialises_fc_like_main_lincls(tmp_path):
    src = make_source("resnet18_small", 8)
    write_moco(tmp_path / "m.pth.tar", src)
    model, ckpt = model_from_checkpoint(tmp_path / "m.pth.tar", num_classes=7)
    assert not ckpt.has_fc and model.fc.out_features == 7
    assert torch.all(model.fc.bias == 0) and 0.005 < model.fc.weight.std().item() < 0.015

    write_torchvision(tmp_path / "sup.pth", src)  # a 10-class classifier, fine-tuned to 3 classes
    model, ckpt = model_from_checkpoint(tmp_path / "sup.pth", num_classes=3)
    assert ckpt.has_fc and model.fc.out_features == 3 and torch.all(model.fc.bias == 0)
    assert torch.equal(features(model), features(src))


def test_random_spec(tmp_path):
    torch.manual_seed(0)
    model, info = model_from_checkpoint("random:resnet18_small:8", num_classes=5)
    assert (info.format, info.arch, info.width, model.fc.out_features) == ("random", "resnet18_small", 8, 5)
    assert model.conv1.weight.shape == (8, 3, 3, 3) and "fc.weight" not in info.state_dict
    assert load_backbone("random:resnet50_small:4").arch == "resnet50_small"
    with pytest.raises(CheckpointError, match="needs an arch"):
        model_from_checkpoint("random")
    assert mocobench(["convert", "--to", "torchvision", "random:resnet18_small:8", str(tmp_path / "r.pth")]) == 0
    assert load_backbone(tmp_path / "r.pth").width == 8


def test_inspect_prints_the_summary(tmp_path, capsys):
    src = make_source("resnet18_small", 8)
    path = tmp_path / "checkpoint_0200.pth.tar"
    write_moco(path, src)
    assert mocobench(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    params = sum(p.numel() for n, p in src.named_parameters() if not n.startswith("fc."))
    for text in ("format:      moco (v2 MLP head)", "arch:        resnet18_small (width 8)", "epoch:       200",
                 f"{params:,}", load_backbone(path).md5[:8], "module.encoder_k.*", "module.encoder_q.fc.*",
                 "module.queue ", "module.encoder_q.conv1.weight -> conv1.weight"):
        assert text in out, text
    assert mocobench(["inspect", "--json", str(path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_params"] == params and summary["epoch"] == 200 and summary["format"] == "moco"


def test_convert_to_timm_keeps_a_resnet_classifier_named_fc(tmp_path):
    """timm's ResNets use torchvision's names, `fc` included: the written file loads strictly into
    timm.create_model('resnet18') (the independent reference) and gives the same logits."""
    import timm
    torch.manual_seed(0)
    src = build_backbone("resnet18", 10).eval()
    torch.save(src.state_dict(), tmp_path / "tv.pth")
    assert mocobench(["convert", "--to", "timm", str(tmp_path / "tv.pth"), str(tmp_path / "timm.pth")]) == 0
    ref = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    ref.load_state_dict(torch.load(tmp_path / "timm.pth", weights_only=True), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), src(x))
