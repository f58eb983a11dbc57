"""A latency budget: the budget level of a method whose measured batch-1 latency here meets a target."""
from __future__ import annotations

from typing import Any

from torch import nn

from vitslim.budget import search_level
from vitslim.measure.speed import latency
from vitslim.methods.base import get_method
from vitslim.patch import patch


def fit_latency(model: nn.Module, latency_ms: float, method: str = "spvit", *, threads: int = 2, runs: int = 20,
                **options: Any) -> dict[str, Any]:
    """Patch ``model`` in place at the mildest budget level whose batch-1 latency here is at most ``latency_ms``.

    The one budget search (``vitslim.budget.search_level``) over the method's levels, each measured
    with ``vitslim.measure.latency``. Returns the run record (what was asked, what was measured, the
    options chosen); the measurement is not part of the method's options, so a run can resume.
    """
    method_cls = get_method(method)

    def measured(level: int) -> float:
        patch(model, method, **method_cls.options_for_level(model, level, **options))
        return latency(model.eval(), runs=runs, threads=threads)["median_ms"]

    level = search_level(measured, latency_ms, method_cls.max_level(model, **options), closest=False,
                         what=f"{method} (batch 1, {threads} threads)", knob="latency_ms", unit=" ms")
    ms = measured(level)
    return {"method": method, "target_ms": latency_ms, "latency_ms": round(ms, 3), "level": level,
            "options": model.vitslim_config["options"], "threads": threads, "runs": runs}
