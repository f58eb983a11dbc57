"""Prune-and-Merge (Mao et al., IEEE TMM 2025; arXiv 2503.23455): a searched, static token plan per block.

Three steps, as in the paper and its official code (methods.md section 1):

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

Our decisions where the paper or code is unclear (README, "Prune-and-Merge"):
- Scoring takes no optimizer steps (the official loop also steps AdamW at lr 1e-6).
- Without calibration data the scores come from seeded Gaussian-noise images labelled with the
  model's own predictions: a data-free default that gives a plan whose cost and speed can be
  measured; use real data (``calibration=`` or ``vitslim calibrate``) for accuracy.
- Any number of prefix tokens (identity rows and columns); at least one centre per block.
- The official row test has a quirk (a centre in the last column counts as the next row);
  ``row_quirk=True`` (default) keeps it, ``False`` uses the plain row.
- No proportional attention by default (the official bias is computed but never added);
  ``prop_attn=True`` adds log(group size), ToMe-style.
- M and R have no weight decay (``decay_mr=True`` restores the official decay) and train at the
  same learning rate as the backbone (the official code leaves them at 1e-6; ``lr_groups`` in the
  training config reproduces that).
- MACs include the M and R matmuls (2 m N C per block), which the official counts leave out.
"""
from __future__ import annotations

import copy
import math
import pathlib
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitslim.errors import VitslimError
from vitslim.methods import (Method, Reducer, calibration_batches, check_locations, check_rate, register,
                             reject_unknown)
from vitslim.tokens import TokenState

RATE_STEP = 0.005  # keep_rate steps of the macs= search: about one token per block at 196 patches
OFFICIAL_ITERS = 250  # the official scoring pass: prune_iter batches of 256
DATA_FREE_BATCHES, DATA_FREE_BATCH_SIZE = 2, 16


# ---------------------------------------------------------------------------------------------
# 1. scoring


def _scoring_batches(model: nn.Module, calibration: Any, batches: int | None, seed: int,
                     ) -> Iterable[tuple[Tensor, Tensor | None]]:
    """Calibration batches, or without data seeded noise in the model's (normalised) input space."""
    if calibration is not None:
        yield from calibration_batches(calibration, batches or OFFICIAL_ITERS)
        return
    from vitslim.measure.macs import default_input_size

    gen = torch.Generator().manual_seed(seed)
    size = default_input_size(model)
    for _ in range(batches or DATA_FREE_BATCHES):
        yield torch.randn(DATA_FREE_BATCH_SIZE, *size, generator=gen), None


def calibrate(model: nn.Module, calibration: Any = None, *, batches: int | None = None, seed: int = 0,
              progress: bool = False) -> Tensor:
    """Gradient-weighted attention scores (depth, n_patches) of the dense model, summed over calibration batches.

    ``calibration``: a DataLoader of (images, labels), a tensor of images (labelled with the model's
    own predictions), an (images, labels) pair, or None (seeded noise: data-free). ``batches`` caps the
    batches (default 250, the official count; 2 of 16 noise images without data). The model is
    not changed: the pass runs on a copy in eval mode with explicit attention.
    """
    from vitslim.patch import check_supported, unpatch

    check_supported(model)
    scorer = unpatch(copy.deepcopy(model)).eval()  # unpatch leaves a dense model as it is
    device = next(scorer.parameters()).device
    probs: list[Tensor] = []
    hooks = []
    for blk in scorer.blocks:
        blk.attn.fused_attn = False  # the probabilities must exist as a tensor
        hooks.append(blk.attn.attn_drop.register_forward_hook(lambda mod, inp, out: probs.append(out)))
    p = scorer.num_prefix_tokens
    totals = torch.zeros(len(scorer.blocks), scorer.patch_embed.num_patches, dtype=torch.float64, device=device)
    stream = _scoring_batches(scorer, calibration, batches, seed)
    if progress:
        from tqdm.auto import tqdm

        stream = tqdm(stream, desc="calibrating", unit="batch", total=batches)
    seen = 0
    try:
        with torch.enable_grad(), torch.inference_mode(False):
            for images, labels in stream:
                probs.clear()
                logits = scorer(images.to(device).clone())
                targets = logits.argmax(-1).detach() if labels is None else labels.to(device)  # own predictions
                loss = F.cross_entropy(logits, targets)
                grads = torch.autograd.grad(loss, probs)
                for layer, (a, g) in enumerate(zip(probs, grads)):
                    batch, heads, n, _ = a.shape
                    if n != p + totals.shape[1]:
                        raise VitslimError(f"calibration images give {n - p} patches; the model was built for "
                                           f"{totals.shape[1]}: use images of the model's input size")
                    with torch.no_grad():
                        totals[layer] += ((a * g).sum(dim=(0, 1, 2))[p:].abs() / (batch * heads * n)).double()
                seen += 1
    finally:
        for h in hooks:
            h.remove()
    if seen == 0:
        raise VitslimError("calibration= gave no batches")
    return totals.float()


def save_scores(path: str | pathlib.Path, scores: Tensor, **info: Any) -> pathlib.Path:
    """Write calibration scores (and string metadata) to a safetensors file, atomically."""
    import json

    from safetensors.torch import save

    from vitslim.io import atomic_write

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


# ---------------------------------------------------------------------------------------------
# 3. the block


class PruneMergeBlock(Reducer):
    """Wraps one block: z = M x; the block runs on z; out = R z + (pruned tokens of x). Full grid in and out."""

    def __init__(self, merge: Tensor, centres: list[int], pruned: Tensor, score: Tensor, decay_mr: bool):
        super().__init__()
        self.merge = nn.Parameter(merge.float())
        self.reconstruct = nn.Parameter(torch.linalg.pinv(merge).float())
        offset = merge.shape[1] - pruned.numel()  # the prefix tokens
        # positions of the pruned tokens, which skip the block: a static index (same for every image),
        # so adding them back is one small index_add instead of a full-size masked copy and add
        self.register_buffer("pruned_index", pruned.nonzero().flatten() + offset)
        self.register_buffer("score", score.float())  # the block's search score per patch (for inspection)
        self.register_buffer("centres", torch.tensor(centres, dtype=torch.long))  # patch indices (for inspection)
        self.register_buffer("group_size", (merge != 0).sum(1).clamp_min(1).float())
        self.vitslim_no_decay = not decay_mr  # read by the training engine's parameter groups

    @property
    def bypass(self) -> Tensor:
        """(N,) 1 where the token skips the block (pruned), else 0."""
        mask = torch.zeros(self.merge.shape[1], device=self.merge.device)
        return mask.index_fill_(0, self.pruned_index, 1.0)

    def before_block(self, state: TokenState) -> TokenState:
        """Keep the pruned tokens aside and merge the rest into the block's m tokens."""
        x = state.x
        if x.shape[1] != self.merge.shape[1]:
            raise VitslimError(f"this prune_merge plan is for {self.merge.shape[1]} tokens, the input has "
                               f"{x.shape[1]}: run the model at the image size it was patched for")
        if self.pruned_index.numel():
            state.scratch["pm_bypass"] = x.index_select(1, self.pruned_index)
        state.scratch["pm_grid"] = state.grid
        state.x = torch.matmul(self.merge.to(x.dtype), x)
        state.size = self.group_size.expand(x.shape[0], -1) if state.prop_attn else None
        state.grid = None
        return state

    def after_block(self, state: TokenState) -> TokenState:
        """Reconstruct the full token grid and add back the pruned tokens."""
        x = state.x
        state.x = torch.matmul(self.reconstruct.to(x.dtype), x)
        if self.pruned_index.numel():
            state.x.index_add_(1, self.pruned_index, state.scratch.pop("pm_bypass"))
        state.size = None
        state.grid = state.scratch.pop("pm_grid")
        return state


# ---------------------------------------------------------------------------------------------
# the method


@register
class PruneMerge(Method):
    """Prune-and-Merge: a global plan from gradient-weighted attention; trainable merge/reconstruct per block."""

    name = "prune_merge"
    ACCEPTED = ("keep_rate, prune_rate, calibration, calibration_batches, seed, scores, tokens, blocks, depth_discount, "
                "row_quirk, decay_mr")

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

    def resolve(self, model: nn.Module, keep_rate: Any = 0.6, prune_rate: Any = 0.1, scores: Any = None,
                tokens: Any = None, blocks: Any = None, depth_discount: float = 0.025, row_quirk: bool = True,
                decay_mr: bool = False, pruned: Any = None, **extra: Any) -> dict[str, Any]:
        reject_unknown(self.name, extra, self.ACCEPTED)
        depth, n = len(model.blocks), model.patch_embed.num_patches
        blocks = list(range(depth)) if blocks is None else check_locations(blocks, depth)
        keep_rate = check_rate("keep_rate", keep_rate)
        prune_rate = float(prune_rate)
        if not 0.0 <= prune_rate < 1.0 or keep_rate + prune_rate > 1.0 + 1e-9:
            raise VitslimError(f"prune_rate={prune_rate} with keep_rate={keep_rate}: need 0 <= prune_rate < 1 and "
                               "keep_rate + prune_rate <= 1 (centres and pruned tokens are disjoint)")
        depth_discount = float(depth_discount)
        if not 0.0 <= depth_discount * (max(blocks)) < 1.0:
            raise VitslimError(f"depth_discount={depth_discount} makes the discount (1 - d * block) non-positive "
                               f"by block {max(blocks)}: use a value below {1 / max(1, max(blocks)):.4f}")
        if isinstance(scores, (str, pathlib.Path)):
            scores = load_scores(scores)
        if scores is None and tokens is None:  # patched without prepare(): score data-free
            scores = calibrate(model)
        if scores is not None:
            scores = torch.as_tensor(scores).float().cpu()
            if scores.shape == (depth, n) and len(blocks) < depth:
                scores = scores[blocks]
            if tuple(scores.shape) != (len(blocks), n):
                raise VitslimError(f"scores have shape {tuple(scores.shape)}; this model needs ({len(blocks)}, {n}) "
                                   "(blocks x patches): calibrate this model at its input size")
            self.plans = global_plan(scores, keep_rate, prune_rate, blocks, depth_discount)
        else:
            tokens = list(tokens) if isinstance(tokens, (list, tuple)) else [tokens] * len(blocks)
            if len(tokens) != len(blocks) or not all(1 <= int(t) <= n for t in tokens):
                raise VitslimError(f"tokens must give 1..{n} centres for each of the {len(blocks)} blocks, got {tokens}")
            pruned = [0] * len(tokens) if pruned is None else list(pruned)
            if len(pruned) != len(tokens):
                raise VitslimError(f"pruned gives {len(pruned)} counts for {len(tokens)} blocks")
            self.plans = [regular_plan(n, int(t), int(q)) for t, q in zip(tokens, pruned)]
        return {"keep_rate": keep_rate, "prune_rate": prune_rate, "blocks": blocks, "depth_discount": depth_discount,
                "row_quirk": bool(row_quirk), "decay_mr": bool(decay_mr),
                "tokens": [len(plan.centres) for plan in self.plans],
                "pruned": [int(plan.pruned.sum()) for plan in self.plans]}

    def reducers(self) -> dict[int, Reducer]:
        grid_width = self.model.patch_embed.grid_size[1]
        p = self.model.num_prefix_tokens
        return {block: PruneMergeBlock(merge_matrix(plan, grid_width, p, self.options["row_quirk"]), plan.centres,
                                       plan.pruned, plan.score, self.options["decay_mr"])
                for block, plan in zip(self.options["blocks"], self.plans)}

    # macs=: keep_rate falls from 1 - prune_rate in steps of RATE_STEP (prune_rate stays as given)
    @classmethod
    def max_level(cls, model: nn.Module, **options: Any) -> int:
        """Levels down to keep_rate = RATE_STEP."""
        return max(0, round((1.0 - float(options.get("prune_rate", 0.1))) / RATE_STEP) - 1)

    @classmethod
    def options_for_level(cls, model: nn.Module, level: int, **options: Any) -> dict[str, Any]:
        """keep_rate = 1 - prune_rate - level * RATE_STEP."""
        if "keep_rate" in options:
            raise VitslimError("give prune_merge either keep_rate or macs=, not both")
        if options.get("scores") is None:
            raise VitslimError("prune_merge needs scores for macs=: pass calibration= or scores=")
        prune_rate = float(options.get("prune_rate", 0.1))
        return {**options, "keep_rate": round(1.0 - prune_rate - level * RATE_STEP, 6)}
