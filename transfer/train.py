"""One detectron2 transfer run inside each launched process: config, trainer, evaluation, metrics.json.

Follows facebookresearch/moco detection/train_net.py (DefaultTrainer; the evaluator chosen by the dataset:
VOC -> PascalVOCDetectionEvaluator, COCO boxes/masks/keypoints -> COCOEvaluator, LVIS -> LVISEvaluator,
Cityscapes instances -> CityscapesInstanceEvaluator, semantic segmentation -> SemSegEvaluator), with
datasets read from a user root (transfer/datasets.py), the FCN pieces of transfer/segmentation.py, and the
result written as metrics.json by the main process. Imported only once detectron2 is known to be installed.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from unittest import mock

import numpy as np
import yaml
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data import MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, create_ddp_model, default_setup
from detectron2.engine import defaults as d2_defaults
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator, SemSegEvaluator
from detectron2.utils import comm

from mocobench.core.records import write_metrics
from mocobench.transfer import modeling, segmentation
from mocobench.transfer.datasets import register_datasets
from mocobench.transfer.recipes import LVIS_KEYS, SEM_SEG_KEYS, SMOKE_CONFIG, get_recipe

logger = logging.getLogger("detectron2.mocobench")  # shares detectron2's handlers and log.txt


@dataclass
class RunSpec:
    """Everything a worker process needs (plain data: it is pickled to spawned workers)."""
    recipe: str
    out_dir: str
    data_root: str
    start: str
    weights: str = ""                    # detectron2 weights file; "" = random init
    weights_spec: str = "none"           # what the user passed as --weights
    weights_format: str = "none"         # the format the checkpoints layer detected
    checkpoint: str | None = None        # the user's checkpoint file (recorded with its md5)
    checkpoint_md5: str | None = None
    model_opts: list[str] = field(default_factory=list)  # set from the checkpoint (e.g. RESNETS.DEPTH)
    trial: int = 0
    smoke: bool = False
    resume: bool = False
    eval_only: bool = False
    linear_scaling: bool = False         # rescale batch, lr, iterations off the 8-GPU reference (REFERENCE_WORLD_SIZE 8)
    num_gpus: int = 0
    opts: list[str] = field(default_factory=list)
    classes: list[str] | None = None     # filled by the launcher after registering datasets
    keypoints: list[str] | None = None   # keypoint names of a keypoint dataset (launcher, from its json)
    run_id: str | None = None            # the run's claim on out_dir (core/run_folder.py)

    @property
    def detectron2_dir(self) -> str:
        # detectron2 writes its own metrics.json (training events): keep it apart from ours
        return str(Path(self.out_dir) / "detectron2")




def transfer_protocol(spec: RunSpec) -> str:
    """`<protocol>@1` for the recipe as published (detectron2/<recipe>, or e.g. seg/moco-fcn); smoke runs,
    linear scaling or overrides differ."""
    name = get_recipe(spec.recipe).protocol_name
    if spec.smoke:
        return f"{name}-smoke"
    if spec.linear_scaling or spec.opts:
        return f"{name}/custom"
    return f"{name}@1"


def build_cfg(spec: RunSpec) -> CfgNode:
    """Recipe YAML, then smoke settings, then runner settings, then the user's opts (last wins)."""
    recipe = get_recipe(spec.recipe)
    cfg = get_cfg()
    if recipe.task == "sem_seg":
        segmentation.add_segmentation_config(cfg)
    cfg.merge_from_file(str(recipe.config_path))
    if spec.smoke:
        cfg.merge_from_file(str(SMOKE_CONFIG))
        cfg.merge_from_list(list(recipe.smoke_opts))
    cfg.merge_from_list([
        "MODEL.WEIGHTS", spec.weights,
        "MODEL.DEVICE", "cuda" if spec.num_gpus > 0 else "cpu",
        "OUTPUT_DIR", spec.detectron2_dir,
        "SEED", spec.trial,  # one deterministic seed per trial (VOC: mean of 5 trials)
        "SOLVER.REFERENCE_WORLD_SIZE", recipe.reference_gpus if spec.linear_scaling else 0,
        *spec.model_opts,
    ])
    key = "SEM_SEG_HEAD" if recipe.task == "sem_seg" else "ROI_HEADS"
    if spec.classes is not None:
        cfg.MODEL[key].NUM_CLASSES = len(spec.classes)
    if spec.keypoints is not None:
        cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS = len(spec.keypoints)
    cfg.merge_from_list(list(spec.opts))
    if spec.classes is not None and cfg.MODEL[key].NUM_CLASSES != len(spec.classes):
        raise ValueError(f"MODEL.{key}.NUM_CLASSES={cfg.MODEL[key].NUM_CLASSES} but the datasets "
                         f"have {len(spec.classes)} classes: {spec.classes}")
    cfg.freeze()
    return cfg


def has_fast_coco_eval() -> bool:
    """detectron2's C++ COCOeval needs the compiled _C (absent in the pure-Python install)."""
    try:
        from detectron2.evaluation.fast_eval_api import COCOeval_opt  # noqa: F401
    except ImportError:
        return False
    return True


def cityscapes_instance_evaluator(dataset_name: str):
    """detectron2's CityscapesInstanceEvaluator with cityscapesScripts' `evaluateImgLists` done step by step
    (same functions, same AP and AP50), leaving out its write of matches.json into the working directory."""
    import glob

    from detectron2.evaluation import CityscapesInstanceEvaluator  # needs cityscapesscripts

    class CityscapesInstances(CityscapesInstanceEvaluator):
        def evaluate(self):
            comm.synchronize()
            if comm.get_rank() > 0:
                return None
            import cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling as cs
            args = cs.args
            args.predictionPath, args.predictionWalk = os.path.abspath(self._temp_dir), None
            args.JSONOutput, args.colorized, args.quiet = False, False, True
            args.gtInstancesFile = os.path.join(self._temp_dir, "gtInstances.json")
            gt_list = sorted(glob.glob(os.path.join(self._metadata.gt_dir, "*", "*_gtFine_instanceIds.png")))
            if not gt_list:
                raise FileNotFoundError(f"no *_gtFine_instanceIds.png under {self._metadata.gt_dir}/<city>/")
            predictions = [cs.getPrediction(gt, args) for gt in gt_list]
            cs.setInstanceLabels(args)
            matches = cs.matchGtWithPreds(predictions, gt_list, cs.getGtInstances(gt_list, args), args)
            averages = cs.computeAverages(cs.evaluateMatches(matches, args), args)
            self._working_dir.cleanup()
            return {"segm": {"AP": averages["allAp"] * 100, "AP50": averages["allAp50%"] * 100}}

    return CityscapesInstances(dataset_name)


@contextlib.contextmanager
def removed_numpy_aliases():
    """`np.float` and `np.in1d` while the LVIS (lvis 0.5.3 eval.py) and Cityscapes (cityscapesscripts 2.3.0
    evalInstanceLevelSemanticLabeling.py) evaluators run: their releases call these, which NumPy 1.24 / 2.4
    removed. Added only where missing, and taken away again afterwards."""
    added = {name: value for name, value in (
        ("float", float), ("in1d", lambda a, b, assume_unique=False, invert=False: np.isin(
            np.asarray(a).ravel(), b, assume_unique=assume_unique, invert=invert))) if not hasattr(np, name)}
    for name, value in added.items():
        setattr(np, name, value)
    try:
        yield
    finally:
        for name in added:
            delattr(np, name)


class Trainer(DefaultTrainer):
    """DefaultTrainer with the evaluator chosen by the dataset (one bbox evaluator per dataset), and DDP on
    CPU for multi-machine CPU runs (one gloo process per machine)."""

    def __init__(self, cfg):
        if cfg.MODEL.DEVICE != "cpu":
            super().__init__(cfg)
            return
        # detectron2 wraps the model with device_ids=[local rank], which DDP refuses for CPU modules
        with mock.patch.object(d2_defaults, "create_ddp_model", functools.partial(create_ddp_model, device_ids=None)):
            super().__init__(cfg)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        meta = MetadataCatalog.get(dataset_name)
        kind = meta.get("evaluator_type")
        out = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        if kind == "pascal_voc":  # 11-point AP for VOC2007, AP averaged over IoU .50:.95 as AP
            return PascalVOCDetectionEvaluator(dataset_name)
        if kind == "coco":  # boxes, masks and keypoints as the config has them (pycocotools COCOeval)
            return COCOEvaluator(dataset_name, output_dir=out, use_fast_impl=has_fast_coco_eval(),
                                 kpt_oks_sigmas=tuple(meta.get("keypoint_oks_sigmas", ())))
        if kind == "sem_seg":
            return SemSegEvaluator(dataset_name, distributed=True, output_dir=out,
                                   sem_seg_loading_fn=segmentation.read_labels)
        if kind == "lvis":
            from detectron2.evaluation import LVISEvaluator  # needs the lvis package
            return LVISEvaluator(dataset_name, output_dir=out)
        if kind == "cityscapes_instance":
            return cityscapes_instance_evaluator(dataset_name)
        raise ValueError(f"dataset {dataset_name!r} has no evaluator (evaluator_type={kind!r})")

    @classmethod
    def build_train_loader(cls, cfg):
        if cfg.MODEL.META_ARCHITECTURE == "FCNSegmentor":
            return build_detection_train_loader(cfg, mapper=segmentation.SegmentationMapper(cfg, is_train=True))
        return super().build_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        if cfg.MODEL.META_ARCHITECTURE == "FCNSegmentor":
            return build_detection_test_loader(cfg, dataset_name,
                                               mapper=segmentation.SegmentationMapper(cfg, is_train=False))
        return super().build_test_loader(cfg, dataset_name)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        if cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupPolyLR":
            return segmentation.poly_lr_scheduler(cfg, optimizer)
        return super().build_lr_scheduler(cfg, optimizer)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        with removed_numpy_aliases():
            return super().test(cfg, model, evaluators)

    def train(self):
        """Train, then return the final evaluation (DefaultTrainer returns it only with EXPECTED_RESULTS)."""
        super().train()
        return getattr(self, "_last_eval_results", None)


def flatten_results(task: str, results: dict) -> dict:
    """detectron2's nested results -> flat metrics.json names (recipes.METRIC_NAMES), plus "details"
    holding the rest (per-class APs / IoUs). Accepts {dataset: {...}} (several test sets: the first) or {...}."""
    kinds = ("bbox", "segm", "keypoints", "sem_seg")
    if results and not any(k in results for k in kinds):
        results = next(iter(results.values()))
    if not results or not any(k in results for k in kinds):
        raise ValueError(f"no results to report (got {results!r})")
    if task == "voc":
        return {k: float(results["bbox"][k]) for k in ("AP", "AP50", "AP75")}
    if task == "sem_seg":
        values = results["sem_seg"]
        metrics = {k: float(values[k]) for k in SEM_SEG_KEYS}
        return {**metrics, "details": {k: float(v) for k, v in values.items() if k not in SEM_SEG_KEYS}}
    keys = {"lvis": LVIS_KEYS, "cityscapes": ("AP", "AP50")}.get(task, LVIS_KEYS[:6])
    metrics, details = {}, {}
    for kind, values in results.items():
        for k, v in values.items():  # LVISEval's -1 (x100) for an empty group, e.g. no rare classes: no value
            (metrics if k in keys else details)[f"{kind}/{k}"] = float(v) if v >= 0 else float("nan")
    return {**metrics, "details": details} if details else metrics


def _runner_config(spec: RunSpec, cfg: CfgNode) -> dict:
    solver = cfg.SOLVER
    return {**{k: v for k, v in asdict(spec).items() if k not in ("start",)},
            "world_size": comm.get_world_size(), "ims_per_batch": solver.IMS_PER_BATCH,
            "base_lr": solver.BASE_LR, "max_iter": solver.MAX_ITER, "steps": list(solver.STEPS),
            "scaling": (f"linear from the {get_recipe(spec.recipe).reference_gpus}-GPU reference" if spec.linear_scaling else
                        "none: the reference batch and lr at any GPU count"),
            "detectron2_config": str(Path(spec.detectron2_dir) / "config.yaml"),
            "detectron2": yaml.safe_load(cfg.dump())}


def _fresh_log_handlers() -> None:
    """Let default_setup log to this run's OUTPUT_DIR even when several runs share one process (tests):
    detectron2's setup_logger caches by arguments and would otherwise stack or skip handlers."""
    from detectron2.utils.logger import setup_logger
    setup_logger.cache_clear()
    for name in ("detectron2", "fvcore", "d2"):
        for handler in logging.getLogger(name).handlers[:]:
            logging.getLogger(name).removeHandler(handler)
            handler.close()


def run(spec: RunSpec) -> dict:
    """Train (or evaluate) in this process; the main process writes out_dir/metrics.json."""
    recipe = get_recipe(spec.recipe)
    _fresh_log_handlers()
    modeling.register()
    segmentation.register()
    cfg = build_cfg(spec)
    register_datasets(list(cfg.DATASETS.TRAIN), list(cfg.DATASETS.TEST), spec.data_root, classes=spec.classes)
    default_setup(cfg, argparse.Namespace(config_file=str(recipe.config_path), eval_only=spec.eval_only,
                                          resume=spec.resume, opts=spec.opts))
    if spec.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=True)
        results, used = Trainer.test(cfg, model), cfg
    else:
        trainer = Trainer(cfg)  # applies SOLVER.REFERENCE_WORLD_SIZE scaling to trainer.cfg
        trainer.resume_or_load(resume=spec.resume)
        results, used = trainer.train(), trainer.cfg
    if comm.is_main_process():
        metrics = flatten_results(recipe.task, results)
        bad = [k for k, v in metrics.items() if k != "details" and not math.isfinite(v)]
        if bad:
            logger.warning("non-finite metrics %s (no predictions, or no ground truth in that range)", bad)
        path = write_metrics(spec.out_dir, stage="transfer", benchmark=recipe.name, metrics=metrics,
                             config=_runner_config(spec, used), start=spec.start,
                             checkpoint=spec.checkpoint, checkpoint_md5=spec.checkpoint_md5, run_id=spec.run_id,
                             protocol=transfer_protocol(spec), provenance={
                                 "world_size": comm.get_world_size(), "ims_per_batch": used.SOLVER.IMS_PER_BATCH,
                                 "base_lr": used.SOLVER.BASE_LR, "max_iter": used.SOLVER.MAX_ITER,
                                 "seed": spec.trial, "opts": list(spec.opts)})
        logger.info("wrote %s", path)
    comm.synchronize()
    return results
