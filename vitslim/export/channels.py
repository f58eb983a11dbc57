"""Structural export: CDCP masks -> smaller Linear layers of a stock timm ViT; safetensors save/load.

``slim(model)`` returns a copy of a CDCP- or CAIT-patched model whose blocks physically hold only
the kept channels (CAIT-style, vitslim reconstruction; docs/methods/cdcp.md, "Export"):
- ``qkv`` keeps rows q[:, m_qk], k[:, m_qk], v[:, m_v] in every head (timm's (3, H, d') layout),
  ``proj`` the input columns at m_v, ``fc1`` the rows and ``fc2`` the columns at m_mlp;
- the attention's ``head_dim`` becomes d' and timm derives the softmax scale d'^-1/2 from it (its
  fused path passes no scale to SDPA), while the weights were trained with the unpruned d^-1/2:
  the q rows are multiplied by sqrt(d'/d), so q k^T / sqrt(d') equals the trained q k^T / sqrt(d);
- a CDCP model becomes a plain timm ``VisionTransformer`` of stock classes; a CAIT model stays
  patched with its ATME part only (method "atme", same schedule).

``save(model, path)`` writes the weights and, in the safetensors header, a JSON ``vitslim`` entry
(architecture spec, per-block [head dim, MLP hidden], token method and options); ``load(path)``
rebuilds the model from it.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any

import torch
from torch import Tensor, nn

from vitslim._version import __version__
from vitslim.errors import VitslimError
from vitslim.io import atomic_write, load_state_strict
from vitslim.models import build_from_spec, model_spec
from vitslim.patch import is_patched, patch, unpatch

FORMAT = "vitslim-slim"
CHANNEL_METHODS = ("cdcp", "cait")


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                      dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


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
    return [[blk.attn.head_dim, blk.mlp.fc1.out_features] for blk in model.blocks]


def slim(model: nn.Module) -> nn.Module:
    """A copy of a CDCP/CAIT-patched model with the pruned channels removed from its weights."""

    if not is_patched(model) or model.vitslim_config["method"] not in CHANNEL_METHODS:
        raise VitslimError("slim() takes a model patched with cdcp or cait (it turns their channel masks into "
                           "smaller layers); other models have nothing to slice")
    spec = model_spec(model)
    cfg = model.vitslim_config
    model = copy.deepcopy(model).eval()
    masks = [(r.mask_qk, r.mask_v, r.mask_mlp) for r in model._vitslim_plan]
    unpatch(model)
    for blk, (m_qk, m_v, m_mlp) in zip(model.blocks, masks):
        slice_block(blk, m_qk, m_v, m_mlp)
    if spec is not None:
        model.vitslim_spec = spec  # the dense architecture, resized by vitslim_channels on load
    model.vitslim_channels = channel_counts(model)
    if cfg["method"] == "cait":
        patch(model, "atme", prop_attn=cfg["prop_attn"], schedule=cfg["options"]["schedule"])
        model.vitslim_config["macs_target"] = cfg["macs_target"]
    return model


def metadata(model: nn.Module) -> dict[str, Any]:
    """What load() needs besides the weights: architecture spec, channels, token method."""

    spec = model_spec(model)
    if spec is None:
        raise VitslimError("this model does not record its architecture (built by hand?): create it with "
                           "timm.create_model or vitslim's loaders so save() can describe it")
    cfg = model.vitslim_config if is_patched(model) else {}
    if cfg.get("method") in CHANNEL_METHODS:
        raise VitslimError(f"the model is still patched with {cfg['method']} masks: save(slim(model)) exports the "
                           "smaller model")
    return {"format": FORMAT, "spec": spec, "channels": channel_counts(model), "method": cfg.get("method"),
            "options": cfg.get("options", {}), "prop_attn": cfg.get("prop_attn"),
            "macs_target": cfg.get("macs_target"), "vitslim_version": __version__}


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write a (sliced) model to a safetensors file with its rebuild metadata in the header."""
    from pathlib import Path

    from safetensors.torch import save as to_bytes


    meta = metadata(model)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, to_bytes(state, metadata={"vitslim": json.dumps(meta)}))  # never half a file


def load(path: str | os.PathLike) -> nn.Module:
    """A model written by save(), rebuilt (sliced shapes, token method) and in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file


    if not os.path.isfile(path):
        raise VitslimError(f"{path} not found: write one with vitslim.export.save(slim(model), path) or "
                           "`vitslim export CHECKPOINT --out PATH`")
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            header = (f.metadata() or {}).get("vitslim")
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise VitslimError(f"cannot read {path} as safetensors ({exc}): is the file complete?") from None
    if header is None:
        raise VitslimError(f"{path} has no vitslim metadata: it was not written by vitslim.export.save")
    meta = json.loads(header)
    model = build_from_spec(meta["spec"])
    for blk, (head_dim, hidden) in zip(model.blocks, meta["channels"]):
        resize_block(blk, head_dim, hidden)
    model.vitslim_channels = meta["channels"]
    if meta.get("method"):
        patch(model, meta["method"], prop_attn=meta.get("prop_attn"), **meta["options"])
        model.vitslim_config["macs_target"] = meta.get("macs_target")
    load_state_strict(model, load_file(os.fspath(path)))
    return model.eval()
