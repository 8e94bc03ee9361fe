"""Semantic segmentation in detectron2: the FCN protocols of the MoCo paper and of MMSegmentation.

`seg/moco-fcn` (He et al., CVPR 2020, Appendix A.5): ResNet-50 with conv5's 3x3 convs at dilation 2 and
stride 1 (output stride 16), two 3x3 convs of 256 channels with dilation 6, BN and ReLU, a 1x1 classifier;
random scale in [0.5, 2.0] of the image, crop (513 VOC / 769 Cityscapes) and flip; step lr; inference on
the original image.

`seg/mmseg-fcn-d8` (MMSegmentation `configs/_base_/models/fcn_r50-d8.py`, as MMSelfSup's benchmarks use it
with a plain torchvision ResNet): res4 / res5 dilated 2 / 4 (output stride 8); FCNHead of 512 channels, 2
convs, the input concatenated before a last 3x3 conv, dropout 0.1; an auxiliary FCNHead on res4 (256
channels, 1 conv, loss weight 0.4); keep-ratio resize to a scale x [0.5, 2.0], crop with `cat_max_ratio`
0.75, flip, PhotoMetricDistortion; poly lr (power 0.9, min 1e-4); cross-entropy averaged over all pixels
(`avg_non_ignore=False`); whole-image or sliding-window inference.

Everything is configured by keys `add_segmentation_config` adds, set by the recipe YAMLs
(transfer/configs/seg_*.yaml).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY
from detectron2.modeling.backbone.resnet import BasicStem, BottleneckBlock, ResNet
from detectron2.modeling.meta_arch.semantic_seg import SemanticSegmentor
from detectron2.structures import ImageList
from fvcore.common.param_scheduler import ParamScheduler
from PIL import Image
from torch import nn

def add_segmentation_config(cfg: CfgNode) -> None:
    """The keys the FCN recipes use beyond detectron2's defaults (no-op when already there)."""
    if "RES4_DILATION" in cfg.MODEL.RESNETS:
        return
    cfg.MODEL.RESNETS.RES4_DILATION = 1
    head = cfg.MODEL.SEM_SEG_HEAD
    head.NUM_CONVS = 2
    head.DILATION = 1
    head.CONCAT_INPUT = False
    head.DROPOUT = 0.0
    head.ALIGN_CORNERS = False
    head.LOSS_NORMALIZE = "valid"      # "valid": mean over labelled pixels; "all": over every pixel (MMSeg)
    head.AUX_IN_FEATURE = ""           # "" = no auxiliary head
    head.AUX_CONVS_DIM = 256
    head.AUX_NUM_CONVS = 1
    head.AUX_LOSS_WEIGHT = 0.4
    cfg.INPUT.SEG = CfgNode({"SCALE": [0, 0], "RATIO_RANGE": [0.5, 2.0], "CAT_MAX_RATIO": 1.0,
                             "PHOTOMETRIC": False})
    cfg.TEST.SLIDE = CfgNode({"CROP": [0, 0], "STRIDE": [0, 0]})
    cfg.SOLVER.POLY_POWER = 0.9
    cfg.SOLVER.POLY_MIN_LR_FACTOR = 0.01  # min lr / base lr (MMSeg: 1e-4 / 0.01); kept under --linear-scaling


# --- backbone -----------------------------------------------------------------------------------------
def build_dilated_resnet_backbone(cfg, input_shape: ShapeSpec) -> ResNet:
    """detectron2's bottleneck ResNet with res4 and res5 dilated by RES4_DILATION / RES5_DILATION (any value):
    a dilated stage keeps its input stride (first block stride 1) and every 3x3 conv of it uses the dilation,
    as MMSegmentation's ResNet with `contract_dilation=False` (its plain `ResNet`, MMSelfSup's choice)."""
    r = cfg.MODEL.RESNETS
    blocks = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}[r.DEPTH]
    stem = BasicStem(in_channels=input_shape.channels, out_channels=r.STEM_OUT_CHANNELS, norm=r.NORM)
    dilations = {2: 1, 3: 1, 4: r.RES4_DILATION, 5: r.RES5_DILATION}
    in_ch, out_ch, bottleneck = r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS, r.NUM_GROUPS * r.WIDTH_PER_GROUP
    stages = []
    for idx, stage in enumerate(range(2, 6)):
        first_stride = 1 if stage == 2 or dilations[stage] > 1 else 2
        stages.append(ResNet.make_stage(
            block_class=BottleneckBlock, num_blocks=blocks[idx], stride_per_block=[first_stride] + [1] * (blocks[idx] - 1),
            in_channels=in_ch, bottleneck_channels=bottleneck, out_channels=out_ch, num_groups=r.NUM_GROUPS,
            norm=r.NORM, stride_in_1x1=r.STRIDE_IN_1X1, dilation=dilations[stage]))
        in_ch, out_ch, bottleneck = out_ch, out_ch * 2, bottleneck * 2
    return ResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


# --- head ---------------------------------------------------------------------------------------------
def _conv(in_ch: int, out_ch: int, dilation: int, norm: str) -> Conv2d:
    conv = Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation, bias=not norm,
                  norm=get_norm(norm, out_ch), activation=F.relu)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


class _FCN(nn.Module):
    """convs (3x3, dilation d, norm, ReLU) [-> concat with the input -> 3x3 conv] -> dropout -> 1x1 classifier."""

    def __init__(self, in_ch: int, channels: int, num_convs: int, dilation: int, concat_input: bool,
                 dropout: float, norm: str, num_classes: int):
        super().__init__()
        self.convs = nn.Sequential(*[_conv(in_ch if i == 0 else channels, channels, dilation, norm)
                                     for i in range(num_convs)])
        self.conv_cat = _conv(in_ch + channels, channels, 1, norm) if concat_input else None
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.predictor = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.predictor.weight, std=0.01)  # MMSeg BaseDecodeHead.init_weights: conv_seg N(0, 0.01)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.convs(x)
        if self.conv_cat is not None:
            y = self.conv_cat(torch.cat([x, y], dim=1))
        return self.predictor(self.dropout(y))


class FCNHead(nn.Module):
    """The FCN decode head on IN_FEATURES[0] and, with AUX_IN_FEATURE, MMSeg's auxiliary head. Returns
    logits at feature resolution; FCNSegmentor upsamples them to the input and computes `losses`."""

    def __init__(self, cfg, input_shape: dict[str, ShapeSpec]):
        super().__init__()
        h = cfg.MODEL.SEM_SEG_HEAD
        self.in_feature, self.aux_feature = h.IN_FEATURES[0], h.AUX_IN_FEATURE
        self.ignore_value, self.loss_weight, self.aux_weight = h.IGNORE_VALUE, h.LOSS_WEIGHT, h.AUX_LOSS_WEIGHT
        self.normalize, self.align_corners = h.LOSS_NORMALIZE, h.ALIGN_CORNERS
        if self.normalize not in ("valid", "all"):
            raise ValueError(f"MODEL.SEM_SEG_HEAD.LOSS_NORMALIZE must be 'valid' or 'all', got {self.normalize!r}")
        self.decode = _FCN(input_shape[self.in_feature].channels, h.CONVS_DIM, h.NUM_CONVS, h.DILATION,
                           h.CONCAT_INPUT, h.DROPOUT, h.NORM, h.NUM_CLASSES)
        self.aux = (_FCN(input_shape[self.aux_feature].channels, h.AUX_CONVS_DIM, h.AUX_NUM_CONVS, 1, False,
                         h.DROPOUT, h.NORM, h.NUM_CLASSES) if self.aux_feature else None)

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {"sem_seg": self.decode(features[self.in_feature])}
        if self.aux is not None and self.training:
            out["aux"] = self.aux(features[self.aux_feature])
        return out

    def upsample(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=self.align_corners)

    def losses(self, outputs: dict[str, torch.Tensor], targets: torch.Tensor) -> dict[str, torch.Tensor]:
        losses = {}
        for name, weight in (("sem_seg", self.loss_weight), ("aux", self.aux_weight)):
            if name not in outputs:
                continue
            logits = self.upsample(outputs[name], targets.shape[-2:]).float()
            loss = F.cross_entropy(logits, targets, ignore_index=self.ignore_value, reduction="none")
            loss = loss.mean() if self.normalize == "all" else loss.sum() / (targets != self.ignore_value).sum().clamp(min=1)
            losses[f"loss_{name}"] = loss * weight
        return losses


# --- meta architecture ----------------------------------------------------------------------------------
class FCNSegmentor(SemanticSegmentor):
    """SemanticSegmentor with logits upsampled to the (padded) input size before the loss, as DeepLab /
    MMSeg do, and MMSeg's sliding-window inference when TEST.SLIDE.CROP is set (`slide_inference`)."""

    @configurable
    def __init__(self, *, slide_crop: tuple[int, int] = (0, 0), slide_stride: tuple[int, int] = (0, 0),
                 train_size: tuple[int, int] = (0, 0), **kwargs):
        super().__init__(**kwargs)
        self.slide_crop, self.slide_stride = tuple(slide_crop), tuple(slide_stride)
        self.train_size = tuple(train_size)

    @classmethod
    def from_config(cls, cfg):
        crop = tuple(cfg.INPUT.CROP.SIZE) if cfg.INPUT.CROP.ENABLED else (0, 0)
        return {**super().from_config(cfg), "slide_crop": tuple(cfg.TEST.SLIDE.CROP),
                "slide_stride": tuple(cfg.TEST.SLIDE.STRIDE), "train_size": crop}

    def _pad_to_crop(self, tensor: torch.Tensor, value: float) -> torch.Tensor:
        """Training batches padded (right, bottom) to at least the crop size, as MMSeg's Pad(size=crop_size)
        and DeepLab do: crops of images smaller than the crop keep the loss's pixel count and BN's input size."""
        h, w = tensor.shape[-2:]
        return F.pad(tensor, (0, max(self.train_size[1] - w, 0), 0, max(self.train_size[0] - h, 0)), value=value)

    def _logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.sem_seg_head(self.backbone(images))

    def forward(self, batched_inputs):
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        images = ImageList.from_tensors(images, self.backbone.size_divisibility)
        if self.training:
            targets = ImageList.from_tensors([x["sem_seg"].to(self.device) for x in batched_inputs],
                                             self.backbone.size_divisibility, self.sem_seg_head.ignore_value).tensor
            targets = self._pad_to_crop(targets, self.sem_seg_head.ignore_value)
            return self.sem_seg_head.losses(self._logits(self._pad_to_crop(images.tensor, 0.0)), targets)
        results = []
        for i, (inp, size) in enumerate(zip(batched_inputs, images.image_sizes)):
            image = images.tensor[i:i + 1, :, :size[0], :size[1]]
            logits = self._slide(image) if self.slide_crop[0] else self._whole(image)
            # back to the original size with the head's align_corners (MMSeg's resize in predict)
            out_size = (inp.get("height", size[0]), inp.get("width", size[1]))
            results.append({"sem_seg": self.sem_seg_head.upsample(logits, out_size)[0]})
        return results

    def _whole(self, image: torch.Tensor) -> torch.Tensor:
        return self.sem_seg_head.upsample(self._logits(image)["sem_seg"], image.shape[-2:])

    def _slide(self, image: torch.Tensor) -> torch.Tensor:
        """MMSeg EncoderDecoder.slide_inference: overlapping crops, logits averaged where they overlap."""
        (h_crop, w_crop), (h_stride, w_stride) = self.slide_crop, self.slide_stride
        h_img, w_img = image.shape[-2:]
        h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
        w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
        preds, count = None, image.new_zeros((1, 1, h_img, w_img))
        for hi in range(h_grids):
            for wi in range(w_grids):
                y2, x2 = min(hi * h_stride + h_crop, h_img), min(wi * w_stride + w_crop, w_img)
                y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
                logits = self._whole(image[:, :, y1:y2, x1:x2])
                if preds is None:
                    preds = image.new_zeros((1, logits.shape[1], h_img, w_img))
                preds += F.pad(logits, (x1, w_img - x2, y1, h_img - y2))
                count[:, :, y1:y2, x1:x2] += 1
        return preds / count


# --- training data --------------------------------------------------------------------------------------
class KeepRatioResize(T.Augmentation):
    """MMSeg `Resize(img_scale, ratio_range, keep_ratio=True)`: scale (long, short) x a ratio drawn from
    `ratio_range`, then the image rescaled by min(long / its long side, short / its short side), sizes
    rounded as mmcv.imrescale. `scale` None (MoCo's "random scaling"): the image itself x the ratio."""

    def __init__(self, scale: tuple[int, int] | None, ratio_range: tuple[float, float]):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        h, w = image.shape[:2]
        ratio = float(np.random.uniform(*self.ratio_range))
        if self.scale:
            long_edge, short_edge = max(self.scale) * ratio, min(self.scale) * ratio
            factor = min(long_edge / max(h, w), short_edge / min(h, w))
        else:
            factor = ratio
        return T.ResizeTransform(h, w, int(h * factor + 0.5), int(w * factor + 0.5), Image.BILINEAR)


class PhotoMetricDistortion(T.Augmentation):
    """MMSeg `PhotoMetricDistortion` (uint8 image): brightness +-32, contrast x[0.5, 1.5] (before or after the
    rest, at random), saturation x[0.5, 1.5] and hue +-18 (OpenCV's 0-180 scale) in HSV, each with p = 0.5;
    values clipped to 0-255 after each step."""

    def get_transform(self, image):
        rng = np.random
        brightness = rng.uniform(-32, 32) if rng.randint(2) else None
        contrast_first = bool(rng.randint(2))
        contrast = rng.uniform(0.5, 1.5) if rng.randint(2) else None
        saturation = rng.uniform(0.5, 1.5) if rng.randint(2) else None
        hue = rng.randint(-18, 18) if rng.randint(2) else None
        return T.ColorTransform(lambda img: _distort(img, brightness, contrast, contrast_first, saturation, hue))


def _convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def _distort(img, brightness, contrast, contrast_first, saturation, hue) -> np.ndarray:
    import cv2  # opencv-python-headless, installed with the transfer extras (transfer/install_detectron2.sh)
    img = np.ascontiguousarray(img)
    if brightness is not None:
        img = _convert(img, beta=brightness)
    if contrast_first and contrast is not None:
        img = _convert(img, alpha=contrast)
    if saturation is not None or hue is not None:  # RGB here (detectron2 reads RGB); MMSeg works in BGR
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        if saturation is not None:
            hsv[:, :, 1] = _convert(hsv[:, :, 1], alpha=saturation)
        if hue is not None:
            hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + hue) % 180
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if not contrast_first and contrast is not None:
        img = _convert(img, alpha=contrast)
    return img


def train_augmentations(cfg) -> list[T.Augmentation]:
    """Resize (INPUT.SEG.SCALE, RATIO_RANGE), crop INPUT.CROP.SIZE with INPUT.SEG.CAT_MAX_RATIO, flip, and
    PhotoMetricDistortion when INPUT.SEG.PHOTOMETRIC (MMSeg's pipeline order)."""
    seg = cfg.INPUT.SEG
    augs = [KeepRatioResize(tuple(seg.SCALE) if seg.SCALE[0] else None, tuple(seg.RATIO_RANGE)),
            T.RandomCrop_CategoryAreaConstraint("absolute", tuple(cfg.INPUT.CROP.SIZE), seg.CAT_MAX_RATIO,
                                                cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE),
            T.RandomFlip(0.5, horizontal=True)]
    if seg.PHOTOMETRIC:
        augs.append(PhotoMetricDistortion())
    return augs


class SegmentationMapper:
    """Dataset dict -> model input, as detectron2's DatasetMapper but reading label PNGs as stored (palette
    PNGs keep their indices; DatasetMapper converts to "L", which maps VOC's palette colours to grey values).
    Training: `train_augmentations`; test: the image resized as INPUT.MIN/MAX_SIZE_TEST (0 = as it is), the
    labels left to the evaluator, which reads them at the original size."""

    def __init__(self, cfg, is_train: bool):
        self.is_train, self.image_format = is_train, cfg.INPUT.FORMAT
        self.augmentations = T.AugmentationList(train_augmentations(cfg) if is_train else [
            T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")])

    def __call__(self, dataset_dict: dict) -> dict:
        d = dict(dataset_dict)
        image = utils.read_image(d["file_name"], format=self.image_format)
        utils.check_image_size(d, image)
        label_file = d.pop("sem_seg_file_name", None)
        labels = np.asarray(Image.open(label_file), dtype=np.uint8) if self.is_train and label_file else None
        aug = T.AugInput(image, sem_seg=labels)
        self.augmentations(aug)
        d["image"] = torch.as_tensor(np.ascontiguousarray(aug.image.transpose(2, 0, 1)))
        if labels is not None:
            d["sem_seg"] = torch.as_tensor(aug.sem_seg.astype(np.int64))
        return d


def read_labels(path: str, dtype=int) -> np.ndarray:
    """A label PNG's stored values (SemSegEvaluator's `sem_seg_loading_fn`; its default passes copy=False,
    which NumPy 2 refuses for PIL images)."""
    with Image.open(path) as img:
        return np.asarray(img, dtype=dtype)


# --- lr schedule ---------------------------------------------------------------------------------------
class PolyParamScheduler(ParamScheduler):
    """MMSeg's poly policy as a multiplier of the base lr: (1 - t)^power x (1 - min/base) + min/base, t the
    fraction of training done, so lr goes from base to `min_lr` (mmcv PolyLrUpdaterHook, by iteration)."""

    def __init__(self, power: float, min_ratio: float):
        self.power, self.min_ratio = power, min_ratio

    def __call__(self, where: float) -> float:
        return (1 - self.min_ratio) * math.pow(max(1.0 - where, 0.0), self.power) + self.min_ratio


def poly_lr_scheduler(cfg, optimizer):
    """detectron2's LRMultiplier over the poly policy (warmup as SOLVER.WARMUP_*, none in MMSeg's)."""
    from detectron2.solver.lr_scheduler import LRMultiplier, WarmupParamScheduler
    sched = PolyParamScheduler(cfg.SOLVER.POLY_POWER, cfg.SOLVER.POLY_MIN_LR_FACTOR)
    sched = WarmupParamScheduler(sched, cfg.SOLVER.WARMUP_FACTOR,
                                 min(cfg.SOLVER.WARMUP_ITERS / cfg.SOLVER.MAX_ITER, 1.0), cfg.SOLVER.WARMUP_METHOD)
    return LRMultiplier(optimizer, multiplier=sched, max_iter=cfg.SOLVER.MAX_ITER)


def register() -> None:
    """Add the backbone, head and meta-architecture to detectron2's registries (idempotent)."""
    for registry, obj in ((BACKBONE_REGISTRY, build_dilated_resnet_backbone), (SEM_SEG_HEADS_REGISTRY, FCNHead),
                          (META_ARCH_REGISTRY, FCNSegmentor)):
        if obj.__name__ not in registry:
            registry.register(obj)
