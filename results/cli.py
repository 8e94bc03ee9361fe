"""`mocobench results SWEEP_DIR`: gather every metrics.json below SWEEP_DIR into model-zoo tables and plots.

Writes to --out (default SWEEP_DIR/tables/): tables.md (all tables), one <family>.md and <family>.csv per
table family, results_long.csv (tidy: checkpoint, variant, benchmark, metric, trial, value, ...),
summary.csv (mean±std per model/benchmark/metric with published numbers) and PNG plots
(pretrain_curves.png, pretrain_curves_grid.png, lowshot.png, linear_layers.png when there is data).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mocobench.core.run_folder import ensure_writable_dir
from mocobench.results.gather import ANY_METRIC, aggregate, gather


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mocobench results", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", metavar="SWEEP_DIR", help="directory searched recursively for metrics.json")
    p.add_argument("--out", metavar="DIR", default=None, help="output directory (default: SWEEP_DIR/tables)")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="write tables only")
    p.add_argument("--strict", action="store_true",
                   help="fail on an unreadable metrics.json instead of skipping it with a warning, and exit with "
                        "status 1 when a sweep stage failed, is still running or never ran")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    sweep = Path(args.sweep_dir)
    out = Path(args.out) if args.out else sweep / "tables"
    try:
        gathered = gather(sweep, strict=args.strict)
        ensure_writable_dir(out)
    except (FileNotFoundError, ValueError) as e:  # ConfigError is a ValueError
        print(f"mocobench results: error: {e}", file=sys.stderr)
        return 2
    for w in gathered.warnings:
        print(f"mocobench results: warning: {w}", file=sys.stderr)
    if gathered.frame.empty:
        print(f"mocobench results: error: no metrics.json with numeric metrics found below {sweep} "
              "(each stage writes DIR/metrics.json into its --out DIR)", file=sys.stderr)
        return 2

    from mocobench.results.tables import write_tables  # noqa: E402 (pandas-only import kept near its use)
    written = write_tables(gathered, out)
    if args.plots:
        from mocobench.results import plots
        summary = aggregate(gathered.frame)
        if gathered.pretrain_dirs:
            written["pretrain_curves.png"] = plots.plot_pretrain_curves(gathered.pretrain_dirs,
                                                                         out / "pretrain_curves.png")
            if len(gathered.pretrain_dirs) > 1:
                written["pretrain_curves_grid.png"] = plots.plot_pretrain_grid(gathered.pretrain_dirs,
                                                                               out / "pretrain_curves_grid.png")
        for name, fn in (("lowshot.png", plots.plot_lowshot), ("linear_layers.png", plots.plot_linear_layers)):
            path = fn(summary, out / name)
            if path is not None:
                written[name] = path
    n_records = gathered.frame.loc[gathered.frame["metric"] != ANY_METRIC, "run"].nunique()
    print(f"gathered {len(gathered.frame)} values from {n_records} metrics.json files below {sweep}")
    print(f"tables: {out / 'tables.md'}")
    for name, path in written.items():
        print(f"  {path}")
    if gathered.unfinished:
        counts = {}
        for u in gathered.unfinished:
            counts[u["state"]] = counts.get(u["state"], 0) + 1
        print(f"mocobench results: warning: {len(gathered.unfinished)} stage(s) without a result ("
              + ", ".join(f"{n} {s}" for s, n in counts.items()) + "); listed in tables.md" +
              ("" if args.strict else "; --strict makes this an error"), file=sys.stderr)
        return 1 if args.strict else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
