"""MoCo augmentations, as in facebookresearch/moco `main_moco.py` and `moco/loader.py`.

v1 (He et al. 2019): RandomResizedCrop(scale=(0.2, 1)), RandomGrayscale(0.2), ColorJitter(0.4, 0.4, 0.4, 0.4),
    flip.
v2 `aug+` (Chen et al. 2020): RandomResizedCrop(scale=(0.2, 1)), ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8,
    RandomGrayscale(0.2), GaussianBlur(sigma in [0.1, 2.0]) with p=0.5, flip.
v3 (Chen, Xie, He 2021; facebookresearch/moco-v3 `main_moco.py` augmentation1/2, BYOL's asymmetric recipe):
    RandomResizedCrop(scale=(0.08, 1)), ColorJitter(0.4, 0.4, 0.2, 0.1) with p=0.8, RandomGrayscale(0.2),
    then blur with p=1.0 (view 1) or p=0.1 (view 2), solarize with p=0.2 (view 2 only), flip.
The strengths are parameters so small synthetic data can use milder jitter and blur (see docs/pretrain.md).
"""
from __future__ import annotations

import random

from PIL import ImageFilter, ImageOps
from torchvision import transforms

from mocobench.core.transforms import IMAGENET_MEAN, IMAGENET_STD


class GaussianBlur:
    """Gaussian blur with a radius drawn uniformly from `sigma` (SimCLR's blur, as in MoCo v2)."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = tuple(sigma)

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class Solarize:
    """Invert every pixel value >= 128 (BYOL's solarization; moco-v3 `moco/loader.py`)."""

    def __call__(self, img):
        return ImageOps.solarize(img)


class TwoCropsTransform:
    """Two independent augmentations of one image: the query view and the key view (v3: the second view has
    its own transform, `base_transform2`)."""

    def __init__(self, base_transform, base_transform2=None):
        self.base_transform = base_transform
        self.base_transform2 = base_transform if base_transform2 is None else base_transform2

    def __call__(self, x):
        return [self.base_transform(x), self.base_transform2(x)]


def moco_augmentation(size: int = 224, aug_plus: bool = False, crop_min: float = 0.2, jitter: float = 0.4,
                      hue: float | None = None, blur_sigma=(0.1, 2.0), grayscale_p: float = 0.2):
    """The v1 (aug_plus=False) or v2 (aug_plus=True) pretraining augmentation of one view."""
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    crop = transforms.RandomResizedCrop(size, scale=(crop_min, 1.0))
    if aug_plus:
        ops = [crop,
               transforms.RandomApply([transforms.ColorJitter(jitter, jitter, jitter, 0.1 if hue is None else hue)], p=0.8),
               transforms.RandomGrayscale(p=grayscale_p),
               transforms.RandomApply([GaussianBlur(blur_sigma)], p=0.5)]
    else:
        ops = [crop,
               transforms.RandomGrayscale(p=grayscale_p),
               transforms.ColorJitter(jitter, jitter, jitter, 0.4 if hue is None else hue)]
    ops += [transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]
    return transforms.Compose(ops)


def moco_v3_augmentations(size: int = 224, crop_min: float = 0.08, jitter: float = 0.4, blur_sigma=(0.1, 2.0)):
    """The two asymmetric MoCo v3 views (augmentation1, augmentation2). Saturation jitter is half of `jitter`
    (official 0.4 / 0.2), hue 0.1."""
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def view(blur_p: float, solarize_p: float):
        ops = [transforms.RandomResizedCrop(size, scale=(crop_min, 1.0)),
               transforms.RandomApply([transforms.ColorJitter(jitter, jitter, jitter / 2, 0.1)], p=0.8),
               transforms.RandomGrayscale(p=0.2),
               transforms.RandomApply([GaussianBlur(blur_sigma)], p=blur_p)]
        if solarize_p:
            ops.append(transforms.RandomApply([Solarize()], p=solarize_p))
        return transforms.Compose(ops + [transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize])

    return view(1.0, 0.0), view(0.1, 0.2)
