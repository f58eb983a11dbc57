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
from timm.models.vision_transformer import Block, VisionTransformer

from vitslim.errors import VitslimError
from vitslim.kernels import BlockKernel, attn_residual, mlp_residual
from vitslim.tokens import TokenState


class Family:
    """One kind of timm model as the spine runs it. Override what differs; the defaults are timm's ViT layout."""

    name: str = ""
    supported: str = ""  # what the family covers, for error messages

    def matches(self, model: nn.Module) -> bool:
        """True if ``model`` belongs to this family (its class, before any check of its blocks)."""
        raise NotImplementedError

    def check(self, model: nn.Module) -> None:
        """Raise a VitslimError if some part of the model is a variant the spine cannot run exactly."""

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


def _patches(model: nn.Module, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """The patch embedding's output and its grid (NHWC output under dynamic_img_size)."""
    x = model.patch_embed(images)
    return x, (tuple(x.shape[1:3]) if x.dim() == 4 else tuple(model.patch_embed.grid_size))


VIT = ViTFamily()
_FAMILIES: list[Family] = [VIT, EvaFamily()]


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
