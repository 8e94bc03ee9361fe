"""The detectron2 transfer recipes: name -> shipped YAML config, task (VOC or COCO) and model family.

Pure data, no detectron2 import. Settings follow the MoCo paper (He et al., CVPR 2020, Sec. 4.2 and
Appendix A) and facebookresearch/moco `detection/configs`; see docs/transfer.md.
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
    task: str         # "voc" (PascalVOCDetectionEvaluator) or "coco" (COCOEvaluator, bbox + segm)
    family: str       # "c4" or "fpn"
    summary: str
    smoke_opts: tuple[str, ...] = ()  # extra detectron2 opts for --smoke (KEY VALUE pairs)

    @property
    def config_path(self) -> Path:
        return CONFIG_DIR / self.config


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
)}

# metrics.json names per task (the contract with results/): VOC AP/AP50/AP75 from the 11-point VOC07
# metric; COCO bbox and segm AP, AP50, AP75, APs, APm, APl from pycocotools' COCOeval.
COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
METRIC_NAMES: dict[str, tuple[str, ...]] = {
    "voc": ("AP", "AP50", "AP75"),
    "coco": tuple(f"{task}/{k}" for task in ("bbox", "segm") for k in COCO_KEYS),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]
