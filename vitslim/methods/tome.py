"""ToMe: Token Merging (Bolya et al., ICLR 2023), on modern timm.

In every block, between the attention residual and the MLP, the r most similar pairs of patch
tokens (bipartite soft matching on the head-averaged attention keys) are merged by size-weighted
averaging; later blocks add log(size) to the attention logits (proportional attention, passed to
the fused kernel as an additive mask). Unlike the official patch, every prefix token (CLS,
distillation, registers) is kept out of matching, LayerScale and q/k norm are kept, and
average pooling is size-weighted.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from torch import nn

from vitslim.errors import VitslimError
from vitslim.families import family_of
from vitslim.methods.base import AttnInfo, Method, MethodOptions, Reducer, register
from vitslim.tokens import TokenState, bipartite_matching, merge_matched


def check_inflection(inflection: float) -> None:
    """Raise a one-line VitslimError unless ToMe's schedule inflection is in [-1, 1]."""
    if not -1.0 <= inflection <= 1.0:
        raise VitslimError(f"ToMe inflection {inflection} is out of range: use a value in [-1, 1]")


def parse_r(r: int | Sequence[int] | tuple[int, float], depth: int) -> list[int]:
    """Per-block r from an int, a per-block list, or ToMe's (r, inflection) linear schedule."""
    if isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], float):
        base, inflect = r
        check_inflection(inflect)
        first = int(base * (1 - inflect))
        last = 2 * base - first
        step = (last - first) / max(depth - 1, 1)
        r = [int(first + step * i) for i in range(depth)]
    if isinstance(r, (list, tuple)):
        values = list(r)
        if len(values) > depth:
            raise VitslimError(f"ToMe r schedule has {len(values)} entries for a {depth}-block model")
        values += [0] * (depth - len(values))
    else:
        values = [r] * depth
    try:
        values = [int(v) for v in values]
    except (TypeError, ValueError):
        raise VitslimError(f"ToMe r must be an int, a per-block list or (r, inflection), got {r!r}") from None
    if any(v < 0 for v in values):
        raise VitslimError(f"ToMe r must be >= 0 in every block, got {values}")
    return values


class ToMeMerge(Reducer):
    """Merge r token pairs after the attention residual."""

    def __init__(self, r: int):
        super().__init__()
        self.r = r

    def after_attn(self, state: TokenState, attn: AttnInfo) -> TokenState:
        """Bipartite soft matching on this block's keys, then a size-weighted merge."""
        n = state.x.shape[1] - state.num_prefix
        r = min(self.r, n // 2)
        if r <= 0:
            return state
        return merge_matched(state, bipartite_matching(attn.key_sum[:, state.num_prefix:], r))

    def extra_repr(self) -> str:
        return f"r={self.r}"


@dataclasses.dataclass
class ToMeOptions(MethodOptions):
    """ToMe's knob: tokens merged per block."""

    r: Any = dataclasses.field(default=0, metadata={
        "help": "merges per block: an int, a per-block list, or (r, inflection)",
        "source": "ToMe (Bolya et al., ICLR 2023) §3; 0 = no merging until a budget is given"})
    inflection: float = dataclasses.field(default=0.0, metadata={
        "help": "how macs= spreads its merges over the blocks: 0 evenly, -0.5 decreasing (more merges early), "
                "0.5 increasing; ignored when r is given",
        "source": "ToMe's (r, inflection) linear schedule, §4.1 (the budget search keeps its shape)"})

    def resolved(self, model: nn.Module) -> "ToMeOptions":
        """r as one int per block."""
        check_inflection(self.inflection)
        return ToMeOptions(r=parse_r(self.r, len(family_of(model).blocks(model))), inflection=self.inflection)


@register
class ToMe(Method):
    """Token merging in every block; knob ``r`` (int, per-block list, or (r, inflection))."""

    name = "tome"
    Options = ToMeOptions
    prop_attn_default = True  # proportional attention, as in ToMe

    @classmethod
    def runs_on(cls, family: str) -> bool:
        """Also on rotary ViTs (Eva: a merged token keeps its destination's position) and on PiT (merged
        tokens go back on their patches before each pooling)."""
        return family in ("vit", "eva", "pit")

    def reducers(self) -> dict[int, Reducer]:
        return {i: ToMeMerge(r) for i, r in enumerate(self.config.r) if r > 0}

    @classmethod
    def max_level(cls, model: nn.Module, **options: Any) -> int:
        return sum(n // 2 for n in family_of(model).stage_patches(model))

    @classmethod
    def options_for_level(cls, model: nn.Module, level: int, **options: Any) -> dict[str, Any]:
        # level = total merges asked for, spread over the blocks in proportion to the patches their stage
        # starts with (a plain ViT: evenly) times the linear schedule of ``inflection``, the remainder
        # going to the earliest blocks
        if "r" in options:
            raise VitslimError("give tome either r or macs=, not both")
        inflection = float(options.get("inflection", 0.0))
        patches = family_of(model).stage_patches(model)
        depth = len(patches)
        weights = [w * (1 - inflection + 2 * inflection * i / max(depth - 1, 1)) for i, w in enumerate(patches)]
        total = sum(weights)
        r = [int(level * w // total) for w in weights]
        rest = level - sum(r)
        return {"r": [v + (1 if i < rest else 0) for i, v in enumerate(r)], **options}
