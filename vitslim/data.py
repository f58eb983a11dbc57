"""Datasets and loaders: scikit-learn digits, ImageFolder trees and labels.csv folders, with timm transforms."""
from __future__ import annotations

import csv
import functools
import os
import pathlib
import random
from collections import defaultdict
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from vitslim import _compat  # noqa: F401  (torchvision shim before timm)
import timm.data
from torchvision import transforms as T

from vitslim.errors import VitslimError
from vitslim.families import unwrap
from vitslim.measure.macs import default_input_size

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
SPLIT_NAMES = frozenset({"train", "val", "valid", "validation", "test"})

# The embedded default model's input: digits' 8x8 grey images upsampled (bilinear) to 28x28, i.e. a
# 14x14 grid of 2x2 patches (196 tokens, the grid of a 224-px ViT/16), normalised with the training
# split's pixel mean and std at that size.
DIGITS_DATA_CFG = dict(
    input_size=(1, 28, 28), interpolation="bilinear", crop_pct=1.0, crop_mode="center", mean=(0.3056,), std=(0.3247,)
)
DIGITS_CLASSES = tuple(str(i) for i in range(10))
DIGITS_SHIFT = 2  # train-time random shift, in 28x28 pixels (about half a source pixel)

IMAGE_MODES = {1: "L", 3: "RGB"}  # PIL mode of a model's input, by its number of channels
_CACHE_MAX_PIXELS = 64 * 64  # decode small images (CIFAR-10) once per process; large ones on every read
_DECODED: dict[tuple[str, str], np.ndarray] = {}


def data_root() -> pathlib.Path | None:
    """Where short dataset names resolve: $VITSLIM_DATA, else shared/data beside the checkout, else None."""
    env = os.environ.get("VITSLIM_DATA")
    if env:
        return pathlib.Path(env).expanduser()
    root = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"  # <repo>/../shared/data
    return root if root.is_dir() else None


@functools.lru_cache(maxsize=None)
def digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits as uint8 8x8 images and int64 labels: a fixed stratified 80/20 train/test split."""
    if split not in ("train", "test"):
        raise VitslimError(f"digits has splits 'train' and 'test', not {split!r}")
    from sklearn.datasets import load_digits  # imported lazily: only the digits path needs scikit-learn
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)  # 17 grey levels (0..16) to 8-bit
    parts = train_test_split(images, digits.target.astype(np.int64), test_size=0.2, stratify=digits.target,
                             random_state=0)
    images, labels = parts[0::2] if split == "train" else parts[1::2]
    images.flags.writeable = labels.flags.writeable = False  # shared by every caller through the cache
    return images, labels


def digits_tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A digits split as the default model sees it at test time: (N, 1, 28, 28) float32 and (N,) int64 labels."""
    images, labels = digits_split(split)
    transform = build_transform(DIGITS_DATA_CFG, "test")
    return torch.stack([transform(Image.fromarray(image)) for image in images]), torch.from_numpy(labels.copy())


def data_config(model: torch.nn.Module | None = None, spec: str | None = None) -> dict:
    """timm data config (input_size, interpolation, crop_pct, crop_mode, mean, std) for a model or dataset."""
    if model is None:
        if spec == "digits":
            return dict(DIGITS_DATA_CFG)
        return dict(input_size=(3, 224, 224), interpolation="bicubic", crop_pct=timm.data.DEFAULT_CROP_PCT,
                    crop_mode="center", mean=timm.data.IMAGENET_DEFAULT_MEAN, std=timm.data.IMAGENET_DEFAULT_STD)
    model = unwrap(model)  # a runtime or other wrapper has no config of its own: the model inside decides
    cfg = timm.data.resolve_data_config({}, model=model)
    try:
        size = tuple(default_input_size(model))
    except VitslimError:  # not a model vitslim runs: timm's resolved config stands
        size = None
    # a model built from its class has no pretrained_cfg, and one built with img_size=... (e.g. DINOv2 at
    # 224 instead of 518) has the original's: a fixed-size model takes its own input size
    if size is not None and (not getattr(model, "pretrained_cfg", None)
                             or not getattr(model, "dynamic_img_size", False)):
        cfg["input_size"] = size
    channels = cfg["input_size"][0]
    for key in ("mean", "std"):  # e.g. ImageNet's 3-channel defaults for a 1-channel model: average them
        if len(cfg[key]) != channels:
            cfg[key] = (sum(cfg[key]) / len(cfg[key]),) * channels
    return cfg


def build_transform(cfg: dict, split: str = "test", spec: str | None = None):
    """timm's eval transform for cfg (its train transform for split 'train'); digits trains on shifts only."""
    if spec == "digits" and split == "train":
        # timm's train transform flips and crops hard, which breaks digits; shift slightly instead
        size = cfg["input_size"][1:]
        return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BILINEAR), T.RandomCrop(size, DIGITS_SHIFT),
                          T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])])
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return timm.data.create_transform(**{k: cfg[k] for k in keys if k in cfg}, is_training=split == "train")


def train_transform(cfg: dict, *, crop: str = "auto", hflip: float = 0.5, color_jitter: float | None = None,
                    auto_augment: str | None = None, re_prob: float = 0.0, spec: str | None = None):
    """timm's training augmentation for cfg; crop "pad" (CIFAR-style padded random crop) or "rrc"."""
    if spec == "digits":
        return build_transform(cfg, "train", spec)  # shifts only: flips and crops break digits
    size = tuple(cfg["input_size"][1:])
    if crop == "auto":
        crop = "pad" if max(size) <= 64 else "rrc"  # RandomResizedCrop's 8% crops leave little of a 32-px image
    if crop == "rrc":
        return timm.data.create_transform(size, is_training=True, hflip=hflip, color_jitter=color_jitter or 0.0,
                                          auto_augment=auto_augment, interpolation=cfg["interpolation"],
                                          mean=cfg["mean"], std=cfg["std"], re_prob=re_prob, re_mode="pixel")
    steps = [T.Resize(size, interpolation=T.InterpolationMode(cfg["interpolation"])),
             T.RandomCrop(size, padding=max(1, size[0] // 8)), T.RandomHorizontalFlip(hflip)]
    if color_jitter:
        steps.append(T.ColorJitter(*(color_jitter,) * 3))
    if auto_augment:
        mean = tuple(round(255 * m) for m in cfg["mean"])
        steps.append(timm.data.auto_augment.rand_augment_transform(
            auto_augment, dict(translate_const=int(size[0] * 0.45), img_mean=mean)))
    steps += [T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])]
    if re_prob > 0:
        steps.append(timm.data.random_erasing.RandomErasing(re_prob, mode="pixel", device="cpu"))
    return T.Compose(steps)


class ImageDataset(torch.utils.data.Dataset):
    """Labelled images (file paths or uint8 arrays) decoded with PIL in one mode and passed through a transform."""

    def __init__(self, items: Sequence[str | np.ndarray], targets: Sequence[int], classes: Sequence[str],
                 transform, mode: str = "RGB"):
        self.items, self.targets, self.classes = list(items), [int(t) for t in targets], list(classes)
        self.transform, self.mode = transform, mode

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item = self.items[index]
        if isinstance(item, np.ndarray):
            image = Image.fromarray(item).convert(self.mode)
        else:
            image = _load_image(item, self.mode)
        return self.transform(image), self.targets[index]


def build_dataset(spec: str, split: str = "test", *, model: torch.nn.Module | None = None,
                  limit: int | None = None, augment: dict | None = None,
                  evaluation: bool = False) -> torch.utils.data.Dataset:
    """A labelled image dataset ("digits", a short name under data_root(), or a folder) preprocessed for `model`.

    ``augment`` (keyword arguments of ``train_transform``) switches to training augmentation;
    ``evaluation`` gives the evaluation transform whatever the split (e.g. held-out train images).
    """
    if limit is not None and limit < 1:
        raise VitslimError(f"limit must be a positive number of images, got {limit}")
    cfg = data_config(model, spec)
    if cfg["input_size"][0] not in IMAGE_MODES:
        raise VitslimError(f"models with {cfg['input_size'][0]} input channels are not supported; use 1 or 3")
    if spec == "digits":
        images, labels = digits_split(split)
        items, targets, classes = list(images), labels.tolist(), DIGITS_CLASSES
    else:
        items, targets, classes = _scan(_resolve(spec), split)
    if limit is not None and limit < len(items):
        keep = balanced_subset(targets, limit)
        items, targets = [items[i] for i in keep], [targets[i] for i in keep]
    if augment is not None:
        transform = train_transform(cfg, spec=spec, **augment)
    else:
        transform = build_transform(cfg, "test" if evaluation else split, spec)
    return ImageDataset(items, targets, classes, transform, IMAGE_MODES[cfg["input_size"][0]])


class SeededAugment(torch.utils.data.Dataset):
    """Wraps a dataset so each image's random augmentation depends only on (seed, epoch, index).

    The global RNG states are saved and restored around the transform, so loading images never
    moves the model's random streams (drop-path, Gumbel noise), whatever the worker count.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample_seed = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + index
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            random.seed(sample_seed)
            np.random.seed(sample_seed % 2**32)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


def build_loader(spec: str, split: str = "test", *, model: torch.nn.Module | None = None, batch_size: int = 64,
                 limit: int | None = None, num_workers: int = 0, shuffle: bool | None = None,
                 seed: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader over build_dataset(...); shuffles the train split by default and augments it, both
    reproducibly from `seed`."""
    dataset = build_dataset(spec, split, model=model, limit=limit)
    if split == "train":  # its transform is random: without this, every pass would see other crops
        dataset = SeededAugment(dataset, seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=split == "train" if shuffle is None else shuffle,
        num_workers=num_workers, generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0,
    )


def balanced_subset(targets: Sequence[int], limit: int) -> list[int]:
    """Sorted indices of `limit` items, spread evenly within each class and as equal across classes as possible."""
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, target in enumerate(targets):
        by_class[target].append(index)
    groups = sorted(by_class.values(), key=len)  # small classes first: what they cannot fill goes to larger ones
    keep, left = [], limit
    for k, group in enumerate(groups):
        quota = min(len(group), left // (len(groups) - k))
        keep += [group[i * len(group) // quota] for i in range(quota)]
        left -= quota
    return sorted(keep)


def load_image(path: str | os.PathLike, mode: str = "RGB") -> Image.Image:
    """One image file decoded in PIL ``mode``; a one-line error when it is missing or unreadable."""
    if not pathlib.Path(path).is_file():
        raise VitslimError(f"no image file {path}: give the path of an image (png, jpg, ...)")
    return _load_image(str(path), mode)


def _load_image(path: str, mode: str) -> Image.Image:
    cached = _DECODED.get((path, mode))
    if cached is not None:
        return Image.fromarray(cached)
    try:
        with Image.open(path) as image:
            image = image.convert(mode)
    except (OSError, ValueError) as exc:
        raise VitslimError(f"cannot decode image {path}: {exc}; remove or replace the file") from None
    if image.width * image.height <= _CACHE_MAX_PIXELS:
        _DECODED[(path, mode)] = np.asarray(image)
    return image


def _resolve(spec: str) -> pathlib.Path:
    path = pathlib.Path(spec).expanduser()
    if path.exists():
        return path
    if os.sep in spec or "/" in spec or spec.startswith((".", "~")):
        raise VitslimError(f"dataset path {spec} does not exist")
    root = data_root()
    if root is None:
        raise VitslimError(f"unknown dataset {spec!r} and no data root: set VITSLIM_DATA to the folder that holds "
                           f"{spec}/, or pass a directory")
    if not (root / spec).exists():
        names = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise VitslimError(f"no dataset {spec!r} under {root} (VITSLIM_DATA); available: {', '.join(names) or 'none'}"
                           f"; or pass 'digits' or a directory")
    return root / spec


def _is_image(path: pathlib.Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _scan(root: pathlib.Path, split: str | None) -> tuple[list[str], list[int], list[str]]:
    """(files, labels, class names) of a labels.csv folder, an ImageFolder tree, or its `split` subfolder."""
    if not root.is_dir():
        raise VitslimError(f"dataset path {root} is not a directory: pass an ImageFolder tree or labels.csv + images/")
    if (root / "labels.csv").is_file():
        return _scan_csv(root)
    if split is not None and (root / split).is_dir():
        return _scan(root / split, None)
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    splits = [p.name for p in subdirs if p.name in SPLIT_NAMES]
    if splits:
        raise VitslimError(f"{root} has no {split!r} split folder; present: {', '.join(splits)}")
    if (root / "images").is_dir() and (root / "masks").is_dir():
        raise VitslimError(f"{root} holds segmentation masks; build_dataset reads classification data only")
    files, targets = [], []
    for label, folder in enumerate(subdirs):
        found = sorted(str(p) for p in folder.rglob("*") if _is_image(p))
        files += found
        targets += [label] * len(found)
    if not files:
        loose = sum(1 for p in root.iterdir() if _is_image(p))
        hint = f" ({loose} loose images: move them into class subfolders)" if loose else ""
        raise VitslimError(f"no images in {root}{hint}; expected class subfolders of images, or labels.csv + images/")
    return files, targets, [p.name for p in subdirs]


def _scan_csv(root: pathlib.Path) -> tuple[list[str], list[int], list[str]]:
    with open(root / "labels.csv", newline="") as f:
        reader = csv.DictReader(f)
        if not {"file", "label"} <= set(reader.fieldnames or ()):
            raise VitslimError(f"{root / 'labels.csv'} needs the header 'file,label', found {reader.fieldnames}")
        rows = list(reader)
    if not rows:
        raise VitslimError(f"{root / 'labels.csv'} lists no images")
    image_dir = root / "images" if (root / "images").is_dir() else root
    files = [str(image_dir / row["file"]) for row in rows]
    try:
        targets = [int(row["label"]) for row in rows]
    except ValueError:
        raise VitslimError(f"{root / 'labels.csv'}: every label must be an integer class index") from None
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise VitslimError(f"{len(missing)} images listed in {root / 'labels.csv'} are missing, e.g. {missing[0]}")
    classes = [str(i) for i in range(max(targets) + 1)]
    if (root / "classes.csv").is_file():
        with open(root / "classes.csv", newline="") as f:
            named = {int(row["index"]): row.get("name") or row.get("wnid") or row["index"] for row in csv.DictReader(f)}
        classes = [named.get(i, str(i)) for i in range(max(max(named, default=-1), max(targets)) + 1)]
    return files, targets, classes
