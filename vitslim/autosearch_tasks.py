"""What ``vitslim auto`` does per task: the model it patches, the outputs it ranks by, the metric and the file it writes.

``SearchTask`` is image classification (a timm ViT and its logits); ``SegmentTask`` overrides what
segmentation does differently: the methods patch the backbone of a ``SegmentationModel`` (a
``vitslim segment train`` checkpoint), the candidates are ranked by the KL divergence of their
per-patch class predictions (the head's logits on the patch grid) from the dense model's, the
held-out and reported metric is mIoU (at the masks' resolution), and the chosen model is written as
a segmentation checkpoint that ``vitslim segment eval`` and ``vitslim.train.load_segmentation`` read.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vitslim.data import build_dataset
from vitslim.dense.data import segmentation_split
from vitslim.dense.heads import SegmentationModel, upsample
from vitslim.dense.metrics import ConfusionMatrix, evaluate_segmentation
from vitslim.errors import VitslimError
from vitslim.export.files import save
from vitslim.measure.accuracy import evaluate
from vitslim.measure.speed import torch_threads
from vitslim.train.checkpoint import save_checkpoint
from vitslim.train.config import TrainConfig
from vitslim.train.segmentation import SegmentationTask
from vitslim.train.task import Task


class SearchTask:
    """Image classification; ``SegmentTask`` overrides what segmentation does differently (each method documented)."""

    name = "classify"
    metric = "top1"  # held-out and reported quality (higher is better), beside the KL that ranks
    output = "model.safetensors"

    def __init__(self, model: nn.Module):
        self.model = model  # the user's model; ``backbone`` is the part the methods patch

    def backbone(self) -> nn.Module:
        """The ViT the methods patch (for classification, the model itself)."""
        return self.model

    def assemble(self, backbone: nn.Module) -> nn.Module:
        """The whole model around a (patched) copy of the backbone, as it is scored and saved."""
        return backbone

    def train_split(self, data: str) -> tuple[torch.utils.data.Dataset, list[int] | None]:
        """The data's train split with the evaluation transform (no augmentation: ranked as evaluated), and each
        image's class for spreading the held-out images over the classes (None: no class per image)."""
        train = build_dataset(data, "train", model=self.backbone(), evaluation=True)
        return train, list(train.targets)

    def calibration_data(self, images: torch.utils.data.Dataset) -> torch.utils.data.Dataset:
        """What the calibration passes iterate: (image, label) pairs (labels give the gradients their targets)."""
        return images

    def training_task(self) -> Task:
        """What the training engine fine-tunes the best candidates as (``--finetune-budget``)."""
        return Task()

    def training_images(self, data: str, config: TrainConfig) -> torch.utils.data.Dataset:
        """The train split with ``config``'s augmentation, indexed as ``train_split``'s images."""
        return build_dataset(data, "train", model=self.backbone(), augment=config.augment())

    def loader(self, images: torch.utils.data.Dataset, batch_size: int) -> torch.utils.data.DataLoader:
        """Batches of ``images`` for scoring and reporting."""
        return torch.utils.data.DataLoader(images, batch_size=batch_size)

    def outputs(self, model: nn.Module, images: torch.utils.data.Dataset, batch_size: int) -> tuple[Tensor, float]:
        """The logits the KL compares (N, ..., classes; one distribution per row of the last dimension) and the
        metric on ``images``; the model runs as it is (the search builds its models in eval mode)."""
        logits, hits = [], 0
        with torch.inference_mode():
            for x, y in self.loader(images, batch_size):
                out = model(x).float()
                hits += int((out.argmax(1) == y).sum())
                logits.append(out)
        scores = torch.cat(logits)
        return scores, hits / len(scores)

    def report(self, model: nn.Module, data: str, split: str, limit: int | None, batch_size: int,
               threads: int) -> dict[str, Any]:
        """The metric (and its companions) on the report split, and how many images it counted."""
        images = build_dataset(data, split, model=self.backbone(), limit=limit, evaluation=True)
        scores = evaluate(model, self.loader(images, batch_size), progress=False, threads=threads)
        return {"top1": scores["top1"], "top5": scores["top5"], "n": scores["n"]}

    def save(self, model: nn.Module, out: Path, record: dict[str, Any]) -> Path:
        """Write the chosen model in the deployment format (``vitslim.export.save``; bf16 weights when the search
        ran at bf16); its path."""
        path = out / self.output
        save(model, path, precision="bf16" if record.get("precision") == "bf16" else "fp32")
        return path


class SegmentTask(SearchTask):
    """Semantic segmentation: a ``SegmentationModel`` whose backbone the methods patch under its dense-trained head."""

    name = "segment"
    metric = "miou"
    output = "model.pt"

    def __init__(self, model: nn.Module, size: tuple[int, int] | None = None):
        if not isinstance(model, SegmentationModel):
            raise VitslimError("auto --task segment takes a segmentation model: a `vitslim segment train` checkpoint "
                               "(--model OUT/best.pt) or a vitslim.dense.SegmentationModel")
        super().__init__(model)
        self.size = tuple(size) if size is not None else tuple(model.backbone.patch_embed.img_size)

    def backbone(self) -> nn.Module:
        """The ViT inside the segmentation model."""
        return self.model.backbone

    def assemble(self, backbone: nn.Module) -> nn.Module:
        """The dense-trained head on the (patched) backbone: the methods are switched on under it."""
        return SegmentationModel(backbone, self.model.head, restore=self.model.restore).eval()

    def train_split(self, data: str) -> tuple[torch.utils.data.Dataset, list[int] | None]:
        """The train split resized to the model's input size, masks at their own resolution; no class per image."""
        try:
            train = self._split(data, "train")
        except VitslimError as exc:
            raise VitslimError(f"auto --task segment holds images out from the folder's train split ({exc})") from None
        return train, None

    def calibration_data(self, images: torch.utils.data.Dataset) -> torch.utils.data.Dataset:
        """The images alone: the calibration passes take the backbone's own predictions as their targets."""
        return _ImagesOnly(images)

    def training_task(self) -> Task:
        """Pixel cross-entropy and feature distillation, backbone and head trained (``SegmentationTask``)."""
        return SegmentationTask(self.model.num_classes, size=self.size)

    def training_images(self, data: str, config: TrainConfig) -> torch.utils.data.Dataset:
        """The train split with the paired segmentation augmentation (scale, crop, flip)."""
        return segmentation_split(data, "train", self.backbone(), self.size, train=True,
                                  num_classes=self.model.num_classes)

    def loader(self, images: torch.utils.data.Dataset, batch_size: int) -> torch.utils.data.DataLoader:
        """One image at a time: masks keep their own resolution, which may differ between images."""
        return torch.utils.data.DataLoader(images, batch_size=1)

    def outputs(self, model: nn.Module, images: torch.utils.data.Dataset, batch_size: int) -> tuple[Tensor, float]:
        """The head's per-patch logits (N, patches, classes) and mIoU on ``images`` at the masks' resolution."""
        matrix = ConfusionMatrix(self.model.num_classes)
        logits = []
        with torch.inference_mode():
            for x, masks in self.loader(images, batch_size):
                grid = model.grid_logits(x).float()
                logits.append(grid.flatten(2).transpose(1, 2))
                matrix.update(upsample(upsample(grid, x.shape[-2:]), masks.shape[-2:]).argmax(1), masks)
        return torch.cat(logits), matrix.compute()["miou"]

    def report(self, model: nn.Module, data: str, split: str, limit: int | None, batch_size: int,
               threads: int) -> dict[str, Any]:
        """mIoU and pixel accuracy over the report split (``vitslim.dense.evaluate_segmentation``)."""
        images = self._split(data, split)
        if limit:
            images = torch.utils.data.Subset(images, range(min(limit, len(images))))
        with torch_threads(threads):
            scores = evaluate_segmentation(model, self.loader(images, batch_size), self.model.num_classes)
        return {"miou": scores["miou"], "pixel_accuracy": scores["pixel_accuracy"], "n": len(images)}

    def save(self, model: nn.Module, out: Path, record: dict[str, Any]) -> Path:
        """A segmentation checkpoint of the chosen model (patched backbone, head, the search's record)."""
        path = out / self.output
        state = SegmentationTask(self.model.num_classes).model_state(model)
        save_checkpoint(path, {**state, "run_record": {**record, "size": list(self.size)}})
        return path

    def _split(self, data: str, split: str) -> torch.utils.data.Dataset:
        return segmentation_split(data, split, self.backbone(), self.size, train=False,
                                  num_classes=self.model.num_classes)


class _ImagesOnly(torch.utils.data.Dataset):
    """A segmentation dataset's images without their masks."""

    def __init__(self, images: torch.utils.data.Dataset):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tensor:
        return self.images[index][0]


TASKS = {"classify": SearchTask, "segment": SegmentTask}


def search_task(model: nn.Module, task: str | None = None) -> SearchTask:
    """The task for ``model``: ``task`` by name, or segmentation for a ``SegmentationModel`` and classification
    otherwise; the model is copied (the search never changes the user's)."""
    if task is None:
        task = "segment" if isinstance(model, SegmentationModel) else "classify"
    if task not in TASKS:
        raise VitslimError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if task == "classify" and isinstance(model, SegmentationModel):
        raise VitslimError("this is a segmentation model: search it with task='segment' (--task segment)")
    return TASKS[task](copy.deepcopy(model))
