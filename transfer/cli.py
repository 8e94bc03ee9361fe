"""`mocobench transfer detectron2`: fine-tune a pre-trained backbone with a detectron2 recipe and write
metrics.json. The launching process converts the checkpoint and checks the datasets once, then
detectron2's `launch` starts one worker per GPU (transfer/train.py). See docs/transfer.md.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from mocobench.core.records import now_iso
from mocobench.core.run_folder import RUN_INDEPENDENT, claim
from mocobench.core.threads import fit_threads
from mocobench.transfer.recipes import RECIPES

INSTALL_HINT = "install it with: bash transfer/install_detectron2.sh .venv/bin/python (see docs/transfer.md)"


class TransferError(RuntimeError):
    """A bad input to the runner; the message says what was wrong and what was expected."""


def build_parser() -> argparse.ArgumentParser:
    recipes = "\n".join(f"  {r.name:12s} {r.summary}" for r in RECIPES.values())
    parser = argparse.ArgumentParser(prog="mocobench transfer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="detectron2")
    p = sub.add_parser("detectron2", help="Faster/Mask R-CNN transfer with detectron2",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Fine-tune a backbone with a detectron2 recipe; write OUT/metrics.json.",
                       epilog=f"recipes:\n{recipes}\n\nexample (8 GPUs):\n  mocobench transfer detectron2 "
                              "--recipe voc07-c4 --weights ckpt/checkpoint_0199.pth.tar --out runs/voc/t0 "
                              "--data-root datasets --num-gpus 8 --trial 0")
    p.add_argument("--recipe", required=True, choices=list(RECIPES), help="transfer recipe (see below)")
    p.add_argument("--weights", required=True,
                   help="pre-trained checkpoint in any format `mocobench inspect` reads (MoCo, torchvision, "
                        "detectron2 .pkl, ...), random:ARCH for a random-init backbone, or 'none' (detectron2's init)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow full unpickling of --weights (only for files you trust; default: weights only)")
    p.add_argument("--out", required=True, type=Path, help="output dir: metrics.json, weights/, detectron2/")
    p.add_argument("--data-root", default=os.environ.get("DETECTRON2_DATASETS", "datasets"), type=Path,
                   help="folder holding VOC2007/ and VOC2012/ (or VOCdevkit/VOC20xx/) and/or coco/ "
                        "(default: $DETECTRON2_DATASETS or ./datasets)")
    p.add_argument("--trial", type=int, default=0, help="trial index; also the random seed")
    p.add_argument("--num-gpus", type=int, default=None,
                   help="GPUs per machine, 0 = CPU: one process per machine, gloo (default: all visible)")
    p.add_argument("--num-machines", type=int, default=1, help="machines in a multi-node job")
    p.add_argument("--machine-rank", type=int, default=0, help="rank of this machine in a multi-node job")
    p.add_argument("--dist-url", default="auto",
                   help="torch.distributed init URL, tcp://HOST:PORT of machine 0 (the same on every machine); "
                        "'auto' = free local port (single machine only)")
    p.add_argument("--linear-scaling", action="store_true",
                   help="on fewer (or more) than 8 GPUs, keep 2 images per GPU and scale lr and iterations linearly "
                        "off the 8-GPU reference (detectron2 REFERENCE_WORLD_SIZE 8); default: the reference's "
                        "batch 16 and lr 0.02 at any GPU count")
    p.add_argument("--resume", action="store_true", help="resume from OUT/detectron2/last_checkpoint")
    p.add_argument("--force", action="store_true",
                   help="start afresh when --out holds another run: move the old folder aside to OUT.replaced-<time>")
    p.add_argument("--eval-only", action="store_true",
                   help="only evaluate (the last checkpoint in OUT/detectron2, else --weights)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny CPU-sized settings (transfer/configs/smoke.yaml): a few iterations at 128 px")
    p.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                   help="detectron2 config overrides, e.g. SOLVER.MAX_ITER 1000 (applied last)")
    return parser


def _visible_gpus() -> int:
    try:
        import torch
        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable CUDA means CPU
        return 0


_ARCH = re.compile(r"^(wide_)?resnet(50|101|152)(_2)?$")


def model_opts_for(arch: str) -> list[str]:
    """detectron2 ResNet options matching a torchvision arch (the recipes are R50; R101/152 and wide
    bottleneck ResNets map to DEPTH / WIDTH_PER_GROUP)."""
    m = _ARCH.match(arch)
    if not m:
        raise TransferError(f"backbone {arch!r} cannot be used by detectron2's R-CNN: expected a standard-stem "
                            "bottleneck ResNet (resnet50/101/152, wide_resnet50_2/101_2)"
                            + ("; ViT detection is not included (docs/transfer.md)" if arch.startswith("vit_") else ""))
    opts = ["MODEL.RESNETS.DEPTH", int(m.group(2))]
    if m.group(1):
        opts += ["MODEL.RESNETS.WIDTH_PER_GROUP", 128]
    return opts


def prepare_weights(weights: str, out_dir: Path, trust: bool = False) -> tuple[str, dict, list]:
    """Convert `weights` to a detectron2 .pkl in OUT/weights/ through the checkpoints layer (any format it
    reads, or `random:ARCH`; official MoCo conversion rules). 'none' means detectron2's own random init.

    Returns (detectron2 weights path or "", {"checkpoint", "checkpoint_md5", "format", "arch"}, model opts).
    """
    if weights.lower() == "none":
        return "", {"checkpoint": None, "checkpoint_md5": None, "format": "none", "arch": None}, []
    from mocobench.checkpoints.convert import write_loaded
    from mocobench.checkpoints.formats import load_backbone
    from mocobench.checkpoints.random_init import parse_random_spec

    is_file = parse_random_spec(weights) is None
    src = Path(weights).expanduser()
    if is_file and not src.is_file():
        raise TransferError(f"--weights {weights}: no such file (give a checkpoint, random:ARCH, or 'none')")
    ckpt = load_backbone(src if is_file else weights, trust=trust)
    model_opts_for(ckpt.arch)  # a ViT or small ResNet: say so before anything is written
    dst = out_dir / "weights" / ((src.name.split(".")[0] if is_file else weights.replace(":", "_")) + ".pkl")
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_loaded(ckpt, "detectron2", dst)  # atomic write
    source = {"checkpoint": str(src.resolve()) if is_file else None, "checkpoint_md5": ckpt.md5 or None,
              "format": ckpt.format, "arch": ckpt.arch}
    return str(dst), source, model_opts_for(ckpt.arch)


def prepare(args: argparse.Namespace):
    """Check the inputs, claim --out, convert the weights and register the datasets once; return the RunSpec
    (None when --out holds this run finished already).

    Every problem found here is a TransferError / DatasetLayoutError / ValueError with a message
    naming the bad input; errors during training itself propagate with their traceback.
    """
    try:
        import detectron2  # noqa: F401
    except ImportError:
        raise TransferError(f"detectron2 is not installed; {INSTALL_HINT}") from None
    from mocobench.transfer.datasets import register_datasets
    from mocobench.transfer.train import RunSpec, build_cfg

    if args.num_gpus is None:
        args.num_gpus = _visible_gpus()
    if len(args.opts) % 2:
        raise TransferError(f"config overrides must be KEY VALUE pairs, got {args.opts}")
    if args.num_gpus < 0 or args.num_machines < 1:
        raise TransferError("--num-gpus must be >= 0 and --num-machines >= 1")
    if not 0 <= args.machine_rank < args.num_machines:
        raise TransferError(f"--machine-rank {args.machine_rank}: expected 0 .. {args.num_machines - 1} "
                            f"(--num-machines {args.num_machines})")
    if args.num_machines > 1 and not args.dist_url.startswith("tcp://"):
        raise TransferError(f"--dist-url {args.dist_url!r}: a multi-machine job needs tcp://HOST:PORT of machine 0")
    if args.num_gpus > _visible_gpus():
        raise TransferError(f"--num-gpus {args.num_gpus} but {_visible_gpus()} CUDA devices are visible")
    start = now_iso()
    out = args.out.expanduser().resolve()
    identity = {"recipe": args.recipe, "weights": args.weights, "data_root": str(args.data_root), "trial": args.trial,
                "smoke": args.smoke, "linear_scaling": args.linear_scaling, "opts": list(args.opts)}
    # --resume / --eval-only continue or re-evaluate the detectron2 run in OUT (detectron2's own workflow,
    # e.g. resume with a larger SOLVER.MAX_ITER): its overrides may change; the record keeps the final ones
    continuing = args.resume or args.eval_only
    held = claim(out, stage="transfer", benchmark=args.recipe, config=identity, force=args.force,
                 write=args.machine_rank == 0, ignore=RUN_INDEPENDENT | ({"opts"} if continuing else set()))
    if held.finished is not None and not continuing:
        return None
    weights, source, model_opts = prepare_weights(args.weights, out, trust=args.trust_checkpoint)
    spec = RunSpec(recipe=args.recipe, out_dir=str(out), data_root=str(args.data_root.expanduser().resolve()),
                   start=start, weights=weights, weights_spec=args.weights, checkpoint=source["checkpoint"],
                   checkpoint_md5=source["checkpoint_md5"], weights_format=source["format"],
                   model_opts=model_opts, trial=args.trial,
                   smoke=args.smoke, resume=args.resume, eval_only=args.eval_only, num_gpus=args.num_gpus,
                   linear_scaling=args.linear_scaling,
                   opts=list(args.opts), run_id=held.run_id)
    try:
        cfg = build_cfg(spec)  # resolves the dataset names after --smoke and the opts
    except (KeyError, AssertionError) as e:  # yacs: unknown key / bad value type
        raise TransferError(f"bad detectron2 config override in {args.opts}: {e}") from None
    spec.classes = register_datasets(list(cfg.DATASETS.TRAIN), list(cfg.DATASETS.TEST), spec.data_root)
    if cfg.MODEL.KEYPOINT_ON:
        from detectron2.data import MetadataCatalog
        spec.keypoints = list(MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("keypoint_names", []))
        if not spec.keypoints:
            raise TransferError(f"{cfg.DATASETS.TRAIN[0]}: a keypoint recipe needs a dataset with keypoint names")
    fit_threads(cfg.DATALOADER.NUM_WORKERS)  # CPU runs train in this process; GPU workers inherit the limit
    return spec


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        spec = prepare(args)
    except (TransferError, FileNotFoundError, ValueError) as e:
        print(f"mocobench transfer: error: {e}", file=sys.stderr)
        return 2
    if spec is None:
        print(f"mocobench transfer: already done with these options -> {args.out / 'metrics.json'}; nothing to do "
              "(--force runs it again)")
        return 0
    from detectron2.engine import launch

    from mocobench.transfer.train import run

    launch(run, max(args.num_gpus, 1), num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(spec,))
    if args.machine_rank == 0:
        print(f"mocobench transfer: wrote {Path(spec.out_dir) / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
