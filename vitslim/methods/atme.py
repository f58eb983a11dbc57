"""ATME, CAIT-style (vitslim reconstruction): asymmetric token merging of spatial neighbours.

CAIT (Wang et al., TPAMI 2026, arXiv 2309.15755) is known only from its abstract: ATME fuses
*neighbouring* tokens and *keeps the spatial structure* of the image (the paper's). Everything
else here is ours (``docs/methods/atme.md``, "ATME-A"), chosen to satisfy that:
- at scheduled blocks, after the attention residual, along one axis (W: columns, H: rows) the
  lines at even positions are anchors and the lines at odd positions are sources;
- each source token joins the more similar of its (at most two) adjacent anchors on that axis,
  by cosine similarity of the block's head-averaged keys; this is the asymmetry: anchors keep their
  place, sources choose a side from content, and W and H are reduced at different depths;
- size-weighted merge (scatter-sum, then divide: exports to ONNX), sizes tracked, proportional
  attention in later blocks; the anchors form a regular h x ceil(w/2) (or ceil(h/2) x w) grid in
  raster order, recorded in ``state.grid``, and ``state.source`` maps every patch to its token, so
  ``vitslim.unmerge_grid`` restores the full grid (dense prediction);
- prefix tokens (CLS, distillation, registers) never merge; every image keeps the same count.

Option ``schedule``: "3:W,7:H" (0-based block: axis; the default for 12 blocks), a list of
(block, axis) pairs, or "" for none. ``macs=`` picks among the schedules of at most three merges
(each along the grid's longer axis, W on ties), ordered by MACs: a discrete set of budget points;
option ``merges`` (1-3) keeps only the schedules of exactly that many merges (3: gentler steps, later).
On a model with stages (PiT) each stage starts on its whole grid again, so the merges run within a
stage (at most three in each) and the grid is restored before each pooling (``vitslim.families``).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any

import torch
from torch import Tensor, nn

from vitslim.errors import VitslimError
from vitslim.families import family_of
from vitslim.measure.macs import analytic_macs
from vitslim.methods.base import AttnInfo, Method, MethodOptions, Reducer, register
from vitslim.tokens import TokenState, remap_source

AXES = ("W", "H")
MAX_AUTO_MERGES = 3  # budget points: schedules of up to three merges (DeiT 14x14 -> 7x4 grid at most)


def parse_schedule(schedule: Any, depth: int) -> list[tuple[int, str]]:
    """(block, axis) pairs, sorted by block, from "3:W,7:H", a list of pairs or "3:W" strings."""
    if schedule is None or schedule == "" or schedule == []:
        return []
    items = schedule.split(",") if isinstance(schedule, str) else list(schedule)
    pairs = []
    for item in items:
        try:
            block, axis = item.split(":") if isinstance(item, str) else item
            pairs.append((int(block), str(axis).strip().upper()))
        except (TypeError, ValueError):
            raise VitslimError(f"bad ATME schedule entry {item!r}: use 'BLOCK:AXIS' with AXIS W or H, "
                               f"e.g. schedule='3:W,7:H'") from None
    for block, axis in pairs:
        if axis not in AXES:
            raise VitslimError(f"ATME axis {axis!r} in {schedule!r} is not W or H (e.g. schedule='3:W,7:H')")
        if not 0 <= block < depth:
            raise VitslimError(f"ATME block {block} in {schedule!r} is out of range: blocks are 0..{depth - 1}")
    blocks = [b for b, _ in pairs]
    if len(set(blocks)) != len(blocks):
        raise VitslimError(f"ATME schedule {schedule!r} merges twice in one block: one axis per block")
    return sorted(pairs)


def format_schedule(pairs: list[tuple[int, str]]) -> str:
    """The canonical string form, e.g. "3:W,7:H" ("" = no merging)."""
    return ",".join(f"{b}:{a}" for b, a in pairs)


def default_schedule(depth: int) -> str:
    """DeiT's 3:W, 7:H scaled to the depth."""
    return format_schedule(sorted({max(0, depth // 4): "W", min(depth - 1, (7 * depth) // 12): "H"}.items()))


def merged_grid(grid: tuple[int, int], axis: str) -> tuple[int, int]:
    """The anchor grid after one merge along ``axis``."""
    h, w = grid
    return (h, (w + 1) // 2) if axis == "W" else ((h + 1) // 2, w)


def grids_before(model: nn.Module, pairs: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """The anchor grid each block starts with under a schedule (a model with stages restarts whole in each)."""
    family = family_of(model)
    merges, stages, starts = dict(pairs), family.block_stages(model), family.block_grids(model)
    grids, grid = [], None
    for i, (stage, start) in enumerate(zip(stages, starts)):
        if i == 0 or stage != stages[i - 1]:
            grid = start
        grids.append(grid)
        if i in merges:
            grid = merged_grid(grid, merges[i])
    return grids


def token_counts(model: nn.Module, pairs: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """(tokens into attention, tokens into MLP) per block for a schedule, at the model's input size."""
    p, merges = family_of(model).num_prefix(model), dict(pairs)
    counts = []
    for i, grid in enumerate(grids_before(model, pairs)):
        after = merged_grid(grid, merges[i]) if i in merges else grid
        counts.append((p + grid[0] * grid[1], p + after[0] * after[1]))
    return counts


def check_schedule(model: nn.Module, pairs: list[tuple[int, str]]) -> None:
    """Raise if a merge would find fewer than two lines along its axis."""
    grids = grids_before(model, pairs)
    for block, axis in pairs:
        grid = grids[block]
        if (grid[1] if axis == "W" else grid[0]) < 2:
            raise VitslimError(f"ATME merge {block}:{axis} finds a {grid[0]}x{grid[1]} grid: nothing left to merge "
                               f"along {axis}; drop it from the schedule")


def block_macs(model: nn.Module, counts: list[tuple[int, int]]) -> float:
    """Analytic MACs of the blocks (qkv, attention, proj, MLP) for those token counts, per image."""
    return float(analytic_macs(model, counts, blocks_only=True))


def schedule_family(model: nn.Module, merges: int | None = None) -> list[str]:
    """Budget points: schedules of up to MAX_AUTO_MERGES merges (exactly ``merges`` when given) ordered by
    MACs (level 0 = none)."""
    family = family_of(model)
    depth = len(family.blocks(model))
    # the blocks' cost formula is fixed by its values at these token counts (linear and quadratic terms)
    key = (tuple(family.block_stages(model)), tuple(family.block_grids(model)), family.num_prefix(model),
           *(analytic_macs(model, [counts] * depth, blocks_only=True) for counts in ((1, 0), (2, 0), (0, 1))))
    key = (*key, merges)
    if key not in _FAMILIES:
        _FAMILIES[key] = _family(model, merges)
    return list(_FAMILIES[key])


_FAMILIES: dict[tuple, tuple[str, ...]] = {}


def _family(model: nn.Module, merges: int | None) -> tuple[str, ...]:
    family = family_of(model)
    stages, starts = family.block_stages(model), family.block_grids(model)
    stage_blocks = [[b for b, s in enumerate(stages) if s == stage] for stage in dict.fromkeys(stages)]
    # up to MAX_AUTO_MERGES merges in each stage (a model with stages restores its grid in each)
    choices = [[c for k in range(MAX_AUTO_MERGES + 1) for c in itertools.combinations(blocks, k)]
               for blocks in stage_blocks]
    points = []
    for picked in itertools.product(*choices):
        pairs = []
        for stage_merges in picked:
            grid = starts[stage_merges[0]] if stage_merges else None
            for b in stage_merges:
                if max(grid) < 2:
                    break
                axis = "W" if grid[1] >= grid[0] else "H"  # the longer axis, so grids stay near square
                pairs.append((b, axis))
                grid = merged_grid(grid, axis)
            else:
                continue
            break
        else:
            k = len(pairs)
            if merges is not None and k not in (0, merges):
                continue
            points.append((block_macs(model, token_counts(model, pairs)), k, format_schedule(pairs)))
    points.sort(key=lambda t: (-t[0], t[1]))  # most MACs first: level 0 = no merging
    family, last = [], None
    for macs, _, schedule in points:
        if last is None or macs < last * 0.999:  # near-equal MACs: keep the first (fewer merges) only
            family.append(schedule)
            last = macs
    return tuple(family)


def _merge_plan_tensors(grid: tuple[int, int], axis: str, device: torch.device) -> tuple[Tensor, ...]:
    """Constant index tensors of one merge: sources, their two anchors (new indices), anchor map, anchors.

    Static slicing and arithmetic only (no boolean-mask indexing), so it also traces into a
    compiled or exported graph with fixed shapes.
    """
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    nh, nw = merged_grid(grid, axis)
    # each anchor's index in the new raster-order grid
    new_index = (rows * nw + cols // 2) if axis == "W" else ((rows // 2) * nw + cols)
    lines = w if axis == "W" else h
    step = 1 if axis == "W" else w  # flat offset to the next line along the axis
    flat = torch.arange(h * w, device=device).view(h, w)
    odd = (slice(None), slice(1, None, 2)) if axis == "W" else (slice(1, None, 2), slice(None))
    src = flat[odd].reshape(-1)  # sources: odd lines along the axis, raster order
    has_next = ((cols if axis == "W" else rows)[odd].reshape(-1) + 1) < lines
    prev_flat, next_flat = src - step, torch.where(has_next, src + step, src - step)
    dest = new_index.reshape(-1)  # anchors map to themselves; sources filled per image
    even = (slice(None), slice(0, None, 2)) if axis == "W" else (slice(0, None, 2), slice(None))
    anchors = flat[even].reshape(-1)  # the old index of each merged token's anchor, new raster order
    return src, prev_flat, next_flat, has_next, dest, anchors


@functools.lru_cache(maxsize=64)
def _cached_merge_plan(grid: tuple[int, int], axis: str, device: torch.device) -> tuple[Tensor, ...]:
    # built outside inference mode so the cached indices also serve training forwards
    with torch.inference_mode(False), torch.no_grad():
        return _merge_plan_tensors(grid, axis, device)


def _merge_plan(grid: tuple[int, int], axis: str, device: torch.device) -> tuple[Tensor, ...]:
    """The merge's index tensors: cached in eager mode, traced as constants under torch.compile / export."""
    if torch.compiler.is_compiling():
        return _merge_plan_tensors(grid, axis, device)
    return _cached_merge_plan(grid, axis, device)


def merge_neighbours(state: TokenState, keys: Tensor, axis: str) -> TokenState:
    """One ATME-A step along ``axis``: sources join the more similar adjacent anchor (size-weighted)."""
    if state.grid is None:
        raise VitslimError("ATME needs the patch tokens on a grid (no patch dropout, no method that scrambles "
                           "the tokens before it)")
    p, x = state.num_prefix, state.x
    h, w = state.grid
    if (w if axis == "W" else h) < 2:
        return state  # a single line: nothing to merge (smaller inputs with dynamic_img_size)
    batch, _, channels = x.shape
    n = h * w
    src, prev_flat, next_flat, has_next, dest, anchors = _merge_plan((h, w), axis, x.device)
    metric = keys[:, p:]
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    m_src = metric[:, src]
    sim_prev = (m_src * metric[:, prev_flat]).sum(-1)
    sim_next = (m_src * metric[:, next_flat]).sum(-1).masked_fill(~has_next, float("-inf"))
    goes_next = sim_next > sim_prev  # ties go to the previous anchor (left / above)
    src_dest = torch.where(goes_next, dest[next_flat], dest[prev_flat])  # (B, S)
    dest_all = dest.expand(batch, n).scatter(1, src.expand(batch, -1), src_dest)  # (B, n) new index
    nh, nw = merged_grid((h, w), axis)
    n_new = nh * nw
    sizes = state.sizes()
    size_p = sizes[:, p:].to(x.dtype)
    offsets = torch.arange(batch, device=x.device).unsqueeze(1) * n_new
    flat_dest = (dest_all + offsets).reshape(-1)
    # scatter-sum of size-weighted tokens, then divide: ONNX-friendly (no scatter-mean)
    summed = x.new_zeros(batch * n_new, channels).index_add(
        0, flat_dest, (x[:, p:] * size_p.unsqueeze(-1)).reshape(batch * n, channels))
    new_size = size_p.new_zeros(batch, n_new).scatter_add(1, dest_all, size_p)
    merged = summed.view(batch, n_new, channels) / new_size.unsqueeze(-1)
    if state.source is not None:
        prefix = torch.arange(p, device=x.device).expand(batch, p)
        state.source = remap_source(state.source, torch.cat([prefix, dest_all + p], dim=1))
    if state.rope is not None:  # a merged token takes its anchor's position
        state.pos = state.positions()[:, anchors]
    state.x = torch.cat([x[:, :p], merged], dim=1)
    state.size = torch.cat([sizes[:, :p].to(x.dtype), new_size], dim=1)
    state.grid = (nh, nw)
    return state


class ATMEMerge(Reducer):
    """One ATME-A merge along an axis, after the attention residual of its block."""

    def __init__(self, axis: str):
        super().__init__()
        self.axis = axis

    def after_attn(self, state: TokenState, attn: AttnInfo) -> TokenState:
        """Merge along the axis with this block's head-averaged keys as the similarity."""
        return merge_neighbours(state, attn.keys, self.axis)

    def extra_repr(self) -> str:
        return f"axis={self.axis}"


@dataclasses.dataclass
class ATMEOptions(MethodOptions):
    """ATME: which blocks merge neighbours, along which axis."""

    schedule: Any = dataclasses.field(default=None, metadata={
        "help": "'BLOCK:AXIS,...' with AXIS W or H (0-based blocks); default 3:W,7:H scaled to the depth",
        "source": "ours (CAIT's abstract gives no schedule; docs/methods/atme.md)"})
    merges: int | None = dataclasses.field(default=None, metadata={
        "help": f"with macs=: only schedules of exactly this many merges (1-{MAX_AUTO_MERGES}); default any",
        "source": "ours (the shape of the schedule at a budget: fewer, earlier or more, later merges)"})

    def resolved(self, model: nn.Module) -> "ATMEOptions":
        """The schedule in canonical form, checked against the model's grid."""
        merges = _merges({"merges": self.merges})
        depth = len(family_of(model).blocks(model))
        pairs = parse_schedule(default_schedule(depth) if self.schedule is None else self.schedule, depth)
        check_schedule(model, pairs)
        return ATMEOptions(schedule=format_schedule(pairs), merges=merges)


@register
class ATME(Method):
    """CAIT-style ATME (vitslim reconstruction): neighbour merging on a grid; knob ``schedule``."""

    name = "atme"
    Options = ATMEOptions
    prop_attn_default = True  # off the shelf; pass prop_attn=False to train without it (ToMe's advice)

    @classmethod
    def runs_on(cls, family: str) -> bool:
        """Also on rotary ViTs (Eva: a merged token takes its anchor's position) and on PiT (within each stage;
        merged tokens go back on their patches before each pooling)."""
        return family in ("vit", "eva", "pit")

    def reducers(self) -> dict[int, Reducer]:
        return {b: ATMEMerge(a) for b, a in parse_schedule(self.config.schedule, len(family_of(self.model).blocks(self.model)))}

    @classmethod
    def max_level(cls, model: nn.Module, **options: Any) -> int:
        return len(schedule_family(model, _merges(options))) - 1

    @classmethod
    def options_for_level(cls, model: nn.Module, level: int, **options: Any) -> dict[str, Any]:
        if "schedule" in options:
            raise VitslimError("give atme either schedule or macs=, not both")
        return {"schedule": schedule_family(model, _merges(options))[level], **options}


def _merges(options: dict[str, Any]) -> int | None:
    """The ``merges`` option checked before it shapes the budget points."""
    merges = options.get("merges")
    if merges is not None:
        try:
            merges = int(merges)
        except (TypeError, ValueError):
            raise VitslimError(f"ATME merges={merges!r} is not a whole number: use 1 to {MAX_AUTO_MERGES}") from None
        if merges not in range(1, MAX_AUTO_MERGES + 1):
            raise VitslimError(f"ATME merges={merges} is out of range: use 1 to {MAX_AUTO_MERGES} "
                               "(or leave it out for any)")
    return merges
