"""`mocobench inspect CKPT` and `mocobench convert --to FMT IN OUT`: thin CLIs over mocobench.checkpoints.

Both read through `load_backbone` (safe by default; `--trust-checkpoint` opts into full unpickling).
The detectron2 output follows facebookresearch/moco detection/convert-pretrain-to-detectron2.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from mocobench.checkpoints.canonical import LoadedCheckpoint
from mocobench.checkpoints.convert import WRITE_FORMATS, convert
from mocobench.checkpoints.formats import load_backbone
from mocobench.checkpoints.models import model_from_checkpoint
from mocobench.checkpoints.safe_load import TRUST_FLAG
from mocobench.core.errors import CheckpointError

_FORMAT_HELP = ("moco (ours / facebookresearch/moco v1, v2), moco_v3 (ResNet, ViT), mmselfsup (ResNet, ViT), vissl, "
                "torchvision (ResNet, vit_*), timm (ResNet, ViT), mae, ddp (module.-prefixed SwAV/DINO/BYOL dumps; "
                "DINO ResNet and ViT), detectron2 (.pkl), random:ARCH[:WIDTH]")


def group_keys(keys: list[str], kept: list[str]) -> list[tuple[str, int]]:
    """Summarise dropped keys as the shortest dotted prefixes that contain no kept key, with counts."""
    kept_prefixes = {".".join(k.split(".")[:n]) for k in kept for n in range(1, k.count(".") + 2)}
    groups: Counter[str] = Counter()
    for key in keys:
        parts = key.split(".")
        n = next((n for n in range(1, len(parts) + 1) if ".".join(parts[:n]) not in kept_prefixes), len(parts))
        groups[".".join(parts[:n]) + (".*" if n < len(parts) else "")] += 1
    return sorted(groups.items())


def _summary(ckpt: LoadedCheckpoint) -> dict:
    return {"file": ckpt.source, "md5": ckpt.md5, "format": ckpt.format, "arch": ckpt.arch, "width": ckpt.width,
            "epoch": ckpt.epoch, "num_params": ckpt.num_params, "num_tensors": len(ckpt.state_dict),
            "has_fc": ckpt.has_fc, "head": sorted(ckpt.head), "kept": ckpt.kept, "dropped": ckpt.dropped,
            "meta": {k: v for k, v in ckpt.meta.items() if k != "config"}}


def _print_report(ckpt: LoadedCheckpoint, all_keys: bool) -> None:
    variant = ckpt.meta.get("moco_version")
    fmt = ckpt.format + (f" ({variant}{' MLP' if variant == 'v2' else ''} head)" if variant else "")
    fc = ("supervised classifier fc kept " + str(tuple(ckpt.state_dict["fc.weight"].shape)) if ckpt.has_fc
          else "none (evaluators re-initialise it)")
    rename = next(iter(ckpt.key_map.items()), None)
    print(f"file:        {ckpt.source}")
    print(f"md5:         {ckpt.md5[:8] or '-'}")
    print(f"format:      {fmt}")
    if "cls_token" in ckpt.state_dict:
        sd = ckpt.state_dict
        print(f"arch:        {ckpt.arch} (ViT: embed {sd['cls_token'].shape[-1]}, "
              f"{len({k.split('.')[1] for k in sd if k.startswith('blocks.')})} blocks, "
              f"patch {sd['patch_embed.proj.weight'].shape[-1]}, {sd['pos_embed'].shape[1]} positions)")
    else:
        print(f"arch:        {ckpt.arch} (width {ckpt.width})")
    print(f"epoch:       {ckpt.epoch if ckpt.epoch is not None else 'unknown'}")
    print(f"parameters:  {ckpt.num_params:,} ({ckpt.num_params / 1e6:.2f}M) in {len(ckpt.state_dict)} tensors")
    print(f"classifier:  {fc}")
    if ckpt.head:
        print(f"head:        {len(ckpt.head)} tensors set aside ({', '.join(sorted(ckpt.head))})")
    print(f"kept:        {len(ckpt.kept)} keys" + (f", e.g. {rename[0]} -> {rename[1]}" if rename else ""))
    print(f"dropped:     {len(ckpt.dropped)} keys")
    for group, count in group_keys(ckpt.dropped, ckpt.kept):
        print(f"  {group:<40} {count}")
    if all_keys:
        for src in ckpt.kept:
            print(f"  kept     {src} -> {ckpt.key_map[src]}")
        for src in ckpt.dropped:
            print(f"  dropped  {src}")


def _verify(args) -> int:
    from mocobench.checkpoints.verify import verify
    try:
        v = verify(args.checkpoint, args.verify_data, trust=args.trust)
    except CheckpointError as e:
        print(f"mocobench inspect: error: {e}", file=sys.stderr)
        return 2
    print(f"{v.checkpoint}: {v.arch} (width {v.width}); kNN top-1 (k=20) {v.knn_top1:.1f} % vs random init "
          f"{v.random_top1:.1f} %")
    for problem in v.problems:
        print(f"mocobench inspect: verify failed: {problem}", file=sys.stderr)
    print("verified" if v.ok else "NOT verified")
    return 0 if v.ok else 1


def inspect_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mocobench inspect",
        description="Detect a checkpoint's format and print its architecture, epoch, parameter count, md5 "
                    f"and which keys the canonical form (torchvision ResNet or timm ViT names) keeps or drops. Formats: {_FORMAT_HELP}.")
    parser.add_argument("checkpoint", help="checkpoint file (or random:ARCH[:WIDTH])")
    parser.add_argument(TRUST_FLAG, dest="trust", action="store_true",
                        help="allow arbitrary pickled objects (can run code: only for files you trust)")
    parser.add_argument("--keys", action="store_true", help="list every kept and dropped key")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--arch", default=None,
                        help="also check the weights load into this arch (reports differing shapes)")
    parser.add_argument("--width", type=int, default=None, help="width for --arch (small archs)")
    parser.add_argument("--verify", action="store_true",
                        help="pre-flight check: BN statistics loaded, and kNN on a small image slice beats the same "
                             "arch at random init (checkpoints/verify.py); exit 1 if not")
    parser.add_argument("--verify-data", default=None, metavar="ROOT",
                        help="ImageFolder root (train/ [+ val/]) for --verify (default: the embedded demo data)")
    args = parser.parse_args(argv)
    if args.verify:
        return _verify(args)
    try:
        if args.arch or args.width:
            _, ckpt = model_from_checkpoint(args.checkpoint, trust=args.trust, arch=args.arch, width=args.width)
        else:
            ckpt = load_backbone(args.checkpoint, trust=args.trust)
    except CheckpointError as e:
        print(f"mocobench inspect: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(_summary(ckpt), indent=2, default=str))
    else:
        _print_report(ckpt, args.keys)
    return 0


def convert_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mocobench convert",
        description="Convert a checkpoint of any supported format through the canonical form (torchvision "
                    "ResNet names; timm ViT names). --to torchvision: plain ResNet state dict (torchvision "
                    "load_state_dict, MMDetection init_cfg=dict(type='Pretrained', checkpoint=OUT)); --to timm: "
                    "plain state dict in timm's names (ResNets and ViTs); --to moco: our MoCo layout "
                    "(ResNets: module.encoder_q.*; ViTs: MoCo v3's module.base_encoder.* with config.arch); "
                    "--to detectron2: OUT.pkl for MODEL.WEIGHTS, with the rules of "
                    f"facebookresearch/moco's convert-pretrain-to-detectron2.py. Inputs: {_FORMAT_HELP}.")
    parser.add_argument("--to", required=True, choices=WRITE_FORMATS, help="output format")
    parser.add_argument("input", help="input checkpoint")
    parser.add_argument("output", help="output file (.pkl for detectron2)")
    parser.add_argument(TRUST_FLAG, dest="trust", action="store_true",
                        help="allow arbitrary pickled objects in the input (can run code)")
    parser.add_argument("--arch", default=None,
                        help="a ViT's arch where the file cannot tell its number of heads (e.g. vit_small_h12, MoCo "
                             "v3's 12-head ViT-S); checked against the weights' embed dim, depth and patch. With "
                             "--to moco the output records it, so every evaluator reads the ViT as this arch")
    args = parser.parse_args(argv)
    try:
        ckpt = convert(args.input, args.to, args.output, trust=args.trust, arch=args.arch)
    except CheckpointError as e:
        print(f"mocobench convert: error: {e}", file=sys.stderr)
        return 2
    written = len(ckpt.state_dict) + (len(ckpt.head) if args.to != "torchvision" else 0)
    print(f"{ckpt.source} ({ckpt.format}, {ckpt.arch} width {ckpt.width}, epoch "
          f"{ckpt.epoch if ckpt.epoch is not None else 'unknown'}) -> {args.output} ({args.to}, {written} tensors)")
    dropped = [k for k in ckpt.dropped if args.to == "torchvision" or ckpt.key_map.get(k) not in ckpt.head]
    if dropped:
        print(f"dropped {len(dropped)} keys: " + ", ".join(f"{g} ({n})" for g, n in group_keys(dropped, ckpt.kept)))
    if ckpt.head and args.to != "torchvision":
        print(f"projection head written too ({len(ckpt.head)} tensors), as the official MoCo converter does")
    return 0
