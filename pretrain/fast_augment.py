"""MoCo v1/v2 augmentations on uint8 tensors: the same distribution as `pretrain/augment.py` (the official
PIL / torchvision-v1 pipeline of facebookresearch/moco `main_moco.py` + `moco/loader.py`), about 2-3x
cheaper per image on one core (`mocobench bench loader`, docs/performance.md).

What changes:
  * decode   torchvision.io (libjpeg-turbo) straight into a CHW uint8 tensor; PIL as fallback (BMP, TIFF, ...).
  * crop     RandomResizedCrop on the uint8 tensor with antialiased bilinear resize (torch's SIMD uint8
             kernel; antialias matches PIL's bilinear filter).
  * colour   one uint8 -> float32 conversion of the small crop, values kept on the 0..255 scale;
             brightness/contrast/saturation/grayscale reproduce PIL's integer results (its blend order and
             truncation, one floor_ per op); the hue shift is a branch-free closed-form HSV rotation
             instead of torchvision's rgb<->hsv code.
  * blur     separable Gaussian with std sigma (PIL's `GaussianBlur(radius=sigma)` is a 3-pass box
             approximation of the same Gaussian), radius 3 sigma, edge pixels replicated.
Parameters are drawn from the same distributions as the official pipeline (torchvision's
RandomResizedCrop.get_params algorithm, ColorJitter's random order and factor ranges, the same
probabilities). The numerical differences left are PIL's 8-bit HSV in the hue shift and its box-vs-true
Gaussian; tests/test_bench.py bounds each op, and whole views made with the same parameters
(`reference_apply`), against PIL.

    aug = TwoCropsTransform(TensorMocoAugmentation(224, aug_plus=True))
    q, k = aug(decode_rgb(path))            # float32 3x224x224 each, ImageNet-normalised
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from mocobench.core.transforms import IMAGENET_MEAN, IMAGENET_STD

# ITU-R 601-2 luma, as PIL's convert("L") and torchvision's rgb_to_grayscale
_LUMA = torch.tensor([[0.299, 0.587, 0.114]])


# --- the ops, each with explicit parameters (tested one by one against PIL) ----------------------------
def grayscale(x: torch.Tensor) -> torch.Tensor:
    """1xHxW luma of a 3xHxW image on the 0..255 scale, rounded to integers like PIL's convert("L")
    (one matrix-vector product: 5x faster than three multiply-adds)."""
    return (_LUMA @ x.reshape(3, -1)).view(1, *x.shape[1:]).add_(0.5).floor_()


def _blend(x: torch.Tensor, degenerate, factor: float) -> torch.Tensor:
    """PIL's Image.blend(degenerate, x, factor) on the 0..255 scale: clip to [0, 255], truncate to an integer."""
    return x.sub_(degenerate).mul_(factor).add_(degenerate).clamp_(0, 255).floor_()  # PIL's operation order


def adjust_brightness(x: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL ImageEnhance.Brightness: blend with black."""
    return _blend(x, 0.0, factor)


def adjust_contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL ImageEnhance.Contrast: blend with the image's mean luma, rounded to an integer."""
    return _blend(x, math.floor(float(grayscale(x).mean()) + 0.5), factor)


def adjust_saturation(x: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL ImageEnhance.Color: blend with the (integer) luma image."""
    return _blend(x, grayscale(x), factor)


# channel offsets (R, G, B) = (5, 3, 1) of the HSV -> RGB formula, in turns
_HSV_OFFSETS = torch.tensor([5.0, 3.0, 1.0]).view(3, 1, 1) / 6


def adjust_hue(x: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate the HSV hue of a float 3xHxW image by `shift` turns (any value scale); value and saturation kept.

    Closed form without an HSV image: with V = max, C = max - min and hue h (turns), channel n is
    V - C * clamp(min(k, 4 - k), 0, 1), k = 6 * frac(n/6 + h), the standard HSV -> RGB formula.
    Branch-free (masks as 0/1 floats): about 20 element-wise passes instead of torchvision's ~60.
    """
    r, g, b = x
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    is_r = (r == maxc).float()
    is_g = (g == maxc).float().mul_(1 - is_r)
    is_b = 1 - is_r - is_g
    # hue * 6 * chroma: (g - b) where R is the max, (b - r) + 2C where G is, (r - g) + 4C where B is
    num = (g - b).mul_(is_r).add_((b - r).add_(chroma, alpha=2).mul_(is_g)).add_((r - g).add_(chroma, alpha=4).mul_(is_b))
    hue = num.div_(chroma.clamp(min=1e-12)).mul_(1 / 6).add_(shift)
    k = _HSV_OFFSETS + hue
    k = k.sub_(k.floor()).mul_(6)
    weight = torch.minimum(k, 4 - k).clamp_(0, 1)
    return torch.sub(maxc, weight.mul_(chroma), out=x)


def gaussian_kernel1d(sigma: float) -> list[float]:
    """Normalised Gaussian taps with std `sigma`, radius ceil(3 sigma) (at least 1)."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).tolist()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a float CxHxW image with std `sigma` px, edges replicated (as PIL's).

    Shifted-slice sums with the symmetric taps paired: on one thread this beats conv2d (oneDNN is slow
    for depthwise 1-D kernels) by 2-3x.
    """
    k = gaussian_kernel1d(sigma)
    r = len(k) // 2
    _, h, w = x.shape
    p = F.pad(x.unsqueeze(0), (r, r, r, r), mode="replicate")[0]
    y = p[:, :, r:r + w] * k[r]
    for i in range(r):
        y.add_(p[:, :, i:i + w] + p[:, :, 2 * r - i:2 * r - i + w], alpha=k[i])
    z = y[:, r:r + h] * k[r]
    for i in range(r):
        z.add_(y[:, i:i + h] + y[:, 2 * r - i:2 * r - i + h], alpha=k[i])
    return z


def resized_crop(img: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """Crop (top, left, height, width) of a uint8 image and resize to size x size, antialiased bilinear."""
    top, left, h, w = box
    return TF.resize(img[:, top:top + h, left:left + w], [size, size], antialias=True)


def random_resized_crop_box(height: int, width: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """(top, left, h, w) of a RandomResizedCrop: torchvision's `RandomResizedCrop.get_params` algorithm
    (10 tries of area ~ U(scale) * H * W and log-aspect ~ U(log ratio), else the largest centred crop of
    clamped aspect), drawn with Python's `random` instead of per-scalar torch calls."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * random.uniform(*scale)
        aspect = math.exp(random.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return random.randint(0, height - h), random.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# --- the pipeline ---------------------------------------------------------------------------------------
@dataclass
class ViewParams:
    """Every random choice of one augmented view (for tests and reproducibility)."""
    box: tuple[int, int, int, int]
    jitter_order: list[int] | None      # permutation of 0..3 (brightness, contrast, saturation, hue), None = off
    factors: tuple[float, float, float, float]
    gray: bool
    blur_sigma: float | None
    flip: bool


class TensorMocoAugmentation:
    """One MoCo view from a 3xHxW uint8 tensor; same arguments and distribution as
    `mocobench.pretrain.augment.moco_augmentation`. Random numbers come from Python's `random` (cheap scalar draws;
    DataLoader seeds it per worker, as it does torch's).

    v1 (aug_plus=False): crop, grayscale p, jitter (always, hue 0.4), flip.
    v2 (aug_plus=True):  crop, jitter p=0.8 (hue 0.1), grayscale p, blur p=0.5, flip.
    """

    def __init__(self, size: int = 224, aug_plus: bool = False, crop_min: float = 0.2, jitter: float = 0.4,
                 hue: float | None = None, blur_sigma=(0.1, 2.0), grayscale_p: float = 0.2):
        self.size, self.aug_plus, self.scale = size, aug_plus, (crop_min, 1.0)
        self.ratio = (3 / 4, 4 / 3)
        self.jitter = jitter
        self.hue = (0.1 if aug_plus else 0.4) if hue is None else hue
        self.blur_sigma = tuple(blur_sigma)
        self.grayscale_p = grayscale_p
        self.jitter_p = 0.8 if aug_plus else 1.0
        self.blur_p = 0.5 if aug_plus else 0.0
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, aug_plus={self.aug_plus}, scale={self.scale}, "
                f"jitter={self.jitter}, hue={self.hue}, blur_sigma={self.blur_sigma}, grayscale_p={self.grayscale_p})")

    def sample(self, height: int, width: int) -> ViewParams:
        """Draw the parameters of one view (same ranges and probabilities as the PIL pipeline)."""
        box = random_resized_crop_box(height, width, self.scale, self.ratio)
        order, factors = None, (1.0, 1.0, 1.0, 0.0)
        if random.random() < self.jitter_p:
            lo, hi = max(0.0, 1 - self.jitter), 1 + self.jitter
            order = random.sample(range(4), 4)
            factors = (random.uniform(lo, hi), random.uniform(lo, hi), random.uniform(lo, hi),
                       random.uniform(-self.hue, self.hue))
        gray = random.random() < self.grayscale_p
        sigma = random.uniform(*self.blur_sigma) if self.blur_p and random.random() < self.blur_p else None
        flip = random.random() < 0.5
        return ViewParams(box, order, factors, gray, sigma, flip)

    def apply(self, img: torch.Tensor, p: ViewParams) -> torch.Tensor:
        crop = resized_crop(img, p.box, self.size)
        if p.flip:  # flipping commutes with every other op here, so do it on the small uint8 crop
            crop = crop.flip(-1)
        x = crop.float()  # 0..255 scale: PIL's integer rounding of each enhance op is one floor_()
        if not self.aug_plus and p.gray:  # v1 order: grayscale before jitter
            x = grayscale(x).expand(3, -1, -1).contiguous()
        if p.jitter_order is not None:
            b, c, s, h = p.factors
            for op in p.jitter_order:
                if op == 0:
                    x = adjust_brightness(x, b)
                elif op == 1:
                    x = adjust_contrast(x, c)
                elif op == 2:
                    x = adjust_saturation(x, s)
                elif h != 0.0:
                    x = adjust_hue(x, h)
        if self.aug_plus and p.gray:
            x = grayscale(x).expand(3, -1, -1).contiguous()
        if p.blur_sigma is not None:
            x = gaussian_blur(x, p.blur_sigma)
        return x.sub_(self.mean).div_(self.std)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if not (isinstance(img, torch.Tensor) and img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3):
            raise TypeError(f"{type(self).__name__} expects a 3xHxW uint8 tensor (see decode_rgb), got "
                            f"{type(img).__name__} {getattr(img, 'dtype', '')} {tuple(getattr(img, 'shape', ()))}")
        return self.apply(img, self.sample(img.shape[1], img.shape[2]))


def reference_apply(img, p: ViewParams, aug: TensorMocoAugmentation) -> torch.Tensor:
    """The same view made with the official PIL ops (torchvision.transforms.functional on PIL images and
    PIL's GaussianBlur, in `moco_augmentation`'s order): the reference that tests and `mocobench bench
    loader` compare `aug.apply(decode_rgb(...), p)` with, on the same random parameters `p`."""
    from PIL import ImageFilter
    from torchvision.transforms import functional as PF

    x = PF.resized_crop(img, *p.box, [aug.size, aug.size], PF.InterpolationMode.BILINEAR)
    if not aug.aug_plus and p.gray:
        x = PF.rgb_to_grayscale(x, num_output_channels=3)
    if p.jitter_order is not None:
        ops = (PF.adjust_brightness, PF.adjust_contrast, PF.adjust_saturation, PF.adjust_hue)
        for op in p.jitter_order:
            if op != 3 or p.factors[3] != 0.0:
                x = ops[op](x, p.factors[op])
    if aug.aug_plus and p.gray:
        x = PF.rgb_to_grayscale(x, num_output_channels=3)
    if p.blur_sigma is not None:
        x = x.filter(ImageFilter.GaussianBlur(radius=p.blur_sigma))
    if p.flip:
        x = PF.hflip(x)
    return PF.normalize(PF.to_tensor(x), IMAGENET_MEAN, IMAGENET_STD)


def tensor_moco_augmentation(size: int = 224, aug_plus: bool = False, crop_min: float = 0.2, jitter: float = 0.4,
                             hue: float | None = None, blur_sigma=(0.1, 2.0), grayscale_p: float = 0.2):
    """Drop-in for `mocobench.pretrain.augment.moco_augmentation` taking decoded uint8 tensors (`decode_rgb`)."""
    return TensorMocoAugmentation(size, aug_plus, crop_min, jitter, hue, blur_sigma, grayscale_p)
