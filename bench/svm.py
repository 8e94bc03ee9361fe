"""`mocobench bench svm`: an SVM protocol solved by sklearn's LinearSVC, the reference VISSL / MMSelfSup use,
against the batched torch solver (evaluate/svm_solver.py), on the same features: wall time of each run end to
end, the speedup, |delta mAP| and the largest |delta AP|, and each run's peak RSS.

`--protocol voc07` (default, evaluate/svm.py): normalisation, 3-fold CV over every class x cost, final fits,
test AP. `--protocol lowshot` (evaluate/lowshot.py): 5 samples x every k x every class x cost, test mAP, the
cost chosen per k by the mean test mAP (VISSL's `aggregate_stats`); |delta mAP| is then the largest over k of
the reported means, and |delta AP| the largest over every (k, sample, cost) mAP.

Each solver runs in its own fresh process (spawned), so its peak RSS is its own and thread settings do not
leak; `--threads N` gives both the same cores (torch intra-op threads; sklearn N LinearSVC fits in parallel
threads, as VISSL runs one thread per class). Default 1: the cleanest like-for-like comparison. Times are
end to end, as a user running the protocol on a features file sees them: from the process' start, through
its imports and the load of the features file (synthetic data is written to a temporary one first), to
its result; the protocol's own time is printed beside.

    mocobench bench svm --quick                      # 1000 / 1000 images, 1024-d, 20 classes (minutes)
    mocobench bench svm --quick --protocol lowshot   # the same data, k = 1..32 (VOC07 size: 1..96)
    mocobench bench svm                              # VOC07 shape: 5011 / 4952 images, 8192-d (sklearn: hours)
    mocobench bench svm --features runs/feat/features.npz --solvers torch   # real cached features
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import numpy as np

from mocobench.bench.timing import emit

# images per class in VOC2007 trainval (of 5011), the class balance the synthetic data copies
VOC07_TRAINVAL_COUNTS = (238, 243, 330, 181, 244, 186, 713, 337, 445, 141, 200, 421, 287, 245, 2008, 245, 96,
                         229, 261, 256)
VOC07_SHAPE = {"n_train": 5011, "n_test": 4952, "dim": 8192, "classes": 20}
QUICK_SHAPE = {"n_train": 1000, "n_test": 1000, "dim": 1024, "classes": 20}
DIFFICULT = 0.08  # fraction of the synthetic positives marked difficult (-1), about VOC07's
# low-shot k values: VISSL's all at VOC07 size; --quick stops where its rarest class runs out of positives
QUICK_K_VALUES = (1, 2, 4, 8, 16)


def synthetic_voc(n_train: int, n_test: int, dim: int, classes: int = 20, seed: int = 0,
                  difficult: float = DIFFICULT, signal: float | None = None, min_count: int = 0) -> dict[str, np.ndarray]:
    """VOC07-like multi-label features: non-negative (post-ReLU) float32 vectors that share a strong common
    direction and a low-rank nuisance, plus one prototype per present class; VOC07 class frequencies;
    a fraction `difficult` of the positives marked -1. Labels are N x C in {1, 0, -1}. The default class
    signal, 0.45 sqrt(1024 / dim), keeps the class separation (and so the mAP, ~85 with 1000 train images)
    independent of the dimension. `min_count` raises the rarest classes' frequencies so that about that many
    train images are positive (low-shot k = 96 needs 96 non-difficult positives; VOC07's rarest has 96)."""
    rng = np.random.default_rng(seed)
    signal = 0.45 * np.sqrt(1024 / dim) if signal is None else signal
    freq = np.array([max(VOC07_TRAINVAL_COUNTS[c % 20] / 5011, min_count / n_train) for c in range(classes)])
    protos = rng.gamma(0.5, 1.0, size=(classes, dim)) * (rng.random((classes, dim)) < 0.3)
    rank = 64
    loading = rng.normal(size=(rank, dim)) / np.sqrt(np.arange(1, rank + 1))[:, None]
    base = rng.gamma(2.0, 0.5, size=dim)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        y = (rng.random((n, classes)) < freq).astype(np.int8)
        x = base + signal * (y @ protos) + 0.5 * rng.normal(size=(n, rank)) @ loading + rng.normal(size=(n, dim))
        y[(y == 1) & (rng.random(y.shape) < difficult)] = -1
        out[f"{split}_feats"] = np.maximum(x, 0).astype(np.float32)
        out[f"{split}_labels"] = y
    return out


def _protocol_result(protocol: str, data: dict, so, lowshot: dict) -> dict:
    """Run one protocol; the figures both solvers are compared on (percent)."""
    if protocol == "lowshot":
        from mocobench.evaluate.lowshot import lowshot_svm
        res = lowshot_svm(data["train_feats"], data["train_labels"], data["test_feats"], data["test_labels"], so,
                          lowshot["k_values"], lowshot["samples"], progress=False)
        summary = res.summary("test")
        return {"protocol_seconds": {"total": res.seconds}, "solver": res.solver,
                "mAP": float(np.mean([row["mean"] for row in summary.values()])),
                "per_k": {f"k{k}": row["mean"] for k, row in summary.items()},
                "chosen": [row["cost"] for row in summary.values()],
                "test_ap": np.concatenate([100 * m.ravel() for m in res.test_map.values()]).tolist()}
    from mocobench.evaluate.svm import voc07_svm
    res = voc07_svm(data["train_feats"], data["train_labels"], data["test_feats"], data["test_labels"], so,
                    progress=False)
    return {"protocol_seconds": res.seconds, "solver": res.solver, "mAP": 100 * res.mAP,
            "test_ap": (100 * res.test_ap).tolist(), "chosen": res.chosen.tolist(), "cv_ap": res.cv_ap.tolist()}


def _run_variant(conn, solver: str, data_spec: dict, opts: dict, threads: int, protocol: str = "voc07",
                 lowshot: dict | None = None) -> None:
    """Child process: load the features file, run the whole protocol with one solver, report back."""
    try:
        from mocobench.evaluate.feature_file import load_features
        from mocobench.evaluate.report import peak_rss_mb
        from mocobench.evaluate.svm import SVMSolverOptions
        from mocobench.evaluate.svm_process import configure_svm_process
        so = SVMSolverOptions(solver=solver, n_jobs=max(1, threads), threads=max(1, threads), **opts)
        configure_svm_process(so.solver, so.device, so.threads, so.blas)  # this process is the entry point
        t0 = time.perf_counter()
        fs = load_features(data_spec["features"])
        data = {"train_feats": fs.train_feats, "train_labels": fs.train_labels, "test_feats": fs.test_feats,
                "test_labels": fs.test_labels}
        t1 = time.perf_counter()
        out = _protocol_result(protocol, data, so, lowshot or {})
        conn.send({"load_seconds": t1 - t0, "run_seconds": time.perf_counter() - t1, **out,
                   "peak_rss_mib": peak_rss_mb()["self"]})
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        conn.send({"error": f"{type(e).__name__}: {e}"})
    finally:
        conn.close()


def run_variant(solver: str, data_spec: dict, opts: dict, threads: int, protocol: str = "voc07",
                lowshot: dict | None = None) -> dict:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_run_variant, args=(child, solver, data_spec, opts, threads, protocol, lowshot))
    t0 = time.perf_counter()
    proc.start()
    child.close()
    try:
        result = parent.recv()
    except EOFError:  # the child died without reporting (killed, out of memory)
        proc.join()
        raise RuntimeError(f"svm bench: the {solver} run exited with code {proc.exitcode} without a result") from None
    seconds = time.perf_counter() - t0  # end to end: process start, imports, feature load, protocol
    proc.join()
    if "error" in result:
        raise RuntimeError(f"svm bench: the {solver} run failed: {result['error']}")
    return {"seconds": seconds, "start_seconds": seconds - result["load_seconds"] - result["run_seconds"], **result}


def compare(ref: dict, new: dict) -> dict:
    """|delta mAP|, the largest per-class |delta AP| (percent points) and how many chosen costs differ.

    Low-shot: |delta mAP| is the largest over k of the reported (mean over samples) mAPs."""
    a, b = np.array(ref["test_ap"], dtype=float), np.array(new["test_ap"], dtype=float)
    out = {"abs_delta_mAP": abs(ref["mAP"] - new["mAP"]), "max_abs_delta_AP": float(np.nanmax(np.abs(a - b))),
           "chosen_cost_differs": int(np.sum(np.array(ref["chosen"]) != np.array(new["chosen"])))}
    if "per_k" in ref:
        out["abs_delta_mAP"] = max(abs(ref["per_k"][k] - new["per_k"][k]) for k in ref["per_k"])
    if "cv_ap" in ref:
        out["max_abs_delta_cv_AP"] = float(np.nanmax(np.abs(np.array(ref["cv_ap"]) - np.array(new["cv_ap"]))))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mocobench bench svm", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller synthetic problem (1000/1000 images, 1024-d)")
    parser.add_argument("--protocol", default="voc07", choices=("voc07", "lowshot"), help="which SVM protocol")
    parser.add_argument("--k-values", default="", help="low-shot k values (default 1..96 as VISSL; quick 1..16)")
    parser.add_argument("--samples", type=int, default=5, help="low-shot samples per k")
    parser.add_argument("--features", default="", help="a features .npz to use instead of synthetic data")
    parser.add_argument("--n-train", type=int, default=None, help="synthetic train images (default 5011, quick 1000)")
    parser.add_argument("--n-test", type=int, default=None, help="synthetic test images (default 4952, quick 1000)")
    parser.add_argument("--dim", type=int, default=None, help="synthetic feature dim (default 8192, quick 1024)")
    parser.add_argument("--classes", type=int, default=None, help="synthetic classes (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    parser.add_argument("--costs", default="", help="comma-separated costs (default VISSL's 11)")
    parser.add_argument("--solvers", default="sklearn,torch", help="which to run (in this order); sklearn is the reference")
    parser.add_argument("--precision", default="mixed", help="torch solver precision: mixed or float64")
    parser.add_argument("--device", default="cpu", help="torch solver device: cpu, cuda, auto")
    parser.add_argument("--threads", type=int, default=1, help="cores for each solver (see above)")
    parser.add_argument("--blas", default="auto", choices=("auto", "torch", "openblas"),
                        help="torch solver's CPU linear algebra: auto (OpenBLAS on AMD CPUs, else torch's MKL), "
                             "torch or openblas (evaluate/blas.py)")
    args = parser.parse_args(argv)

    solvers = [s.strip() for s in args.solvers.split(",") if s.strip()]
    if not solvers or any(s not in ("torch", "sklearn") for s in solvers):
        parser.error(f"--solvers takes torch and/or sklearn, got {args.solvers!r}")
    opts = {"precision": args.precision, "device": args.device, "blas": args.blas}
    if args.costs:
        try:
            opts["costs"] = [float(c) for c in args.costs.split(",")]
        except ValueError:
            parser.error(f"--costs must be comma-separated numbers, got {args.costs!r}")
    if args.features:
        if not Path(args.features).is_file():
            parser.error(f"--features {args.features}: no such file")
        features, what = args.features, f"features {args.features}"
    else:
        shape = dict(QUICK_SHAPE if args.quick else VOC07_SHAPE)
        shape.update({k: v for k, v in (("n_train", args.n_train), ("n_test", args.n_test), ("dim", args.dim),
                                        ("classes", args.classes)) if v is not None})
        synthetic = {**shape, "seed": args.seed}
        what = (f"synthetic VOC07-like features: {shape['n_train']} train / {shape['n_test']} test, {shape['dim']}-d, "
                f"{shape['classes']} classes")
    n_costs = len(opts.get("costs", ())) or 11
    lowshot = None
    if args.protocol == "lowshot":
        from mocobench.evaluate.lowshot import K_VALUES
        try:
            k_values = [int(k) for k in args.k_values.split(",")] if args.k_values else \
                list(QUICK_K_VALUES if args.quick else K_VALUES)
        except ValueError:
            parser.error(f"--k-values must be comma-separated integers, got {args.k_values!r}")
        lowshot = {"k_values": k_values, "samples": args.samples}
        if not args.features:  # enough non-difficult positives for the largest k, with a margin
            synthetic["min_count"] = int(1.25 * max(k_values) / (1 - DIFFICULT)) + 1
        plan = f"low-shot k={','.join(map(str, k_values))} x {args.samples} samples x {n_costs} costs"
    else:
        plan = f"VOC07 protocol, {n_costs} costs x 3 folds"
    print(f"svm bench: {what}; {plan}; {args.threads} thread(s) per solver", flush=True)

    results = {}
    with tempfile.TemporaryDirectory(prefix="mocobench-bench-svm-") as tmp:
        if not args.features:  # the data a user would have: a features file, written once for both solvers
            from mocobench.evaluate.feature_file import write_npz
            features = str(write_npz(Path(tmp) / "features.npz", synthetic_voc(**synthetic)))
        for name in solvers:
            results[name] = run_variant(name, {"features": features}, opts, args.threads, args.protocol, lowshot)
    for name, res in results.items():
        parts = (f"start + imports {res['start_seconds']:.1f} s, features {res['load_seconds']:.1f} s, protocol "
                 f"{res['run_seconds']:.1f} s: " + ", ".join(f"{k.replace('_', '-')} {v:.1f} s"
                                                            for k, v in res["protocol_seconds"].items()))
        extra = ""
        if "per_k" in res:
            extra += "; mAP per k " + " ".join(f"{k} {v:.2f}" for k, v in res["per_k"].items())
        if res["solver"]:
            extra += f", {res['solver']['newton_iters']} Newton / {res['solver']['cg_iters']} CG steps"
        label = (f"torch ({args.precision}, {args.device}, BLAS {res['solver'].get('blas', 'torch')})" if name == "torch"
                 else "sklearn LinearSVC")
        what_map = "mAP (mean over k)" if "per_k" in res else "mAP"
        print(f"  {label}: {res['seconds']:.1f} s end to end ({parts}), {what_map} {res['mAP']:.2f}, "
              f"peak RSS {res['peak_rss_mib']:.0f} MiB{extra}", flush=True)

    summary = {"benchmark": "svm", "protocol": args.protocol, "data": what, "threads": args.threads,
               **({"k_values": lowshot["k_values"], "samples": args.samples} if lowshot else {}),
               "precision": args.precision, "device": args.device,
               **({"blas": results["torch"]["solver"].get("blas")} if results.get("torch", {}).get("solver") else {}),
               **{f"{n}_seconds": r["seconds"] for n, r in results.items()},
               **{f"{n}_start_seconds": r["start_seconds"] for n, r in results.items()},
               **{f"{n}_load_seconds": r["load_seconds"] for n, r in results.items()},
               **{f"{n}_protocol_seconds": r["protocol_seconds"] for n, r in results.items()},
               **{f"{n}_mAP": r["mAP"] for n, r in results.items()},
               **{f"{n}_mAP_per_k": r["per_k"] for n, r in results.items() if "per_k" in r},
               **{f"{n}_peak_rss_mib": r["peak_rss_mib"] for n, r in results.items()}}
    if {"sklearn", "torch"} <= set(results):
        ref, new = results["sklearn"], results["torch"]
        cmp = compare(ref, new)
        summary.update({"speedup": ref["seconds"] / new["seconds"], **cmp})
        per, unit = ("(k, sample, cost) mAP", "k value(s)") if lowshot else ("per-class AP", "class(es)")
        print(f"  speedup {summary['speedup']:.1f}x (torch vs sklearn); |delta mAP| {cmp['abs_delta_mAP']:.3f}, "
              f"max |delta {per}| {cmp['max_abs_delta_AP']:.3f}, chosen cost differs for "
              f"{cmp['chosen_cost_differs']} {unit}", flush=True)
    emit(summary)
    return 0
