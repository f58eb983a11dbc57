"""Semantic segmentation through the training engine: ``SegmentationTask`` and its checkpoints.

The trained model is a ``vitslim.dense.SegmentationModel`` (a patched or plain ViT backbone and a
head). What differs from classification, and nothing else:
- **data**: ``SegmentationFolder`` pairs with ``PairedTransform`` (scale, pad, crop, flip for
  training; the whole image resized for evaluation, masks at their own resolution); no mixup;
- **loss**: per-pixel cross-entropy with the ignore index; with ``kd_weight > 0`` plus
  ``kd_weight`` x MSE between the student's full-grid features and the dense teacher's final-norm
  patch tokens (the dense backbone: feature distillation, the segmentation form of the methods'
  self-distillation); plus the method's own terms (keep-ratio losses, token targets);
- **metric**: mIoU over the whole validation split (confusion matrices summed over processes)
  picks ``best.pt``;
- **frozen backbone** (``freeze_backbone=True``): only the head trains (the backbone and its
  method's modules stay fixed, so the method's own loss terms are left out).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitslim.dense.data import IGNORE, segmentation_split
from vitslim.dense.heads import SegmentationModel, build_head
from vitslim.dense.metrics import confusion
from vitslim.errors import VitslimError
from vitslim.train.checkpoint import model_state, read_checkpoint, restore_model
from vitslim.train.config import TrainConfig
from vitslim.train.losses import FINAL, Criterion
from vitslim.train.task import Task, TeacherFn, all_reduce_sum, eval_shard, teacher_outputs


class SegmentationTask(Task):
    """Train a ``SegmentationModel``: pixel cross-entropy (ignore index), feature distillation, mIoU."""

    name = "segmentation"
    metric = "miou"
    backbone_prefix = "backbone."

    def __init__(self, num_classes: int, *, size: Sequence[int] | None = None, ignore_index: int = IGNORE,
                 freeze_backbone: bool = False, eval_batch_size: int = 1):
        self.num_classes, self.ignore_index, self.freeze_backbone = num_classes, ignore_index, freeze_backbone
        self.size = tuple(size) if size is not None else None
        self.eval_batch_size = eval_batch_size

    def backbone(self, model: nn.Module) -> nn.Module:
        """The ViT inside the ``SegmentationModel``."""
        if not isinstance(model, SegmentationModel):
            raise VitslimError("SegmentationTask trains a vitslim.dense.SegmentationModel (a backbone and a head); "
                               f"got {type(model).__name__}")
        return model.backbone

    def model_state(self, model: nn.Module) -> dict[str, Any]:
        """The backbone's architecture, method and options, the head's spec, and every weight."""
        state = model_state(self.backbone(model))
        state["model"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        state["head"] = model.head.spec()
        state["restore"] = model.restore
        return state

    def prepare(self, model: nn.Module, config: TrainConfig) -> None:
        """Freeze the whole backbone (its method's modules included) when asked."""
        if self.freeze_backbone:
            self.backbone(model).requires_grad_(False)

    def dataset(self, data: Any, split: str, model: nn.Module, config: TrainConfig | None) -> Any:
        """A folder spec becomes ``SegmentationFolder`` with ``PairedTransform`` at ``size``; objects pass as given."""
        if not isinstance(data, (str, os.PathLike)):
            return data
        if self.size is None:
            raise VitslimError("SegmentationTask(size=(H, W)) is needed to read a segmentation folder")
        return segmentation_split(data, split, self.backbone(model), self.size, train=config is not None,
                                  num_classes=self.num_classes)

    def mixup(self, config: TrainConfig, world: int, model: nn.Module):
        """None: mixup and cutmix blend whole-image labels, which masks cannot follow."""
        if config.mixup > 0 or config.cutmix > 0:
            raise VitslimError("mixup/cutmix do not apply to segmentation masks: set mixup=0 and cutmix=0")
        return None

    def forward(self, model: nn.Module, images: Tensor) -> tuple[Any, list]:
        """(logits, full-grid features) and the backbone method's aux list."""
        logits, fmap, aux = model.forward_parts(images)
        return (logits, fmap), aux

    def teacher_outputs(self, teacher: nn.Module, images: Tensor) -> TeacherFn:
        """The dense teacher backbone's outputs (its final-norm patch tokens are the feature target)."""
        return teacher_outputs(teacher, images)

    def loss(self, criterion: Criterion, outputs: Any, targets: Tensor, aux: list,
             teacher: TeacherFn | None) -> tuple[Tensor, dict[str, Tensor]]:
        """Pixel CE (ignore index) + kd_weight x feature MSE to the teacher + the method's terms."""
        logits, fmap = outputs
        ce = F.cross_entropy(logits.float(), targets, ignore_index=self.ignore_index,
                             label_smoothing=criterion.label_smoothing)
        parts: dict[str, Tensor] = {"ce": ce}
        aux = [] if self.freeze_backbone else list(aux)
        _, teacher_tokens = criterion.ask_teacher(aux, teacher)
        total = ce
        if criterion.kd_weight > 0:
            target = teacher_tokens[FINAL]
            student = fmap.flatten(2).transpose(1, 2)
            if student.shape != target.shape:
                raise VitslimError(f"feature distillation: student features {tuple(student.shape)} and teacher "
                                   f"tokens {tuple(target.shape)} differ; the teacher must be the dense backbone")
            parts["feature_kd"] = F.mse_loss(student.float(), target.float())
            total = total + criterion.kd_weight * parts["feature_kd"]
        return criterion.add_method_terms(total, parts, aux, teacher_tokens)

    def evaluate(self, model: nn.Module, dataset, rank: int, world: int, device: torch.device,
                 progress: bool) -> dict[str, Any]:
        """mIoU, pixel accuracy and per-class IoU over the split, counted at the masks' resolution."""
        shard = eval_shard(dataset, rank, world)
        loader = torch.utils.data.DataLoader(shard, batch_size=self.eval_batch_size)
        matrix = confusion(model, loader, self.num_classes, ignore_index=self.ignore_index, device=device,
                           progress=progress)
        matrix.counts = all_reduce_sum(matrix.counts.to(torch.float64)).round().long()
        images = int(all_reduce_sum(torch.tensor([float(len(shard))], dtype=torch.float64)).item())
        return {**matrix.compute(), "n": images}

    def describe(self, record: dict[str, Any]) -> str:
        """The evaluation part of an epoch's log line."""
        return f"val mIoU {record['miou']:.2%} (pixel accuracy {record['pixel_accuracy']:.2%}, {record['n']} images)"


def segmentation_model(backbone: nn.Module, head: str, num_classes: int, *, restore: str = "dropped",
                       **head_options: Any) -> SegmentationModel:
    """A ``SegmentationModel`` with a new head of kind ``head`` ("linear" or "mask") on ``backbone``."""
    return SegmentationModel(backbone, build_head(head, backbone.num_features, num_classes, **head_options),
                             restore=restore)


def load_segmentation(path: str | os.PathLike, *, backbone: nn.Module | None = None) -> SegmentationModel:
    """A trained ``SegmentationModel`` from a segmentation training checkpoint, patched as trained, in eval mode.

    ``backbone``: the unpatched ViT to fill, for a model built by hand (its checkpoint records no architecture).
    """
    return segmentation_from_payload(read_checkpoint(path), backbone=backbone, source=str(path))


def segmentation_from_payload(payload: dict[str, Any], *, backbone: nn.Module | None = None,
                              source: str = "the checkpoint") -> SegmentationModel:
    """``load_segmentation`` on a checkpoint already read (``read_checkpoint``)."""
    if "head" not in payload:
        raise VitslimError(f"{source} is not a segmentation checkpoint (it has no head): train one with "
                           "`vitslim segment train`")
    weights = payload["model"]
    backbone_payload = {**payload, "model": {k[len("backbone."):]: v for k, v in weights.items()
                                             if k.startswith("backbone.")}}
    backbone = restore_model(backbone_payload, backbone)
    spec = dict(payload["head"])
    head = build_head(spec.pop("kind"), spec.pop("dim"), spec.pop("num_classes"), **spec)
    head.load_state_dict({k[len("head."):]: v for k, v in weights.items() if k.startswith("head.")})
    return SegmentationModel(backbone, head, restore=payload.get("restore", "dropped")).eval()
