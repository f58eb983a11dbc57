"""The one budget search: a bisection over a method's budget levels for a target cost.

Methods expose their knob as integer levels (0 = no reduction, higher = cheaper; see
``Method.max_level``). ``search_level`` finds the level whose cost meets a target with about
log2(levels) evaluations of the cost, whatever the cost is: MACs for ``patch(..., macs=f)``, a
measured latency or speed-up for ``vitslim.measure.fit_latency`` and ``fit_speedup``.
"""
from __future__ import annotations

from typing import Callable

from vitslim.errors import VitslimError

LEVEL_STEP = 0.005  # keep-rate style knobs step by this: fine enough to land within 2% of a MACs target


class OutOfReach(VitslimError):
    """A target even the strongest budget level misses; ``strongest`` is that level's cost."""

    def __init__(self, message: str, strongest: float):
        super().__init__(message)
        self.strongest = strongest


def search_level(cost: Callable[[int], float], target: float, max_level: int, *, closest: bool = True,
                 what: str = "this method", knob: str = "target", unit: str = "") -> int:
    """The budget level for ``target``, given a cost that falls (weakly) as the level rises.

    ``closest=True``: whichever of the two levels around the target is closer (MACs budgets);
    ``False``: the lowest level whose cost is at most the target (a latency that must be met).
    Costs are computed once per level. Raises a VitslimError when even ``max_level`` is too costly.
    """
    costs: dict[int, float] = {}

    def at(level: int) -> float:
        if level not in costs:
            costs[level] = cost(level)
        return costs[level]

    lo, hi = 0, max_level
    strongest = at(hi)
    if strongest > target * (1.02 if closest else 1.0):
        raise OutOfReach(f"{knob}={target:g} is out of reach for {what}: its strongest setting on this model "
                         f"gives {strongest:.3f}{unit}; ask for at least {strongest:.3g}", strongest)
    if at(lo) <= target and not closest:
        return lo
    while hi - lo > 1:  # invariant: cost(lo) > target >= cost(hi), up to the first probe
        mid = (lo + hi) // 2
        if at(mid) > target:
            lo = mid
        else:
            hi = mid
    if not closest:
        return hi
    return lo if abs(at(lo) - target) < abs(at(hi) - target) else hi
