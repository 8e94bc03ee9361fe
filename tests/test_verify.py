"""Pre-flight verification of checkpoints (checkpoints/verify.py): `inspect --verify` and a sweep's check of
third-party checkpoints before anything is submitted."""
from __future__ import annotations

import pytest
import torch
import yaml

from mocobench.checkpoints import verify as verify_mod
from mocobench.cli import main
from mocobench.core.backbones import build_backbone

pytestmark = pytest.mark.usefixtures("one_thread", "demo_data")


def write_checkpoint(path, trained_bn: bool):
    """A torchvision-layout resnet18_small (width 8) state dict; with trained_bn its BN layers have seen data."""
    torch.manual_seed(1)
    model = build_backbone("resnet18_small", num_classes=10, width=8)
    if trained_bn:
        model.train()
        with torch.no_grad():
            model(torch.randn(16, 3, 32, 32) * 2 + 0.5)
    torch.save(model.state_dict(), path)
    return path


def test_untouched_bn_and_no_better_than_random_are_problems(tmp_path):
    v = verify_mod.verify(write_checkpoint(tmp_path / "fresh.pth", trained_bn=False), per_class=6)
    assert not v.ok and any("initial statistics" in p for p in v.problems)
    assert 0 <= v.knn_top1 <= 100 and 0 <= v.random_top1 <= 100


def test_verdict_compares_knn_with_random_init(tmp_path, monkeypatch, capsys):
    ckpt = write_checkpoint(tmp_path / "seen.pth", trained_bn=True)
    scores = iter([55.0, 20.0, 15.0, 20.0])  # (checkpoint, random) for two runs
    monkeypatch.setattr(verify_mod, "knn_on", lambda *a, **k: next(scores))
    good = verify_mod.verify(ckpt)
    assert good.ok and (good.knn_top1, good.random_top1) == (55.0, 20.0)
    assert main(["inspect", str(ckpt), "--verify"]) == 1  # 15 % vs 20 %: refused
    out = capsys.readouterr()
    assert "no better than the same architecture at random init (20.0 %)" in out.err and "NOT verified" in out.out


def test_sweep_stops_before_submitting_a_checkpoint_that_fails(tmp_path, capsys):
    bad = write_checkpoint(tmp_path / "bad.pth", trained_bn=False)
    spec = {"output_root": str(tmp_path / "sweep"), "cluster": "debug",
            "checkpoints": [{"name": "third-party", "path": str(bad)}],
            "benchmarks": {"knn": {"config": "demo"}}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert main(["sweep", str(tmp_path / "spec.yaml")]) == 2
    err = capsys.readouterr().err
    assert "pre-flight" in err and "initial statistics" in err and "--no-verify" in err
    assert not list((tmp_path / "sweep").rglob("metrics.json"))  # nothing ran
