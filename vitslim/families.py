"""Model families: what the spine needs to know about each kind of timm model it runs.

The spine (``vitslim.patch``) is one loop over the blocks with the reducers' hooks between
attention and MLP. What differs between architectures lives here, one ``Family`` per kind of
model: how images become tokens (and, for rotary models, the position tables), how one block's
attention and MLP residuals are computed on the current tokens, and how the head pools them.
A new architecture plugs in by subclassing ``Family`` and passing it to ``register_family``;
nothing else in the core names an architecture, and this module names no method.

Rotary positions (timm ``Eva``: EVA-02, ``vit_*_rope_*``) travel with the tokens as an index:
``TokenState.pos`` gives, for each patch-side token, the original patch whose rotary position it
uses (``vitslim.tokens`` keeps it up to date through every prune and merge). The family's tables
get one extra last row, the identity rotation, for tokens that stand for no single patch (EViT's
fused token): they are treated like the prefix tokens, which timm never rotates.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitslim import _compat  # noqa: F401
from timm.layers import Attention, AttentionRope, apply_rot_embed_cat
from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
from timm.models.pit import PoolingVisionTransformer
from timm.models.vision_transformer import Block, VisionTransformer

from vitslim.errors import VitslimError
from vitslim.kernels import BlockKernel, attn_residual, mlp_residual
from vitslim.tokens import TokenState, append_unplaced, init_source, restore_patches


class Family:
    """One kind of timm model as the spine runs it. Override what differs; the defaults are timm's ViT layout."""

    name: str = ""
    supported: str = ""  # what the family covers, for error messages

    def matches(self, model: nn.Module) -> bool:
        """True if ``model`` belongs to this family (its class, before any check of its blocks)."""
        raise NotImplementedError

    def check(self, model: nn.Module) -> None:
        """Raise a VitslimError if some part of the model is a variant the spine cannot run exactly."""

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The transformer blocks in the order they run (across stages where the model has them)."""
        return list(model.blocks)

    def num_prefix(self, model: nn.Module) -> int:
        """Tokens in front of the patch tokens (class, distillation, registers) that are never reduced."""
        return model.num_prefix_tokens

    def block_stages(self, model: nn.Module) -> list[int]:
        """For each block, the stage it belongs to; tokens are reduced within a stage (one stage: all 0)."""
        return [0] * len(self.blocks(model))

    def block_grids(self, model: nn.Module) -> list[tuple[int, int]]:
        """For each block, the patch grid its stage starts with (the dense model's, at its own input size)."""
        return [tuple(model.patch_embed.grid_size)] * len(self.blocks(model))

    def stage_patches(self, model: nn.Module) -> list[int]:
        """For each block, the number of patch tokens its stage starts with (from ``block_grids``)."""
        return [h * w for h, w in self.block_grids(model)]

    def reduction_points(self, model: nn.Module, between_blocks: bool = False) -> list[int]:
        """Default blocks for methods that reduce at a few places: a quarter, half and three quarters of the depth.

        ``between_blocks``: the method acts before its block (not after the block's attention)."""
        depth = len(self.blocks(model))
        return sorted({max(1, depth // 4), depth // 2, (3 * depth) // 4})

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        """The (C, H, W) input the model was built for."""
        pe = model.patch_embed
        return (pe.proj.in_channels, *pe.img_size)

    def check_input(self, model: nn.Module, images: Tensor) -> None:
        """Raise a VitslimError if the images cannot go through the model's patch embedding."""
        pe = model.patch_embed
        if images.dim() != 4 or images.shape[1] != pe.proj.in_channels:
            raise VitslimError(
                f"expected images of shape (B, {pe.proj.in_channels}, H, W), got {tuple(images.shape)}"
            )
        h, w = images.shape[-2:]
        ph, pw = pe.patch_size
        if getattr(model, "dynamic_img_size", False) or pe.dynamic_img_pad:
            if h < ph or w < pw:
                raise VitslimError(f"image size {h}x{w} is smaller than one {ph}x{pw} patch")
            if not pe.dynamic_img_pad and (h % ph or w % pw) and pe.strict_img_size:
                raise VitslimError(f"image size {h}x{w} is not a multiple of the patch size {ph}x{pw}")
            return
        _check_size(pe.img_size, h, w, ", or create the model with dynamic_img_size=True")

    def traces_source(self, model: nn.Module) -> bool:
        """True if the spine must trace where every patch went (to restore the grid between stages)."""
        return False

    def after_block(self, model: nn.Module, state: TokenState, index: int) -> TokenState:
        """Called after block ``index`` and its reducer: e.g. the end of a stage (restore, pool, restart)."""
        return state

    def teacher_tokens(self, model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
        """For an unpatched model: what its head takes (``forward_features``) and the final-norm patch tokens."""
        features = model.forward_features(images)
        return features, features[:, self.num_prefix(model):]

    def model_args(self, model: nn.Module) -> dict:
        """The timm ``create_model`` arguments that rebuild the model's shapes (sizes only)."""
        pe = model.patch_embed
        return dict(img_size=list(pe.img_size), patch_size=list(pe.patch_size), in_chans=pe.proj.in_channels,
                    num_classes=model.num_classes, embed_dim=model.embed_dim, depth=len(model.blocks),
                    num_heads=model.blocks[0].attn.num_heads, global_pool=model.global_pool)

    def embed(self, model: nn.Module, images: Tensor) -> tuple[Tensor, tuple[int, int] | None, Tensor | None]:
        """Tokens (B, N, C) after the position embedding and pre-norm, the patch grid (None when the
        tokens no longer form it, e.g. patch dropout) and the rotary tables (None: no rotary positions)."""
        raise NotImplementedError

    def uses_positions(self, model: nn.Module) -> bool:
        """True if the model's attention depends on each token's position (rotary embeddings)."""
        return False

    def block_positions(self, state: TokenState, index: int) -> Tensor | None:
        """What block ``index`` needs to know of the current tokens' positions (rotary rows), or None.

        Computed before the block runs and passed in as a tensor, so that gradient checkpointing
        recomputes the block on the positions it first saw."""
        return None

    def attn_residual(self, blk: nn.Module, x: Tensor, positions: Tensor | None, num_prefix: int,
                      bias: Tensor | None, kernel: BlockKernel,
                      want_qk: bool) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """The tokens after the block's attention residual, and the attention's (q, k) if asked."""
        return attn_residual(blk, x, bias, kernel, want_qk)

    def mlp_residual(self, blk: nn.Module, x: Tensor, kernel: BlockKernel) -> Tensor:
        """The tokens after the block's MLP residual."""
        return mlp_residual(blk, x, kernel)

    def head(self, model: nn.Module, state: TokenState, pre_logits: bool = False) -> Tensor:
        """The classifier head on the final tokens; average pooling is weighted by token size."""
        pool = model.global_pool
        if getattr(model, "attn_pool", None) is not None or pool in ("token", "") or state.size is None:
            return model.forward_head(state.x, pre_logits=pre_logits)
        if pool not in ("avg", "max", "avgmax"):
            raise VitslimError(f"global_pool={pool!r} is not supported on a patched model: use avg, max, avgmax "
                               "or token")
        start = 0 if getattr(model, "pool_include_prefix", False) else model.num_prefix_tokens
        x, w = state.x[:, start:], state.size[:, start:, None].to(state.x.dtype)
        if pool == "max":
            pooled = x.amax(1)
        else:
            pooled = (x * w).sum(1) / w.sum(1)
            if pool == "avgmax":
                pooled = 0.5 * (x.amax(1) + pooled)
        pooled = model.head_drop(model.fc_norm(pooled))
        return pooled if pre_logits else model.head(pooled)


class ViTFamily(Family):
    """timm ``VisionTransformer`` with the standard ``Block`` and ``Attention``."""

    name = "vit"
    supported = ("timm VisionTransformer models with the standard Block and Attention: ViT/DeiT (incl. distilled "
                 "DeiT), DeiT-III (LayerScale), ViT with registers, q/k-norm ViTs, token or avg pooling")

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer)

    def check(self, model: nn.Module) -> None:
        for i, blk in enumerate(model.blocks):
            if type(blk) is not Block or type(getattr(blk, "attn", None)) is not Attention:
                raise VitslimError(f"block {i} is a {type(blk).__name__}; vitslim supports {supported_models()}")

    def embed(self, model: nn.Module, images: Tensor) -> tuple[Tensor, tuple[int, int] | None, Tensor | None]:
        x, grid = _patches(model, images)
        x = model.norm_pre(model.patch_drop(model._pos_embed(x)))
        whole = x.shape[1] == model.num_prefix_tokens + grid[0] * grid[1]  # not after patch dropout
        return x, grid if whole else None, None


_EVA_ATTENTION = (EvaAttention, AttentionRope)


class EvaFamily(Family):
    """timm ``Eva`` (EVA-02, ``vit_*_rope_*``): rotary positions, SwiGLU MLPs, pre- and post-norm blocks."""

    name = "eva"
    supported = ("timm Eva models with EvaBlock or EvaBlockPostNorm and EvaAttention or AttentionRope (EVA, EVA-02, "
                 "vit_*_rope_*)")

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, Eva)

    def check(self, model: nn.Module) -> None:
        if model.patch_drop is not None:
            raise VitslimError("patch dropout is not supported on Eva models: create the model with "
                               "patch_drop_rate=0")
        for i, blk in enumerate(model.blocks):
            attn = type(getattr(blk, "attn", None))
            if type(blk) not in (EvaBlock, EvaBlockPostNorm) or attn not in _EVA_ATTENTION:
                raise VitslimError(f"block {i} is a {type(blk).__name__} with {attn.__name__}; "
                                   f"vitslim supports {supported_models()}")

    def uses_positions(self, model: nn.Module) -> bool:
        return model.rope is not None

    def embed(self, model: nn.Module, images: Tensor) -> tuple[Tensor, tuple[int, int] | None, Tensor | None]:
        x, grid = _patches(model, images)
        x, rope = model._pos_embed(x)
        if rope is not None:
            rope = with_identity_row(rope)
        return model.norm_pre(x), grid, rope

    def block_positions(self, state: TokenState, index: int) -> Tensor | None:
        return rotary_rows(state, index)

    def attn_residual(self, blk: nn.Module, x: Tensor, positions: Tensor | None, num_prefix: int,
                      bias: Tensor | None, kernel: BlockKernel,
                      want_qk: bool) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        if type(blk) is EvaBlockPostNorm:
            out, qk = _eva_attention(blk.attn, x, positions, num_prefix, bias, kernel, want_qk)
            return x + blk.drop_path1(blk.norm1(out)), qk
        out, qk = _eva_attention(blk.attn, blk.norm1(x), positions, num_prefix, bias, kernel, want_qk)
        if blk.gamma_1 is not None:
            out = blk.gamma_1 * out
        return x + blk.drop_path1(out), qk

    def mlp_residual(self, blk: nn.Module, x: Tensor, kernel: BlockKernel) -> Tensor:
        if type(blk) is EvaBlockPostNorm:
            return x + blk.drop_path2(blk.norm2(kernel.mlp(blk.mlp, x)))
        out = kernel.mlp(blk.mlp, blk.norm2(x))
        if blk.gamma_2 is not None:
            out = blk.gamma_2 * out
        return x + blk.drop_path2(out)


def _eva_attention(attn: nn.Module, x: Tensor, rope: Tensor | None, num_prefix: int, bias: Tensor | None,
                   kernel: BlockKernel, want_qk: bool) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """timm's ``EvaAttention`` / ``AttentionRope`` forward with the rotary rows of the current tokens.

    The prefix tokens are not rotated, as in timm."""
    batch, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    q_bias = getattr(attn, "q_bias", None)  # EvaAttention keeps its q/v biases apart (no k bias)
    if attn.qkv is not None:
        if q_bias is None:
            qkv = attn.qkv(x)
        elif attn.qkv_bias_separate:
            qkv = attn.qkv(x) + torch.cat((q_bias, attn.k_bias, attn.v_bias))
        else:
            qkv = F.linear(x, attn.qkv.weight, torch.cat((q_bias, attn.k_bias, attn.v_bias)))
        q, k, v = qkv.reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    else:  # separate projections; keys and values may have fewer heads (grouped-query attention)
        q, k, v = (proj(x).reshape(batch, n, -1, attn.head_dim).transpose(1, 2)
                   for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        p, half = num_prefix, attn.rotate_half
        q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], rope, half=half)], dim=2).type_as(v)
    groups = getattr(attn, "num_kv_groups", 1)
    if groups > 1:  # after the rotation, as timm does: head h uses key/value head h // groups
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = kernel.attend(attn, q, k, v, bias)
    out = attn.norm(out.transpose(1, 2).reshape(batch, n, -1))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(kernel.project(attn, out)), ((q, k) if want_qk else None)


def with_identity_row(rope: Tensor) -> Tensor:
    """Rotary tables ([..., n0, 2D] as [sin | cos]) with one more row, the identity rotation (sin 0, cos 1)."""
    half = rope.shape[-1] // 2
    identity = torch.cat([rope.new_zeros(half), rope.new_ones(half)]).expand(*rope.shape[:-2], 1, -1)
    return torch.cat([rope, identity], dim=-2)


def rotary_rows(state: TokenState, index: int) -> Tensor | None:
    """Block ``index``'s rotary rows for the current patch-side tokens, shaped to broadcast against (B, H, n, d)."""
    table = state.rope
    if table is None:
        return None
    if table.dim() == 4:  # timm's mixed RoPE: (depth, heads, n0 + 1, 2D), one table per block
        table = table[index]
    n = state.x.shape[1] - state.num_prefix
    if state.pos is None:  # the original patches in order (perhaps truncated): no gather
        return table[..., :n, :]
    rows = table.index_select(-2, state.pos.reshape(-1))
    if table.dim() == 2:  # (B*n, 2D) -> (B, 1, n, 2D)
        return rows.view(state.pos.shape[0], 1, n, -1)
    return rows.view(table.shape[0], state.pos.shape[0], n, -1).transpose(0, 1)  # (B, heads, n, 2D)


class PiTFamily(Family):
    """timm ``PoolingVisionTransformer`` (PiT): stages of plain blocks, a pooling layer between stages.

    Tokens are reduced within a stage only. At a stage's end the patch grid is restored
    (``tokens.restore_patches``: merged tokens back on their patches, pruned patches with the value
    they had when dropped), the pooling layer shrinks it and maps the class token (and any carried
    package tokens, ``TokenState.unplaced``) through its linear layer, and the next stage starts on
    the whole smaller grid. The spine therefore traces where every patch goes (a gather per reduction).
    """

    name = "pit"
    supported = "timm PoolingVisionTransformer (PiT, incl. distilled PiT) with the standard Block and Attention"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, PoolingVisionTransformer)

    def check(self, model: nn.Module) -> None:
        for i, blk in enumerate(self.blocks(model)):
            if type(blk) is not Block or type(getattr(blk, "attn", None)) is not Attention:
                raise VitslimError(f"block {i} is a {type(blk).__name__}; vitslim supports {supported_models()}")

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return [blk for stage in model.transformers for blk in stage.blocks]

    def num_prefix(self, model: nn.Module) -> int:
        return model.num_tokens

    def block_stages(self, model: nn.Module) -> list[int]:
        return [s for s, stage in enumerate(model.transformers) for _ in stage.blocks]

    def block_grids(self, model: nn.Module) -> list[tuple[int, int]]:
        grid, grids = tuple(model.patch_embed.grid_size), []
        for stage in model.transformers:
            if stage.pool is not None:  # the pooling's convolution halves the grid, rounding up
                conv = stage.pool.conv
                grid = tuple((g + 2 * pad - k) // st + 1
                             for g, pad, k, st in zip(grid, conv.padding, conv.kernel_size, conv.stride))
            grids += [grid] * len(stage.blocks)
        return grids

    def reduction_points(self, model: nn.Module, between_blocks: bool = False) -> list[int]:
        """One per stage, a quarter into it: after the attention of its first block (6 blocks: of its second),
        or before its second block for methods that act between blocks."""
        points, start = [], 0
        for stage in model.transformers:
            depth = len(stage.blocks)
            if depth > 1 or not between_blocks:
                points.append(start + (max(1, depth // 4) if between_blocks else depth // 4))
            start += depth
        return points

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        return (model.patch_embed.conv.in_channels, *model.patch_embed.img_size)

    def check_input(self, model: nn.Module, images: Tensor) -> None:
        channels = model.patch_embed.conv.in_channels
        if images.dim() != 4 or images.shape[1] != channels:
            raise VitslimError(f"expected images of shape (B, {channels}, H, W), got {tuple(images.shape)}")
        _check_size(model.patch_embed.img_size, *images.shape[-2:], " (PiT's position embedding has a fixed size)")

    def traces_source(self, model: nn.Module) -> bool:
        return len(model.transformers) > 1

    def embed(self, model: nn.Module, images: Tensor) -> tuple[Tensor, tuple[int, int] | None, Tensor | None]:
        x, cls = _pit_stem(model, images)
        first = model.transformers[0]
        if first.pool is not None:
            x, cls = first.pool(x, cls)
        grid = tuple(x.shape[-2:])
        return first.norm(torch.cat([cls, x.flatten(2).transpose(1, 2)], dim=1)), grid, None

    def after_block(self, model: nn.Module, state: TokenState, index: int) -> TokenState:
        """At a stage's last block (but the model's last): restore the grid, pool, restart on the new grid."""
        ends = self._stage_ends(model)
        if index not in ends or index == ends[-1]:
            return state
        stage = model.transformers[ends.index(index) + 1]
        p, x = state.num_prefix, state.x
        patches = restore_patches(state)  # (B, n0, C)
        grid = patches.transpose(1, 2).reshape(x.shape[0], x.shape[-1], *state.grid0)
        carried = x[:, x.shape[1] - state.unplaced:] if state.unplaced else None
        grid, prefix = stage.pool(grid, x[:, :p])
        tokens = stage.norm(torch.cat([prefix, grid.flatten(2).transpose(1, 2)], dim=1))
        new_grid = tuple(grid.shape[-2:])
        fresh = TokenState(x=tokens, num_prefix=p, grid0=new_grid, grid=new_grid, prop_attn=state.prop_attn,
                           aux=state.aux, trace=state.trace)
        if state.source is not None:
            fresh.source = init_source(x.shape[0], new_grid, p, x.device)
        if carried is not None:  # package tokens go through the pooling's linear map, like the class token
            fresh = append_unplaced(fresh, stage.norm(stage.pool.fc(carried)))
        return fresh

    def _stage_ends(self, model: nn.Module) -> list[int]:
        ends, last = [], -1
        for stage in model.transformers:
            last += len(stage.blocks)
            ends.append(last)
        return ends

    def head(self, model: nn.Module, state: TokenState, pre_logits: bool = False) -> Tensor:
        return model.forward_head(state.x[:, :state.num_prefix], pre_logits=pre_logits)

    def teacher_tokens(self, model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
        x, cls = model.transformers(_pit_stem(model, images))
        return model.norm(cls), model.norm(x.flatten(2).transpose(1, 2))

    def model_args(self, model: nn.Module) -> dict:
        pe = model.patch_embed
        return dict(img_size=pe.img_size[0], patch_size=pe.patch_size[0], stride=pe.conv.stride[0],
                    in_chans=pe.conv.in_channels, num_classes=model.num_classes, base_dims=list(model.base_dims),
                    heads=list(model.heads), depth=[len(stage.blocks) for stage in model.transformers],
                    mlp_ratio=self.blocks(model)[0].mlp.fc1.out_features / self.blocks(model)[0].mlp.fc1.in_features,
                    distilled=model.head_dist is not None, global_pool=model.global_pool)


def _pit_stem(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """PiT's patch map (B, C, H, W) with its position embedding, and the class token(s) (timm's forward)."""
    x = model.pos_drop(model.patch_embed(images) + model.pos_embed)
    return x, model.cls_token.expand(x.shape[0], -1, -1)


def _check_size(img_size: tuple[int, int], h: int, w: int, hint: str) -> None:
    """A one-line error unless the images are (h, w) = the model's fixed input size."""
    if (h, w) != tuple(img_size):
        raise VitslimError(f"this model takes {img_size[0]}x{img_size[1]} images, got {h}x{w}: resize the input{hint}")


def _patches(model: nn.Module, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """The patch embedding's output and its grid (NHWC output under dynamic_img_size)."""
    x = model.patch_embed(images)
    return x, (tuple(x.shape[1:3]) if x.dim() == 4 else tuple(model.patch_embed.grid_size))


class ModelWrapper(nn.Module):
    """A module that runs another model another way (its ideal, a runtime): given an input size and
    checked like that model (``unwrap``)."""

    def wrapped_model(self) -> nn.Module:
        """The model this one runs."""
        raise NotImplementedError


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside any ``ModelWrapper`` layers."""
    while isinstance(model, ModelWrapper):
        model = model.wrapped_model()
    return model


VIT = ViTFamily()
_FAMILIES: list[Family] = [VIT, EvaFamily(), PiTFamily()]


def register_family(family: Family) -> Family:
    """Make the spine run another kind of model (checked before the built-in families)."""
    _FAMILIES.insert(0, family)
    return family


def supported_models() -> str:
    """Every family's description, for error messages."""
    return "; ".join(f.supported for f in _FAMILIES)


def family_of(model: nn.Module) -> Family:
    """The family of a supported model; a VitslimError naming what is supported otherwise."""
    family = next((f for f in _FAMILIES if f.matches(model)), None)
    if family is None:
        raise VitslimError(f"{type(model).__name__} is not supported; vitslim supports {supported_models()}")
    family.check(model)
    return family
