"""The detectron2 transfer recipes: name -> shipped YAML config, task, model family and protocol.

Pure data, no detectron2 import. Settings follow the MoCo paper (He et al., CVPR 2020, Sec. 4.2, Table 6
and Appendix A), facebookresearch/moco `detection/configs`, and for `seg/mmseg-fcn-d8` MMSegmentation's
fcn_r50-d8 configs as MMSelfSup's benchmarks use them; see docs/transfer.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
SMOKE_CONFIG = CONFIG_DIR / "smoke.yaml"


@dataclass(frozen=True)
class Recipe:
    name: str         # the benchmark name written to metrics.json
    config: str       # YAML file in CONFIG_DIR
    task: str         # metrics family, a key of METRIC_NAMES: voc, coco, keypoints, lvis, cityscapes, sem_seg
    family: str       # "c4", "fpn" or "fcn"
    summary: str
    smoke_opts: tuple[str, ...] = ()  # extra detectron2 opts for --smoke (KEY VALUE pairs)
    protocol: str = ""  # the protocol's name when it is not detectron2/<name> (evaluate/protocols.py style)
    reference_gpus: int = 8  # GPUs of the published schedule, the base of --linear-scaling

    @property
    def config_path(self) -> Path:
        return CONFIG_DIR / self.config

    @property
    def protocol_name(self) -> str:
        return self.protocol or f"detectron2/{self.name}"


# --smoke for the FCN recipes: 64 px crops of the 128 px demo images, the test images at their size
_SEG_SMOKE = ("INPUT.CROP.SIZE", (64, 64), "SOLVER.IMS_PER_BATCH", 2)
_SEG_SMOKE_RESIZED = _SEG_SMOKE + ("INPUT.SEG.SCALE", [256, 128], "INPUT.MIN_SIZE_TEST", 128, "INPUT.MAX_SIZE_TEST", 256)


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("voc07-c4", "voc07_R_50_C4_24k.yaml", "voc", "c4",
           "Faster R-CNN R50-C4, VOC07+12 trainval -> VOC07 test, 24k iter (mean of 5 trials)",
           # the demo devkit has VOC2007 only
           smoke_opts=("DATASETS.TRAIN", "('voc_2007_trainval',)")),
    Recipe("coco-c4-1x", "coco_R_50_C4_1x.yaml", "coco", "c4", "Mask R-CNN R50-C4, COCO 1x (90k iter)"),
    Recipe("coco-c4-2x", "coco_R_50_C4_2x.yaml", "coco", "c4", "Mask R-CNN R50-C4, COCO 2x (180k iter)"),
    Recipe("coco-fpn-1x", "coco_R_50_FPN_1x.yaml", "coco", "fpn",
           "Mask R-CNN R50-FPN, SyncBN backbone+FPN, COCO 1x (90k iter)"),
    Recipe("coco-fpn-2x", "coco_R_50_FPN_2x.yaml", "coco", "fpn",
           "Mask R-CNN R50-FPN, SyncBN backbone+FPN, COCO 2x (180k iter)"),
    Recipe("coco-keypoints-fpn-2x", "coco_keypoints_R_50_FPN_2x.yaml", "keypoints", "fpn",
           "Keypoint R-CNN R50-FPN, SyncBN, COCO person keypoints 2x (180k iter)"),
    Recipe("lvis-fpn-2x", "lvis_v0.5_R_50_FPN_2x.yaml", "lvis", "fpn",
           "Mask R-CNN R50-FPN, SyncBN, LVIS v0.5 2x with repeat-factor sampling"),
    Recipe("cityscapes-fpn", "cityscapes_R_50_FPN.yaml", "cityscapes", "fpn",
           "Mask R-CNN R50-FPN, SyncBN, Cityscapes fine instance segmentation (24k iter)"),
    Recipe("voc12-seg-fcn", "seg_voc12_fcn_moco.yaml", "sem_seg", "fcn",
           "FCN R50 (stride 16, MoCo paper A.5), VOC 2012 train_aug -> val, 513 crops, 30k iter (mean of 5 trials)",
           smoke_opts=_SEG_SMOKE, protocol="seg/moco-fcn"),
    Recipe("cityscapes-seg-fcn", "seg_cityscapes_fcn_moco.yaml", "sem_seg", "fcn",
           "FCN R50 (stride 16, MoCo paper A.5), Cityscapes fine train -> val, 769 crops, 90k iter",
           smoke_opts=_SEG_SMOKE, protocol="seg/moco-fcn"),
    Recipe("voc12-seg-fcn-d8", "seg_voc12_fcn_d8_mmseg.yaml", "sem_seg", "fcn",
           "FCN R50-D8 (MMSegmentation fcn_r50-d8_512x512_20k_voc12aug, as MMSelfSup), VOC 2012 + aug",
           smoke_opts=_SEG_SMOKE_RESIZED, protocol="seg/mmseg-fcn-d8", reference_gpus=4),  # 4 x 4 images
    Recipe("cityscapes-seg-fcn-d8", "seg_cityscapes_fcn_d8_mmseg.yaml", "sem_seg", "fcn",
           "FCN R50-D8 (MMSegmentation fcn_r50-d8_769x769_40k_cityscapes, as MMSelfSup), slide inference",
           smoke_opts=_SEG_SMOKE_RESIZED + ("TEST.SLIDE.CROP", [64, 64], "TEST.SLIDE.STRIDE", [48, 48]),
           protocol="seg/mmseg-fcn-d8", reference_gpus=4),  # 4 x 2 images
)}

# metrics.json names per task (the contract with results/): VOC AP/AP50/AP75 from the 11-point VOC07
# metric; COCO bbox, segm and keypoints AP, AP50, AP75, APs, APm, APl from pycocotools' COCOeval (keypoints
# have no APs); LVIS adds APr/APc/APf (lvis-api LVISEval); Cityscapes instances: segm AP, AP50
# (cityscapesScripts); semantic segmentation: mIoU, fwIoU, mACC, pACC (detectron2 SemSegEvaluator).
COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
LVIS_KEYS = COCO_KEYS + ("APr", "APc", "APf")
SEM_SEG_KEYS = ("mIoU", "fwIoU", "mACC", "pACC")
METRIC_NAMES: dict[str, tuple[str, ...]] = {
    "voc": ("AP", "AP50", "AP75"),
    "coco": tuple(f"{task}/{k}" for task in ("bbox", "segm") for k in COCO_KEYS),
    "keypoints": tuple(f"bbox/{k}" for k in COCO_KEYS) + tuple(f"keypoints/{k}" for k in COCO_KEYS if k != "APs"),
    "lvis": tuple(f"{task}/{k}" for task in ("bbox", "segm") for k in LVIS_KEYS),
    "cityscapes": ("segm/AP", "segm/AP50"),
    "sem_seg": SEM_SEG_KEYS,
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]
