"""Weighted kNN and linear evaluation: protocol rules by hand, and end to end on the embedded demo data from
a short MoCo pretrain checkpoint and from a random init."""
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_eval_features import make_image_folder

from mocobench.core.backbones import build_backbone
from mocobench.core.errors import FeatureFileError
from mocobench.core.records import read_metrics
from mocobench.core import knn as core_knn
from mocobench.evaluate import knn, linear
from mocobench.evaluate.feature_file import write_npz

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


# --- kNN ------------------------------------------------------------------------------------------------
def test_knn_weighted_vote_by_hand():
    """One class-1 neighbour at cosine 1 against three class-0 neighbours at cosine 0.8 (k=4):
    T=0.07: e^(1/0.07) = 1.6e6  >  3 e^(0.8/0.07) = 2.8e5  -> class 1 (a majority vote would say 0);
    T=1:    e^1 = 2.72          <  3 e^0.8 = 6.68          -> class 0."""
    train = np.array([[3.0, 0.0], [0.8, 0.6], [1.6, -1.2], [0.4, 0.3]], dtype=np.float32)  # norms differ
    labels = np.array([1, 0, 0, 0])
    test, test_labels = np.array([[2.0, 0.0]], dtype=np.float32), np.array([1])
    assert core_knn.knn_accuracy(train, labels, test, test_labels, ks=[1, 4], T=0.07)["k4/top1"] == 100.0
    res = core_knn.knn_accuracy(train, labels, test, test_labels, ks=[1, 4], T=1.0)
    assert res["k1/top1"] == 100.0 and res["k4/top1"] == 0.0 and res["k4/top5"] == 100.0
    sims, idx = core_knn.nearest_neighbours(train, test, 4)
    assert idx[0, 0] == 0 and sims[0].tolist() == pytest.approx([1.0, 0.8, 0.8, 0.8])
    votes = core_knn.weighted_votes(sims, torch.as_tensor(labels)[idx], 2, T=1.0)
    assert votes[0].tolist() == pytest.approx([3 * math.exp(0.8), math.exp(1.0)])


def test_chunked_neighbours_match_brute_force():
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(53, 6)).astype(np.float32), rng.normal(size=(11, 6)).astype(np.float32)
    sims, idx = core_knn.nearest_neighbours(train, test, 10, chunk=7, test_chunk=4)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
    full = unit(test) @ unit(train).T
    ref_idx = np.argsort(-full, axis=1)[:, :10]
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    np.testing.assert_allclose(sims.numpy(), np.take_along_axis(full, ref_idx, 1), rtol=1e-5, atol=1e-6)


def test_knn_caps_k_and_rejects_multilabel(tmp_path):
    train = np.eye(3, dtype=np.float32)
    res = core_knn.knn_accuracy(train, np.array([0, 1, 2]), train, np.array([0, 1, 2]), ks=[200])
    assert res["k200/top1"] == 100.0  # k=200 > 3 samples: all of them vote, the exact match dominates at T=0.07
    write_npz(tmp_path / "voc.npz", {"train_feats": train, "train_labels": np.eye(3, dtype=np.int64),
                                     "test_feats": train, "test_labels": -np.eye(3, dtype=np.int64)})
    with pytest.raises(FeatureFileError, match="single-label"):
        knn.run(knn.KNNConfig(features=str(tmp_path / "voc.npz"), out=str(tmp_path / "o")))


# --- linear: protocol rules -------------------------------------------------------------------------------
def test_published_defaults_per_mode():
    lincls = linear.resolve_protocol(linear.LinearConfig())
    assert (lincls.lr, lincls.epochs, lincls.schedule, lincls.weight_decay, lincls.momentum, lincls.batch_size,
            lincls.nesterov) == (30.0, 100, [60, 80], 0.0, 0.9, 256, False)
    assert [linear.lr_at(lincls, e) for e in (0, 59, 60, 79, 80, 99)] == pytest.approx([30, 30, 3, 3, 0.3, 0.3])
    mh = linear.resolve_protocol(linear.LinearConfig(mode="multihead", lr=0.1))
    assert (mh.lr, mh.epochs, mh.schedule, mh.weight_decay, mh.nesterov, mh.jitter, mh.lighting) == \
        (0.1, 90, [30, 60, 90], 1e-4, True, 0.4, 0.1)  # an explicit value wins over the preset


def test_lincls_trains_only_fc_and_never_touches_bn(tmp_path):
    torch.manual_seed(0)
    backbone = build_backbone("resnet18_small", num_classes=5, width=8)
    for m in backbone.modules():  # non-trivial running statistics, so a train-mode BN would move them
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    before = linear.backbone_state(backbone)
    model = linear.LinearEval(backbone, ["avgpool"], 5, bn_heads=False, input_size=16)
    params = linear.trainable_parameters(model)
    assert [p.shape for p in params] == [(5, 64), (5,)] and params[0] is backbone.fc.weight
    assert abs(params[0].std().item() - 0.01) < 0.003 and params[1].abs().sum() == 0  # N(0, 0.01) / 0
    opt = linear.make_optimizer(linear.resolve_protocol(linear.LinearConfig(lr=1.0)), params)
    for _ in range(3):
        model.train()
        assert not any(m.training for m in backbone.modules() if m is not backbone.fc)
        loss = F.cross_entropy(model(torch.randn(8, 3, 16, 16))["avgpool"], torch.randint(0, 5, (8,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = linear.backbone_state(backbone)
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics unchanged
    assert not torch.equal(params[1], torch.zeros(5))  # while the classifier did learn
    # the same math as the plain torchvision model (main_lincls.py trains exactly that model)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model.eval()(x)["avgpool"], backbone.eval()(x))


def test_sanity_check_catches_a_changed_backbone(tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "m.pth"
    torch.save(build_backbone("resnet18_small", num_classes=4, width=8).state_dict(), ckpt)
    from mocobench.evaluate.layers import load_frozen_backbone
    backbone = load_frozen_backbone(ckpt)
    linear.LinearEval(backbone, ["avgpool"], 3, bn_heads=False, input_size=16)  # new fc: not compared
    linear.sanity_check(backbone, str(ckpt))
    backbone.layer2[0].bn1.running_var.mul_(1.01)
    with pytest.raises(linear.BackboneChangedError, match=r"1 backbone tensors changed.*layer2.0.bn1.running_var"):
        linear.sanity_check(backbone, str(ckpt))


def test_multihead_heads_follow_mmselfsup():
    torch.manual_seed(0)
    model = linear.LinearEval(build_backbone("resnet18_small", num_classes=3, width=8), linear.MULTIHEAD_LAYERS,
                              3, bn_heads=True, input_size=32)
    # 32 px small-stem maps: 8x32x32, 8x32x32, 16x16x16, 32x8x8, 64x4x4 -> adaptive grids 12, 6, 4, 3, 2
    dims = {k: h[2].in_features for k, h in model.heads.items()}
    assert dims == {"feature1": 8 * 144, "feature2": 8 * 36, "feature3": 16 * 16, "feature4": 32 * 9,
                    "feature5": 64 * 4}
    bns = [h[0] for h in model.heads.values()]
    assert all(not bn.affine and bn.momentum == 0.1 for bn in bns)
    assert len(linear.trainable_parameters(model)) == 10
    model.train()
    model(torch.randn(4, 3, 32, 32))
    assert all(bn.training and bn.num_batches_tracked == 1 for bn in bns)  # head BNs learn, backbone's do not
    assert not model.backbone.bn1.training and model.backbone.bn1.num_batches_tracked == 0


def test_lighting_adds_one_colour_shift_per_image():
    """AlexNet PCA lighting: every pixel gets eigvec @ (alpha * eigval), alpha ~ N(0, 0.1) per image."""
    torch.manual_seed(0)
    img = torch.rand(3, 4, 4)
    alpha = torch.randn(3) * 0.1  # the draw Lighting makes next
    torch.manual_seed(0)
    img = torch.rand(3, 4, 4)
    shift = (linear.Lighting(0.1)(img) - img).flatten(1)
    eigval = torch.tensor([0.2175, 0.0188, 0.0045])
    eigvec = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])
    expected = [sum(eigvec[c, j] * alpha[j] * eigval[j] for j in range(3)).item() for c in range(3)]
    torch.testing.assert_close(shift, torch.tensor(expected)[:, None].expand_as(shift), atol=1e-6, rtol=0)


def test_fast_mode_separates_separable_features(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 4
    y_tr, y_te = rng.integers(0, 4, 200), rng.integers(0, 4, 80)
    x = lambda y: (centres[y] + rng.normal(size=(len(y), 16))).astype(np.float32)
    write_npz(tmp_path / "f.npz", {"train_feats": x(y_tr), "train_labels": y_tr, "test_feats": x(y_te),
                                   "test_labels": y_te})
    cfg = linear.LinearConfig(mode="fast", features=str(tmp_path / "f.npz"), out=str(tmp_path / "o"), epochs=5,
                              batch_size=32)
    metrics = linear.run(cfg)
    assert metrics["top1"] == 100.0 and metrics["avgpool/top1"] == 100.0
    rec = read_metrics(tmp_path / "o" / "metrics.json")
    assert rec["benchmark"] == "linear_fast" and "proxy" in rec["metrics"]["details"]
    assert rec["config"]["lr"] == 30.0 and rec["config"]["schedule"] == [60, 80]  # resolved config recorded


def test_lincls_resumes_and_refuses_another_run(tmp_path, capsys, monkeypatch):
    folder = make_image_folder(tmp_path / "data", per_class=(4, 2))
    kw = dict(checkpoint="random:resnet18_small:8", data=str(folder), resize=20, crop=16, image_size=16,
              batch_size=6, workers=0, lr=0.1, schedule=[], out=str(tmp_path / "run"), epochs=2)
    real_lr_at = linear.lr_at

    def killed_in_epoch_1(cfg, epoch):  # the process dies at the start of the second epoch
        if epoch == 1:
            raise KeyboardInterrupt
        return real_lr_at(cfg, epoch)
    monkeypatch.setattr(linear, "lr_at", killed_in_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        linear.run(linear.LinearConfig(**kw))
    monkeypatch.setattr(linear, "lr_at", real_lr_at)
    metrics = linear.run(linear.LinearConfig(**kw))
    assert [h["epoch"] for h in metrics["details"]["history"]] == [1, 2]
    assert "resumed at epoch 1" in capsys.readouterr().out
    with pytest.raises(linear.ConfigError, match=r"holds the eval linear run, not eval linear_multihead"):
        linear.run(linear.LinearConfig(**kw, mode="multihead"))
    with pytest.raises(linear.ConfigError, match=r"another config \(epochs 2 -> 3\)"):
        linear.run(linear.LinearConfig(**kw | {"epochs": 3}))


# --- DDP ----------------------------------------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, cfg_kw, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    models = []

    class Recording(linear.LinearEval):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            models.append(self)

    linear.LinearEval = Recording
    metrics = linear.run(linear.LinearConfig(**cfg_kw, out=out))  # only rank 0 writes into out
    torch.save({"metrics": {k: v for k, v in metrics.items() if k != "details"},
                "heads": models[0].heads.state_dict()}, f"{out}.rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_syncs_heads_and_sums_sharded_val_counts(tmp_path):
    from mocobench.core.transforms import eval_transform
    from mocobench.evaluate import datasets
    from mocobench.evaluate.layers import load_frozen_backbone
    folder = make_image_folder(tmp_path / "data", per_class=(6, 3))  # 9 val images: shards of 5 and 4
    ckpt = tmp_path / "m.pth"
    torch.manual_seed(0)
    torch.save(build_backbone("resnet18_small", num_classes=3, width=8).state_dict(), ckpt)
    kw = dict(checkpoint=str(ckpt), data=str(folder), resize=20, crop=16, image_size=16, batch_size=6, workers=0,
              epochs=2, lr=0.5, schedule=[1], dist_backend="gloo", resume="")
    mp.spawn(_ddp_worker, args=(2, _free_port(), kw, str(tmp_path / "ddp")), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"ddp.rank{r}.pt", weights_only=True) for r in range(2))
    assert r0["heads"].keys() == r1["heads"].keys()
    for k in r0["heads"]:
        torch.testing.assert_close(r0["heads"][k], r1["heads"][k])  # gradients were averaged across ranks
    assert r0["metrics"] == r1["metrics"]
    assert not torch.equal(r0["heads"]["avgpool.bias"], torch.zeros(3))  # it did train
    # the val accuracy summed over the two shards equals one process scoring all 9 images with those heads
    model = linear.LinearEval(load_frozen_backbone(ckpt), ["avgpool"], 3, bn_heads=False, input_size=16)
    model.heads.load_state_dict(r0["heads"])
    val = datasets.image_folder(folder, "val", eval_transform(20, 16))
    loader = torch.utils.data.DataLoader(val, batch_size=9)
    full = linear.evaluate(model, loader, torch.device("cpu"), ["avgpool"])
    assert r0["metrics"]["top1"] == pytest.approx(full["avgpool/top1"])
    assert r0["metrics"]["top5"] == pytest.approx(full["avgpool/top5"])


# --- end to end on the demo data ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(demo_checkpoints):
    return demo_checkpoints


@pytest.mark.parametrize("which", ["pretrained", "random"])
def test_demo_end_to_end(checkpoints, which, tmp_path):
    from mocobench.evaluate.cli import main
    ckpt = checkpoints[which]
    common = ["--checkpoint", ckpt, "--workers", "0", "--cache-dir", str(tmp_path / "cache")]
    assert main(["knn", "--config", "demo", *common, "--out", str(tmp_path / "knn")]) == 0
    rec = read_metrics(tmp_path / "knn" / "metrics.json")
    assert rec["benchmark"] == "knn" and rec["metrics"]["details"]["n_train"] == 2000
    for k in (20, 200):
        assert 0.0 <= rec["metrics"][f"k{k}/top1"] <= rec["metrics"][f"k{k}/top5"] <= 100.0
    assert (rec["checkpoint"] is not None) == (which == "pretrained")
    # the fingerprint: protocol (the demo preset keeps MMSelfSup's k and T), transform, grid, environment
    assert rec["protocol"] == "knn/mmselfsup@1"
    prov = rec["provenance"]
    assert prov["image_transform"] == {"image_transform": "center_crop", "resize": 36, "crop": 32}
    assert prov["grid"]["ks"] == [10, 20, 100, 200] and prov["layer"] == "avgpool" and prov["world_size"] == 1
    assert rec["environment"]["torch"] == torch.__version__ and rec["environment"]["cpu"]
    if which == "pretrained":  # the record names the pretrain run that made the checkpoint, by its id
        pretrain = read_metrics(Path(ckpt).parent / "metrics.json")
        assert (rec["checkpoint"]["run_id"], rec["checkpoint"]["epoch"]) == (pretrain["run_id"], 1)
        assert rec["run_id"] != pretrain["run_id"]
    modes = [("demo", ["top1", "top5", "avgpool/top1", "best_top1"])]
    if which == "pretrained":  # the other linear modes once (test time); they share the lincls code path
        assert main(["linear", "--config", "fast_demo", *common, "--out", str(tmp_path / "fast")]) == 0
        fast = read_metrics(tmp_path / "fast" / "metrics.json")["metrics"]
        assert fast["details"]["features"] == rec["metrics"]["details"]["features"]  # the cached features reused
        assert 0.0 <= fast["top1"] <= fast["top5"] <= 100.0
        modes.append(("multihead_demo", [f"feature{i}/top1" for i in range(1, 6)]))
    for mode, keys in modes:
        out = tmp_path / mode
        assert main(["linear", "--config", mode, *common, "--epochs", "1", "--steps-per-epoch", "2",
                     "--out", str(out)]) == 0
        rec = read_metrics(out / "metrics.json")
        assert all(0.0 <= rec["metrics"][k] <= 100.0 for k in keys), rec["metrics"]
        assert rec["metrics"]["details"]["backbone_unchanged"] is True
        assert rec["config"]["epochs"] == 1 and (out / "linear_checkpoint.pth.tar").is_file()


def test_linear_cli_errors_are_one_line(tmp_path, capsys):
    from mocobench.evaluate.cli import main
    assert main(["linear", "--mode", "probe"]) == 2
    assert "unknown linear mode 'probe'" in capsys.readouterr().err
    assert main(["linear", "--checkpoint", "random:resnet18_small:8", "--data", str(tmp_path)]) == 2
    assert "split 'train' not found" in capsys.readouterr().err
    assert main(["linear", "--mode", "fast", "--features", str(tmp_path / "x.npz")]) == 2
    assert "x.npz not found" in capsys.readouterr().err
    assert main(["knn", "--ks", "0"]) == 2
