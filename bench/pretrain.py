"""`mocobench bench pretrain`: throughput of one MoCo v2 training step (ResNet-50, batch 32) in the official
recipe (fp32, NCHW, no autocast: `PretrainConfig(amp=False, channels_last=False)`) against the project's
default fast path (`PretrainConfig()`'s amp / channels_last), interleaved round by round in one process.

The step is the one of `mocobench.pretrain.train.run` (model from `mocobench.pretrain.train.build_moco`, SGD, cross-entropy on
MoCo's logits, autocast bf16 on CPU / fp16-bf16 on GPU when amp is on) on synthetic image tensors, so data
loading is not timed (`mocobench bench loader` measures that). Batch 32 is one GPU's share of the official
8-GPU batch 256, so the step runs as one rank: one BN group (ShuffleBN still shuffles the batch).

Also printed: the model FLOP/s of each variant (FLOPs of one step counted by torch's FlopCounterMode:
query forward + backward, key forward) against this machine's bf16 and fp32 matmul peaks, measured in the
same rounds so load drift affects all figures alike.

    mocobench bench pretrain             # 224 px, 5 rounds of 2 steps per variant
    mocobench bench pretrain --quick     # 64 px, 3 rounds
    mocobench bench pretrain --variants official,fast,fp32-cl,bf16-nchw
    mocobench bench pretrain --quick --variants official,fp32-cl-compile     # candidate: torch.compile
"""
from __future__ import annotations

import argparse
import dataclasses

import torch
from torch.utils.flop_counter import FlopCounterMode

from mocobench.bench.timing import emit, interleaved, median, paired_ratio, peak_rss_mib, rate
from mocobench.core.config import apply_overrides, load_yaml
from mocobench.core.distributed import amp_dtype
from mocobench.pretrain.train import (CONFIG_DIR, PretrainConfig, build_moco, cpu_bf16_is_fast, resolve_fast_path,
                                      train_step)

TARGET_RATIO = 2.5
TARGET_PEAK_FRACTION = 0.75


def bench_device(name: str | None = None) -> torch.device:
    """The device `--device` names, else CUDA when available, else the CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


# What `mocobench pretrain` uses by default on this machine at 224 px (the "default" variant resolves it for the
# benchmark's image size: the fast path only where bf16 is fast here, channels_last from 128 px on CPUs).
_DEFAULTS = resolve_fast_path(PretrainConfig(), bench_device())
# name -> (amp, channels_last, torch.compile of the encoders); "fast" is the project's fast path (bf16 +
# channels_last), "default" what training resolves to here (see mocobench.pretrain.train.cpu_bf16_is_fast).
# The *-compile variants are candidates (mocobench.pretrain.train has no compile option): compiling takes minutes.
VARIANTS = {"official": (False, False, False), "fast": (True, True, False),
            "fp32-cl": (False, True, False), "bf16-nchw": (True, False, False),
            "fp32-cl-compile": (False, True, True), "fast-compile": (True, True, True),
            "default": (_DEFAULTS.amp, _DEFAULTS.channels_last, False)}


def moco_v2_config(arch: str, batch_size: int, size: int) -> PretrainConfig:
    """The shipped `moco_v2` recipe at one rank's batch, as a single BN group."""
    cfg = apply_overrides(PretrainConfig(), load_yaml("moco_v2", CONFIG_DIR), source="moco_v2")
    return dataclasses.replace(cfg, arch=arch, batch_size=batch_size, image_size=size, bn_groups=1)


class StepRunner:
    """One variant: its own model and optimizer, and the training step of mocobench.pretrain.train.run."""

    def __init__(self, cfg: PretrainConfig, amp: bool, channels_last: bool, device: torch.device, seed: int = 0,
                 compile: bool = False):
        torch.manual_seed(seed)
        self.cfg, self.amp, self.channels_last, self.device = cfg, amp, channels_last, device
        self.model = build_moco(cfg, world=1).to(device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if compile:  # in place (Module.compile keeps state_dict keys); MoCo's queue/shuffle stay eager
            self.model.encoder_q.compile()
            self.model.encoder_k.compile()
        self.model.train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp and amp_dtype(device) == torch.float16)
        self.step_cfg = dataclasses.replace(cfg, amp=amp, channels_last=channels_last)
        gen = torch.Generator().manual_seed(seed)
        shape = (cfg.batch_size, 3, cfg.image_size, cfg.image_size)
        self.images = [torch.randn(shape, generator=gen).to(device) for _ in range(2)]
        self.ids = torch.arange(cfg.batch_size, device=device)

    def step(self) -> float:
        loss, _ = train_step(self.model, self.optimizer, self.scaler, *self.images, self.ids, self.step_cfg)
        return loss.item()  # also synchronises the device

    def steps(self, n: int) -> int:
        for _ in range(n):
            self.step()
        return n * self.cfg.batch_size


def step_flops(runner: StepRunner) -> int:
    """FLOPs of one training step (convolutions and matmuls, forward and backward), counted by torch."""
    with FlopCounterMode(display=False) as counter:
        runner.step()
    return counter.get_total_flops()


def matmul_peak(dtype: torch.dtype, device: torch.device, sizes=(1024, 2048), reps: int = 3) -> float:
    """Best FLOP/s of square matmuls in `dtype` (the machine's practical peak for that dtype)."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        (a @ b).sum().item()  # warm-up

        def run() -> int:
            for _ in range(reps):
                c = a @ b
            c[0, 0].item()
            return reps * 2 * n ** 3

        best = max(best, rate(run))
    return best


def cpu_features() -> dict:
    """What bf16 runs on: without AMX tiles, bf16 dot products (avx512_bf16) give no more FLOPs than fp32 FMA."""
    cpu = torch.cpu
    return {"cpu_amx": bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)()),
            "cpu_avx512_bf16": bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)())}


def _sig(x: float, digits: int = 4) -> float:
    """x to `digits` significant digits: rates span 1e-4..1 TFLOP/s across CPUs (bf16 without bf16 hardware
    runs at ~0.001), where a fixed number of decimals would lose the small ones."""
    return float(f"{x:.{digits}g}")


def bf16_is_fast(dev: torch.device) -> bool:
    """Whether bf16 has hardware behind it here: GPUs, and CPUs where training turns autocast on."""
    return dev.type == "cuda" or (dev.type == "cpu" and cpu_bf16_is_fast())


def default_variants(dev: torch.device) -> list[str]:
    """`official,fast` where bf16 is fast; elsewhere `official,default` (training's own fp32 choice): bf16
    emulated in software (1.2 GFLOP/s for matmuls on an AVX2-only AMD EPYC) makes a `fast` round take
    minutes and measures nothing training would run."""
    return ["official", "fast"] if bf16_is_fast(dev) else ["official", "default"]


def run(variants: list[str], arch: str = "resnet50", batch_size: int = 32, size: int = 224, rounds: int = 5,
        steps: int = 2, warmup: int = 2, device: str | None = None, peak_sizes=(1024, 2048)) -> dict:
    dev = bench_device(device)
    cfg = moco_v2_config(arch, batch_size, size)
    default = resolve_fast_path(dataclasses.replace(cfg, amp=None, channels_last=None), dev)
    table = {**VARIANTS, "default": (default.amp, default.channels_last, False)}
    runners = {}
    for name in variants:
        amp, cl, comp = table[name]
        runners[name] = StepRunner(cfg, amp, cl, dev, compile=comp)
        for _ in range(max(warmup, 1 if comp else 0)):  # the first compiled step compiles
            runners[name].step()
    # the same model and math in every variant: count on an eager one (compiled kernels are not seen)
    eager = next((runners[n] for n in variants if not table[n][2]), None)
    per_step = step_flops(eager or StepRunner(cfg, False, False, dev))
    flops = {name: per_step for name in variants}
    timed = {name: (lambda r=r: rate(lambda: r.steps(steps))) for name, r in runners.items()}
    # the bf16 peak only where bf16 runs in hardware or a variant uses it (emulated, 2048^3 takes ~15 s)
    with_bf16 = bf16_is_fast(dev) or any(table[n][0] for n in variants)
    if with_bf16:
        timed["bf16_peak"] = lambda: matmul_peak(torch.bfloat16, dev, peak_sizes)
    timed["fp32_peak"] = lambda: matmul_peak(torch.float32, dev, peak_sizes)
    rates = interleaved(timed, rounds)
    img_s = {name: median(rates[name]) for name in variants}
    bf16_peak = median(rates["bf16_peak"]) if with_bf16 else None
    fp32_peak = median(rates["fp32_peak"])
    result = {"benchmark": "pretrain", "device": str(dev), "threads": torch.get_num_threads(), **cpu_features(),
              "arch": arch,
              "batch_size": batch_size, "image_size": size, "rounds": rounds, "steps_per_round": steps,
              "variants": {name: {"amp": table[name][0], "channels_last": table[name][1],
                                  "compile": table[name][2],
                                  "img_s": _sig(img_s[name]),
                                  "gflop_per_img": _sig(flops[name] / batch_size / 1e9),
                                  "tflop_s": _sig(img_s[name] * flops[name] / batch_size / 1e12)}
                           for name in variants},
              "bf16_matmul_peak_tflop_s": _sig(bf16_peak / 1e12) if with_bf16 else None,
              "fp32_matmul_peak_tflop_s": _sig(fp32_peak / 1e12),
              "peak_rss_mib": round(peak_rss_mib(), 1)}
    if "official" in variants:  # every variant against the official recipe, paired by round
        for name in variants:
            result["variants"][name]["speedup_vs_official"] = _sig(paired_ratio(rates[name], rates["official"]))
    for name in variants:  # per round: model FLOP/s over the peak measured next to it
        v, model_flops = result["variants"][name], [r * flops[name] / batch_size for r in rates[name]]
        v["fraction_of_bf16_peak"] = _sig(paired_ratio(model_flops, rates["bf16_peak"])) if with_bf16 else None
        v["fraction_of_fp32_peak"] = _sig(paired_ratio(model_flops, rates["fp32_peak"]))
    if "official" in variants and "fast" in variants:
        ratio = paired_ratio(rates["fast"], rates["official"])
        frac = result["variants"]["fast"]["fraction_of_bf16_peak"]
        result |= {"official_img_s": _sig(img_s["official"]), "fast_img_s": _sig(img_s["fast"]),
                   "ratio": _sig(ratio), "fast_fraction_of_bf16_peak": frac,
                   "round_ratios": [_sig(a / b) for a, b in zip(rates["fast"], rates["official"])],
                   "target_ratio": TARGET_RATIO, "target_peak_fraction": TARGET_PEAK_FRACTION,
                   "meets_target": bool(ratio >= TARGET_RATIO and frac >= TARGET_PEAK_FRACTION)}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mocobench bench pretrain", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 px images, 3 rounds")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated, from {', '.join(VARIANTS)} (fast = bf16 + channels_last; default = "
                             f"what training resolves to here, at 224 px amp={_DEFAULTS.amp}, "
                             f"channels_last={_DEFAULTS.channels_last}); unset: official,fast where bf16 is fast, "
                             f"else official,default")
    parser.add_argument("--arch", default="resnet50", help="backbone (mocobench.core.backbones name)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step (one rank's share)")
    parser.add_argument("--size", type=int, default=None, help="image size (default 224, quick 64)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5, quick 3)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--peak-sizes", default="1024,2048", help="square matmul sizes for the peak (best is kept)")
    args = parser.parse_args(argv)
    variants = ([v.strip() for v in args.variants.split(",") if v.strip()] if args.variants is not None
                else default_variants(bench_device(args.device)))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    size = args.size or (64 if args.quick else 224)
    rounds = args.rounds or (3 if args.quick else 5)
    print(f"pretrain benchmark: MoCo v2 {args.arch}, batch {args.batch_size}, {size} px, {rounds} interleaved "
          f"rounds of {args.steps} steps, {torch.get_num_threads()} threads; variants {', '.join(variants)}",
          flush=True)
    peak_sizes = [int(n) for n in args.peak_sizes.split(",") if n.strip()]
    res = run(variants, args.arch, args.batch_size, size, rounds, args.steps, args.warmup, args.device, peak_sizes)
    for name, v in res["variants"].items():
        print(f"{name:15s} amp={str(v['amp']):5s} channels_last={str(v['channels_last']):5s} "
              f"compile={str(v['compile']):5s} "
              f"{v['img_s']:9.2f} img/s  {v['tflop_s'] * 1e3:8.1f} GFLOP/s  "
              + (f"{v['fraction_of_bf16_peak']:.2f} of bf16 peak, " if v["fraction_of_bf16_peak"] is not None else "")
              + f"{v['fraction_of_fp32_peak']:.2f} of fp32 peak"
              + (f", {v['speedup_vs_official']:.2f}x official" if "speedup_vs_official" in v else ""))
    print(f"CPU: AMX tiles {'yes' if res['cpu_amx'] else 'no'}, avx512_bf16 {'yes' if res['cpu_avx512_bf16'] else 'no'}")
    bf16 = (f"bf16 {res['bf16_matmul_peak_tflop_s'] * 1e3:.1f} GFLOP/s" if res["bf16_matmul_peak_tflop_s"] is not None
            else "bf16 not measured (no variant uses it and it is not fast here)")
    print(f"matmul peak: {bf16}, fp32 {res['fp32_matmul_peak_tflop_s'] * 1e3:.1f} GFLOP/s (measured in the same rounds)")
    if "ratio" in res:
        print(f"fast / official (median of rounds): {res['ratio']:.3f}x (target >= {TARGET_RATIO}x); fast at "
              f"{res['fast_fraction_of_bf16_peak']:.2f} of bf16 peak (target >= {TARGET_PEAK_FRACTION}): "
              f"{'met' if res['meets_target'] else 'NOT met'}")
    emit(res)
    return 0
