"""SPViT (Kong et al., ECCV 2022): multi-head token selector, package token, soft pruning to a budget.

Before each chosen block (DeiT: 3, 6, 9) a selector scores the patch-side tokens:
- per head h, one scorer (shared by all heads, as in the official code) on that head's d
  channels: u = GELU(Linear(LN(x_h))); [local half, policy-weighted mean of the global half] ->
  Linear d -> d/2 -> d/4 -> 2 with GELU, giving keep/drop logits;
- per-token head weights from a squeeze-excite branch over the heads' channel means
  (Linear H -> H/2 -> H, sigmoid); decision logits S = sum_h w_h log_softmax(l_h) / sum_h w_h and
  keep probabilities P = sum_h w_h softmax(l_h)[keep] / sum_h w_h.

Training (shapes fixed): keep = Gumbel-softmax(S, hard, straight-through) x previous policy; the
newly dropped tokens are packed into one package token sum_j P_j x_j (keep-probability weighted,
not normalised) appended at the end; every later block masks the dropped keys (multiplicatively,
so the selector gets gradients through attention: ``PolicyKernel``). The ratio loss
2/S * (mean keep over the original patches and the batch - target)^2 per stage and the token
distillation of the final-norm patch tokens kept at the last stage go to the training engine.

Inference (ours; the official code only masks, or gathers at batch 1 with a mean package token):
deterministic top-K per image with K_s = int(n0 * target_s) patch tokens alive after stage s, a
real gather in raster order, and the package token built with the training formula. Shapes are
static for a given budget, so any batch size works and the speed-up is real.

On PiT (the paper's CNN-type case) the defaults put one selector in each stage and the targets restart
in every stage (the grid is restored before each pooling); package tokens are carried through the
pooling's linear map like the class token (``TokenState.unplaced``), each kept as its own token.

Budgets: ``keep_rate`` is one rho (targets rho, rho^2, rho^3) or the cumulative targets per stage;
``macs=`` searches rho; ``vitslim.measure.fit_latency`` searches it for a latency measured here.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitslim.errors import VitslimError
from vitslim.families import family_of
from vitslim.kernels import BlockKernel
from vitslim.methods.base import KeepRateLevels, Method, MethodOptions, Reducer, check_rate, register, resolve_locations
from vitslim.tokens import FINAL, AuxLoss, Dropped, TokenState, TokenTarget, append_unplaced, keep_tokens

RATIO_WEIGHT = 2.0  # official --ratiow, divided by the number of stages
POLICY_EPS = 1e-6  # SPViT/DynamicViT's masked softmax: (e_ij + eps/N) / (sum_k e_ik + eps)


def policy_attention(logits: Tensor, policy: Tensor) -> Tensor:
    """Softmax with masked keys as a product (so gradients reach the keep decisions); the diagonal is kept."""
    n = logits.shape[-1]
    keep = policy[:, None, None, :].to(logits.dtype)
    eye = torch.eye(n, dtype=logits.dtype, device=logits.device)
    keep = keep + (1.0 - keep) * eye  # a masked token still attends to itself
    e = (logits - logits.amax(dim=-1, keepdim=True)).exp() * keep
    return (e + POLICY_EPS / n) / (e.sum(dim=-1, keepdim=True) + POLICY_EPS)


class PolicyKernel(BlockKernel):
    """Training: explicit attention whose dropped keys are masked multiplicatively (SPViT, DynamicViT).

    An additive -inf mask would stop the gradient to the keep decisions. The selector stages install
    it in the state (``TokenState.kernel``), so every later block masks; it also carries the keep
    masks of every stage so far, for the ratio loss and the final token distillation.
    """

    def __init__(self, policy: Tensor, keep: list[Tensor]):
        self.policy = policy  # (B, N) 1 = token kept, 0 = masked out of attention
        self.keep = keep  # per stage: (B, n0) keep masks over the original patches

    def attend(self, attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        """Explicit attention with the policy applied to the keys."""
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        return attn.attn_drop(policy_attention(logits, self.policy)) @ v


class TokenSelector(nn.Module):
    """Keep/drop logits per token from per-head scorers (weights shared across heads) and head weights."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        d = dim // num_heads
        self.num_heads, self.head_dim = num_heads, d
        self.norm = nn.LayerNorm(d)
        self.in_proj = nn.Linear(d, d)
        self.out = nn.Sequential(nn.Linear(d, d // 2), nn.GELU(), nn.Linear(d // 2, d // 4), nn.GELU(),
                                 nn.Linear(d // 4, 2))
        hidden = max(1, num_heads // 2)
        self.head_weights = nn.Sequential(nn.Linear(num_heads, hidden), nn.GELU(), nn.Linear(hidden, num_heads),
                                          nn.Sigmoid())

    def forward(self, x: Tensor, policy: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Decision log-probabilities S (B, n, 2; channel 0 = keep) and keep probabilities P (B, n)."""
        batch, n, _ = x.shape
        xh = x.reshape(batch, n, self.num_heads, self.head_dim)
        w = self.head_weights(xh.mean(-1))  # (B, n, H)
        u = F.gelu(self.in_proj(self.norm(xh)))  # (B, n, H, d)
        half = self.head_dim // 2
        local, glob = u[..., :half], u[..., half:]
        if policy is None:
            glob = glob.mean(1, keepdim=True)
        else:
            pw = policy.to(u.dtype)[:, :, None, None]
            glob = (glob * pw).sum(1, keepdim=True) / pw.sum(1, keepdim=True).clamp_min(1e-6)
        logits = self.out(torch.cat([local, glob.expand(-1, n, -1, -1)], dim=-1))  # (B, n, H, 2)
        norm = w.sum(-1, keepdim=True)
        decision = (w[..., None] * logits.log_softmax(-1)).sum(2) / norm
        keep_prob = (w * logits.softmax(-1)[..., 0]).sum(2) / norm[..., 0]
        return decision, keep_prob


class SelectorStage(Reducer):
    """One SPViT stage before a block: masks (training) or gathers (inference), adds a package token."""

    def __init__(self, dim: int, num_heads: int, stage: int, num_stages: int, target: float, n0: int,
                 last: bool):
        super().__init__()
        self.selector = TokenSelector(dim, num_heads)
        self.stage, self.num_stages, self.target, self.n0, self.last = stage, num_stages, target, n0, last
        self.keep_count = max(1, int(n0 * target + 1e-9))
        self.gumbel = True  # False: masked forward with argmax decisions (a diagnostic of the official eval)

    def before_block(self, state: TokenState) -> TokenState:
        """Select before the block."""
        return self._train(state) if self.training else self._infer(state)

    def _train(self, state: TokenState) -> TokenState:
        p, x = state.num_prefix, state.x
        batch, n_all = x.shape[0], x.shape[1]
        side = x[:, p:]  # n0 patches + the package tokens of earlier stages
        earlier = state.kernel if isinstance(state.kernel, PolicyKernel) else None
        prev = earlier.policy[:, p:] if earlier is not None else side.new_ones(batch, n_all - p)
        decision, keep_prob = self.selector(side, prev)
        if self.gumbel:
            keep = F.gumbel_softmax(decision, tau=1.0, hard=True)[..., 0] * prev
        else:
            keep = (decision[..., 0] >= decision[..., 1]).to(prev.dtype) * prev
        packages = torch.zeros_like(keep)
        packages[:, self.n0:] = 1.0
        keep = keep * (1 - packages) + packages  # earlier package tokens always stay
        dropped = prev - keep
        package = torch.nan_to_num((keep_prob * dropped).unsqueeze(1) @ side)  # (B, 1, C)
        if state.source is not None:  # traced: a masked patch's value now, as keep_tokens records at inference
            state.dropped = _record_masked(state, side[:, :self.n0], dropped[:, :self.n0] > 0.5)
        state = append_unplaced(state, package)
        ones = x.new_ones(batch, p)
        policy = torch.cat([ones, keep, x.new_ones(batch, 1)], dim=1)
        state.kernel = PolicyKernel(policy, (earlier.keep if earlier is not None else []) + [keep[:, :self.n0]])
        ratio = keep[:, :self.n0].mean()  # over the original patches and the whole batch (official)
        state.aux.append(AuxLoss("ratio", RATIO_WEIGHT / self.num_stages * (ratio - self.target) ** 2))
        return state

    def _infer(self, state: TokenState) -> TokenState:
        p = state.num_prefix
        side = state.x[:, p:]
        alive = side.shape[1] - state.unplaced  # patch tokens still here; the rest are earlier package tokens
        _, keep_prob = self.selector(side)
        k = min(self.keep_count, alive)
        idx = keep_prob[:, :alive].topk(k, dim=1, sorted=False).indices.sort(dim=1).values
        batch = side.shape[0]
        earlier = torch.arange(alive, side.shape[1], device=side.device).expand(batch, -1)
        state = keep_tokens(state, torch.cat([idx, earlier], dim=1), fuse_weights=keep_prob)
        state.unplaced += 1  # the new package token, last (the earlier ones stay just before it)
        return state

    def after_model(self, state: TokenState) -> TokenState:
        """Training, last stage: distil the final-norm patch tokens that are kept, from the teacher."""
        if self.training and self.last and isinstance(state.kernel, PolicyKernel):
            p = state.num_prefix
            state.aux.append(TokenTarget(state.x[:, p:p + self.n0], FINAL, weight=1.0,
                                         mask=state.kernel.keep[-1] > 0.5, name="token"))
        return state

    def extra_repr(self) -> str:
        return f"stage={self.stage}, target={self.target}, keep_count={self.keep_count}"


def keep_targets(keep_rate: Any, model_stages: list[int]) -> list[float]:
    """Cumulative keep targets per selector: one rho gives rho, rho^2, ... within each of the model's
    stages (``model_stages``: the model stage of each selector; a plain ViT has one); a list is taken as the targets."""
    stages = len(model_stages)
    if isinstance(keep_rate, (list, tuple)):
        targets = [check_rate("keep_rate", r) for r in keep_rate]
        if len(targets) != stages:
            raise VitslimError(f"{len(targets)} keep targets for {stages} selector locations")
        pairs = zip(zip(targets, model_stages), zip(targets[1:], model_stages[1:]))
        if any(b > a and sa == sb for (a, sa), (b, sb) in pairs):
            raise VitslimError(f"keep targets are cumulative fractions of the patches and must not grow: {targets}")
        return targets
    rho = check_rate("keep_rate", keep_rate)
    return [round(rho ** (model_stages[:s + 1].count(stage)), 6) for s, stage in enumerate(model_stages)]


def _record_masked(state: TokenState, patches: Tensor, newly: Tensor) -> Dropped:
    """``state.dropped`` plus the patches masked out just now, with their values now (training keeps every token)."""
    if state.dropped is None:
        return Dropped(torch.where(newly.unsqueeze(-1), patches, torch.zeros_like(patches)), newly)
    return Dropped(torch.where(newly.unsqueeze(-1), patches, state.dropped.values), state.dropped.mask | newly)


@dataclasses.dataclass
class SPViTOptions(MethodOptions):
    """SPViT: the keep targets and where the selectors sit."""

    keep_rate: Any = dataclasses.field(default=0.7, metadata={
        "help": "rho (targets rho, rho^2, rho^3) or the cumulative keep target of each stage",
        "source": "SPViT (Kong et al., ECCV 2022): DeiT-S targets 0.7 / 0.49 / 0.343"})
    locations: Any = dataclasses.field(default=None, metadata={
        "help": "0-based blocks a selector runs before; default depth//4, depth//2, 3*depth//4",
        "source": "SPViT: before blocks 4, 7, 10 (1-based) of DeiT's 12"})

    def resolved(self, model: nn.Module) -> "SPViTOptions":
        """Validated cumulative targets and locations for this model."""
        locs = resolve_locations("spvit", self.locations, model, between_blocks=True)
        stages = family_of(model).block_stages(model)
        return SPViTOptions(keep_rate=keep_targets(self.keep_rate, [stages[b] for b in locs]), locations=locs)


@register
class SPViT(KeepRateLevels, Method):
    """Multi-head token selector + package token before a few blocks; knob ``keep_rate`` (rho or targets)."""

    name = "spvit"
    Options = SPViTOptions

    @classmethod
    def needs_teacher(cls, options: dict[str, Any]) -> bool:
        """The final kept tokens are distilled from the dense model."""
        return True

    @classmethod
    def runs_on(cls, family: str) -> bool:
        """Also on rotary ViTs (Eva: kept tokens keep their positions, package tokens have none) and on PiT
        (the paper's CNN-type case: selectors within each stage, package tokens through the pooling's linear map)."""
        return family in ("vit", "eva", "pit")

    def reducers(self) -> dict[int, Reducer]:
        family = family_of(self.model)
        blocks, patches = family.blocks(self.model), family.stage_patches(self.model)
        locs, targets = self.config.locations, self.config.keep_rate
        return {block: SelectorStage(blocks[block].norm1.normalized_shape[0], blocks[block].attn.num_heads, s,
                                     len(locs), t, patches[block], last=s == len(locs) - 1)  # its stage's width
                for s, (block, t) in enumerate(zip(locs, targets))}
