"""One calibration loop for the methods that score on data: gradients of the dense model's cross-entropy.

Prune-and-Merge (gradient-weighted attention) and CDCP (Taylor channel importance) run the same
pass: a dense copy of the model in eval mode; per calibration batch a forward, targets = the labels
or the model's own argmax, cross-entropy, and the gradients with respect to some tensors of that
forward (attention maps, all-ones channel masks), reduced by the method to small per-batch sums.

Memory: a batch is split into micro-batches whose tensors kept for the backward fit
``MEMORY_BUDGET`` (estimated per image from the model's tokens, width, heads and depth by
``backward_bytes``). A micro-batch's loss is its share of the batch's mean (its sum / the batch
size), so its gradients are the whole batch's restricted to its images, and the per-batch sums the
methods reduce to (signed sums over images) add up to the unsplit batch's, up to float rounding.
A batch that fits is not split (bit-identical to one pass).
"""
from __future__ import annotations

import copy
import itertools
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitslim.patch import unpatch

MEMORY_BUDGET = 2 * 2**30  # bytes kept for one micro-batch's backward (estimate; fp32)


def dense_copy(model: nn.Module) -> nn.Module:
    """A dense (unpatched) copy of ``model`` in eval mode that shares its parameters and buffers.

    Sharing costs no weight memory (a ViT-L is 1.2 GB); the calibration pass never changes weights:
    it takes gradients with respect to other tensors only.
    """
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return unpatch(copy.deepcopy(model, shared)).eval()


def backward_bytes(model: nn.Module, explicit_attention: bool = False) -> int:
    """Estimated fp32 bytes per image kept for one forward + backward of the dense ViT ``model``.

    Per block: about 8 token-width and 2 hidden-width activations per token; with
    ``explicit_attention`` also the (H, N, N) attention map and its returned gradient.
    """
    n = model.num_prefix_tokens + model.patch_embed.num_patches
    total = 0
    for blk in model.blocks:
        total += n * (8 * blk.attn.qkv.in_features + 2 * blk.mlp.fc1.out_features)
        if explicit_attention:
            total += 2 * blk.attn.num_heads * n * n
    return 4 * total


def micro_batch_size(bytes_per_image: int, budget: int = MEMORY_BUDGET) -> int:
    """Images per micro-batch so that their backward fits ``budget`` (at least one)."""
    return max(1, budget // max(1, bytes_per_image))


def gradient_sums(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor | None]],
                  wrt: Callable[[], Sequence[Tensor]],
                  reduce: Callable[[Sequence[Tensor], Sequence[Tensor]], Sequence[Tensor]], *,
                  micro_batch: int | None = None, progress: bool = False, total: int | None = None,
                  ) -> list[tuple[list[Tensor], int]]:
    """Per calibration batch: ``reduce(tensors, grads)`` summed over its micro-batches, and the batch size.

    ``model`` is the prepared dense copy (``dense_copy``, plus the method's hooks or probes).
    After each micro-batch's forward, ``wrt()`` gives the tensors to differentiate (e.g. the
    attention maps its hooks collected, or fixed probe masks); ``grads`` are the gradients of the
    batch's mean cross-entropy (targets: the labels, or the model's own argmax without labels).
    ``reduce`` must return sums over the micro-batch's images (signed: the caller takes any
    absolute value per batch), so that adding micro-batches gives the batch's value.
    """
    device = next(model.parameters()).device
    stream: Iterable = batches
    if progress:
        from tqdm.auto import tqdm

        stream = tqdm(batches, desc="calibrating", unit="batch", total=total)
    out = []
    with torch.enable_grad(), torch.inference_mode(False):
        for images, labels in stream:
            size = len(images)
            step = micro_batch or size
            sums: list[Tensor] | None = None
            for start in range(0, size, step):
                logits = model(images[start:start + step].to(device).clone())  # clone: no inference tensors
                if labels is None:
                    targets = logits.argmax(-1).detach()  # the model's own predictions
                else:
                    targets = labels[start:start + step].to(device)
                loss = F.cross_entropy(logits, targets, reduction="sum") / size  # this share of the batch mean
                tensors = list(wrt())
                grads = torch.autograd.grad(loss, tensors)
                with torch.no_grad():
                    parts = [p.detach() for p in reduce(tensors, grads)]
                sums = parts if sums is None else [s + p for s, p in zip(sums, parts)]
                del logits, loss, tensors, grads  # free this micro-batch's graph before the next
            if sums is not None:
                out.append((sums, size))
    return out
