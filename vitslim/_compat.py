"""Import-time compatibility shims; imported before anything touches timm.

torchvision 0.28.0 on PyPI is a CUDA build. With the CPU torch wheel its C extension cannot load,
and ``import torchvision`` then dies registering fake kernels for operators that were never
declared (``RuntimeError: operator torchvision::nms does not exist``). timm imports torchvision
at import time, so we declare the two schemas it expects and import again. Only torchvision's
C++ ops (nms, roi_align, decode_jpeg) stay unavailable; vitslim never uses them.
"""
from __future__ import annotations

import importlib
import sys
from types import ModuleType

import torch

_TORCHVISION_SCHEMAS: torch.library.Library | None = None  # registrations live as long as this


def ensure_torchvision() -> ModuleType:
    """Import torchvision, declaring its missing operator schemas if its extension cannot load."""
    global _TORCHVISION_SCHEMAS
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    _TORCHVISION_SCHEMAS = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        _TORCHVISION_SCHEMAS.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return importlib.import_module("torchvision")


ensure_torchvision()
