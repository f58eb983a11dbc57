"""Block kernels: how a patched block computes its attention and MLP, as small overridable steps.

The spine (``vitslim.patch``) runs a timm ``Block`` through its own submodules so that reducers can
act between them. How the attention and the MLP are computed is a ``BlockKernel``; the default is
exactly timm's (fused ``scaled_dot_product_attention``, additive ``attn_mask`` for proportional
attention). A method that must change the computation inside attention or the MLP (masked
attention while training, computing only some channels) subclasses ``BlockKernel``, overrides the
step it needs and hands its kernel to the spine through ``Reducer.block_kernel`` (one block) or
``TokenState.kernel`` (every later block). Nothing here knows any method.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class BlockKernel:
    """timm's Attention and Mlp forward split into steps; override a step to change how a block computes."""

    def qkv(self, attn: nn.Module, x: Tensor) -> Tensor:
        """Queries, keys and values as (3, B, heads, N, head_dim) from the block's normalised tokens."""
        batch, n, _ = x.shape
        return attn.qkv(x).reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)

    def attend(self, attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        """softmax(q k^T * scale + bias) v per head, (B, heads, N, head_dim): fused when timm's layer is."""
        if attn.fused_attn:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                                  dropout_p=attn.attn_drop.p if attn.training else 0.0,
                                                  scale=attn.scale)
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        return attn.attn_drop(logits.softmax(dim=-1)) @ v

    def project(self, attn: nn.Module, x: Tensor) -> Tensor:
        """The attention's output projection on the heads' concatenated outputs (B, N, width)."""
        return attn.proj(x)

    def mlp(self, mlp: nn.Module, x: Tensor) -> Tensor:
        """The block's MLP on its normalised tokens."""
        return mlp(x)


DEFAULT_KERNEL = BlockKernel()


def attention(attn: nn.Module, x: Tensor, bias: Tensor | None, kernel: BlockKernel,
              want_qk: bool) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """A timm Attention's forward through ``kernel``; also returns (q, k) when a reducer will look at them."""
    batch, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None  # timm's gated attention
    q, k, v = kernel.qkv(attn, x).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = kernel.attend(attn, q, k, v, bias)
    out = attn.norm(out.transpose(1, 2).reshape(batch, n, -1))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(kernel.project(attn, out)), ((q, k) if want_qk else None)


def attn_residual(blk: nn.Module, x: Tensor, bias: Tensor | None, kernel: BlockKernel,
                  want_qk: bool) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """x + drop_path(ls1(attention(norm1(x)))), and (q, k) if asked."""
    out, qk = attention(blk.attn, blk.norm1(x), bias, kernel, want_qk)
    return x + blk.drop_path1(blk.ls1(out)), qk


def mlp_residual(blk: nn.Module, x: Tensor, kernel: BlockKernel) -> Tensor:
    """x + drop_path(ls2(mlp(norm2(x))))."""
    return x + blk.drop_path2(blk.ls2(kernel.mlp(blk.mlp, blk.norm2(x))))
