"""The evaluation image transform and the ImageNet normalisation every stage shares."""
from __future__ import annotations

from torchvision import transforms

# torchvision's ImageNet channel statistics, as in facebookresearch/moco main_moco.py / main_lincls.py
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_transform(resize: int = 256, crop: int = 224) -> transforms.Compose:
    """Resize + CenterCrop + normalize: the evaluation transform of main_lincls.py (256 -> 224)."""
    return transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(crop), transforms.ToTensor(),
                               transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
