"""Deployment speed table: dense and methods x budgets, run every way they deploy (issue 14).

For each runtime (BACKEND:PRECISION, e.g. eager:fp32, compile:fp32, onnxruntime:fp32, eager:bf16,
eager:int8) and batch size, every model and its ideal (its own blocks on the same token counts, no
reduction work) go through ``vitslim.export.runtime`` and are timed round-robin beside the dense
model run the same way (``vitslim.measure.compare.run_compare``): speed-up is against dense *in
that runtime*, measured/ideal against the ideal in that runtime. Models are patched once; each
runtime form is built once and reused for every batch size (compiling and exporting are slow).

One report per (runtime, batch) in --out: NAME_BACKEND_PRECISION_bBATCH.{md,json}; reports already
there are kept and skipped, so an interrupted run resumes with the same command. Then NAME.{md,json}
puts them side by side. Random init (speed does not depend on the weights).

    python benchmarks/deploy.py --model deit_small_patch16_224 --budgets 0.5,0.7 \\
        --runtimes eager:fp32,eager:bf16,eager:int8,compile:fp32,onnxruntime:fp32 \\
        --batch-sizes 32,1 --runs 5,20 --name deploy_deit_s
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import smoke  # benchmarks/smoke.py, beside this file
import speed  # benchmarks/speed.py: build_models, method_options, timing_plan, run_script
import vitslim  # noqa: F401  (before timm)
import torch

from vitslim.export.inference import check_runtime
from vitslim.export.runtime import runtime
from vitslim.io import atomic_write
from vitslim.measure.compare import run_compare
from vitslim.measure.report import format_table, save_report
from vitslim.measure.speed import IdealSchedule, check_timing
from vitslim.zoo import load_model


def parse_runtimes(text: str) -> list[tuple[str, str]]:
    """'eager:fp32,compile:fp32' as [(backend, precision)], each pair checked."""
    pairs = []
    for item in filter(None, text.split(",")):
        backend, _, precision = item.partition(":")
        check_runtime(backend, precision or "fp32")
        pairs.append((backend, precision or "fp32"))
    return pairs


class BuiltOnce:
    """A runner that builds each model's runtime form once and hands it out again for later batch sizes."""

    def __init__(self, backend: str, precision: str, threads: int):
        self.backend, self.precision, self.threads = backend, precision, threads
        self.built: dict[tuple, torch.nn.Module] = {}

    def __call__(self, model: torch.nn.Module) -> torch.nn.Module:
        # ideals are rebuilt per run_compare call: key them by the model they belong to
        key = ("ideal", id(model.model)) if isinstance(model, IdealSchedule) else ("model", id(model))
        if key not in self.built:
            self.built[key] = runtime(model, self.backend, self.precision, threads=self.threads)
        return self.built[key]


def cell(row: dict) -> str:
    """'1.52x (0.93)': speed-up against dense, measured/ideal in brackets."""
    ratio = row.get("measured_over_ideal")
    return f"{row['speedup']:.2f}x" + (f" ({ratio:.2f})" if ratio is not None else "")


def summary(reports: dict[tuple[str, str, int], dict], command: str, model: str) -> tuple[str, dict]:
    """One markdown table per batch size: a row per model, a column per runtime."""
    lines = [f"# Deployment speed: {model}", "", "Command:", "", f"    {command}", "",
             "Each cell: speed-up against the dense model run the same way (measured/ideal in brackets, the ideal "
             "run the same way too). One report per runtime and batch size beside this file has the protocol "
             "and images/s.", ""]
    batches = sorted({b for _, _, b in reports}, reverse=True)
    runtimes = list(dict.fromkeys((be, pr) for be, pr, _ in reports))
    for batch in batches:
        cols = [(be, pr) for be, pr in runtimes if (be, pr, batch) in reports]
        first = reports[(*cols[0], batch)]
        lines += [f"## Batch {batch}", "",
                  "| model | GMACs | " + " | ".join(f"{be} {pr}" for be, pr in cols) + " |",
                  "|---|---|" + "---|" * len(cols)]
        dense_ips = " | ".join(f"{reports[(be, pr, batch)]['rows'][0]['images_per_s']:.1f} img/s" for be, pr in cols)
        lines.append(f"| dense | {first['rows'][0]['gmacs']:.3f} | {dense_ips} |")
        for i, row in enumerate(first["rows"][1:], start=1):
            name = f"{row['method']} {row['budget']:.2f}"
            cells = " | ".join(cell(reports[(be, pr, batch)]["rows"][i]) for be, pr in cols)
            lines.append(f"| {name} | {row['gmacs']:.3f} | {cells} |")
        lines.append("")
    data = {"command": command, "model": model,
            "tables": [{"backend": be, "precision": pr, "batch_size": b, **r} for (be, pr, b), r in reports.items()]}
    return "\n".join(lines), data


def measure(args: argparse.Namespace, command: str) -> int:
    """Build the models, time every (runtime, batch) not yet reported, then write the summary."""
    methods = [m for m in args.methods.split(",") if m]
    runtimes = parse_runtimes(args.runtimes)
    batches, runs, budgets, warmup, threads = speed.timing_plan(args)
    if smoke.ENABLED:
        methods = methods[:2]  # compiling and exporting every method would make the smoke run minutes long
    for batch, batch_runs in zip(batches, runs):
        check_timing(batch, batch_runs, warmup)
    out = pathlib.Path(smoke.results_dir(args.out))
    torch.manual_seed(0)
    spec, overrides = smoke.model_spec(args.model)
    dense = load_model(spec, **overrides)
    models = speed.build_models(dense, methods, budgets, speed.method_options(args.option, methods), exported=False)
    reports: dict[tuple[str, str, int], dict] = {}
    for backend, precision in runtimes:
        runner = BuiltOnce(backend, precision, threads)
        for batch, batch_runs, asked in zip(batches, runs, args.batch_sizes):
            name = f"{args.name}_{backend}_{precision}_b{asked}"
            done = out / f"{name}.json"
            if done.is_file():  # resume: measured in an earlier run of this command
                reports[(backend, precision, asked)] = json.loads(done.read_text())
                print(f"kept {done}")
                continue
            result = run_compare(dense, [], [], batch_size=batch, runs=batch_runs, warmup=warmup, threads=threads,
                                 allocator=args.allocator, models=models, runner=runner,
                                 runtime={"backend": backend, "precision": precision}, progress=not smoke.ENABLED)
            result["protocol"] = {"model": args.model, **result["protocol"]}
            save_report(result, out, name, f"{name}: {args.model}, {backend} {precision}, batch {batch}",
                        command=command, plot=False)
            print(format_table(result["rows"]))
            reports[(backend, precision, asked)] = result
    text, data = summary(reports, command, args.model)
    atomic_write(out / f"{args.name}.md", text + "\n")
    atomic_write(out / f"{args.name}.json", json.dumps(data, indent=1, default=str) + "\n")
    print(f"wrote {out / args.name}.md/.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The driver's arguments."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224", help="timm name, 'default' or a model folder")
    parser.add_argument("--methods", default=",".join(vitslim.methods()), help="comma-separated (default all)")
    parser.add_argument("--budgets", type=speed._floats, default=[0.5, 0.7], help="MACs targets (default 0.5,0.7)")
    parser.add_argument("--runtimes", default="eager:fp32,compile:fp32,onnxruntime:fp32,eager:bf16,eager:int8",
                        help="BACKEND:PRECISION pairs, comma-separated")
    parser.add_argument("--batch-sizes", type=speed._ints, default=[32, 1])
    parser.add_argument("--runs", type=speed._ints, default=[5, 20], help="timed runs, one for all or one per batch")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--allocator", default="tuned", choices=["tuned", "default"])
    parser.add_argument("--option", action="append", default=[], help="METHOD.KEY=VALUE (repeatable)")
    parser.add_argument("--out", default="benchmarks/results", help="report folder (default benchmarks/results)")
    parser.add_argument("--name", default="deploy_deit_s", help="report name prefix (default deploy_deit_s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Measure and write the reports."""
    return speed.run_script("deploy.py", build_parser(), measure, argv)


if __name__ == "__main__":
    sys.exit(main())
