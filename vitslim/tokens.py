"""TokenState and the pure token operations every method shares.

Conventions (all methods rely on them):
- ``x`` is (B, N, C); the first ``num_prefix`` tokens (CLS, distillation, registers) are never
  merged or pruned and stay in front, in their original order.
- ``size`` is (B, N): how many input patches each token stands for (prefix tokens count 1).
  ``None`` means "all ones" (nothing reduced yet), which keeps the dense path free of extra work.
- ``source`` is (B, n0) over the n0 original patches: the index of the current token that each
  patch now lives in, or -1 where the patch was pruned. ``None`` when not traced (tracing costs a
  gather per reduction, so it is off unless a caller asks for it, e.g. for ``unmerge``).
- ``grid`` is the (H, W) shape of the patch tokens while they still form a rectangle in raster
  order, ``None`` once a reduction scrambles them; ``grid0`` is the original patch grid.
- ``kernel``: a ``vitslim.kernels.BlockKernel`` that a reducer installs for every later block
  (e.g. attention that masks dropped tokens while training); ``None`` is timm's computation.
- ``aux``: what methods ask of the training loss (``AuxLoss``, ``TokenTarget`` below).
- ``dropped``: with ``source`` traced, what each patch's token was when pruning or fusing took it
  away (``Dropped``), so a dense output can restore the patch (``vitslim.dense.features``).
- ``block_source``: with ``source`` traced, the source map of the tokens the last block computed
  on when a reducer grouped them only inside that block (Prune-and-Merge merges before a block and
  reconstructs after it, so ``source`` stays the identity); ``None``: the block computed on
  ``source``. Reset before every block; ``computed_source`` gives whichever applies.
- ``rope``: the model family's rotary tables for this forward (``vitslim.families``), ``None`` when
  the model has no rotary positions. Then ``pos`` is ``None`` too, and nothing tracks positions.
- ``pos``: with ``rope``, (B or 1, n) for the patch-side tokens: the original patch whose rotary
  position each token uses, or ``num_patches0`` for none (the identity rotation, as for the
  prefix). ``None``: still the original patches in order. A pruned token's neighbours keep their
  own; a merged token keeps its destination's (ToMe) or anchor's (ATME); a fused token has none.
- ``unplaced``: how many of the last tokens stand for no patch and are carried on across a
  pooling layer like the class token (SPViT's package tokens, ``append_unplaced``); 0: none.
Merges are index-adds of weighted differences onto the destination rows, or scatter-sums then a
divide (never scatter-mean), so they export to ONNX.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from vitslim.kernels import BlockKernel

FINAL = -1  # TokenTarget.block for the dense teacher's tokens after its final norm


# NamedTuples, not dataclasses: DDP (find_unused_parameters) and pytree look inside tuples for tensors
class AuxLoss(NamedTuple):
    """A loss term a method computed during the forward, already carrying its own weight."""

    name: str
    value: Tensor


class TokenTarget(NamedTuple):
    """Student tokens (B, n, C) to match against the teacher's patch tokens after block ``block`` (FINAL: final norm)."""

    student: Tensor
    block: int
    weight: float = 1.0
    mask: Tensor | None = None  # (B, n) bool or 0/1: which tokens count (None: all)
    name: str = "token"


class Dropped(NamedTuple):
    """Per original patch: its token's value when a pruning step dropped or fused it away."""

    values: Tensor  # (B, n0, C); zeros where ``mask`` is False
    mask: Tensor  # (B, n0) bool: the patch's token was dropped (pruned, or fused into one token)


@dataclass
class TokenState:
    """What travels through the patched blocks: tokens plus the bookkeeping to map them back."""

    x: Tensor
    num_prefix: int
    grid0: tuple[int, int]
    grid: tuple[int, int] | None = None
    size: Tensor | None = None
    source: Tensor | None = None
    prop_attn: bool = False
    kernel: BlockKernel | None = None  # how every later block computes (set by a reducer); None: timm's
    aux: list[Any] = field(default_factory=list)  # what methods ask of the loss while training (AuxLoss, TokenTarget)
    scratch: dict[str, Any] = field(default_factory=dict)  # a reducer's values between its hooks in one block
    trace: list[tuple[int, int]] | None = None  # (tokens into attention, tokens into MLP) per block
    dropped: Dropped | None = None  # traced states: patches whose token was pruned or fused away
    block_source: Tensor | None = None  # traced states: grouping used inside the last block only
    rope: Tensor | None = None  # rotary tables of the model's family (None: positions do not matter)
    pos: Tensor | None = None  # with rope: each patch-side token's original patch (None: all, in order)
    unplaced: int = 0  # the last tokens that stand for no patch and are carried across a pooling

    def computed_source(self) -> Tensor | None:
        """The source map of the tokens the last block computed on (``block_source``, else ``source``)."""
        return self.block_source if self.block_source is not None else self.source

    @property
    def num_patches0(self) -> int:
        """Number of patches in the original grid."""
        return self.grid0[0] * self.grid0[1]

    def sizes(self) -> Tensor:
        """Token sizes as a (B, N) tensor, materialising the implicit all-ones."""
        if self.size is None:
            return self.x.new_ones(self.x.shape[:2])
        return self.size

    def positions(self) -> Tensor:
        """``pos`` as a (B or 1, n) tensor, materialising the implicit "original patches in order"."""
        if self.pos is not None:
            return self.pos
        n = self.x.shape[1] - self.num_prefix
        return torch.arange(n, device=self.x.device).unsqueeze(0)

    def attn_bias(self) -> Tensor | None:
        """Proportional-attention bias log(size) as an additive SDPA mask (B, 1, 1, N), or None."""
        if not self.prop_attn or self.size is None:
            return None
        return self.size.log().to(self.x.dtype)[:, None, None, :]


def init_source(batch: int, grid0: tuple[int, int], num_prefix: int, device: torch.device) -> Tensor:
    """Identity source map: patch j lives in token num_prefix + j."""
    n0 = grid0[0] * grid0[1]
    return (torch.arange(n0, device=device) + num_prefix).expand(batch, n0).contiguous()


def remap_source(source: Tensor | None, new_pos: Tensor) -> Tensor | None:
    """Follow a reduction: ``new_pos`` (B, N_old) gives each old token's new index (-1 = gone)."""
    if source is None:
        return None
    mapped = new_pos.gather(1, source.clamp(min=0))
    return torch.where(source < 0, source, mapped)


@functools.lru_cache(maxsize=256)
def _positions(p: int, n_all: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Constant token positions for a merge: prefix, A (even patch) and B (odd patch) tokens."""
    with torch.inference_mode(False), torch.no_grad():  # usable in training and inference alike
        return (torch.arange(p, device=device), torch.arange(p, max(n_all, p), 2, device=device),
                torch.arange(p + 1, max(n_all, p + 1), 2, device=device))


@functools.lru_cache(maxsize=256)
def _row_offsets(batch: int, n: int, device: torch.device) -> Tensor:
    """(B, 1) offsets that turn per-image token indices into rows of the flattened (B*N, C) tokens."""
    with torch.inference_mode(False), torch.no_grad():
        return torch.arange(0, batch * n, n, device=device).unsqueeze(1)


def _flat(idx: Tensor, n: int) -> Tensor:
    if idx.shape[0] == 1:
        return idx.reshape(-1)
    return (idx + _row_offsets(idx.shape[0], n, idx.device)).reshape(-1)


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """Select tokens ``idx`` (B, K) from ``x`` (B, N, C).

    A flat ``index_select`` rather than ``gather`` with an expanded index: about 15x faster for
    token tensors on our CPU (``benchmarks/tome_overhead.py``).
    """
    batch, n, channels = x.shape
    return x.reshape(batch * n, channels).index_select(0, _flat(idx, n)).view(batch, -1, channels)


def keep_tokens(state: TokenState, idx: Tensor, fuse_weights: Tensor | None = None) -> TokenState:
    """Keep the patch-side tokens ``idx`` (B, K, indices after the prefix); drop or fuse the rest.

    With ``fuse_weights`` (B, n) the dropped tokens are fused into one extra last token,
    sum_j w_j x_j over the dropped j (EViT: the CLS attention, not renormalised), whose size is the
    sum of the dropped sizes. Without it the dropped tokens are pruned (their patches map to -1).
    """
    p, x = state.num_prefix, state.x
    batch, n = x.shape[0], x.shape[1] - p
    k = idx.shape[1]
    prefix_pos = _positions(p, p, x.device)[0]
    keep = torch.cat([prefix_pos.expand(batch, p), idx + p], dim=1)  # prefix first, then the kept
    kept = gather_tokens(x, keep)
    sizes = state.sizes()
    kept_size = sizes.gather(1, keep)
    if fuse_weights is not None:
        dropped_w = fuse_weights.scatter(1, idx, 0.0).to(x.dtype)
        fused = torch.bmm(dropped_w.unsqueeze(1), x[:, p:])
        fused_size = sizes[:, p:].sum(1, keepdim=True) - kept_size[:, p:].sum(1, keepdim=True)
        kept, kept_size = torch.cat([kept, fused], dim=1), torch.cat([kept_size, fused_size], dim=1)
    if state.rope is not None:  # kept tokens keep their positions; the fused token has none
        pos = state.positions().expand(batch, -1).gather(1, idx)
        if fuse_weights is not None:
            pos = torch.cat([pos, pos.new_full((batch, 1), state.num_patches0)], dim=1)
        state.pos = pos
    if state.source is not None:
        state.dropped = _record_dropped(state, keep)
        gone = p + k if fuse_weights is not None else -1
        new_pos = torch.full((batch, p + n), gone, dtype=torch.long, device=x.device)
        new_pos.scatter_(1, keep, torch.arange(p + k, device=x.device).expand(batch, p + k))
        state.source = remap_source(state.source, new_pos)
    state.x, state.size, state.grid = kept, kept_size, None
    return state


def append_unplaced(state: TokenState, tokens: Tensor) -> TokenState:
    """Append patch-side tokens that stand for no single patch (SPViT's package token); they get no position."""
    if state.rope is not None:
        pos = state.positions().expand(tokens.shape[0], -1)
        state.pos = torch.cat([pos, pos.new_full((tokens.shape[0], tokens.shape[1]), state.num_patches0)], dim=1)
    state.x = torch.cat([state.x, tokens], dim=1)
    state.unplaced += tokens.shape[1]
    return state


def _record_dropped(state: TokenState, keep: Tensor) -> Dropped:
    """``state.dropped`` plus the patches whose current token is not in ``keep`` (B, K), with its value now."""
    source, x = state.source, state.x
    kept = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device).scatter_(1, keep, True)
    lost = (source >= 0) & ~kept.gather(1, source.clamp(min=0))
    values = gather_tokens(x, source.clamp(min=0))
    if state.dropped is None:
        return Dropped(torch.where(lost.unsqueeze(-1), values, torch.zeros_like(values)), lost)
    return Dropped(torch.where(lost.unsqueeze(-1), values, state.dropped.values), state.dropped.mask | lost)


class Matching(NamedTuple):
    """A bipartite merge plan over the patch tokens: A = even positions, B = odd positions."""

    unmerged: Tensor  # (B, nA - r) indices into A that stay
    src: Tensor  # (B, r) indices into A that merge away
    dst: Tensor  # (B, r) indices into B they merge into


def bipartite_matching(metric: Tensor, r: int) -> Matching:
    """ToMe's bipartite soft matching on (B, n, d) patch-token keys: the r most similar A->B edges.

    The keys may come at any scale (e.g. summed rather than averaged over heads): they are normalised.
    """
    metric = metric / metric.norm(dim=-1, keepdim=True)
    similarity = torch.bmm(metric[:, ::2], metric[:, 1::2].transpose(1, 2))  # bmm: matmul's dispatch costs more
    best, best_dst = similarity.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    src = order[:, :r]
    return Matching(order[:, r:], src, best_dst.gather(1, src))


def merge_matched(state: TokenState, m: Matching) -> TokenState:
    """Apply a matching: each source is averaged into its destination, weighted by size.

    Output order is [prefix, unmerged A, all B]. The surviving, source and destination tokens are
    taken with one row gather (and their sizes with one gather); then each destination d gets
    x_d + sum_src (s_src / S_d) (x_src - x_d) with S_d its new size, which is the size-weighted
    average (s_d x_d + sum_src s_src x_src) / S_d, written as one index-add over the r source rows.
    Few ops matter here: at batch 1 each costs more than its arithmetic. No scatter-mean, so it
    exports to ONNX.
    """
    p, x = state.num_prefix, state.x
    batch, n_all, channels = x.shape
    prefix_pos, a_pos, b_pos = _positions(p, n_all, x.device)
    n_unm, r = m.unmerged.shape[1], m.src.shape[1]
    n_out = p + n_unm + b_pos.shape[0]
    # positions in x of [survivors (the output's tokens, in order), sources, destinations]
    rows = torch.cat([prefix_pos.expand(batch, p), a_pos.take(m.unmerged), b_pos.expand(batch, b_pos.shape[0]),
                      a_pos.take(m.src), b_pos.take(m.dst)], dim=1)
    flat_x = x.reshape(batch * n_all, channels)
    if batch == 1:  # one gather; the survivors are the first rows, contiguous
        picked = flat_x.index_select(0, rows.reshape(-1))
        out, src_x, dst_x = picked[:n_out], picked[n_out:n_out + r], picked[n_out + r:]
    else:  # survivors gathered on their own so that the output stays contiguous
        out = flat_x.index_select(0, _flat(rows[:, :n_out], n_all))
        moved = flat_x.index_select(0, _flat(rows[:, n_out:], n_all)).view(batch, 2 * r, channels)
        src_x, dst_x = moved[:, :r].reshape(-1, channels), moved[:, r:].reshape(-1, channels)
    dst_out = m.dst + (p + n_unm)  # destinations' positions in the output
    if state.size is None:  # every size is 1: new sizes 1 + the sources merged in
        new_size = x.new_ones((batch, n_out)).scatter_add_(1, dst_out, x.new_ones((1, 1)).expand(batch, r))
        weight = new_size.gather(1, dst_out).reciprocal()
    else:
        sizes = state.size.gather(1, rows[:, :n_out + r])  # survivors' sizes, then the sources'
        src_size = sizes[:, n_out:]
        new_size = sizes[:, :n_out].scatter_add_(1, dst_out, src_size)
        weight = src_size / new_size.gather(1, dst_out)
    out.index_add_(0, _flat(dst_out, n_out), (src_x - dst_x) * weight.reshape(-1, 1))
    if state.rope is not None:  # every surviving token keeps its position: a destination keeps its own
        state.pos = state.positions().expand(batch, -1).gather(1, rows[:, p:n_out] - p)
    if state.source is not None:
        new_pos = torch.empty((batch, n_all), dtype=torch.long, device=x.device)
        new_pos.scatter_(1, rows[:, :n_out], torch.arange(n_out, device=x.device).expand(batch, n_out))
        new_pos.scatter_(1, rows[:, n_out:n_out + r], dst_out)
        state.source = remap_source(state.source, new_pos)
    state.x, state.size, state.grid = out.view(batch, n_out, channels), new_size, None
    return state


def unmerge(state: TokenState, x: Tensor | None = None, fill: float = 0.0) -> Tensor:
    """Map tokens back to the full patch grid: (B, n0, C); each patch gets its token's value.

    Pruned patches (source -1) get ``fill``. ``x`` defaults to ``state.x`` (pass e.g. the
    normed tokens). Needs a traced state (``trace_source=True``).
    """
    if state.source is None:
        raise ValueError("this TokenState was not traced: run the model with trace_source=True")
    x = state.x if x is None else x
    full = gather_tokens(x, state.source.clamp(min=0))
    pruned = (state.source < 0).unsqueeze(-1)
    return torch.where(pruned, torch.full_like(full, fill), full) if bool(pruned.any()) else full


def restore_patches(state: TokenState, x: Tensor | None = None, fused: bool = False,
                    post: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Every original patch's token (B, n0, C): ``unmerge``, and a pruned or fused patch the value its
    token had when it was dropped (``state.dropped``, through ``post``, e.g. the final norm).

    ``fused=True`` keeps a fused patch on the token it was fused into (only pruned ones are restored).
    Without a traced source (the ideal's truncated dense pass) the first tokens are taken, zero-padded.
    """
    x = state.x if x is None else x
    if state.source is None:
        patches = x[:, state.num_prefix:state.num_prefix + state.num_patches0]
        return torch.nn.functional.pad(patches, (0, 0, 0, state.num_patches0 - patches.shape[1]))
    # no data-dependent branches: this runs inside PiT's forward, which must trace for ONNX and compile
    full = gather_tokens(x, state.source.clamp(min=0))
    full = torch.where((state.source < 0).unsqueeze(-1), torch.zeros_like(full), full)
    dropped = state.dropped
    if dropped is not None:
        mask = dropped.mask & (state.source < 0) if fused else dropped.mask
        values = dropped.values if post is None else post(dropped.values)
        full = torch.where(mask.unsqueeze(-1), values.to(full.dtype), full)
    return full


def unmerge_grid(state: TokenState, x: Tensor | None = None, fill: float = 0.0) -> Tensor:
    """``unmerge`` reshaped to a dense feature map (B, C, H, W) on the original patch grid."""
    full = unmerge(state, x, fill)
    h, w = state.grid0
    return full.transpose(1, 2).reshape(full.shape[0], full.shape[2], h, w)
