"""The one budget search: a bisection over a method's budget levels for a target cost.

Methods expose their knob as integer levels (0 = no reduction, higher = cheaper; see
``Method.max_level``). ``search_level`` finds the level whose cost meets a target with about
log2(levels) evaluations of the cost, whatever the cost is: MACs for ``patch(..., macs=f)``, a
measured latency or speed-up for ``vitslim.measure.fit_latency`` and ``fit_speedup``. A cost that
is slow to evaluate (a timed one) can start from a guessed level: the search then steps out from it
in doubling steps until it brackets the target, so a close guess costs a few evaluations, not all
the bisection's.
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
                 what: str = "this method", knob: str = "target", unit: str = "", start: int | None = None,
                 resolution: int = 1) -> int:
    """The budget level for ``target``, given a cost that falls (weakly) as the level rises.

    ``closest=True``: whichever of the two levels around the target is closer (MACs budgets);
    ``False``: the lowest level whose cost is at most the target (a latency that must be met).
    ``start``: a guessed level to search out from (the same answer, fewer evaluations when the guess
    is close). ``resolution``: stop once the target lies within that many levels (for a cost measured
    with noise, resolving single levels is meaningless): the level returned meets the target and is at
    most ``resolution - 1`` levels stronger than the mildest that does. Costs are computed once per
    level. Raises a VitslimError when even ``max_level`` is too costly.
    """
    costs: dict[int, float] = {}

    def at(level: int) -> float:
        if level not in costs:
            costs[level] = cost(level)
        return costs[level]

    def out_of_reach() -> int:
        strongest = at(max_level)
        if strongest > target * (1.02 if closest else 1.0):
            raise OutOfReach(f"{knob}={target:g} is out of reach for {what}: its strongest setting on this model "
                             f"gives {strongest:.3f}{unit}; ask for at least {strongest:.3g}", strongest)
        return max_level  # within the 2% a MACs budget allows

    if start is None:
        lo, hi = 0, max_level
        if at(hi) > target:
            return out_of_reach()
        if at(lo) <= target:  # no reduction needed
            return lo
    else:
        lo, hi = _bracket(at, target, min(max(start, 0), max_level), max_level, max(1, resolution))
        if lo is None:  # even level 0 meets the target
            return 0
        if hi is None:
            return out_of_reach()
    while hi - lo > max(1, resolution):  # invariant: cost(lo) > target >= cost(hi), up to the first probe
        mid = (lo + hi) // 2
        if at(mid) > target:
            lo = mid
        else:
            hi = mid
    if not closest:
        return hi
    return lo if abs(at(lo) - target) < abs(at(hi) - target) else hi


def _bracket(at: Callable[[int], float], target: float, start: int, max_level: int,
             step: int) -> tuple[int | None, int | None]:
    """Levels (lo, hi) with cost(lo) > target >= cost(hi), found by steps of ``step``, twice that, ... out from
    ``start``; lo is None when level 0 already meets the target, hi is None when not even ``max_level`` does."""
    if at(start) > target:  # too costly: stronger levels
        lo = start
        while lo < max_level:
            hi = min(lo + step, max_level)
            if at(hi) <= target:
                return lo, hi
            lo, step = hi, 2 * step
        return lo, None
    hi = start
    while hi > 0:  # met: milder levels, to find the mildest that still meets it
        lo = max(hi - step, 0)
        if at(lo) > target:
            return lo, hi
        hi, step = lo, 2 * step
    return None, 0
