"""``vitslim auto``: the best training-free compressed model for a MACs, latency or speed-up target.

Every candidate (a method with a budget knob and one setting of its main options, ``candidates``)
is patched to the target, as measured here: ``macs=`` (the one budget search, within 2%), the
mildest level whose batch-1 latency here meets ``latency_ms`` (``vitslim.measure.fit_latency``), or
the mildest whose throughput at ``batch_size`` is ``speedup`` times the dense model's
(``vitslim.measure.fit_speedup``).
The candidates are then ranked on held-out images taken from the data's *train* split (never the
split the result is reported on) by their fidelity to the dense model, the mean KL divergence of
their predictions from the dense model's (top-1 is recorded beside it: on a few hundred images it
cannot separate near-lossless settings), by successive halving: all of them on the first quarter
of the held-out images, the better half on the first half, the best of those on all of them;
``time_budget`` stops the search early (the best on the images scored so far wins).
Methods that learn their reduction (SiT, SPViT) need fine-tuning and are not searched. Candidates that
score on data (Prune-and-Merge's calibration pass; CDCP/CAIT with ``importance="fluctuation"``) use
``calibration`` other train-split images, once per candidate.

Every measurement is written to ``OUT/auto_record.json`` as soon as it is made, so an interrupted
search resumes without measuring anything twice. The winner is written with
``vitslim.export.save`` (``OUT/model.safetensors``), evaluated on the report split, and the report
(``auto.md``, ``auto.json``: every candidate tried) and a plot (``auto.png``: held-out top-1
against the measured cost) go beside it. A target that no candidate meets is a ``VitslimError``
that names the cheapest setting found.
"""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from vitslim.budget import OutOfReach
from vitslim.data import balanced_subset, build_dataset
from vitslim.errors import VitslimError
from vitslim.export.files import save
from vitslim.families import family_of
from vitslim.io import atomic_write, write_png
from vitslim.measure.accuracy import evaluate
from vitslim.measure.latency_budget import fit_latency, fit_speedup
from vitslim.measure.macs import count_macs
from vitslim.methods.base import get_method
from vitslim.patch import check_runs_on, patch, unpatch

RECORD = "auto_record.json"
RUNGS = 3  # successive halving: a quarter, a half, then all of the held-out images
MACS_TOLERANCE = 0.02  # a candidate's measured MACs must be within 2% of the target


class Candidate(NamedTuple):
    """One setting the search tries: a name for the report, the method, its fixed options, and whether the
    method scores on calibration images (``calibration=``) before it is patched."""

    name: str
    method: str
    options: dict[str, Any]
    calibrated: bool = False


def candidates(model: nn.Module, methods: list[str] | None = None) -> list[Candidate]:
    """The training-free settings searched on ``model``: each method with a budget knob, and its main options."""
    depth = len(family_of(model).blocks(model))
    early = sorted({max(1, depth // 6), max(2, depth // 3), depth // 2})  # reduce sooner than the quarter points
    found = [
        Candidate("tome", "tome", {}),
        Candidate("evit", "evit", {}),
        Candidate("evit early", "evit", {"locations": early}),
        Candidate("topk", "topk", {}),
        Candidate("topk early", "topk", {"locations": early}),
        Candidate("atme", "atme", {}),
        Candidate("prune_merge", "prune_merge", {}),
        Candidate("prune_merge no prune", "prune_merge", {"prune_rate": 0.0}),
        Candidate("prune_merge calibrated", "prune_merge", {}, calibrated=True),  # the paper's scoring pass
        Candidate("cait tokens 0.5", "cait", {"token_share": 0.5}),
        Candidate("cait tokens 0.8", "cait", {"token_share": 0.8}),
        # channels scored on calibration images and held at their mean when pruned: the training-free choice
        Candidate("cait tokens 0.5 fluctuation", "cait", {"token_share": 0.5, "importance": "fluctuation"}, True),
        Candidate("cait tokens 0.8 fluctuation", "cait", {"token_share": 0.8, "importance": "fluctuation"}, True),
        Candidate("cdcp", "cdcp", {}),
        Candidate("cdcp fluctuation", "cdcp", {"importance": "fluctuation"}, calibrated=True),
    ]
    family = family_of(model)
    runnable = [c for c in found if get_method(c.method).runs_on(family.name)]
    if methods is not None:
        unknown = sorted(set(methods) - {c.method for c in found})
        if unknown:
            raise VitslimError(f"auto searches {', '.join(sorted({c.method for c in found}))}; not {', '.join(unknown)}"
                               " (SiT and SPViT learn their reduction: fine-tune them with vitslim train)")
        for method in methods:
            check_runs_on(get_method(method), family)
        runnable = [c for c in runnable if c.method in methods]
    return runnable


def auto(model: nn.Module, data: str, out: str | Path, *, macs: float | None = None,
         latency_ms: float | None = None, speedup: float | None = None, speed_batch: int = 32, runs: int = 5,
         holdout: int = 256, calibration: int = 256, report_limit: int | None = None, report_split: str = "test",
         methods: list[str] | None = None, time_budget: float | None = None, threads: int = 2, batch_size: int = 64,
         progress: bool = True, command: str | None = None) -> dict[str, Any]:
    """Search the candidates for one target (``macs``, ``latency_ms`` or ``speedup`` at ``speed_batch``), save the
    best in ``out``; the report as a dict."""
    if sum(t is not None for t in (macs, latency_ms, speedup)) != 1:
        raise VitslimError("give one target: macs=FRACTION, latency_ms=MS or speedup=FACTOR")
    if macs is not None and not 0.0 < macs <= 1.0:
        raise VitslimError(f"macs={macs} is out of range: give a fraction of the dense MACs in (0, 1]")
    if latency_ms is not None and latency_ms <= 0:
        raise VitslimError(f"latency_ms={latency_ms} must be a positive number of milliseconds")
    if speedup is not None and speedup <= 1.0:
        raise VitslimError(f"speedup={speedup} must be above 1 (a factor over the dense model's throughput)")
    if report_split == "train":
        raise VitslimError("auto ranks on held-out images of the train split: report on another split (--split test)")
    if holdout < 8:
        raise VitslimError(f"holdout={holdout} is too few images to rank settings: give at least 8")
    if calibration < 0:
        raise VitslimError(f"calibration={calibration} must be a number of images (0: no calibrated candidates)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if macs is not None:
        target = {"macs": macs}
    elif latency_ms is not None:
        target = {"latency_ms": latency_ms, "threads": threads}
    else:
        target = {"speedup": speedup, "batch_size": speed_batch, "threads": threads}
    dense = unpatch(copy.deepcopy(model)).eval()
    held_out, calibration_images = _train_images(dense, data, holdout, calibration)
    dense_logits, held_out_labels = _logits(dense, held_out, batch_size, threads)
    calibration_loader = (torch.utils.data.DataLoader(calibration_images, batch_size=32)
                          if len(calibration_images) else None)
    record = _open_record(out, {"target": target, "data": data, "holdout": len(held_out),
                                "calibration": len(calibration_images), "report_split": report_split})
    started = time.monotonic() - record.get("seconds", 0.0)  # a resumed search counts the time spent before
    todo = candidates(dense, methods)
    dense_macs = count_macs(dense)

    def budget_left() -> float | None:
        return None if time_budget is None else time_budget - (time.monotonic() - started)

    def save_record() -> None:
        record["seconds"] = round(time.monotonic() - started, 1)
        _write_record(out, record)

    built: dict[str, nn.Module] = {}
    prepared_options: dict[str, dict[str, Any]] = {}
    skipped: list[str] = []
    bar = tqdm(todo, desc="auto: patching to the target", disable=not progress, leave=False)
    for cand in bar:
        bar.set_postfix_str(cand.name if budget_left() is None else f"{cand.name}, {max(0.0, budget_left()):.0f} s left")
        entry = record["candidates"].get(cand.name)
        if entry is None and built and budget_left() is not None and budget_left() <= 0:
            skipped.append(cand.name)  # out of time: rank what was patched so far (a rerun measures the rest)
            continue
        if entry is not None and "error" in entry and "strongest" not in entry:
            continue
        try:  # once per candidate: its calibration pass, or a data-free method's own preparation
            prepared = _prepare(dense, cand, calibration_loader)
        except VitslimError as exc:
            entry = {"method": cand.method, "asked": cand.options, "error": str(exc)}
        else:
            prepared_options[cand.name] = prepared
        if entry is None:
            entry = _measure(dense, cand, prepared, target, dense_macs, runs)
        if cand.name not in record["candidates"]:
            record["candidates"][cand.name] = entry
            save_record()
        if "error" not in entry:
            built[cand.name] = _rebuild(dense, cand.method, {**prepared, **entry["options"]})
    if not built:
        raise VitslimError(_unreachable(target, record["candidates"],
                                        _strongest_found(dense, target, todo, prepared_options, record["candidates"],
                                                         held_out, dense_logits, held_out_labels, batch_size,
                                                         threads)))

    alive, scored = list(built), None
    for rung in range(RUNGS):
        n = min(len(held_out), max(8, math.ceil(len(held_out) / 2 ** (RUNGS - 1 - rung))))
        left = budget_left()
        if scored is not None and left is not None and left <= 0:
            break  # out of time: the best on the images scored so far
        bar = tqdm(alive, desc=f"auto: scoring on {n} held-out images", disable=not progress, leave=False)
        for name in bar:
            bar.set_postfix_str(name if left is None else f"{name}, {max(0.0, budget_left()):.0f} s left")
            entry = record["candidates"][name]
            if str(n) not in entry.setdefault("holdout_kl", {}):
                top1, kl = _score(built[name], torch.utils.data.Subset(held_out, range(n)), dense_logits[:n],
                                  batch_size, threads)
                entry.setdefault("holdout_top1", {})[str(n)] = top1
                entry["holdout_kl"][str(n)] = kl
                save_record()
        scored = str(n)
        # ranked by fidelity to the dense model (ties: the cheaper first)
        alive = sorted(alive, key=lambda c: (record["candidates"][c]["holdout_kl"][scored], _cost(record["candidates"][c])))
        if rung < RUNGS - 1:  # the better half goes on to twice the images
            alive = alive[:max(1, math.ceil(len(alive) / 2))]
    best = alive[0]
    chosen = built[best]
    save(chosen, out / "model.safetensors")
    report = build_dataset(data, report_split, model=dense, limit=report_limit, evaluation=True)
    loader = torch.utils.data.DataLoader(report, batch_size=batch_size)
    final = evaluate(chosen, loader, progress=False, threads=threads)
    dense_final = evaluate(dense, loader, progress=False, threads=threads)
    result = {
        "command": command, "target": target, "data": data, "report_split": report_split, "report_images": final["n"],
        "holdout_split": "train", "holdout_images": len(held_out), "holdout_indices": list(held_out.indices),
        "calibration_images": len(calibration_images), "calibration_indices": list(calibration_images.indices),
        "chosen": best, "method": record["candidates"][best]["method"], "options": record["candidates"][best]["options"],
        "macs_ratio": record["candidates"][best]["macs_ratio"], "top1": final["top1"], "top5": final["top5"],
        "dense_top1": dense_final["top1"], "seconds": round(time.monotonic() - started, 1),
        "candidates": record["candidates"], "not_measured": skipped,
    }
    atomic_write(out / "auto.json", json.dumps(result, indent=2) + "\n")
    atomic_write(out / "auto.md", _markdown(result))
    _plot(result, out / "auto.png")
    return result


def _train_images(model: nn.Module, data: str, holdout: int,
                  calibration: int) -> tuple[torch.utils.data.Subset, torch.utils.data.Subset]:
    """``holdout`` images of the train split to rank on and ``calibration`` others to score channels and
    tokens with, each spread over the classes (never the split reported on; never each other's)."""
    try:
        train = build_dataset(data, "train", model=model, evaluation=True)  # no augmentation: ranked as evaluated
    except VitslimError as exc:
        raise VitslimError(f"auto holds images out from the data's train split and found none ({exc})") from None
    keep = balanced_subset(train.targets, min(holdout, len(train)))
    order = torch.randperm(len(keep), generator=torch.Generator().manual_seed(0)).tolist()  # every prefix mixed
    taken = set(keep)
    rest = [i for i in range(len(train)) if i not in taken]
    chosen = balanced_subset([train.targets[i] for i in rest], min(calibration, len(rest))) if calibration and rest else []
    return (torch.utils.data.Subset(train, [keep[i] for i in order]),
            torch.utils.data.Subset(train, [rest[i] for i in chosen]))


def _prepare(dense: nn.Module, cand: Candidate, calibration: Any) -> dict[str, Any]:
    """The candidate's options after its method's one-time preparation (a calibration pass where it scores
    on data), so that budget searches and rebuilds do not repeat it."""
    options = dict(cand.options)
    if cand.calibrated:
        if calibration is None:
            raise VitslimError("no train images are left for calibration (give --calibration N, or more data)")
        options["calibration"] = calibration
    return get_method(cand.method).prepare(dense, options)


def _open_record(out: Path, header: dict[str, Any]) -> dict[str, Any]:
    """The search record in ``out``: resumed if it is for the same search, new otherwise; refused if it differs."""
    path = out / RECORD
    if path.is_file():
        record = json.loads(path.read_text())
        if {k: record.get(k) for k in header} != header:
            raise VitslimError(f"{path} records another search ({ {k: record.get(k) for k in header} }); "
                               "use a new --out folder")
        return record
    return {**header, "candidates": {}}


def _write_record(out: Path, record: dict[str, Any]) -> None:
    atomic_write(out / RECORD, json.dumps(record, indent=2) + "\n")


def _measure(dense: nn.Module, cand: Candidate, options: dict[str, Any], target: dict[str, Any], dense_macs: int,
             runs: int) -> dict[str, Any]:
    """Patch a copy of the dense model to the target with the prepared ``options``; its native options and measured
    cost (or why it cannot)."""
    model = copy.deepcopy(dense)
    measured: dict[str, Any] = {}
    try:
        if "macs" in target:
            patch(model, cand.method, macs=target["macs"], **options)
        elif "latency_ms" in target:
            record = fit_latency(model, target["latency_ms"], cand.method, threads=target["threads"], **options)
            measured["latency_ms"] = record["latency_ms"]
        else:
            record = fit_speedup(model, target["speedup"], cand.method, batch_size=target["batch_size"],
                                 threads=target["threads"], runs=runs, **options)
            measured["speedup"] = record["speedup"]
    except OutOfReach as exc:  # the strongest setting's cost, in the target's units (speed-ups, not 1/speed-up)
        strongest = 1.0 / exc.strongest if "speedup" in target else exc.strongest
        return {"method": cand.method, "asked": cand.options, "error": str(exc), "strongest": strongest}
    except VitslimError as exc:
        return {"method": cand.method, "asked": cand.options, "error": str(exc)}
    entry = {"method": cand.method, "asked": cand.options, "options": model.vitslim_config["options"],
             "macs_ratio": round(count_macs(model) / dense_macs, 4), **measured}
    macs = target.get("macs")
    if macs is not None and abs(entry["macs_ratio"] - macs) > MACS_TOLERANCE * macs:
        return {**entry, "error": f"measured {entry['macs_ratio']:.3f} of the dense MACs, not within 2% of {macs}"}
    return entry


def _rebuild(dense: nn.Module, method: str, options: dict[str, Any]) -> nn.Module:
    """A candidate from its recorded native options (no budget search again)."""
    return patch(copy.deepcopy(dense), method, **options).eval()


def _logits(model: nn.Module, images: torch.utils.data.Dataset, batch_size: int,
            threads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of ``model`` (as it is: the search builds its models in eval mode) and the labels of ``images``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    logits, labels = [], []
    try:
        with torch.inference_mode():
            for x, y in torch.utils.data.DataLoader(images, batch_size=batch_size):
                logits.append(model(x).float())
                labels.append(y)
    finally:
        torch.set_num_threads(previous)
    return torch.cat(logits), torch.cat(labels)


def _score(model: nn.Module, images: torch.utils.data.Dataset, dense_logits: torch.Tensor, batch_size: int,
           threads: int) -> tuple[float, float]:
    """Top-1 on ``images`` and the mean KL divergence of the model's predictions from the dense model's.

    The KL ranks: it measures what the compression changed on every image, not only where a label
    flips, so it separates settings that a few hundred images' top-1 cannot tell apart.
    """
    logits, labels = _logits(model, images, batch_size, threads)
    kl = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(dense_logits, 1), log_target=True, reduction="batchmean")
    return (logits.argmax(1) == labels).float().mean().item(), kl.item()


def _cost(entry: dict[str, Any]) -> float:
    """What the target measures, lower is better: latency, 1 / speed-up, or MACs."""
    if "latency_ms" in entry:
        return entry["latency_ms"]
    return 1.0 / entry["speedup"] if "speedup" in entry else entry["macs_ratio"]


def _strongest_found(dense: nn.Module, target: dict[str, Any], todo: list[Candidate],
                     prepared: dict[str, dict[str, Any]], entries: dict[str, dict],
                     held_out: torch.utils.data.Dataset, dense_logits: torch.Tensor, labels: torch.Tensor,
                     batch_size: int, threads: int) -> str | None:
    """When no candidate meets the target: the one whose strongest setting comes closest, and what that
    setting costs in held-out top-1 against the dense model (None when no candidate got that far)."""
    reached = [c for c in todo if "strongest" in entries.get(c.name, {}) and c.name in prepared]
    if not reached:
        return None
    speedup = "speedup" in target
    closest = (max if speedup else min)(reached, key=lambda c: entries[c.name]["strongest"])
    method_cls = get_method(closest.method)
    options = prepared[closest.name]
    model = _rebuild(dense, closest.method, method_cls.options_for_level(
        dense, method_cls.max_level(dense, **options), **options))
    top1 = _score(model, held_out, dense_logits, batch_size, threads)[0]
    dense_top1 = (dense_logits.argmax(1) == labels).float().mean().item()  # its logits are already computed
    cost = entries[closest.name]["strongest"]
    cost_text = (f"{cost:.2f}x" if speedup else f"{cost:.1f} ms" if "latency_ms" in target
                 else f"{cost:.3f} of the dense MACs")
    return (f"the closest is {closest.name} at its strongest setting ({cost_text}), with {top1:.2%} "
            f"held-out top-1 against the dense model's {dense_top1:.2%}")


def _unreachable(target: dict[str, Any], entries: dict[str, dict], closest: str | None = None) -> str:
    """One line: the target, the setting that comes closest and its accuracy, and what each method reaches."""
    key = next(k for k in ("macs", "latency_ms", "speedup") if k in target)
    what = f"{key}={target[key]}"
    reasons = "; ".join(f"{name}: {entry['error']}" for name, entry in entries.items())
    return f"no setting meets {what} on this machine{'; ' + closest if closest else ''} ({reasons})"


def _markdown(result: dict[str, Any]) -> str:
    target = ", ".join(f"{k} {v}" for k, v in result["target"].items())
    lines = [f"# vitslim auto: {target}", ""]
    if result["command"]:
        lines += ["Command:", "", f"    {result['command']}", ""]
    lines += [f"Chosen: **{result['chosen']}** ({result['method']}, options {result['options']}), "
              f"{result['macs_ratio']:.3f} of the dense MACs; top-1 {result['top1']:.2%} on {result['report_images']} "
              f"images of the {result['report_split']} split (dense {result['dense_top1']:.2%}). Search: "
              f"{result['seconds']:.0f} s; candidates ranked by their predictions' KL divergence from the dense "
              f"model's on {result['holdout_images']} held-out images of the train split (successive halving).", "",
              "| candidate | method | MACs ratio | batch-1 ms | speed-up | held-out KL to dense | held-out top-1 "
              "(images) | note |",
              "|---|---|---|---|---|---|---|---|"]
    if result["not_measured"]:  # the time budget ran out before these were patched
        lines[-2:-2] = [f"Not measured (time budget spent): {', '.join(result['not_measured'])}.", ""]
    for name, entry in result["candidates"].items():
        scores = entry.get("holdout_top1", {})
        last = max(scores, key=int) if scores else None
        score = f"{scores[last]:.2%} ({last})" if last else "-"
        ms = f"{entry['latency_ms']:.1f}" if "latency_ms" in entry else "-"
        fast = f"{entry['speedup']:.2f}x" if "speedup" in entry else "-"
        macs = f"{entry['macs_ratio']:.3f}" if "macs_ratio" in entry else "-"
        kl = f"{entry['holdout_kl'][last]:.4f}" if last and last in entry.get("holdout_kl", {}) else "-"
        lines.append(f"| {name} | {entry['method']} | {macs} | {ms} | {fast} | {kl} | {score} | "
                     f"{entry.get('error', '')} |")
    return "\n".join(lines) + "\n"


def _plot(result: dict[str, Any], path: Path) -> Path:
    """Held-out top-1 (on the most images each candidate was scored on) against its measured cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = next((k for k in ("latency_ms", "speedup") if k in result["target"]), "macs_ratio")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, entry in result["candidates"].items():
        scores = entry.get("holdout_top1")
        if not scores:
            continue
        x = entry[key]
        y = 100 * scores[max(scores, key=int)]
        ax.scatter([x], [y], marker="*" if name == result["chosen"] else "o", s=120 if name == result["chosen"] else 30)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel({"latency_ms": "batch-1 latency here (ms)", "speedup": "throughput speed-up here",
                   "macs_ratio": "MACs (fraction of dense)"}[key])
    ax.set_ylabel("held-out top-1 (%)")
    ax.set_title("vitslim auto: every candidate (star: chosen)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return write_png(fig, path, dpi=120)
