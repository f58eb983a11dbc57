"""The dense twin of ``vitslim compare``: methods x budgets on a segmentation model, and a picture of their masks.

``run_segment_compare`` patches a copy of the backbone per (method, MACs budget) (``macs=`` is
priced at the segmentation input size), keeps the head trained on dense features (training-free:
the method is switched on under it) and reports MACs, throughput at the segmentation resolution
(each model beside its ideal, at every batch size asked for), measured and ideal speed-up, mIoU and
its change against dense. ``prediction_figure`` draws a few images, their ground truth and each
row's prediction side by side.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from vitslim.dense.data import IGNORE
from vitslim.dense.heads import SegmentationModel
from vitslim.dense.metrics import evaluate_segmentation
from vitslim.io import write_png
from vitslim.measure.compare import Prebuilt, add_prebuilt, build_configs, count_row_macs, protocol, time_rows
from vitslim.measure.macs import count_macs
from vitslim.measure.speed import check_timing


def run_segment_compare(model: SegmentationModel, methods: Sequence[str], budgets: Sequence[float],
                        loader: Iterable | None, *, batch_sizes: Sequence[int] = (1,), runs: int = 5,
                        warmup: int = 1, threads: int | None = 2, precision: str = "fp32",
                        allocator: str = "tuned", options: dict[str, dict] | None = None,
                        models: Prebuilt | None = None, progress: bool = True
                        ) -> tuple[dict[str, Any], dict[str, SegmentationModel]]:
    """Rows of MACs, speed (first batch size; others as ``speedup_batchN``) and mIoU; and the models by row name.

    ``model`` is a ``SegmentationModel`` whose backbone is dense (the head was trained on dense
    features). ``models`` adds prebuilt backbones (e.g. the Prune-and-Merge span variant) by name.
    """
    for b in batch_sizes:
        check_timing(b, runs, warmup, precision, allocator)
    dense, configs, rows = build_configs(model.backbone, methods, budgets, options or {}, progress)
    add_prebuilt(configs, rows, models)
    count_row_macs(rows, configs.values(), count_macs(dense))
    timing = dict(runs=runs, warmup=warmup, threads=threads, precision=precision, allocator=allocator,
                  progress=progress)
    first, *others = batch_sizes
    for b in others:  # the extra batch sizes first, so the first one's numbers are what the rows keep
        extra = [dict(r) for r in rows]
        time_rows(extra, configs, batch_size=b, **timing)
        for row, timed in zip(rows, extra):
            row[f"images_per_s_batch{b}"] = timed["images_per_s"]
            row[f"speedup_batch{b}"] = timed["speedup"]
            if "ideal_speedup" in timed:
                row[f"ideal_speedup_batch{b}"] = timed["ideal_speedup"]
    speeds = time_rows(rows, configs, batch_size=first, **timing)
    segmenters = {name: SegmentationModel(backbone, model.head, restore=model.restore).eval()
                  for name, backbone in configs.items()}
    if loader is not None:
        num_classes = model.num_classes
        for row, segmenter in tqdm(list(zip(rows, segmenters.values())), desc="mIoU", disable=not progress):
            scores = evaluate_segmentation(segmenter, loader, num_classes)
            row.update(miou=scores["miou"], pixel_accuracy=scores["pixel_accuracy"], iou=scores["iou"])
        for row in rows:
            row["miou_delta"] = row["miou"] - rows[0]["miou"]
    result = {"protocol": {**protocol(dense, speeds["dense"], batch_size=first, runs=runs, warmup=warmup,
                                      precision=precision), "batch_sizes": list(batch_sizes),
                           "restore": model.restore}, "rows": rows}
    return result, segmenters


PALETTE_SEED = 7


def class_colours(num_classes: int) -> np.ndarray:
    """(num_classes + 1, 3) uint8 colours, fixed per class id; the last one (black) is the ignore value."""
    rng = np.random.default_rng(PALETTE_SEED)
    return np.concatenate([rng.integers(40, 256, (num_classes, 3)), np.zeros((1, 3), dtype=np.int64)]).astype(np.uint8)


def colour_mask(labels: Tensor, num_classes: int) -> np.ndarray:
    """(H, W) class ids (IGNORE allowed) -> (H, W, 3) uint8 picture."""
    ids = labels.cpu().numpy().astype(np.int64)
    ids = np.where((ids < 0) | (ids >= num_classes) | (ids == IGNORE), num_classes, ids)
    return class_colours(num_classes)[ids]


@torch.no_grad()
def prediction_figure(segmenters: dict[str, nn.Module], images: Tensor, masks: Tensor, pictures: Sequence[np.ndarray],
                      path: str | Path, num_classes: int, class_names: Sequence[str] | None = None) -> Path:
    """A grid: one row per image (the image, its ground truth, then each model's prediction); written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch.nn.functional as F

    columns = ["image", "ground truth", *segmenters]
    predictions = {}
    for name, segmenter in segmenters.items():
        logits = segmenter.eval()(images)
        if logits.shape[-2:] != masks.shape[-2:]:
            logits = F.interpolate(logits.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)
        predictions[name] = logits.argmax(1)
    fig, axes = plt.subplots(len(images), len(columns), figsize=(2.4 * len(columns), 1.9 * len(images) + 0.6),
                             squeeze=False)
    for i in range(len(images)):
        panels = [pictures[i], colour_mask(masks[i], num_classes),
                  *(colour_mask(predictions[name][i], num_classes) for name in segmenters)]
        for j, (ax, panel) in enumerate(zip(axes[i], panels)):
            ax.imshow(panel)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(columns[j], fontsize=8)
    if class_names is not None:
        colours = class_colours(num_classes)
        handles = [plt.Rectangle((0, 0), 1, 1, color=colours[k] / 255) for k in range(num_classes)]
        fig.legend(handles, list(class_names), loc="lower center", ncol=min(num_classes, 6), fontsize=7)
    fig.tight_layout(rect=(0, 0.08 if class_names is not None else 0, 1, 1))
    return write_png(fig, path, dpi=100)
