"""SiT (Zong et al., ECCV 2022): soft token slimming, its reverse module and FRD, ported to timm ViTs.

- **TSM** (token slimming module), before each chosen block: a small MLP on the normalised patch
  tokens gives logits from the n input tokens to n' output tokens; a softmax over the *inputs*
  (scaled by a learned temperature, init 1) makes every output token a convex combination of
  the inputs: X' = A^T X. Soft and input-dependent, the same in training and inference, so the
  speed-up is real at any batch size. Prefix tokens (CLS, dist, registers) bypass it.
- **RTSM** (reverse module, training only), after every block from the first slim on: a token
  MLP (n' -> 4n -> n, on the normalised tokens, no residual) then a residual channel MLP
  (C -> 4C -> C) decode the slimmed tokens back to the dense count n.
- **FRD** (feature recalibration distillation): MSE between each block's RTSM output (identity
  before the first slim) and the dense teacher's patch tokens after that block (before the final
  norm), averaged over the blocks, plus logit KD; the training engine adds both (recipe ``sit``:
  lambda_token = lambda_logits = 2, tau 1). The reverse modules train at 5x lr with weight decay on
  every parameter, as in the official code.

Our decisions (``docs/methods/sit.md``; the official code covers LV-ViT only):
- Placement: TSM before blocks depth/4, depth/2, 3*depth/4 (DeiT: 3, 6, 9), stage counts
  n_s = int(n0 * prod(keep_rate[:s])) (0.5: 98 / 49 / 24 at 224 px), or chosen by ``macs=``.
- Sizes stay soft and sum to the patch count: each input token spreads its size over the outputs
  in proportion to its weights (responsibility R = A / A.sum(outputs)); the map back to the grid
  sends each patch to the output token it contributes most to (argmax of R), so ``unmerge`` works.
- ``reverse=False`` builds the inference model (no RTSM); ``vitslim.load`` strips them by default.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from timm.layers import Mlp
from torch import Tensor, nn

from vitslim.methods.base import (KeepRateLevels, Method, MethodOptions, ParamOptions, Reducer, check_rates,
                                  rates_per_location, register, resolve_locations)
from vitslim.tokens import TokenState, TokenTarget, remap_source

REVERSE_LR_SCALE = 5.0  # the official RTSM parameter group's lr multiplier


class TokenSlimmer(nn.Module):
    """TSM: n patch tokens -> n_out soft aggregates, A = softmax_inputs(MLP(LN(x)) * temperature)."""

    def __init__(self, dim: int, n_out: int):
        super().__init__()
        self.n_out = n_out
        self.norm = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim // 2, n_out, act_layer=nn.GELU)
        self.temperature = nn.Parameter(torch.ones(()))

    def weights(self, x: Tensor) -> Tensor:
        """Aggregation weights (B, n_in, n_out); each output column sums to 1 over the inputs."""
        return (self.mlp(self.norm(x)) * self.temperature).softmax(dim=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Slimmed tokens (B, n_out, C) and the weights used."""
        a = self.weights(x)
        return a.transpose(1, 2) @ x, a


class ReverseSlimmer(nn.Module):
    """RTSM: slimmed tokens (B, n_in, C) back to (B, n_dense, C); token MLP, then residual channel MLP."""

    def __init__(self, dim: int, n_in: int, n_dense: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = Mlp(n_in, 4 * n_dense, n_dense, act_layer=nn.GELU)
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = Mlp(dim, 4 * dim, dim, act_layer=nn.GELU)

    def forward(self, x: Tensor) -> Tensor:
        """Decode to the dense token count."""
        y = self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return y + self.channel_mlp(self.norm2(y))


def slim_tokens(state: TokenState, slimmer: TokenSlimmer) -> TokenState:
    """Apply a TSM to the patch tokens of ``state``: soft sizes and the hard map back to the grid follow."""
    p = state.num_prefix
    sizes = state.sizes()
    patches, a = slimmer(state.x[:, p:])
    state.x = torch.cat([state.x[:, :p], patches], dim=1)
    responsibility = a / a.sum(dim=2, keepdim=True)  # how each input token spreads over the outputs
    new_sizes = (responsibility.transpose(1, 2) @ sizes[:, p:, None].to(a.dtype)).squeeze(2)
    state.size = torch.cat([sizes[:, :p], new_sizes.to(sizes.dtype)], dim=1)
    if state.source is not None:
        batch = a.shape[0]
        new_pos = torch.cat([torch.arange(p, device=a.device).expand(batch, p), p + a.argmax(dim=2)], dim=1)
        state.source = remap_source(state.source, new_pos)
    state.grid = None
    return state


class SiTReducer(Reducer):
    """One block of SiT: maybe a TSM before it; in training, the FRD target after it (through the RTSM)."""

    def __init__(self, block: int, depth: int, slimmer: TokenSlimmer | None, reverse: ReverseSlimmer | None,
                 frd: bool):
        super().__init__()
        self.block, self.depth, self.frd = block, depth, frd
        self.slimmer, self.reverse = slimmer, reverse

    def before_block(self, state: TokenState) -> TokenState:
        """Slim the patch tokens (training and inference alike)."""
        if self.slimmer is not None:
            state = slim_tokens(state, self.slimmer)
        return state

    def after_block(self, state: TokenState) -> TokenState:
        """Training with FRD: ask for this block's (decoded) tokens to match the teacher's."""
        if self.training and self.frd:
            tokens = state.x[:, state.num_prefix:]
            if self.reverse is not None:
                tokens = self.reverse(tokens)
            state.aux.append(TokenTarget(tokens, self.block, weight=1.0 / self.depth, name="frd"))
        return state

    def param_options(self) -> dict[str, ParamOptions]:
        """The reverse module: 5x lr, weight decay on every parameter (the official RTSM group)."""
        return {"reverse.": ParamOptions(lr_scale=REVERSE_LR_SCALE, weight_decay="all")}


def stage_counts(n0: int, rates: list[float]) -> list[int]:
    """Tokens after each slim: int(n0 * cumulative product of the keep rates), at least 1."""
    counts, keep = [], 1.0
    for r in rates:
        keep *= r
        counts.append(max(1, int(n0 * keep + 1e-9)))
    return counts


@dataclasses.dataclass
class SiTOptions(MethodOptions):
    """SiT: where to slim, how much, and whether to build the training-only reverse modules."""

    keep_rate: Any = dataclasses.field(default=0.5, metadata={
        "help": "tokens kept per stage (one value, or one per location), cumulative over stages",
        "source": "SiT (Zong et al., ECCV 2022), the released DeiT-S setting: 0.5 per stage"})
    locations: Any = dataclasses.field(default=None, metadata={
        "help": "0-based blocks a TSM runs before; default depth//4, depth//2, 3*depth//4",
        "source": "ours: the official code covers LV-ViT only (docs/methods/sit.md)"})
    reverse: bool = dataclasses.field(default=True, metadata={
        "help": "build the reverse modules (RTSM) and FRD targets for training; False for inference",
        "source": "SiT §3.3"})

    def resolved(self, model: nn.Module) -> "SiTOptions":
        """Validated keep rates and locations for this model."""
        locs = resolve_locations("sit", self.locations, model, between_blocks=True)
        return SiTOptions(keep_rate=check_rates(self.keep_rate, locs), locations=locs, reverse=bool(self.reverse))


@register
class SiT(KeepRateLevels, Method):
    """Soft token slimming (TSM) before a few blocks; ``reverse=True`` adds the training-only RTSM + FRD."""

    name = "sit"
    Options = SiTOptions

    @classmethod
    def needs_teacher(cls, options: dict[str, Any]) -> bool:
        """FRD distils every block from the dense model."""
        return True

    def schedule(self) -> list[tuple[int, int, int]]:
        """(block, tokens in, tokens out) for every slim that changes the count."""
        locs, rates = self.config.locations, self.config.keep_rate
        rates = rates_per_location(rates, locs)
        n = self.model.patch_embed.num_patches
        out, current = [], n
        for block, count in zip(locs, stage_counts(n, rates)):
            if count < current:
                out.append((block, current, count))
                current = count
        return out

    def reducers(self) -> dict[int, Reducer]:
        dim, depth = self.model.embed_dim, len(self.model.blocks)
        n_dense = self.model.patch_embed.num_patches
        slims = {block: (n_in, n_out) for block, n_in, n_out in self.schedule()}
        reverse = self.config.reverse
        reducers: dict[int, Reducer] = {}
        tokens = n_dense
        first = min(slims, default=depth)
        for block in range(depth):
            slimmer = None
            if block in slims:
                slimmer, tokens = TokenSlimmer(dim, slims[block][1]), slims[block][1]
            if reverse:
                rtsm = ReverseSlimmer(dim, tokens, n_dense) if block >= first else None
                reducers[block] = SiTReducer(block, depth, slimmer, rtsm, frd=True)
            elif slimmer is not None:
                reducers[block] = SiTReducer(block, depth, slimmer, None, frd=False)
        return reducers


    @classmethod
    def inference_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The options of the deployable model: no reverse modules."""
        return {**options, "reverse": False}
