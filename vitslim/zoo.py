"""Model loading (timm names, timm model folders, local checkpoints) and the embedded default model."""
from __future__ import annotations

import difflib
import json
import logging
import math
import os
import pathlib
import shutil
import socket
import sys
import tempfile
import threading
import time
from urllib.parse import urlparse

import torch
import torch.nn.functional as F

import vitslim  # noqa: F401  (torchvision shim before timm)
import timm
from tqdm import tqdm

from vitslim.errors import VitslimError
from vitslim.train import data

_log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
_CHECKPOINT_HINT = "pass --checkpoint PATH (checkpoint=PATH): a local .safetensors/.pth file or a timm model folder"

# The embedded default: a depth-8 ViT on scikit-learn digits (16x16 grey input, patch 2: 64 tokens + CLS).
# Bump the version whenever the architecture or recipe changes: the cache folder name carries it.
DEFAULT_NAME = "default-digits-vit-v1"
DEFAULT_ARCHITECTURE = "vit_tiny_patch16_224"  # built with the overrides below, like the reference models
DEFAULT_MODEL_ARGS = dict(img_size=(16, 16), patch_size=2, in_chans=1, embed_dim=64, depth=8, num_heads=4,
                          mlp_ratio=2.0, num_classes=10, global_pool="token")
DEFAULT_RECIPE = dict(
    data="sklearn.datasets.load_digits, stratified 80/20 split (random_state=0): 1437 train, 360 test",
    epochs=16, batch_size=32, optimizer="AdamW", lr=2e-3, weight_decay=0.05, betas=(0.9, 0.999),
    schedule="one-cycle: linear warm-up over 10% of steps, then cosine decay", label_smoothing=0.1,
    augmentation=f"random shift by up to {data.DIGITS_SHIFT} px of 16 (half a source pixel), background fill",
    pos_embed_init="2-D sin-cos start values, then learned", seed=0,
)


def cache_dir() -> pathlib.Path:
    """Where vitslim caches models: $VITSLIM_CACHE, else $XDG_CACHE_HOME/vitslim or ~/.cache/vitslim."""
    if os.environ.get("VITSLIM_CACHE"):
        return pathlib.Path(os.environ["VITSLIM_CACHE"]).expanduser()
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache").expanduser() / "vitslim"


def load_model(spec: str = "default", *, checkpoint: str | None = None, pretrained: bool = False,
               num_classes: int | None = None, **model_kwargs) -> torch.nn.Module:
    """A model in eval mode from "default", a timm model folder, a timm name (optional local weights) or a
    vitslim training checkpoint (patched as trained)."""
    for given in (spec, checkpoint):  # a training checkpoint brings its architecture, method and options
        if given is not None and str(given).endswith((".pt", ".pth")) and pathlib.Path(given).expanduser().is_file():
            from vitslim.train.checkpoint import is_training_checkpoint, load

            if is_training_checkpoint(given):
                return load(given)
    checkpoint_is_folder = checkpoint is not None and (pathlib.Path(checkpoint).expanduser() / "config.json").is_file()
    if spec == "default" and checkpoint_is_folder:
        spec, checkpoint = str(checkpoint), None  # a model folder brings its own architecture
    if spec == "default":
        model = default_model()
        if checkpoint is None and num_classes is None and not model_kwargs:
            return model
        spec = str(cache_dir() / DEFAULT_NAME)
    path = pathlib.Path(spec).expanduser()
    if path.is_dir() and ((path / "config.json").is_file() or not timm.is_model(spec)):
        if not (path / "config.json").is_file():
            raise VitslimError(f"{path} is not a timm model folder (no config.json); pass a folder with config.json "
                               f"+ model.safetensors, or a timm model name")
        model = _create(f"local-dir:{path}", num_classes, model_kwargs)
        weights = checkpoint if checkpoint is not None else path
    elif os.sep in spec or "/" in spec or spec.lower().endswith(WEIGHT_SUFFIXES):
        if path.is_file():
            raise VitslimError(f"{spec} is a weights file, not a model: pass the model name and checkpoint={spec!r} "
                               f"(--model NAME --checkpoint {spec})")
        raise VitslimError(f"model path {spec} does not exist")
    else:
        _check_name(spec)
        if pretrained and checkpoint is None:
            return _create_pretrained(spec, num_classes, model_kwargs).eval()
        model = _create(spec, num_classes, model_kwargs)
        weights = checkpoint
    if weights is not None:
        load_weights(model, weights, adapt_head=num_classes is not None)
    return model.eval()


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
    missing = [k for k in own if k not in state and k not in dropped]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise VitslimError(_mismatch(path, model, state, own, missing, unexpected, wrong))
    model.load_state_dict(state, strict=not dropped)


def default_model() -> torch.nn.Module:
    """The embedded default: a small ViT trained on scikit-learn digits on first use, then loaded from the cache."""
    folder = cache_dir() / DEFAULT_NAME
    if folder.is_dir():
        try:
            return load_model(str(folder))
        except VitslimError as exc:
            _log.warning("cached default model in %s is unreadable (%s); retraining it", folder, exc)
    _log.warning("Training the embedded default model once (about a minute on 2 CPU cores); caching it in %s", folder)
    model, stats = train_default_model()
    _log.warning("Trained the default model in %.0f s: %.1f%% test accuracy on digits", stats["train_seconds"],
                 100 * stats["test_accuracy"])
    config = dict(
        architecture=DEFAULT_ARCHITECTURE, num_classes=DEFAULT_MODEL_ARGS["num_classes"],
        num_features=DEFAULT_MODEL_ARGS["embed_dim"], global_pool="token", label_names=list(data.DIGITS_CLASSES),
        model_args={k: list(v) if isinstance(v, tuple) else v for k, v in DEFAULT_MODEL_ARGS.items()},
        pretrained_cfg=model.pretrained_cfg, vitslim=dict(name=DEFAULT_NAME, recipe=DEFAULT_RECIPE, **stats),
    )
    _write_folder(folder, model, config)
    return load_model(str(folder))


def train_default_model(progress: bool = True) -> tuple[torch.nn.Module, dict]:
    """Train the embedded default from scratch (deterministic for a given thread count); returns (model, stats)."""
    recipe, start = DEFAULT_RECIPE, time.perf_counter()
    torch.manual_seed(recipe["seed"])
    generator = torch.Generator().manual_seed(recipe["seed"])
    model = timm.create_model(DEFAULT_ARCHITECTURE, pretrained=False, **DEFAULT_MODEL_ARGS)
    model.pretrained_cfg = _default_pretrained_cfg()
    with torch.no_grad():  # spatial structure from step one; from timm's random init it is near chance for epochs
        grid = model.patch_embed.grid_size
        model.pos_embed[0, model.num_prefix_tokens:] = _sincos_2d(grid, model.embed_dim)
    x_train, y_train = data.digits_tensors("train")
    x_test, y_test = data.digits_tensors("test")
    background = (0.0 - data.DIGITS_DATA_CFG["mean"][0]) / data.DIGITS_DATA_CFG["std"][0]
    steps_per_epoch = math.ceil(len(x_train) / recipe["batch_size"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"],
                                  betas=recipe["betas"])
    total_steps = recipe["epochs"] * steps_per_epoch
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, recipe["lr"], total_steps=total_steps, pct_start=0.1,
                                                   anneal_strategy="cos", cycle_momentum=False)
    model.train()
    with tqdm(total=total_steps, desc="training default model", unit="step",
              disable=not progress, file=sys.stderr, leave=False, mininterval=1.0) as bar:
        for _ in range(recipe["epochs"]):
            order = torch.randperm(len(x_train), generator=generator)
            for i in range(0, len(x_train), recipe["batch_size"]):
                batch = order[i:i + recipe["batch_size"]]
                images = _random_shift(x_train[batch], data.DIGITS_SHIFT, background, generator)
                loss = F.cross_entropy(model(images), y_train[batch], label_smoothing=recipe["label_smoothing"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                bar.update()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    seconds = round(time.perf_counter() - start, 1)
    stats = dict(test_accuracy=round(accuracy, 4), test_images=len(y_test), train_seconds=seconds,
                 threads=torch.get_num_threads(), torch=torch.__version__, timm=timm.__version__)
    return model, stats


# --- helpers ---------------------------------------------------------------------------------------


def _create(name: str, num_classes: int | None, model_kwargs: dict) -> torch.nn.Module:
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **model_kwargs)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AssertionError) as exc:
        where = f"model folder {name[len('local-dir:'):]}" if name.startswith("local-dir:") else f"timm model {name!r}"
        raise VitslimError(f"cannot build {where}: {exc}".replace("\n", " ")) from None
    model.vitslim_spec = _spec(name, num_classes, model_kwargs, model)
    return model


def _spec(name: str, num_classes: int | None, model_kwargs: dict, model: torch.nn.Module) -> dict:
    """How to rebuild this architecture without its source (for training checkpoints): timm name + kwargs."""
    kwargs = dict(model_kwargs)
    if name.startswith("local-dir:"):
        config = json.loads((pathlib.Path(name[len("local-dir:"):]) / "config.json").read_text())
        name = config["architecture"]
        kwargs = {**config.get("model_args", {}), **kwargs}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    return {"architecture": name, "model_args": kwargs, "pretrained_cfg": dict(getattr(model, "pretrained_cfg", {}))}


def build_from_spec(spec: dict) -> torch.nn.Module:
    """A fresh (random-init) model from a spec recorded by load_model or a training checkpoint."""
    _check_name(spec["architecture"])
    model = _create(spec["architecture"], spec["model_args"].get("num_classes"),
                    {k: v for k, v in spec["model_args"].items() if k != "num_classes"})
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
    pe = model.patch_embed
    args = dict(img_size=list(pe.img_size), patch_size=list(pe.patch_size), in_chans=pe.proj.in_channels,
                num_classes=model.num_classes, embed_dim=model.embed_dim, depth=len(model.blocks),
                num_heads=model.blocks[0].attn.num_heads, global_pool=model.global_pool)
    return {"architecture": name, "model_args": args, "pretrained_cfg": dict(cfg)}


def _check_name(name: str) -> None:
    if timm.is_model(name):
        return
    stem = name.split(".")[0]
    names = timm.list_models()
    close = timm.list_models(f"*{stem}*")[:5] or difflib.get_close_matches(stem, names, n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise VitslimError(f"unknown timm model {name!r}: {hint}list candidates with timm.list_models('*{stem[:8]}*'), "
                       f"or pass a timm model folder")


def _create_pretrained(name: str, num_classes: int | None, model_kwargs: dict) -> torch.nn.Module:
    # Probe first: offline, the hub client retries DNS for ~47 s before it fails.
    if not _hub_weights_cached(name):
        reason = _hub_unreachable()
        if reason:
            raise VitslimError(f"cannot download pretrained weights for {name}: {reason}; {_CHECKPOINT_HINT}")
    try:
        model = timm.create_model(name, pretrained=True, num_classes=num_classes, **model_kwargs)
        model.vitslim_spec = _spec(name, num_classes, model_kwargs, model)
        return model
    except Exception as exc:  # network, hub and missing-weights errors all mean the same to the user
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise VitslimError(f"cannot load pretrained weights for {name} ({message}); {_CHECKPOINT_HINT}") from None


def _hub_weights_cached(name: str) -> bool:
    """Whether the hub weights for `name` are in the local Hugging Face cache (loadable offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cfg = timm.models.get_pretrained_cfg(name)
        files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        return bool(cfg.hf_hub_id) and any(isinstance(try_to_load_from_cache(cfg.hf_hub_id, f), str) for f in files)
    except Exception:  # noqa: BLE001  (no config or no hub client: not cached)
        return False


def _hub_unreachable(timeout: float = 3.0) -> str | None:
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


def _default_pretrained_cfg() -> dict:
    cfg = data.DIGITS_DATA_CFG
    return dict(tag="digits", custom_load=False, input_size=list(cfg["input_size"]), fixed_input_size=True,
                interpolation=cfg["interpolation"], crop_pct=cfg["crop_pct"], crop_mode=cfg["crop_mode"],
                mean=list(cfg["mean"]), std=list(cfg["std"]), num_classes=DEFAULT_MODEL_ARGS["num_classes"],
                pool_size=None, first_conv="patch_embed.proj", classifier="head", license="unspecified")


def _write_folder(folder: pathlib.Path, model: torch.nn.Module, config: dict) -> None:
    """Write config.json + model.safetensors atomically: build in a temp dir beside folder, then rename."""
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if folder.exists():
            if _readable(folder):  # a concurrent run finished first: keep its model
                return
            # unreadable leftovers: move aside in one rename, so readers never see half a model
            os.replace(folder, tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent) + "/old")
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "config.json").is_file():  # not a concurrent run that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for old in folder.parent.glob(f".{folder.name}.old-*"):
            shutil.rmtree(old, ignore_errors=True)


def _readable(folder: pathlib.Path) -> bool:
    try:
        load_model(str(folder))
        return True
    except VitslimError:
        return False


def _sincos_2d(grid: tuple[int, int], dim: int, temperature: float = 10.0) -> torch.Tensor:
    """(grid_h * grid_w, dim) 2-D sine-cosine position embeddings: a quarter of dim each for sin/cos of y/x."""
    ys, xs = torch.meshgrid(torch.arange(grid[0], dtype=torch.float32), torch.arange(grid[1], dtype=torch.float32),
                            indexing="ij")
    omega = temperature ** -(torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    angles = [c.flatten()[:, None] * omega[None] for c in (ys, xs)]
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)


def _random_shift(images: torch.Tensor, shift: int, fill: float, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to `shift` pixels in x and y, filling with `fill` (a padded random crop)."""
    h, w = images.shape[-2:]
    padded = F.pad(images, (shift, shift, shift, shift), value=fill)
    offsets = torch.randint(0, 2 * shift + 1, (len(images), 2), generator=generator).tolist()
    return torch.stack([p[..., dy:dy + h, dx:dx + w] for p, (dy, dx) in zip(padded, offsets)])
