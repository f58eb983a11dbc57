"""Speed tables: dense against methods x MACs budgets on one model, CPU, at one or more batch sizes.

One report per batch size in --out: NAME.{md,json} for one batch size, NAME_bBATCH for several (or
put "{batch}" in NAME where it goes).
The numbers come from vitslim.measure.compare.run_compare, as for ``vitslim bench``: each model timed
round-robin beside its ideal (its own blocks on the same token counts, no reduction work); the models
are patched once for all batch sizes.
--exported measures CDCP and CAIT as exported models (vitslim.export.slim: smaller Linear layers,
not masks; CAIT keeps its ATME patch). Random init unless --model brings weights: speed does not
depend on them.

    python benchmarks/speed.py --model deit_small_patch16_224 --methods tome,evit,topk \\
        --budgets 0.5,0.6,0.7 --batch-sizes 32,1 --runs 12,30 --name deit_s_speed

benchmarks/speed.sh holds the command of every speed table in benchmarks/results. Smoke mode
(VITSLIM_BENCH_SMOKE=1, see smoke.py): a tiny model, the first budget, batch <= 2, 5 runs, one thread,
reports in the smoke folder.
"""
from __future__ import annotations

import argparse
import ast
import copy
import shlex
import sys

import smoke  # benchmarks/smoke.py, beside this file
import vitslim  # noqa: F401  (before timm)
import torch

from vitslim import export
from vitslim.errors import VitslimError
from vitslim.measure.compare import run_compare
from vitslim.measure.report import format_table, save_report
from vitslim.measure.speed import check_timing
from vitslim.zoo import load_model


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def method_options(pairs: list[str], methods: list[str]) -> dict[str, dict]:
    """METHOD.KEY=VALUE strings (VALUE a Python literal, else a string) as {method: {key: value}}."""
    options: dict[str, dict] = {m: {} for m in methods}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        method, _, key = key.rpartition(".")
        if not sep or method not in options:
            raise VitslimError(f"--option {pair!r}: give METHOD.KEY=VALUE with METHOD among --methods {methods}")
        try:
            options[method][key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            options[method][key] = raw
    return options


def build_models(dense: torch.nn.Module, methods: list[str], budgets: list[float], options: dict[str, dict],
                 exported: bool) -> list[tuple[str, torch.nn.Module, dict]]:
    """Each method at each budget, patched once for every batch size (CDCP/CAIT sliced with ``exported``)."""
    models = []
    for method in methods:
        for budget in budgets:
            patched = vitslim.patch(copy.deepcopy(dense), method, macs=budget, **options.get(method, {}))
            if not (exported and method in export.CHANNEL_METHODS):
                models.append((f"{method}@{budget}", patched, {"method": method, "budget": budget}))
                continue
            slim = export.slim(patched)
            options_used = {k: v for k, v in patched.vitslim_config["options"].items() if k != "importance"}
            models.append((f"{method}@{budget} (exported)", slim, {
                "method": f"{method} (exported)", "budget": budget, "options": options_used,
                "channels": slim.vitslim_channels}))
    return models


def build_parser() -> argparse.ArgumentParser:
    """The driver's arguments."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224", help="timm name, 'default' or a model folder")
    parser.add_argument("--methods", default="tome,evit,topk", help="comma-separated (default tome,evit,topk)")
    parser.add_argument("--budgets", type=_floats, default=[0.5, 0.7], help="MACs targets (default 0.5,0.7)")
    parser.add_argument("--batch-sizes", "--batch-size", type=_ints, default=[32],
                        help="comma-separated, one report each (default 32)")
    parser.add_argument("--runs", type=_ints, default=[12], help="timed runs, one for all or one per batch size")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--allocator", default="tuned", choices=["tuned", "default"])
    parser.add_argument("--option", action="append", default=[], help="METHOD.KEY=VALUE (repeatable)")
    parser.add_argument("--exported", action="store_true", help="CDCP/CAIT as exported (sliced) models")
    parser.add_argument("--out", default="benchmarks/results", help="report folder (default benchmarks/results)")
    parser.add_argument("--name", required=True,
                        help="report name; with several batch sizes _bBATCH is appended unless it has {batch}")
    return parser


def run_script(script: str, parser: argparse.ArgumentParser, work, argv: list[str] | None) -> int:
    """Parse ``argv``, run ``work(args, command)`` with the command line recorded; 2 on a VitslimError."""
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    try:
        return work(args, f"python benchmarks/{script} " + shlex.join(argv))
    except VitslimError as exc:
        print(f"{script}: error: {exc}", file=sys.stderr)
        return 2


def timing_plan(args: argparse.Namespace) -> tuple[list[int], list[int], list[float], int, int]:
    """Batch sizes, runs per batch size, budgets, warm-up and threads (smoke mode: the tiny ones)."""
    runs = args.runs * len(args.batch_sizes) if len(args.runs) == 1 else args.runs
    if len(runs) != len(args.batch_sizes):
        raise VitslimError(f"--runs takes one count or one per batch size ({len(args.batch_sizes)})")
    batches, budgets, warmup, threads = args.batch_sizes, args.budgets, args.warmup, args.threads
    if smoke.ENABLED:  # the same code on tiny inputs: see smoke.py
        batches, runs = [min(b, smoke.BATCH) for b in batches], [smoke.RUNS] * len(runs)
        budgets, warmup, threads = budgets[:1], smoke.WARMUP, smoke.THREADS
    return batches, runs, budgets, warmup, threads


def main(argv: list[str] | None = None) -> int:
    """Measure and write one report per batch size."""
    return run_script("speed.py", build_parser(), measure, argv)


def measure(args: argparse.Namespace, command: str) -> int:
    """The driver's work, for parsed arguments; ``command`` is recorded in each report."""
    methods = [m for m in args.methods.split(",") if m]
    batches, runs, budgets, warmup, threads = timing_plan(args)
    for batch, batch_runs in zip(batches, runs):  # before the slow patching
        check_timing(batch, batch_runs, warmup, args.precision, args.allocator)
    out = smoke.results_dir(args.out)
    torch.manual_seed(0)
    spec, overrides = smoke.model_spec(args.model)
    dense = load_model(spec, **overrides)
    models = build_models(dense, methods, budgets, method_options(args.option, methods), args.exported)
    sliced = [m for m in methods if args.exported and m in export.CHANNEL_METHODS]
    for batch, batch_runs, asked in zip(batches, runs, args.batch_sizes):
        result = run_compare(dense, [], [], batch_size=batch, runs=batch_runs, warmup=warmup, threads=threads,
                             precision=args.precision, allocator=args.allocator, models=models,
                             progress=not smoke.ENABLED)
        model = f"{spec} with {overrides} (smoke mode)" if overrides else args.model
        result["protocol"] = {"model": model, **result["protocol"]}
        if sliced:
            result["protocol"]["exported"] = (f"{', '.join(sliced)}: vitslim.export.slim (sliced Linear layers; "
                                              "CAIT keeps its ATME patch)")
        report = (args.name.format(batch=asked) if "{batch}" in args.name
                  else args.name if len(batches) == 1 else f"{args.name}_b{asked}")
        paths = save_report(result, out, report, f"{report}: {args.model}, batch {batch}", command=command)
        print(format_table(result["rows"]))
        print("wrote " + ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
