"""Prune-and-Merge (Mao et al., IEEE TMM 2025; arXiv 2503.23455): a searched, static token plan per block.

Three steps, as in the paper and its official code (``docs/methods/prune_merge.md``):

1. **Scoring** (``calibrate``), training-free: the dense model runs on calibration batches with
   hard-label cross-entropy; in every block the attention probabilities A (B, H, N, N) and their
   gradients G = dL/dA give each patch j the score |sum_{b,h,i} A G| / (B H N) (a first-order
   estimate of the loss change if the attention paid *to* j were removed), summed over batches.
   The weights do not change.
2. **Structure search** (``global_plan``): each block's scores are L2-normalised and discounted by
   (1 - 0.025 l) (block l; keeps more tokens early), then one global ranking over all blocks marks
   the int(n * prune_rate) * L lowest scores as **pruned** (the token skips the block) and the
   int(n * keep_rate) * L highest as **centres**; the rest are **merged** into a neighbouring
   centre with weight score / score(centre) (``merge_matrix``: contiguous raster-order groups split
   at midpoints between centres and clipped at row ends).
3. **Merge / reconstruct** (``PruneMergeBlock``): per block a trainable merge matrix M (m x N)
   mixes the tokens before the block and a trainable reconstruct matrix R (N x m), initialised as
   pinv(M), expands its output back; pruned tokens bypass the block. Every block returns the full
   token grid, so dense-prediction heads work unchanged, and the plan is static (same shapes for
   every image: batch-size independent, ``torch.compile`` and export friendly).

Our decisions where the paper or code is unclear (docs/methods/prune_merge.md):
- Scoring takes no optimizer steps (the official loop also steps AdamW at lr 1e-6).
- Without calibration data the scores come from seeded Gaussian-noise images labelled with the
  model's own predictions: a data-free default that gives a plan whose cost and speed can be
  measured; use real data (``calibration=`` or ``vitslim calibrate``) for accuracy. For speed, the
  noise images cost about 150 GMACs of forward passes: 32 for DeiT-S, 8 for ViT-B/16, 2 for ViT-L/16.
- The scoring pass runs in micro-batches whose attention maps fit a memory budget (scores equal to
  one pass per batch), and the ``macs=`` search prices each level from its plan (``level_macs``).
- Any number of prefix tokens (identity rows and columns); at least one centre per block.
- The official row test has a quirk (a centre in the last column counts as the next row);
  ``row_quirk=True`` (default) keeps it, ``False`` uses the plain row.
- No proportional attention by default (the official bias is computed but never added);
  ``prop_attn=True`` adds log(group size), ToMe-style.
- M and R have no weight decay (``decay_mr=True`` restores the official decay) and train at the
  same learning rate as the backbone (the official code leaves them at 1e-6; ``lr_groups`` in the
  training config reproduces that).
- MACs include the M and R matmuls (2 m N C per block), which the official counts leave out.

**Segmentation span variant** (PM-Segmenter, ``span="a:b"``): merge once before block a (one M),
keep the m merged tokens through blocks a..b, reconstruct after block b (one R); no pruning
(prune_rate defaults to 0 and must stay 0), and the plan comes from the blocks' scores averaged
over a..b (each block's scores L2-normalised first, so no block dominates). With M = I it equals
the dense model; ``macs=`` searches keep_rate as for the per-block form.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from vitslim.budget import LEVEL_STEP
from vitslim.calibration import MEMORY_BUDGET, backward_bytes, dense_copy, gradient_sums, micro_batch_size
from vitslim.errors import VitslimError
from vitslim.families import family_of
from vitslim.measure.macs import analytic_macs, default_input_size
from vitslim.io import atomic_write
from vitslim.methods.base import (Method, MethodOptions, ParamOptions, Reducer, calibration_batches, check_locations,
                                  check_rate, register)
from vitslim.tokens import TokenState, init_source

RATE_STEP = LEVEL_STEP  # keep_rate steps of the macs= search: about one token per block at 196 patches
OFFICIAL_ITERS = 250  # the official scoring pass: prune_iter batches of 256
# the data-free pass scores about this many MACs of noise images: 32 at DeiT-S's cost (2 batches of 16),
# fewer for bigger models (8 for ViT-B/16, 2 for ViT-L/16): a plan for cost and speed, not accuracy
DATA_FREE_MACS, DATA_FREE_BATCH_SIZE, DATA_FREE_MAX_IMAGES, DATA_FREE_MIN_IMAGES = 150e9, 16, 32, 2


# ---------------------------------------------------------------------------------------------
# 1. scoring


def data_free_images(model: nn.Module) -> int:
    """Noise images of the data-free scoring pass: DATA_FREE_MACS worth of forward passes, 2 to 32."""

    count = int(DATA_FREE_MACS // analytic_macs(model))
    return min(DATA_FREE_MAX_IMAGES, max(DATA_FREE_MIN_IMAGES, count))


def _scoring_batches(model: nn.Module, calibration: Any, batches: int | None, seed: int,
                     ) -> Iterable[tuple[Tensor, Tensor | None]]:
    """Calibration batches, or without data seeded noise in the model's (normalised) input space."""
    if calibration is not None:
        yield from calibration_batches(calibration, batches or OFFICIAL_ITERS)
        return

    gen = torch.Generator().manual_seed(seed)
    size = default_input_size(model)
    sizes = [DATA_FREE_BATCH_SIZE] * batches if batches else []
    if not batches:  # the default: batches of 16 (the last one smaller) up to data_free_images
        n = data_free_images(model)
        sizes = [min(DATA_FREE_BATCH_SIZE, n - i) for i in range(0, n, DATA_FREE_BATCH_SIZE)]
    for count in sizes:
        yield torch.randn(count, *size, generator=gen), None


def calibrate(model: nn.Module, calibration: Any = None, *, batches: int | None = None, seed: int = 0,
              progress: bool = False, memory_budget: int = MEMORY_BUDGET) -> Tensor:
    """Gradient-weighted attention scores (depth, n_patches) of the dense model, summed over calibration batches.

    ``calibration``: a DataLoader of (images, labels), a tensor of images (labelled with the model's
    own predictions), an (images, labels) pair, or None (seeded noise: data-free). ``batches`` caps the
    batches (default 250, the official count; without data ``data_free_images``: 32 noise images in
    batches of 16 for DeiT-S, fewer for bigger models). The model is not changed: the pass runs on a
    copy in eval mode with explicit attention, in micro-batches whose attention maps and gradients
    fit ``memory_budget`` bytes (the scores equal one pass over each whole batch).
    """
    family_of(model)
    scorer = dense_copy(model)
    probs: list[Tensor] = []
    hooks = []
    for blk in scorer.blocks:
        blk.attn.fused_attn = False  # the probabilities must exist as a tensor
        hooks.append(blk.attn.attn_drop.register_forward_hook(lambda mod, inp, out: probs.append(out)))
    p = scorer.num_prefix_tokens
    patches = scorer.patch_embed.num_patches

    def taken() -> list[Tensor]:  # this forward's attention maps (the hooks fill the list again next time)
        out = probs[:]
        probs.clear()
        return out

    def reduce(maps: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        n = maps[0].shape[-1]
        if n != p + patches:
            raise VitslimError(f"calibration images give {n - p} patches; the model was built for "
                               f"{patches}: use images of the model's input size")
        return [(a * g).sum(dim=(0, 1, 2)) for a, g in zip(maps, grads)]  # signed: abs per whole batch

    micro = micro_batch_size(backward_bytes(scorer, explicit_attention=True), memory_budget)
    try:
        per_batch = gradient_sums(scorer, _scoring_batches(scorer, calibration, batches, seed), taken, reduce,
                                  micro_batch=micro, progress=progress, total=batches)
    finally:
        for h in hooks:
            h.remove()
    if not per_batch:
        raise VitslimError("calibration= gave no batches")
    totals = torch.zeros(len(scorer.blocks), patches, dtype=torch.float64, device=per_batch[0][0][0].device)
    for sums, batch in per_batch:
        for layer, (s, blk) in enumerate(zip(sums, scorer.blocks)):
            totals[layer] += (s[p:].abs() / (batch * blk.attn.num_heads * (p + patches))).double()
    return totals.float()


def save_scores(path: str | pathlib.Path, scores: Tensor, **info: Any) -> pathlib.Path:
    """Write calibration scores (and string metadata) to a safetensors file, atomically."""
    import json

    from safetensors.torch import save

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "vitslim.prune_merge.scores", "info": json.dumps(info, default=str)}
    atomic_write(path, save({"scores": scores.detach().float().cpu().contiguous()}, metadata=meta))
    return path


def load_scores(path: str | pathlib.Path) -> Tensor:
    """Calibration scores saved by ``save_scores`` / ``vitslim calibrate``."""
    from safetensors import safe_open

    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise VitslimError(f"scores file {path} not found: make one with `vitslim calibrate --out {path.name}`")
    try:
        with safe_open(str(path), framework="pt") as f:
            if "scores" not in f.keys():
                raise VitslimError(f"{path} has no 'scores' tensor: it was not written by vitslim calibrate")
            return f.get_tensor("scores").float()
    except VitslimError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise VitslimError(f"cannot read scores from {path}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# 2. structure search


class LayerPlan:
    """One block's roles: ``pruned`` (n,) bool, ``centres`` sorted patch indices, ``score`` (n,) for the weights."""

    def __init__(self, pruned: Tensor, centres: list[int], score: Tensor):
        self.pruned, self.centres, self.score = pruned, centres, score


def global_plan(scores: Tensor, keep_rate: float, prune_rate: float, blocks: list[int],
                depth_discount: float = 0.025) -> list[LayerPlan]:
    """The official global ranking: normalise per block, discount by depth, prune the lowest, centre the highest."""
    s = scores.abs().double()
    s = s / s.norm(dim=1, keepdim=True).clamp_min(1e-30)
    s = s * (1.0 - depth_discount * torch.tensor(blocks, dtype=s.dtype))[:, None]
    layers, n = s.shape
    order = s.flatten().argsort(stable=True)  # ascending
    n_pruned, n_centres = int(n * prune_rate) * layers, int(n * keep_rate) * layers
    pruned = torch.zeros(layers * n, dtype=torch.bool)
    pruned[order[:n_pruned]] = True
    centre = torch.zeros(layers * n, dtype=torch.bool)
    if n_centres:
        centre[order[layers * n - n_centres:]] = True
    pruned, centre = pruned.view(layers, n), centre.view(layers, n)
    plans = []
    for layer in range(layers):
        if not centre[layer].any():  # our guarantee: a block with no centre would zero its merged tokens
            best = int(s[layer].argmax())
            centre[layer, best], pruned[layer, best] = True, False
        score = torch.where(pruned[layer], torch.zeros_like(s[layer]), s[layer])
        plans.append(LayerPlan(pruned[layer].clone(), centre[layer].nonzero().flatten().tolist(), score))
    return plans


def regular_plan(n: int, centres: int, pruned: int = 0) -> LayerPlan:
    """A data-free plan: ``centres`` evenly spaced in raster order, ``pruned`` evenly spaced among the rest.

    Also the shape of a saved plan (``tokens=``/``pruned=`` options) before its state dict is loaded.
    """
    idx = torch.linspace(0, n - 1, max(1, centres)).round().long().unique().tolist()
    others = torch.tensor(sorted(set(range(n)) - set(idx)), dtype=torch.long)
    mask = torch.zeros(n, dtype=torch.bool)
    if pruned and len(others):
        mask[others[torch.linspace(0, len(others) - 1, min(pruned, len(others))).round().long().unique()]] = True
    score = torch.ones(n, dtype=torch.float64).masked_fill(mask, 0.0)
    return LayerPlan(mask, idx, score)


def merge_matrix(plan: LayerPlan, grid_width: int, num_prefix: int, row_quirk: bool = True) -> Tensor:
    """M (p + #centres, p + n): identity on the prefix; each centre's row holds its group's weights.

    Groups are contiguous in raster order: from the previous group's end to the midpoint before
    the next centre (ties go to the later centre), clipped at the end of the centre's row. With
    ``row_quirk`` the row of patch q is (q + 1) // w, as in the official code; else q // w.
    """
    n, p, w = plan.score.numel(), num_prefix, grid_width
    centres = plan.centres
    m = torch.zeros(p + len(centres), p + n, dtype=torch.float64)
    m[:p, :p] = torch.eye(p, dtype=torch.float64)

    def row(q: int) -> int:
        return (q + 1) // w if row_quirk else q // w

    left = 0
    for g, c in enumerate(centres):
        if g == len(centres) - 1:
            right = n
        else:
            right = math.ceil((c + centres[g + 1]) / 2)
            if row(right - 1) > row(c):
                right = (row(c) + 1) * w
        weights = plan.score[left:right] / plan.score[c].clamp_min(1e-30)
        m[p + g, p + left:p + right] = weights
        left = right
    return m


def pinv(merge: Tensor) -> Tensor:
    """torch.linalg.pinv(merge), in closed form when its rows have disjoint supports (as merge_matrix's do).

    Then M M^T is diagonal, the singular values are the row norms and pinv(M) = M^T diag(1 / |row|^2),
    with pinv's cutoff (rows under eps * max(m, n) * the largest norm count as zero): O(m n) instead
    of an SVD, which takes seconds per block at 1369 patches.
    """
    if ((merge != 0).sum(0) > 1).any():
        return torch.linalg.pinv(merge)
    norm2 = (merge * merge).sum(1)
    sigma = norm2.sqrt()
    cutoff = torch.finfo(merge.dtype).eps * max(merge.shape) * sigma.max()
    return merge.T * torch.where(sigma > cutoff, 1.0 / norm2, torch.zeros_like(norm2))


def merge_groups(merge: Tensor, num_prefix: int) -> Tensor:
    """(n,) for each patch the row of M (a token index) that it feeds most (its largest |M| entry; the
    plan's group before training), -1 where its column is zero: patches sharing a token share the value."""
    with torch.no_grad():
        columns = merge[:, num_prefix:].abs()
        best, row = columns.max(0)
        return torch.where(best > 0, row, torch.full_like(row, -1))


# ---------------------------------------------------------------------------------------------
# 3. the block


class TrainedMatrices(Reducer):
    """A reducer holding trainable merge/reconstruct matrices: no weight decay on them unless ``decay_mr``."""

    def __init__(self, decay_mr: bool):
        super().__init__()
        self.decay_mr = decay_mr

    def param_options(self) -> dict[str, ParamOptions]:
        """M and R: no weight decay unless ``decay_mr`` (the official code decays them)."""
        return {} if self.decay_mr else {"": ParamOptions(weight_decay="none")}


def apply_matrix(matrix: Tensor, x: Tensor) -> Tensor:
    """``matrix @ x`` over the tokens (B, N, C), in the stream's dtype (under autocast the matmul gives bf16;
    the token stream keeps its dtype, as in timm's blocks).

    A bmm over the matrix broadcast to every image (stride 0, no copy): ``torch.matmul(matrix, x)`` folds
    the batch by transposing x, which copies it in and gives a transposed result that the block's next
    op copies again; one wide GEMM over N x (B*C) would need the same two copies (measured slower).
    """
    return torch.bmm(matrix.to(x.dtype).expand(x.shape[0], -1, -1), x).to(x.dtype)


def merge_tokens(state: TokenState, merge: Tensor, group_size: Tensor) -> None:
    """state.x <- M x (checked against the plan's token count), with the groups' sizes; the grid is gone."""
    x = state.x
    if x.shape[1] != merge.shape[1]:
        raise VitslimError(f"this prune_merge plan is for {merge.shape[1]} tokens, the input has "
                           f"{x.shape[1]}: run the model at the image size it was patched for")
    state.x = apply_matrix(merge, x)
    state.size = group_size.expand(x.shape[0], -1) if state.prop_attn else None
    state.grid = None


class PruneMergeBlock(TrainedMatrices):
    """Wraps one block: z = M x; the block runs on z; out = R z + (pruned tokens of x). Full grid in and out."""

    def __init__(self, merge: Tensor, centres: list[int], pruned: Tensor, score: Tensor, decay_mr: bool):
        super().__init__(decay_mr)
        self.merge = nn.Parameter(merge.float())
        self.reconstruct = nn.Parameter(pinv(merge).float())
        offset = merge.shape[1] - pruned.numel()  # the prefix tokens
        # positions of the pruned tokens, which skip the block: a static index (same for every image),
        # so adding them back is one small index_add instead of a full-size masked copy and add
        self.register_buffer("pruned_index", pruned.nonzero().flatten() + offset)
        self.register_buffer("score", score.float())  # the block's search score per patch (for inspection)
        self.register_buffer("centres", torch.tensor(centres, dtype=torch.long))  # patch indices (for inspection)
        self.register_buffer("group_size", (merge != 0).sum(1).clamp_min(1).float())

    def plan(self) -> dict[str, Any]:
        """This block's centre and pruned patch indices."""
        offset = self.merge.shape[1] - self.score.numel()
        return {"centres": self.centres.tolist(), "pruned": (self.pruned_index - offset).tolist()}

    @property
    def bypass(self) -> Tensor:
        """(N,) 1 where the token skips the block (pruned), else 0."""
        mask = torch.zeros(self.merge.shape[1], device=self.merge.device)
        return mask.index_fill_(0, self.pruned_index, 1.0)

    def before_block(self, state: TokenState) -> TokenState:
        """Keep the pruned tokens aside and merge the rest into the block's m tokens."""
        x, grid = state.x, state.grid
        merge_tokens(state, self.merge, self.group_size)
        if self.pruned_index.numel():
            state.scratch["pm_bypass"] = x.index_select(1, self.pruned_index)
        state.scratch["pm_grid"] = grid
        return state

    def after_block(self, state: TokenState) -> TokenState:
        """Reconstruct the full token grid and add back the pruned tokens."""
        state.x = apply_matrix(self.reconstruct, state.x)
        if self.pruned_index.numel():
            bypass = state.scratch.pop("pm_bypass")
            state.x = state.x.to(bypass.dtype)  # the block's input dtype, should the block have changed it
            state.x.index_add_(1, self.pruned_index, bypass)
        state.size = None
        state.grid = state.scratch.pop("pm_grid")
        if state.source is not None:
            state.block_source = self.groups().expand(state.x.shape[0], -1)
        return state

    def groups(self) -> Tensor:
        """(n,) the merged token each patch feeds (``merge_groups``), -1 for pruned patches."""
        offset = self.merge.shape[1] - self.score.numel()
        return merge_groups(self.merge, offset).index_fill(0, self.pruned_index - offset, -1)


class SpanMerge(TrainedMatrices):
    """The span variant's first block: z = M x before it; the next blocks run on the m merged tokens."""

    def __init__(self, merge: Tensor, decay_mr: bool):
        super().__init__(decay_mr)
        self.merge = nn.Parameter(merge.float())
        self.register_buffer("group_size", (merge != 0).sum(1).clamp_min(1).float())

    def before_block(self, state: TokenState) -> TokenState:
        """Merge the full token grid into the span's m tokens."""
        merge_tokens(state, self.merge, self.group_size)
        if state.source is not None:
            state.source = merge_groups(self.merge, state.num_prefix).expand(state.x.shape[0], -1)
        return state


class SpanReconstruct(TrainedMatrices):
    """The span variant's last block: out = R z after it, the full token grid again."""

    def __init__(self, reconstruct: Tensor, decay_mr: bool):
        super().__init__(decay_mr)
        self.reconstruct = nn.Parameter(reconstruct.float())

    def after_block(self, state: TokenState) -> TokenState:
        """Expand the m tokens back to every patch."""
        state.x = apply_matrix(self.reconstruct, state.x)
        state.size, state.grid = None, state.grid0
        if state.source is not None:
            state.source = init_source(state.x.shape[0], state.grid0, state.num_prefix, state.x.device)
        return state


# ---------------------------------------------------------------------------------------------
# the method


@dataclasses.dataclass
class PruneMergeOptions(MethodOptions):
    """Prune-and-Merge: the plan's rates (or its per-block counts), its scores and the paper's constants."""

    keep_rate: float = dataclasses.field(default=0.6, metadata={
        "help": "fraction of each block's patches (on average over blocks) kept as merge centres",
        "source": "Prune-and-Merge (Mao et al., TMM 2025), released DeiT-S setting"})
    prune_rate: float | None = dataclasses.field(default=None, metadata={
        "help": "fraction of patches (on average over blocks) that skip a block (default 0.1; 0 with span)",
        "source": "Prune-and-Merge, released DeiT-S setting; PM-Segmenter for span"})
    scores: Any = dataclasses.field(default=None, repr=False, metadata={
        "internal": True, "help": "calibration scores (blocks x patches), or a file from `vitslim calibrate`"})
    tokens: Any = dataclasses.field(default=None, metadata={
        "help": "centres per block of a saved plan (rebuilds its shapes; set by the plan, not by users)"})
    blocks: Any = dataclasses.field(default=None, metadata={"help": "0-based blocks to act on (default all)"})
    depth_discount: float = dataclasses.field(default=0.025, metadata={
        "help": "scores of block l are scaled by (1 - depth_discount * l)", "source": "official code"})
    row_quirk: bool = dataclasses.field(default=True, metadata={
        "help": "the official row test (a centre in the last column counts as the next row); False: plain rows",
        "source": "official code"})
    decay_mr: bool = dataclasses.field(default=False, metadata={
        "help": "weight decay on the merge/reconstruct matrices", "source": "ours (the official code decays them)"})
    pruned: Any = dataclasses.field(default=None, metadata={
        "help": "pruned patches per block of a saved plan (with tokens)"})
    span: Any = dataclasses.field(default=None, metadata={
        "help": "'a:b': merge once before block a and reconstruct after block b (segmentation variant)",
        "source": "PM-Segmenter (wafev/PM-Segmenter): merge_list [2], recover_list [10]"})
    plans: Any = dataclasses.field(default=None, repr=False, compare=False, metadata={"internal": True})

    def resolved(self, model: nn.Module) -> "PruneMergeOptions":
        """Validated rates and the per-block plans (from the scores, or the regular shape of a saved plan)."""
        depth, n = len(model.blocks), model.patch_embed.num_patches
        span = parse_span(self.span, depth)
        if span is not None and self.blocks is not None and list(self.blocks) != [span[0]]:
            raise VitslimError("give prune_merge either span= or blocks=, not both")
        blocks = list(range(depth)) if self.blocks is None else check_locations(self.blocks, depth)
        if span is not None:
            blocks = [span[0]]  # the span's one plan sits at its first block
        keep_rate = check_rate("keep_rate", self.keep_rate)
        prune_rate = default_prune_rate(self.prune_rate, span)
        if span is not None and prune_rate != 0.0:
            raise VitslimError(f"the span variant merges without pruning: prune_rate must be 0, got {prune_rate}")
        if not 0.0 <= prune_rate < 1.0 or keep_rate + prune_rate > 1.0 + 1e-9:
            raise VitslimError(f"prune_rate={prune_rate} with keep_rate={keep_rate}: need 0 <= prune_rate < 1 and "
                               "keep_rate + prune_rate <= 1 (centres and pruned tokens are disjoint)")
        depth_discount = float(self.depth_discount)
        if not 0.0 <= depth_discount * (max(blocks)) < 1.0:
            raise VitslimError(f"depth_discount={depth_discount} makes the discount (1 - d * block) non-positive "
                               f"by block {max(blocks)}: use a value below {1 / max(1, max(blocks)):.4f}")
        scores, tokens, pruned = self.scores, self.tokens, self.pruned
        if isinstance(scores, (str, pathlib.Path)):
            scores = load_scores(scores)
        if scores is None and tokens is None:  # patched without prepare(): score data-free
            scores = calibrate(model)
        if scores is not None:
            scores = torch.as_tensor(scores).float().cpu()
            if span is not None and tuple(scores.shape) == (depth, n):  # the span's blocks, normalised, averaged
                chosen = scores[span[0]:span[1] + 1].abs()
                scores = (chosen / chosen.norm(dim=1, keepdim=True).clamp_min(1e-30)).mean(0, keepdim=True)
            elif scores.shape == (depth, n) and len(blocks) < depth:
                scores = scores[blocks]
            if tuple(scores.shape) != (len(blocks), n):
                raise VitslimError(f"scores have shape {tuple(scores.shape)}; this model needs ({len(blocks)}, {n}) "
                                   "(blocks x patches): calibrate this model at its input size")
            plans = global_plan(scores, keep_rate, prune_rate, blocks, 0.0 if span else depth_discount)
        else:
            tokens = list(tokens) if isinstance(tokens, (list, tuple)) else [tokens] * len(blocks)
            if len(tokens) != len(blocks) or not all(1 <= int(t) <= n for t in tokens):
                raise VitslimError(f"tokens must give 1..{n} centres for each of the {len(blocks)} blocks, got {tokens}")
            pruned = [0] * len(tokens) if pruned is None else list(pruned)
            if len(pruned) != len(tokens):
                raise VitslimError(f"pruned gives {len(pruned)} counts for {len(tokens)} blocks")
            plans = [regular_plan(n, int(t), int(q)) for t, q in zip(tokens, pruned)]
        return PruneMergeOptions(keep_rate=keep_rate, prune_rate=prune_rate, blocks=blocks,
                                 depth_discount=depth_discount, row_quirk=bool(self.row_quirk),
                                 decay_mr=bool(self.decay_mr), tokens=[len(plan.centres) for plan in plans],
                                 pruned=[int(plan.pruned.sum()) for plan in plans],
                                 span=f"{span[0]}:{span[1]}" if span is not None else None, plans=plans)


def parse_span(span: Any, depth: int) -> tuple[int, int] | None:
    """``span`` ("a:b", (a, b) or None) as 0-based blocks with 0 <= a <= b < depth."""
    if span is None:
        return None
    try:
        first, last = (int(v) for v in (span.split(":") if isinstance(span, str) else span))
    except (TypeError, ValueError):
        raise VitslimError(f"span must look like 'a:b' (first and last block, 0-based), got {span!r}") from None
    if not 0 <= first <= last < depth:
        raise VitslimError(f"span {first}:{last} must satisfy 0 <= a <= b < {depth} (the model's blocks)")
    return first, last


def default_prune_rate(prune_rate: Any, span: Any) -> float:
    """The given prune_rate, else 0.1 (the released setting), or 0 for the span variant."""
    if prune_rate is None:
        return 0.0 if span is not None else 0.1
    return float(prune_rate)


@register
class PruneMerge(Method):
    """Prune-and-Merge: a global plan from gradient-weighted attention; trainable merge/reconstruct per block."""

    name = "prune_merge"
    Options = PruneMergeOptions

    @classmethod
    def prepare(cls, model: nn.Module, options: dict[str, Any]) -> dict[str, Any]:
        """Score once (from ``calibration=``, or data-free) unless scores or a rebuilt plan are given."""
        calibration = options.pop("calibration", None)
        batches = options.pop("calibration_batches", None)
        seed = options.pop("seed", 0)
        if isinstance(options.get("scores"), (str, pathlib.Path)):
            options["scores"] = load_scores(options["scores"])
        if options.get("scores") is not None:
            if calibration is not None:
                raise VitslimError("give prune_merge either calibration= (to score) or scores=, not both")
            return options
        if options.get("tokens") is None:
            options["scores"] = calibrate(model, calibration, batches=batches, seed=int(seed))
        return options

    def reducers(self) -> dict[int, Reducer]:
        grid_width = self.model.patch_embed.grid_size[1]
        p = self.model.num_prefix_tokens
        span = parse_span(self.config.span, len(self.model.blocks))
        if span is not None and span[0] < span[1]:
            plan = self.config.plans[0]
            merge = merge_matrix(plan, grid_width, p, self.config.row_quirk)
            return {span[0]: SpanMerge(merge, self.config.decay_mr),
                    span[1]: SpanReconstruct(pinv(merge), self.config.decay_mr)}
        return {block: PruneMergeBlock(merge_matrix(plan, grid_width, p, self.config.row_quirk), plan.centres,
                                       plan.pruned, plan.score, self.config.decay_mr)
                for block, plan in zip(self.config.blocks, self.config.plans)}

    # macs=: keep_rate falls from 1 - prune_rate in steps of RATE_STEP (prune_rate stays as given)
    @classmethod
    def max_level(cls, model: nn.Module, **options: Any) -> int:
        """Levels down to keep_rate = RATE_STEP."""
        prune_rate = default_prune_rate(options.get("prune_rate"), options.get("span"))
        return max(0, round((1.0 - prune_rate) / RATE_STEP) - 1)

    @classmethod
    def level_macs(cls, model: nn.Module, options: dict[str, Any], dense_macs: int) -> int | None:
        """The plan's MACs without building it: each planned block's dense cost -> its cost on m tokens + M, R, bypass.

        The block formula (``analytic_macs``) is what ``count_macs`` counts for a block, and M x and
        R z cost m N C each, the pruned tokens' add P C (a test checks the sum equals ``count_macs``);
        the rest (embedding, head) is the dense count's. The macs= search needs no forward per level.
        """
        method = cls(model, **options)
        p, n = model.num_prefix_tokens, model.patch_embed.num_patches
        tokens = [(p + n, p + n)] * len(model.blocks)
        extra = 0
        span = parse_span(method.config.span, len(model.blocks))
        if span is not None:  # m tokens through blocks a..b, one M and one R
            m, dim = p + len(method.config.plans[0].centres), model.blocks[span[0]].attn.qkv.in_features
            tokens[span[0]:span[1] + 1] = [(m, m)] * (span[1] - span[0] + 1)
            return dense_macs - analytic_macs(model) + analytic_macs(model, tokens) + 2 * m * (p + n) * dim
        for block, plan in zip(method.config.blocks, method.config.plans):
            m, dim = p + len(plan.centres), model.blocks[block].attn.qkv.in_features
            tokens[block] = (m, m)
            extra += 2 * m * (p + n) * dim + int(plan.pruned.sum()) * dim
        return dense_macs - analytic_macs(model) + analytic_macs(model, tokens) + extra

    @classmethod
    def options_for_level(cls, model: nn.Module, level: int, **options: Any) -> dict[str, Any]:
        """keep_rate = 1 - prune_rate - level * RATE_STEP."""
        if "keep_rate" in options:
            raise VitslimError("give prune_merge either keep_rate or macs=, not both")
        if options.get("scores") is None:
            raise VitslimError("prune_merge needs scores for macs=: pass calibration= or scores=")
        prune_rate = default_prune_rate(options.get("prune_rate"), options.get("span"))
        return {**options, "keep_rate": round(1.0 - prune_rate - level * RATE_STEP, 6)}
