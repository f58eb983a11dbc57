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
  weight norms that a channel connects), or from calibration data (``calibration=`` a DataLoader of
  (images, labels) or a tensor of images): Taylor importance |sum a * dL/da| (``"taylor"``, the
  default with data; without labels the model's own predictions are the targets) or the
  activation-aware ``"activation"`` (in the spirit of Wanda: the norm of each channel's own
  contribution, weight norm times activation norm) or ``"fluctuation"`` (after FLAP: the same on the
  deviation from the calibration mean, and pruned value/MLP channels held at that mean), which is
  what makes training-free CDCP usable on real pretrained weights (``docs/methods/cdcp.md``);
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
IMPORTANCES = ("magnitude", "taylor", "activation", "fluctuation")  # the last three need calibration=
COMPENSATED = ("fluctuation",)  # importances whose pruned channels are replaced by their calibration mean
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
    v_fill: Tensor | None = None  # (H*d,) what pruned inputs of attn.proj stand in for (their calibration mean)
    mlp_fill: Tensor | None = None  # (hidden,) likewise for fc2's pruned inputs


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
        """The output projection on the kept value channels (plus the pruned ones' mean, when compensated)."""
        bias = filled_bias(attn.proj, self.plan.v_fill)
        if self.plan.v_index is not None:
            return F.linear(x, attn.proj.weight.index_select(1, self.plan.v_index), bias)
        return attn.proj(x) if self.plan.v_fill is None else F.linear(x, attn.proj.weight, bias)

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
        bias = filled_bias(mlp.fc2, self.plan.mlp_fill)
        h = F.linear(h, mlp.fc2.weight, bias) if idx is None else F.linear(h, mlp.fc2.weight.index_select(1, idx), bias)
        return mlp.drop2(h)


def filled_bias(layer: nn.Linear, fill: Tensor | None) -> Tensor | None:
    """The layer's bias with its pruned inputs held at ``fill`` (zero where kept): bias + W fill."""
    if fill is None:
        return layer.bias
    extra = layer.weight @ fill.to(layer.weight.dtype)
    return extra if layer.bias is None else layer.bias + extra


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


def activation_statistics(model: nn.Module, data: Any, max_batches: int = CALIBRATION_BATCHES) -> list[dict[str, Tensor]]:
    """Per block, over calibration images (one forward per batch, no gradients): ``qk``, the sum over images
    of |q_c|^2 |k_c|^2 (H, d); the token counts ``v_n``/``mlp_n`` and the per-channel sums ``v_sum``/``v_sq``
    of proj's input (H*d) and ``mlp_sum``/``mlp_sq`` of fc2's input (hidden)."""
    probe = dense_copy(model)
    sums: list[dict[str, Tensor]] = [{} for _ in probe.blocks]

    def add(i: int, key: str, value: Tensor) -> None:
        sums[i][key] = sums[i][key] + value if key in sums[i] else value

    def on_qkv(i: int, attn: nn.Module):
        def hook(_module, _inputs, out: Tensor) -> None:
            q, k = out.double().unflatten(-1, (3, attn.num_heads, attn.head_dim)).unbind(2)[:2]  # (B, N, H, d)
            add(i, "qk", (q.pow(2).sum(1) * k.pow(2).sum(1)).sum(0))  # per image |q_c|^2 |k_c|^2
        return hook

    def on_input(i: int, key: str):
        def hook(_module, inputs: tuple[Tensor, ...]) -> None:
            x = inputs[0].double().flatten(0, -2)
            add(i, f"{key}_sum", x.sum(0))
            add(i, f"{key}_sq", x.pow(2).sum(0))
            add(i, f"{key}_n", torch.tensor(float(len(x)), dtype=torch.float64))
        return hook

    handles = []
    for i, blk in enumerate(probe.blocks):
        handles += [blk.attn.qkv.register_forward_hook(on_qkv(i, blk.attn)),
                    blk.attn.proj.register_forward_pre_hook(on_input(i, "v")),
                    blk.mlp.fc2.register_forward_pre_hook(on_input(i, "mlp"))]
    try:
        with torch.no_grad():
            for images, _ in calibration_batches(data, max_batches):
                probe(images)
    finally:
        for handle in handles:
            handle.remove()
    if not sums[0]:
        raise VitslimError("calibration= gave no batches: pass a DataLoader of (images, labels) or an image tensor")
    return sums


def _output_scale(layer_scale: nn.Module) -> Tensor | None:
    """LayerScale's per-channel gamma (it scales every contribution to the residual), or None."""
    gamma = getattr(layer_scale, "gamma", None)
    return gamma.detach().double() if isinstance(gamma, Tensor) else None


def _column_norms(weight: Tensor, gamma: Tensor | None) -> Tensor:
    """Norm of each input column of a Linear weight, as it reaches the residual (after LayerScale)."""
    weight = weight.detach().double()
    return (weight if gamma is None else gamma[:, None] * weight).norm(dim=0)


def _contribution_importance(model: nn.Module, data: Any, max_batches: int, centred: bool) -> list[dict[str, Tensor]]:
    """Per channel, the norm over the calibration tokens of what it adds to the residual (centred: of how that
    varies about its mean, with the means as ``v_mean``/``mlp_mean``); query/key channels by |q_c| |k_c|."""
    out = []
    for blk, s in zip(model.blocks, activation_statistics(model, data, max_batches)):
        h, d = blk.attn.num_heads, blk.attn.head_dim
        scores = {"qk": s["qk"].sqrt().sum(0)}
        for key, layer, scale in (("v", blk.attn.proj, blk.ls1), ("mlp", blk.mlp.fc2, blk.ls2)):
            square = s[f"{key}_sq"]
            if centred:
                mean = s[f"{key}_sum"] / s[f"{key}_n"]
                square = (square - s[f"{key}_n"] * mean.pow(2)).clamp_min(0)
                scores[f"{key}_mean"] = mean.float()
            scores[key] = _column_norms(layer.weight, _output_scale(scale)) * square.sqrt()
        scores["v"] = scores["v"].view(h, d).sum(0)  # one mask for every head
        out.append({k: v.float() for k, v in scores.items()})
    return out


def activation_importance(model: nn.Module, data: Any, max_batches: int = CALIBRATION_BATCHES) -> list[dict[str, Tensor]]:
    """Activation-aware importance: the norm of each channel's contribution over calibration images.

    In the spirit of Wanda (Sun et al., 2023), weight norm times activation norm, taken where the
    channel acts: an MLP hidden channel j adds ``W2[:, j] h_j`` to the residual, whose norm over the
    calibration tokens is ``|W2[:, j]| |h_j|``; a value channel likewise through ``proj``; a query/key
    channel c adds the rank-one ``q_c k_c^T`` to each image's attention logits, whose norm is
    ``|q_c| |k_c|``. LayerScale's gamma scales the output weights; heads are summed (masks are shared).
    """
    return _contribution_importance(model, data, max_batches, centred=False)


def fluctuation_importance(model: nn.Module, data: Any, max_batches: int = CALIBRATION_BATCHES) -> list[dict[str, Tensor]]:
    """Fluctuation importance with mean compensation, after FLAP (An et al., AAAI 2024): a value or MLP
    channel scores by the norm of its contribution's deviation from its calibration mean, and a pruned one
    is replaced by that mean (``v_mean``/``mlp_mean``, added to proj's / fc2's bias through its weights), so
    what is lost is only how it varies; query/key channels as in ``activation_importance``."""
    return _contribution_importance(model, data, max_batches, centred=True)


CALIBRATED_IMPORTANCES = {"taylor": taylor_importance, "activation": activation_importance,
                          "fluctuation": fluctuation_importance}


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
                 tokens: tuple[int, int], merge_axis: str | None = None, compensate: bool = False):
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
        self.compensate = compensate
        if compensate:  # pruned value / MLP channels stand in at their calibration mean (zeros until loaded)
            self.register_buffer("v_mean", importance.get("v_mean", torch.zeros(self.num_heads * self.head_dim)).clone())
            self.register_buffer("mlp_mean", importance.get("mlp_mean", torch.zeros(self.hidden)).clone())
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
            return ChannelPlan(qkv_mask=qkv, mlp_mask=m_mlp, **self.fills(m_v, m_mlp))
        key = self._mask_state()
        if self._eval_plan is None or self._eval_plan[0] != key:
            # built outside inference mode: the indices are saved for backward by an eval pass with gradients
            with torch.inference_mode(False), torch.no_grad():
                self._eval_plan = (key, self._index_plan()._replace(**self.fills(self.mask_v, self.mask_mlp)))
        return self._eval_plan[1]

    def fills(self, mask_v: Tensor, mask_mlp: Tensor) -> dict[str, Tensor]:
        """What the pruned value and MLP channels stand in at (their calibration mean; kept ones 0), when compensated."""
        if not self.compensate:
            return {}
        per_head = mask_v[None, :].expand(self.num_heads, self.head_dim).reshape(-1)
        return {"v_fill": (1 - per_head) * self.v_mean, "mlp_fill": (1 - mask_mlp) * self.mlp_mean}

    def _mask_state(self) -> tuple[Any, ...]:
        """What the eval plan depends on: every in-place change (reselect, set_progress, load_state_dict's copy_)
        bumps a buffer's version, and .to() makes new buffers on another device or at another address."""
        buffers = (self.mask_qk, self.mask_v, self.mask_mlp, self.counts) + (
            (self.v_mean, self.mlp_mean) if self.compensate else ())
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


def channel_blocks(model: nn.Module, keep_rate: float, calibrated: list[dict[str, Tensor]] | None,
                   tokens: list[tuple[int, int]], merges: dict[int, str] | None = None,
                   compensate: bool = False) -> dict[int, Reducer]:
    """One ChannelBlock per block (scores from ``calibrated`` or weight magnitudes), counts allocated for ``keep_rate``;
    with ``compensate`` pruned value/MLP channels stand in at their calibration means."""
    merges = merges or {}
    # without calibrated values (also a restored checkpoint: its scores, counts and masks come from the state dict)
    imp = calibrated if calibrated is not None else magnitude_importance(model)
    blocks = [ChannelBlock(blk, imp[i], (blk.attn.head_dim, blk.mlp.fc1.out_features), tokens[i], merges.get(i),
                           compensate) for i, blk in enumerate(model.blocks)]
    counts = allocate(blocks, keep_rate)
    for r, c in zip(blocks, counts):
        r.counts.copy_(torch.tensor(c))
        r.keep_rate = keep_rate
        r.reselect()
    blocks[0].group = blocks
    return dict(enumerate(blocks))


def resolve_importance(importance: Any) -> str:
    """One of IMPORTANCES."""
    if importance not in IMPORTANCES:
        raise VitslimError(f"importance={importance!r}: use 'magnitude' (data-free), or pass calibration=DATA "
                           f"with {_calibrated_names()}")
    return importance


def prepare_calibration(model: nn.Module, options: dict[str, Any]) -> dict[str, Any]:
    """``calibration=`` (and ``calibration_batches=``) -> importance values in the options (``calibrated``).

    The importance is ``options["importance"]``: one of CALIBRATED_IMPORTANCES ('taylor' by default).
    """
    data = options.pop("calibration", None)
    batches = options.pop("calibration_batches", CALIBRATION_BATCHES)
    if data is None:
        return options
    importance = options.get("importance") or "taylor"
    if importance not in CALIBRATED_IMPORTANCES:
        raise VitslimError(f"importance={importance!r} is data-free: drop calibration=, or use importance="
                           f"{_calibrated_names()} with it")
    check_channel_model(model)
    options["calibrated"] = CALIBRATED_IMPORTANCES[importance](model, data, int(batches))
    options["importance"] = importance
    return options


def _calibrated_names() -> str:
    return ", ".join(f"'{name}'" for name in CALIBRATED_IMPORTANCES)


def calibrated_field() -> Any:
    """The ``calibrated`` option: importance from calibration data, used to start the scores, not recorded."""
    return dataclasses.field(default=None, repr=False, metadata={
        "internal": True, "help": "per-block importance from calibration= (set by prepare)"})


@dataclasses.dataclass
class CDCPOptions(MethodOptions):
    """CDCP: the kept fraction of the blocks' MACs and how channels are scored at the start."""

    keep_rate: float = dataclasses.field(default=0.7, metadata={
        "help": "kept fraction of the blocks' channel MACs",
        "source": "ours (CAIT's abstract gives no rate); 0.7 matches the token methods' defaults"})
    importance: str = dataclasses.field(default="magnitude", metadata={
        "help": "'magnitude' (data-free), or with calibration=DATA 'taylor' (its default), 'activation' or "
                "'fluctuation' (with mean compensation: the training-free choice)",
        "source": "ours (docs/methods/cdcp.md); 'activation' after Wanda (Sun et al., 2023), 'fluctuation' after "
                  "FLAP (An et al., 2024)"})
    calibrated: Any = calibrated_field()

    def resolved(self, model: nn.Module) -> "CDCPOptions":
        """Validated rate and importance; the model must be channel-prunable."""
        check_channel_model(model)
        return CDCPOptions(keep_rate=check_rate("keep_rate", self.keep_rate),
                           importance=resolve_importance(self.importance), calibrated=self.calibrated)


@register
class CDCP(KeepRateLevels, Method):
    """CAIT-style CDCP (vitslim reconstruction): head-consistent channel masks; knob ``keep_rate``."""

    name = "cdcp"
    Options = CDCPOptions

    def reducers(self) -> dict[int, Reducer]:
        n = self.model.num_prefix_tokens + self.model.patch_embed.num_patches
        tokens = [(n, n)] * len(self.model.blocks)
        return channel_blocks(self.model, self.config.keep_rate, self.config.calibrated, tokens,
                              compensate=self.config.importance in COMPENSATED)

    @classmethod
    def prepare(cls, model: nn.Module, options: dict[str, Any]) -> dict[str, Any]:
        return prepare_calibration(model, options)
