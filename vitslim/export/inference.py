"""Deployable models: the inference form of a patched model, compiled or in lower precision.

``deployable(model)`` is what every deployment path starts from: an eval copy without the
method's training-only modules (SiT's reverse modules) and with CDCP/CAIT channel masks sliced
into smaller layers (``vitslim.export.slim``), so nothing in its forward depends on data (static
token and channel counts for a given input size). ``vitslim.export.runtime`` runs it one way:

- backends: ``eager`` (PyTorch as is), ``compile`` (``torch.compile``, batch size dynamic: one
  graph for every batch >= 2; dynamo specialises size-1 dimensions, so batch 1 compiles one graph
  of its own, once) and ``onnxruntime`` (``vitslim.export.to_onnx``, then an onnxruntime session);
- precisions: ``fp32``; ``bf16`` (weights and activations in bfloat16, eager or compiled);
  ``int8`` (dynamic int8 quantisation of every Linear, ``torch.ao``, eager only; for onnxruntime
  ``to_onnx(precision="int8")`` quantises the ONNX graph instead).
"""
from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from vitslim.errors import VitslimError
from vitslim.export.channels import CHANNEL_METHODS, slim
from vitslim.patch import is_patched, strip_training_modules

BACKENDS = ("eager", "compile", "onnxruntime")
PRECISIONS = ("fp32", "bf16", "int8")


def deployable(model: nn.Module) -> nn.Module:
    """An eval copy of ``model`` as it deploys: training-only modules left out, channel masks sliced."""
    if is_patched(model) and model.vitslim_config["method"] in CHANNEL_METHODS:
        return slim(model)  # slim copies, and its sliced model has no training-only modules
    was_training = model.training
    model.eval()  # the copy is made in eval mode; the caller's model gets its own mode back
    try:
        inference = copy.deepcopy(model)
    finally:
        model.train(was_training)
    return strip_training_modules(inference).eval()


def check_runtime(backend: str, precision: str) -> None:
    """Raise a VitslimError naming what works when a backend/precision pair cannot run."""
    if backend not in BACKENDS:
        raise VitslimError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if precision not in PRECISIONS:
        raise VitslimError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "int8" and backend == "compile":
        raise VitslimError("int8 (torch.ao dynamic quantisation) runs eager only: use --backend eager, or "
                           "--backend onnxruntime for onnxruntime's own int8")
    if precision == "bf16" and backend == "onnxruntime":
        raise VitslimError("vitslim does not export bf16 ONNX graphs: use --precision fp32 or int8 with "
                           "onnxruntime, or bf16 with eager/compile")


def quantize_int8(model: nn.Module) -> nn.Module:
    """Every nn.Linear of ``model`` (in place) as a dynamically quantised int8 Linear (torch.ao)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch.ao.quantization warns that it moves to torchao; it still works
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)


# Dynamo keeps graphs per code object, so every model compiled in one process (each vitslim model, each
# ideal) adds its graphs to the same forward; past the default limit of 8 the later models would run
# eager, with only a log line. Raised so a process can compile a few dozen models (a comparison table).
RECOMPILE_LIMIT = 64
ACCUMULATED_RECOMPILE_LIMIT = 1024


def compile_model(model: nn.Module, *, dynamic: bool = True, **compile_options: Any) -> nn.Module:
    """``torch.compile`` of ``model`` with the batch size dynamic (one graph for every batch >= 2)."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, ACCUMULATED_RECOMPILE_LIMIT)
    return torch.compile(model, dynamic=dynamic, **compile_options)
