"""load_model: "default", a vitslim training checkpoint, a timm name or a timm model folder; the embedded default.

The embedded default is a small ViT trained on scikit-learn digits through ``vitslim.train.fit``
on first use and cached as a timm model folder under ``cache_dir()``.
"""
from __future__ import annotations

import contextlib
import io as _stdio
import json
import logging
import os
import pathlib
import shutil
import sys
import tempfile
import time

import torch

from vitslim import _compat  # noqa: F401  (torchvision shim before timm)
import timm
from safetensors.torch import save as safetensors_bytes

from vitslim import data, models
from vitslim.errors import VitslimError
from vitslim.io import atomic_write
from vitslim.models import load_weights
from vitslim.train.config import TrainConfig
from vitslim.train.engine import fit
from vitslim.train.checkpoint import is_training_checkpoint, load as load_training_checkpoint

__all__ = ["load_model", "default_model", "train_default_model", "cache_dir", "load_weights", "DEFAULT_NAME"]

_log = logging.getLogger(__name__)

# The embedded default: a depth-4 ViT on scikit-learn digits upsampled to 28x28, patch 2: 196 tokens + CLS
# (a 224-px ViT/16's grid), so token reduction pays off as on real ViTs rather than drowning in per-op overheads.
# Bump the version whenever the architecture or recipe changes: the cache folder name carries it.
DEFAULT_NAME = "default-digits-vit-v2"
DEFAULT_ARCHITECTURE = "vit_tiny_patch16_224"  # built with the overrides below, like the reference models
DEFAULT_MODEL_ARGS = dict(img_size=data.DIGITS_DATA_CFG["input_size"][1:], patch_size=2, in_chans=1, embed_dim=64,
                          depth=4, num_heads=4, mlp_ratio=2.0, num_classes=10, global_pool="token")
# The recipe, as vitslim.train.fit options: AdamW, linear warm-up over 10% of the steps then cosine,
# label smoothing; the digits train split shifts each image at random (a dataset transform).
DEFAULT_TRAIN = dict(epochs=9, batch_size=16, lr=1.5e-3, warmup_epochs=0.9, warmup_lr=6e-5, min_lr=1e-6,
                     weight_decay=0.05, betas=(0.9, 0.999), label_smoothing=0.1, seed=0)
_RUN = dict(device="cpu", eval_every=0, log_every=1000)  # CPU for determinism; evaluate once, at the end
DEFAULT_RECIPE = dict(
    data="sklearn.datasets.load_digits, stratified 80/20 split (random_state=0): 1437 train, 360 test",
    trainer="vitslim.train.fit (AdamW; no weight decay on 1-D weights and tokens; last partial batch dropped)",
    schedule="linear warm-up over 10% of the steps, then cosine decay",
    augmentation=f"random shift by up to {data.DIGITS_SHIFT} px (a padded random crop, background fill)",
    init="timm's jax init (xavier-uniform linears, zero head); pos_embed: 2-D sin-cos start values, then learned",
    **{k: list(v) if isinstance(v, tuple) else v for k, v in DEFAULT_TRAIN.items()},
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
            if is_training_checkpoint(given):
                return load_training_checkpoint(given)
    if spec == "default" and checkpoint is not None and models.is_model_folder(checkpoint):
        spec, checkpoint = str(checkpoint), None  # a model folder brings its own architecture
    if spec == "default":
        model = default_model()
        if checkpoint is None and num_classes is None and not model_kwargs:
            return model
        spec = str(cache_dir() / DEFAULT_NAME)
    path = pathlib.Path(spec).expanduser()
    if path.is_dir() and (models.is_model_folder(path) or not timm.is_model(spec)):
        model = models.from_folder(path, weights=checkpoint, num_classes=num_classes, **model_kwargs)
    elif os.sep in spec or "/" in spec or spec.lower().endswith(models.WEIGHT_SUFFIXES):
        if path.is_file():
            raise VitslimError(f"{spec} is a weights file, not a model: pass the model name and checkpoint={spec!r} "
                               f"(--model NAME --checkpoint {spec})")
        raise VitslimError(f"model path {spec} does not exist")
    else:
        model = models.from_name(spec, pretrained=pretrained, weights=checkpoint, num_classes=num_classes,
                                 **model_kwargs)
    return model.eval()


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
    """Train the embedded default from scratch with vitslim.train.fit (deterministic for a given thread count)."""
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # leave the caller's random stream where it was
        torch.manual_seed(DEFAULT_TRAIN["seed"])
        model = timm.create_model(DEFAULT_ARCHITECTURE, pretrained=False, **DEFAULT_MODEL_ARGS)
        model.init_weights("jax")  # xavier linears, zero head: leaves the loss plateau at chance sooner than std 0.02
        model.pretrained_cfg = _default_pretrained_cfg()
        with torch.no_grad():  # spatial structure from step one; from timm's random init it is near chance for epochs
            model.pos_embed[0, model.num_prefix_tokens:] = _sincos_2d(model.patch_embed.grid_size, model.embed_dim)
        train_set = data.build_dataset("digits", "train", model=model, augment={})  # digits: random shifts only
        test_set = data.build_dataset("digits", "test", model=model)
        # fit reports each epoch on stdout; for the default that is progress, so it goes where the bar goes
        sink = sys.stderr if progress else _stdio.StringIO()
        with contextlib.redirect_stdout(sink):
            result = fit(model, train_set, val_data=test_set, config=TrainConfig(**DEFAULT_TRAIN, **_RUN),
                         progress=progress)
    model.eval()
    stats = dict(test_accuracy=round(result["final"]["top1"], 4), test_images=result["final"]["n"],
                 train_seconds=round(time.perf_counter() - start, 1), threads=torch.get_num_threads(),
                 torch=torch.__version__, timm=timm.__version__)
    return model, stats


# --- helpers ---------------------------------------------------------------------------------------


def _default_pretrained_cfg() -> dict:
    cfg = data.DIGITS_DATA_CFG
    return dict(tag="digits", custom_load=False, input_size=list(cfg["input_size"]), fixed_input_size=True,
                interpolation=cfg["interpolation"], crop_pct=cfg["crop_pct"], crop_mode=cfg["crop_mode"],
                mean=list(cfg["mean"]), std=list(cfg["std"]), num_classes=DEFAULT_MODEL_ARGS["num_classes"],
                pool_size=None, first_conv="patch_embed.proj", classifier="head", license="unspecified")


def _write_folder(folder: pathlib.Path, model: torch.nn.Module, config: dict) -> None:
    """Write config.json + model.safetensors as one folder: build it in a temp dir beside folder, then rename."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        atomic_write(tmp / "model.safetensors",
                     safetensors_bytes({k: v.contiguous() for k, v in model.state_dict().items()}))
        atomic_write(tmp / "config.json", json.dumps(config, indent=2) + "\n")
        if folder.exists():
            if _readable(folder):  # a concurrent run finished first: keep its model
                return
            # unreadable leftovers: move aside in one rename, so readers never see half a model
            os.replace(folder, tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent) + "/old")
        try:
            os.replace(tmp, folder)
        except OSError:
            if not models.is_model_folder(folder):  # not a concurrent run that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for old in folder.parent.glob(f".{folder.name}.old-*"):
            shutil.rmtree(old, ignore_errors=True)


def _readable(folder: pathlib.Path) -> bool:
    try:
        models.from_folder(folder)
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
