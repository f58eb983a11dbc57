"""Structural slicing: CDCP masks -> smaller Linear layers of a stock timm ViT.

``slim(model)`` returns a copy of a CDCP- or CAIT-patched model whose blocks physically hold only
the kept channels (CAIT-style, vitslim reconstruction; docs/methods/cdcp.md, "Export"):
- ``qkv`` keeps rows q[:, m_qk], k[:, m_qk], v[:, m_v] in every head (timm's (3, H, d') layout),
  ``proj`` the input columns at m_v, ``fc1`` the rows and ``fc2`` the columns at m_mlp;
- the attention's ``head_dim`` becomes d' and timm derives the softmax scale d'^-1/2 from it (its
  fused path passes no scale to SDPA), while the weights were trained with the unpruned d^-1/2:
  the q rows are multiplied by sqrt(d'/d), so q k^T / sqrt(d') equals the trained q k^T / sqrt(d);
- a CDCP model becomes a plain timm ``VisionTransformer`` of stock classes; a CAIT model stays
  patched with its ATME part only (method "atme", same schedule).

``vitslim.export.save`` writes any model, sliced by this module where it has channel masks.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from vitslim.errors import VitslimError
from vitslim.families import family_of
from vitslim.methods.cdcp import filled_bias
from vitslim.models import model_spec
from vitslim.patch import is_patched, patch, unpatch

CHANNEL_METHODS = ("cdcp", "cait")


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                      dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def _set_bias(layer: nn.Linear, bias: Tensor) -> None:
    with torch.no_grad():
        if layer.bias is None:
            layer.bias = nn.Parameter(bias.detach().clone())
        else:
            layer.bias.copy_(bias)


def slice_block(blk: nn.Module, m_qk: Tensor, m_v: Tensor, m_mlp: Tensor) -> None:
    """Replace a timm Block's qkv/proj/fc1/fc2 by the kept channels (in place); scale folded into q."""
    attn, mlp = blk.attn, blk.mlp
    heads, d = attn.num_heads, attn.head_dim
    qk, v, hid = m_qk.nonzero()[:, 0], m_v.nonzero()[:, 0], m_mlp.nonzero()[:, 0]
    if len(qk) != len(v):
        raise VitslimError(f"CDCP export needs as many qk as v channels per block, got {len(qk)} and {len(v)}")
    k = len(qk)
    with torch.no_grad():
        if k < d:
            fold = (k / d) ** 0.5  # stock attention scales by k^-1/2; the weights expect d^-1/2
            w = attn.qkv.weight.view(3, heads, d, -1)
            w = torch.stack([w[0][:, qk] * fold, w[1][:, qk], w[2][:, v]]).reshape(3 * heads * k, -1)
            b = attn.qkv.bias
            if b is not None:
                b = b.view(3, heads, d)
                b = torch.stack([b[0][:, qk] * fold, b[1][:, qk], b[2][:, v]]).reshape(-1)
            attn.qkv = _linear(w, b)
            attn.proj = _linear(attn.proj.weight.view(attn.proj.out_features, heads, d)[:, :, v].reshape(
                attn.proj.out_features, heads * k), attn.proj.bias)
            attn.head_dim, attn.attn_dim, attn.scale = k, heads * k, k ** -0.5
        if len(hid) < mlp.fc1.out_features:
            b1 = mlp.fc1.bias
            mlp.fc1 = _linear(mlp.fc1.weight[hid], None if b1 is None else b1[hid])
            mlp.fc2 = _linear(mlp.fc2.weight[:, hid], mlp.fc2.bias)


def resize_block(blk: nn.Module, head_dim: int, hidden: int) -> None:
    """Give a dense Block the shapes of a sliced one (weights to be loaded afterwards)."""
    attn, mlp = blk.attn, blk.mlp
    heads, dim = attn.num_heads, attn.qkv.in_features
    if head_dim != attn.head_dim:
        attn.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=attn.qkv.bias is not None)
        attn.proj = nn.Linear(heads * head_dim, attn.proj.out_features, bias=attn.proj.bias is not None)
        attn.head_dim, attn.attn_dim, attn.scale = head_dim, heads * head_dim, head_dim ** -0.5
    if hidden != mlp.fc1.out_features:
        mlp.fc1 = nn.Linear(dim, hidden, bias=mlp.fc1.bias is not None)
        mlp.fc2 = nn.Linear(hidden, mlp.fc2.out_features, bias=mlp.fc2.bias is not None)


def channel_counts(model: nn.Module) -> list[list[int]]:
    """Per block [head dim, MLP hidden] of a (sliced) model."""
    return [[blk.attn.head_dim, blk.mlp.fc1.out_features] for blk in family_of(model).blocks(model)]


def slim(model: nn.Module) -> nn.Module:
    """A copy of a CDCP/CAIT-patched model with the pruned channels removed from its weights."""

    if not is_patched(model) or model.vitslim_config["method"] not in CHANNEL_METHODS:
        raise VitslimError("slim() takes a model patched with cdcp or cait (it turns their channel masks into "
                           "smaller layers); other models have nothing to slice")
    spec = model_spec(model)
    cfg = model.vitslim_config
    model = copy.deepcopy(model).eval()
    masks = [(r.mask_qk, r.mask_v, r.mask_mlp) for r in model._vitslim_plan]
    fills = [r.fills(r.mask_v, r.mask_mlp) for r in model._vitslim_plan]
    unpatch(model)
    for blk, (m_qk, m_v, m_mlp), fill in zip(model.blocks, masks, fills):
        if fill:  # mean compensation: the pruned channels' means go into the biases, once
            _set_bias(blk.attn.proj, filled_bias(blk.attn.proj, fill["v_fill"]))
            _set_bias(blk.mlp.fc2, filled_bias(blk.mlp.fc2, fill["mlp_fill"]))
        slice_block(blk, m_qk, m_v, m_mlp)
    if spec is not None:
        model.vitslim_spec = spec  # the dense architecture, resized by vitslim_channels on load
    model.vitslim_channels = channel_counts(model)
    if cfg["method"] == "cait":
        patch(model, "atme", prop_attn=cfg["prop_attn"], schedule=cfg["options"]["schedule"])
        model.vitslim_config["macs_target"] = cfg["macs_target"]
    return model
