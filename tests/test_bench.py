"""The tensor MoCo augmentation against the official PIL pipeline (op by op, whole views with the same random
parameters, parameter distributions), its decoder, and the `mocobench bench pretrain|loader` commands on
tiny settings (correctness of what they measure, never their speed)."""
import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T
from torchvision.transforms import functional as PF

from mocobench.core.images import decode_rgb, pil_to_uint8
from mocobench.core.transforms import IMAGENET_STD
from mocobench.pretrain import fast_augment as fa
from mocobench.pretrain.augment import GaussianBlur, TwoCropsTransform, moco_augmentation

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


def photo(w=96, h=72, seed=0) -> Image.Image:
    """A smooth colourful image with texture (like a photo; flat synthetic colours would hide hue errors)."""
    rng = np.random.default_rng(seed)
    field = rng.normal(size=(h // 8 + 1, w // 8 + 1, 3)).cumsum(0).cumsum(1)
    field = (field - field.min()) / np.ptp(field) * 255
    img = Image.fromarray(field.astype(np.uint8)).resize((w, h), Image.BICUBIC)
    return Image.fromarray((np.asarray(img) + rng.normal(0, 8, (h, w, 3))).clip(0, 255).astype(np.uint8))


def as255(pil) -> torch.Tensor:
    return PF.pil_to_tensor(pil).float()


# --- single ops against hand values and PIL -------------------------------------------------------------
def test_hue_rotation_by_hand():
    px = torch.tensor([[255.0, 0, 0], [255, 128, 0], [90, 90, 90]]).T.reshape(3, 1, 3)  # red, orange, grey
    def shifted(s):
        return fa.adjust_hue(px.clone(), s).reshape(3, 3).T.round().tolist()
    assert shifted(1 / 3)[0] == [0, 255, 0] and shifted(-1 / 3)[0] == [0, 0, 255] and shifted(1 / 6)[0] == [255, 255, 0]
    # orange: hue 128/255/6 turns; +0.5 -> 6h = 3.502: R = 0, G = 255 - 255 * 0.502 = 127, B = 255
    assert shifted(0.5)[1] == [0, 127, 255]
    assert all(shifted(s)[2] == [90, 90, 90] for s in (0.1, -0.4))  # no chroma: unchanged


def test_enhance_ops_reproduce_pil_integer_results():
    pil = photo()
    x = as255(pil)
    for f in (0.6, 0.95, 1.4):
        for ours, ref in ((fa.adjust_brightness, PF.adjust_brightness), (fa.adjust_contrast, PF.adjust_contrast),
                          (fa.adjust_saturation, PF.adjust_saturation)):
            d = (ours(x.clone(), f) - as255(ref(pil, f))).abs()
            assert d.max() <= 1 and d.mean() < 0.02, (ours.__name__, f, d.max(), d.mean())
    d = fa.grayscale(x) - as255(pil.convert("L"))
    assert d.abs().max() <= 1 and d.abs().mean() < 0.02


def test_hue_and_crop_match_pil():
    pil = photo()
    x = as255(pil)
    for s in (-0.4, -0.1, 0.05, 0.3):
        d = (fa.adjust_hue(x.clone(), s) - as255(PF.adjust_hue(pil, s))).abs()
        # PIL works on 8-bit H, S, V and truncates the shift to whole 1/255-turn steps: ~1 grey level apart
        assert d.mean() < 1.0 and d.max() <= 12, (s, d.mean(), d.max())
    tensor = pil_to_uint8(pil)
    for box in ((3, 5, 40, 60), (0, 0, 72, 96), (10, 20, 9, 7)):
        d = (fa.resized_crop(tensor, box, 32).float() - as255(PF.resized_crop(pil, *box, [32, 32]))).abs()
        assert d.max() <= 1 and d.mean() < 0.1, (box, d.max())


def test_gaussian_blur_is_a_gaussian_of_std_sigma():
    for sigma in (0.1, 0.7, 2.0):
        k = torch.tensor(fa.gaussian_kernel1d(sigma), dtype=torch.float64)
        t = torch.arange(len(k)) - len(k) // 2
        assert k.sum().item() == pytest.approx(1.0) and torch.allclose(k, k.flip(0))
        if sigma >= 0.5:  # the truncated discrete kernel's variance is sigma^2
            assert (k * t ** 2).sum().item() == pytest.approx(sigma ** 2, rel=0.03)
    impulse = torch.zeros(1, 41, 41)
    impulse[0, 20, 20] = 1
    out = fa.gaussian_blur(impulse, 2.0)[0]
    i = torch.arange(41.0) - 20
    assert out.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert (out.sum(0) * i ** 2).sum().item() == pytest.approx(4.0, rel=0.03)  # variance along x = sigma^2
    flat = torch.full((3, 9, 9), 77.0)
    assert torch.allclose(fa.gaussian_blur(flat, 1.5), flat)  # edges replicated: a flat image stays flat
    pil = photo()
    for sigma in (0.5, 1.0, 2.0):  # PIL's radius is the std of its 3-pass box approximation
        d = (fa.gaussian_blur(as255(pil), sigma) - as255(pil.filter(ImageFilter.GaussianBlur(sigma)))).abs()
        assert d.mean() < 1.0 and d.max() <= 6, (sigma, d.mean(), d.max())


# --- whole views and the parameter distributions --------------------------------------------------------
@pytest.mark.parametrize("aug_plus", [True, False])
def test_views_match_the_official_ops_with_the_same_parameters(aug_plus):
    """Same random draw -> the tensor view and the PIL view agree to about a grey level."""
    random.seed(0)
    aug = fa.TensorMocoAugmentation(40, aug_plus=aug_plus)
    std255 = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255
    diffs, bias = [], []
    for i in range(16):
        pil = photo(seed=i)
        p = aug.sample(pil.height, pil.width)
        d = (aug.apply(pil_to_uint8(pil), p) - fa.reference_apply(pil, p, aug)) * std255  # grey levels
        diffs.append(d.abs().mean().item())
        bias.append(d.mean().item())
    assert max(diffs) < 2.5 and np.mean(diffs) < 1.2, diffs
    assert abs(np.mean(bias)) < 0.4, bias


def official_parts(aug_plus):
    """Parameters of the official Compose (pretrain/augment.py), read from its transform objects."""
    ops = moco_augmentation(224, aug_plus).transforms
    crop = next(t for t in ops if isinstance(t, T.RandomResizedCrop))
    applied = [t for t in ops if isinstance(t, T.RandomApply)]
    jitter = next((t for t in ops if isinstance(t, T.ColorJitter)), None)
    jitter_p = 1.0
    if jitter is None:
        holder = next(t for t in applied if isinstance(t.transforms[0], T.ColorJitter))
        jitter, jitter_p = holder.transforms[0], holder.p
    blur = next((t for t in applied if isinstance(t.transforms[0], GaussianBlur)), None)
    gray = next(t for t in ops if isinstance(t, T.RandomGrayscale))
    return {"scale": tuple(crop.scale), "ratio": tuple(crop.ratio), "brightness": tuple(jitter.brightness),
            "hue": tuple(jitter.hue), "jitter_p": jitter_p, "gray_p": gray.p,
            "blur_p": blur.p if blur else 0.0, "blur_sigma": blur.transforms[0].sigma if blur else None}


@pytest.mark.parametrize("aug_plus", [True, False])
def test_parameter_distributions_match_the_official_pipeline(aug_plus):
    ref = official_parts(aug_plus)
    aug = fa.TensorMocoAugmentation(224, aug_plus=aug_plus)
    assert aug.scale == pytest.approx(ref["scale"]) and aug.ratio == pytest.approx(ref["ratio"])
    assert (aug.jitter_p, aug.grayscale_p, aug.blur_p) == (ref["jitter_p"], ref["gray_p"], ref["blur_p"])
    random.seed(1)
    n = 4000
    draws = [aug.sample(300, 400) for _ in range(n)]
    tol = 4 * math.sqrt(0.25 / n)  # 4 binomial standard deviations
    jittered = [p for p in draws if p.jitter_order is not None]
    assert len(jittered) / n == pytest.approx(ref["jitter_p"], abs=tol)
    assert np.mean([p.gray for p in draws]) == pytest.approx(ref["gray_p"], abs=tol)
    assert np.mean([p.flip for p in draws]) == pytest.approx(0.5, abs=tol)
    blurred = [p.blur_sigma for p in draws if p.blur_sigma is not None]
    assert len(blurred) / n == pytest.approx(ref["blur_p"], abs=tol)
    if blurred:
        assert ref["blur_sigma"][0] <= min(blurred) and max(blurred) <= ref["blur_sigma"][1]
    b = np.array([p.factors[0] for p in jittered])
    h = np.array([p.factors[3] for p in jittered])
    assert ref["brightness"][0] <= b.min() and b.max() <= ref["brightness"][1] and b.mean() == pytest.approx(1.0, abs=0.02)
    assert ref["hue"][0] <= h.min() and h.max() <= ref["hue"][1]
    assert np.bincount([p.jitter_order[0] for p in jittered], minlength=4) / len(jittered) == pytest.approx(
        [0.25] * 4, abs=0.04)  # random op order, as ColorJitter's randperm
    # crop boxes: same area/aspect distribution as torchvision's RandomResizedCrop.get_params
    torch.manual_seed(1)
    tv = [T.RandomResizedCrop.get_params(torch.empty(1, 300, 400), list(ref["scale"]), list(ref["ratio"]))
          for _ in range(n)]
    ours_area = np.array([p.box[2] * p.box[3] for p in draws]) / 120000
    tv_area = np.array([hh * ww for _, _, hh, ww in tv]) / 120000
    assert ours_area.min() >= ref["scale"][0] - 0.01 and ours_area.max() <= 1.0
    assert ours_area.mean() == pytest.approx(tv_area.mean(), abs=0.015)
    assert np.quantile(ours_area, [0.1, 0.5, 0.9]) == pytest.approx(np.quantile(tv_area, [0.1, 0.5, 0.9]), abs=0.03)
    aspect = np.array([p.box[3] / p.box[2] for p in draws])
    assert aspect.min() >= 3 / 4 - 0.02 and aspect.max() <= 4 / 3 + 0.02


def test_transform_rejects_pil_input_and_two_crops_differ():
    aug = TwoCropsTransform(fa.tensor_moco_augmentation(16, aug_plus=True))
    q, k = aug(pil_to_uint8(photo()))
    assert q.shape == k.shape == (3, 16, 16) and q.dtype == torch.float32 and not torch.equal(q, k)
    with pytest.raises(TypeError, match="uint8 tensor"):
        fa.TensorMocoAugmentation(16)(photo())


# --- decoding -------------------------------------------------------------------------------------------
def test_decode_rgb_matches_pil_and_fails_like_pil(tmp_path):
    from mocobench.core.imagefolder import RobustImageFolder
    from mocobench.core.images import load_rgb
    img = photo()
    (tmp_path / "c").mkdir()
    img.save(tmp_path / "c" / "a.png")
    img.save(tmp_path / "c" / "b.jpg", quality=90)
    img.convert("L").save(tmp_path / "c" / "gray.jpg")
    img.convert("CMYK").save(tmp_path / "c" / "cmyk.jpg")
    img.save(tmp_path / "c" / "d.bmp")  # not a torchvision.io format: PIL fallback
    Image.fromarray((np.asarray(img.convert("L"), dtype=np.uint16) * 100)).save(tmp_path / "c" / "e16.png")
    (tmp_path / "c" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    for name, tol in (("a.png", 0), ("d.bmp", 0), ("e16.png", 0), ("b.jpg", 2), ("gray.jpg", 2), ("cmyk.jpg", 3)):
        ours = decode_rgb(tmp_path / "c" / name)
        ref = pil_to_uint8(load_rgb(str(tmp_path / "c" / name)))
        assert ours.dtype == torch.uint8 and ours.shape == ref.shape == (3, 72, 96), name
        assert (ours.int() - ref.int()).abs().float().mean() <= tol, name
    with pytest.raises(OSError):
        decode_rgb(tmp_path / "c" / "broken.jpg")
    ds = RobustImageFolder(tmp_path, TwoCropsTransform(fa.TensorMocoAugmentation(8)))
    ds.loader = decode_rgb  # how train.py's `loader: tensor` plugs it in
    broken = next(i for i, (p, _) in enumerate(ds.samples) if p.endswith("broken.jpg"))
    views, label, index, skipped = ds[broken]
    assert [v.shape for v in views] == [(3, 8, 8)] * 2 and skipped[0].endswith("broken.jpg") and index != broken


def test_decode_rgb_does_not_warn_per_image(tmp_path):
    """torchvision 0.29 warns on every decode; a 40-epoch run would print it 80,000 times."""
    import warnings
    photo().save(tmp_path / "a.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decode_rgb(tmp_path / "a.png")
        warnings.warn("the recorder works", UserWarning)
    assert [str(w.message) for w in caught] == ["the recorder works"]


# --- the benchmark commands -----------------------------------------------------------------------------
def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_bench_dispatcher(capsys):
    from mocobench.bench.cli import main
    assert main(["--help"]) == 0 and "pretrain" in capsys.readouterr().out
    assert main(["nope"]) == 2 and "unknown benchmark" in capsys.readouterr().err


def test_bench_loader_reports_ratio_and_output_statistics(capsys, tmp_path):
    from mocobench.bench.cli import main
    from mocobench.bench.loader import make_images
    paths = make_images(tmp_path, 2)
    assert [Image.open(p).size for p in paths] == [(500, 375), (375, 500)]
    assert main(["loader", "--images", "2", "--rounds", "1", "--size", "32"]) == 0
    res = last_json(capsys.readouterr().out)
    assert res["benchmark"] == "loader" and res["images"] == 2 and res["threads"] == 1
    assert res["ratio"] == pytest.approx(res["project_img_s"] / res["official_img_s"], rel=0.01)  # one round
    assert len(res["official_mean"]) == len(res["project_std"]) == 3 and res["max_abs_std_diff"] < 0.5
    assert res["paired_views"] == 4 and res["paired_mean_abs_diff_grey"] < 2.5 and abs(res["paired_bias_grey"]) < 1


def test_bench_pretrain_reports_ratio_flops_and_peaks(capsys):
    from mocobench.bench.cli import main
    assert main(["pretrain", "--arch", "resnet18_small", "--batch-size", "4", "--size", "16", "--rounds", "1",
                 "--steps", "1", "--warmup", "0", "--variants", "official,fast,default", "--peak-sizes", "256"]) == 0
    res = last_json(capsys.readouterr().out)
    off, fast = res["variants"]["official"], res["variants"]["fast"]
    assert (off["amp"], off["channels_last"]) == (False, False) and (fast["amp"], fast["channels_last"]) == (True, True)
    from mocobench.pretrain.train import cpu_bf16_is_fast  # "default" = what training resolves to at the bench's 16 px
    assert (res["variants"]["default"]["amp"], res["variants"]["default"]["channels_last"]) == \
        (torch.cuda.is_available() or cpu_bf16_is_fast(),) * 2
    assert res["ratio"] == pytest.approx(fast["img_s"] / off["img_s"], rel=0.01)  # one round: the plain ratio
    assert fast["speedup_vs_official"] == res["ratio"] and off["speedup_vs_official"] == 1.0
    assert off["gflop_per_img"] == fast["gflop_per_img"] > 0 and res["bf16_matmul_peak_tflop_s"] > 0
    assert fast["fraction_of_bf16_peak"] == pytest.approx(fast["tflop_s"] / res["bf16_matmul_peak_tflop_s"], rel=0.02)
    assert "meets_target" in res and res["target_ratio"] == 2.5


def test_bench_pretrain_defaults_skip_bf16_where_it_is_emulated(capsys, monkeypatch):
    """Without fast bf16 the unset --variants are official,default and no bf16 peak is timed; with it,
    official,fast."""
    from mocobench.bench import pretrain as bp
    from mocobench.bench.cli import main
    cpu = torch.device("cpu")
    monkeypatch.setattr(bp, "cpu_bf16_is_fast", lambda: True)
    assert bp.default_variants(cpu) == ["official", "fast"]
    monkeypatch.setattr(bp, "cpu_bf16_is_fast", lambda: False)
    assert bp.default_variants(cpu) == ["official", "default"]
    from mocobench.pretrain import train  # "default" resolves through training's own check: fp32 here too
    monkeypatch.setattr(train, "cpu_bf16_is_fast", lambda: False)
    timed = []
    real_peak = bp.matmul_peak
    monkeypatch.setattr(bp, "matmul_peak", lambda dtype, *a: timed.append(dtype) or real_peak(dtype, *a))
    assert main(["pretrain", "--arch", "resnet18_small", "--batch-size", "4", "--size", "16", "--rounds", "1",
                 "--steps", "1", "--warmup", "0", "--peak-sizes", "128", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    res = last_json(out)
    assert sorted(res["variants"]) == ["default", "official"] and "bf16 not measured" in out
    assert res["bf16_matmul_peak_tflop_s"] is None and timed == [torch.float32]
    assert all(v["fraction_of_bf16_peak"] is None and v["fraction_of_fp32_peak"] > 0 for v in res["variants"].values())


def test_step_flops_match_resnet50_published_count():
    """One MoCo step = query forward + backward (~2x forward) + key forward: ~4x the 4.09 GMAC forward
    (torchvision's published ResNet-50 cost), the backward of the first conv's input excepted."""
    from torchvision.models import ResNet50_Weights

    from mocobench.bench.pretrain import StepRunner, moco_v2_config, step_flops
    cfg = moco_v2_config("resnet50", batch_size=1, size=224)
    runner = StepRunner(cfg, amp=False, channels_last=False, device=torch.device("cpu"))
    per_image = step_flops(runner) / 1
    forward = 2 * ResNet50_Weights.IMAGENET1K_V1.meta["_ops"] * 1e9  # FLOPs = 2 x MACs
    assert per_image == pytest.approx(4 * forward, rel=0.04)


def test_official_and_fast_variants_compute_the_same_step():
    """The benchmark compares like with like: same model, inputs and loss; only precision/layout differ."""
    from mocobench.bench.pretrain import StepRunner, moco_v2_config
    cfg = moco_v2_config("resnet18_small", batch_size=4, size=16)
    cfg.moco_k = 64
    runs = [StepRunner(cfg, amp, cl, torch.device("cpu")) for amp, cl in ((False, False), (True, True))]
    logits = []
    for r in runs:
        torch.manual_seed(5)  # ShuffleBN's permutation
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=r.amp):
            im = [x.contiguous(memory_format=torch.channels_last) if r.channels_last else x for x in r.images]
            logits.append(r.model(*im, r.ids)[0].float())
    assert torch.corrcoef(torch.stack([logits[0].flatten(), logits[1].flatten()]))[0, 1] > 0.99
    assert all(math.isfinite(r.step()) for r in runs)
