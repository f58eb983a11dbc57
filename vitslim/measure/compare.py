"""Methods x MACs budgets on one model: MACs, measured and ideal speed-up, accuracy, in one run."""
from __future__ import annotations

import copy
import platform
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import timm
import torch
from torch import nn
from tqdm.auto import tqdm

from vitslim._version import __version__
from vitslim.errors import VitslimError
from vitslim.families import family_of
from vitslim.measure.accuracy import evaluate
from vitslim.measure.macs import count_macs, default_input_size
from vitslim.measure.speed import check_timing, compare_speed, ideal_model, paired_ratio
from vitslim.patch import describe, is_patched, patch, unpatch

# Prebuilt models for run_compare: {name: model}, {name: (model, row info)} or [(name, model, row info)]
Prebuilt = Union[Mapping[str, Union[nn.Module, tuple[nn.Module, dict]]], Sequence[tuple[str, nn.Module, dict]]]

IDEAL = ":ideal"  # suffix of an ideal's name among the timed models
# how a model is run for timing and accuracy (e.g. vitslim.export.runtime with a backend and precision)
Runner = Callable[[nn.Module], nn.Module]

SPEED_PROTOCOL = ("round-robin timed runs in one process (each model beside its ideal); img/s from the median "
                  "time; speed-up and measured/ideal are medians of per-round paired ratios; ideal = dense "
                  "blocks on the same token counts")


def run_compare(model: nn.Module, methods: Sequence[str], budgets: Sequence[float], *,
                loader: Iterable | None = None, batch_size: int = 32, runs: int = 5, warmup: int = 2,
                threads: int | None = 2, precision: str = "fp32", allocator: str = "tuned",
                options: dict[str, dict] | None = None, models: Prebuilt | None = None,
                runner: Runner | None = None, runtime: dict[str, Any] | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Patch a copy of ``model`` per (method, budget), then measure all of them against dense.

    A model that is already patched (e.g. a fine-tuned checkpoint from ``vitslim.load``) is
    measured as it is, in a row named "METHOD (as loaded)", beside its unpatched weights as dense.
    ``models`` adds prebuilt models (e.g. exported, sliced ones) measured the same way, each beside
    its ideal: ``{"cdcp@0.5 (exported)": slim}`` or ``[(name, model, extra row fields)]``.
    ``runner`` turns every model (and every ideal) into the form that is timed and evaluated, e.g.
    ``functools.partial(vitslim.export.runtime, backend="compile")``; ``runtime`` describes it
    for the protocol (e.g. ``{"backend": "compile", "precision": "fp32"}``). MACs are counted on
    the models themselves.
    """
    check_timing(batch_size, runs, warmup, precision, allocator)  # before the slow patching
    dense, configs, rows = build_configs(model, methods, budgets, options or {}, progress)
    add_prebuilt(configs, rows, models)
    count_row_macs(rows, configs.values(), count_macs(dense))
    running = run_forms(configs, runner, progress)
    speeds = time_rows(rows, running, batch_size=batch_size, runs=runs, warmup=warmup, threads=threads,
                       precision=precision, allocator=allocator, progress=progress)
    if loader is not None:
        evaluate_rows(rows, [m for name, m in running.items() if not name.endswith(IDEAL)], loader,
                      threads=threads, progress=progress)
    return {"protocol": protocol(dense, speeds["dense"], batch_size=batch_size, runs=runs, warmup=warmup,
                                 precision=precision, runtime=runtime), "rows": rows}


def run_forms(configs: Mapping[str, nn.Module], runner: Runner | None = None,
              progress: bool = False) -> dict[str, nn.Module]:
    """Every model and, after each patched one, its ideal (``NAME:ideal``), each through ``runner`` if given."""
    running: dict[str, nn.Module] = {}
    for name, m in tqdm(list(configs.items()), desc="preparing runtimes", disable=not progress or runner is None,
                        leave=False):
        running[name] = runner(m) if runner is not None else m
        if name != "dense":
            ideal = ideal_model(m)
            running[name + IDEAL] = runner(ideal) if runner is not None else ideal
    return running


def _row(method: str, model: nn.Module, info: dict | None = None) -> dict[str, Any]:
    """A table row for a model: method name, budget (None: its measured MACs fraction), options, tokens."""
    described = describe(model)
    row = {"method": method, "budget": described["macs_target"], "options": described["options"],
           "tokens": [list(t) for t in described["tokens"]]}
    return {**row, **(info or {})}


def add_prebuilt(configs: dict[str, nn.Module], rows: list[dict[str, Any]], models: Prebuilt | None) -> None:
    """Append prebuilt models (``run_compare``'s ``models``) to the configs and rows, each under its own name."""
    for name, prebuilt, info in _prebuilt(models):
        if name in configs:
            raise VitslimError(f"models: the name {name!r} is taken by another row; give it another name")
        configs[name] = prebuilt.eval()
        rows.append(_row(name, prebuilt, info))


def _prebuilt(models: Prebuilt | None) -> list[tuple[str, nn.Module, dict]]:
    """``models`` of run_compare as (name, model, row info) triples."""
    if models is None:
        return []
    if isinstance(models, Mapping):
        items = [(name, *(m if isinstance(m, tuple) else (m, {}))) for name, m in models.items()]
    else:
        items = [tuple(item) for item in models]
    for item in items:
        if len(item) != 3 or not isinstance(item[1], nn.Module):
            raise VitslimError("models takes {name: model}, {name: (model, row info)} or [(name, model, row info)]")
    return items


def build_configs(model: nn.Module, methods: Sequence[str], budgets: Sequence[float],
                  options: Mapping[str, dict], progress: bool = False
                  ) -> tuple[nn.Module, dict[str, nn.Module], list[dict[str, Any]]]:
    """Dense, the loaded model (when ``model`` is patched) and one patched copy per (method, budget)."""
    model = model.eval()
    loaded = None
    if is_patched(model):
        loaded, model = model, unpatch(copy.deepcopy(model))
    configs: dict[str, nn.Module] = {"dense": model}
    rows: list[dict[str, Any]] = [{"method": "dense", "budget": 1.0, "options": {}}]
    if loaded is not None:
        name = f"{loaded.vitslim_config['method']} (as loaded)"
        configs[name] = loaded
        rows.append(_row(name, loaded))
    for method, budget in tqdm([(m, b) for m in methods for b in budgets], desc="patching (macs= search)",
                               disable=not progress, leave=False):
        patched = patch(copy.deepcopy(model), method, macs=budget, **options.get(method, {}))
        configs[f"{method}@{budget}"] = patched
        rows.append(_row(method, patched, {"budget": budget}))
    return model, configs, rows


def count_row_macs(rows: list[dict[str, Any]], models: Iterable[nn.Module], dense_macs: float) -> None:
    """GMACs and the fraction of dense per row; a row without a budget gets its measured fraction."""
    for row, m in zip(rows, models):
        row["gmacs"] = count_macs(m) / 1e9
        row["macs_ratio"] = row["gmacs"] * 1e9 / dense_macs
        if row["budget"] is None:  # e.g. a loaded model patched with native options
            row["budget"] = round(row["macs_ratio"], 3)


def time_rows(rows: list[dict[str, Any]], configs: Mapping[str, nn.Module], *, batch_size: int,
              **timing: Any) -> dict[str, dict]:
    """Time every model beside its ideal; fill img/s, p90, speed-up, ideal speed-up and measured/ideal.

    ``configs`` holds the models, or already the output of ``run_forms`` (models with their ideals).
    """
    timed = dict(configs) if any(name.endswith(IDEAL) for name in configs) else run_forms(configs)
    speeds = compare_speed(timed, batch_size, **timing)  # each model next to its ideal: paired rounds cancel drift
    dense = speeds["dense"]
    names = [name for name in timed if not name.endswith(IDEAL)]
    for row, name in zip(rows, names):
        row["images_per_s"] = speeds[name]["images_per_s"]
        row["p90_ms"] = speeds[name]["p90_ms"]
        row["speedup"] = paired_ratio(dense, speeds[name])
        if name != "dense":
            ideal = speeds[name + IDEAL]
            row["ideal_speedup"] = paired_ratio(dense, ideal)
            row["measured_over_ideal"] = paired_ratio(ideal, speeds[name])
    return speeds


def evaluate_rows(rows: list[dict[str, Any]], models: Iterable[nn.Module], loader: Iterable, *,
                  threads: int | None = 2, progress: bool = False) -> None:
    """Top-1/top-5 per row, and the top-1 change against the first (dense) row."""
    for row, m in tqdm(list(zip(rows, models)), desc="accuracy", disable=not progress):
        acc = evaluate(m, loader, progress=False, threads=threads)
        row.update(top1=acc["top1"], top5=acc["top5"], n=acc["n"])
    for row in rows:
        row["top1_delta"] = row["top1"] - rows[0]["top1"]


def protocol(dense: nn.Module, dense_speed: dict[str, Any], *, batch_size: int, runs: int, warmup: int,
             precision: str, runtime: dict[str, Any] | None = None) -> dict[str, Any]:
    """How the numbers were measured: input, timing settings, versions and machine (and the runtime, if any)."""
    runtime = runtime or {"backend": "eager", "precision": precision}
    return {
        "input_size": list(default_input_size(dense)), "batch_size": batch_size, "runs": runs,
        "warmup": warmup, "threads": dense_speed["threads"], "precision": runtime.get("precision", precision),
        "backend": runtime.get("backend", "eager"),
        "allocator": dense_speed["allocator"],
        "fused_attn": bool(family_of(dense).blocks(dense)[0].attn.fused_attn), "torch": torch.__version__,
        "timm": timm.__version__, "vitslim": __version__, "cpu": platform.processor() or platform.machine(),
        "speed": SPEED_PROTOCOL,
        "macs": "vitslim.count_macs (attention and reducer work included), per image",
    }
