"""EViT (Liang et al., ICLR 2022): keep the tokens the CLS token attends to, fuse the rest.

At the chosen blocks (DeiT: 3, 6, 9), after the attention residual, keep the
ceil(keep_rate * n) patch-side tokens with the highest head-averaged CLS attention and fuse the
others into one extra token weighted by their attention (not renormalised, as in EViT). Every
prefix token is kept. ``keep_order=True`` (default, ours) keeps the kept tokens in raster order;
``False`` orders them by attention rank as the official code does.
"""
from __future__ import annotations

import math
from typing import Any

from torch import nn

from vitslim.errors import VitslimError
from vitslim.methods import (AttnInfo, KeepRateLevels, Method, Reducer, check_locations, check_rates,
                             default_locations, rates_per_location, register, reject_unknown)
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


@register
class EViT(KeepRateLevels, Method):
    """Attentive-token keeping at a few blocks; knob ``keep_rate`` (one value or one per location)."""

    name = "evit"
    fuse = True

    def resolve(self, model: nn.Module, keep_rate: Any = 1.0, locations: Any = None,
                keep_order: bool = True, **extra: Any) -> dict[str, Any]:
        reject_unknown(self.name, extra, "keep_rate, locations, keep_order")
        if getattr(model, "cls_token", None) is None:
            raise VitslimError(
                f"{self.name} ranks tokens by the class token's attention and this model has no class "
                "token: use tome"
            )
        depth = len(model.blocks)
        locs = default_locations(depth) if locations is None else check_locations(locations, depth)
        return {"keep_rate": check_rates(keep_rate, locs), "locations": locs,
                "keep_order": bool(keep_order)}

    def reducers(self) -> dict[int, Reducer]:
        locs, rates = self.options["locations"], self.options["keep_rate"]
        rates = rates_per_location(rates, locs)
        return {i: AttentiveKeep(r, self.fuse, self.options["keep_order"])
                for i, r in zip(locs, rates) if r < 1.0}

