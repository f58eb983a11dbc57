"""Method registry and the reducer interface every method implements.

A method turns options into one ``Reducer`` per block it acts on. A reducer may act at three
points of a block (see ``vitslim.patch``): ``before_block(state)``, ``after_attn(state, attn)`` and
``after_block(state)``; it may also ask for a subset of the block's channels (``channel_plan``).
Methods with a budget knob also describe it as an integer ``level`` so
``patch(..., macs=f)`` can search any of them the same way.
"""
from __future__ import annotations

import importlib
from typing import Any, ClassVar, Iterator, NamedTuple

import torch
from torch import Tensor, nn

from vitslim.errors import VitslimError
from vitslim.tokens import TokenState

_REGISTRY: dict[str, type["Method"]] = {}
_BUILTIN = ("tome", "evit", "topk", "sit", "spvit", "prune_merge", "atme", "cdcp", "cait")


class AttnInfo:
    """What a block's attention exposes to reducers, computed lazily on first use."""

    def __init__(self, q, k, scale: float, bias):
        self._q, self._k, self._scale, self._bias = q, k, scale, bias
        self._keys = self._cls = None

    @property
    def keys(self):
        """Keys averaged over heads, (B, N, head_dim): ToMe's similarity metric."""
        if self._keys is None:
            self._keys = self._k.transpose(1, 2).mean(2)  # (B, N, H, d): the qkv layout, faster
        return self._keys

    @property
    def cls_attn(self):
        """Attention of the CLS query to every token, averaged over heads, (B, N).

        Only the CLS row is computed (one query against N keys), so the block keeps its fused
        attention kernel; the row equals the full softmax's first row exactly.
        """
        if self._cls is None:
            logits = (self._q[:, :, :1] * self._scale) @ self._k.transpose(-2, -1)
            if self._bias is not None:
                logits = logits + self._bias
            self._cls = logits.softmax(dim=-1).mean(1)[:, 0]
        return self._cls


class ChannelPlan(NamedTuple):
    """Channels of one block a reducer asks the spine to keep (CDCP); every field None = all channels.

    Masks multiply (training: straight-through masks, gradients reach the scores); indices compute
    only the kept channels (inference: fewer MACs, and what ``count_macs`` counts).
    """

    qkv_mask: Tensor | None = None  # (3*H*d,) over attn.qkv's outputs, in timm's (3, H, d) layout
    mlp_mask: Tensor | None = None  # (hidden,) multiplied into act(fc1 x)
    qkv_index: Tensor | None = None  # kept rows of attn.qkv, (3, H, d') flattened: equal d' for q, k and v
    v_index: Tensor | None = None  # kept input columns of attn.proj, (H, d') flattened
    mlp_index: Tensor | None = None  # kept fc1 rows = fc2 input columns


class Reducer(nn.Module):
    """Acts on the token state at fixed points of one block; the default does nothing."""

    def channel_plan(self) -> ChannelPlan | None:
        """Channels of this block to keep (see ChannelPlan); None = all (the default)."""
        return None

    def before_block(self, state: TokenState) -> TokenState:
        """Called with the block's input tokens."""
        return state

    def after_attn(self, state: TokenState, attn: AttnInfo) -> TokenState:
        """Called after the attention residual, before the MLP."""
        return state

    def after_block(self, state: TokenState) -> TokenState:
        """Called with the block's output tokens."""
        return state

    def after_model(self, state: TokenState) -> TokenState:
        """Called once after the final norm (e.g. to ask for distillation of the final tokens)."""
        return state


class Method:
    """A compression method: validated options in, per-block reducers out."""

    name: ClassVar[str]
    prop_attn_default: ClassVar[bool] = False

    def __init__(self, model: nn.Module, **options: Any):
        self.model = model
        self.options = self.resolve(model, **options)

    def resolve(self, model: nn.Module, **options: Any) -> dict[str, Any]:
        """Validate the options and fill in defaults; raise VitslimError on bad values."""
        raise NotImplementedError

    def reducers(self) -> dict[int, Reducer]:
        """One reducer per block index the method acts on."""
        raise NotImplementedError

    # Budget search: level 0 = no reduction, higher levels reduce more (monotone in MACs).
    @classmethod
    def max_level(cls, model: nn.Module, **options: Any) -> int:
        """Highest budget level this method offers for the model."""
        raise NotImplementedError

    @classmethod
    def options_for_level(cls, model: nn.Module, level: int, **options: Any) -> dict[str, Any]:
        """Native options (e.g. ToMe's r list) that realise a budget level."""
        raise NotImplementedError

    @classmethod
    def level_macs(cls, model: nn.Module, options: dict[str, Any], dense_macs: int) -> int | None:
        """MACs per image of the model patched with ``options``, if known without building it (None: count them)."""
        return None

    @classmethod
    def prepare(cls, model: nn.Module, options: dict[str, Any]) -> dict[str, Any]:
        """Turn data-dependent options (e.g. ``calibration=``) into plain ones, once per ``patch`` call.

        Runs before the budget search, so a costly calibration pass is not repeated per level.
        """
        return options

    @classmethod
    def inference_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """Options of the deployable model (without training-only modules, e.g. SiT's reverse modules)."""
        return options


class KeepRateLevels:
    """Budget levels for methods whose knob is a ``keep_rate``: 1.0, 0.995, 0.99, ... (mixed into a Method).

    Steps of 0.005 are fine enough for ``macs=`` to land within 2% of a target.
    """

    RATE_STEP: ClassVar[float] = 0.005

    @classmethod
    def max_level(cls, model: nn.Module, **options: Any) -> int:
        """Levels down to keep_rate = RATE_STEP."""
        return round(1.0 / cls.RATE_STEP) - 1

    @classmethod
    def options_for_level(cls, model: nn.Module, level: int, **options: Any) -> dict[str, Any]:
        """keep_rate = 1 - level * RATE_STEP (a given keep_rate conflicts with macs=)."""
        if "keep_rate" in options:
            raise VitslimError(f"give {cls.name} either keep_rate or macs=, not both")
        return {"keep_rate": round(1.0 - level * cls.RATE_STEP, 6), **options}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available to ``vitslim.patch`` by its ``name``."""
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtins() -> None:
    for name in _BUILTIN:
        importlib.import_module(f"vitslim.methods.{name}")


def methods() -> list[str]:
    """Names of the registered methods."""
    _load_builtins()
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    """The method class registered under ``name``."""
    _load_builtins()
    if name not in _REGISTRY:
        raise VitslimError(f"unknown method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def reject_unknown(method: str, extra: dict[str, Any], accepted: str) -> None:
    """Raise for options a method does not take, naming the ones it does."""
    if extra:
        raise VitslimError(
            f"unknown {method} options {sorted(extra)}; {method} takes {accepted} (and macs=, prop_attn=)"
        )


def check_rate(name: str, value: Any) -> float:
    """A keep rate in (0, 1]; 0 or less would remove every token."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise VitslimError(f"{name} must be a number in (0, 1], got {value!r}") from None
    if not 0.0 < value <= 1.0:
        raise VitslimError(
            f"{name}={value} is out of range: use a value in (0, 1] (0 would remove every token)"
        )
    return value


def check_rates(keep_rate: Any, locations: list[int]) -> float | list[float]:
    """One keep rate, or one per location (kept as a list only when they differ), each in (0, 1]."""
    rates = list(keep_rate) if isinstance(keep_rate, (list, tuple)) else [keep_rate] * len(locations)
    if len(rates) != len(locations):
        raise VitslimError(f"{len(rates)} keep rates for {len(locations)} locations {locations}")
    rates = [check_rate("keep_rate", r) for r in rates]
    return rates if len(set(rates)) > 1 else rates[0]


def rates_per_location(keep_rate: float | list[float], locations: list[int]) -> list[float]:
    """The resolved keep_rate option as one rate per location."""
    return keep_rate if isinstance(keep_rate, list) else [keep_rate] * len(locations)


def calibration_batches(calibration: Any, limit: int, batch_size: int = 32) -> Iterator[tuple[Tensor, Tensor | None]]:
    """(images, labels or None) batches from calibration data, at most ``limit`` of them.

    Takes a DataLoader (or any iterable) of (images, labels) or of images, a tensor of images, or an
    (images, labels) pair of tensors; tensors are cut into batches of ``batch_size``.
    """
    if isinstance(calibration, Tensor):
        calibration = [(calibration[i:i + batch_size], None) for i in range(0, len(calibration), batch_size)]
    elif (isinstance(calibration, tuple) and len(calibration) == 2 and isinstance(calibration[0], Tensor)
          and isinstance(calibration[1], Tensor) and len(calibration[0]) == len(calibration[1])):
        images, labels = calibration
        calibration = [(images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    for i, batch in enumerate(calibration):
        if i >= limit:
            return
        if isinstance(batch, Tensor):
            yield batch, None
        elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
            yield batch[0], None if len(batch) < 2 or batch[1] is None else torch.as_tensor(batch[1])
        else:
            raise VitslimError("calibration= takes a DataLoader of (images, labels), a tensor of images or an "
                               f"(images, labels) pair; got batches of type {type(batch).__name__}")


def default_locations(depth: int) -> list[int]:
    """Reduction blocks at a quarter, half and three quarters of the depth (DeiT: 3, 6, 9)."""
    return sorted({max(1, depth // 4), depth // 2, (3 * depth) // 4})


def check_locations(locations: Any, depth: int) -> list[int]:
    """Validate block indices (0-based) for a model of ``depth`` blocks."""
    try:
        locs = sorted({int(i) for i in locations})
    except (TypeError, ValueError):
        raise VitslimError(f"locations must be block indices, got {locations!r}") from None
    if not locs or locs[0] < 0 or locs[-1] >= depth:
        raise VitslimError(f"locations {locations!r} out of range: blocks are 0..{depth - 1}")
    return locs
