"""``vitslim auto``: the best training-free compressed model for a MACs, latency or speed-up target.

Every candidate (a method with a budget knob and one setting of its main options, ``candidates``)
is patched to the target, as measured here: ``macs=`` (the one budget search, within 2%), the
mildest level whose batch-1 latency here meets ``latency_ms`` (``vitslim.measure.fit_latency``), or
the mildest whose throughput at ``batch_size`` is ``speedup`` times the dense model's
(``vitslim.measure.fit_speedup``). Latency and speed-up are timed on the deployable form run by
``backend`` at ``precision`` (``vitslim.export.runtime``), and the candidates are scored at that
precision, so the target and the ranking are the deployed model's.
The candidates are then ranked on held-out images taken from the data's *train* split (never the
split the result is reported on) by their fidelity to the dense model, the mean KL divergence of
their predictions from the dense model's (the task's metric, top-1 or mIoU, is recorded beside it:
on a few hundred images it cannot separate near-lossless settings), by successive halving: all of
them on the first quarter of the held-out images, the better half on the first half, the best of
those on all of them; ``time_budget`` stops the search early (the best on the images scored so far
wins). What differs per task (classification, or segmentation under a trained head) is in
``vitslim.autosearch_tasks``.
Methods that learn their reduction (SiT, SPViT) need fine-tuning and are not searched. Candidates that
score on data (Prune-and-Merge's calibration pass; CDCP/CAIT with ``importance="fluctuation"``) use
``calibration`` other train-split images, once per candidate.

Every measurement is written to ``OUT/auto_record.json`` as soon as it is made, so an interrupted
search resumes without measuring anything twice. The winner is written in the task's deployment
format (``vitslim.export.save``: ``OUT/model.safetensors``; a segmentation checkpoint ``OUT/model.pt``;
also ``OUT/model.onnx`` for the onnxruntime backend), evaluated on the report split, and the report
(``auto.md``, ``auto.json``: every candidate tried) and a plot (``auto.png``: the held-out metric
against the measured cost) go beside it. A target that no candidate meets is a ``VitslimError``
that names the setting that comes closest.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from vitslim.autosearch_tasks import SearchTask, search_task
from vitslim.budget import OutOfReach
from vitslim.data import balanced_subset
from vitslim.errors import VitslimError
from vitslim.export.inference import check_runtime
from vitslim.export.onnx import to_onnx
from vitslim.export.runtime import runtime
from vitslim.families import family_of
from vitslim.io import atomic_write, write_png
from vitslim.measure.latency_budget import Runner, fit_latency, fit_speedup
from vitslim.measure.macs import count_macs
from vitslim.measure.speed import torch_threads
from vitslim.methods.base import get_method
from vitslim.patch import check_runs_on, patch, unpatch
from vitslim.train.config import TrainConfig
from vitslim.train.engine import fit, resume_path, teacher_copy

RECORD = "auto_record.json"
RUNGS = 3  # successive halving: a quarter, a half, then all of the held-out images
MACS_TOLERANCE = 0.02  # a candidate's measured MACs must be within 2% of the target
FINETUNE_KD = 0.5  # the fine-tune's distillation weight (convex with the label loss, DeiT-style)


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
        Candidate("tome decreasing", "tome", {"inflection": -0.5}),  # ToMe's schedule: more merges early
        Candidate("evit", "evit", {}),
        Candidate("evit early", "evit", {"locations": early}),
        Candidate("topk", "topk", {}),
        Candidate("topk early", "topk", {"locations": early}),
        Candidate("atme", "atme", {}),
        Candidate("atme two merges", "atme", {"merges": 2}),  # fewer, earlier merges than the default's three
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
         task: str | None = None, backend: str = "eager", precision: str = "fp32", holdout: int = 256,
         calibration: int = 256, report_limit: int | None = None, report_split: str = "test",
         methods: list[str] | None = None, time_budget: float | None = None, finetune_steps: int | None = None,
         finetune_top: int = 3, finetune_batch: int = 32, finetune_lr: float = 1e-4, threads: int = 2,
         batch_size: int = 64, progress: bool = True, command: str | None = None) -> dict[str, Any]:
    """Search the candidates for one target (``macs``, ``latency_ms`` or ``speedup`` at ``speed_batch``, timed with
    ``backend`` at ``precision``), save the best in ``out``; the report as a dict.

    ``task``: "classify" or "segment" (default: segment for a ``vitslim.dense.SegmentationModel``).
    ``finetune_steps``: the best ``finetune_top`` after the halving are fine-tuned that many steps with
    distillation from the dense model (``_finetune``) and re-ranked; the best of them is the one saved.
    """
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
    if finetune_steps is not None and (finetune_steps < 1 or finetune_top < 1 or finetune_batch < 1):
        raise VitslimError("finetune_steps, finetune_top and finetune_batch must be at least 1")
    check_runtime(backend, precision)
    searched = search_task(model, task)
    if searched.name == "segment" and (backend, precision) != ("eager", "fp32"):
        raise VitslimError("auto --task segment measures and scores eager fp32 models: drop --backend/--precision "
                           "(export the chosen backbone afterwards with vitslim export)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if macs is not None:
        target = {"macs": macs}
    elif latency_ms is not None:
        target = {"latency_ms": latency_ms, "threads": threads}
    else:
        target = {"speedup": speedup, "batch_size": speed_batch, "threads": threads}
    deployed = {"backend": backend, "precision": precision}
    dense = unpatch(searched.backbone()).eval()
    held_out, calibration_images = _train_images(searched, data, holdout, calibration)
    score_form = _score_form(backend, precision, threads)
    dense_outputs, dense_quality = _outputs(searched, score_form(searched.assemble(dense)), held_out, batch_size,
                                            threads)
    calibration_loader = (torch.utils.data.DataLoader(searched.calibration_data(calibration_images), batch_size=32)
                          if len(calibration_images) else None)
    header = {"target": target, "data": data, "holdout": len(held_out), "calibration": len(calibration_images),
              "report_split": report_split}
    if searched.name != "classify" or deployed != {"backend": "eager", "precision": "fp32"}:  # older records match
        header.update(task=searched.name, **deployed)
    record = _open_record(out, header)
    started = time.monotonic() - record.get("seconds", 0.0)  # a resumed search counts the time spent before
    todo = candidates(dense, methods)
    dense_macs = count_macs(dense)
    runner = None if deployed == {"backend": "eager", "precision": "fp32"} else (
        lambda m: runtime(m, backend, precision, threads=threads))
    held_key = f"holdout_{searched.metric}"

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
            entry = _measure(dense, cand, prepared, target, dense_macs, runs, runner)
        if cand.name not in record["candidates"]:
            record["candidates"][cand.name] = entry
            save_record()
        if "error" not in entry:
            built[cand.name] = _rebuild(dense, cand.method, {**prepared, **entry["options"]})
    if not built:
        raise VitslimError(_unreachable(target, record["candidates"],
                                        _strongest_found(searched, dense, target, todo, prepared_options,
                                                         record["candidates"], held_out, dense_quality, batch_size,
                                                         threads, score_form)))

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
                quality, kl = _score(searched, score_form(searched.assemble(built[name])),
                                     torch.utils.data.Subset(held_out, range(n)), dense_outputs[:n], batch_size,
                                     threads)
                entry.setdefault(held_key, {})[str(n)] = quality
                entry["holdout_kl"][str(n)] = kl
                save_record()
        scored = str(n)
        # ranked by fidelity to the dense model (ties: the cheaper first)
        alive = sorted(alive, key=lambda c: (record["candidates"][c]["holdout_kl"][scored], _cost(record["candidates"][c])))
        if rung < RUNGS - 1:  # the better half goes on to twice the images
            alive = alive[:max(1, math.ceil(len(alive) / 2))]
    best = alive[0]
    chosen = searched.assemble(built[best])
    finetune = None
    if finetune_steps:
        finetune = {"steps": finetune_steps, "batch_size": finetune_batch, "lr": finetune_lr,
                    "candidates": _ranking(record["candidates"], list(built))[:finetune_top],
                    "kd_weight": FINETUNE_KD, "label_smoothing": 0.1}
        best, chosen = _finetune(searched, data, dense, {n: built[n] for n in finetune["candidates"]}, held_out,
                                 dense_outputs, finetune, out, record, save_record, score_form, batch_size, threads,
                                 progress)
    entry = record["candidates"][best]
    files = [searched.save(chosen, out, {"method": entry["method"], "options": entry["options"], "command": command,
                                         **deployed})]
    if backend == "onnxruntime":  # the graph the target was timed on (checked against the model by to_onnx)
        files.append(to_onnx(chosen, out / "model.onnx", batch="dynamic", precision=precision))
    final = searched.report(score_form(chosen), data, report_split, report_limit, batch_size, threads)
    dense_final = searched.report(score_form(searched.assemble(dense)), data, report_split, report_limit, batch_size,
                                  threads)
    metric = searched.metric
    result = {
        "command": command, "task": searched.name, "metric": metric, "target": target, **deployed, "data": data,
        "report_split": report_split, "report_images": final["n"],
        "holdout_split": "train", "holdout_images": len(held_out), "holdout_indices": list(held_out.indices),
        "calibration_images": len(calibration_images), "calibration_indices": list(calibration_images.indices),
        "chosen": best, "method": entry["method"], "options": entry["options"], "macs_ratio": entry["macs_ratio"],
        **{k: v for k, v in final.items() if k != "n"}, f"dense_{metric}": dense_final[metric],
        "finetune": finetune, "files": [p.name for p in files], "seconds": round(time.monotonic() - started, 1),
        "candidates": record["candidates"], "not_measured": skipped,
    }
    atomic_write(out / "auto.json", json.dumps(result, indent=2) + "\n")
    atomic_write(out / "auto.md", _markdown(result))
    _plot(result, out / "auto.png")
    return result


def _train_images(task: SearchTask, data: str, holdout: int,
                  calibration: int) -> tuple[torch.utils.data.Subset, torch.utils.data.Subset]:
    """``holdout`` images of the train split to rank on and ``calibration`` others to score channels and
    tokens with, each spread over the classes where images have one (never the split reported on; never each
    other's)."""
    try:
        train, classes = task.train_split(data)
    except VitslimError as exc:
        raise VitslimError(f"auto holds images out from the data's train split and found none ({exc})") from None
    shuffle = torch.Generator().manual_seed(0)
    if classes is None:  # no class per image: a seeded random draw
        classes = [0] * len(train)
    keep = balanced_subset(classes, min(holdout, len(train)))
    order = torch.randperm(len(keep), generator=shuffle).tolist()  # every prefix mixed
    taken = set(keep)
    rest = [i for i in range(len(train)) if i not in taken]
    chosen = balanced_subset([classes[i] for i in rest], min(calibration, len(rest))) if calibration and rest else []
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
             runs: int, runner: Runner = None) -> dict[str, Any]:
    """Patch a copy of the dense model to the target with the prepared ``options`` (timed as ``runner`` makes it);
    its native options and measured cost (or why it cannot)."""
    model = copy.deepcopy(dense)
    measured: dict[str, Any] = {}
    try:
        if "macs" in target:
            patch(model, cand.method, macs=target["macs"], **options)
        elif "latency_ms" in target:
            record = fit_latency(model, target["latency_ms"], cand.method, threads=target["threads"], runner=runner,
                                 **options)
            measured["latency_ms"] = record["latency_ms"]
        else:
            record = fit_speedup(model, target["speedup"], cand.method, batch_size=target["batch_size"],
                                 threads=target["threads"], runs=runs, runner=runner, **options)
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


def _ranking(entries: dict[str, dict], names: list[str]) -> list[str]:
    """``names`` best first: those scored on more held-out images (they survived more rungs) ahead, then by
    held-out KL on the most images each was scored on, then the cheaper."""
    def key(name: str) -> tuple[int, float, float]:
        scored = entries[name]["holdout_kl"]
        most = max(scored, key=int)
        return -int(most), scored[most], _cost(entries[name])
    return sorted((n for n in names if entries[n].get("holdout_kl")), key=key)


def _finetune(task: SearchTask, data: str, dense: nn.Module, finalists: dict[str, nn.Module],
              held_out: torch.utils.data.Subset, dense_outputs: torch.Tensor, finetune: dict[str, Any], out: Path,
              record: dict[str, Any], save_record: Callable[[], None], score_form: Callable[[nn.Module], nn.Module],
              batch_size: int, threads: int, progress: bool) -> tuple[str, nn.Module]:
    """Fine-tune each finalist (a copy, head included) through the training engine: ``finetune["steps"]`` steps
    on the train images that are not held out, logit (or, for segmentation, feature) distillation from the dense
    model; re-score it on all the held-out images. The closest to the dense model by held-out KL among the
    fine-tuned finalists *and* their training-free forms (a near-lossless setting can drift in training: then
    it is kept as it was; ``finetune["kept"]`` says which), and its model.

    Each run checkpoints in ``OUT/finetune/NAME-STEPSsteps`` and resumes from there; its held-out scores go to
    the record (``finetuned``), so a rerun trains and scores nothing twice.
    """
    steps, key = finetune["steps"], str(finetune["steps"])
    config = TrainConfig(max_steps=steps, batch_size=finetune["batch_size"], lr=finetune["lr"], warmup_epochs=0.0,
                         weight_decay=0.05, label_smoothing=finetune["label_smoothing"],
                         kd_weight=finetune["kd_weight"], kd_mode="convex", eval_every=0, checkpoint_every=50,
                         seed=0)
    train = task.training_images(data, config)
    held = set(held_out.indices)
    images = torch.utils.data.Subset(train, [i for i in range(len(train)) if i not in held])
    if len(images) < config.batch_size:
        raise VitslimError(f"fine-tuning needs at least one batch of {config.batch_size} train images beyond the "
                           f"{len(held)} held out; the split has {len(images)}: lower --finetune-batch-size")
    config = dataclasses.replace(config, epochs=max(1, math.ceil(steps / (len(images) // config.batch_size))))
    teacher = teacher_copy(dense)
    held_key, every = f"holdout_{task.metric}", str(len(held_out))
    tuned: dict[str, nn.Module] = {}
    with torch_threads(threads):
        for name, backbone in finalists.items():
            entry = record["candidates"][name]
            if every not in entry["holdout_kl"]:  # a finalist out in an earlier rung: its before, on every image
                quality, kl = _score(task, score_form(task.assemble(backbone)), held_out, dense_outputs, batch_size,
                                     threads)
                entry[held_key][every], entry["holdout_kl"][every] = quality, kl
                save_record()
            model = copy.deepcopy(task.assemble(backbone))  # the head too: it trains with the backbone
            folder = out / "finetune" / f"{name.replace(' ', '_')}-{steps}steps"
            fit(model, images, teacher=teacher, config=config, out_dir=folder, resume=resume_path("auto", folder),
                progress=progress, run_record={"auto_candidate": name}, task=task.training_task())
            tuned[name] = model.eval()
            scores = entry.setdefault("finetuned", {})
            if key not in scores:
                quality, kl = _score(task, score_form(tuned[name]), held_out, dense_outputs, batch_size, threads)
                scores[key] = {"holdout_kl": kl, held_key: quality}
                save_record()
    forms = [(entry["finetuned"][key]["holdout_kl"] if trained else entry["holdout_kl"][every], _cost(entry),
              trained, name) for name, entry in ((n, record["candidates"][n]) for n in tuned)
             for trained in (False, True)]  # ties: the training-free form first
    _, _, trained, best = min(forms)
    finetune["kept"] = "fine-tuned" if trained else "training-free"
    return best, tuned[best] if trained else task.assemble(finalists[best])


def _rebuild(dense: nn.Module, method: str, options: dict[str, Any]) -> nn.Module:
    """A candidate from its recorded native options (no budget search again)."""
    return patch(copy.deepcopy(dense), method, **options).eval()


def _score_form(backend: str, precision: str, threads: int) -> Callable[[nn.Module], nn.Module]:
    """How a model is scored: at the deployed precision (bf16 and int8 change the predictions), through
    onnxruntime when that is the backend; ``torch.compile`` scores eager (the same numerics, no compile per
    candidate)."""
    if precision == "fp32" and backend != "onnxruntime":
        return lambda m: m
    backend = "eager" if backend == "compile" else backend
    return lambda m: runtime(m, backend, precision, threads=threads)


def _outputs(task: SearchTask, model: nn.Module, images: torch.utils.data.Dataset, batch_size: int,
             threads: int) -> tuple[torch.Tensor, float]:
    """``task.outputs`` with ``threads`` torch threads."""
    with torch_threads(threads):
        return task.outputs(model, images, batch_size)


def _score(task: SearchTask, model: nn.Module, images: torch.utils.data.Dataset, dense_outputs: torch.Tensor,
           batch_size: int, threads: int) -> tuple[float, float]:
    """The task's metric on ``images`` and the mean KL divergence of the model's predictions from the dense model's.

    The KL ranks: it measures what the compression changed on every image (every patch, for
    segmentation), not only where a label flips, so it separates settings that a few hundred
    images' top-1 cannot tell apart.
    """
    outputs, quality = _outputs(task, model, images, batch_size, threads)
    kl = F.kl_div(F.log_softmax(outputs.flatten(0, -2), -1), F.log_softmax(dense_outputs.flatten(0, -2), -1),
                  log_target=True, reduction="batchmean")
    return quality, kl.item()


def _cost(entry: dict[str, Any]) -> float:
    """What the target measures, lower is better: latency, 1 / speed-up, or MACs."""
    if "latency_ms" in entry:
        return entry["latency_ms"]
    return 1.0 / entry["speedup"] if "speedup" in entry else entry["macs_ratio"]


def _strongest_found(task: SearchTask, dense: nn.Module, target: dict[str, Any], todo: list[Candidate],
                     prepared: dict[str, dict[str, Any]], entries: dict[str, dict],
                     held_out: torch.utils.data.Dataset, dense_quality: float, batch_size: int, threads: int,
                     score_form: Callable[[nn.Module], nn.Module]) -> str | None:
    """When no candidate meets the target: the one whose strongest setting comes closest, and what that
    setting costs in the held-out metric against the dense model (None when no candidate got that far)."""
    reached = [c for c in todo if "strongest" in entries.get(c.name, {}) and c.name in prepared]
    if not reached:
        return None
    speedup = "speedup" in target
    closest = (max if speedup else min)(reached, key=lambda c: entries[c.name]["strongest"])
    method_cls = get_method(closest.method)
    options = prepared[closest.name]
    model = _rebuild(dense, closest.method, method_cls.options_for_level(
        dense, method_cls.max_level(dense, **options), **options))
    quality = _outputs(task, score_form(task.assemble(model)), held_out, batch_size, threads)[1]
    cost = entries[closest.name]["strongest"]
    cost_text = (f"{cost:.2f}x" if speedup else f"{cost:.1f} ms" if "latency_ms" in target
                 else f"{cost:.3f} of the dense MACs")
    metric = {"top1": "top-1", "miou": "mIoU"}.get(task.metric, task.metric)
    return (f"the closest is {closest.name} at its strongest setting ({cost_text}), with {quality:.2%} "
            f"held-out {metric} against the dense model's {dense_quality:.2%}")


def _unreachable(target: dict[str, Any], entries: dict[str, dict], closest: str | None = None) -> str:
    """One line: the target, the setting that comes closest and its accuracy, and what each method reaches."""
    key = next(k for k in ("macs", "latency_ms", "speedup") if k in target)
    what = f"{key}={target[key]}"
    reasons = "; ".join(f"{name}: {entry['error']}" for name, entry in entries.items())
    return f"no setting meets {what} on this machine{'; ' + closest if closest else ''} ({reasons})"


METRIC_NAMES = {"top1": "top-1", "miou": "mIoU"}


def _markdown(result: dict[str, Any]) -> str:
    target = ", ".join(f"{k} {v}" for k, v in result["target"].items())
    metric = result.get("metric", "top1")
    named = METRIC_NAMES.get(metric, metric)
    lines = [f"# vitslim auto: {target}", ""]
    if result["command"]:
        lines += ["Command:", "", f"    {result['command']}", ""]
    deployed = ""
    if (result.get("backend"), result.get("precision")) not in ((None, None), ("eager", "fp32")):
        deployed = f" (timed and scored with {result['backend']} at {result['precision']})"
    tuned = ""
    if result.get("finetune"):
        tuned = (f", fine-tuned {result['finetune']['steps']} steps" if result["finetune"]["kept"] == "fine-tuned"
                 else " (training-free: no fine-tuned finalist came closer to the dense model)")
    lines += [f"Chosen: **{result['chosen']}**{tuned} ({result['method']}, options {result['options']}), "
              f"{result['macs_ratio']:.3f} of the dense MACs{deployed}; {named} {result[metric]:.2%} on "
              f"{result['report_images']} images of the {result['report_split']} split (dense "
              f"{result['dense_' + metric]:.2%}). Search: {result['seconds']:.0f} s; candidates ranked by their "
              f"predictions' KL divergence from the dense model's on {result['holdout_images']} held-out images of the "
              "train split (successive halving).", "",
              f"| candidate | method | MACs ratio | batch-1 ms | speed-up | held-out KL to dense | held-out {named} "
              "(images) | note |",
              "|---|---|---|---|---|---|---|---|"]
    if result["not_measured"]:  # the time budget ran out before these were patched
        lines[-2:-2] = [f"Not measured (time budget spent): {', '.join(result['not_measured'])}.", ""]
    for name, entry in result["candidates"].items():
        scores = entry.get(f"holdout_{metric}", {})
        last = max(scores, key=int) if scores else None
        score = f"{scores[last]:.2%} ({last})" if last else "-"
        ms = f"{entry['latency_ms']:.1f}" if "latency_ms" in entry else "-"
        fast = f"{entry['speedup']:.2f}x" if "speedup" in entry else "-"
        macs = f"{entry['macs_ratio']:.3f}" if "macs_ratio" in entry else "-"
        kl = f"{entry['holdout_kl'][last]:.4f}" if last and last in entry.get("holdout_kl", {}) else "-"
        lines.append(f"| {name} | {entry['method']} | {macs} | {ms} | {fast} | {kl} | {score} | "
                     f"{entry.get('error', '')} |")
    finetune = result.get("finetune")
    if finetune:
        key = str(finetune["steps"])
        lines += ["", f"Fine-tuned: the best {len(finetune['candidates'])} for {finetune['steps']} steps (batch "
                  f"{finetune['batch_size']}, lr {finetune['lr']:g}, distillation weight {finetune['kd_weight']} from "
                  f"the dense model) on the train images not held out, then re-ranked on all {result['holdout_images']}"
                  " held-out images.", "",
                  f"| candidate | held-out KL before | after | held-out {named} before | after |", "|---|---|---|---|---|"]
        for name in finetune["candidates"]:
            entry = result["candidates"][name]
            last = max(entry["holdout_kl"], key=int)
            after = entry["finetuned"][key]
            lines.append(f"| {name} | {entry['holdout_kl'][last]:.4f} | {after['holdout_kl']:.4f} | "
                         f"{entry[f'holdout_{metric}'][last]:.2%} | {after[f'holdout_{metric}']:.2%} |")
    return "\n".join(lines) + "\n"


def _plot(result: dict[str, Any], path: Path) -> Path:
    """The held-out metric (on the most images each candidate was scored on) against the measured cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = next((k for k in ("latency_ms", "speedup") if k in result["target"]), "macs_ratio")
    metric = result.get("metric", "top1")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, entry in result["candidates"].items():
        scores = entry.get(f"holdout_{metric}")
        if not scores:
            continue
        x = entry[key]
        y = 100 * scores[max(scores, key=int)]
        ax.scatter([x], [y], marker="*" if name == result["chosen"] else "o", s=120 if name == result["chosen"] else 30)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel({"latency_ms": "batch-1 latency here (ms)", "speedup": "throughput speed-up here",
                   "macs_ratio": "MACs (fraction of dense)"}[key])
    ax.set_ylabel(f"held-out {METRIC_NAMES.get(metric, metric)} (%)")
    ax.set_title("vitslim auto: every candidate (star: chosen)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return write_png(fig, path, dpi=120)
