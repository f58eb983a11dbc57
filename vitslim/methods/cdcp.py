"""CDCP, CAIT-style (vitslim reconstruction): consistent dynamic channel pruning.

The paper's (CAIT abstract, arXiv 2309.15755): CDCP prunes unimportant channels *dynamically*, and
the unimportant channels of multi-head self-attention are pruned *uniformly* (the same way in
every head). Everything else is ours (``docs/methods/cdcp.md``):
- per block, one mask m_qk shared by Q and K (Q K^T needs the same channels on both sides), one
  mask m_v shared by V and the input columns of ``proj``, both with the same indices in every head,
  and a mask m_mlp over the MLP hidden channels; as many qk as v channels per block (CPU SDPA is
  much slower with unequal head dims), multiples of 8 (at least 8) where the head dim allows;
- masks = top-k of learnable scores; in training a straight-through estimator
  m + sigmoid(s) - sigmoid(s).detach() lets gradients reach the scores, so channels can be pruned
  and regrown ("dynamic" = re-selected during training, frozen at export; not input-dependent);
- scores start from an importance: ``importance="magnitude"`` (data-free default: products of the
  weight norms that a channel connects) or Taylor importance |sum a * dL/da| over calibration data
  (``calibration=`` a DataLoader of (images, labels) or a tensor of images; without labels the
  model's own predictions are the targets), which is also the training-free CDCP;
- per-block counts from a global ranking of per-layer-normalised scores, each channel weighted by
  its MAC cost, so that the blocks' channel MACs meet ``keep_rate`` (the kept fraction);
- with the training engine's progress hook: the kept fraction ramps from 1 to ``keep_rate`` over
  the first 30% of training (cubic), counts are re-allocated about ten times on the way and then
  frozen, indices are re-selected every step until 90%, then frozen;
- the softmax scale stays the unpruned d^-1/2; in eval mode only the kept channels are computed
  (so ``count_macs`` and the speed are the pruned ones), and ``vitslim.export.slim`` turns the
  masks into smaller Linear layers of a stock timm model.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitslim.calibration import backward_bytes, dense_copy, gradient_sums, micro_batch_size
from vitslim.errors import VitslimError
from vitslim.kernels import BlockKernel
from vitslim.methods.atme import merge_neighbours
from vitslim.patch import patch
from vitslim.methods.base import (AttnInfo, KeepRateLevels, Method, MethodOptions, ParamOptions, Reducer,
                                  calibration_batches, check_rate, register)
from vitslim.tokens import TokenState

RAMP_END, FREEZE_AT = 0.3, 0.9  # fractions of training: sparsity ramp, then counts frozen; indices frozen
SCORE_LR_SCALE = 10.0  # [DESIGN] scores are O(1) while the ST gradients are small: a larger lr lets them swap
IMPORTANCES = ("magnitude", "taylor")
CALIBRATION_BATCHES = 100


class ChannelPlan(NamedTuple):
    """Channels of one block to keep; every field None = all channels.

    Masks multiply (training: straight-through masks, gradients reach the scores); indices compute
    only the kept channels (inference: fewer MACs, and what ``count_macs`` counts).
    """

    qkv_mask: Tensor | None = None  # (3*H*d,) over attn.qkv's outputs, in timm's (3, H, d) layout
    mlp_mask: Tensor | None = None  # (hidden,) multiplied into act(fc1 x)
    qkv_index: Tensor | None = None  # kept rows of attn.qkv, (3, H, d') flattened: equal d' for q, k and v
    v_index: Tensor | None = None  # kept input columns of attn.proj, (H, d') flattened
    mlp_index: Tensor | None = None  # kept fc1 rows = fc2 input columns


class ChannelKernel(BlockKernel):
    """A block computed on some of its channels: masked (training) or only the kept ones (inference).

    The softmax scale stays ``attn.scale`` (the unpruned head dim's, which the weights were trained with).
    """

    def __init__(self, plan: ChannelPlan):
        self.plan = plan

    def qkv(self, attn: nn.Module, x: Tensor) -> Tensor:
        """All channels, masked ones (training) or only the kept rows (sliced), as (3, B, H, N, d')."""
        batch, n, _ = x.shape
        index = self.plan.qkv_index
        if index is not None:
            b = attn.qkv.bias
            qkv = F.linear(x, attn.qkv.weight.index_select(0, index), None if b is None else b.index_select(0, index))
            return qkv.reshape(batch, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        qkv = attn.qkv(x)
        if self.plan.qkv_mask is not None:
            qkv = qkv * self.plan.qkv_mask
        return qkv.reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)

    def project(self, attn: nn.Module, x: Tensor) -> Tensor:
        """The output projection on the kept value channels."""
        if self.plan.v_index is not None:
            return F.linear(x, attn.proj.weight.index_select(1, self.plan.v_index), attn.proj.bias)
        return attn.proj(x)

    def mlp(self, mlp: nn.Module, x: Tensor) -> Tensor:
        """timm Mlp's forward on the kept hidden channels only (sliced) or with the hidden mask (training)."""
        idx, mask = self.plan.mlp_index, self.plan.mlp_mask
        if idx is None and mask is None:
            return mlp(x)
        if idx is not None:
            b = mlp.fc1.bias
            h = F.linear(x, mlp.fc1.weight.index_select(0, idx), None if b is None else b.index_select(0, idx))
        else:
            h = mlp.fc1(x)
        h = mlp.act(h)
        if mask is not None:
            h = h * mask
        h = mlp.norm(mlp.drop1(h))
        h = mlp.fc2(h) if idx is None else F.linear(h, mlp.fc2.weight.index_select(1, idx), mlp.fc2.bias)
        return mlp.drop2(h)


def channel_step(n: int) -> int:
    """Rounding of a channel count: multiples of 8 (GEMM efficiency) when n allows, else 1."""
    return 8 if n % 8 == 0 and n >= 16 else 1


def check_channel_model(model: nn.Module) -> None:
    """Raise unless every block's attention and MLP can be channel-pruned exactly."""
    from timm.layers import Mlp

    for i, blk in enumerate(model.blocks):
        attn, mlp = blk.attn, blk.mlp
        if not isinstance(attn.q_norm, nn.Identity) or not isinstance(attn.k_norm, nn.Identity):
            raise VitslimError(f"block {i} has q/k norm (LayerNorm over the head dim), which cannot be channel-"
                               "pruned exactly; CDCP supports ViTs without qk_norm (ViT, DeiT, DeiT-III)")
        if not isinstance(attn.norm, nn.Identity) or getattr(attn, "gate", None) is not None:
            raise VitslimError(f"block {i} has an attention output norm or gate; CDCP cannot prune it exactly")
        if type(mlp) is not Mlp or not isinstance(mlp.norm, nn.Identity):
            raise VitslimError(f"block {i} has a {type(mlp).__name__} MLP; CDCP supports timm's plain Mlp")


def magnitude_importance(model: nn.Module) -> list[dict[str, Tensor]]:
    """Data-free importance: per channel, the product of the weight norms it connects (summed over heads)."""
    out = []
    with torch.no_grad():
        for blk in model.blocks:
            attn, mlp = blk.attn, blk.mlp
            h, d = attn.num_heads, attn.head_dim
            w = attn.qkv.weight.view(3, h, d, -1).norm(dim=-1)  # (3, H, d) row norms
            proj = attn.proj.weight.view(-1, h, d).norm(dim=0)  # (H, d) column norms
            out.append({"qk": (w[0] * w[1]).sum(0), "v": (w[2] * proj).sum(0),
                        "mlp": mlp.fc1.weight.norm(dim=1) * mlp.fc2.weight.norm(dim=0)})
    return out


def taylor_importance(model: nn.Module, data: Any, max_batches: int = CALIBRATION_BATCHES) -> list[dict[str, Tensor]]:
    """Taylor importance |sum a * dL/da| per channel (head-summed), accumulated over calibration batches."""
    probe = patch(dense_copy(model), CDCP.name, keep_rate=1.0, importance="magnitude")
    blocks = [probe._vitslim_plan[i] for i in range(len(probe.blocks))]
    for r in blocks:  # all-ones masks whose gradients are sum(a * dL/da): the first-order Taylor term
        r.probe = (torch.ones(r.qkv_size, requires_grad=True), torch.ones(r.hidden, requires_grad=True))
    masks = [m for r in blocks for m in r.probe]
    per_batch = gradient_sums(probe, calibration_batches(data, max_batches), lambda: masks, lambda _, grads: grads,
                              micro_batch=micro_batch_size(backward_bytes(probe)))
    if not per_batch:
        raise VitslimError("calibration= gave no batches: pass a DataLoader of (images, labels) or an image tensor")
    sums = [{"qk": 0.0, "v": 0.0, "mlp": 0.0} for _ in blocks]
    for grads, _ in per_batch:  # abs per batch of the batch's signed sums
        for i, r in enumerate(blocks):
            g_qkv = grads[2 * i].view(3, r.num_heads, r.head_dim)
            sums[i]["qk"] = sums[i]["qk"] + (g_qkv[0] + g_qkv[1]).sum(0).abs()
            sums[i]["v"] = sums[i]["v"] + g_qkv[2].sum(0).abs()
            sums[i]["mlp"] = sums[i]["mlp"] + grads[2 * i + 1].abs()
    return [{k: v.detach() for k, v in s.items()} for s in sums]


def _normalised(score: Tensor) -> Tensor:
    score = score.detach().float().clamp_min(0)
    return score / score.mean().clamp_min(1e-12)


def allocate(blocks: list["ChannelBlock"], keep_rate: float) -> list[tuple[int, int]]:
    """Per-block (head channels, MLP channels) keeping ``keep_rate`` of the blocks' channel MACs.

    Every channel unit (one qk + one v index in all heads, or one MLP hidden channel) is ranked
    globally by its per-layer-normalised score (mean 1 in each layer, so layers compare); the best
    units are taken until their MACs (each unit weighted by its cost) reach the budget, after the
    per-block minimum (8); counts are then rounded to multiples of 8. (Dividing scores by cost
    instead would always prune the expensive attention channels first.)
    """
    prio, cost, owner = [], [], []
    budget, spent = 0.0, 0.0
    mins = []
    for b, r in enumerate(blocks):
        qk, v = _normalised(r.scores.qk).sort(descending=True).values, _normalised(r.scores.v).sort(descending=True).values
        head = (qk + v) / 2
        mlp = _normalised(r.scores.mlp).sort(descending=True).values
        mh, mm = min(8, r.head_dim), min(8, r.hidden)
        mins.append((mh, mm))
        budget += r.head_cost * r.head_dim + r.mlp_cost * r.hidden
        spent += r.head_cost * mh + r.mlp_cost * mm
        for kind, scores, unit, first in ((0, head, r.head_cost, mh), (1, mlp, r.mlp_cost, mm)):
            rest = scores[first:]
            prio.append(rest)
            cost.append(torch.full_like(rest, unit, dtype=torch.float64))
            owner.append(torch.full_like(rest, 2 * b + kind, dtype=torch.long))
    prio, cost, owner = torch.cat(prio), torch.cat(cost), torch.cat(owner)
    order = prio.argsort(descending=True, stable=True)
    taken = cost[order].cumsum(0) <= keep_rate * budget - spent + 1e-6
    extra = torch.bincount(owner[order][taken], minlength=2 * len(blocks)).tolist()
    counts = []
    for b, r in enumerate(blocks):
        kh, km = mins[b][0] + extra[2 * b], mins[b][1] + extra[2 * b + 1]
        sh, sm = channel_step(r.head_dim), channel_step(r.hidden)
        kh = min(r.head_dim, max(mins[b][0], round(kh / sh) * sh))
        km = min(r.hidden, max(mins[b][1], round(km / sm) * sm))
        counts.append((kh, km))
    return counts


def ramp_keep(keep_rate: float, progress: float) -> float:
    """The kept fraction at a point of training: cubic ramp from 1 to keep_rate over [0, RAMP_END]."""
    t = min(max(progress / RAMP_END, 0.0), 1.0)
    return 1.0 - (1.0 - keep_rate) * (1.0 - (1.0 - t) ** 3)


class ChannelScores(nn.Module):
    """Learnable channel scores of one block (their own lr scale, no weight decay: 1-D)."""

    def __init__(self, importance: dict[str, Tensor]):
        super().__init__()
        self.qk = nn.Parameter(_normalised(importance["qk"]))
        self.v = nn.Parameter(_normalised(importance["v"]))
        self.mlp = nn.Parameter(_normalised(importance["mlp"]))


def _top_mask(score: Tensor, k: int) -> Tensor:
    mask = torch.zeros_like(score)
    return mask.scatter_(0, score.detach().topk(k).indices, 1.0)


class ChannelBlock(Reducer):
    """CDCP masks of one block (and, in the joint CAIT method, an ATME merge after its attention)."""

    def __init__(self, blk: nn.Module, importance: dict[str, Tensor], counts: tuple[int, int],
                 tokens: tuple[int, int], merge_axis: str | None = None):
        super().__init__()
        attn = blk.attn
        self.num_heads, self.head_dim, self.hidden = attn.num_heads, attn.head_dim, blk.mlp.fc1.out_features
        self.qkv_size = attn.qkv.out_features
        dim = attn.qkv.in_features
        n_attn, n_mlp = tokens
        # MACs of one unit per image: qkv rows 3H and proj columns H (x C), Q K^T and A V (x N^2 H)
        self.head_cost = float(n_attn * self.num_heads * (4 * dim + 2 * n_attn))
        self.mlp_cost = float(2 * n_mlp * dim)
        self.merge_axis = merge_axis
        self.scores = ChannelScores(importance)
        self.register_buffer("counts", torch.tensor(counts, dtype=torch.long))
        self.register_buffer("frozen", torch.tensor(False))
        self.register_buffer("mask_qk", torch.zeros(self.head_dim))
        self.register_buffer("mask_v", torch.zeros(self.head_dim))
        self.register_buffer("mask_mlp", torch.zeros(self.hidden))
        self.reselect()
        self.probe: tuple[Tensor, Tensor] | None = None  # calibration: all-ones masks that collect gradients
        self.group: list[ChannelBlock] = []  # set on the first block: every block, for global re-allocation
        self.keep_rate = 1.0
        self._last_alloc: int | None = None
        self._eval_plan: tuple[tuple[Any, ...], ChannelPlan] | None = None  # (mask_state(), plan)

    @torch.no_grad()
    def reselect(self) -> None:
        """Masks = top-k of the current scores at the current counts."""
        kh, km = self.counts.tolist()
        self.mask_qk.copy_(_top_mask(self.scores.qk, kh))
        self.mask_v.copy_(_top_mask(self.scores.v, kh))
        self.mask_mlp.copy_(_top_mask(self.scores.mlp, km))

    def _straight_through(self, mask: Tensor, score: Tensor) -> Tensor:
        s = score.sigmoid()
        return mask + s - s.detach()

    def block_kernel(self, state: TokenState) -> BlockKernel | None:
        """This block computed on its kept channels (None when it keeps them all)."""
        plan = self.channel_plan()
        return None if all(v is None for v in plan) else ChannelKernel(plan)

    def param_options(self) -> dict[str, ParamOptions]:
        """The channel scores train at SCORE_LR_SCALE x the method lr (1-D: no weight decay)."""
        return {"scores.": ParamOptions(lr_scale=SCORE_LR_SCALE)}

    def plan(self) -> dict[str, Any]:
        """Kept channels per head (qk and v share the count) and MLP hidden channels."""
        kh, km = self.counts.tolist()
        return {"head_dim": kh, "hidden": km}

    def channel_plan(self) -> ChannelPlan:
        """Training: straight-through masks; eval: the kept channels' indices (None where all are kept)."""
        if self.probe is not None:
            return ChannelPlan(qkv_mask=self.probe[0], mlp_mask=self.probe[1])
        if self.training:
            if not bool(self.frozen):
                self.reselect()
                m_qk = self._straight_through(self.mask_qk, self.scores.qk)
                m_v = self._straight_through(self.mask_v, self.scores.v)
                m_mlp = self._straight_through(self.mask_mlp, self.scores.mlp)
            else:
                m_qk, m_v, m_mlp = self.mask_qk, self.mask_v, self.mask_mlp
            qkv = torch.stack([m_qk, m_qk, m_v])[:, None, :].expand(3, self.num_heads, self.head_dim).reshape(-1)
            return ChannelPlan(qkv_mask=qkv, mlp_mask=m_mlp)
        key = self._mask_state()
        if self._eval_plan is None or self._eval_plan[0] != key:
            # built outside inference mode: the indices are saved for backward by an eval pass with gradients
            with torch.inference_mode(False), torch.no_grad():
                self._eval_plan = (key, self._index_plan())
        return self._eval_plan[1]

    def _mask_state(self) -> tuple[Any, ...]:
        """What the eval plan depends on: every in-place change (reselect, set_progress, load_state_dict's copy_)
        bumps a buffer's version, and .to() makes new buffers on another device or at another address."""
        buffers = (self.mask_qk, self.mask_v, self.mask_mlp, self.counts)
        return (self.mask_qk.device, *((t._version, t.data_ptr()) for t in buffers))

    def _index_plan(self) -> ChannelPlan:
        """The kept channels' indices from the masks (None where all are kept)."""
        kh, km = self.counts.tolist()
        qkv_index = v_index = mlp_index = None
        if kh < self.head_dim:
            heads = torch.arange(self.num_heads, device=self.mask_qk.device)[:, None] * self.head_dim
            qk = heads + self.mask_qk.nonzero()[:, 0]
            v = heads + self.mask_v.nonzero()[:, 0]
            width = self.num_heads * self.head_dim
            qkv_index = torch.cat([qk.reshape(-1), qk.reshape(-1) + width, v.reshape(-1) + 2 * width])
            v_index = v.reshape(-1)
        if km < self.hidden:
            mlp_index = self.mask_mlp.nonzero()[:, 0]
        return ChannelPlan(qkv_index=qkv_index, v_index=v_index, mlp_index=mlp_index)

    def after_attn(self, state: TokenState, attn: AttnInfo) -> TokenState:
        """The joint method's ATME merge (keys from the masked q/k: consistent with what attention used)."""
        if self.merge_axis is None:
            return state
        return merge_neighbours(state, attn.keys, self.merge_axis)

    def set_progress(self, step: int, total_steps: int) -> None:
        """Training progress from the engine: ramp and re-allocate the counts, then freeze (first block only)."""
        if not self.group:
            return
        t = step / max(total_steps, 1)
        frozen = t >= FREEZE_AT
        every = max(1, min(100, round(RAMP_END * total_steps / 10)))  # about ten re-allocations in the ramp
        due = t < RAMP_END and (self._last_alloc is None or step - self._last_alloc >= every)
        final = t >= RAMP_END and self._last_alloc != -1
        if (due or final) and not frozen:
            counts = allocate(self.group, ramp_keep(self.keep_rate, t) if due else self.keep_rate)
            self._last_alloc = step if due else -1
            for r, c in zip(self.group, counts):
                r.counts.copy_(torch.tensor(c))
                r.reselect()
        for r in self.group:
            r.frozen.fill_(frozen)

    def extra_repr(self) -> str:
        kh, km = self.counts.tolist()
        axis = f", merge={self.merge_axis}" if self.merge_axis else ""
        return f"head_dim={kh}/{self.head_dim}, hidden={km}/{self.hidden}{axis}"


def channel_blocks(model: nn.Module, keep_rate: float, taylor: list[dict[str, Tensor]] | None,
                   tokens: list[tuple[int, int]], merges: dict[int, str] | None = None) -> dict[int, Reducer]:
    """One ChannelBlock per block (scores from ``taylor`` or weight magnitudes), counts allocated for ``keep_rate``."""
    merges = merges or {}
    # without Taylor values (also a restored checkpoint: its scores, counts and masks come from the state dict)
    imp = taylor if taylor is not None else magnitude_importance(model)
    blocks = [ChannelBlock(blk, imp[i], (blk.attn.head_dim, blk.mlp.fc1.out_features), tokens[i], merges.get(i))
              for i, blk in enumerate(model.blocks)]
    counts = allocate(blocks, keep_rate)
    for r, c in zip(blocks, counts):
        r.counts.copy_(torch.tensor(c))
        r.keep_rate = keep_rate
        r.reselect()
    blocks[0].group = blocks
    return dict(enumerate(blocks))


def resolve_importance(importance: Any) -> str:
    """'magnitude' or 'taylor'."""
    if importance not in IMPORTANCES:
        raise VitslimError(f"importance={importance!r}: use 'magnitude' (data-free) or pass calibration=DATA "
                           f"for 'taylor'")
    return importance


def prepare_calibration(model: nn.Module, options: dict[str, Any]) -> dict[str, Any]:
    """``calibration=`` (and ``calibration_batches=``) -> Taylor importance values in the options (``taylor``)."""
    data = options.pop("calibration", None)
    batches = options.pop("calibration_batches", CALIBRATION_BATCHES)
    if data is None:
        return options
    check_channel_model(model)
    options["taylor"] = taylor_importance(model, data, int(batches))
    options["importance"] = "taylor"
    return options


def taylor_field() -> Any:
    """The ``taylor`` option: calibration values, used to start the scores, not recorded with the options."""
    return dataclasses.field(default=None, repr=False, metadata={
        "internal": True, "help": "per-block Taylor importance from calibration= (set by prepare)"})


@dataclasses.dataclass
class CDCPOptions(MethodOptions):
    """CDCP: the kept fraction of the blocks' MACs and how channels are scored at the start."""

    keep_rate: float = dataclasses.field(default=0.7, metadata={
        "help": "kept fraction of the blocks' channel MACs",
        "source": "ours (CAIT's abstract gives no rate); 0.7 matches the token methods' defaults"})
    importance: str = dataclasses.field(default="magnitude", metadata={
        "help": "'magnitude' (data-free) or 'taylor' (pass calibration=DATA)",
        "source": "ours (docs/methods/cdcp.md)"})
    taylor: Any = taylor_field()

    def resolved(self, model: nn.Module) -> "CDCPOptions":
        """Validated rate and importance; the model must be channel-prunable."""
        check_channel_model(model)
        return CDCPOptions(keep_rate=check_rate("keep_rate", self.keep_rate),
                           importance=resolve_importance(self.importance), taylor=self.taylor)


@register
class CDCP(KeepRateLevels, Method):
    """CAIT-style CDCP (vitslim reconstruction): head-consistent channel masks; knob ``keep_rate``."""

    name = "cdcp"
    Options = CDCPOptions

    def reducers(self) -> dict[int, Reducer]:
        n = self.model.num_prefix_tokens + self.model.patch_embed.num_patches
        tokens = [(n, n)] * len(self.model.blocks)
        return channel_blocks(self.model, self.config.keep_rate, self.config.taylor, tokens)

    @classmethod
    def prepare(cls, model: nn.Module, options: dict[str, Any]) -> dict[str, Any]:
        return prepare_calibration(model, options)
