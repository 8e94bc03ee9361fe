"""Sweep spec -> stages: grids (the m x ShuffleBN ablation), strict keys, resources -> sbatch, config hashes.
No jobs run here."""
from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest
import yaml

from mocobench.core.errors import ConfigError
from mocobench.slurm import spec as sp
from mocobench.slurm.stages import build_stages

SPECS = Path(__file__).resolve().parents[1] / "slurm" / "specs"


def _write(tmp_path: Path, data: dict, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _stages(path: Path, root: Path, **overrides):
    return build_stages(sp.load_spec(path, overrides), root)


def test_momentum_x_shufflebn_ablation_expands_to_six_runs_with_dependent_benchmarks(tmp_path):
    stages = _stages(SPECS / "ablation_momentum_shufflebn.yaml", tmp_path)
    pre = [s for s in stages if s.kind == "pretrain"]
    assert len(pre) == 6
    got = {(s.payload["config"]["moco_m"], s.payload["config"]["shuffle_bn"]) for s in pre}
    assert got == set(itertools.product([0.0, 0.9, 0.999], [True, False]))
    for s in pre:  # moco_v1 shipped config + overrides; distinct dirs and hashes
        cfg = s.payload["config"]
        assert (cfg["arch"], cfg["epochs"], cfg["mlp"], cfg["data"]) == ("resnet50", 200, False, "/datasets/imagenet")
        assert cfg["out"] == s.dir and s.resources.tasks_per_node == 8 and s.resources.gpus_per_node == 8
        assert s.info["variant"] == f"moco_m={cfg['moco_m']} shuffle_bn={str(cfg['shuffle_bn']).lower()}"
    assert len({s.dir for s in pre}) == 6 and len({s.hash for s in pre}) == 6
    evals = [s for s in stages if s.kind == "eval"]
    assert sorted({s.benchmark for s in evals}) == ["knn", "linear"] and len(evals) == 12
    by_id = {s.id: s for s in pre}
    for s in evals:
        (dep,) = s.deps
        assert s.payload["config"]["checkpoint"] == str(Path(by_id[dep].dir) / "checkpoint_0199.pth.tar")
        assert Path(s.dir).parent == Path(by_id[dep].dir).parent
        assert s.info["variant"] == by_id[dep].info["variant"]
    knn = next(s for s in evals if s.benchmark == "knn")
    assert (knn.resources.gpus_per_node, knn.resources.tasks_per_node, knn.resources.cpus_per_task) == (1, 1, 10)


@pytest.mark.parametrize("mutate, key", [
    (lambda d: d.update(benchmark={}), "benchmark"),                               # top level typo
    (lambda d: d["resources"].update(gpus_per_nodes=1), "gpus_per_nodes"),         # resources typo
    (lambda d: d["pretrain"]["overrides"].update(moco_mm=0.9), "moco_mm"),         # PretrainConfig field
    (lambda d: d["pretrain"]["variants"].update(v3={"mlpp": True}), "mlpp"),       # variant field
    (lambda d: d["pretrain"].update(grids={}), "grids"),                           # pretrain section key
    (lambda d: d["benchmarks"].update(knn={"kk": [5]}), "kk"),                     # evaluator field
    (lambda d: d["benchmarks"].update(nope={}), "nope"),                           # unknown benchmark
    (lambda d: d["benchmarks"].update(voc={"benchmark": "voc07-c4", "smok": True}), "smok"),  # detectron2 field
    (lambda d: d.update(checkpoints=[{"name": "x", "file": "y"}]), "file"),        # checkpoint entry
])
def test_unknown_keys_are_errors_naming_the_key(tmp_path, mutate, key):
    data = {"output_root": str(tmp_path / "out"), "resources": {},
            "pretrain": {"config": ["demo"], "overrides": {"epochs": 2}, "variants": {"v2": {}}},
            "benchmarks": {"knn": {"config": "demo"}}}
    _stages(_write(tmp_path, data), tmp_path / "out")  # the unmodified spec is valid
    mutate(data)
    with pytest.raises(ConfigError, match=key):
        _stages(_write(tmp_path, data), tmp_path / "out")


def test_config_hash_ignores_location_and_follows_config_and_upstream(tmp_path):
    data = {"pretrain": {"config": ["demo"], "variants": {"a": {}, "b": {"moco_m": 0.9}}, "trials": 2},
            "benchmarks": {"knn": {"config": "demo"}}}
    spec_file = _write(tmp_path, data)
    one = {s.id: s for s in _stages(spec_file, tmp_path / "one")}
    two = {s.id: s for s in _stages(spec_file, tmp_path / "elsewhere")}
    assert {k: s.hash for k, s in one.items()} == {k: s.hash for k, s in two.items()}
    assert one["a/trial0/pretrain"].payload["config"]["seed"] == 0
    assert one["a/trial1/pretrain"].payload["config"]["seed"] == 1  # trials are seeds
    assert one["a/trial0/pretrain"].hash != one["a/trial1/pretrain"].hash
    data["pretrain"]["variants"]["b"]["moco_m"] = 0.99
    three = {s.id: s for s in _stages(_write(tmp_path, data), tmp_path / "one")}
    changed = {k for k in one if one[k].hash != three[k].hash}
    # b's pretrain runs changed, and so did the benchmarks of their checkpoints; nothing of a did
    assert changed == {"b/trial0/pretrain", "b/trial1/pretrain", "b/trial0/knn", "b/trial1/knn"}


def test_third_party_checkpoints_and_fixed_weight_detectron2_entries(tmp_path):
    ckpt = tmp_path / "released.pth.tar"
    ckpt.write_bytes(b"weights")
    data = {"checkpoints": [{"name": "released v2", "path": str(ckpt)}],
            "benchmarks": {"knn": {"config": "demo"},
                           "voc": {"benchmark": "voc07-c4", "trials": 2, "resources": {"gpus_per_node": 8}},
                           "smoke": {"benchmark": "voc07-c4", "smoke": True, "weights": "random:resnet50"}}}
    stages = {s.id: s for s in _stages(_write(tmp_path, data), tmp_path / "out")}
    assert sorted(stages) == ["baseline/random_resnet50/smoke", "external/released_v2/knn",
                              "external/released_v2/voc-trial0", "external/released_v2/voc-trial1"]
    assert all(not s.deps for s in stages.values())
    assert stages["external/released_v2/knn"].payload["config"]["checkpoint"] == str(ckpt)
    voc = stages["external/released_v2/voc-trial1"]
    argv = voc.payload["argv"]
    assert argv[argv.index("--weights") + 1] == str(ckpt) and argv[argv.index("--trial") + 1] == "1"
    assert argv[argv.index("--num-gpus") + 1] == "8" and voc.resources.tasks_per_node == 1  # d2 launches workers
    smoke = stages["baseline/random_resnet50/smoke"].payload["argv"]
    assert smoke[smoke.index("--weights") + 1] == "random:resnet50" and "--smoke" in smoke


def test_resources_become_sbatch_options(tmp_path):
    if shutil.which("srun") is None:
        pytest.skip("submitit's Slurm executor needs the Slurm client commands (srun) installed")
    from mocobench.slurm.submit import make_executor
    res = sp.merge_resources(sp.Resources(cpus_per_task=10, timeout_min=4320, partition="learnfair"),
                             sp.Resources(nodes=2, gpus_per_node=8, mem_gb=400, constraint="volta32gb",
                                          account="vision", qos="high", sbatch_args={"exclusive": True},
                                          setup=["module load cuda"]))
    ex = make_executor(tmp_path / "%j", "slurm", res, "sweep:pretrain", dependency="aftercorr:12")
    text = ex._executor._make_submission_file_text("python -m job", "uid")
    for line in ["--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=10", "--mem=400GB",
                 "--time=4320", "--partition=learnfair", "--account=vision", "--qos=high",
                 "--constraint=volta32gb", "--signal=USR2@120", "--dependency=aftercorr:12",
                 "--kill-on-invalid-dep=yes", "--exclusive", "--job-name=sweep:pretrain"]:
        assert f"#SBATCH {line}" in text, line
    assert "module load cuda" in text
    assert ex._executor.max_num_timeout == 3


def test_shipped_demo_spec_is_v1_vs_v2_with_every_benchmark(tmp_path):
    stages = _stages(SPECS / "demo.yaml", tmp_path)
    pre = {s.info["variant"]: s.payload["config"] for s in stages if s.kind == "pretrain"}
    assert sorted(pre) == ["v1", "v2"]
    assert (pre["v1"]["mlp"], pre["v1"]["aug_plus"], pre["v1"]["cos"], pre["v1"]["moco_t"]) == (False, False, False, 0.07)
    assert (pre["v2"]["mlp"], pre["v2"]["aug_plus"], pre["v2"]["cos"], pre["v2"]["moco_t"]) == (True, True, True, 0.1)
    assert {k: v for k, v in pre["v1"].items() if k not in ("mlp", "aug_plus", "cos", "moco_t", "schedule", "out")} \
        == {k: v for k, v in pre["v2"].items() if k not in ("mlp", "aug_plus", "cos", "moco_t", "schedule", "out")}
    benches = sorted({s.benchmark for s in stages if s.kind != "pretrain"})
    assert benches == ["knn", "linear", "lowshot", "semisup", "svm", "voc07-c4", "voc12-seg-fcn"]
    linear = next(s for s in stages if s.benchmark == "linear")
    assert linear.payload["config"]["mode"] == "fast"


def test_shipped_imagenet_spec_expands(tmp_path):
    ckpt = tmp_path / "v2_800ep.pth.tar"
    ckpt.write_bytes(b"w")
    stages = _stages(SPECS / "imagenet_full.yaml", tmp_path,
                     checkpoints=[{"name": "released-v2-800ep", "path": str(ckpt)}])
    pre = [s for s in stages if s.kind == "pretrain"]
    assert [s.payload["config"]["epochs"] for s in pre] == [200, 200]
    assert [s.payload["config"]["mlp"] for s in pre] == [False, True]
    voc = [s for s in stages if s.benchmark == "voc07-c4"]
    assert len(voc) == 3 * 5  # v1, v2, released x 5 trials
    semisup = sorted(s.payload["config"]["subset"] for s in stages if s.benchmark == "semisup")
    assert semisup == ["10pct", "10pct", "10pct", "1pct", "1pct", "1pct"]
    dense = {b: sum(s.benchmark == b for s in stages) for b in ("voc12-seg-fcn", "cityscapes-seg-fcn",
             "voc12-seg-fcn-d8", "cityscapes-seg-fcn-d8", "coco-keypoints-fpn-2x", "lvis-fpn-2x", "cityscapes-fpn")}
    assert dense == {"voc12-seg-fcn": 15, "cityscapes-seg-fcn": 15, "voc12-seg-fcn-d8": 3, "cityscapes-seg-fcn-d8": 3,
                     "coco-keypoints-fpn-2x": 3, "lvis-fpn-2x": 3, "cityscapes-fpn": 3}
    seg = next(s for s in stages if s.benchmark == "voc12-seg-fcn-d8")
    assert seg.payload["task"] == "sem_seg" and seg.payload["argv"][seg.payload["argv"].index("--num-gpus") + 1] == "4"


def test_sacct_array_ranges_expand_and_never_override_started_tasks(monkeypatch):
    from mocobench.slurm import jobs
    assert jobs._expand("12_[0-2,5%2]") == ["12_0", "12_1", "12_2", "12_5"]
    assert jobs._expand("12_3") == ["12_3"] and jobs._expand("7") == ["7"]
    # sacct lists started array tasks on their own lines and the not-yet-started rest as one range line
    sacct = "12_0|COMPLETED|0:0\n12_[0-2%2]|CANCELLED by 0|0:0\n13|FAILED|1:0\n"
    monkeypatch.setattr(jobs, "_run", lambda cmd, timeout=30: sacct if cmd[0] == "sacct" else None)
    got = jobs.slurm_states(["12_0", "12_1", "13", "14"])
    assert (got["12_0"].state, got["12_1"].state, got["12_1"].raw) == ("completed", "cancelled", "CANCELLED by 0")
    assert (got["13"].state, got["13"].reason) == ("failed", "exit 1:0")
    assert got["14"].state == "unknown"  # neither sacct, squeue nor scontrol know it


def test_baselines_run_every_evaluator_at_random_init(tmp_path):
    """`baselines: [random]` adds the pretrain's arch and width at random init as one more source of every
    evaluator entry (no dependency on a pretrain), labelled as a baseline; transfer smoke runs say smoke."""
    data = yaml.safe_load((SPECS / "demo.yaml").read_text())
    data["baselines"] = ["random", {"name": "random r50", "checkpoint": "random:resnet50"}]
    stages = _stages(_write(tmp_path, data), tmp_path / "sweep")
    base = [s for s in stages if s.info.get("baseline")]
    evals = {s.benchmark for s in stages if s.kind == "eval" and not s.info.get("baseline")}
    assert {s.benchmark for s in base if s.info["variant"] == "random init"} == evals
    for s in base:
        assert not s.deps and s.kind == "eval"
        want = "random:resnet18_small:16" if s.info["variant"] == "random init" else "random:resnet50"
        assert s.payload["config"]["checkpoint"] == want and "/baseline/random_" in s.dir
    smoke = [s for s in stages if s.kind == "transfer"]
    assert [s.info["variant"] for s in smoke] == ["pipeline smoke run (random:resnet50)"] * 2
    assert sorted(s.benchmark for s in smoke) == ["voc07-c4", "voc12-seg-fcn"]


@pytest.mark.parametrize("baselines, needle", [
    ([{"name": "x", "checkpoint": "/ckpt/released.pth"}], "a released checkpoint goes under `checkpoints`"),
    (["random", "random"], "appears twice"),
    ({"name": "x"}, "must be a list"),
])
def test_bad_baselines_are_one_line_errors(tmp_path, baselines, needle):
    data = yaml.safe_load((SPECS / "demo.yaml").read_text())
    data["baselines"] = baselines
    with pytest.raises(ConfigError, match=needle):
        _stages(_write(tmp_path, data), tmp_path / "sweep")


def test_benchmark_models_restrict_an_entry_to_named_variants_baselines_and_checkpoints(tmp_path):
    """`models:` runs an entry only on the named pretrain variants / baselines / checkpoints, so a CLS-token
    protocol reaches the ViTs and the ResNet protocols the ResNets; an unknown name is an error listing them."""
    ckpt = tmp_path / "dino.pth"
    ckpt.write_bytes(b"w")
    data = yaml.safe_load((SPECS / "demo.yaml").read_text())
    data["benchmarks"] = {"knn": {"config": "demo", "models": ["v1", "random init"]},
                          "knn-cls": {"benchmark": "knn", "config": "demo", "layer": "cls", "models": ["dino-vit"]},
                          "svm": {"config": "demo"}}
    data["checkpoints"] = [{"name": "dino-vit", "path": str(ckpt)}]
    stages = _stages(_write(tmp_path, data), tmp_path / "sweep")
    runs = sorted((s.group, s.info["variant"]) for s in stages if s.kind == "eval")
    assert runs == [("knn", "random init"), ("knn", "v1"), ("knn-cls", "dino-vit"),
                    ("svm", "dino-vit"), ("svm", "random init"), ("svm", "v1"), ("svm", "v2")]
    data["benchmarks"]["knn"]["models"] = ["v3"]
    with pytest.raises(ConfigError, match=r"benchmarks.knn.models: v3 not in this spec; its models: v1, v2, random init, dino-vit"):
        _stages(_write(tmp_path, data), tmp_path / "sweep")


def test_shipped_moco_v3_spec_keeps_each_protocol_to_its_archs(tmp_path):
    stages = _stages(SPECS / "moco_v3.yaml", tmp_path)
    pre = {s.info["model"]: s.payload["config"] for s in stages if s.kind == "pretrain"}
    assert {m: (c["algorithm"], c["arch"]) for m, c in pre.items()} == {
        "v3-r50": ("moco_v3", "resnet50"), "v3-vit-small": ("moco_v3", "vit_small_h12"),
        "v3-vit-base": ("moco_v3", "vit_base")}
    evals = sorted((s.group, s.info["model"], s.payload["config"].get("layer"), s.payload["config"].get("mode"))
                   for s in stages if s.kind == "eval")
    assert evals == [("knn", "v3-r50", "avgpool", None), ("knn-cls", "v3-vit-base", "cls", None),
                     ("knn-cls", "v3-vit-small", "cls", None), ("linear-v3-resnet", "v3-r50", "avgpool", "lincls_v3"),
                     ("linear-v3-vit", "v3-vit-base", "cls", "lincls_v3"),
                     ("linear-v3-vit", "v3-vit-small", "cls", "lincls_v3"), ("svm", "v3-r50", "voc_svm", None)]
