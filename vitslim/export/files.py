"""One safetensors file per model: ``save`` any vitslim model (any method, or dense), ``load`` it back.

``save(model, path)`` writes the deployable form (``vitslim.export.deployable``: training-only
modules left out, CDCP/CAIT channel masks sliced into smaller layers) and, in the safetensors
header, a JSON ``vitslim`` entry: architecture spec, per-block [head dim, MLP hidden], the token
method with its options (Prune-and-Merge's plan, ATME's schedule, ...) and the weights' dtype.
``load(path)`` rebuilds the model from it: same outputs as the model that was saved (tested for
every method). ``precision="bf16"`` stores the weights in bfloat16 (half the file); the loaded
model is then a bf16 model.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from vitslim._version import __version__
from vitslim.errors import VitslimError
from vitslim.export.channels import CHANNEL_METHODS, channel_counts, resize_block
from vitslim.export.inference import deployable
from vitslim.families import family_of
from vitslim.io import atomic_write, load_state_strict
from vitslim.models import build_from_spec, model_spec
from vitslim.patch import is_patched, patch

FORMAT = "vitslim-slim"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def metadata(model: nn.Module) -> dict[str, Any]:
    """What load() needs besides the weights: architecture spec, channels, token method."""
    spec = model_spec(model)
    if spec is None:
        raise VitslimError("this model does not record its architecture (built by hand?): create it with "
                           "timm.create_model or vitslim's loaders so save() can describe it")
    cfg = model.vitslim_config if is_patched(model) else {}
    if cfg.get("method") in CHANNEL_METHODS:
        raise VitslimError(f"the model is still patched with {cfg['method']} masks: vitslim.export.save slices "
                           "them (or save(slim(model)))")
    return {"format": FORMAT, "spec": spec, "channels": channel_counts(model), "method": cfg.get("method"),
            "options": cfg.get("options", {}), "prop_attn": cfg.get("prop_attn"),
            "macs_target": cfg.get("macs_target"), "vitslim_version": __version__}


def save(model: nn.Module, path: str | os.PathLike, *, precision: str = "fp32") -> None:
    """Write the deployable form of ``model`` (any method) to a safetensors file, rebuild metadata in its header."""
    from safetensors.torch import save as to_bytes

    if precision not in _DTYPES:
        raise VitslimError(f"safetensors export precision must be fp32 or bf16, got {precision!r} (int8: export "
                           "to ONNX with --format onnx --precision int8)")
    inference = deployable(model)
    meta = {**metadata(inference), "dtype": precision}
    dtype = _DTYPES[precision]
    state = {k: (v.to(dtype) if v.is_floating_point() else v).detach().contiguous().cpu()
             for k, v in inference.state_dict().items()}
    atomic_write(path, to_bytes(state, metadata={"vitslim": json.dumps(meta)}))  # never half a file


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The vitslim header of a file written by ``save`` (a clear error for anything else)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise VitslimError(f"{path} not found: write one with vitslim.export.save(model, path) or "
                           "`vitslim export --out PATH`")
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            header = (f.metadata() or {}).get("vitslim")
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise VitslimError(f"cannot read {path} as safetensors ({exc}): is the file complete, and a "
                           ".safetensors file (not ONNX or a training checkpoint)?") from None
    if header is None:
        raise VitslimError(f"{path} has no vitslim metadata: it was not written by vitslim.export.save")
    return json.loads(header)


def load(path: str | os.PathLike) -> nn.Module:
    """A model written by save(), rebuilt (sliced shapes, token method) and in eval mode."""
    from safetensors.torch import load_file

    meta = read_metadata(path)
    model = build_from_spec(meta["spec"])
    for blk, (head_dim, hidden) in zip(family_of(model).blocks(model), meta["channels"]):
        resize_block(blk, head_dim, hidden)
    model.vitslim_channels = meta["channels"]
    if meta.get("method"):
        patch(model, meta["method"], prop_attn=meta.get("prop_attn"), **meta["options"])
        model.vitslim_config["macs_target"] = meta.get("macs_target")
    if meta.get("dtype", "fp32") != "fp32":
        model.to(_DTYPES[meta["dtype"]])
    load_state_strict(model, load_file(os.fspath(path)))
    return model.eval()
