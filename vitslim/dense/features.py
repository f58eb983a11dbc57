"""Full-grid features from any model, patched or not: what a dense-prediction head reads.

Merged tokens are copied back to every patch they stand for (``vitslim.unmerge``). A patch whose
token was pruned (top-k, EViT, SPViT) is restored by ``restore``:
- ``"dropped"`` (default): the value its token had when it was dropped, carried aside through the
  remaining blocks, as dense variants of token pruning do; after the final norm like every patch.
- ``"fused"``: the token it was fused into, where the method fuses (EViT's fused token, SPViT's
  package token); a plain prune (top-k) has none, so those patches keep their dropped value.
"""
from __future__ import annotations

from typing import Callable, Sequence


from torch import Tensor, nn

from vitslim.errors import VitslimError
from vitslim.families import family_of
from vitslim.patch import check_input, is_patched
from vitslim.tokens import TokenState, restore_patches

RESTORES = ("dropped", "fused")


def features(model: nn.Module, images: Tensor, blocks: Sequence[int] | None = None, *,
             restore: str = "dropped", norm: bool = True) -> Tensor | list[Tensor]:
    """The patch-grid feature map (B, C, H, W) after the final norm, or one per block in ``blocks``.

    ``blocks`` are 0-based (negative counts from the end); their maps go through the final norm
    too unless ``norm=False``. Works on a patched model (every method) and on a plain timm ViT, at
    any input size the model takes (non-square with ``dynamic_img_size=True``).
    """
    return features_and_state(model, images, blocks, restore=restore, norm=norm)[0]


def features_and_state(model: nn.Module, images: Tensor, blocks: Sequence[int] | None = None, *,
                       restore: str = "dropped", norm: bool = True
                       ) -> tuple[Tensor | list[Tensor], TokenState | None]:
    """``features`` and the final ``TokenState`` (its ``aux`` feeds training; None for an unpatched model)."""
    check_one_grid(model)
    check_input(model, images)
    if restore not in RESTORES:
        raise VitslimError(f"restore must be one of {', '.join(RESTORES)}, got {restore!r}")
    picked = block_indices(blocks, len(model.blocks))
    if not is_patched(model):
        return _dense_features(model, images, picked, norm), None
    post = model.norm if norm else nn.Identity()
    maps: dict[int, Tensor] = {}

    def tap(i: int, state: TokenState) -> None:
        if picked is not None and i in picked:
            maps[i] = _grid(state, post(state.x), restore, post)

    state = model.forward_tokens(images, trace_source=True, on_block=tap)
    if picked is None:
        return _grid(state, state.x, restore, model.norm), state
    return [maps[i] for i in picked], state


def check_one_grid(model: nn.Module) -> None:
    """A one-line VitslimError unless the model keeps one patch grid through all its blocks (not PiT's stages)."""
    family = family_of(model)
    if family.name not in ("vit", "eva"):
        raise VitslimError(f"dense features and token maps run on vit and eva models; {family.name} models shrink "
                           "their patch grid between stages (not supported here yet)")


def block_indices(blocks: Sequence[int] | int | None, depth: int) -> list[int] | None:
    """``blocks`` as 0-based indices in [0, depth) (negative counts from the end); a one-line error when out of range."""
    if blocks is None:
        return None
    if isinstance(blocks, int):
        blocks = [blocks]
    picked = []
    for b in blocks:
        if not isinstance(b, int) or not -depth <= b < depth:
            raise VitslimError(f"blocks must be block indices in [-{depth}, {depth - 1}], got {b!r}")
        picked.append(b % depth)
    return picked


def _grid(state: TokenState, x: Tensor, restore: str, post: Callable[[Tensor], Tensor]) -> Tensor:
    """Tokens ``x`` of ``state`` on the full patch grid (B, C, H, W), pruned patches restored."""
    full = restore_patches(state, x, fused=restore == "fused", post=post)
    h, w = state.grid0
    return full.transpose(1, 2).reshape(full.shape[0], full.shape[2], h, w)


def _dense_features(model: nn.Module, images: Tensor, picked: list[int] | None, norm: bool) -> Tensor | list[Tensor]:
    """The same maps from an unpatched model (timm's own forward)."""
    if picked is not None:
        return model.forward_intermediates(images, indices=picked, norm=norm, output_fmt="NCHW",
                                           intermediates_only=True)
    tokens = model.forward_features(images)[:, model.num_prefix_tokens:]
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *patch_grid(model, images))


def patch_grid(model: nn.Module, images: Tensor) -> tuple[int, int]:
    """The (H, W) patch grid ``model`` makes of ``images`` (their own size with ``dynamic_img_size``)."""
    pe = model.patch_embed
    return tuple(pe.dynamic_feat_size(tuple(images.shape[-2:])) if model.dynamic_img_size else pe.grid_size)
