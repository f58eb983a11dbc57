"""MACs (multiply-accumulates; the literature's "GFLOPs") of what a model really runs.

Counted with torch's FlopCounterMode (which reports 2 x MACs) plus two formulas it lacks:
- the CPU fused-attention kernel (``_scaled_dot_product_flash_attention_for_cpu``), which it
  would count as zero, so attention is counted even when timm uses SDPA;
- scatter-add / index-add (token merges): one MAC per element added.
Matmuls of the reducers (ToMe matching, CLS-attention rows, fusion) are counted like any other.
Gathers only move data and count zero. LayerNorm, GELU, softmax and adds are not counted, as is
conventional (DeiT-S = 4.60 G).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from vitslim.errors import VitslimError
from vitslim.families import family_of, unwrap


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _scatter_flops(self_shape, dim, index_shape, src_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    return 2 * math.prod(src_shape)


def _index_add_flops(self_shape, dim, index_shape, src_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    return 2 * math.prod(src_shape)


_EXTRA_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
    torch.ops.aten.scatter_add: _scatter_flops,
    torch.ops.aten.scatter_add_: _scatter_flops,
    torch.ops.aten.index_add: _index_add_flops,
    torch.ops.aten.index_add_: _index_add_flops,
}


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """The (C, H, W) input the model (or the model inside a ``ModelWrapper``) was built for."""
    model = unwrap(model)
    return family_of(model).input_size(model)


def count_macs(model: nn.Module, input_size: tuple[int, int, int] | None = None, *,
               batch_size: int = 1, by_op: bool = False) -> int | dict[str, int]:
    """MACs per image of one forward pass (eval mode); ``by_op`` gives the split by operator."""
    input_size = tuple(input_size or default_input_size(model))
    was_training = model.training
    # FlopCounterMode's module tracker fails on a view of a grad-requiring parameter passed inside a
    # tuple (PiT's stages take (tokens, class token)): count with gradients off on the parameters
    needs_grad = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    try:
        for p in needs_grad:
            p.requires_grad_(False)
        with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
            model(torch.zeros(batch_size, *input_size))
    finally:
        for p in needs_grad:
            p.requires_grad_(True)
        model.train(was_training)
    if by_op:
        counts = counter.get_flop_counts()["Global"]
        return {str(op).split(".")[-1]: int(v) // (2 * batch_size) for op, v in counts.items()}
    return counter.get_total_flops() // (2 * batch_size)


def _linear_macs(module: nn.Module) -> int:
    """MACs per token of every Linear inside a module (qkv + proj; fc1 + fc2, or SwiGLU's three)."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def analytic_macs(model: nn.Module, tokens: list[tuple[int, int]] | None = None, *, blocks_only: bool = False) -> int:
    """Per-image MACs from the per-block formula, for tokens (into attention, into MLP) per block.

    Block: Na x (the attention's Linear layers: qkv C*3A + proj A*C) + attention 2*Na^2*A
    + Nm x (the MLP's Linear layers: 2*C*hidden, or SwiGLU's three) (A = attention width);
    plus the patch embedding and the classifier unless ``blocks_only``.
    Reducer work is not included: this is the cost of the dense blocks on those token counts.
    """
    family = family_of(model)
    p = family.num_prefix(model)
    tokens = tokens or [(p + n, p + n) for n in family.stage_patches(model)]
    total = 0
    for blk, (n_attn, n_mlp) in zip(family.blocks(model), tokens):
        width = blk.attn.num_heads * blk.attn.head_dim
        total += n_attn * _linear_macs(blk.attn) + 2 * n_attn * n_attn * width + n_mlp * _linear_macs(blk.mlp)
    if blocks_only:
        return total
    pe, dim = model.patch_embed, model.embed_dim
    if not hasattr(pe, "proj"):
        raise VitslimError(f"analytic_macs counts the blocks only (blocks_only=True) on {family.name} models")
    total += pe.num_patches * pe.proj.in_channels * math.prod(pe.patch_size) * dim
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        total += head.in_features * head.out_features
    head_dist = getattr(model, "head_dist", None)
    if isinstance(head_dist, nn.Linear):
        total += head_dist.in_features * head_dist.out_features
    return total
