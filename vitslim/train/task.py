"""What a training run optimises and reports: ``Task``, whose defaults are image classification.

``fit`` asks its task for every step that depends on what the model predicts: the datasets, the
student's forward, the teacher's outputs, the loss, the evaluation and the metric that picks
``best.pt``. Another task (``vitslim.train.segmentation.SegmentationTask``) overrides what differs;
the engine itself (processes, sampling, optimiser, schedule, checkpoints, resume) stays the same.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vitslim.errors import VitslimError
from vitslim.families import family_of
from vitslim.patch import is_patched
from vitslim.train.checkpoint import model_state
from vitslim.train.config import TrainConfig
from vitslim.train.losses import FINAL, Criterion

TeacherFn = Callable[[set[int]], tuple[Tensor, dict[int, Tensor]]]


def all_reduce_sum(values: Tensor) -> Tensor:
    """The sum of ``values`` over every process (itself when not distributed)."""
    if dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
    return values


def eval_shard(dataset, rank: int, world: int):
    """This rank's every world-th item of ``dataset``."""
    return dataset if world == 1 else torch.utils.data.Subset(dataset, range(rank, len(dataset), world))


def teacher_outputs(teacher: nn.Module, images: Tensor) -> TeacherFn:
    """A closure giving the dense teacher's logits and patch tokens of the asked blocks (one forward, cached)."""
    cache: dict[str, Any] = {}

    def run(blocks: set[int]) -> tuple[Tensor, dict[int, Tensor]]:
        if "logits" in cache:
            return cache["logits"], cache["tokens"]
        family = family_of(teacher)
        p, teacher_blocks = family.num_prefix(teacher), family.blocks(teacher)
        tokens: dict[int, Tensor] = {}
        hooks = [teacher_blocks[b].register_forward_hook(
            lambda _m, _i, out, b=b: tokens.__setitem__(b, out[:, p:])) for b in blocks if b != FINAL]
        try:
            with torch.no_grad():
                features, tokens[FINAL] = family.teacher_tokens(teacher, images)  # final-norm patch tokens too
                logits = teacher.forward_head(features)
        finally:
            for h in hooks:
                h.remove()
        cache.update(logits=logits, tokens=tokens)
        return logits, tokens

    return run


def evaluate_distributed(model: nn.Module, dataset, rank: int, world: int, device: torch.device,
                         progress: bool = False, batch_size: int = 256) -> dict[str, Any]:
    """Top-1/top-5 over ``dataset`` with each rank taking every world-th image; counts summed across ranks."""
    from vitslim.measure import evaluate

    loader = torch.utils.data.DataLoader(eval_shard(dataset, rank, world), batch_size=batch_size)
    result = evaluate(model, loader, progress=progress, device=device)
    counts = torch.tensor([round(result["top1"] * result["n"]), round(result["top5"] * result["n"]), result["n"]],
                          dtype=torch.float64)
    c1, c5, n = all_reduce_sum(counts).tolist()
    return {"top1": c1 / n, "top5": c5 / n, "n": int(n)}


class Task:
    """Image classification; subclasses override what their task does differently (each method documented)."""

    name = "classification"
    metric = "top1"  # the key of ``evaluate``'s result that picks best.pt (higher is better)
    backbone_prefix = ""  # parameter names of the backbone start with this; the others are a head's

    def backbone(self, model: nn.Module) -> nn.Module:
        """The (possibly patched) ViT inside the trained model: its method decides the default teacher."""
        return model

    def model_state(self, model: nn.Module) -> dict[str, Any]:
        """What a checkpoint stores to rebuild the model (``checkpoint.model_state``)."""
        return model_state(model)

    def prepare(self, model: nn.Module, config: TrainConfig) -> None:
        """Adjust the model before the optimiser is built (e.g. freeze parts); nothing for classification."""

    def dataset(self, data: Any, split: str, model: nn.Module, config: TrainConfig | None) -> Any:
        """The Dataset for ``split``: a spec string goes through ``build_dataset``; objects are used as given."""
        from vitslim.data import build_dataset

        if isinstance(data, str):
            return build_dataset(data, split, model=model, augment=config.augment() if config is not None else None)
        return data

    def mixup(self, config: TrainConfig, world: int, model: nn.Module):
        """timm's Mixup for the configured mixup/cutmix, or None when both are off."""
        if config.mixup <= 0 and config.cutmix <= 0:
            return None
        from timm.data import Mixup

        if (config.batch_size // world) % 2:
            raise VitslimError("mixup/cutmix need an even batch per process: change --batch-size")
        return Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, label_smoothing=config.label_smoothing,
                     num_classes=model.num_classes)

    def forward(self, model: nn.Module, images: Tensor) -> tuple[Any, list]:
        """The student's training outputs and the aux list its method left in the state (empty if unpatched)."""
        if is_patched(model):
            state = model.forward_tokens(images)
            return model.forward_head_state(state), state.aux
        return model(images), []

    def teacher_outputs(self, teacher: nn.Module, images: Tensor) -> TeacherFn:
        """What the loss may ask of the teacher for this batch (``teacher_outputs``)."""
        return teacher_outputs(teacher, images)

    def loss(self, criterion: Criterion, outputs: Any, targets: Tensor, aux: list,
             teacher: TeacherFn | None) -> tuple[Tensor, dict[str, Tensor]]:
        """The total loss and its named parts."""
        return criterion(outputs, targets, aux, teacher)

    def evaluate(self, model: nn.Module, dataset, rank: int, world: int, device: torch.device,
                 progress: bool) -> dict[str, Any]:
        """Metrics over ``dataset`` (sharded over the processes, summed); must contain ``metric``."""
        return evaluate_distributed(model, dataset, rank, world, device, progress)

    def describe(self, record: dict[str, Any]) -> str:
        """The evaluation part of an epoch's log line."""
        return f"val top-1 {record['top1']:.2%} (top-5 {record['top5']:.2%}, {record['n']} images)"


class StudentForward(nn.Module):
    """The student's training forward as one module (what DDP wraps): (outputs, method aux terms)."""

    def __init__(self, model: nn.Module, task: Task | None = None):
        super().__init__()
        self.model, self.task = model, task or Task()

    def forward(self, images: Tensor) -> tuple[Any, list]:
        """The task's training forward of the model."""
        return self.task.forward(self.model, images)
