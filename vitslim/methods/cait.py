"""CAIT-style joint token + channel compression (vitslim reconstruction): ATME + CDCP in one patch.

The paper's (abstract): CAIT compresses tokens (ATME) and channels (CDCP) jointly; v2 builds
CDCP on top of ATME. Ours (``docs/methods/cait.md``): a fixed ATME schedule and
dynamic CDCP masks in one reducer per block; the CDCP counts are allocated for the token counts
the schedule leaves (channels in blocks after a merge are cheaper); ATME's similarity uses the
keys of the masked q/k, consistent with what attention used.

Budget split (unknown in the paper): ``macs=f`` gives the tokens a MACs fraction near
f ** token_share (the ATME budget point with the closest analytic ratio, never below f) and the
channels the rest. ``token_share=0.75`` by default: on our CPU halving the tokens gave a larger
measured speed-up per MAC than channel pruning; tune it and report the curve.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from torch import nn

from vitslim.budget import LEVEL_STEP
from vitslim.errors import VitslimError
from vitslim.measure.macs import analytic_macs
from vitslim.methods.atme import (block_macs, check_schedule, default_schedule, format_schedule, parse_schedule,
                                  schedule_family, token_counts)
from vitslim.methods.base import Method, MethodOptions, Reducer, check_rate, register
from vitslim.methods.cdcp import (COMPENSATED, calibrated_field, channel_blocks, check_channel_model,
                                  prepare_calibration, resolve_importance)

DEFAULT_TOKEN_SHARE = 0.75


def split_budget(model: nn.Module, target: float, token_share: float) -> tuple[str, float]:
    """(ATME schedule, CDCP keep_rate) whose analytic MACs are about ``target`` of the dense model's."""
    dense_tokens = token_counts(model, [])
    dense_blocks = block_macs(model, dense_tokens)
    fixed = analytic_macs(model) - dense_blocks  # patch embedding and classifier: not reducible here
    dense = fixed + dense_blocks
    want = target ** token_share
    best, best_gap = "", math.inf
    for schedule in schedule_family(model):
        blocks = block_macs(model, token_counts(model, parse_schedule(schedule, len(model.blocks))))
        ratio = (fixed + blocks) / dense
        if ratio >= target and abs(math.log(ratio / want)) < best_gap:
            best, best_gap = schedule, abs(math.log(ratio / want))
    blocks = block_macs(model, token_counts(model, parse_schedule(best, len(model.blocks))))
    keep = (target * dense - fixed) / blocks
    return best, round(min(1.0, max(LEVEL_STEP, keep)), 4)


@dataclasses.dataclass
class CAITOptions(MethodOptions):
    """CAIT-style joint method: the ATME schedule, the CDCP rate and how ``macs=`` splits between them."""

    schedule: Any = dataclasses.field(default=None, metadata={
        "help": "ATME merges, 'BLOCK:AXIS,...' (default 3:W,7:H scaled to the depth)",
        "source": "ours (docs/methods/cait.md)"})
    keep_rate: float = dataclasses.field(default=0.7, metadata={
        "help": "CDCP kept fraction of the blocks' channel MACs", "source": "ours (docs/methods/cdcp.md)"})
    importance: str = dataclasses.field(default="magnitude", metadata={
        "help": "'magnitude' (data-free), or with calibration=DATA 'taylor' (its default), 'activation' or "
                "'fluctuation' (with mean compensation: the training-free choice)",
        "source": "ours"})
    token_share: float = dataclasses.field(default=DEFAULT_TOKEN_SHARE, metadata={
        "help": "macs=f gives tokens about f**token_share and channels the rest (0: channels only, 1: tokens only)",
        "source": "ours: on our CPU halving tokens gave a larger measured speed-up per MAC than channels"})
    calibrated: Any = calibrated_field()

    def resolved(self, model: nn.Module) -> "CAITOptions":
        """Validated schedule, rate, importance and share for this model."""
        check_channel_model(model)
        depth = len(model.blocks)
        pairs = parse_schedule(default_schedule(depth) if self.schedule is None else self.schedule, depth)
        check_schedule(model, pairs)
        return CAITOptions(schedule=format_schedule(pairs), keep_rate=check_rate("keep_rate", self.keep_rate),
                           importance=resolve_importance(self.importance), token_share=check_share(self.token_share),
                           calibrated=self.calibrated)


@register
class CAIT(Method):
    """CAIT-style ATME + CDCP (vitslim reconstruction); knobs ``schedule``, ``keep_rate``, ``token_share``."""

    name = "cait"
    Options = CAITOptions
    prop_attn_default = True

    def reducers(self) -> dict[int, Reducer]:
        pairs = parse_schedule(self.config.schedule, len(self.model.blocks))
        return channel_blocks(self.model, self.config.keep_rate, self.config.calibrated,
                              token_counts(self.model, pairs), dict(pairs),
                              compensate=self.config.importance in COMPENSATED)

    @classmethod
    def max_level(cls, model: nn.Module, **options: Any) -> int:
        return round(1.0 / LEVEL_STEP) - 1

    @classmethod
    def options_for_level(cls, model: nn.Module, level: int, **options: Any) -> dict[str, Any]:
        if "schedule" in options or "keep_rate" in options:
            raise VitslimError("give cait either schedule/keep_rate or macs= (split by token_share), not both")
        share = check_share(options.get("token_share", DEFAULT_TOKEN_SHARE))
        schedule, keep = split_budget(model, 1.0 - level * LEVEL_STEP, share)
        return {"schedule": schedule, "keep_rate": keep, **options}

    @classmethod
    def prepare(cls, model: nn.Module, options: dict[str, Any]) -> dict[str, Any]:
        return prepare_calibration(model, options)


def check_share(value: Any) -> float:
    """token_share in [0, 1]: 0 = channels only, 1 = tokens only (as far as ATME's budget points go)."""
    try:
        share = float(value)
    except (TypeError, ValueError):
        raise VitslimError(f"token_share must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= share <= 1.0:
        raise VitslimError(f"token_share={share} is out of range: 0 = channels only, 1 = tokens only")
    return share
