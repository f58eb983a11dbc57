"""Pictures of which patches share a token: ToMe's figure, for every method and any block.

``token_groups`` runs a (patched) model and reads, after each chosen block, the token every patch
lived in while that block computed (``TokenState.computed_source``: for Prune-and-Merge, whose
blocks merge before and reconstruct after, the block's own merge groups). ``draw_token_groups``
colours each group over the image and outlines it; ``save_figure`` puts the panels in one PNG.

Token ids: the token's position in the block's token sequence (prefix tokens included), so the
same id gets the same colour in every panel; ``PRUNED`` (-1) where the patch's token was pruned;
``FUSED - t`` (-2 and below) where it was fused into token t, a token that stands for dropped
patches (EViT's fused token, SPViT's package token; an earlier fused token can be kept as an
ordinary one, so there can be several). Methods that prune channels, not tokens, leave every
patch its own token.
"""
from __future__ import annotations

import math
import os
import pathlib
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from vitslim.data import IMAGE_MODES, build_transform, data_config, load_image
from vitslim.dense.features import block_indices, check_one_grid, patch_grid
from vitslim.errors import VitslimError
from vitslim.io import write_png
from vitslim.patch import check_input, is_patched
from vitslim.tokens import TokenState, init_source

PRUNED = -1
FUSED = -2
PRUNED_SHADE = 0.3  # pruned patches: grey at this fraction of their brightness
FUSED_SHADE = 0.45  # fused patches: their own colours, darkened, so they differ from grey pruned ones
MIN_PANEL_PIXELS = 224  # small inputs (digits, CIFAR) are enlarged so outlines stay thin against a patch


def default_blocks(depth: int) -> list[int]:
    """About a quarter and half way through, and the last block (0-based)."""
    return sorted({max(0, round(depth / 4) - 1), max(0, round(depth / 2) - 1), depth - 1})


def load_images(paths: Sequence[str | os.PathLike], model: nn.Module,
                size: tuple[int, int] | None = None) -> tuple[Tensor, list[np.ndarray]]:
    """Images as the model takes them (its own eval transform) and as drawn: (B, C, H, W) and (H, W, 3) floats.

    ``size`` replaces the model's input size (a non-square one needs a model with dynamic_img_size).
    The drawn picture is the model's input, un-normalised: the same resize and crop.
    """
    if not paths:
        raise VitslimError("no images given: pass at least one image file")
    cfg = data_config(model)
    if size is not None:
        cfg["input_size"] = (cfg["input_size"][0], *size)
    channels = cfg["input_size"][0]
    if channels not in IMAGE_MODES:
        raise VitslimError(f"models with {channels} input channels are not supported; use 1 or 3")
    transform = build_transform(cfg, "test")
    batch = torch.stack([transform(load_image(p, IMAGE_MODES[channels])) for p in paths])
    mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, -1, 1, 1)
    pictures = (batch * std + mean).clamp(0, 1).permute(0, 2, 3, 1).expand(-1, -1, -1, 3)
    return batch, [p.numpy().copy() for p in pictures]


def token_groups(model: nn.Module, images: Tensor, blocks: Sequence[int] | None = None) -> dict[int, Tensor]:
    """Block -> (B, H, W) long: the token each patch lived in while the block computed (PRUNED, FUSED - t).

    ``blocks`` are 0-based (negative counts from the end), by default ``default_blocks``. An
    unpatched model keeps every patch its own token.
    """
    check_one_grid(model)
    check_input(model, images)
    depth = len(model.blocks)
    picked = default_blocks(depth) if blocks is None else block_indices(blocks, depth)
    batch = images.shape[0]
    if not is_patched(model):
        grid = patch_grid(model, images)
        ids = init_source(batch, grid, model.num_prefix_tokens, images.device).view(batch, *grid)
        return {i: ids.clone() for i in picked}
    found: dict[int, Tensor] = {}

    def tap(i: int, state: TokenState) -> None:
        if i in picked:
            source = state.computed_source().clone()  # later blocks rewrite the state's maps
            if state.block_source is None and state.dropped is not None:
                source = torch.where(state.dropped.mask & (source >= 0), FUSED - source, source)
            found[i] = source.reshape(batch, *state.grid0)

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            model.forward_tokens(images, trace_source=True, on_block=tap)
    finally:
        model.train(was_training)
    return {i: found[i] for i in picked}


def count_tokens(groups: Tensor | np.ndarray) -> int:
    """Tokens one image's groups (h, w) stand for: one per id, pruned patches none."""
    ids = np.unique(np.asarray(groups))
    return int((ids != PRUNED).sum())


def token_colours(ids: np.ndarray) -> np.ndarray:
    """(..., 3) colours in [0, 1], the same for a token id wherever it appears (seeded by the id)."""
    unique, inverse = np.unique(ids, return_inverse=True)
    palette = np.stack([np.random.default_rng(int(i) + 1000).uniform(0.1, 1.0, 3) for i in unique])
    return palette[inverse].reshape(*ids.shape, 3)


def upsample_ids(groups: np.ndarray, height: int, width: int) -> np.ndarray:
    """A (h, w) patch map at pixel resolution (height, width), nearest patch."""
    rows = np.arange(height) * groups.shape[0] // height
    cols = np.arange(width) * groups.shape[1] // width
    return groups[rows][:, cols]


def group_outlines(ids: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels next to a pixel of another group (right or below), i.e. the groups' borders."""
    edge = np.zeros(ids.shape, dtype=bool)
    horizontal = ids[:, 1:] != ids[:, :-1]
    vertical = ids[1:] != ids[:-1]
    edge[:, :-1] |= horizontal
    edge[:-1] |= vertical
    return edge


def draw_token_groups(image: np.ndarray, groups: Tensor | np.ndarray, *, alpha: float = 0.5,
                      outline: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """The image (H, W, 3; floats in [0, 1] or uint8) with each token's patches coloured and outlined: float RGB.

    Pruned patches go dark grey, fused ones darkened; outlines separate different tokens at pixel resolution.
    """
    picture = np.asarray(image, dtype=np.float64)
    if np.asarray(image).dtype == np.uint8:
        picture = picture / 255.0
    if picture.ndim != 3 or picture.shape[2] != 3:
        raise VitslimError(f"expected an (H, W, 3) image, got shape {picture.shape}")
    ids = upsample_ids(np.asarray(groups), *picture.shape[:2])
    out = (1 - alpha) * picture + alpha * token_colours(ids)
    grey = picture.mean(axis=2, keepdims=True) * PRUNED_SHADE
    out = np.where((ids == PRUNED)[..., None], grey, out)
    out = np.where((ids <= FUSED)[..., None], picture * FUSED_SHADE, out)
    out[group_outlines(ids)] = outline
    return out.clip(0, 1)


def _enlarged(picture: np.ndarray) -> np.ndarray:
    """The picture enlarged by a whole factor (nearest) to about MIN_PANEL_PIXELS, so patches keep sharp edges."""
    factor = max(1, math.ceil(MIN_PANEL_PIXELS / max(picture.shape[:2])))
    return picture.repeat(factor, axis=0).repeat(factor, axis=1)


def save_figure(path: str | os.PathLike, image: np.ndarray, rows: Mapping[str, Mapping[int, Tensor | np.ndarray]],
                title: str = "") -> pathlib.Path:
    """One PNG: per row (label -> block -> (h, w) groups) the image, then a panel "block i: N tokens" per block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise VitslimError("nothing to draw: give at least one method")
    picture = _enlarged(np.asarray(image, dtype=np.float64) / (255.0 if np.asarray(image).dtype == np.uint8 else 1))
    columns = 1 + max(len(blocks) for blocks in rows.values())
    aspect = picture.shape[1] / picture.shape[0]
    fig, axes = plt.subplots(len(rows), columns, figsize=(2.6 * columns * aspect, 2.8 * len(rows)), squeeze=False)
    for r, (label, blocks) in enumerate(rows.items()):
        if all(count_tokens(g) == np.asarray(g).size for g in blocks.values()):
            label += "\n(every patch its own token)"  # e.g. a method that prunes channels
        axes[r, 0].imshow(picture)
        axes[r, 0].set_title(label, fontsize=9)
        for c, (block, groups) in enumerate(blocks.items(), start=1):
            groups = np.asarray(groups)
            axes[r, c].imshow(draw_token_groups(picture, groups), interpolation="nearest")
            axes[r, c].set_title(f"block {block}: {count_tokens(groups)} tokens", fontsize=9)
        for ax in axes[r]:
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return write_png(fig, path, dpi=100)
