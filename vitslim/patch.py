"""patch()/unpatch(): run a timm VisionTransformer's blocks with a TokenState and method reducers.

The model's class is swapped for a subclass whose forward carries a ``TokenState`` through the
blocks (ToMe's convention), and the method's reducers are attached as ``model.vitslim_reducers``.
The blocks themselves are not modified: the spine runs their own submodules (norm1, attn.qkv,
q/k norm, ls1, drop_path1, norm2, mlp, ls2, drop_path2) through a ``vitslim.kernels.BlockKernel``
(timm's fused computation unless a reducer asks for another), so LayerScale, q/k norm, drop-path
and fused attention (proportional attention as an additive ``attn_mask``) are kept. ``unpatch``
restores the class and removes the reducers, so the model is exactly the original again. This
module names no method: methods reach it only through the hooks of ``vitslim.methods.base``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vitslim.budget import search_level
from vitslim.errors import VitslimError
from vitslim.families import VIT, Family, family_of, unwrap
from vitslim.kernels import DEFAULT_KERNEL
from vitslim.measure.macs import count_macs, default_input_size
from vitslim.methods.base import AttnInfo, Reducer, get_method, methods
from vitslim.tokens import TokenState, init_source

_PATCHED_CLASSES: dict[type, type] = {}


def check_input(model: nn.Module, images: Tensor) -> None:
    """Raise a VitslimError if the images cannot go through the model's (or the wrapped model's) patch embedding."""
    model = unwrap(model)
    family_of(model).check_input(model, images)


def block_forward(blk: nn.Module, state: TokenState, reducer: Reducer | None, ckpt: bool = False,
                  family: Family = VIT, index: int = 0) -> TokenState:
    """Block number ``index`` of a model of ``family`` on a TokenState, with the reducer's hooks and the
    kernel it (or the state) asks for."""
    state.block_source = None
    if reducer is not None:
        state = reducer.before_block(state)
    bias = state.attn_bias()
    kernel = (reducer.block_kernel(state) if reducer is not None else None) or state.kernel or DEFAULT_KERNEL
    want_qk = reducer is not None
    positions = family.block_positions(state, index)
    if state.trace is not None:
        state.trace.append((state.x.shape[1], -1))
    if ckpt:
        state.x, qk = checkpoint(family.attn_residual, blk, state.x, positions, state.num_prefix, bias, kernel,
                                 want_qk, use_reentrant=False)
    else:
        state.x, qk = family.attn_residual(blk, state.x, positions, state.num_prefix, bias, kernel, want_qk)
    if reducer is not None:
        state = reducer.after_attn(state, AttnInfo(qk[0], qk[1], blk.attn.scale, bias))
    if state.trace is not None:
        state.trace[-1] = (state.trace[-1][0], state.x.shape[1])
    if ckpt:
        state.x = checkpoint(family.mlp_residual, blk, state.x, kernel, use_reentrant=False)
    else:
        state.x = family.mlp_residual(blk, state.x, kernel)
    if reducer is not None:
        state = reducer.after_block(state)
    return state


class VitslimMixin:
    """Forward methods of a patched VisionTransformer (mixed in front of the model's class)."""

    def forward_tokens(self, x: Tensor, *, trace_source: bool = False, trace: bool = False,
                       attn_mask: Tensor | None = None,
                       on_block: Callable[[int, TokenState], None] | None = None) -> TokenState:
        """Embed and run every block; the returned state's ``x`` is after the final norm.

        ``on_block(i, state)`` is called after block ``i`` (e.g. to read intermediate features).
        """
        cfg = self.vitslim_config
        family = cfg["family"]
        family.check_input(self, x)
        if attn_mask is not None:
            raise VitslimError("attn_mask is not supported on a patched model: unpatch it first")
        x, grid, rope = family.embed(self, x)
        p = family.num_prefix(self)
        state = TokenState(x=x, num_prefix=p, grid0=grid or (1, x.shape[1] - p), grid=grid,
                           prop_attn=cfg["prop_attn"], trace=[] if trace else None, rope=rope)
        if trace_source or family.traces_source(self):
            state.source = init_source(x.shape[0], state.grid0, p, x.device)
        ckpt = getattr(self, "grad_checkpointing", False) and torch.is_grad_enabled()
        for i, (blk, reducer) in enumerate(zip(self._vitslim_blocks, self._vitslim_plan)):
            state = block_forward(blk, state, reducer, ckpt, family, i)
            if on_block is not None:
                on_block(i, state)
            state = family.after_block(self, state, i)
        state.x = self.norm(state.x)
        for reducer in self.vitslim_reducers.values():
            state = reducer.after_model(state)
        return state

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """Tokens after the final norm (fewer than the dense model's when a method reduces)."""
        return self.forward_tokens(x, attn_mask=attn_mask).x

    def forward_head_state(self, state: TokenState, pre_logits: bool = False) -> Tensor:
        """The classifier head on a state: average pooling is weighted by token size."""
        return self.vitslim_config["family"].head(self, state, pre_logits)

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
    del model._vitslim_blocks
    return model


def _attach(model: nn.Module, family: Family, method_name: str, options: dict[str, Any],
            prop_attn: bool | None, init_seed: int = 0) -> nn.Module:
    method_cls = get_method(method_name)
    # The method's new modules (selectors, slimming matrices) start from ``init_seed``, not from wherever the
    # caller's RNG happens to be (a MACs budget search attaches a varying number of times), so one
    # seed gives one starting model in every run and process; the caller's RNG stream is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        method = method_cls(model, **options)
        original = model.vitslim_config["original_class"] if is_patched(model) else type(model)
        unpatch(model)
        reducers = method.reducers()
    model.vitslim_reducers = nn.ModuleDict({str(i): r for i, r in sorted(reducers.items())})
    model.vitslim_reducers.train(model.training)  # patching an eval model must not leave training-mode reducers
    model._vitslim_blocks = family.blocks(model)  # a plain list: not registered, the state dict is unchanged
    model._vitslim_plan = [reducers.get(i) for i in range(len(model._vitslim_blocks))]
    model.vitslim_config = {
        "method": method_name,
        "options": method.options,
        "prop_attn": method_cls.prop_attn_default if prop_attn is None else bool(prop_attn),
        "macs_target": None,
        "original_class": original,
        "family": family,
    }
    model.__class__ = _patched_class(original)
    return model


def patch(model: nn.Module, method: str, *, macs: float | None = None, prop_attn: bool | None = None,
          init_seed: int = 0, **options: Any) -> nn.Module:
    """Patch a timm ViT in place with a compression method; ``macs=f`` picks the schedule for f x dense MACs.

    ``init_seed`` initialises the method's new trainable modules (SPViT's selectors, SiT's slimming matrices):
    the same seed gives the same patched model whatever the global RNG holds, which it leaves untouched.
    """
    family = family_of(model)  # a patched model still is its original class, blocks untouched
    check_runs_on(get_method(method), family)
    options = get_method(method).prepare(model, dict(options))
    if macs is None:
        return _attach(model, family, method, options, prop_attn, init_seed)
    target, level = _macs_level(model, family, method, macs, options, prop_attn)
    _attach(model, family, method, get_method(method).options_for_level(model, level, **options), prop_attn, init_seed)
    model.vitslim_config["macs_target"] = target
    return model


def macs_level(model: nn.Module, method: str, macs: float, **options: Any) -> int:
    """The budget level whose MACs are closest to ``macs`` x the dense model's (``model`` is left unpatched);
    a first guess for budgets that are timed (``vitslim.measure.fit_speedup``)."""
    family = family_of(model)
    check_runs_on(get_method(method), family)
    try:
        return _macs_level(model, family, method, macs, get_method(method).prepare(model, dict(options)), None)[1]
    finally:
        unpatch(model)


def _macs_level(model: nn.Module, family: Family, method: str, macs: Any, options: dict[str, Any],
                prop_attn: bool | None) -> tuple[float, int]:
    """(the checked target, the level of the one budget search over MACs); the model is left unpatched or
    patched at some level it tried."""
    try:
        target = float(macs)
    except (TypeError, ValueError):
        raise VitslimError(f"macs must be a fraction in (0, 1], got {macs!r}") from None
    if not 0.0 < target <= 1.0:
        raise VitslimError(f"macs={macs} is out of range: give a fraction of the dense MACs in (0, 1]")
    method_cls = get_method(method)
    method_cls(model, **method_cls.options_for_level(model, 0, **options))  # bad options fail before any change
    unpatch(model)
    dense = count_macs(model)

    def ratio(level: int) -> float:
        level_options = method_cls.options_for_level(model, level, **options)
        macs_level = method_cls.level_macs(model, level_options, dense)  # a formula, where the method has one
        if macs_level is None:
            _attach(model, family, method, level_options, prop_attn)
            macs_level = count_macs(model)
        return macs_level / dense

    try:
        return target, search_level(ratio, target, method_cls.max_level(model, **options), what=method,
                                    knob="macs", unit=" of the dense MACs")
    except VitslimError:
        unpatch(model)
        raise


def check_runs_on(method_cls: type, family: Family) -> None:
    """Raise a one-line VitslimError if the method does not run on models of this family."""
    if not method_cls.runs_on(family.name):
        others = sorted(m for m in methods() if get_method(m).runs_on(family.name))
        raise VitslimError(f"{method_cls.name} does not run on {family.name} models ({family.supported}) yet; "
                           f"methods that do: {', '.join(others)}")


def strip_training_modules(model: nn.Module) -> nn.Module:
    """Re-patch with the method's inference options, keeping every weight the smaller model still has."""
    if not is_patched(model):
        return model
    cfg = model.vitslim_config
    options = get_method(cfg["method"]).inference_options(cfg["options"])
    if options == cfg["options"]:
        return model
    state, macs_target = model.state_dict(), cfg["macs_target"]
    _attach(model, cfg["family"], cfg["method"], options, cfg["prop_attn"])
    model.vitslim_config["macs_target"] = macs_target
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in state.items() if k in own})  # strict: nothing the model needs is lost
    return model


def describe(model: nn.Module, input_size: tuple[int, int, int] | None = None) -> dict[str, Any]:
    """Method, options and tokens per block (into attention, into MLP) of a (patched) model."""
    input_size = input_size or default_input_size(model)
    if not is_patched(model):
        family = family_of(model)
        p = family.num_prefix(model)
        return {"method": "dense", "options": {}, "macs_target": None,
                "tokens": [(p + n, p + n) for n in family.stage_patches(model)], "plan": {}}
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            state = model.forward_tokens(torch.zeros(1, *input_size), trace=True)
    finally:
        model.train(was_training)
    cfg = model.vitslim_config
    plan = {int(i): r.plan() for i, r in model.vitslim_reducers.items() if r.plan()}
    return {"method": cfg["method"], "options": cfg["options"], "macs_target": cfg["macs_target"],
            "prop_attn": cfg["prop_attn"], "tokens": state.trace, "plan": plan}
