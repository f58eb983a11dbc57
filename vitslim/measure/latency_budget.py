"""Measured budgets: the budget level of a method whose batch-1 latency (or throughput speed-up) here meets a target."""
from __future__ import annotations

import copy
from typing import Any, Callable, Optional

from torch import nn

from vitslim.budget import OutOfReach, search_level
from vitslim.measure.macs import count_macs
from vitslim.measure.speed import compare_speed, latency, paired_ratio
from vitslim.methods.base import get_method
from vitslim.patch import macs_level, patch, unpatch

Runner = Optional[Callable[[nn.Module], nn.Module]]  # the form a model is timed in (e.g. a backend's); None: as it is


# given the measured cost per level: (a first level, the search's resolution in levels), or None
Start = Optional[Callable[[Callable[[int], float]], Optional[tuple[int, int]]]]
MACS_RESOLUTION = 0.01  # a timed search resolves levels to 1% of the dense MACs: finer is below the timing noise


def _fit(model: nn.Module, method: str, options: dict[str, Any], cost: Callable[[nn.Module], float], target: float,
         what: str, knob: str, unit: str = "", start: Start = None, init_seed: int = 0) -> tuple[int, float]:
    """The mildest level whose measured ``cost`` (falling with the level) is at most ``target``, searched out from
    the level ``start`` picks when given (what it measures counts for the search); the model is left patched at
    that level (its new modules from ``init_seed``), and the cost returned is the one the search measured there
    (not a second, noisier run)."""
    method_cls = get_method(method)
    measured: dict[int, float] = {}

    def at(level: int) -> float:
        if level not in measured:
            patch(model, method, **method_cls.options_for_level(model, level, **options))
            measured[level] = cost(model.eval())
        return measured[level]

    first, resolution = (start(at) if start else None) or (None, 1)
    level = search_level(at, target, method_cls.max_level(model, **options), closest=False, what=what, knob=knob,
                         unit=unit, start=first, resolution=resolution)
    patch(model, method, init_seed=init_seed, **method_cls.options_for_level(model, level, **options))
    return level, measured[level]


def fit_latency(model: nn.Module, latency_ms: float, method: str = "spvit", *, threads: int = 2, runs: int = 20,
                runner: Runner = None, init_seed: int = 0, **options: Any) -> dict[str, Any]:
    """Patch ``model`` in place at the mildest budget level whose batch-1 latency here is at most ``latency_ms``
    (the method's new modules from ``init_seed``, as in ``patch``).

    The one budget search (``vitslim.budget.search_level``) over the method's levels, each measured
    with ``vitslim.measure.latency`` (on ``runner(model)`` when given: the form it is deployed in). Like
    ``fit_speedup`` it starts from MACs: the dense model is timed once, and the search starts from the level
    at the target's share of the dense latency, corrected by the latency per MACs measured there.
    Returns the run record (what was asked, what was measured with the dense latency beside it, the options
    chosen); the measurement is not part of the method's options, so a run can resume.
    """
    run = runner or (lambda m: m)

    def milliseconds(m: nn.Module) -> float:
        return latency(run(m), runs=runs, threads=threads)["median_ms"]

    plain = unpatch(copy.deepcopy(model)).eval()
    dense_ms = milliseconds(plain)
    level, ms = _fit(model, method, options, milliseconds, latency_ms, f"{method} (batch 1, {threads} threads)",
                     "latency_ms", " ms", start=_macs_start(plain, method, options, latency_ms / dense_ms, dense_ms),
                     init_seed=init_seed)
    return {"method": method, "target_ms": latency_ms, "latency_ms": round(ms, 3), "dense_ms": round(dense_ms, 3),
            "level": level, "options": model.vitslim_config["options"], "threads": threads, "runs": runs}


def fit_speedup(model: nn.Module, speedup: float, method: str, *, batch_size: int = 32, threads: int = 2,
                runs: int = 5, runner: Runner = None, **options: Any) -> dict[str, Any]:
    """Patch ``model`` in place at the mildest budget level whose throughput at ``batch_size`` here is at least
    ``speedup`` times the dense model's (paired timed rounds, ``vitslim.measure.compare_speed``; both models
    as ``runner`` makes them when given). The search starts from MACs (counted, not timed): the level at
    1/``speedup`` of the dense MACs is timed first, and the search starts where its measured speed per MACs
    says the target is, so a method whose speed follows its MACs is timed at a few levels only. Levels are
    resolved to about 1% of the dense MACs (``MACS_RESOLUTION``): the setting found meets the target and is
    at most that much stronger than the mildest that would."""
    run = runner or (lambda m: m)
    plain = unpatch(copy.deepcopy(model)).eval()
    dense = run(plain)

    def slowness(m: nn.Module) -> float:  # 1 / speed-up: falls as the level rises, as search_level wants
        timed = compare_speed({"dense": dense, "model": run(m)}, batch_size, runs=runs, threads=threads)
        return 1.0 / paired_ratio(timed["dense"], timed["model"])

    what = f"{method} (batch {batch_size}, {threads} threads)"
    try:
        level, slow = _fit(model, method, options, slowness, 1.0 / speedup, what, "1/speedup",
                           start=_macs_start(plain, method, options, 1.0 / speedup))
    except OutOfReach as exc:  # say it in speed-ups, not in the search's inverted cost
        raise OutOfReach(f"speedup={speedup:g} is out of reach for {what}: its strongest setting on this model "
                         f"gives {1 / exc.strongest:.2f}x", exc.strongest) from None
    return {"method": method, "target_speedup": speedup, "speedup": round(1.0 / slow, 3), "level": level,
            "options": model.vitslim_config["options"], "batch_size": batch_size, "threads": threads, "runs": runs}


def _macs_start(plain: nn.Module, method: str, options: dict[str, Any], macs: float, scale: float = 1.0) -> Start:
    """Where a timed search starts (``_fit``'s ``start``) for a cost that roughly follows the MACs: the level at
    ``macs`` x the dense MACs is timed first, and the search starts at the level where the cost per MACs
    measured there puts the target (``macs`` x ``scale``, the cost of the dense model in the cost's unit), with
    its resolution at ``MACS_RESOLUTION`` of the dense MACs. ``plain`` is the unpatched model (the caller's
    copy, already made to time the dense model)."""
    method_cls = get_method(method)
    dense_macs = count_macs(plain)

    def macs_at(level: int) -> float:
        return count_macs(patch(copy.deepcopy(plain), method, **method_cls.options_for_level(plain, level, **options)))

    def start(at: Callable[[int], float]) -> tuple[int, int] | None:
        first = _macs_guess(plain, method, macs, options)
        if first is None:
            return None
        first_macs = macs_at(first) / dense_macs
        efficiency = first_macs * scale / at(first)  # MACs share per cost share: 1 when the cost follows the MACs
        guess = _macs_guess(plain, method, efficiency * macs, options)
        if guess == first:
            return guess, 1
        per_level = abs(macs_at(guess) / dense_macs - first_macs) / abs(guess - first)  # MACs ratio per level
        return guess, max(1, int(MACS_RESOLUTION / per_level)) if per_level > 0 else 1

    return start


def _macs_guess(model: nn.Module, method: str, macs: float, options: dict[str, Any]) -> int | None:
    """The level at ``macs`` x the dense MACs, where a timed search starts (None: search them all)."""
    if not 0.0 < macs:
        return None
    try:
        return macs_level(copy.deepcopy(model), method, min(macs, 1.0), **options)
    except OutOfReach:  # not even the strongest level gets there: it is where to start
        return get_method(method).max_level(model, **options)
