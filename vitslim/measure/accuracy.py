"""Top-1 / top-5 accuracy of a model on a data loader."""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from vitslim.measure.speed import torch_threads


def evaluate(model: nn.Module, loader: Iterable, *, progress: bool = True, desc: str = "eval",
             threads: int | None = None, device: torch.device | str | None = None) -> dict[str, Any]:
    """Top-1 and top-5 accuracy (fractions) and the number of images, in eval + inference mode."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = total = 0
    try:
        with torch_threads(threads), torch.inference_mode():
            for images, labels in tqdm(loader, desc=desc, disable=not progress, leave=False):
                if device is not None:
                    images, labels = images.to(device), labels.to(device)
                logits = model(images)
                top = logits.topk(min(5, logits.shape[1]), dim=1).indices
                hits = top == labels[:, None]
                correct1 += int(hits[:, 0].sum())
                correct5 += int(hits.any(dim=1).sum())
                total += labels.shape[0]
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("the data loader gave no images")
    return {"top1": correct1 / total, "top5": correct5 / total, "n": total}
