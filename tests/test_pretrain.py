"""Pretraining loop: config, official checkpoint format, exact resume, bad data, non-finite loss, CLI."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
import yaml
from PIL import Image

from mocobench.core.config import parse_config
from mocobench.core.errors import ConfigError
from mocobench.pretrain.train import (CONFIG_DIR, GlobalBatchSampler, NonFiniteLossError, PretrainConfig,
                                      adjust_learning_rate, config_record, latest_checkpoint, main, run)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """3 classes x 12 random 24 px images in ImageFolder layout (train/<class>/...)."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    for c in range(3):
        d = root / "train" / f"class{c}"
        d.mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def tiny_cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), arch="resnet18_small", width=8, image_size=16, batch_size=8,
                moco_k=32, moco_dim=16, mlp=True, aug_plus=True, cos=True, epochs=2, lr=0.03, bn_groups=2,
                workers=0, print_freq=2, steps_per_epoch=3, blur_sigma=[0.1, 0.3], seed=3)
    return PretrainConfig(**(base | kw))


# --- config ----------------------------------------------------------------------------------------------
def test_config_yaml_flags_and_key_value_precedence(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("lr: 0.5\nepochs: 7\nmlp: true\n")
    cfg, _ = parse_config(PretrainConfig, ["--config", str(y), "--epochs", "9", "batch_size=64", "--no-mlp",
                                           "schedule=[3,5]"], "t", "t")
    assert (cfg.lr, cfg.epochs, cfg.batch_size, cfg.mlp, cfg.schedule) == (0.5, 9, 64, False, [3, 5])


def test_shipped_v2_config_equals_official_flags():
    cfg, _ = parse_config(PretrainConfig, ["--config", "moco_v2"], "t", "t",
                          search_dir=CONFIG_DIR)
    v1 = PretrainConfig()
    assert (v1.lr, v1.batch_size, v1.epochs, v1.schedule, v1.weight_decay, v1.moco_t, v1.moco_m, v1.moco_k) == \
        (0.03, 256, 200, [120, 160], 1e-4, 0.07, 0.999, 65536)
    assert (cfg.mlp, cfg.moco_t, cfg.aug_plus, cfg.cos) == (True, 0.2, True, True)


@pytest.mark.parametrize("words, match", [(["moco_kk=5"], "unknown config key 'moco_kk'"),
                                          (["epochs=abc"], "'epochs': expected int"),
                                          (["mlp=maybe"], "'mlp': expected true/false")])
def test_config_errors_name_the_key(words, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(PretrainConfig, words, "t", "t")


def test_unknown_key_in_yaml_names_key_and_file(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("lrate: 0.1\n")
    with pytest.raises(ConfigError, match=r"'lrate' in .*bad\.yaml"):
        parse_config(PretrainConfig, ["--config", str(y)], "t", "t")


def test_fast_path_resolves_per_device_and_image_size(monkeypatch):
    from mocobench.pretrain import train as train
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    resolve = lambda device, **kw: (lambda c: (c.amp, c.channels_last))(train.resolve_fast_path(PretrainConfig(**kw), device))
    monkeypatch.setattr(train, "cpu_bf16_is_fast", lambda: False)
    assert resolve(cpu, image_size=64) == (False, False)  # the official fp32 NCHW recipe
    assert resolve(cpu, image_size=127) == (False, False)
    assert resolve(cpu, image_size=128) == (False, True)  # fp32 channels_last from 128 px
    assert resolve(cpu, image_size=224) == (False, True)
    assert resolve(cpu, image_size=224, channels_last=False) == (False, False)  # a set value is kept
    assert resolve(cpu, image_size=64, amp=True) == (True, True)
    assert resolve(cuda, image_size=64) == (True, True)
    monkeypatch.setattr(train, "cpu_bf16_is_fast", lambda: True)
    assert resolve(cpu, image_size=64) == (True, True)
    assert resolve(cpu, image_size=64, amp=False, channels_last=False) == (False, False)


def test_queue_must_divide_batch(tiny_folder, tmp_path):
    with pytest.raises(ConfigError, match="moco_k=30 must be divisible by batch_size=8"):
        run(tiny_cfg(tiny_folder, tmp_path, moco_k=30))


def test_lr_warmup_scales_the_first_epochs_and_is_recorded_only_when_on():
    """lr x (e+1)/(N+1) in epoch e < N on top of the cosine or step schedule; off = main_moco.py's schedule and
    the official record's keys."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cos = PretrainConfig(lr=0.06, epochs=15, cos=True, lr_warmup_epochs=3)
    got = [adjust_learning_rate(opt, e, cos) for e in (0, 1, 2, 3)]
    cosine = [0.06 * 0.5 * (1 + np.cos(np.pi * e / 15)) for e in (0, 1, 2, 3)]
    assert got == pytest.approx([cosine[0] / 4, cosine[1] / 2, cosine[2] * 3 / 4, cosine[3]])
    assert opt.param_groups[0]["lr"] == got[-1]
    step = PretrainConfig(lr=0.1, epochs=10, schedule=[1], lr_warmup_epochs=2)
    assert [adjust_learning_rate(opt, e, step) for e in (0, 1, 2)] == pytest.approx([0.1 / 3, 0.01 * 2 / 3, 0.01])
    assert "lr_warmup_epochs" not in config_record(PretrainConfig())
    assert config_record(step)["lr_warmup_epochs"] == 2
    assert "lr_warmup_epochs" not in config_record(PretrainConfig(algorithm="moco_v3", lr_warmup_epochs=2))
    short = PretrainConfig(lr=0.08, epochs=2, cos=True, lr_warmup_epochs=3)  # a shortened demo run: all warm-up
    assert [adjust_learning_rate(opt, e, short) for e in (0, 1)] == pytest.approx([0.08 / 4, 0.08 * 0.5 * 2 / 4])


# --- checkpoints and resume ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def straight_run(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    metrics = run(tiny_cfg(tiny_folder, out, epochs=4))
    return out, metrics


def test_checkpoint_has_official_keys_and_loads_weights_only(straight_run):
    out, _ = straight_run
    ckpt = torch.load(out / "checkpoint_0003.pth.tar", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 4 and ckpt["arch"] == "resnet18_small"
    keys = set(ckpt["state_dict"])
    assert {"module.queue", "module.queue_ptr"} <= keys
    assert all(k.startswith(("module.encoder_q.", "module.encoder_k.")) for k in keys - {"module.queue", "module.queue_ptr"})
    assert ckpt["state_dict"]["module.queue"].shape == (16, 32)
    assert ckpt["config"]["width"] == 8 and isinstance(ckpt["optimizer"], dict)
    # what official main_lincls.py does: keep encoder_q minus fc, strip the prefix, load non-strict
    state = {k[len("module.encoder_q."):]: v for k, v in ckpt["state_dict"].items()
             if k.startswith("module.encoder_q") and not k.startswith("module.encoder_q.fc")}
    from mocobench.core.backbones import build_backbone
    msg = build_backbone("resnet18_small", 10, width=8).load_state_dict(state, strict=False)
    assert set(msg.missing_keys) == {"fc.weight", "fc.bias"} and not msg.unexpected_keys


def test_run_writes_logs_metrics_and_config(straight_run):
    out, metrics = straight_run
    assert (out / "config.yaml").exists() and yaml.safe_load((out / "config.yaml").read_text())["epochs"] == 4
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert len(steps) == 4 * 2 and {"step", "epoch", "loss", "acc1", "lr", "img_per_s"} <= set(steps[0])
    assert [x["lr"] for x in steps[::2]] == pytest.approx([0.03 * 0.5 * (1 + np.cos(np.pi * e / 4)) for e in range(4)])
    record = json.loads((out / "metrics.json").read_text())
    assert record["stage"] == "pretrain" and record["checkpoint"]["path"].endswith("checkpoint_0003.pth.tar")
    # the run's identity: one id in the record, in every checkpoint, and repeated as the checkpoint's run id
    ids = {torch.load(p, weights_only=True)["run_id"] for p in out.glob("checkpoint_*.pth.tar")}
    assert ids == {record["run_id"]} and len(record["run_id"]) == 16
    assert (record["checkpoint"]["run_id"], record["checkpoint"]["epoch"]) == (record["run_id"], 4)
    assert np.isfinite(metrics["loss"]) and metrics["epochs"] == 4


def test_resume_is_exact(tiny_folder, straight_run, tmp_path):
    out_straight, _ = straight_run
    run(tiny_cfg(tiny_folder, tmp_path, epochs=4, stop_after=2))  # first half ...
    assert latest_checkpoint(tmp_path).name == "checkpoint_0001.pth.tar"
    assert not (tmp_path / "metrics.json").exists()  # not finished yet
    run(tiny_cfg(tiny_folder, tmp_path, epochs=4))  # ... then resume (auto: latest in the run dir)
    a = torch.load(out_straight / "checkpoint_0003.pth.tar", weights_only=True)
    b = torch.load(tmp_path / "checkpoint_0003.pth.tar", weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert torch.equal(a["queue_ids"], b["queue_ids"])
    first = torch.load(tmp_path / "checkpoint_0001.pth.tar", weights_only=True)["run_id"]
    assert b["run_id"] == first == json.loads((tmp_path / "metrics.json").read_text())["run_id"]  # kept on resume
    assert first != a["run_id"]  # another run, another id


def _two_rank_run(rank, port, data, out, overrides):
    import os
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    run(tiny_cfg(data, out, **overrides))
    torch.distributed.destroy_process_group()


def test_two_rank_resume_continues_every_rank_exactly(tiny_folder, tmp_path):
    """Each rank draws its own augmentations (workers=0: from its own RNG), so a resume must restore every
    rank's RNG, not rank 0's on all: 2 epochs straight == 1 epoch + resume, bitwise, over 2 gloo ranks."""
    import socket

    import torch.multiprocessing as mp

    def two_ranks(out, **overrides):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_two_rank_run, args=(port, str(tiny_folder), str(out), overrides), nprocs=2, join=True)

    two_ranks(tmp_path / "straight", epochs=2)
    two_ranks(tmp_path / "resumed", epochs=2, stop_after=1)
    first = torch.load(tmp_path / "resumed" / "checkpoint_0000.pth.tar", weights_only=True)
    assert len(first["rng_per_rank"]) == 2 and not torch.equal(*(r["torch"] for r in first["rng_per_rank"]))
    two_ranks(tmp_path / "resumed", epochs=2)
    a = torch.load(tmp_path / "straight" / "checkpoint_0001.pth.tar", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint_0001.pth.tar", weights_only=True)
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert torch.equal(a["queue_ids"], b["queue_ids"])


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_folder, tmp_path, monkeypatch):
    run(tiny_cfg(tiny_folder, tmp_path, epochs=2, stop_after=1))
    good = (tmp_path / "checkpoint_0000.pth.tar").read_bytes()
    import mocobench.pretrain.train as train_module  # the second epoch's loss is inf (as with T = 0)
    monkeypatch.setattr(train_module, "train_step", lambda *a, **k: (torch.tensor(float("inf")), torch.tensor(0.0)))
    with pytest.raises(NonFiniteLossError, match="checkpoint_0000"):
        run(tiny_cfg(tiny_folder, tmp_path, epochs=2))
    assert (tmp_path / "checkpoint_0000.pth.tar").read_bytes() == good
    assert not (tmp_path / "checkpoint_0001.pth.tar").exists()


# --- data ------------------------------------------------------------------------------------------------
def test_corrupt_image_is_skipped_and_counted_or_fatal_when_strict(tiny_folder, tmp_path):
    bad = tiny_folder / "train" / "class0" / "0000_corrupt.png"
    bad.write_bytes(b"not a png")
    try:
        metrics = run(tiny_cfg(tiny_folder, tmp_path / "lenient", epochs=1, steps_per_epoch=0))
        assert metrics["bad_images"] == 1
        from mocobench.core.errors import DataError
        with pytest.raises(DataError, match="0000_corrupt.png"):
            run(tiny_cfg(tiny_folder, tmp_path / "strict", epochs=1, steps_per_epoch=0, strict_data=True))
    finally:
        bad.unlink()


def test_missing_data_dir_is_a_clear_error(tmp_path, capsys):
    assert main(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--batch-size", "8",
                 "moco_k=64", "bn_groups=1"]) == 2
    assert "does not exist" in capsys.readouterr().err


# --- CLI -------------------------------------------------------------------------------------------------
def test_cli_help_lists_every_stage():
    out = subprocess.run([sys.executable, "-m", "mocobench.cli", "--help"], capture_output=True, text=True, check=True)
    for stage in ("pretrain", "eval", "transfer", "convert", "inspect", "sweep", "status", "results", "bench", "data"):
        assert f"  {stage} " in out.stdout


def test_small_arch_shapes_and_infer():
    from mocobench.core.backbones import build_backbone, infer_arch
    m = build_backbone("resnet50_small", 7, width=16)
    assert m.conv1.kernel_size == (3, 3) and isinstance(m.maxpool, torch.nn.Identity)
    assert m.fc.in_features == 16 * 8 * 4 and m(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert infer_arch(m.state_dict()) == ("resnet50_small", 16)
    assert infer_arch(torchvision.models.resnet18().state_dict()) == ("resnet18", 64)


def test_tensor_loader_trains_and_bad_loader_is_an_error(tiny_folder, tmp_path):
    metrics = run(tiny_cfg(tiny_folder, tmp_path, epochs=1, loader="tensor"))
    assert np.isfinite(metrics["loss"]) and (tmp_path / "checkpoint_0000.pth.tar").exists()
    with pytest.raises(ConfigError, match="loader='jpeg'"):
        run(tiny_cfg(tiny_folder, tmp_path / "x", loader="jpeg"))


def test_demo_recipe_learns_shape_at_reduced_size(demo_data, tmp_path):
    """The shipped demo recipe on the embedded data, shortened to `epochs` (fixed seed): the kNN monitor's
    top-1 at the end beats the same network at random init (its epoch -1 value) by `margin` points. The
    full-size margin (15 epochs) is what `make demo` prints; docs/pretrain.md has both."""
    from mocobench.core.config import apply_overrides, load_yaml
    epochs, margin = 8, 4  # measured in fp32 on a 2-core AVX2-only AMD EPYC: 33.6 -> 40.6 % (+7.0) in 8 epochs
    cfg = apply_overrides(PretrainConfig(), load_yaml("demo", CONFIG_DIR))
    cfg = apply_overrides(cfg, {"out": str(tmp_path), "epochs": epochs, "knn_monitor": epochs, "print_freq": 31,
                                "workers": 0})
    run(cfg)
    from mocobench.results.gather import read_knn_monitor
    knn = read_knn_monitor(tmp_path)
    assert list(knn["epoch"]) == [-1, epochs - 1]
    start, end = knn["knn_top1"].tolist()
    assert start < 40, f"random init already at {start:.1f} % kNN top-1: the demo task is too easy"
    assert end >= start + margin, f"kNN top-1 {start:.1f} -> {end:.1f} % after {epochs} epochs"


def test_knn_monitor_logs_and_leaves_training_unchanged(tiny_folder, tmp_path):
    """The monitor writes knn_top1 before training and every N epochs, and draws from no global RNG: the
    weights of a monitored run equal those of the same run without it."""
    run(tiny_cfg(tiny_folder, tmp_path / "plain", epochs=2))
    metrics = run(tiny_cfg(tiny_folder, tmp_path / "watched", epochs=2, knn_monitor=1, knn_monitor_images=24))
    from mocobench.results.gather import read_knn_monitor
    knn = read_knn_monitor(tmp_path / "watched")
    assert list(knn["epoch"]) == [-1, 0, 1] and knn["knn_top1"].between(0, 100).all()
    assert metrics["knn_top1"] == knn["knn_top1"].iloc[-1]
    a = torch.load(tmp_path / "plain" / "checkpoint_0001.pth.tar", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "watched" / "checkpoint_0001.pth.tar", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_knn_monitor_holds_out_queries_the_bank_never_contains(tiny_folder):
    from mocobench.pretrain.knn_monitor import KNNMonitor
    m = KNNMonitor(tiny_folder / "train", 16, max_images=20, seed=1)
    assert m.source == "20 train images vs a held-out 3"
    bank, held = set(m.bank.indices.tolist()), set(m.queries.indices.tolist())
    assert len(held) == 3 and not bank & held and len(bank) == 20
    labels = np.array(m.bank.dataset.targets)
    assert sorted(np.bincount(labels[sorted(bank)]).tolist()) == [6, 7, 7]  # class-balanced draw


@pytest.mark.parametrize("size,batch,world", [(37, 8, 2), (64, 16, 4), (20, 6, 3)])
def test_global_batches_are_the_same_for_any_number_of_ranks(size, batch, world):
    """One rank: DistributedSampler's order (minus the last partial batch). W ranks: rank r takes the r-th
    contiguous block of every global batch, so the blocks side by side give the one-rank order."""
    for epoch in (0, 3):
        reference = torch.utils.data.DistributedSampler(range(size), num_replicas=1, rank=0, shuffle=True, seed=7)
        reference.set_epoch(epoch)
        one = GlobalBatchSampler(size, batch, 1, 0, seed=7)
        one.set_epoch(epoch)
        assert list(one) == list(reference)[:size // batch * batch] and len(one) == size // batch * batch
        ranks = []
        for r in range(world):
            sampler = GlobalBatchSampler(size, batch, world, r, seed=7)
            sampler.set_epoch(epoch)
            ranks.append(list(sampler))
            assert len(ranks[-1]) == len(sampler) == size // batch * (batch // world)
        per = batch // world
        joined = [i for step in range(size // batch) for r in range(world)
                  for i in ranks[r][step * per:(step + 1) * per]]
        assert joined == list(one)
