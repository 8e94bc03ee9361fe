"""detectron2 transfer: recipes against the published settings, dataset registration, weight loading,
the runner's input checks, and the CPU smoke of each recipe family on the embedded demo data (CI).

Everything that needs detectron2 skips with the install command when it is absent.
"""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from mocobench.transfer.recipes import METRIC_NAMES, RECIPES, get_recipe

REPO = Path(__file__).resolve().parents[1]
HAS_D2 = importlib.util.find_spec("detectron2") is not None
needs_d2 = pytest.mark.skipif(not HAS_D2, reason="detectron2 is not installed; run "
                              "`bash transfer/install_detectron2.sh .venv/bin/python` (make install does)")
# pycocotools' mask encoding with numpy 2: one DeprecationWarning per predicted mask
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")


# ---------------------------------------------------------------------------------------------------
# without detectron2
# ---------------------------------------------------------------------------------------------------

def test_importing_transfer_does_not_import_detectron2():
    code = ("import sys, transfer, mocobench.transfer.recipes, mocobench.transfer.cli; "
            "sys.exit(any(m.split('.')[0] == 'detectron2' for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_recipe_table_names_and_files():
    assert list(RECIPES)[:5] == ["voc07-c4", "coco-c4-1x", "coco-c4-2x", "coco-fpn-1x", "coco-fpn-2x"]
    for r in RECIPES.values():
        assert r.config_path.is_file(), r.config_path
        assert r.task in METRIC_NAMES and r.family in ("c4", "fpn", "fcn")
    for r in list(RECIPES.values())[:5]:  # the dense recipes: tests/test_transfer_dense.py
        assert (r.task, r.family) == (("voc" if r.name.startswith("voc") else "coco"), r.name.split("-")[1])
    assert METRIC_NAMES["voc"] == ("AP", "AP50", "AP75")
    assert METRIC_NAMES["coco"][:6] == tuple(f"bbox/{k}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"))
    assert METRIC_NAMES["coco"][6:] == tuple(f"segm/{k}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"))
    with pytest.raises(ValueError, match="voc07-c4"):
        get_recipe("voc-c4")


def test_backbone_arch_to_detectron2_options():
    from mocobench.transfer.cli import TransferError, model_opts_for

    assert model_opts_for("resnet50") == ["MODEL.RESNETS.DEPTH", 50]
    assert model_opts_for("resnet101") == ["MODEL.RESNETS.DEPTH", 101]
    assert model_opts_for("wide_resnet50_2") == ["MODEL.RESNETS.DEPTH", 50, "MODEL.RESNETS.WIDTH_PER_GROUP", 128]
    for arch in ("resnet18", "resnet50_small"):
        with pytest.raises(TransferError, match="bottleneck ResNet"):
            model_opts_for(arch)


def test_cli_rejects_unknown_recipe(capsys):
    from mocobench.transfer.cli import main

    with pytest.raises(SystemExit) as e:
        main(["detectron2", "--recipe", "voc12", "--weights", "none", "--out", "x"])
    assert e.value.code == 2 and "voc07-c4" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# detectron2: install, configs, model, data, weights
# ---------------------------------------------------------------------------------------------------

@needs_d2
def test_installer_is_idempotent_and_checks_its_argument():
    script = REPO / "transfer" / "install_detectron2.sh"
    done = subprocess.run(["bash", str(script), sys.executable], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "nothing to do" in done.stdout
    bad = subprocess.run(["bash", str(script), "/nonexistent/python"], capture_output=True, text=True)
    assert bad.returncode == 2 and "/nonexistent/python" in bad.stderr


def _cfg(recipe: str, **kw):
    from mocobench.transfer.train import RunSpec, build_cfg

    return build_cfg(RunSpec(recipe=recipe, out_dir="/tmp/unused", data_root="/tmp/unused", start="", **kw))


# the numbers of the issue / MoCo paper (Sec. 4.2, Appendix A) / facebookresearch/moco detection/configs
SCHEDULES = {
    "voc07-c4": dict(max_iter=24000, steps=(18000, 22000), warmup=100, sizes=tuple(range(480, 801, 32)), mask=False,
                     train=("voc_2007_trainval", "voc_2012_trainval"), test=("voc_2007_test",), classes=20),
    "coco-c4-1x": dict(max_iter=90000, steps=(60000, 80000), warmup=1000, sizes=tuple(range(640, 801, 32)),
                       mask=True, train=("coco_2017_train",), test=("coco_2017_val",), classes=80),
    "coco-c4-2x": dict(max_iter=180000, steps=(120000, 160000), warmup=1000, sizes=tuple(range(640, 801, 32)),
                       mask=True, train=("coco_2017_train",), test=("coco_2017_val",), classes=80),
}
SCHEDULES["coco-fpn-1x"], SCHEDULES["coco-fpn-2x"] = SCHEDULES["coco-c4-1x"], SCHEDULES["coco-c4-2x"]


@needs_d2
@pytest.mark.parametrize("recipe", list(SCHEDULES))
def test_recipe_resolves_to_published_settings(recipe):
    cfg, want = _cfg(recipe), SCHEDULES[recipe]
    m = cfg.MODEL
    # MoCo fine-tuning settings
    assert cfg.INPUT.FORMAT == "RGB"
    assert list(m.PIXEL_MEAN) == [123.675, 116.28, 103.53] and list(m.PIXEL_STD) == [58.395, 57.12, 57.375]
    assert m.RESNETS.STRIDE_IN_1X1 is False and m.BACKBONE.FREEZE_AT == 0 and m.RESNETS.DEPTH == 50
    assert m.RESNETS.NORM == "naiveSyncBN" and cfg.TEST.PRECISE_BN.ENABLED
    # schedule, sizes, data
    s = cfg.SOLVER
    # the reference (Base-RCNN-C4-BN.yaml) does not rescale off 8 GPUs; --linear-scaling opts in
    assert (s.IMS_PER_BATCH, s.BASE_LR, s.REFERENCE_WORLD_SIZE) == (16, 0.02, 0)
    assert _cfg(recipe, linear_scaling=True).SOLVER.REFERENCE_WORLD_SIZE == 8
    assert (s.MAX_ITER, tuple(s.STEPS), s.WARMUP_ITERS) == (want["max_iter"], want["steps"], want["warmup"])
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == want["sizes"] and cfg.INPUT.MIN_SIZE_TEST == 800
    assert (tuple(cfg.DATASETS.TRAIN), tuple(cfg.DATASETS.TEST)) == (want["train"], want["test"])
    assert m.MASK_ON is want["mask"] and m.ROI_HEADS.NUM_CLASSES == want["classes"]
    if get_recipe(recipe).family == "c4":
        assert m.ROI_HEADS.NAME == "Res5ROIHeadsExtraNorm"
        assert m.BACKBONE.NAME == "build_resnet_backbone"
    else:
        assert m.BACKBONE.NAME == "build_resnet_fpn_backbone" and m.FPN.NORM == "naiveSyncBN"
        box = m.ROI_BOX_HEAD  # Misc/mask_rcnn_R_50_FPN_3x_syncbn.yaml: 4conv1fc with norm, mask head with norm
        assert (box.NAME, box.NUM_CONV, box.NUM_FC, box.NORM) == ("FastRCNNConvFCHead", 4, 1, "naiveSyncBN")
        assert m.ROI_MASK_HEAD.NORM == "naiveSyncBN"
        assert m.ROI_HEADS.NAME == "StandardROIHeads"


@needs_d2
def test_fewer_gpus_keep_the_reference_unless_linear_scaling_is_asked():
    from detectron2.engine import DefaultTrainer

    s = DefaultTrainer.auto_scale_workers(_cfg("voc07-c4"), 4).SOLVER  # what DefaultTrainer does on 4 GPUs
    assert (s.IMS_PER_BATCH, s.BASE_LR, s.MAX_ITER, tuple(s.STEPS), s.WARMUP_ITERS) == \
        (16, 0.02, 24000, (18000, 22000), 100)
    s = DefaultTrainer.auto_scale_workers(_cfg("voc07-c4", linear_scaling=True), 4).SOLVER
    assert (s.IMS_PER_BATCH, s.BASE_LR, s.MAX_ITER, tuple(s.STEPS), s.WARMUP_ITERS) == \
        (8, 0.01, 48000, (36000, 44000), 200)


@needs_d2
def test_user_opts_win_and_bad_class_count_is_refused():
    cfg = _cfg("coco-fpn-1x", smoke=True, classes=["a", "b", "c"], opts=["SOLVER.MAX_ITER", "7"])
    assert (cfg.SOLVER.MAX_ITER, cfg.MODEL.ROI_HEADS.NUM_CLASSES, cfg.MODEL.DEVICE) == (7, 3, "cpu")
    assert cfg.INPUT.MIN_SIZE_TEST == 128 and cfg.SOLVER.REFERENCE_WORLD_SIZE == 0
    with pytest.raises(ValueError, match="NUM_CLASSES=5"):
        _cfg("coco-fpn-1x", classes=["a", "b", "c"], opts=["MODEL.ROI_HEADS.NUM_CLASSES", "5"])


@needs_d2
def test_c4_box_head_ends_with_the_extra_norm():
    import torch
    from detectron2.layers import NaiveSyncBatchNorm
    from detectron2.modeling import build_model

    from mocobench.transfer import modeling

    modeling.register()
    model = build_model(_cfg("voc07-c4", smoke=True, classes=["a", "b"])).eval()
    res5 = model.roi_heads.res5
    name, last = list(res5.named_children())[-1]
    assert name == "norm" and isinstance(last, NaiveSyncBatchNorm) and last.num_features == 2048
    # the norm really is applied to the res5 output: with scale 0 and shift 1 every feature is 1
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(1.0)
        out = res5(torch.randn(2, 1024, 14, 14))
    assert out.shape == (2, 2048, 7, 7) and torch.all(out == 1.0)


@pytest.fixture(scope="module")
def demo():
    demo_data = pytest.importorskip("mocobench.core.demo_data")
    return demo_data.ensure_demo_data()  # the shared cache ($MOCOBENCH_DATA): built once for all tests


@needs_d2
def test_register_demo_datasets_in_their_own_layout(demo, tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from mocobench.transfer.datasets import DatasetLayoutError, register_datasets

    # VOCdevkit/VOC2007 and year-less COCO files, as the demo data writes them
    classes = register_datasets(["voc_2007_trainval"], ["voc_2007_test"], demo.root)
    assert classes == sorted(demo.class_names)  # not the 20 VOC names: the sorted names found
    meta = MetadataCatalog.get("voc_2007_test")
    assert (meta.dirname, meta.year, meta.split, meta.evaluator_type) == (str(demo.voc), 2007, "test", "pascal_voc")
    records = DatasetCatalog.get("voc_2007_test")
    test_ids = (demo.voc / "ImageSets" / "Main" / "test.txt").read_text().split()
    assert [r["image_id"] for r in records] == test_ids
    first = records[0]  # the evaluator re-reads Annotations/<image_id>.xml: ids are XML basenames
    objs = ET.parse(demo.voc / "Annotations" / f"{first['image_id']}.xml").getroot().findall("object")
    assert [classes[a["category_id"]] for a in first["annotations"]] == [o.findtext("name") for o in objs]
    box = [float(objs[0].find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
    assert first["annotations"][0]["bbox"] == [box[0] - 1, box[1] - 1, box[2], box[3]]  # 1-based -> 0-based

    coco_classes = register_datasets(["coco_2017_train"], ["coco_2017_val"], demo.root)
    assert coco_classes == list(demo.class_names)  # category id order
    val = json.loads((demo.coco / "annotations" / "instances_val.json").read_text())
    records = DatasetCatalog.get("coco_2017_val")
    assert len(records) == len(val["images"])
    assert sum(len(r["annotations"]) for r in records) == len(val["annotations"])
    assert all(a["segmentation"] for r in records for a in r["annotations"])  # polygon masks came along

    with pytest.raises(DatasetLayoutError, match="VOC2012"):
        register_datasets(["voc_2012_trainval"], ["voc_2007_test"], demo.root)
    with pytest.raises(DatasetLayoutError, match="instances_train2017.json"):
        register_datasets(["coco_2017_train"], ["coco_2017_val"], tmp_path)
    with pytest.raises(ValueError, match="lvis_v1_val"):
        register_datasets(["coco_2017_train"], ["lvis_v1_val"], demo.root)


@needs_d2
def test_moco_checkpoint_reaches_the_detectron2_model(tmp_path):
    import torch
    import torchvision
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from mocobench.checkpoints.convert import write_checkpoint
    from mocobench.transfer import modeling
    from mocobench.transfer.cli import prepare_weights

    torch.manual_seed(0)
    ref = torchvision.models.resnet50().state_dict()
    for k in ref:
        if k.endswith("running_var"):
            ref[k] = torch.rand_like(ref[k]) + 0.5  # distinguishable from detectron2's init
    ref = {k: v for k, v in ref.items() if not k.startswith("fc.")}
    src = write_checkpoint(ref, "moco", tmp_path / "checkpoint_0005.pth.tar", arch="resnet50", width=64, epoch=5)
    weights, source, opts = prepare_weights(str(src), tmp_path / "out")
    assert Path(weights) == tmp_path / "out" / "weights" / "checkpoint_0005.pkl"
    assert source["format"] == "moco" and source["checkpoint"] == str(src) and len(source["checkpoint_md5"]) == 32
    assert opts == ["MODEL.RESNETS.DEPTH", 50]

    modeling.register()
    for recipe, prefix, res5 in (("voc07-c4", "backbone.", "roi_heads.res5."),
                                 ("coco-fpn-1x", "backbone.bottom_up.", "backbone.bottom_up.res5.")):
        model = build_model(_cfg(recipe, smoke=True, classes=["a", "b"], weights=weights, model_opts=opts))
        DetectionCheckpointer(model).load(weights)
        got = model.state_dict()
        assert torch.equal(got[prefix + "stem.conv1.weight"], ref["conv1.weight"])
        assert torch.equal(got[prefix + "stem.conv1.norm.running_var"], ref["bn1.running_var"])
        assert torch.equal(got[prefix + "res4.5.conv3.norm.weight"], ref["layer3.5.bn3.weight"])
        assert torch.equal(got[res5 + "0.shortcut.weight"], ref["layer4.0.downsample.0.weight"])
        assert torch.equal(got[res5 + "2.conv2.norm.running_var"], ref["layer4.2.bn2.running_var"])


def test_flatten_results_names():
    pytest.importorskip("detectron2")
    from mocobench.transfer.train import flatten_results

    voc = {"bbox": {"AP": 50.0, "AP50": 80.0, "AP75": 55.0}}
    assert flatten_results("voc", voc) == {"AP": 50.0, "AP50": 80.0, "AP75": 55.0}
    assert flatten_results("voc", {"voc_2007_test": voc}) == flatten_results("voc", voc)
    coco = {kind: {**{k: float(i) for i, k in enumerate(("AP", "AP50", "AP75", "APs", "APm", "APl"))},
                   "AP-cat": 9.0} for kind in ("bbox", "segm")}
    flat = flatten_results("coco", coco)
    assert [k for k in flat if k != "details"] == list(METRIC_NAMES["coco"])
    assert flat["segm/APm"] == 4.0 and flat["details"] == {"bbox/AP-cat": 9.0, "segm/AP-cat": 9.0}
    with pytest.raises(ValueError, match="no results to report"):
        flatten_results("voc", {})
    sem = {"sem_seg": {"mIoU": 40.0, "fwIoU": 60.0, "IoU-road": 90.0, "mACC": 50.0, "pACC": 80.0, "ACC-road": 95.0}}
    assert flatten_results("sem_seg", {"voc_seg_2012_val": sem}) == {
        "mIoU": 40.0, "fwIoU": 60.0, "mACC": 50.0, "pACC": 80.0, "details": {"IoU-road": 90.0, "ACC-road": 95.0}}
    lvis = {"segm": {"AP": 3.0, "APr": -100.0, "APc": 4.0}}  # LVISEval: -1 x 100 for a group without classes
    flat = flatten_results("lvis", lvis)
    assert flat["segm/AP"] == 3.0 and math.isnan(flat["segm/APr"]) and flat["segm/APc"] == 4.0


# ---------------------------------------------------------------------------------------------------
# CPU smoke (CI): each recipe family, a few iterations on a slice of the demo data
# ---------------------------------------------------------------------------------------------------

_RUNS: dict[str, Path] = {}


@pytest.fixture
def one_thread():
    """Run the smoke single-threaded: on shared cores OpenMP's waiting threads made 2-thread runs 4x
    slower (measured), while one thread costs about 80 s of CPU for all smoke runs together."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _smoke(recipe: str, root: Path, out: Path, *extra: str) -> dict:
    from mocobench.core.records import read_metrics
    from mocobench.transfer.cli import main

    argv = ["detectron2", "--recipe", recipe, "--weights", "none", "--out", str(out), "--data-root", str(root),
            "--smoke", "--num-gpus", "0", *extra]
    assert main(argv) == 0
    return read_metrics(out / "metrics.json")


def _coco_size_ranges_with_objects(json_file: Path) -> set[str]:
    """COCOeval's area ranges (small < 32^2 <= medium < 96^2 <= large) that hold any ground truth."""
    areas = [a["area"] for a in json.loads(json_file.read_text())["annotations"] if not a["iscrowd"]]
    return {name for name, lo, hi in (("APs", 0, 32 ** 2), ("APm", 32 ** 2, 96 ** 2), ("APl", 96 ** 2, 1e10))
            if any(lo <= a < hi for a in areas)}


@needs_d2
@pytest.mark.parametrize("recipe", ["voc07-c4", "coco-c4-1x", "coco-fpn-1x"])
def test_smoke_recipe_family(recipe, smoke_root, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp(recipe)
    record = _smoke(recipe, smoke_root, out)
    _RUNS[recipe] = out
    task = get_recipe(recipe).task
    assert (record["stage"], record["benchmark"], record["checkpoint"]) == ("transfer", recipe, None)
    metrics = record["metrics"]
    assert [k for k in metrics if k != "details"] == list(METRIC_NAMES[task])
    cfg = record["config"]
    assert (cfg["smoke"], cfg["trial"], cfg["world_size"], cfg["max_iter"]) == (True, 0, 1, 2)
    assert cfg["detectron2"]["MODEL"]["ROI_HEADS"]["NUM_CLASSES"] == 10
    for kind in (["bbox"] if task == "voc" else ["bbox", "segm"]):
        p = "" if task == "voc" else f"{kind}/"
        ap, ap50, ap75 = metrics[p + "AP"], metrics[p + "AP50"], metrics[p + "AP75"]
        assert all(math.isfinite(v) and 0 <= v <= 100 for v in (ap, ap50, ap75)), metrics
        # AP averages IoU .50:.95, and precision can only drop as the IoU threshold rises
        assert ap50 >= ap75 and ap50 >= ap - 1e-9, metrics
        if task == "coco":
            present = _coco_size_ranges_with_objects(smoke_root / "coco" / "annotations" / "instances_val2017.json")
            for size in ("APs", "APm", "APl"):  # NaN exactly where the test set has no object of that size
                assert math.isfinite(metrics[p + size]) == (size in present), (size, present, metrics)
    if task == "coco":
        assert set(metrics["details"]) == {f"{k}/AP-{c}" for k in ("bbox", "segm") for c in cfg["classes"]}
    d2 = out / "detectron2"
    assert (d2 / "config.yaml").is_file() and (d2 / "last_checkpoint").read_text().strip() == "model_final.pth"
    if recipe != "voc07-c4":  # 250 MB each; the VOC one is resumed below
        (d2 / "model_final.pth").unlink()


@needs_d2
def test_smoke_resume_and_eval_only(smoke_root, one_thread):
    out = _RUNS.get("voc07-c4")
    if out is None:
        pytest.skip("needs the voc07-c4 smoke run made earlier in this test run")

    def trained_iterations():  # detectron2's own event log: one line per logged training step
        lines = (out / "detectron2" / "metrics.json").read_text().splitlines()
        return [e["iteration"] for e in map(json.loads, lines) if "total_loss" in e]

    assert trained_iterations() == [1]  # iterations 0, 1 (logged at the last one)
    resumed = _smoke("voc07-c4", smoke_root, out, "--resume", "SOLVER.MAX_ITER", "3")
    assert "Starting training from iteration 2" in (out / "detectron2" / "log.txt").read_text()
    assert trained_iterations() == [1, 2]  # the checkpointer restored iteration 2 and ran only that one
    assert resumed["config"]["max_iter"] == 3 and resumed["config"]["resume"] is True
    again = _smoke("voc07-c4", smoke_root, out, "--eval-only")
    assert again["metrics"] == resumed["metrics"]  # the same final weights evaluate the same
    (out / "detectron2" / "model_final.pth").unlink()


@needs_d2
def test_runner_input_errors(smoke_root, tmp_path, capsys):
    from mocobench.transfer.cli import main

    base = ["detectron2", "--recipe", "voc07-c4", "--out", str(tmp_path / "o"), "--data-root", str(smoke_root),
            "--smoke", "--num-gpus", "0"]
    cases = [
        (["--weights", str(tmp_path / "missing.pth")], "no such file"),
        (["--weights", "none", "--data-root", str(tmp_path)], "VOC2007 devkit not found"),
        (["--weights", "none", "SOLVER.NOT_A_KEY", "1"], "SOLVER.NOT_A_KEY"),
        (["--weights", "none", "SOLVER.MAX_ITER"], "KEY VALUE pairs"),
        (["--weights", "random:resnet18"], "bottleneck ResNet"),
        (["--weights", "random:vit_small"], "ViT detection is not included (docs/transfer.md)"),
        (["--weights", "none", "--num-machines", "2", "--machine-rank", "2", "--dist-url", "tcp://h:1"],
         "--machine-rank 2: expected 0 .. 1"),
        (["--weights", "none", "--num-machines", "2"], "needs tcp://HOST:PORT of machine 0"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2, extra
        assert message in capsys.readouterr().err, extra
