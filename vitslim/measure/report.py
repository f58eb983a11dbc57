"""Tables (terminal and markdown), JSON and the accuracy-vs-throughput plot for compare results."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vitslim.io import atomic_write, write_png

COLUMNS = [  # (key, header, format)
    ("method", "method", "{}"),
    ("budget", "MACs target", "{:.2f}"),
    ("gmacs", "GMACs", "{:.4f}"),
    ("macs_ratio", "MACs ratio", "{:.3f}"),
    ("images_per_s", "img/s", "{:.1f}"),
    ("speedup", "speed-up", "{:.2f}x"),
    ("ideal_speedup", "ideal", "{:.2f}x"),
    ("measured_over_ideal", "measured/ideal", "{:.3f}"),
    ("top1", "top-1 %", "{:.2%}"),
    ("top1_delta", "delta top-1", "{:+.2%}"),
    ("miou", "mIoU %", "{:.2%}"),
    ("miou_delta", "delta mIoU", "{:+.2%}"),
]


# speed at further batch sizes (dense compare): KEY_batchN columns after the main speed columns
BATCH_COLUMNS = [("images_per_s", "img/s", "{:.1f}"), ("speedup", "speed-up", "{:.2f}x"),
                 ("ideal_speedup", "ideal", "{:.2f}x")]
METRICS = {"top1": "top-1 (%)", "miou": "mIoU (%)"}  # what the accuracy-vs-throughput plot can show


Columns = list[tuple[str, str, str]]  # (key, header, format), as COLUMNS


def _columns(rows: list[dict[str, Any]], columns: Columns | None = None) -> Columns:
    if columns is not None:
        return [c for c in columns if any(c[0] in r for r in rows)]
    sizes = sorted({int(k.rsplit("_batch", 1)[1]) for r in rows for k in r if k.startswith("speedup_batch")})
    extra = [(f"{key}_batch{b}", f"{header} (batch {b})", fmt) for b in sizes for key, header, fmt in BATCH_COLUMNS]
    at = [c[0] for c in COLUMNS].index("measured_over_ideal") + 1
    return [c for c in COLUMNS[:at] + extra + COLUMNS[at:] if any(c[0] in r for r in rows)]


def _cells(rows: list[dict[str, Any]], columns: Columns | None = None) -> tuple[list[str], list[list[str]]]:
    cols = _columns(rows, columns)
    body = [[fmt.format(r[key]).replace("%", "") if key in r else "-" for key, _, fmt in cols] for r in rows]
    return [h for _, h, _ in cols], body


def format_table(rows: list[dict[str, Any]], columns: Columns | None = None) -> str:
    """A plain-text table for the terminal (``columns``: which, default COLUMNS)."""
    headers, body = _cells(rows, columns)
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, body)])


def to_markdown(result: dict[str, Any], title: str, command: str | None = None,
                columns: Columns | None = None) -> str:
    """A markdown report: title, the command that made it, the protocol and the table."""
    headers, body = _cells(result["rows"], columns)
    out = [f"# {title}", ""]
    if command:
        out += ["Command:", "", f"    {command}", ""]
    out += ["Protocol: " + ", ".join(f"{k} {v}" for k, v in result["protocol"].items()), ""]
    out += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(out) + "\n"


def save_report(result: dict[str, Any], out_dir: str | Path, name: str, title: str,
                command: str | None = None, plot: bool = True, columns: Columns | None = None) -> list[Path]:
    """Write NAME.json, NAME.md and (with accuracy) NAME.png into ``out_dir``; return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.md"]
    atomic_write(paths[0], json.dumps({"command": command, **result}, indent=2) + "\n")
    atomic_write(paths[1], to_markdown(result, title, command, columns))
    metric = next((key for key in METRICS if all(key in r for r in result["rows"])), None)
    if plot and metric is not None:
        paths.append(plot_accuracy_vs_throughput(result, out_dir / f"{name}.png", title, metric))
    return paths


def plot_accuracy_vs_throughput(result: dict[str, Any], path: str | Path, title: str = "",
                                metric: str = "top1") -> Path:
    """Top-1 (or mIoU: ``metric``) against measured throughput, one line per method, dense as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    rows = result["rows"]
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
        pts = sorted((r["images_per_s"], 100 * r[metric], r["budget"]) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        for x, y, b in pts:
            ax.annotate(f"{b:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    dense = rows[0]
    ax.scatter([dense["images_per_s"]], [100 * dense[metric]], marker="*", s=160, color="black", label="dense", zorder=3)
    proto = result["protocol"]
    ax.set_xlabel(f"throughput (images/s, batch {proto['batch_size']}, {proto['threads']} threads, {proto['precision']})")
    ax.set_ylabel(METRICS[metric])
    ax.set_title(title or "accuracy vs throughput (labels: MACs target)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return write_png(fig, path, dpi=120)
