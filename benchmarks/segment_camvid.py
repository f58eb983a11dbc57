"""CamVid, training-free: a linear head trained on dense features, then each method switched on.

    python benchmarks/segment_camvid.py --methods tome,atme,evit,topk --budgets 0.5,0.7 \\
        --name camvid_linear_probe

The backbone is the team's real pretrained ViT-S/14 (``$VITSLIM_SHARED/models/dinov2-vits14-imgfocus``,
DINOv2 layout) at CamVid's native size rounded to patch 14 (364x476: 26x34 = 884 patch tokens).
Steps: (1) dense full-grid features (``vitslim.dense.features``) of every training image, whole-image
resized; (2) a ``LinearHead`` trained on them with cross-entropy at the masks' resolution (void
ignored; AdamW, a fixed number of epochs, no augmentation: a probe, not a recipe); (3) dense and
each method at each MACs budget (patched copies of the same backbone, ``macs=`` on this input size),
scored with that head on the test split (mIoU over the 11 classes, ``evaluate_segmentation``) and
timed beside its ideal at batch 1 (``vitslim.measure.compare``). Pruned patches get the value
carried aside when dropped (``restore="dropped"``). Smoke mode (VITSLIM_BENCH_SMOKE=1, see smoke.py):
the tiny ViT on a few synthetic road-like images, one epoch, results in the smoke folder.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import smoke  # benchmarks/smoke.py, beside this file
import vitslim  # noqa: F401  (before timm)
import timm
import torch
import torch.nn.functional as F

from vitslim.data import data_config, data_root
from vitslim.dense import LinearHead, PairedTransform, SegmentationFolder, SegmentationModel, features
from vitslim.dense.metrics import evaluate_segmentation
from vitslim.measure.compare import build_configs, count_row_macs, protocol, time_rows
from vitslim.measure.macs import count_macs
from vitslim.measure.report import format_table, save_report

SHARED = Path(os.environ.get("VITSLIM_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SHARED / "models/dinov2-vits14-imgfocus"))
    parser.add_argument("--data", default=str((data_root() or SHARED / "data") / "camvid"))
    parser.add_argument("--size", default="364,476", help="input H,W (multiples of the patch size)")
    parser.add_argument("--methods", default="tome,atme,evit,topk")
    parser.add_argument("--budgets", default="0.5,0.7")
    parser.add_argument("--epochs", type=int, default=20, help="probe epochs over the cached train features")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per model at batch 1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, help="use only the first N images of each split")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--name", default="camvid_linear_probe")
    return parser


def _subset(data: SegmentationFolder, limit: int | None) -> torch.utils.data.Dataset:
    return torch.utils.data.Subset(data, range(min(limit, len(data)))) if limit else data


def _loader(data: torch.utils.data.Dataset, batch_size: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)


def train_probe(backbone: torch.nn.Module, loader, num_classes: int, epochs: int, lr: float) -> LinearHead:
    """A linear head on cached dense features, cross-entropy at the masks' resolution (void ignored)."""
    cached = []
    with torch.no_grad():
        for images, masks in loader:
            cached.append((features(backbone, images), masks))
    head = LinearHead(cached[0][0].shape[1], num_classes)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(epochs):
        for fmap, masks in cached:
            logits = F.interpolate(head(fmap), size=masks.shape[-2:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, masks, ignore_index=255)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return head.eval()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    command = "python benchmarks/segment_camvid.py " + shlex.join(argv)
    size = tuple(int(v) for v in args.size.split(","))
    methods = [m for m in args.methods.split(",") if m]
    budgets = [float(b) for b in args.budgets.split(",") if b]
    threads, runs, epochs, limit = args.threads, args.runs, args.epochs, args.limit
    if smoke.ENABLED:  # the same code on tiny inputs: see smoke.py
        backbone = timm.create_model(smoke.TINY_ARCHITECTURE, **smoke.TINY_VIT).eval()
        size, data_folder = tuple(smoke.TINY_VIT["img_size"] for _ in range(2)), smoke.segmentation_folder()
        budgets, threads, runs, epochs = budgets[:1], smoke.THREADS, smoke.RUNS, 1
    else:
        backbone = timm.create_model(f"local-dir:{args.model}", pretrained=True, img_size=size).eval()
        data_folder = args.data
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = data_config(backbone)
    transform = PairedTransform(size, train=False, mean=cfg["mean"], std=cfg["std"])
    train = SegmentationFolder(data_folder, "train", transform=transform)
    test = SegmentationFolder(data_folder, "test", transform=transform)
    num_classes, train, test = train.num_classes, _subset(train, limit), _subset(test, limit)
    start = time.perf_counter()
    head = train_probe(backbone, _loader(train, args.batch_size), num_classes, epochs, args.lr)
    probe_s = time.perf_counter() - start
    dense, configs, rows = build_configs(backbone, methods, budgets, {}, progress=False)
    count_row_macs(rows, configs.values(), count_macs(dense))
    speeds = time_rows(rows, configs, batch_size=1, runs=runs, warmup=1, threads=threads, precision="fp32",
                       allocator="tuned", progress=False)
    test_loader = _loader(test, args.batch_size)
    for row, model in zip(rows, configs.values()):
        scores = evaluate_segmentation(SegmentationModel(model, head), test_loader, num_classes)
        row.update(miou=scores["miou"], pixel_accuracy=scores["pixel_accuracy"], iou=scores["iou"])
    for row in rows:
        row["miou_delta"] = row["miou"] - rows[0]["miou"]
    result = {"protocol": {
        "model": f"{smoke.TINY_ARCHITECTURE} (smoke mode)" if smoke.ENABLED else args.model,
        "data": str(data_folder), "input": f"{size[0]}x{size[1]}", "train_images": len(train),
        "test_images": len(test), "probe": f"LinearHead on dense features, {epochs} epochs, "
        f"AdamW lr {args.lr}, batch {args.batch_size}, {probe_s:.0f} s", "restore": "dropped",
        **protocol(dense, speeds["dense"], batch_size=1, runs=runs, warmup=1, precision="fp32")}, "rows": rows}
    out = smoke.results_dir(args.out)
    paths = save_report(result, out, args.name, f"{args.name}: CamVid test, linear probe trained on dense features",
                        command=command, plot=False)
    print(format_table(rows))
    print("wrote " + ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
