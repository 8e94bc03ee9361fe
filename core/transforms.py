"""The evaluation image transforms and the ImageNet normalisation every stage shares.

Three ways to bring an image to the network's input size, each the one of a reference protocol:
  center_crop   Resize(resize) + CenterCrop(crop): main_lincls.py's val transform (256 -> 224)
  resize        Resize(resize) + Resize((crop, crop)), the whole image, no crop: VISSL's VOC07 SVM
                (configs/config/benchmark/linear_image_classification/voc07/eval_resnet_8gpu_transfer_voc07_svm.yaml)
                and MMSelfSup's VOC07 feature extraction (benchmarks/extract_info/voc07.py)
  square        Resize((crop, crop)): VISSL's VOC07 low-shot SVM (..._voc07_low_shot_svm.yaml)
"""
from __future__ import annotations

from torchvision import transforms

# torchvision's ImageNet channel statistics, as in facebookresearch/moco main_moco.py / main_lincls.py
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


IMAGE_TRANSFORMS = ("center_crop", "resize", "square")


def eval_transform(resize: int = 256, crop: int = 224, kind: str = "center_crop") -> transforms.Compose:
    """One of IMAGE_TRANSFORMS (module docstring) + ToTensor + ImageNet normalisation."""
    sizing = {"center_crop": [transforms.Resize(resize), transforms.CenterCrop(crop)],
              "resize": [transforms.Resize(resize), transforms.Resize((crop, crop))],
              "square": [transforms.Resize((crop, crop))]}
    if kind not in sizing:
        raise ValueError(f"image transform {kind!r}; expected one of {', '.join(IMAGE_TRANSFORMS)}")
    return transforms.Compose([*sizing[kind], transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def transform_id(resize: int, crop: int, kind: str = "center_crop") -> str:
    """The name of a transform in feature-cache paths (center_crop keeps the historical `resize256_crop224`)."""
    return {"center_crop": f"resize{resize}_crop{crop}", "resize": f"resize{resize}_square{crop}",
            "square": f"square{crop}"}[kind]
