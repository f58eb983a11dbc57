"""Prune-and-Merge at scale: wall time and peak RSS of one data-free ``patch(..., macs=)`` call.

Cases (random init, CPU, fp32): ``vit_small_patch14_dinov2`` at 518 px (1369 patches) and
``vit_large_patch16_224``, each ``vitslim.patch(model, "prune_merge", macs=0.5)``: the data-free
scoring pass plus the ``macs=`` search. Each case runs in a fresh subprocess (peak RSS is per
process: ``ru_maxrss``, which includes the model itself) under an address-space cap, so a case that
needs more memory fails with an error instead of calling the OOM killer on a shared machine.
``cpu_s`` (process CPU time of the call, all threads) is steadier than ``wall_s`` on a busy machine.
Heavy: run the cases one at a time on a quiet machine. Smoke mode (VITSLIM_BENCH_SMOKE=1, see smoke.py):
each case is the tiny ViT, in this process, with the report in the smoke folder.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import resource
import subprocess
import sys
import time

import smoke  # benchmarks/smoke.py, beside this file

ROOT = pathlib.Path(__file__).resolve().parents[1]
CASES = {"dinov2_s_518": "vit_small_patch14_dinov2", "vit_l_224": "vit_large_patch16_224"}


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_case(case: str, method: str, budget: float, threads: int) -> dict:
    """One patch() call in this process; returns the numbers (called in the subprocess)."""
    sys.path.insert(0, str(ROOT))  # measure this checkout, not an installed vitslim
    import vitslim
    import timm
    import torch

    from vitslim.measure.macs import count_macs

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if smoke.ENABLED:
        model = timm.create_model(smoke.TINY_ARCHITECTURE, **smoke.TINY_VIT).eval()
    else:
        model = timm.create_model(CASES[case]).eval()
    model_gib = _peak_gib()
    start, cpu = time.perf_counter(), time.process_time()
    vitslim.patch(model, method, macs=budget)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = _peak_gib()
    ratio = count_macs(model) / count_macs(vitslim.unpatch(model))
    return {"case": case, "model": CASES[case], "method": method, "target": budget, "macs_ratio": round(ratio, 4),
            "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "peak_rss_gib": round(peak, 2), "rss_after_build_gib": round(model_gib, 2),
            "tokens": model.patch_embed.num_patches}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--method", default="prune_merge")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mem-cap-gib", type=float, default=14.0, help="address-space cap of each case")
    parser.add_argument("--note", help="a line for the protocol (e.g. which checkout was measured)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/prune_merge_scaling"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = parser.parse_args()
    if args.one:
        cap = int(args.mem_cap_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        print(json.dumps(run_case(args.one, args.method, args.budget, args.threads)))
        return
    rows = []
    for case in args.cases.split(","):
        if smoke.ENABLED:  # the tiny model needs neither a fresh process nor a memory cap
            rows.append(run_case(case, args.method, args.budget, smoke.THREADS))
            continue
        cmd = [sys.executable, __file__, "--one", case, "--method", args.method, "--budget", str(args.budget),
               "--threads", str(args.threads), "--mem-cap-gib", str(args.mem_cap_gib)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1",
                                                                         **__import__("os").environ})
        if proc.returncode == 0:
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            last = (proc.stderr.strip().splitlines() or ["?"])[-1]
            row = {"case": case, "model": CASES[case], "method": args.method, "target": args.budget,
                   "error": f"exit {proc.returncode} after {time.perf_counter() - start:.0f} s "
                            f"(cap {args.mem_cap_gib} GiB): {last[:200]}"}
        print(json.dumps(row), flush=True)
        rows.append(row)
    command = (f"python benchmarks/prune_merge_scaling.py --cases {args.cases} --method {args.method} "
               f"--budget {args.budget} --threads {args.threads} --mem-cap-gib {args.mem_cap_gib}"
               + (f" --note '{args.note}'" if args.note else ""))
    import torch

    protocol = {"threads": args.threads, "precision": "fp32", "weights": "random init", "torch": torch.__version__,
                "cpu": platform.processor() or platform.machine(), "calibration": "data-free (default)"}
    if args.note:
        protocol["note"] = args.note
    out = pathlib.Path(args.out)
    if smoke.ENABLED:
        out = smoke.results_dir(out.parent) / out.name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "protocol": protocol, "rows": rows},
                                                   indent=2) + "\n")
    keys = ["case", "model", "tokens", "target", "macs_ratio", "wall_s", "cpu_s", "peak_rss_gib", "rss_after_build_gib", "error"]
    keys = [k for k in keys if any(k in r for r in rows)]
    lines = [f"# {args.method}: data-free patch(macs={args.budget}) at scale", "", "Command:", "", f"    {command}", "",
             "Protocol: " + ", ".join(f"{k} {v}" for k, v in protocol.items()), "",
             "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "-")) for k in keys) + " |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.md')} and .json")


if __name__ == "__main__":
    main()
