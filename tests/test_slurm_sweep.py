"""`mocobench sweep` / `status` end to end without Slurm (debug executor in-process, local executor as
processes), with real tiny pretraining runs: skip of finished stages, refusal to overwrite a finished
result of another config, --force, a failing stage reported and re-run, 2-process DDP over gloo."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mocobench.slurm import state, status, sweep
from mocobench.slurm import testing as st


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return st.tiny_imagefolder(tmp_path_factory.mktemp("data") / "tiny")


def _spec(tmp_path: Path, data: Path, variants: dict, benchmarks: dict | None = None, epochs: int = 2,
          resources: dict | None = None) -> Path:
    spec = {"output_root": str(tmp_path / "sweep"), "results": False,
            "resources": {"cpus_per_task": 1, "timeout_min": 10, **(resources or {})},
            "pretrain": {"config": ["demo"], "overrides": st.tiny_pretrain_fields(data, epochs), "variants": variants},
            "benchmarks": benchmarks or {}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _events(stage_dir: Path) -> list[str]:
    return [e["event"] for e in state.read_events(stage_dir)]


def test_rerun_skips_done_refuses_other_config_and_force_moves_it_aside(tmp_path, tiny_data, capsys):
    spec = _spec(tmp_path, tiny_data, {"v2": {}})
    stage_dir = tmp_path / "sweep" / "v2" / "trial0" / "pretrain"
    assert sweep.main([str(spec), "--cluster", "debug"]) == 0
    record = json.loads((stage_dir / "metrics.json").read_text())
    assert record["stage"] == "pretrain" and record["config"]["epochs"] == 2
    info = json.loads((stage_dir / "stage.json").read_text())
    assert (info["variant"], info["trial"], info["stage"], info["checkpoint_id"]) == ("v2", 0, "pretrain", "v2/trial0")
    assert _events(stage_dir) == ["start", "done"]

    assert sweep.main([str(spec), "--cluster", "debug"]) == 0          # same config: nothing runs
    assert _events(stage_dir) == ["start", "done"]
    assert "1 done" in capsys.readouterr().out

    changed = _spec(tmp_path, tiny_data, {"v2": {}}, epochs=1)         # another config, same stage dir
    before = (stage_dir / "metrics.json").read_bytes()
    assert sweep.main([str(changed), "--cluster", "debug"]) == 2
    err = capsys.readouterr().err
    assert "v2/trial0/pretrain" in err and "--force" in err and "another config" in err
    assert (stage_dir / "metrics.json").read_bytes() == before          # untouched

    assert sweep.main([str(changed), "--cluster", "debug", "--force"]) == 0
    moved = list(stage_dir.parent.glob("pretrain.replaced-*"))
    assert len(moved) == 1 and (moved[0] / "metrics.json").read_bytes() == before
    assert json.loads((stage_dir / "metrics.json").read_text())["config"]["epochs"] == 1
    assert [r.state for r in status.collect(tmp_path / "sweep")] == ["done"]


def test_failing_stage_is_reported_its_benchmark_skipped_and_rerun_later(tmp_path, tiny_data, capsys):
    knn = {"knn": {"config": "demo", "data": str(tiny_data), "ks": [5], "resize": 18, "crop": 16,
                   "workers": 0, "cache_dir": str(tmp_path / "cache")}}
    # batch 12 does not divide the queue (moco_k 32): PretrainConfig validation fails inside the job
    spec = _spec(tmp_path, tiny_data, {"ok": {}, "bad": {"batch_size": 12}}, knn)
    assert sweep.main([str(spec), "--cluster", "debug"]) == 1
    out = capsys.readouterr().out
    rows = {r.id: r for r in status.collect(tmp_path / "sweep")}
    assert {k: r.state for k, r in rows.items()} == {"ok/trial0/pretrain": "done", "bad/trial0/pretrain": "failed",
                                                      "ok/trial0/knn": "done", "bad/trial0/knn": "skipped"}
    assert "--- bad/trial0/pretrain: failed" in out and "moco_k=32 must be divisible by batch_size=12" in out
    knn_record = json.loads((tmp_path / "sweep/ok/trial0/knn/metrics.json").read_text())
    assert knn_record["benchmark"] == "knn" and "k5/top1" in knn_record["metrics"]
    assert knn_record["checkpoint"]["path"].endswith("ok/trial0/pretrain/checkpoint_0001.pth.tar")

    assert status.main([str(tmp_path / "sweep")]) == 1
    text = capsys.readouterr().out
    assert "bad/trial0/pretrain  failed" in text and "error:" in text

    assert sweep.main([str(spec), "--cluster", "debug", "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "done     ok/trial0/pretrain" in plan and "done     ok/trial0/knn" in plan
    assert "run      bad/trial0/pretrain  (re-run after failure)" in plan and "run      bad/trial0/knn" in plan


def test_two_task_ddp_pretrain_over_gloo_with_the_local_executor(tmp_path, tiny_data):
    spec = _spec(tmp_path, tiny_data, {"ddp": {}}, resources={"tasks_per_node": 2})
    assert sweep.main([str(spec), "--cluster", "local", "--poll", "0.5"]) == 0
    stage_dir = tmp_path / "sweep" / "ddp" / "trial0" / "pretrain"
    assert "2 process(es)" in (stage_dir / "log.txt").read_text()
    job = json.loads((stage_dir / "stage.json").read_text())["jobs"][-1]
    rank1_log = Path(job["stdout"].replace("_0_log.out", "_1_log.out"))
    assert "global_rank=1(2)" in rank1_log.read_text()  # submitit started the second task
    assert _events(stage_dir) == ["start", "done"]      # rank 0 only


def test_demo_size_sweep_with_moco_v3_resnet_and_vit_variants(tmp_path, tiny_data):
    """v2, MoCo v3 ResNet and MoCo v3 ViT pretrains in one sweep, kNN on each with the feature its arch
    uses (`models:`), and the results table naming method and arch per row."""
    from mocobench.results.cli import main as results
    knn = {"config": "demo", "data": str(tiny_data), "ks": [5], "resize": 18, "crop": 16, "workers": 0,
           "cache_dir": str(tmp_path / "cache")}
    v3 = {"loader": "pil", "warmup_epochs": 1}  # the tiny runs have 2 epochs
    spec = _spec(tmp_path, tiny_data, {"v2": {}, "v3": {"config": "moco_v3_r18_demo", **v3},
                                       "v3-vit": {"config": "moco_v3_vit_demo", **v3, "width": 64}},
                 {"knn": {**knn, "models": ["v2", "v3"]},
                  "knn-cls": {**knn, "benchmark": "knn", "layer": "cls", "models": ["v3-vit"]}})
    assert sweep.main([str(spec), "--cluster", "debug"]) == 0
    root = tmp_path / "sweep"
    assert {r.id: r.state for r in status.collect(root)} == {
        "v2/trial0/pretrain": "done", "v3/trial0/pretrain": "done", "v3-vit/trial0/pretrain": "done",
        "v2/trial0/knn": "done", "v3/trial0/knn": "done", "v3-vit/trial0/knn-cls": "done"}
    for variant, algorithm, arch in (("v3", "moco_v3", "resnet18_small"), ("v3-vit", "moco_v3", "vit_demo")):
        config = json.loads((root / variant / "trial0" / "pretrain" / "metrics.json").read_text())["config"]
        assert (config["algorithm"], config["arch"]) == (algorithm, arch)
    assert "algorithm" not in json.loads((root / "v2/trial0/pretrain/metrics.json").read_text())["config"]
    assert results([str(root), "--out", str(tmp_path / "tables")]) == 0
    knn_table = (tmp_path / "tables" / "tables.md").read_text()
    assert "v3-vit" in knn_table and "vit_demo" in knn_table and "resnet18_small" in knn_table
