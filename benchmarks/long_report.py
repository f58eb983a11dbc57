"""Collect long fine-tunes (benchmarks/long_finetune.sh) into a learning-curve table and plot.

Each run folder holds a finished run (summary.json) or an unfinished one (last.pt, a checkpoint
every 50 steps): both carry the evaluations made so far, so a run still training shows its curve
up to its last finished epoch and is marked unfinished. Beside each row: the measured DeiT-S
speed-up at the same MACs budget from the committed batch-32 speed tables.

    python benchmarks/long_report.py OUT RUN... --name NAME [--results benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any

import vitslim  # noqa: F401  (before timm: vitslim sets up the environment timm imports under)
from vitslim.io import atomic_write, write_png
from vitslim.train import read_checkpoint

SPEED_TABLES = "deit_s_*speed_b32.json"  # batch 32, the throughput tables of speed.sh


def run_state(folder: pathlib.Path) -> dict[str, Any]:
    """Where one run stands: its evaluations by epoch, steps done, and the command that made it."""
    if (folder / "summary.json").is_file():
        summary = json.loads((folder / "summary.json").read_text())
        history, steps, total, record = summary["history"], summary["steps"], summary["total_steps"], summary
        status = "finished"
    elif (folder / "last.pt").is_file():
        payload = read_checkpoint(folder / "last.pt")
        history, steps, total = payload["history"], payload["step"], payload["total_steps"]
        record, status = payload.get("run_record") or {}, "unfinished"
    else:
        return {"status": "not started", "curve": {}, "steps": 0, "total_steps": None, "command": None}
    curve = {int(r["epoch"]) + 1: r["top1"] for r in history if "top1" in r}  # 0 = before training
    return {"status": status, "curve": curve, "steps": steps, "total_steps": total,
            "command": record.get("command"), "method": record.get("method"), "macs": record.get("macs")}


def earlier_finished(report: pathlib.Path) -> dict[str, dict[str, Any]]:
    """The finished rows of an earlier report, by run (none when there is no report yet)."""
    if not report.is_file():
        return {}
    rows = [r for r in json.loads(report.read_text())["rows"] if r["status"] == "finished"]
    return {r["run"]: {**r, "curve": {int(e): top1 for e, top1 in r["curve"].items()}} for r in rows}


def deit_speedups(results: pathlib.Path, macs: float) -> dict[str, dict[str, Any]]:
    """Each method's measured DeiT-S batch-32 speed-up at ``macs`` from the committed speed tables."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(results.glob(SPEED_TABLES)):
        for row in json.loads(path.read_text()).get("rows", []):
            method = row["method"].split()[0]  # "cait (CAIT-style, ...)" in the CAIT tables
            if method != "dense" and abs(row["budget"] - macs) < 1e-6 and method not in found:
                found[method] = {"speedup": row["speedup"], "table": path.stem}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=pathlib.Path, help="folder holding one sub-folder per run")
    parser.add_argument("runs", nargs="+", help="run folder names; 'dense' is the control")
    parser.add_argument("--name", required=True)
    parser.add_argument("--results", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
    parser.add_argument("--speed-tables", type=pathlib.Path, default=pathlib.Path("benchmarks/results"),
                        help="where the DeiT-S speed tables are (default benchmarks/results)")
    parser.add_argument("--driver", default="bash benchmarks/long_finetune.sh",
                        help="the command that trains and resumes these runs, as the report quotes it")
    parser.add_argument("--pending", action="store_true",
                        help="only print the runs still to train (finished neither in OUT nor in the earlier report)")
    args = parser.parse_args()
    earlier = earlier_finished(args.results / f"{args.name}.json")
    if args.pending:
        print("\n".join(name for name in args.runs
                        if run_state(args.out / name)["status"] != "finished" and name not in earlier))
        return
    rows = []
    for name in args.runs:
        state = run_state(args.out / name)
        if state["status"] == "not started" and name in earlier:
            rows.append(earlier[name])
            continue
        exported = args.out / name / "exported.json"
        state["top1_exported"] = json.loads(exported.read_text())["top1"] if exported.is_file() else None
        rows.append({"run": name, **state})
    macs_values = {r["macs"] for r in rows if r.get("macs")}
    speeds = deit_speedups(args.speed_tables, macs_values.pop()) if len(macs_values) == 1 else {}
    for r in rows:
        speed = speeds.get(r.get("method") or "")
        r["deit_s_speedup_b32"] = speed["speedup"] if speed else None
        r["speed_table"] = speed["table"] if speed else None
    epochs = sorted({e for r in rows for e in r["curve"]})
    control = next((r["curve"] for r in rows if r["run"] == "dense"), {})

    def cell(r: dict[str, Any], epoch: int) -> str:
        if epoch not in r["curve"]:
            return "-"
        text = f"{r['curve'][epoch]:.2%}"
        if r["run"] != "dense" and epoch in control:
            text += f" ({100 * (r['curve'][epoch] - control[epoch]):+.2f})"
        return text

    header = ["run", "status", "DeiT-S speed-up (b32)"] + [
        "training-free" if e == 0 else f"epoch {e}" for e in epochs] + ["exported"]
    lines = [f"# {args.name}: the learning curve of long fine-tunes (CIFAR-10 reference ViT)", "",
             "Top-1 on the CIFAR-10 test set before training and after each epoch of one run per method (the "
             "epochs are points on that run's schedule, not separate shorter runs); in brackets the points "
             "against the dense control trained the same way at the same epoch. DeiT-S speed-up: batch 32, "
             "from the committed speed tables (another model: the speed the method's schedule gives).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        status = r["status"] if r["status"] != "unfinished" else f"unfinished ({r['steps']}/{r['total_steps']} steps)"
        speed = f"{r['deit_s_speedup_b32']:.2f}x" if r["deit_s_speedup_b32"] else "-"
        exported = f"{r['top1_exported']:.2%}" if r["top1_exported"] is not None else "-"
        lines.append("| " + " | ".join([r["run"], status, speed] + [cell(r, e) for e in epochs] + [exported]) + " |")
    lines += ["", f"Commands (one per run; rerun `{args.driver}` to resume all):", ""]
    lines += [f"    {r['command']}" for r in rows if r["command"]] + [""]
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write(args.results / f"{args.name}.md", "\n".join(lines))
    atomic_write(args.results / f"{args.name}.json",
                 json.dumps({"command": args.driver, "rows": rows}, indent=2) + "\n")
    plot(rows, args.results / f"{args.name}.png", args.name)
    print("\n".join(lines))


def plot(rows: list[dict[str, Any]], path: pathlib.Path, title: str) -> None:
    """Top-1 against epoch, one line per run (dense dashed; unfinished runs end where they stand)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if not r["curve"]:
            continue
        epochs = sorted(r["curve"])
        label = r["run"] + ("" if r["status"] == "finished" else " (unfinished)")
        ax.plot(epochs, [100 * r["curve"][e] for e in epochs], "--" if r["run"] == "dense" else "-o",
                label=label, markersize=3)
    ax.set_xlabel("epochs of fine-tuning (0 = training-free)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    write_png(fig, path)


if __name__ == "__main__":
    main()
