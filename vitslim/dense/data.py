"""Segmentation datasets in the layouts users have, with paired image/mask transforms.

Layouts (``layout="auto"`` tells them apart by their folders):
- ``folder`` (CamVid-style): ``ROOT/SPLIT/images/*.{jpg,png}`` and ``ROOT/SPLIT/masks/*.png`` with
  the same base names. A folder named ``camvid`` is CamVid: 11 classes, 11 = void (ignored).
- ``ade20k``: ``ADEChallengeData2016`` (``images/`` and ``annotations/``, splits ``training`` /
  ``validation``; ``train`` / ``val`` are accepted): 0 is ignored, 1..150 become 0..149.
- ``voc``: Pascal VOC (``JPEGImages``, ``SegmentationClass``, ``ImageSets/Segmentation/SPLIT.txt``):
  21 classes, 255 ignored (the object borders).
- ``cityscapes``: ``leftImg8bit/SPLIT/CITY/*_leftImg8bit.png`` with
  ``gtFine/SPLIT/CITY/*_gtFine_labelTrainIds.png``: 19 classes, 255 ignored.
Every dataset gives masks with one ignore value, ``IGNORE`` (255), whatever the file used.
"""
from __future__ import annotations

import math
import os
import pathlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vitslim.errors import VitslimError

IGNORE = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CAMVID_CLASSES = ("sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car",
                  "pedestrian", "bicyclist")
LAYOUTS = ("folder", "ade20k", "voc", "cityscapes")


@dataclass(frozen=True)
class LabelSpec:
    """How a layout's mask files map to training labels 0..num_classes-1 and IGNORE."""

    num_classes: int
    void: int | None = None  # a file value that means "ignore" besides 255 (CamVid's 11)
    shift: int = 0  # subtracted from every label (ADE20K: 1..150 -> 0..149, 0 -> ignore)

    def apply(self, mask: np.ndarray) -> np.ndarray:
        """File values -> labels, with IGNORE for void."""
        labels = mask.astype(np.int64)
        ignore = labels == IGNORE
        if self.void is not None:
            ignore |= labels == self.void
        if self.shift:
            ignore |= labels < self.shift
            labels = labels - self.shift
        labels[ignore] = IGNORE
        return labels


def detect_layout(root: pathlib.Path) -> str:
    """The layout of a dataset folder, or a VitslimError that says what was looked for."""
    if (root / "ADEChallengeData2016").is_dir() or ((root / "images").is_dir() and (root / "annotations").is_dir()):
        return "ade20k"
    if (root / "JPEGImages").is_dir() and (root / "SegmentationClass").is_dir():
        return "voc"
    if (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir():
        return "cityscapes"
    if any((split / "images").is_dir() and (split / "masks").is_dir() for split in root.iterdir() if split.is_dir()):
        return "folder"
    raise VitslimError(
        f"{root} is no segmentation layout vitslim knows: expected SPLIT/images + SPLIT/masks (CamVid-style), "
        "ADEChallengeData2016 (images/, annotations/), Pascal VOC (JPEGImages/, SegmentationClass/) or "
        "Cityscapes (leftImg8bit/, gtFine/)")


def _pairs_folder(root: pathlib.Path, split: str) -> list[tuple[pathlib.Path, pathlib.Path]]:
    images, masks = root / split / "images", root / split / "masks"
    if not images.is_dir() or not masks.is_dir():
        have = sorted(p.name for p in root.iterdir() if (p / "images").is_dir())
        raise VitslimError(f"{root} has no split {split!r} with images/ and masks/ (splits here: {', '.join(have)})")
    pairs = []
    for image in sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        mask = masks / f"{image.stem}.png"
        if not mask.is_file():
            raise VitslimError(f"{image} has no mask {mask}: every image needs a .png mask of the same name")
        pairs.append((image, mask))
    return pairs


def _pairs_ade20k(root: pathlib.Path, split: str) -> list[tuple[pathlib.Path, pathlib.Path]]:
    if (root / "ADEChallengeData2016").is_dir():
        root = root / "ADEChallengeData2016"
    split = {"train": "training", "val": "validation"}.get(split, split)
    images = root / "images" / split
    if not images.is_dir():
        raise VitslimError(f"ADE20K at {root} has no split {split!r} (training, validation)")
    return [(p, root / "annotations" / split / f"{p.stem}.png") for p in sorted(images.glob("*.jpg"))]


def _pairs_voc(root: pathlib.Path, split: str) -> list[tuple[pathlib.Path, pathlib.Path]]:
    listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not listing.is_file():
        raise VitslimError(f"Pascal VOC at {root} has no split list {listing} (train, val, trainval)")
    names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    return [(root / "JPEGImages" / f"{n}.jpg", root / "SegmentationClass" / f"{n}.png") for n in names]


def _pairs_cityscapes(root: pathlib.Path, split: str) -> list[tuple[pathlib.Path, pathlib.Path]]:
    images = root / "leftImg8bit" / split
    if not images.is_dir():
        raise VitslimError(f"Cityscapes at {root} has no split {split!r} (train, val, test)")
    pairs = []
    for image in sorted(images.glob("*/*_leftImg8bit.png")):
        stem = image.name[: -len("_leftImg8bit.png")]
        pairs.append((image, root / "gtFine" / split / image.parent.name / f"{stem}_gtFine_labelTrainIds.png"))
    return pairs


_PAIRS = {"folder": _pairs_folder, "ade20k": _pairs_ade20k, "voc": _pairs_voc, "cityscapes": _pairs_cityscapes}
_LABELS = {"ade20k": LabelSpec(150, shift=1), "voc": LabelSpec(21), "cityscapes": LabelSpec(19)}


class SegmentationFolder(torch.utils.data.Dataset):
    """(image, mask) pairs of one split; ``transform(image, labels)`` gives what a loader batches."""

    def __init__(self, root: str | os.PathLike, split: str = "train", *, layout: str = "auto",
                 num_classes: int | None = None, void: int | None = None,
                 transform: Callable[[Any, np.ndarray], Any] | None = None):
        self.root = pathlib.Path(root).expanduser()
        if not self.root.is_dir():
            raise VitslimError(f"segmentation data {self.root} is not a folder")
        if layout not in ("auto", *LAYOUTS):
            raise VitslimError(f"layout must be auto or one of {', '.join(LAYOUTS)}, got {layout!r}")
        self.layout = detect_layout(self.root) if layout == "auto" else layout
        self.pairs = _PAIRS[self.layout](self.root, split)
        if not self.pairs:
            raise VitslimError(f"no images in split {split!r} of {self.root} ({self.layout} layout)")
        self.labels = self._label_spec(num_classes, void)
        self.num_classes, self.split, self.transform = self.labels.num_classes, split, transform
        self.class_names = CAMVID_CLASSES if self._is_camvid() else tuple(str(i) for i in range(self.num_classes))

    def _is_camvid(self) -> bool:
        return self.layout == "folder" and self.root.name.lower() == "camvid"

    def _label_spec(self, num_classes: int | None, void: int | None) -> LabelSpec:
        if self.layout in _LABELS:
            spec = _LABELS[self.layout]
            return LabelSpec(num_classes or spec.num_classes, void if void is not None else spec.void, spec.shift)
        if self._is_camvid():
            return LabelSpec(num_classes or len(CAMVID_CLASSES), void if void is not None else len(CAMVID_CLASSES))
        if num_classes is None:
            raise VitslimError(f"{self.root}: say how many classes the masks have (num_classes=, --num-classes) "
                               "and which value is void if any (void=, --void; 255 is always ignored)")
        return LabelSpec(num_classes, void)

    def __len__(self) -> int:
        return len(self.pairs)

    def read(self, index: int) -> tuple[Any, np.ndarray]:
        """The image (PIL RGB) and its labels (H, W) int64 with IGNORE, checked against the image."""
        from PIL import Image

        image_path, mask_path = self.pairs[index]
        if not mask_path.is_file():
            raise VitslimError(f"{image_path} has no mask {mask_path}")
        image = Image.open(image_path).convert("RGB")
        mask = np.asarray(Image.open(mask_path))
        if mask.ndim != 2:
            raise VitslimError(f"{mask_path} is not a single-channel label image (shape {mask.shape})")
        if mask.shape != (image.height, image.width):
            raise VitslimError(f"{mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image {image_path.name} is "
                               f"{image.width}x{image.height}: masks must match their images pixel for pixel")
        labels = self.labels.apply(mask)
        bad = (labels != IGNORE) & (labels >= self.num_classes)
        if bad.any():
            values = sorted(set(mask[bad].tolist()))[:5]
            raise VitslimError(f"{mask_path} has label values {values} outside the {self.num_classes} classes of "
                               f"this dataset: set num_classes (and void) to match the masks")
        return image, labels

    def __getitem__(self, index: int) -> Any:
        image, labels = self.read(index)
        return self.transform(image, labels) if self.transform is not None else (image, labels)


class PairedTransform:
    """Image and mask together: training scales, pads, crops and flips; evaluation resizes the image only.

    Training: a random scale in ``scale`` of ``size``'s short side, padding (image 0, mask IGNORE) to at
    least ``size``, a random ``size`` crop and a horizontal flip, so the mask follows every step.
    Evaluation: the whole image resized to ``size`` (the model's input), the mask kept at its own
    resolution, where the logits are upsampled to be scored.
    """

    def __init__(self, size: Sequence[int], *, train: bool, mean: Sequence[float], std: Sequence[float],
                 scale: tuple[float, float] = (0.5, 2.0), flip: bool = True):
        self.size = (int(size[0]), int(size[1]))
        self.train, self.scale, self.flip = train, scale, flip
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: Any, labels: np.ndarray) -> tuple[Tensor, Tensor]:
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
        y = torch.from_numpy(labels)
        if not self.train:
            x = F.interpolate(x[None], size=self.size, mode="bilinear", align_corners=False)[0]
            return (x - self.mean) / self.std, y
        h, w = y.shape
        s = math.exp(float(torch.empty(()).uniform_(math.log(self.scale[0]), math.log(self.scale[1]))))
        factor = s * min(self.size) / min(h, w)
        nh, nw = max(1, round(h * factor)), max(1, round(w * factor))
        x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
        y = F.interpolate(y[None, None].float(), size=(nh, nw), mode="nearest-exact")[0, 0].long()
        x = (x - self.mean) / self.std  # normalised first, so padding is the mean colour
        ph, pw = max(0, self.size[0] - nh), max(0, self.size[1] - nw)
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), value=0.0)
            y = F.pad(y, (0, pw, 0, ph), value=IGNORE)
        top = int(torch.randint(0, y.shape[0] - self.size[0] + 1, ()))
        left = int(torch.randint(0, y.shape[1] - self.size[1] + 1, ()))
        x = x[:, top:top + self.size[0], left:left + self.size[1]]
        y = y[top:top + self.size[0], left:left + self.size[1]]
        if self.flip and bool(torch.rand(()) < 0.5):
            x, y = x.flip(-1), y.flip(-1)
        return x.contiguous(), y.contiguous()


def segmentation_split(root: str | os.PathLike, split: str, model: torch.nn.Module, size: Sequence[int], *,
                       train: bool, **folder_options: Any) -> SegmentationFolder:
    """``split`` of a segmentation folder at ``size``, normalised as ``model`` expects (its data config).

    ``train`` picks the paired augmentation; ``folder_options`` go to ``SegmentationFolder`` (layout,
    num_classes, void).
    """
    from vitslim.data import data_config

    cfg = data_config(model)
    transform = PairedTransform(size, train=train, mean=cfg["mean"], std=cfg["std"])
    return SegmentationFolder(root, split, transform=transform, **folder_options)
