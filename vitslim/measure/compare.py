"""Methods x MACs budgets on one model: MACs, measured and ideal speed-up, accuracy, in one run."""
from __future__ import annotations

import copy
import platform
from typing import Any, Iterable, Sequence

import timm
import torch
from torch import nn
from tqdm.auto import tqdm

import vitslim
from vitslim.measure.accuracy import evaluate
from vitslim.measure.macs import count_macs, default_input_size
from vitslim.measure.speed import compare_speed, ideal_model, paired_ratio


def run_compare(model: nn.Module, methods: Sequence[str], budgets: Sequence[float], *,
                loader: Iterable | None = None, batch_size: int = 32, runs: int = 5, warmup: int = 2,
                threads: int | None = 2, precision: str = "fp32", allocator: str = "tuned",
                options: dict[str, dict] | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Patch a copy of ``model`` per (method, budget), then measure all of them against dense.

    A model that is already patched (e.g. a fine-tuned checkpoint from ``vitslim.load``) is
    measured as it is, in a row named "METHOD (as loaded)", beside its unpatched weights as dense.
    """
    options = options or {}
    model = model.eval()
    loaded = None
    if vitslim.is_patched(model):
        loaded, model = model, vitslim.unpatch(copy.deepcopy(model))
    configs: dict[str, nn.Module] = {"dense": model}
    rows: list[dict[str, Any]] = [{"method": "dense", "budget": 1.0, "options": {}}]
    if loaded is not None:
        cfg = loaded.vitslim_config
        name = f"{cfg['method']} (as loaded)"
        configs[name] = loaded
        rows.append({"method": name, "budget": cfg["macs_target"], "options": cfg["options"],
                     "tokens": [list(t) for t in vitslim.describe(loaded)["tokens"]]})
    for method, budget in tqdm([(m, b) for m in methods for b in budgets], desc="patching (macs= search)",
                               disable=not progress, leave=False):
        patched = vitslim.patch(copy.deepcopy(model), method, macs=budget, **options.get(method, {}))
        configs[f"{method}@{budget}"] = patched
        described = vitslim.describe(patched)
        rows.append({"method": method, "budget": budget, "options": described["options"],
                     "tokens": [list(t) for t in described["tokens"]]})
    dense_macs = count_macs(model)
    for row, m in zip(rows, configs.values()):
        row["gmacs"] = count_macs(m) / 1e9
        row["macs_ratio"] = row["gmacs"] * 1e9 / dense_macs
        if row["budget"] is None:  # a loaded model patched with native options: its measured fraction
            row["budget"] = round(row["macs_ratio"], 3)
    timed: dict[str, nn.Module] = {}
    for name, m in configs.items():  # each model next to its ideal: paired rounds cancel drift
        timed[name] = m
        if name != "dense":
            timed[name + ":ideal"] = ideal_model(m)
    speeds = compare_speed(timed, batch_size, runs=runs, warmup=warmup, threads=threads,
                           precision=precision, allocator=allocator, progress=progress)
    dense = speeds["dense"]
    for row, name in zip(rows, configs):
        row["images_per_s"] = speeds[name]["images_per_s"]
        row["p90_ms"] = speeds[name]["p90_ms"]
        row["speedup"] = paired_ratio(dense, speeds[name])
        if name != "dense":
            ideal = speeds[name + ":ideal"]
            row["ideal_speedup"] = paired_ratio(dense, ideal)
            row["measured_over_ideal"] = paired_ratio(ideal, speeds[name])
    if loader is not None:
        for row, (name, m) in tqdm(list(zip(rows, configs.items())), desc="accuracy", disable=not progress):
            acc = evaluate(m, loader, progress=False, threads=threads)
            row.update(top1=acc["top1"], top5=acc["top5"], n=acc["n"])
        for row in rows:
            row["top1_delta"] = row["top1"] - rows[0]["top1"]
    protocol = {
        "input_size": list(default_input_size(model)), "batch_size": batch_size, "runs": runs,
        "warmup": warmup, "threads": speeds["dense"]["threads"], "precision": precision,
        "allocator": speeds["dense"]["allocator"],
        "fused_attn": bool(model.blocks[0].attn.fused_attn), "torch": torch.__version__,
        "timm": timm.__version__, "vitslim": vitslim.__version__, "cpu": platform.processor() or platform.machine(),
        "speed": "round-robin timed runs in one process (each model beside its ideal); img/s from the median "
                 "time; speed-up and measured/ideal are medians of per-round paired ratios; ideal = dense "
                 "blocks on the same token counts",
        "macs": "vitslim.count_macs (attention and reducer work included), per image",
    }
    return {"protocol": protocol, "rows": rows}
