"""MoCo augmentations, as in facebookresearch/moco `main_moco.py` and `moco/loader.py`.

v1 (He et al. 2019): RandomResizedCrop(scale=(0.2, 1)), RandomGrayscale(0.2), ColorJitter(0.4, 0.4, 0.4, 0.4),
    flip.
v2 `aug+` (Chen et al. 2020): RandomResizedCrop(scale=(0.2, 1)), ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8,
    RandomGrayscale(0.2), GaussianBlur(sigma in [0.1, 2.0]) with p=0.5, flip.
The strengths are parameters so small synthetic data can use milder jitter and blur (see docs/pretrain.md).
"""
from __future__ import annotations

import random

from PIL import ImageFilter
from torchvision import transforms

from mocobench.core.transforms import IMAGENET_MEAN, IMAGENET_STD


class GaussianBlur:
    """Gaussian blur with a radius drawn uniformly from `sigma` (SimCLR's blur, as in MoCo v2)."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = tuple(sigma)

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class TwoCropsTransform:
    """Two independent augmentations of one image: the query view and the key view."""

    def __init__(self, base_transform):
        self.base_transform = base_transform

    def __call__(self, x):
        return [self.base_transform(x), self.base_transform(x)]


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
