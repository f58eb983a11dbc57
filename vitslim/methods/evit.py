"""EViT (Liang et al., ICLR 2022): keep the tokens the CLS token attends to, fuse the rest.

At the chosen blocks (DeiT: 3, 6, 9), after the attention residual, keep the
ceil(keep_rate * n) patch-side tokens with the highest head-averaged CLS attention and fuse the
others into one extra token weighted by their attention (not renormalised, as in EViT). Every
prefix token is kept. ``keep_order=True`` (default, ours) keeps the kept tokens in raster order;
``False`` orders them by attention rank as the official code does.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from torch import nn

from vitslim.errors import VitslimError
from vitslim.methods.base import (AttnInfo, KeepRateLevels, Method, MethodOptions, Reducer, check_rates,
                                  rates_per_location, register, resolve_locations)
from vitslim.tokens import TokenState, keep_tokens


class AttentiveKeep(Reducer):
    """Keep the most CLS-attended patch tokens; fuse (EViT) or prune (top-k) the others."""

    def __init__(self, keep_rate: float, fuse: bool, keep_order: bool):
        super().__init__()
        self.keep_rate, self.fuse, self.keep_order = keep_rate, fuse, keep_order

    def after_attn(self, state: TokenState, attn: AttnInfo) -> TokenState:
        """Select by CLS attention after the attention residual."""
        p = state.num_prefix
        n = state.x.shape[1] - p
        k = math.ceil(self.keep_rate * n)
        if k >= n:
            return state
        scores = attn.cls_attn[:, p:]
        idx = scores.topk(k, dim=1, sorted=not self.keep_order).indices
        if self.keep_order:
            idx = idx.sort(dim=1).values
        return keep_tokens(state, idx, scores if self.fuse else None)

    def extra_repr(self) -> str:
        return f"keep_rate={self.keep_rate}, fuse={self.fuse}, keep_order={self.keep_order}"


@dataclasses.dataclass
class EViTOptions(MethodOptions):
    """EViT / top-k: where to keep the attentive tokens and how many."""

    keep_rate: Any = dataclasses.field(default=1.0, metadata={
        "help": "fraction of the patch-side tokens kept at each location (one value, or one per location)",
        "source": "EViT (Liang et al., ICLR 2022) §3.2: 0.7 in the paper; 1.0 = no reduction until a budget is given"})
    locations: Any = dataclasses.field(default=None, metadata={
        "help": "0-based blocks to reduce at; default depth//4, depth//2, 3*depth//4",
        "source": "EViT: blocks 4, 7, 10 (1-based) of DeiT's 12"})
    keep_order: bool = dataclasses.field(default=True, metadata={
        "help": "keep the kept tokens in raster order (False: by attention rank, as the official code)",
        "source": "ours: raster order keeps the grid's neighbourhoods together"})

    def resolved(self, model: nn.Module) -> "EViTOptions":
        """Validated keep rates and locations for this model."""
        locs = resolve_locations("evit", self.locations, model)
        return EViTOptions(keep_rate=check_rates(self.keep_rate, locs), locations=locs,
                           keep_order=bool(self.keep_order))


@register
class EViT(KeepRateLevels, Method):
    """Attentive-token keeping at a few blocks; knob ``keep_rate`` (one value or one per location)."""

    name = "evit"
    Options = EViTOptions
    fuse = True

    @classmethod
    def runs_on(cls, family: str) -> bool:
        """Also on rotary ViTs (Eva: kept tokens keep their positions, the fused token has none) and on PiT
        (within each stage; a dropped patch gets back the value it had when dropped before the pooling)."""
        return family in ("vit", "eva", "pit")

    def __init__(self, model: nn.Module, **options: Any):
        if getattr(model, "cls_token", None) is None:
            raise VitslimError(
                f"{self.name} ranks tokens by the class token's attention and this model has no class "
                "token: use tome"
            )
        super().__init__(model, **options)

    def reducers(self) -> dict[int, Reducer]:
        locs = self.config.locations
        rates = rates_per_location(self.config.keep_rate, locs)
        return {i: AttentiveKeep(r, self.fuse, self.config.keep_order)
                for i, r in zip(locs, rates) if r < 1.0}
