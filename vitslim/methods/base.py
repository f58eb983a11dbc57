"""The method interface: ``Method`` (typed options in, reducers out), ``Reducer`` (the hooks), the registry.

A method turns options into one ``Reducer`` per block it acts on. A reducer may act at four points
(see ``vitslim.patch``): ``before_block(state)``, ``after_attn(state, attn)``, ``after_block(state)``
and, once per forward, ``after_model(state)`` after the final norm. It may change how its block
computes attention or the MLP by returning a ``vitslim.kernels.BlockKernel`` from ``block_kernel``.
Everything the training engine, the exporter or the CLI asks of a method is a documented method on
these base classes with a default: parameter groups (``param_options``), training progress
(``set_progress``), the plan as data (``plan``), the teacher (``Method.needs_teacher``), the
deployable options (``Method.inference_options``), data-dependent preparation (``Method.prepare``)
and budget levels (``Method.max_level`` / ``Method.options_for_level``) for ``patch(..., macs=f)``.
Options are a dataclass per method (``MethodOptions``): defaults, validation and the source of
each paper constant live there.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import typing
from typing import Any, ClassVar, Iterator, NamedTuple

import torch
from torch import Tensor, nn

from vitslim.budget import LEVEL_STEP
from vitslim.errors import VitslimError
from vitslim.families import family_of
from vitslim.kernels import BlockKernel
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
    def key_sum(self):
        """Keys summed over heads, (B, N, head_dim): ``keys`` times the head count, one op cheaper
        (no transpose, no divide) for metrics that are normalised anyway."""
        return self._k.sum(1)

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


class ParamOptions(NamedTuple):
    """How the training engine optimises some of a reducer's parameters (see ``Reducer.param_options``)."""

    lr_scale: float | None = None  # None: the engine's method_lr_scale
    weight_decay: str = "default"  # "default": on >= 2-D weights only; "all": every parameter; "none"


class Reducer(nn.Module):
    """Acts on the token state at fixed points of one block; every hook's default does nothing."""

    def block_kernel(self, state: TokenState) -> BlockKernel | None:
        """How this block computes attention and MLP; None (default): the state's kernel, else timm's."""
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

    def param_options(self) -> dict[str, ParamOptions]:
        """Optimiser settings by parameter-name prefix relative to this reducer ("" = all); {} = defaults."""
        return {}

    def set_progress(self, step: int, total_steps: int) -> None:
        """Told by the training engine before each step (e.g. to ramp a sparsity schedule); default: nothing."""

    def plan(self) -> dict[str, Any]:
        """This block's plan as plain data for reports and export (e.g. which patches merge); {} = none."""
        return {}


class MethodOptions:
    """Base of the options dataclass every method declares: build from keywords, validate, plain dict.

    Subclasses are ``@dataclasses.dataclass``; each field's default is the paper's (the field's
    ``metadata["source"]`` says where it comes from) or ours (then it says why). Fields with
    ``metadata={"internal": True}`` are inputs that do not belong in the recorded options.
    """

    @classmethod
    def from_options(cls, method: str, options: dict[str, Any]) -> "MethodOptions":
        """The options object for keyword options; unknown keys raise a VitslimError naming the known ones."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise VitslimError(f"unknown {method} options {unknown}; {method} takes {', '.join(names)} "
                               "(and macs=, prop_attn=)")
        return cls(**options)

    def resolved(self, model: nn.Module) -> "MethodOptions":
        """Validated options with the model-dependent defaults filled in; raise VitslimError on bad values."""
        return self

    def to_dict(self) -> dict[str, Any]:
        """The recorded options (checkpoints, describe, reports): every field but the internal ones."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get("internal")}

    @classmethod
    def parse_value(cls, key: str, text: str) -> Any:
        """A command-line value for field ``key``, read by the field's declared type."""
        hints = typing.get_type_hints(cls)
        kind = hints.get(key)
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise VitslimError(f"option {key} takes true or false, got {text!r}")
        if kind is str:
            return text
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text  # e.g. a file path or a schedule string: the field's validation decides
        if kind in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
            return kind(value)
        return value


@dataclasses.dataclass
class NoOptions(MethodOptions):
    """The options of a method that takes none."""


class Method:
    """A compression method: typed options in, per-block reducers out."""

    name: ClassVar[str]
    Options: ClassVar[type[MethodOptions]] = NoOptions
    prop_attn_default: ClassVar[bool] = False

    def __init__(self, model: nn.Module, **options: Any):
        self.model = model
        self.config = self.Options.from_options(self.name, options).resolved(model)
        self.options = self.config.to_dict()

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

    @classmethod
    def needs_teacher(cls, options: dict[str, Any]) -> bool:
        """Whether training with these options distils from the dense model (token targets); default no."""
        return False

    @classmethod
    def runs_on(cls, family: str) -> bool:
        """Whether the method runs on models of that family (``vitslim.families``); default: timm ViTs only.

        A method that says yes to a rotary family (``eva``) keeps ``TokenState.pos`` right for every
        token it makes (the token ops of ``vitslim.tokens`` do) and needs no custom ``BlockKernel``.
        """
        return family == "vit"


class KeepRateLevels:
    """Budget levels for methods whose knob is a ``keep_rate``: 1.0, 0.995, 0.99, ... (mixed into a Method).

    Steps of ``vitslim.budget.LEVEL_STEP`` are fine enough for ``macs=`` to land within 2% of a target.
    """

    @classmethod
    def max_level(cls, model: nn.Module, **options: Any) -> int:
        """Levels down to keep_rate = LEVEL_STEP."""
        return round(1.0 / LEVEL_STEP) - 1

    @classmethod
    def options_for_level(cls, model: nn.Module, level: int, **options: Any) -> dict[str, Any]:
        """keep_rate = 1 - level * LEVEL_STEP (a given keep_rate conflicts with macs=)."""
        if "keep_rate" in options:
            raise VitslimError(f"give {cls.name} either keep_rate or macs=, not both")
        return {"keep_rate": round(1.0 - level * LEVEL_STEP, 6), **options}


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


def check_locations(locations: Any, depth: int) -> list[int]:
    """Validate block indices (0-based) for a model of ``depth`` blocks."""
    try:
        locs = sorted({int(i) for i in locations})
    except (TypeError, ValueError):
        raise VitslimError(f"locations must be block indices, got {locations!r}") from None
    if not locs or locs[0] < 0 or locs[-1] >= depth:
        raise VitslimError(f"locations {locations!r} out of range: blocks are 0..{depth - 1}")
    return locs


def resolve_locations(method: str, locations: Any, model: nn.Module, between_blocks: bool = False) -> list[int]:
    """The blocks a method acts at: the model family's default points (ViT: the quarter points), or validated indices.

    ``between_blocks``: the method acts before its block, so block 0 (the raw patch embeddings) is refused.
    """
    family = family_of(model)
    depth = len(family.blocks(model))
    locs = family.reduction_points(model, between_blocks) if locations is None else check_locations(locations, depth)
    if between_blocks and locs[0] == 0:
        raise VitslimError(f"{method} acts between blocks: locations must be >= 1 (before block 0 it would see "
                           "the raw patch embeddings)")
    return locs
