"""CAIT-style (vitslim reconstruction) speed on DeiT-S 224, CPU: dense vs ATME, CDCP-exported and CAIT-exported.

Random init (speed does not depend on the weights). Each model is timed round-robin beside its
ideal (its own blocks, sliced for CDCP/CAIT, on the same token counts with no merge work), as
``vitslim bench`` does; the channel-pruned models are the exported ones (``vitslim.export.slim``),
i.e. plain smaller Linear layers, not masks.
"""
from __future__ import annotations

import argparse
import copy
import platform

import vitslim  # noqa: F401  (before timm)
import timm
import torch

from vitslim import export
from vitslim.measure.macs import count_macs
from vitslim.measure.report import format_table, save_report
from vitslim.measure.speed import compare_speed, ideal_model, paired_ratio


def build(dense: torch.nn.Module, method: str, budget: float) -> torch.nn.Module:
    """The deployable model for a method at a MACs budget (sliced where it prunes channels)."""
    model = vitslim.patch(copy.deepcopy(dense), method, macs=budget)
    return export.slim(model) if method in export.CHANNEL_METHODS else model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budgets", default="0.5,0.7")
    parser.add_argument("--methods", default="atme,cdcp,cait")
    parser.add_argument("--name", required=True)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.manual_seed(0)
    dense = timm.create_model("deit_small_patch16_224").eval()
    models = {"dense": dense}
    rows = [{"method": "dense", "budget": 1.0, "options": {}}]
    for method in args.methods.split(","):
        for budget in (float(b) for b in args.budgets.split(",")):
            model = build(dense, method, budget)
            models[f"{method}@{budget}"] = model
            cfg = model.vitslim_config if vitslim.is_patched(model) else {"options": {}}
            rows.append({"method": f"{method} (CAIT-style, vitslim reconstruction)", "budget": budget,
                         "options": {k: v for k, v in cfg["options"].items() if k != "importance"},
                         "channels": getattr(model, "vitslim_channels", None),
                         "tokens": [list(t) for t in vitslim.describe(model)["tokens"]]})
    dense_macs = count_macs(dense)
    timed = {}
    for name, model in models.items():
        row = rows[list(models).index(name)]
        row["gmacs"] = count_macs(model) / 1e9
        row["macs_ratio"] = row["gmacs"] * 1e9 / dense_macs
        row["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        timed[name] = model
        if name != "dense":
            timed[name + ":ideal"] = ideal_model(model)
    speeds = compare_speed(timed, args.batch_size, runs=args.runs, threads=args.threads, progress=True)
    for row, name in zip(rows, models):
        row["images_per_s"] = speeds[name]["images_per_s"]
        row["p90_ms"] = speeds[name]["p90_ms"]
        row["speedup"] = paired_ratio(speeds["dense"], speeds[name])
        if name != "dense":
            row["ideal_speedup"] = paired_ratio(speeds["dense"], speeds[name + ":ideal"])
            row["measured_over_ideal"] = paired_ratio(speeds[name + ":ideal"], speeds[name])
    protocol = {"model": "deit_small_patch16_224 (random init)", "batch_size": args.batch_size, "runs": args.runs,
                "threads": speeds["dense"]["threads"], "precision": "fp32", "torch": torch.__version__,
                "timm": timm.__version__, "cpu": platform.processor() or platform.machine(),
                "models": "ATME patched; CDCP and CAIT exported with vitslim.export.slim (CAIT keeps its ATME patch)",
                "ideal": "the same (sliced) blocks on the same token counts, no merge work"}
    result = {"protocol": protocol, "rows": rows}
    paths = save_report(result, args.out, args.name, f"CAIT-style (vitslim reconstruction) speed, DeiT-S, batch "
                        f"{args.batch_size}", command="python benchmarks/cait_speed.py " + " ".join(
                            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()), plot=False)
    print(format_table(rows))
    print("wrote " + ", ".join(map(str, paths)))


if __name__ == "__main__":
    main()
