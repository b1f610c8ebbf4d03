"""``mmfree-fpga sweep``: boards x lanes x packings x clocks, each point a task on Dask distributed."""

from __future__ import annotations

import argparse
import sys

from mmfree_fpga.errors import UserError

from ._common import check_out_dir, non_negative_int, positive_int

HELP = ("sweep boards x lanes x packings x clocks (bitstream builds, cycle simulations, the performance model) "
        "as tasks on a Dask cluster; a table and a plot of LUTs against tokens/s")


def _list_of(parse, what):
    def parse_list(text: str):
        items = [t.strip() for t in text.split(",")]
        if not items or any(not t for t in items):
            raise argparse.ArgumentTypeError(f"must be a comma-separated list of {what}, got {text!r}")
        return tuple(parse(t) for t in items)
    parse_list.__name__ = f"list of {what}"
    return parse_list


def _positive_float(text: str) -> float:
    import math
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a comma-separated list of positive numbers, got {text!r}")
    return value


def _positive(text: str) -> int:
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be a comma-separated list of integers >= 1, got {text!r}") from None


def add_arguments(p) -> None:
    from mmfree_fpga.config import PUBLISHED
    from mmfree_fpga.sweep import KINDS, SIMULATORS
    p.add_argument("--kinds", type=_list_of(str, "point kinds"), default=("model", "sim"), metavar="K,K",
                   help=f"point kinds, of {', '.join(KINDS)} (default model,sim): build = bitstream (LUTs, FF, "
                        "BRAM, DSP, Fmax), sim = cycle simulation (cycles per token, measured), model = the "
                        "performance model (no tool)")
    p.add_argument("--boards", type=_list_of(str, "boards"), default=("ulx3s-85f",), metavar="B,B",
                   help="boards (default ulx3s-85f); the board gives the default clock and, for build, the target")
    p.add_argument("--lanes", type=_list_of(_positive, "lane counts"), default=(16, 32, 64), metavar="N,N",
                   help="lane counts (default 16,32,64; 1 on the iCEBreaker's tiny engine)")
    p.add_argument("--packings", type=_list_of(str, "packings"), default=("base3",), metavar="P,P",
                   help="trit packings, of base3, 2bit (default base3)")
    p.add_argument("--clocks-mhz", type=_list_of(_positive_float, "clocks"), default=None, metavar="F,F",
                   help="design clocks in MHz (default: each board's default clock)")
    p.add_argument("--model", default=None, metavar="NAME",
                   help=f"a published geometry ({', '.join(PUBLISHED)}) instead of --checkpoint: no weights, so "
                        "model points and synthetic-weight sim points (Verilator) only")
    p.add_argument("--simulator", choices=SIMULATORS, default="verilator",
                   help="simulator of the sim points (default verilator; amaranth needs no build, slow on large models)")
    p.add_argument("--prompt-ids", type=_list_of(lambda t: non_negative_int(t), "token ids"), default=(1, 2),
                   metavar="IDS", help="token ids a sim point feeds (default 1,2; taken modulo the vocabulary)")
    p.add_argument("--steps", type=positive_int, default=2, metavar="N",
                   help="tokens a sim point generates after the prompt (default 2)")
    p.add_argument("--scheduler", default=None, metavar="ADDR",
                   help="an existing Dask scheduler (tcp://host:8786); default: a LocalCluster on this machine")
    p.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="worker processes of the LocalCluster (default: one per core, at most one per task)")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="cache root; measurements go to DIR/sweep/ (default $MMFREE_FPGA_CACHE or out/cache)")
    p.add_argument("--no-cache", action="store_true", help="run every point even if cached (results not stored)")
    p.add_argument("--out", default="out/sweep", metavar="DIR",
                   help="sweep.csv, sweep.md and sweep.png go here (default out/sweep)")


def run(args) -> dict:
    from mmfree_fpga.progress import Progress
    from mmfree_fpga.sweep import SweepSpec, resolve_model, run_sweep, write_outputs, markdown_table

    check_out_dir(args.out)
    if args.cache is not None:
        check_out_dir(args.cache, "--cache")
    if args.model is not None and args.checkpoint is not None:
        raise UserError("give --model NAME (a published geometry) or --checkpoint DIR, not both")
    if args.workers is not None and args.scheduler is not None:
        raise UserError("--workers sizes the LocalCluster; with --scheduler the cluster has its own workers")
    if args.scheduler is not None and "://" not in args.scheduler:
        raise UserError(f"--scheduler {args.scheduler}: give the scheduler's address as tcp://host:port")
    spec = SweepSpec(kinds=args.kinds, boards=args.boards, lanes=args.lanes, packings=args.packings,
                     clocks_mhz=args.clocks_mhz or (None,), simulator=args.simulator, prompt=args.prompt_ids,
                     steps=args.steps)
    from mmfree_fpga.packing import PACKINGS
    for packing in spec.packings:
        if packing not in PACKINGS:
            raise UserError(f"--packings: unknown packing {packing!r}; use {', '.join(PACKINGS)}")
    if args.model is not None:
        from mmfree_fpga.config import PUBLISHED
        if args.model not in PUBLISHED:
            raise UserError(f"--model {args.model}: not a published geometry; use one of {', '.join(PUBLISHED)} "
                            "or --checkpoint DIR")
    try:
        model = resolve_model(args.model if args.model is not None else args.checkpoint, spec.packings)
        from mmfree_fpga.sweep import plan_points
        plan_points(spec, model)            # every bad argument, before a cluster starts or a file is written
    except ValueError as e:
        raise UserError(str(e)) from None

    bar = Progress("sweep", quiet=args.quiet, unit="point")
    state = {"announced": False}

    def on_progress(done, total, row):
        if row is None and not state["announced"]:
            state["announced"] = True
            if not args.quiet:
                todo = total - done
                what = "nothing to run" if todo == 0 else f"{todo} to run"
                print(f"sweep: {total} measurement{'s' if total != 1 else ''}, {done} cached: {what}",
                      file=sys.stderr, flush=True)
        bar(done, total)

    try:
        result = run_sweep(spec, model, cache_dir=args.cache, scheduler=args.scheduler, workers=args.workers,
                           use_cache=not args.no_cache, on_progress=on_progress)
    except ValueError as e:
        raise UserError(str(e)) from None
    finally:
        bar.close()
    written = write_outputs(result, args.out)
    if not args.quiet:
        print(markdown_table(result.rows), end="")
        ran = f"{result.run} run on {result.cluster}" if result.run else "none run"
        print(f"{len(result.rows)} points, {result.measurements} measurements: {result.cached} cached, {ran}, "
              f"{result.failed} failed")
        print("Pareto front: " + (", ".join(written["pareto"]) if written["pareto"] else "none"))
        print("wrote " + ", ".join(written["files"]))
    return {"rows": result.rows, "points": len(result.rows), "measurements": result.measurements,
            "cached": result.cached, "run": result.run, "failed": result.failed, "cluster": result.cluster,
            "cache_dir": result.cache_dir, "model": result.model, "geometry": result.geometry,
            "pareto": written["pareto"], "files": written["files"]}
