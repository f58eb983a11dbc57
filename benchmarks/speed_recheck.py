"""Committed speed tables against a rerun of the same tables: speed-up and measured/ideal, row by row.

    VITSLIM_BENCH_RESULTS=benchmarks/results/recheck bash benchmarks/speed.sh tome sit
    python benchmarks/speed_recheck.py benchmarks/results benchmarks/results/recheck --name speed_recheck

Every NEW/deit_s_*speed*.json is paired with the file of the same name in COMMITTED; rows are matched
by method (its first word: "cdcp (exported)" is cdcp) and budget. The report (NAME.{md,json} in NEW)
lists both values and new/committed for each, and the median of those ratios per table. Timings on a
2-core machine move by 10-15% between runs; the paired speed-ups move less.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

METRICS = ("speedup", "measured_over_ideal")


def _rows(path: Path) -> dict[tuple[str, float], dict]:
    rows = json.loads(path.read_text())["rows"]
    return {(row["method"].split()[0], round(float(row["budget"]), 3)): row for row in rows}


def compare(committed: Path, new: Path) -> list[dict]:
    """One record per table present in both folders: the matched rows and the median ratios."""
    tables = []
    for path in sorted(new.glob("deit_s_*speed*.json")):
        if not (committed / path.name).is_file():
            continue
        old_rows, new_rows = _rows(committed / path.name), _rows(path)
        rows = []
        for key in old_rows.keys() & new_rows.keys():
            if key[0] == "dense":
                continue
            row = {"method": key[0], "budget": key[1]}
            for metric in METRICS:
                old, now = old_rows[key].get(metric), new_rows[key].get(metric)
                row[f"{metric}_committed"], row[f"{metric}_new"] = old, now
                row[f"{metric}_ratio"] = round(now / old, 3) if old and now else None
            rows.append(row)
        rows.sort(key=lambda r: (r["method"], r["budget"]))
        medians = {m: statistics.median(r[f"{m}_ratio"] for r in rows if r[f"{m}_ratio"] is not None)
                   for m in METRICS if any(r[f"{m}_ratio"] is not None for r in rows)}
        tables.append({"table": path.stem, "rows": rows, "median_ratio": medians})
    return tables


def to_markdown(tables: list[dict], command: str) -> str:
    """The report: per table, committed and new speed-up and measured/ideal for every row."""
    lines = ["# Speed tables: committed against a rerun", "", "Command:", "", f"    {command}", ""]
    for table in tables:
        med = ", ".join(f"{m} {v:.3f}" for m, v in table["median_ratio"].items())
        lines += [f"## {table['table']}", "", f"median new/committed: {med}", "",
                  "| method | budget | speed-up committed | new | new/committed | measured/ideal committed | new | new/committed |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in table["rows"]:
            cells = [r["method"], f"{r['budget']:.2f}"]
            for m in METRICS:
                cells += [_fmt(r[f"{m}_committed"]), _fmt(r[f"{m}_new"]), _fmt(r[f"{m}_ratio"])]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    """Compare and write NAME.{md,json} into the new results' folder."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("committed", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--name", default="speed_recheck")
    args = parser.parse_args(argv)
    tables = compare(args.committed, args.new)
    if not tables:
        print(f"speed_recheck.py: error: no deit_s_*speed*.json in {args.new} has a committed twin in "
              f"{args.committed}", file=sys.stderr)
        return 2
    command = "python benchmarks/speed_recheck.py " + " ".join(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from vitslim.io import atomic_write

    atomic_write(args.new / f"{args.name}.json", json.dumps({"command": command, "tables": tables}, indent=2) + "\n")
    atomic_write(args.new / f"{args.name}.md", to_markdown(tables, command))
    print(to_markdown(tables, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
