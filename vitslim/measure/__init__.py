"""Measurement used by the CLI, the benchmarks and the tests alike: MACs, speed, accuracy.

Names load on first use: ``vitslim.measure.macs`` sits below the spine (``vitslim.patch`` counts
MACs for ``macs=``), while the rest of the package sits above it.
"""
from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "count_macs": "macs", "analytic_macs": "macs", "throughput": "speed", "latency": "speed",
    "compare_speed": "speed", "ideal_model": "speed", "evaluate": "accuracy", "fit_latency": "latency_budget",
    "fit_speedup": "latency_budget", "torch_threads": "speed",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        return getattr(importlib.import_module(f"vitslim.measure.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'vitslim.measure' has no attribute {name!r}")
