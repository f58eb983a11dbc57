"""patch()/unpatch(): run a timm VisionTransformer's blocks with a TokenState and method reducers.

The model's class is swapped for a subclass whose forward carries a ``TokenState`` through the
blocks (ToMe's convention), and the method's reducers are attached as ``model.vitslim_reducers``.
The blocks themselves are not modified: the spine runs their own submodules (norm1, attn.qkv,
q/k norm, ls1, drop_path1, norm2, mlp, ls2, drop_path2), so LayerScale, q/k norm, drop-path and
fused attention (proportional attention as an additive ``attn_mask``) are kept. ``unpatch``
restores the class and removes the reducers, so the model is exactly the original again.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vitslim import _compat  # noqa: F401
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from vitslim.errors import VitslimError
from vitslim.methods import AttnInfo, ChannelPlan, Reducer, get_method
from vitslim.tokens import TokenState, init_source

SUPPORTED = (
    "timm VisionTransformer models with the standard Block and Attention: ViT/DeiT (incl. "
    "distilled DeiT), DeiT-III (LayerScale), ViT with registers, q/k-norm ViTs, token or avg pooling"
)
_PATCHED_CLASSES: dict[type, type] = {}


def check_supported(model: nn.Module) -> None:
    """Raise a VitslimError unless the model is a ViT whose blocks the spine can run."""
    if not isinstance(model, VisionTransformer):
        raise VitslimError(f"{type(model).__name__} is not supported; vitslim supports {SUPPORTED}")
    for i, blk in enumerate(model.blocks):
        attn = getattr(blk, "attn", None)
        if type(blk) is not Block or type(attn) is not Attention:
            raise VitslimError(f"block {i} is a {type(blk).__name__}; vitslim supports {SUPPORTED}")


def check_input(model: nn.Module, images: Tensor) -> None:
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
    if (h, w) != tuple(pe.img_size):
        raise VitslimError(
            f"this model takes {pe.img_size[0]}x{pe.img_size[1]} images, got {h}x{w}: resize the "
            "input, or create the model with dynamic_img_size=True"
        )


POLICY_EPS = 1e-6  # SPViT/DynamicViT's masked softmax: (e_ij + eps/N) / (sum_k e_ik + eps)


def _policy_attention(logits: Tensor, policy: Tensor) -> Tensor:
    """Softmax with masked keys as a product (so gradients reach the keep decisions); the diagonal is kept."""
    n = logits.shape[-1]
    keep = policy[:, None, None, :].to(logits.dtype)
    eye = torch.eye(n, dtype=logits.dtype, device=logits.device)
    keep = keep + (1.0 - keep) * eye  # a masked token still attends to itself
    e = (logits - logits.amax(dim=-1, keepdim=True)).exp() * keep
    return (e + POLICY_EPS / n) / (e.sum(dim=-1, keepdim=True) + POLICY_EPS)


def _qkv(attn: Attention, x: Tensor, channels: ChannelPlan | None) -> Tensor:
    """attn.qkv(x) as (3, B, H, N, d'): all channels, masked ones (training) or only the kept rows (sliced)."""
    batch, n, _ = x.shape
    if channels is not None and channels.qkv_index is not None:
        w, b = attn.qkv.weight.index_select(0, channels.qkv_index), attn.qkv.bias
        qkv = F.linear(x, w, None if b is None else b.index_select(0, channels.qkv_index))
        return qkv.reshape(batch, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    qkv = attn.qkv(x)
    if channels is not None and channels.qkv_mask is not None:
        qkv = qkv * channels.qkv_mask
    return qkv.reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)


def _attention(attn: Attention, x: Tensor, bias: Tensor | None, want_info: bool, policy: Tensor | None = None,
               channels: ChannelPlan | None = None):
    """timm Attention's forward with an additive bias, optionally exposing q and k.

    With a training ``policy`` (B, N) the attention is explicit and multiplicatively masked, as in
    SPViT and DynamicViT: an additive -inf mask would stop the gradient to the keep decisions.
    A ``channels`` plan (CDCP) masks the qkv outputs or computes only the kept ones; the softmax
    scale stays ``attn.scale`` (the unpruned head dim's, which the weights were trained with).
    """
    batch, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = _qkv(attn, x, channels).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if policy is not None:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        out = attn.attn_drop(_policy_attention(logits, policy)) @ v
    elif attn.fused_attn:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0,
            scale=attn.scale,
        )
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        out = attn.attn_drop(logits.softmax(dim=-1)) @ v
    out = attn.norm(out.transpose(1, 2).reshape(batch, n, -1))
    if gate is not None:
        out = out * gate
    if channels is not None and channels.v_index is not None:
        out = F.linear(out, attn.proj.weight.index_select(1, channels.v_index), attn.proj.bias)
    else:
        out = attn.proj(out)
    return attn.proj_drop(out), (q, k) if want_info else None


def _attn_residual(blk: Block, x: Tensor, bias: Tensor | None, want_info: bool, policy: Tensor | None = None,
                   channels: ChannelPlan | None = None):
    out, qk = _attention(blk.attn, blk.norm1(x), bias, want_info, policy, channels)
    return x + blk.drop_path1(blk.ls1(out)), qk


def _mlp(mlp: nn.Module, x: Tensor, channels: ChannelPlan) -> Tensor:
    """timm Mlp's forward on the kept hidden channels only (sliced) or with the hidden mask (training)."""
    idx = channels.mlp_index
    if idx is not None:
        b = mlp.fc1.bias
        h = F.linear(x, mlp.fc1.weight.index_select(0, idx), None if b is None else b.index_select(0, idx))
    else:
        h = mlp.fc1(x)
    h = mlp.act(h)
    if channels.mlp_mask is not None:
        h = h * channels.mlp_mask
    h = mlp.norm(mlp.drop1(h))
    h = mlp.fc2(h) if idx is None else F.linear(h, mlp.fc2.weight.index_select(1, idx), mlp.fc2.bias)
    return mlp.drop2(h)


def _mlp_residual(blk: Block, x: Tensor, channels: ChannelPlan | None = None) -> Tensor:
    if channels is None or (channels.mlp_mask is None and channels.mlp_index is None):
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return x + blk.drop_path2(blk.ls2(_mlp(blk.mlp, blk.norm2(x), channels)))


def block_forward(blk: Block, state: TokenState, reducer: Reducer | None, ckpt: bool = False) -> TokenState:
    """One timm Block on a TokenState, with the reducer's hooks (and its channel plan, if any)."""
    if reducer is not None:
        state = reducer.before_block(state)
    bias = state.attn_bias()
    channels = reducer.channel_plan() if reducer is not None else None
    if state.trace is not None:
        state.trace.append((state.x.shape[1], -1))
    if ckpt:
        state.x, qk = checkpoint(_attn_residual, blk, state.x, bias, reducer is not None, state.policy, channels,
                                 use_reentrant=False)
    else:
        state.x, qk = _attn_residual(blk, state.x, bias, reducer is not None, state.policy, channels)
    if reducer is not None:
        state = reducer.after_attn(state, AttnInfo(qk[0], qk[1], blk.attn.scale, bias))
    if state.trace is not None:
        state.trace[-1] = (state.trace[-1][0], state.x.shape[1])
    if ckpt:
        state.x = checkpoint(_mlp_residual, blk, state.x, channels, use_reentrant=False)
    else:
        state.x = _mlp_residual(blk, state.x, channels)
    if reducer is not None:
        state = reducer.after_block(state)
    return state


class VitslimMixin:
    """Forward methods of a patched VisionTransformer (mixed in front of the model's class)."""

    def forward_tokens(self, x: Tensor, *, trace_source: bool = False, trace: bool = False,
                       attn_mask: Tensor | None = None) -> TokenState:
        """Embed and run every block; the returned state's ``x`` is after the final norm."""
        check_input(self, x)
        if attn_mask is not None:
            raise VitslimError("attn_mask is not supported on a patched model: unpatch it first")
        cfg = self.vitslim_config
        x = self.patch_embed(x)
        grid = tuple(x.shape[1:3]) if x.dim() == 4 else tuple(self.patch_embed.grid_size)
        x = self.norm_pre(self.patch_drop(self._pos_embed(x)))
        p = self.num_prefix_tokens
        if x.shape[1] != p + grid[0] * grid[1]:  # patch dropout: tokens no longer form the grid
            grid = None
        state = TokenState(x=x, num_prefix=p, grid0=grid or (1, x.shape[1] - p), grid=grid,
                           prop_attn=cfg["prop_attn"], trace=[] if trace else None)
        if trace_source:
            state.source = init_source(x.shape[0], state.grid0, p, x.device)
        ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for blk, reducer in zip(self.blocks, self._vitslim_plan):
            state = block_forward(blk, state, reducer, ckpt)
        state.x = self.norm(state.x)
        for reducer in self.vitslim_reducers.values():
            state = reducer.after_model(state)
        return state

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """Tokens after the final norm (fewer than the dense model's when a method reduces)."""
        return self.forward_tokens(x, attn_mask=attn_mask).x

    def forward_head_state(self, state: TokenState, pre_logits: bool = False) -> Tensor:
        """The classifier head on a state: average pooling is weighted by token size."""
        pool = self.global_pool
        if self.attn_pool is not None or pool == "token" or not pool or state.size is None:
            return self.forward_head(state.x, pre_logits=pre_logits)
        start = 0 if self.pool_include_prefix else self.num_prefix_tokens
        x, w = state.x[:, start:], state.size[:, start:, None].to(state.x.dtype)
        if pool == "max":
            pooled = x.amax(1)
        else:
            pooled = (x * w).sum(1) / w.sum(1)
            if pool == "avgmax":
                pooled = 0.5 * (x.amax(1) + pooled)
        pooled = self.head_drop(self.fc_norm(pooled))
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """Logits, like the original model's forward."""
        return self.forward_head_state(self.forward_tokens(x, attn_mask=attn_mask))

    def forward_intermediates(self, *args: Any, **kwargs: Any):
        """Not available on a patched model: use ``forward_tokens(trace_source=True)`` + ``unmerge``."""
        raise VitslimError(
            "forward_intermediates is not supported on a patched model: use "
            "model.forward_tokens(x, trace_source=True) and vitslim.unmerge_grid(state)"
        )


def _patched_class(cls: type) -> type:
    if cls not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[cls] = type(f"Vitslim{cls.__name__}", (VitslimMixin, cls), {})
    return _PATCHED_CLASSES[cls]


def is_patched(model: nn.Module) -> bool:
    """True if ``model`` was patched by vitslim."""
    return hasattr(model, "vitslim_config")


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the original model class and remove the method's modules (in place)."""
    if not is_patched(model):
        return model
    model.__class__ = model.vitslim_config["original_class"]
    del model.vitslim_reducers
    del model.vitslim_config
    del model._vitslim_plan
    return model


def _attach(model: nn.Module, method_name: str, options: dict[str, Any], prop_attn: bool | None) -> nn.Module:
    method_cls = get_method(method_name)
    method = method_cls(model, **options)
    original = model.vitslim_config["original_class"] if is_patched(model) else type(model)
    unpatch(model)
    reducers = method.reducers()
    model.vitslim_reducers = nn.ModuleDict({str(i): r for i, r in sorted(reducers.items())})
    model._vitslim_plan = [reducers.get(i) for i in range(len(model.blocks))]
    model.vitslim_config = {
        "method": method_name,
        "options": method.options,
        "prop_attn": method_cls.prop_attn_default if prop_attn is None else bool(prop_attn),
        "macs_target": None,
        "original_class": original,
    }
    model.__class__ = _patched_class(original)
    return model


def patch(model: nn.Module, method: str, *, macs: float | None = None, prop_attn: bool | None = None,
          **options: Any) -> nn.Module:
    """Patch a timm ViT in place with a compression method; ``macs=f`` picks the schedule for f x dense MACs."""
    check_supported(model)  # a patched model still is its original class, blocks untouched
    options = get_method(method).prepare(model, dict(options))
    if macs is None:
        return _attach(model, method, options, prop_attn)
    from vitslim.measure.macs import count_macs

    try:
        target = float(macs)
    except (TypeError, ValueError):
        raise VitslimError(f"macs must be a fraction in (0, 1], got {macs!r}") from None
    if not 0.0 < target <= 1.0:
        raise VitslimError(f"macs={macs} is out of range: give a fraction of the dense MACs in (0, 1]")
    method_cls = get_method(method)
    base = dict(options)
    method_cls(model, **method_cls.options_for_level(model, 0, **base))  # bad options fail before any change
    unpatch(model)
    dense = count_macs(model)

    ratios: dict[int, float] = {}

    def ratio(level: int) -> float:
        if level not in ratios:
            level_options = method_cls.options_for_level(model, level, **base)
            macs_level = method_cls.level_macs(model, level_options, dense)  # a formula, where the method has one
            if macs_level is None:
                _attach(model, method, level_options, prop_attn)
                macs_level = count_macs(model)
            ratios[level] = macs_level / dense
        return ratios[level]

    lo, hi = 0, method_cls.max_level(model, **base)
    best_ratio = ratio(hi)
    if best_ratio > target * 1.02:
        unpatch(model)
        raise VitslimError(
            f"macs={target} is out of reach for {method}: its strongest setting on this model "
            f"gives {best_ratio:.3f} of the dense MACs; ask for at least {best_ratio:.2f}"
        )
    while hi - lo > 1:  # smallest level whose MACs are at or under the target
        mid = (lo + hi) // 2
        if ratio(mid) > target:
            lo = mid
        else:
            hi = mid
    # pick whichever neighbour lands closer to the target
    r_lo, r_hi = ratio(lo), ratio(hi)
    level = lo if abs(r_lo - target) < abs(r_hi - target) else hi
    _attach(model, method, method_cls.options_for_level(model, level, **base), prop_attn)
    model.vitslim_config["macs_target"] = target
    return model


def strip_training_modules(model: nn.Module) -> nn.Module:
    """Re-patch with the method's inference options, keeping every weight the smaller model still has."""
    if not is_patched(model):
        return model
    cfg = model.vitslim_config
    options = get_method(cfg["method"]).inference_options(cfg["options"])
    if options == cfg["options"]:
        return model
    state, macs_target = model.state_dict(), cfg["macs_target"]
    _attach(model, cfg["method"], options, cfg["prop_attn"])
    model.vitslim_config["macs_target"] = macs_target
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in state.items() if k in own})  # strict: nothing the model needs is lost
    return model


def describe(model: nn.Module, input_size: tuple[int, int, int] | None = None) -> dict[str, Any]:
    """Method, options and tokens per block (into attention, into MLP) of a (patched) model."""
    from vitslim.measure.macs import default_input_size

    input_size = input_size or default_input_size(model)
    if not is_patched(model):
        check_supported(model)
        n = model.num_prefix_tokens + model.patch_embed.num_patches
        return {"method": "dense", "options": {}, "macs_target": None,
                "tokens": [(n, n)] * len(model.blocks)}
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            state = model.forward_tokens(torch.zeros(1, *input_size), trace=True)
    finally:
        model.train(was_training)
    cfg = model.vitslim_config
    return {"method": cfg["method"], "options": cfg["options"], "macs_target": cfg["macs_target"],
            "prop_attn": cfg["prop_attn"], "tokens": state.trace}
