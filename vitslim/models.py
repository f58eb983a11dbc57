"""timm models: build by name or from a model folder, rebuild specs, strict weight loading, hub downloads."""
from __future__ import annotations

import difflib
import json
import os
import pathlib
import socket
import sys
import threading
from urllib.parse import urlparse

import torch

from vitslim import _compat  # noqa: F401  (torchvision shim before timm)
import timm

from vitslim.errors import VitslimError
from vitslim.families import family_of
from vitslim.io import state_mismatch

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
CHECKPOINT_HINT = "pass --checkpoint PATH (checkpoint=PATH): a local .safetensors/.pth file or a timm model folder"
_LOCAL = "local-dir:"


def is_model_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a timm model folder (it holds config.json)."""
    return (pathlib.Path(path).expanduser() / "config.json").is_file()


def from_folder(folder: str | os.PathLike, *, weights: str | os.PathLike | None = None,
                num_classes: int | None = None, **model_kwargs) -> torch.nn.Module:
    """A model built from a timm model folder's config.json, with its weights (or ``weights``) loaded strictly."""
    folder = pathlib.Path(folder).expanduser()
    if not is_model_folder(folder):
        raise VitslimError(f"{folder} is not a timm model folder (no config.json); pass a folder with config.json "
                           f"+ model.safetensors, or a timm model name")
    model = create(f"{_LOCAL}{folder}", num_classes, **model_kwargs)
    load_weights(model, weights if weights is not None else folder, adapt_head=num_classes is not None)
    return model


def from_name(name: str, *, pretrained: bool = False, weights: str | os.PathLike | None = None,
              num_classes: int | None = None, **model_kwargs) -> torch.nn.Module:
    """A timm model by name: random init, hub weights (``pretrained``) or a local weights file/folder."""
    check_name(name)
    if pretrained and weights is None:
        return create_pretrained(name, num_classes, **model_kwargs)
    model = create(name, num_classes, **model_kwargs)
    if weights is not None:
        load_weights(model, weights, adapt_head=num_classes is not None)
    return model


def create(name: str, num_classes: int | None = None, **model_kwargs) -> torch.nn.Module:
    """timm.create_model (random init) with a one-line VitslimError, recording the model's rebuild spec."""
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **model_kwargs)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AssertionError) as exc:
        where = f"model folder {name[len(_LOCAL):]}" if name.startswith(_LOCAL) else f"timm model {name!r}"
        raise VitslimError(f"cannot build {where}: {exc}".replace("\n", " ")) from None
    model.vitslim_spec = _spec(name, num_classes, model_kwargs, model)
    return model


def _spec(name: str, num_classes: int | None, model_kwargs: dict, model: torch.nn.Module) -> dict:
    """How to rebuild this architecture without its source (for training checkpoints): timm name + kwargs."""
    kwargs = dict(model_kwargs)
    if name.startswith(_LOCAL):
        config = json.loads((pathlib.Path(name[len(_LOCAL):]) / "config.json").read_text())
        name = config["architecture"]
        kwargs = {**config.get("model_args", {}), **kwargs}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    return {"architecture": name, "model_args": kwargs, "pretrained_cfg": dict(getattr(model, "pretrained_cfg", {}))}


def build_from_spec(spec: dict) -> torch.nn.Module:
    """A fresh (random-init) model from a spec recorded by the loaders or a training checkpoint."""
    check_name(spec["architecture"])
    model = create(spec["architecture"], spec["model_args"].get("num_classes"),
                   **{k: v for k, v in spec["model_args"].items() if k != "num_classes"})
    if spec.get("layout") and spec["layout"] != block_layout(model):
        raise VitslimError(f"the saved model's blocks are {'/'.join(spec['layout'])} but {spec['architecture']!r} "
                           f"with the recorded sizes builds {'/'.join(block_layout(model))}: the file cannot be "
                           "rebuilt from its name; save the model as loaded by vitslim (vitslim.zoo.load_model)")
    if spec.get("pretrained_cfg"):
        model.pretrained_cfg = dict(spec["pretrained_cfg"])  # its data config (mean/std, input size)
    model.vitslim_spec = spec
    return model


def model_spec(model: torch.nn.Module) -> dict | None:
    """The rebuild spec of a model: recorded at load time, or inferred for a plain timm ViT (None if unknown)."""
    spec = getattr(model, "vitslim_spec", None)
    if spec is not None:
        return spec
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture")
    if not name or not timm.is_model(name) or not hasattr(model, "patch_embed"):
        return None
    args = family_of(model).model_args(model)
    # sizes only: record the block layout too, so that an override the sizes do not show (e.g. Eva's
    # use_post_norm, same parameter names) is refused on load rather than rebuilt as the default
    return {"architecture": name, "model_args": args, "pretrained_cfg": dict(cfg), "layout": block_layout(model)}


def block_layout(model: torch.nn.Module) -> list[str]:
    """The class names of the first block, its attention and its MLP."""
    blk = family_of(model).blocks(model)[0]
    return [type(blk).__name__, type(blk.attn).__name__, type(blk.mlp).__name__]


def check_name(name: str) -> None:
    """VitslimError with close matches unless ``name`` is a timm model name."""
    if timm.is_model(name):
        return
    stem = name.split(".")[0]
    names = timm.list_models()
    close = timm.list_models(f"*{stem}*")[:5] or difflib.get_close_matches(stem, names, n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise VitslimError(f"unknown timm model {name!r}: {hint}list candidates with timm.list_models('*{stem[:8]}*'), "
                       f"or pass a timm model folder")


# --- weights ---------------------------------------------------------------------------------------


def load_weights(model: torch.nn.Module, checkpoint: str | os.PathLike, *, adapt_head: bool = False) -> None:
    """Load a .safetensors/.pth file (or a model folder's weights) into model, strictly; VitslimError on mismatch."""
    path = pathlib.Path(checkpoint).expanduser()
    if path.is_dir():
        path = _weights_file(path)
    if not path.is_file():
        raise VitslimError(f"checkpoint {path} does not exist")
    try:
        # safetensors by suffix, else torch.load(weights_only=True): never unpickles code. Unwraps
        # {"state_dict"/"model"/EMA: ...} and DataParallel "module." prefixes.
        state = timm.models.load_state_dict(str(path))
    except Exception as exc:  # each format and torch version fails differently on a bad file
        raise VitslimError(f"cannot read checkpoint {path} ({type(exc).__name__}): the file is corrupt, truncated "
                           f"or not a weights file; re-export or re-download it") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VitslimError(f"checkpoint {path} holds no state dict of tensors; save model.state_dict() instead")
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:  # timm's own conversions: other layouts, resampled position embeddings, patch sizes
            state = filter_fn(dict(state), model)
        except Exception:  # noqa: BLE001  (a foreign checkpoint: the key comparison below explains it)
            pass
    own = model.state_dict()
    dropped = set()
    if adapt_head:  # a new num_classes: the checkpoint's classifier does not fit and is re-initialised
        heads = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
        for name in [heads] if isinstance(heads, str) else heads:
            for key in (f"{name}.weight", f"{name}.bias"):
                if key in state and key in own and state[key].shape != own[key].shape:
                    dropped.add(key)
                    del state[key]
    missing, unexpected, wrong = state_mismatch(own, state, ignore=frozenset(dropped))
    if missing or unexpected or wrong:
        raise VitslimError(_mismatch(path, model, state, own, missing, unexpected, wrong))
    model.load_state_dict(state, strict=not dropped)


def _weights_file(folder: pathlib.Path) -> pathlib.Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    for suffix in WEIGHT_SUFFIXES:
        found = sorted(folder.glob(f"*{suffix}"))
        if found:
            return found[0]
    raise VitslimError(f"no weights file in {folder}: expected model.safetensors (or a .pth/.bin file)")


def _mismatch(path, model, state, own, missing, unexpected, wrong) -> str:
    """load_weights' message: counts, one example of each, and what to load the file with instead."""
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
    parts = [f"{len(missing)} missing" + (f" (e.g. {missing[0]})" if missing else ""),
             f"{len(unexpected)} unexpected" + (f" (e.g. {unexpected[0]})" if unexpected else "")]
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} with other shapes (e.g. {k}: checkpoint {tuple(state[k].shape)}, "
                     f"model {tuple(own[k].shape)})")
    heads = {"head.weight", "head.bias", "fc.weight", "fc.bias", "classifier.weight", "classifier.bias"}
    if not missing and not unexpected and set(wrong) <= heads:
        hint = f"the checkpoint has {state[wrong[0]].shape[0]} classes: pass num_classes={state[wrong[0]].shape[0]}"
    else:
        depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        width = state["cls_token"].shape[-1] if "cls_token" in state else None
        shape = f" (the checkpoint looks like depth {depth}, width {width})" if depth and width else ""
        hint = f"load it with the timm model name and options it was saved from{shape}"
    return f"checkpoint {path.name} does not fit {arch}: keys {', '.join(parts)}; {hint}"


# --- pretrained weights from the Hugging Face Hub --------------------------------------------------


def create_pretrained(name: str, num_classes: int | None = None, **model_kwargs) -> torch.nn.Module:
    """timm's hub weights for ``name``; fails fast with a one-line error when the hub cannot be reached."""
    # Probe first: offline, the hub client retries DNS for ~47 s before it fails.
    if not _hub_weights_cached(name):
        reason = hub_unreachable()
        if reason:
            raise VitslimError(f"cannot download pretrained weights for {name}: {reason}; {CHECKPOINT_HINT}")
    try:
        model = timm.create_model(name, pretrained=True, num_classes=num_classes, **model_kwargs)
    except Exception as exc:  # network, hub and missing-weights errors all mean the same to the user
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise VitslimError(f"cannot load pretrained weights for {name} ({message}); {CHECKPOINT_HINT}") from None
    model.vitslim_spec = _spec(name, num_classes, model_kwargs, model)
    return model


def _hub_weights_cached(name: str) -> bool:
    """Whether the hub weights for `name` are in the local Hugging Face cache (loadable offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cfg = timm.models.get_pretrained_cfg(name)
        files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        return bool(cfg.hf_hub_id) and any(isinstance(try_to_load_from_cache(cfg.hf_hub_id, f), str) for f in files)
    except Exception:  # noqa: BLE001  (no config or no hub client: not cached)
        return False


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face Hub cannot be reached, or None when a TCP connection to it succeeds in time."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return "the Hugging Face Hub is unreachable (HF_HUB_OFFLINE is set)"
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            outcome.append(None)
        except Exception as exc:  # noqa: BLE001  (any failure means unreachable)
            outcome.append(exc)

    # A daemon thread: name resolution ignores socket timeouts and can block far longer than `timeout`.
    thread = threading.Thread(target=probe, name="vitslim-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if outcome and outcome[0] is None:
        return None
    why = f": {outcome[0]}" if outcome else f" within {timeout:g} s"
    return f"the Hugging Face Hub ({host}) is unreachable{why}"
