"""Training checkpoints: written atomically, read safely, loaded back into a patched model.

A checkpoint is one ``torch.save`` file holding only tensors and plain Python values, so it is
read with ``torch.load(weights_only=True)`` and never runs code. It is written to a temporary
file in the same folder, flushed to disk and renamed over the old one: a crash at any moment
leaves either the previous checkpoint or the new one, never half of one.
"""
from __future__ import annotations

import os
import pathlib
import tempfile
from typing import Any

import torch
from torch import nn

from vitslim.errors import VitslimError

FORMAT = "vitslim-train-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> pathlib.Path:
    """Write ``payload`` to ``path`` atomically (temp file + fsync + rename); returns the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
    from vitslim.patch import is_patched
    from vitslim.zoo import model_spec

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
    import vitslim
    from vitslim.zoo import build_from_spec

    if model is None:
        if payload.get("model_spec") is None:
            raise VitslimError("this checkpoint does not record its architecture (a model built by hand): "
                               "pass the unpatched model, vitslim.load(path, model=...)")
        model = build_from_spec(payload["model_spec"])
    if payload.get("method"):
        vitslim.patch(model, payload["method"], prop_attn=payload.get("prop_attn"), **payload["options"])
        model.vitslim_config["macs_target"] = payload.get("macs_target")
    elif vitslim.is_patched(model):
        vitslim.unpatch(model)
    load_state_strict(model, payload["model"])
    return model


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """load_state_dict with every key and shape checked first, and a message that says what differs."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(f"{what}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                           for what, keys in (("missing", missing), ("unexpected", unexpected),
                                              ("wrong shape", wrong)) if keys)
        raise VitslimError(f"the checkpoint's weights do not fit the model ({detail}); was it trained with "
                           f"another architecture or method?")
    model.load_state_dict(state)


def load(path: str | os.PathLike, *, model: nn.Module | None = None, training: bool = False) -> nn.Module:
    """A trained model from a vitslim training checkpoint, patched as trained, in eval mode.

    Training-only modules (SiT's reverse modules) are dropped unless ``training=True``.
    """
    from vitslim.patch import strip_training_modules

    model = restore_model(read_checkpoint(path), model)
    return (model if training else strip_training_modules(model)).eval()
