"""Collect `vitslim train` runs (their summary.json) into a markdown + JSON table of top-1 before/after."""
from __future__ import annotations

import argparse
import json
import pathlib

import torch

import vitslim
from vitslim.io import atomic_write


def row(run: pathlib.Path, dense_macs: float) -> dict:
    """One table row from a run folder: method, MACs, top-1 before/after, training speed."""
    summary = json.loads((run / "summary.json").read_text())
    model = vitslim.load(run / "last.pt")
    history = summary["history"]
    before = next((r for r in history if r["event"] == "eval"), {"top1": None})  # None: run without --eval-before
    after = summary["final"]
    epochs = [r for r in history if r["event"] == "epoch"]
    macs = vitslim.count_macs(model)
    return {
        "run": run.name, "method": summary["method"] or "dense", "macs_target": summary["macs"],
        "gmacs": macs / 1e9, "macs_fraction": macs / dense_macs,
        "top1_before": before["top1"], "top1_after": after["top1"], "n": after["n"], "steps": summary["steps"],
        "train_images_per_s": sum(e["train_images_per_s"] for e in epochs) / len(epochs),
        "train_seconds": sum(e["seconds"] for e in epochs), "command": summary["command"],
        # CDCP/CAIT runs: top-1 of the exported (sliced) model, written by benchmarks/cait_export_eval.py
        "top1_exported": (json.loads((run / "exported.json").read_text())["top1"]
                          if (run / "exported.json").is_file() else None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=pathlib.Path, help="folder holding one sub-folder per run")
    parser.add_argument("runs", nargs="+", help="run folder names; the first is the dense control")
    parser.add_argument("--name", default="finetune")
    parser.add_argument("--results", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    dense = vitslim.load(args.out / args.runs[0] / "last.pt")
    vitslim.unpatch(dense)
    dense_macs = vitslim.count_macs(dense)
    rows = [row(args.out / r, dense_macs) for r in args.runs]
    ref = rows[0]["top1_before"]
    lines = [f"# {args.name}: fine-tuning with distillation (CIFAR-10 reference ViT)", "",
             f"Dense reference model before fine-tuning: **{ref:.2%}** top-1 on {rows[0]['n']} test images.", "",
             "| run | GMACs | MACs vs dense | top-1 training-free | top-1 fine-tuned | fine-tuned vs dense "
             "before | fine-tuned vs dense fine-tuned (same budget) | steps |",
             "|---|---|---|---|---|---|---|---|"]
    control = rows[0]["top1_after"]
    for r in rows:
        before = "-" if r["top1_before"] is None else f"{r['top1_before']:.2%}"
        lines.append(f"| {r['run']} | {r['gmacs']:.4f} | {r['macs_fraction']:.3f} | {before} | "
                     f"{r['top1_after']:.2%} | {100 * (r['top1_after'] - ref):+.2f} pts | "
                     f"{100 * (r['top1_after'] - control):+.2f} pts | {r['steps']} |")
    exported = [r for r in rows if r["top1_exported"] is not None]
    if exported:
        lines += ["", "Exported (sliced, `vitslim.export.slim`) models, fp32 eval:", "",
                  "| run | top-1 fine-tuned (as trained) | top-1 exported |", "|---|---|---|"]
        lines += [f"| {r['run']} | {r['top1_after']:.2%} | {r['top1_exported']:.2%} |" for r in exported]
    lines += ["", "Commands (one per run):", ""] + [f"    {r['command']}" for r in rows] + [""]
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write(args.results / f"{args.name}.md", "\n".join(lines))
    atomic_write(args.results / f"{args.name}.json", json.dumps({"rows": rows, "dense_top1": ref,
                                                                  "threads": 2}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
