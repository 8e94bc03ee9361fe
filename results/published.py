"""Published MoCo numbers, embedded so result tables can show "published vs measured" side by side.

Every number carries the key of its source in SOURCES. A number is keyed by our own names: the benchmark
as written to metrics.json (see the metric-name contract in docs/results.md), the metric name, the
method ("v1" / "v2" / "v3" for ResNet-50; "v3/<arch>" for MoCo v3's ViTs) and the pretraining epochs. All
published numbers are for a network pretrained on ImageNet-1k with the official recipe; `official_method`
decides when a measured run is that recipe.
"""
from __future__ import annotations

from dataclasses import dataclass

# key -> (what, where). Values were read from these pages; see docs/results.md for notes on each.
SOURCES: dict[str, tuple[str, str]] = {
    "moco-readme": ("facebookresearch/moco README: linear classification (5 trials, mean±std) and released models",
                    "https://github.com/facebookresearch/moco/blob/main/README.md"),
    "moco-detection": ("facebookresearch/moco detection README: Faster R-CNN R50-C4, VOC07+12 -> VOC07 test, "
                       "mean of 5 trials", "https://github.com/facebookresearch/moco/blob/main/detection/README.md"),
    "openselfsup": ("OpenSelfSup model zoo (r50_v1.py / r50_v2.py, 200 epochs): VOC07 SVM, low-shot SVM, "
                    "per-layer linear (v1), semi-supervised, COCO R50-C4 2x",
                    "https://github.com/open-mmlab/mmselfsup/blob/0b7683639f1da1c221b415fef181e15e0413971a/docs/MODEL_ZOO.md"),
    "mmselfsup-mocov2": ("MMSelfSup mocov2_resnet50_8xb32-coslr-200e: linear Feature1..5 + AvgPool",
                         "https://github.com/open-mmlab/mmselfsup/blob/main/configs/selfsup/mocov2/README.md"),
    "moco-v3": ("facebookresearch/moco-v3 README / CONFIG.md: linear probing of the released models (Chen, Xie, He "
                "2021, Table 4 and Appendix)", "https://github.com/facebookresearch/moco-v3/blob/main/CONFIG.md"),
    "moco-paper": ("He et al., Momentum Contrast for Unsupervised Visual Representation Learning, CVPR 2020, "
                   "Table 6 (MoCo IN-1M, i.e. v1 200 epochs; fine-tuned with SyncBN, Appendix A)",
                   "https://arxiv.org/abs/1911.05722"),
    "mmselfsup-mocov2-seg": ("MMSelfSup mocov2_resnet50_8xb32-coslr-200e: VOC12aug mIoU with "
                             "fcn_r50-d8_512x512_20k_voc12aug",
                             "https://github.com/open-mmlab/mmselfsup/blob/0.x/configs/selfsup/mocov2/README.md"),
    "mmdet-selfsup": ("MMDetection configs/selfsup_pretrain: Mask R-CNN R50-FPN multi-scale 2x with the released "
                      "MoCo v2 800-epoch backbone",
                      "https://github.com/open-mmlab/mmdetection/blob/main/configs/selfsup_pretrain/README.md"),
}

LOWSHOT_K = (1, 2, 4, 8, 16, 32, 64, 96)


@dataclass(frozen=True)
class Ref:
    """One published number: value (and std over trials when the source gives one)."""
    benchmark: str
    metric: str
    method: str
    epochs: int
    value: float
    source: str
    std: float | None = None
    trials: tuple[float, ...] = ()
    protocol: str | None = None  # the evaluation protocol that made it (evaluate/protocols.py); None: pretraining


def _refs() -> list[Ref]:
    out: list[Ref] = []

    def add(benchmark, method, epochs, source, protocol=None, **metrics):
        for metric, value in metrics.items():
            out.append(Ref(benchmark, metric.replace("__", "/"), method, epochs, value, source, protocol=protocol))

    # Official README: 5 trials of pretraining + linear classification, mean±std (population std, ddof=0:
    # np.std of the listed trials rounds to the printed 0.2 / 0.1, sample std would give 0.2 / 0.2).
    v1_trials, v2_trials = (60.6, 60.6, 60.7, 60.9, 61.1), (67.7, 67.6, 67.4, 67.6, 67.3)
    lincls = "linear/moco@1"
    out.append(Ref("linear", "top1", "v1", 200, 60.8, "moco-readme", 0.2, v1_trials, lincls))
    out.append(Ref("linear", "top1", "v2", 200, 67.5, "moco-readme", 0.1, v2_trials, lincls))
    out.append(Ref("linear", "top1", "v2", 800, 71.1, "moco-readme", protocol=lincls))  # the released 800-epoch model
    add("moco", "v1", 200, "moco-readme", hours=53.0)  # 8 V100, pretraining time
    add("moco", "v2", 200, "moco-readme", hours=53.0)

    # Detection README: VOC07+12 trainval -> VOC07 test, R50-C4, 24k iterations.
    d2 = "detectron2/voc07-c4@1"
    add("voc07-c4", "v1", 200, "moco-detection", d2, AP50=81.5, AP=55.9, AP75=62.6)
    add("voc07-c4", "v2", 200, "moco-detection", d2, AP50=82.4, AP=57.0, AP75=63.6)
    add("voc07-c4", "v2", 800, "moco-detection", d2, AP50=82.5, AP=57.4, AP75=64.0)

    # OpenSelfSup model zoo (200-epoch r50_v1 / r50_v2).
    # OpenSelfSup's SVMs: costs 1, 10, 100 (eval_svm_full.sh / eval_svm_lowshot.sh), not VISSL's 11
    add("svm", "v1", 200, "openselfsup", "voc07-svm/mmselfsup@1", mAP=79.18)
    add("svm", "v2", 200, "openselfsup", "voc07-svm/mmselfsup@1", mAP=84.26)
    lowshot = {"v1": (30.03, 37.73, 47.64, 58.78, 66.0, 70.6, 74.6, 76.07),
               "v2": (43.0, 52.48, 63.43, 71.74, 76.35, 78.9, 81.31, 82.45)}
    for method, values in lowshot.items():
        for k, v in zip(LOWSHOT_K, values):
            out.append(Ref("lowshot", f"k{k}/mAP_mean", method, 200, v, "openselfsup", protocol="lowshot/mmselfsup@1"))
    mhead = "linear/mmselfsup-multihead@1"
    add("linear", "v1", 200, "openselfsup", mhead, feature1__top1=15.32, feature2__top1=33.08, feature3__top1=44.68,
        feature4__top1=57.27, feature5__top1=60.60, avgpool__top1=61.02)
    add("linear", "v2", 200, "mmselfsup-mocov2", mhead, feature1__top1=15.96, feature2__top1=34.22,
        feature3__top1=45.78, feature4__top1=61.11, feature5__top1=66.24, avgpool__top1=67.56)
    add("semisup-1pct", "v1", 200, "openselfsup", "semisup/mmselfsup@1", top1=33.15, top5=61.30)
    add("semisup-10pct", "v1", 200, "openselfsup", "semisup/mmselfsup@1", top1=60.08, top5=84.02)
    add("semisup-1pct", "v2", 200, "openselfsup", "semisup/mmselfsup@1", top1=39.07, top5=68.31)
    add("semisup-10pct", "v2", 200, "openselfsup", "semisup/mmselfsup@1", top1=61.80, top5=85.11)
    # COCO Mask R-CNN R50-C4 2x with the MoCo detectron2 protocol (coco_R_50_C4_2x_moco.yaml).
    add("coco-c4-2x", "v1", 200, "openselfsup", "detectron2/coco-c4-2x@1", bbox__AP=40.9, bbox__AP50=60.5, bbox__AP75=44.2,
        segm__AP=35.5, segm__AP50=57.1, segm__AP75=37.7)
    add("coco-c4-2x", "v2", 200, "openselfsup", "detectron2/coco-c4-2x@1", bbox__AP=41.0, bbox__AP50=60.6, bbox__AP75=44.5,
        segm__AP=35.6, segm__AP50=57.2, segm__AP75=38.0)
    # MoCo v3 (CONFIG.md): linear probing with main_lincls.py; ResNet-50 at 100/300/1000 epochs, ViTs at 300
    for epochs, top1 in ((100, 68.9), (300, 72.8), (1000, 74.6)):
        add("linear", "v3", epochs, "moco-v3", "linear/moco-v3-resnet@1", top1=top1)
    add("linear", "v3/vit_small_h12", 300, "moco-v3", "linear/moco-v3-vit@1", top1=73.2)
    add("linear", "v3/vit_base", 300, "moco-v3", "linear/moco-v3-vit@1", top1=76.7)
    # MMDetection R50-FPN multi-scale 2x (our coco-fpn-2x is also multi-scale 2x). Its single-scale 1x row is
    # deliberately not matched to our multi-scale coco-fpn-1x.
    # MMDetection's own training protocol, not a mocobench recipe: shown next to no measured result
    add("coco-fpn-2x", "v2", 800, "mmdet-selfsup", "mmdetection/mask-rcnn_r50_fpn_ms-2x", bbox__AP=40.8, segm__AP=36.8)
    # MoCo paper Table 6, MoCo IN-1M (v1, 200 epochs) with the paper's protocols; LVIS AP50/75 from the
    # appendix's 2x columns, which Table 6 reports. Random-init cells are left out (not verified against the paper).
    add("voc12-seg-fcn", "v1", 200, "moco-paper", "seg/moco-fcn@1", mIoU=72.5)
    add("cityscapes-seg-fcn", "v1", 200, "moco-paper", "seg/moco-fcn@1", mIoU=75.3)
    add("coco-keypoints-fpn-2x", "v1", 200, "moco-paper", "detectron2/coco-keypoints-fpn-2x@1", keypoints__AP=66.8)
    add("lvis-fpn-2x", "v1", 200, "moco-paper", "detectron2/lvis-fpn-2x@1", segm__AP=24.1, segm__AP50=37.4,
        segm__AP75=25.5)
    add("cityscapes-fpn", "v1", 200, "moco-paper", "detectron2/cityscapes-fpn@1", segm__AP50=59.3)
    # MMSelfSup's segmentation benchmark (no Cityscapes number is published there)
    add("voc12-seg-fcn-d8", "v2", 200, "mmselfsup-mocov2-seg", "seg/mmseg-fcn-d8@1", mIoU=67.55)
    return out


# MoCo paper Table 6, "super. IN-1M" (ImageNet-supervised ResNet-50, same fine-tuning): shown as table notes,
# since no measured row is a supervised network unless a sweep adds one as a checkpoint.
SUPERVISED_IN1M: dict[tuple[str, str], float] = {
    ("voc12-seg-fcn", "mIoU"): 74.4, ("cityscapes-seg-fcn", "mIoU"): 74.6,
    ("coco-keypoints-fpn-2x", "keypoints/AP"): 65.8, ("lvis-fpn-2x", "segm/AP"): 24.4,
    ("cityscapes-fpn", "segm/AP50"): 59.6,
}


REFERENCES: tuple[Ref, ...] = tuple(_refs())
_INDEX: dict[tuple[str, str, str, int], Ref] = {(r.benchmark, r.metric, r.method, r.epochs): r for r in REFERENCES}
assert len(_INDEX) == len(REFERENCES), "duplicate published reference"


def lookup(benchmark: str, metric: str, method: str | None, epochs: int | None,
           protocol: str | None = None) -> Ref | None:
    """The published number for this benchmark/metric/method/epochs made with `protocol`, or None: a number of
    another protocol is never returned (None = pretraining, which has no evaluation protocol)."""
    if method is None or epochs is None:
        return None
    ref = _INDEX.get((benchmark, metric, method, int(epochs)))
    return ref if ref is not None and ref.protocol == protocol else None


# Released checkpoints of the official README (md5 prefix -> method, epochs, top-1 of that checkpoint).
RELEASED: dict[str, tuple[str, int, float]] = {
    "b251726a": ("v1", 200, 60.6),
    "59fd9945": ("v2", 200, 67.7),
    "a04e12f8": ("v2", 800, 71.1),
}

# The official recipes (main_moco.py defaults; v2 adds --mlp --moco-t 0.2 --aug-plus --cos). A measured run is
# compared with published numbers only when its config is this recipe (epochs may differ; lr may follow the
# linear scaling rule lr = 0.03 * batch / 256, which the README notes gives similar results).
OFFICIAL_COMMON = {"arch": "resnet50", "moco_dim": 128, "moco_k": 65536, "moco_m": 0.999, "shuffle_bn": True,
                   "image_size": 224}
OFFICIAL_METHOD = {"v1": {"mlp": False, "aug_plus": False, "cos": False, "moco_t": 0.07},
                   "v2": {"mlp": True, "aug_plus": True, "cos": True, "moco_t": 0.2}}
OFFICIAL_LR_PER_256 = 0.03


# MoCo v3 (moco-v3 main_moco.py defaults + CONFIG.md). Per arch: the switches every official recipe shares,
# and the (epochs, base lr, weight decay, moco_m) of each published run.
V3_COMMON = {"algorithm": "moco_v3", "moco_dim": 256, "mlp_dim": 4096, "moco_m_cos": True, "image_size": 224,
             "batch_size": 4096}
V3_OFFICIAL = {
    "resnet50": ({"optimizer": "lars", "moco_t": 1.0, "crop_min": 0.2, "warmup_epochs": 10},
                 {(100, 0.6, 1e-6, 0.99), (300, 0.3, 1e-6, 0.99), (1000, 0.3, 1.5e-6, 0.996)}),
    "vit_small_h12": ({"optimizer": "adamw", "moco_t": 0.2, "crop_min": 0.08, "warmup_epochs": 40,
                       "stop_grad_conv1": True}, {(300, 1.5e-4, 0.1, 0.99)}),
    "vit_base": ({"optimizer": "adamw", "moco_t": 0.2, "crop_min": 0.08, "warmup_epochs": 40,
                  "stop_grad_conv1": True}, {(300, 1.5e-4, 0.1, 0.99)}),
}


def official_v3(config: dict) -> str | None:
    """'v3' (ResNet-50) / 'v3/<arch>' (ViT) when `config` is one of moco-v3's published recipes, else None."""
    arch = config.get("arch")
    if arch not in V3_OFFICIAL or config.get("data") == "demo":
        return None
    switches, runs = V3_OFFICIAL[arch]
    if any(config.get(k) != v for k, v in {**V3_COMMON, **switches}.items()):
        return None
    key = (config.get("epochs"), config.get("lr"), config.get("weight_decay"), config.get("moco_m"))
    if not any(key[0] == e and all(abs(a - b) < 1e-12 for a, b in zip(key[1:], r)) for e, *r in runs):
        return None
    return "v3" if arch == "resnet50" else f"v3/{arch}"


def method_of(config: dict) -> str:
    """'v1' / 'v2' from the three v2 switches (mlp, aug_plus, cos); a partial mix is named by its switches;
    'v3' for `algorithm: moco_v3`."""
    if config.get("algorithm") == "moco_v3":
        return "v3"
    flags = [name for name in ("mlp", "aug_plus", "cos") if config.get(name)]
    if not flags:
        return "v1"
    if len(flags) == 3:
        return "v2"
    return "v1+" + "+".join(flags)


def official_method(config: dict) -> str | None:
    """'v1' / 'v2' / 'v3' (or 'v3/<vit>') when `config` (a resolved PretrainConfig dict) is the official
    recipe, else None."""
    if config.get("algorithm") == "moco_v3":
        return official_v3(config)
    if not config or "arch" not in config or not all(k in config for k in ("mlp", "aug_plus", "cos")):
        return None
    method = method_of(config)
    if method not in OFFICIAL_METHOD:
        return None
    expected = {**OFFICIAL_COMMON, **OFFICIAL_METHOD[method]}
    for key, value in expected.items():
        if key in config and config[key] != value:
            return None
    if config.get("data") == "demo":
        return None
    if "lr" in config and "batch_size" in config:
        if abs(config["lr"] - OFFICIAL_LR_PER_256 * config["batch_size"] / 256) > 1e-9:
            return None
    return method
