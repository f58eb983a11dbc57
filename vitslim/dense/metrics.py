"""Segmentation metrics over a whole split: one confusion matrix, then IoU per class, mIoU, pixel accuracy.

Accumulated over every valid pixel of the split (not averaged per image), at the masks' resolution,
as mmsegmentation and Segmenter report them. A class that appears neither in the labels nor in the
predictions of the split has no IoU (NaN) and is left out of the mean.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from vitslim.dense.data import IGNORE
from vitslim.errors import VitslimError


class ConfusionMatrix:
    """Counts (label, prediction) pairs over the valid pixels; ``compute`` gives the metrics."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE):
        if num_classes < 1:
            raise VitslimError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.long)  # rows: label, columns: prediction

    def update(self, prediction: Tensor, target: Tensor) -> None:
        """Add a batch: ``prediction`` class ids or logits (B, K, H, W), ``target`` labels (B, H, W)."""
        if prediction.dim() == target.dim() + 1:
            prediction = prediction.argmax(1)
        if prediction.shape != target.shape:
            raise VitslimError(f"prediction {tuple(prediction.shape)} and labels {tuple(target.shape)} differ in "
                               "shape: upsample the logits to the mask size first")
        valid = target != self.ignore_index
        labels, predicted = target[valid].long().cpu(), prediction[valid].long().cpu()
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            bad = labels[(labels < 0) | (labels >= self.num_classes)].unique()[:5].tolist()
            raise VitslimError(f"labels {bad} are outside 0..{self.num_classes - 1} (ignore index "
                               f"{self.ignore_index}): check num_classes and the dataset's label mapping")
        self.counts += torch.bincount(labels * self.num_classes + predicted,
                                      minlength=self.num_classes ** 2).view(self.num_classes, self.num_classes)

    def compute(self) -> dict[str, Any]:
        """``miou``, ``pixel_accuracy``, ``iou`` (per class, None where undefined) and ``pixels``."""
        counts = self.counts.double()
        hits = counts.diag()
        union = counts.sum(0) + counts.sum(1) - hits
        iou = torch.where(union > 0, hits / union.clamp(min=1), torch.full_like(hits, float("nan")))
        total = counts.sum()
        defined = ~iou.isnan()
        return {"miou": float(iou[defined].mean()) if bool(defined.any()) else float("nan"),
                "pixel_accuracy": float(hits.sum() / total) if total > 0 else float("nan"),
                "iou": [None if v != v else float(v) for v in iou.tolist()], "pixels": int(total)}


@torch.no_grad()
def confusion(model: nn.Module, loader: Iterable, num_classes: int, *, ignore_index: int = IGNORE,
              device: str | torch.device = "cpu", progress: bool = False) -> ConfusionMatrix:
    """The confusion matrix of ``model`` (images -> logits) over ``loader``'s (images, masks).

    Logits whose size differs from the masks' (the model ran at a fixed input size) are upsampled
    bilinearly to the mask, so the metrics are at the labels' own resolution.
    """
    was_training = model.training
    model.eval()
    matrix = ConfusionMatrix(num_classes, ignore_index)
    try:
        for images, masks in tqdm(loader, desc="segmentation eval", disable=not progress, leave=False):
            logits = model(images.to(device))
            if logits.shape[-2:] != masks.shape[-2:]:
                logits = F.interpolate(logits.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)
            matrix.update(logits.argmax(1).cpu(), masks)
    finally:
        model.train(was_training)
    return matrix


def evaluate_segmentation(model: nn.Module, loader: Iterable, num_classes: int, *, ignore_index: int = IGNORE,
                          device: str | torch.device = "cpu", progress: bool = False) -> dict[str, Any]:
    """mIoU, pixel accuracy and per-class IoU of ``model`` over ``loader`` (``confusion(...).compute()``)."""
    return confusion(model, loader, num_classes, ignore_index=ignore_index, device=device,
                     progress=progress).compute()
