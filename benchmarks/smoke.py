"""Smoke mode of the benchmark scripts: ``VITSLIM_BENCH_SMOKE=1`` runs their real commands on tiny inputs.

In smoke mode every script swaps in a tiny random-init model, one or two steps, a few images (digits when
CIFAR-10 is not there), one thread and 5 timed runs, and writes into ``$VITSLIM_BENCH_DIR`` (a new
temporary folder when unset), never into benchmarks/results:

    VITSLIM_BENCH_SMOKE=1 VITSLIM_BENCH_DIR=/tmp/smoke bash benchmarks/speed.sh sit

The shell scripts read the same variables in common.sh; tests/test_benchmarks.py runs them all this way.
Run as a script, this file writes the tiny model as a timm model folder, for the `vitslim` commands:

    python benchmarks/smoke.py FOLDER
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ENABLED = os.environ.get("VITSLIM_BENCH_SMOKE", "") not in ("", "0")
# the tests' tiny ViT (tests/conftest.py): 32 px, patch 4 (64 patches + CLS), depth 4, width 64
TINY_VIT = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_classes=10)
TINY_ARCHITECTURE = "vit_tiny_patch16_224"  # the timm name the tiny model overrides
# PiT models: PiT-Ti's widths at 224 px (27x27 -> 14x14 -> 7x7); narrower ones spend so much on the patch
# embedding and poolings that ToMe cannot reach 0.5 MACs
TINY_PIT = dict(base_dims=[32, 32, 32], heads=[2, 4, 8], num_classes=10)
RUNS, WARMUP, BATCH, IMAGES = 5, 1, 2, 16  # timed runs (the fewest compare_speed takes), batch cap, images
THREADS = 1  # two spinning OpenMP threads on a busy machine cost several times the work


def work_dir() -> Path:
    """The smoke run's folder: $VITSLIM_BENCH_DIR, else a new temporary one (then exported for the rest)."""
    if not os.environ.get("VITSLIM_BENCH_DIR"):
        os.environ["VITSLIM_BENCH_DIR"] = tempfile.mkdtemp(prefix="vitslim-bench-smoke-")
    return Path(os.environ["VITSLIM_BENCH_DIR"])


def results_dir(default: str | Path) -> Path:
    """Where results go: ``default``, or the smoke folder's results/ in smoke mode."""
    return work_dir() / "results" if ENABLED else Path(default)


def output_path(path: str | Path) -> Path:
    """Where a file the command names goes: ``path``, or into the smoke folder in smoke mode unless it is there."""
    path = Path(path)
    if not ENABLED or path.resolve().is_relative_to(work_dir().resolve()):
        return path
    return work_dir() / path.name


def model_spec(spec: str) -> tuple[str, dict]:
    """(model spec, timm overrides) for vitslim.zoo.load_model: the tiny ViT in smoke mode."""
    if not ENABLED:
        return spec, {}
    import vitslim  # noqa: F401  (before timm)
    import timm

    if spec.startswith("pit_"):
        return spec, dict(TINY_PIT)
    return (spec if timm.is_model(spec) else TINY_ARCHITECTURE), dict(TINY_VIT)


def data(spec: str) -> str:
    """The dataset to use: ``spec``, or digits in smoke mode when ``spec`` does not resolve here."""
    if not ENABLED or spec == "digits" or Path(spec).is_dir():
        return spec
    from vitslim.data import data_root

    root = data_root()
    return spec if root is not None and (root / spec).is_dir() else "digits"


def segmentation_folder() -> Path:
    """A tiny CamVid-style folder (train/test, 4 images of 32x32 each, labels 0-10 and void 11) in the smoke folder."""
    import numpy as np
    from PIL import Image

    root = work_dir() / "camvid"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(4):
            labels = np.repeat(rng.integers(0, 12, (4, 4)), 8, axis=0).repeat(8, axis=1).astype(np.uint8)
            image = (labels[..., None] * 20 + rng.integers(0, 20, (32, 32, 3))).astype(np.uint8)
            Image.fromarray(image).save(root / split / "images" / f"{i}.png")
            Image.fromarray(labels).save(root / split / "masks" / f"{i}.png")
    return root


def write_tiny_model(folder: str | Path) -> Path:
    """A random-init tiny ViT as a timm model folder (config.json + model.safetensors)."""
    import vitslim  # noqa: F401  (before timm)
    import timm
    import torch
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model(TINY_ARCHITECTURE, **TINY_VIT)
    save_for_hf(model, str(folder), model_args=dict(TINY_VIT), safe_serialization=True)
    return Path(folder)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: python {sys.argv[0]} FOLDER")
    print(f"wrote {write_tiny_model(sys.argv[1])}")
