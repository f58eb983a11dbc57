"""Training checkpoints: written atomically, read safely, loaded back into a patched model.

A checkpoint is one ``torch.save`` file holding only tensors and plain Python values, so it is
read with ``torch.load(weights_only=True)`` and never runs code. It is written through
``vitslim.io.atomic_write``: a crash at any moment leaves either the previous checkpoint or the
new one, never half of one.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any

import torch
from torch import nn

from vitslim.errors import VitslimError
from vitslim.io import atomic_write, load_state_strict
from vitslim.models import build_from_spec, model_spec
from vitslim.patch import is_patched, patch, strip_training_modules, unpatch

FORMAT = "vitslim-train-checkpoint"
FORMAT_VERSION = 1

__all__ = ["save_checkpoint", "read_checkpoint", "is_training_checkpoint", "model_state", "restore_model", "load",
           "load_state_strict"]


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> pathlib.Path:
    """Write ``payload`` to ``path`` atomically (temp file + fsync + rename); returns the path."""
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, **payload}
    return atomic_write(path, lambda f: torch.save(record, f))


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint (weights_only); VitslimError if it is missing, truncated or not one."""
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise VitslimError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zips, foreign pickles and disk errors all mean "unusable file"
        others = sorted(p.name for p in path.parent.glob("*.pt") if p != path)
        hint = f"; other checkpoints there: {', '.join(others)}" if others else ""
        raise VitslimError(f"cannot read checkpoint {path} ({type(exc).__name__}): it is truncated or corrupt "
                           f"(a copy cut short?); resume from another checkpoint{hint}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise VitslimError(f"{path} is not a vitslim training checkpoint; for plain weights use "
                           f"--checkpoint with --model NAME")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise VitslimError(f"{path} was written by a newer vitslim (format {payload['format_version']}); upgrade")
    return payload


def is_training_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a readable vitslim training checkpoint."""
    try:
        read_checkpoint(path)
        return True
    except VitslimError:
        return False


def model_state(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint needs to rebuild ``model``: architecture spec, method and options, weights."""
    cfg = model.vitslim_config if is_patched(model) else {}
    return {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_spec": model_spec(model),
        "method": cfg.get("method"),
        "options": cfg.get("options", {}),
        "prop_attn": cfg.get("prop_attn"),
        "macs_target": cfg.get("macs_target"),
    }


def restore_model(payload: dict[str, Any], model: nn.Module | None = None) -> nn.Module:
    """Rebuild (or fill ``model`` with) the checkpoint's patched model, strictly."""
    if model is None:
        if payload.get("model_spec") is None:
            raise VitslimError("this checkpoint does not record its architecture (a model built by hand): "
                               "pass the unpatched model, vitslim.load(path, model=...)")
        model = build_from_spec(payload["model_spec"])
    if payload.get("method"):
        patch(model, payload["method"], prop_attn=payload.get("prop_attn"), **payload["options"])
        model.vitslim_config["macs_target"] = payload.get("macs_target")
    elif is_patched(model):
        unpatch(model)
    load_state_strict(model, payload["model"])
    return model


def load(path: str | os.PathLike, *, model: nn.Module | None = None, training: bool = False) -> nn.Module:
    """A trained model from a vitslim training checkpoint, patched as trained, in eval mode.

    Training-only modules (SiT's reverse modules) are dropped unless ``training=True``.
    """
    model = restore_model(read_checkpoint(path), model)
    return (model if training else strip_training_modules(model)).eval()
