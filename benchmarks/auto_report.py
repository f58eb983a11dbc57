"""The `vitslim auto` benchmark table: each target's chosen setting against the best single method chosen by hand.

    python benchmarks/auto_report.py OUT --hand benchmarks/results/cifar10_training_free.json --name auto_cifar10 \
        --command "bash benchmarks/auto_cifar10.sh"

OUT holds one `vitslim auto` folder per target (``macs=0.5``, ``speedup=1.5``, ...). The hand-chosen
row for a MACs target is the committed table's best top-1 at that budget; for a speed-up target, the
best top-1 among its rows measured at least that fast (batch-32 speed-up of that table's own run,
``--hand-speed`` names the column).
For segmentation (``auto --task segment``) the metric is mIoU and ``--hand-metric`` names the hand
table's mIoU column (e.g. ``miou_linear`` of ``segment_camvid.py``, run under the same head).
A search run with ``--finetune-budget`` adds a table of its finalists: held-out KL and metric before and
after fine-tuning, and which form was kept.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import vitslim  # noqa: F401  (before timm)
from vitslim.io import atomic_write


def hand_choice(hand: dict, key: str, value: float, metric: str = "top1", speed: str = "speedup") -> dict | None:
    """The committed table's best row by ``metric`` meeting the target (None if no row does); ``speed`` names its
    speed-up column."""
    rows = [r for r in hand["rows"][1:] if (r["budget"] == value if key == "macs" else r.get(speed, 0) >= value)]
    return max(rows, key=lambda r: r[metric]) if rows else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder with one vitslim auto folder per target")
    parser.add_argument("--hand", required=True, help="committed compare table to choose the single method from")
    parser.add_argument("--name", default="auto")
    parser.add_argument("--results", default="benchmarks/results")
    parser.add_argument("--hand-metric", default="top1", help="the hand table's column to choose by (default top1)")
    parser.add_argument("--hand-speed", default="speedup",
                        help="the hand table's speed-up column (default speedup; segment_camvid.py: speedup_batch32)")
    parser.add_argument("--command", help="the command to record (default: this script's own command line)")
    args = parser.parse_args(argv)
    hand = json.loads(Path(args.hand).read_text())
    rows, metric = [], "top1"  # the search's metric: each row keeps it under its own name (top1, miou)
    for folder in sorted(Path(args.out).iterdir()):
        if "=" not in folder.name:
            continue
        key, value = folder.name.split("=")
        row = {"target": folder.name, "hand": None}
        choice = hand_choice(hand, key, float(value), args.hand_metric, args.hand_speed)
        if choice is not None:
            row["hand"] = {"method": choice["method"], "budget": choice["budget"], args.hand_metric: choice[args.hand_metric],
                           "speedup": choice.get(args.hand_speed), "macs_ratio": choice.get("macs_ratio")}
        report = folder / "auto.json"
        if not report.is_file():
            row["met"] = False
        else:
            found = json.loads(report.read_text())
            chosen = found["candidates"][found["chosen"]]
            metric = found.get("metric", "top1")
            row.update(met=True, chosen=found["chosen"], options=found["options"], macs_ratio=found["macs_ratio"],
                       speedup=chosen.get("speedup"), metric=metric, **{metric: found[metric]},
                       **{f"dense_{metric}": found[f"dense_{metric}"]},
                       report_images=found["report_images"], holdout_images=found["holdout_images"],
                       seconds=found["seconds"], command=found["command"],
                       candidates=found["candidates"],  # every candidate's cost, held-out KL and top-1
                       finetune=found.get("finetune"))
        rows.append(row)
    command = args.command or "python " + " ".join(shlex.quote(a) for a in ["benchmarks/auto_report.py",
                                                                              *(argv or sys.argv[1:])])
    named = {"top1": "top-1", "miou": "mIoU"}[metric]
    lines = [f"# {args.name}: vitslim auto against the best single method chosen by hand", "", "Command:", "",
             f"    {command}", "", f"Hand-chosen from `{args.hand}`"
             + (" (speed-ups from its own run)." if any((r["hand"] or {}).get("speedup") for r in rows) else "."), "",
             f"| target | auto's choice | MACs ratio | speed-up (auto's run) | {named} | hand-chosen | its {named} | "
             "its speed-up | auto - hand | search |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        h = r["hand"]
        hand_cells = (f"{h['method']}@{h['budget']}", f"{100 * h[args.hand_metric]:.2f}",
                      f"{h['speedup']:.2f}x" if h.get("speedup") else "-") if h else ("none", "-", "-")
        if not r["met"]:
            lines.append(f"| {r['target']} | not met here | - | - | - | {' | '.join(hand_cells)} | - | - |")
            continue
        speed = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        delta = f"{100 * (r[metric] - h[args.hand_metric]):+.2f}" if h else "-"
        lines.append(f"| {r['target']} | {r['chosen']} | {r['macs_ratio']:.3f} | {speed} | {100 * r[metric]:.2f} | "
                     f"{' | '.join(hand_cells)} | {delta} | {r['seconds']:.0f} s |")
    met = [r for r in rows if r["met"]]
    if met:
        lines += ["", f"Scored on {met[0]['report_images']} test images (dense {named} "
                  f"{100 * met[0]['dense_' + metric]:.2f}); "
                  f"candidates ranked on {met[0]['holdout_images']} held-out train images.", "",
                  "Each target's command:", ""] + [f"    {r['command']}" for r in met]
    lines += _finetune_lines([r for r in met if r.get("finetune")], named)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    atomic_write(results / f"{args.name}.json", json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    atomic_write(results / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _finetune_lines(rows: list[dict], named: str) -> list[str]:
    """The finalists of each fine-tuning search: held-out KL and metric, training-free and fine-tuned."""
    if not rows:
        return []
    lines = ["", "Fine-tuned finalists (held-out train images; the kept form is the one closest to the dense "
             "model by KL, training-free forms included):", "",
             f"| target | finalist | steps x batch | KL training-free | KL fine-tuned | {named} training-free | "
             f"{named} fine-tuned | chosen |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ft, metric = r["finetune"], r["metric"]
        steps, every = str(ft["steps"]), str(r["holdout_images"])
        for name in ft["candidates"]:
            entry = r["candidates"][name]
            tuned = entry["finetuned"][steps]
            chosen = f"yes ({ft['kept']})" if name == r["chosen"] else ""
            lines.append(f"| {r['target']} | {name} | {ft['steps']} x {ft['batch_size']} | "
                         f"{entry['holdout_kl'][every]:.4f} | {tuned['holdout_kl']:.4f} | "
                         f"{100 * entry['holdout_' + metric][every]:.2f} | {100 * tuned['holdout_' + metric]:.2f} | "
                         f"{chosen} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
