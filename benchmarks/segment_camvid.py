"""CamVid segmentation: every method at each MACs budget, heads trained on dense features and under the method.

    python benchmarks/segment_camvid.py --name camvid_segment \\
        --methods tome,atme,prune_merge,prune_merge_span,cait,evit,topk,sit,spvit,cdcp --budgets 0.5,0.7

The backbone is the team's real pretrained ViT-S/14 (``$VITSLIM_SHARED/models/dinov2-vits14-imgfocus``,
DINOv2 layout) at CamVid's native size rounded to patch 14 (364x476: 26x34 = 884 patch tokens),
frozen throughout. Steps:
1. dense full-grid features (``vitslim.dense.features``) of every training image (whole image resized);
   a ``LinearHead`` and a Segmenter ``MaskTransformer`` (2 layers) trained on them with cross-entropy at
   ``--loss-scale`` of the masks' resolution (void ignored; AdamW, fixed epochs, no augmentation: a
   probe, not a recipe; scored at the full resolution);
2. each method at each budget (a patched copy of the backbone, ``macs=`` priced at this input size;
   ``prune_merge_span`` is Prune-and-Merge's segmentation variant, ``span=2:10``): (a) **training-free**,
   the dense-trained heads on the method's features; (b) **head under the method**, the dense linear
   head trained ``--method-epochs`` more epochs on the method's own training features; mIoU over the 11 classes of the test
   split at the masks' resolution (``ConfusionMatrix``). Methods with trained modules (SiT, SPViT)
   run with their modules as initialised: their rows show what the method gives without its training;
3. speed (``--phase speed``): every row timed beside its ideal at batch 1 and 8
   (``vitslim.measure.compare.time_rows``).
Pruned patches get the value carried aside when dropped (``restore="dropped"``). Each finished row is
kept in ``--work`` (default ``$VITSLIM_BENCH_WORK`` or ~/.cache/vitslim/segment_camvid), so an
interrupted run resumes where it stopped; the report is written from whatever rows are there.
Smoke mode (VITSLIM_BENCH_SMOKE=1, see smoke.py): the tiny ViT on a few synthetic road-like images.
"""
from __future__ import annotations

import argparse
import copy
import json
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

from vitslim.data import data_root
from vitslim.dense import (ConfusionMatrix, LinearHead, MaskTransformer, SegmentationFolder, SegmentationModel,
                           features)
from vitslim.dense.data import segmentation_split
from vitslim.io import atomic_write
from vitslim.measure.compare import count_row_macs, protocol, time_rows
from vitslim.measure.macs import count_macs
from vitslim.measure.report import format_table, save_report
from vitslim.patch import describe, patch
from vitslim.train.checkpoint import save_checkpoint
from vitslim.train.segmentation import SegmentationTask

SHARED = Path(os.environ.get("VITSLIM_SHARED", Path(__file__).resolve().parents[2] / "shared"))
COLUMNS = [("method", "method", "{}"), ("budget", "MACs target", "{:.2f}"), ("macs_ratio", "MACs ratio", "{:.3f}"),
           ("speedup_batch1", "speed-up b1", "{:.2f}x"), ("ideal_speedup_batch1", "ideal b1", "{:.2f}x"),
           ("speedup_batch8", "speed-up b8", "{:.2f}x"), ("ideal_speedup_batch8", "ideal b8", "{:.2f}x"),
           ("miou_linear", "mIoU linear %", "{:.2%}"), ("miou_linear_delta", "delta", "{:+.2%}"),
           ("miou_mask", "mIoU mask %", "{:.2%}"), ("miou_mask_delta", "delta", "{:+.2%}"),
           ("miou_linear_under_method", "mIoU linear, head under method %", "{:.2%}"),
           ("miou_linear_under_method_delta", "delta", "{:+.2%}")]
VARIANTS = {"prune_merge_span": "prune_merge"}  # row name -> method (options from variant_options)


def span_for(depth: int) -> str:
    """PM-Segmenter's span (merge_list [2], recover_list [10] on 12 blocks), scaled to ``depth``."""
    return f"{depth // 6}:{depth - 2}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SHARED / "models/dinov2-vits14-imgfocus"))
    parser.add_argument("--data", default=str((data_root() or SHARED / "data") / "camvid"))
    parser.add_argument("--size", default="364,476", help="input H,W (multiples of the patch size)")
    parser.add_argument("--methods", default="tome,atme,prune_merge,prune_merge_span,cait,evit,topk,sit,spvit,cdcp")
    parser.add_argument("--budgets", default="0.5,0.7")
    parser.add_argument("--epochs", type=int, default=20, help="linear head epochs over the cached train features")
    parser.add_argument("--mask-epochs", type=int, default=0, help="mask transformer epochs (0: no mask head)")
    parser.add_argument("--under-method", action=argparse.BooleanOptionalAction, default=False,
                        help="also train a linear head on each method's own features (b)")
    parser.add_argument("--method-epochs", type=int, default=5,
                        help="epochs of the head under each method, started from the dense-trained linear head")
    parser.add_argument("--loss-scale", type=float, default=0.25,
                        help="heads train at this fraction of the mask resolution (evaluation: full resolution)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--phase", choices=("accuracy", "speed", "all"), default="accuracy")
    parser.add_argument("--speed-batches", default="1", help="batch sizes timed in the speed phase")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, help="use only the first N images of each split")
    parser.add_argument("--checkpoint-out", help="also write the dense backbone with its linear head as a `vitslim "
                                                 "segment train` checkpoint (what `vitslim auto --task segment` takes)")
    parser.add_argument("--work", default=os.environ.get("VITSLIM_BENCH_WORK",
                                                         str(Path.home() / ".cache/vitslim/segment_camvid")))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--name", default="camvid_segment")
    return parser


def _subset(data: SegmentationFolder, limit: int | None) -> torch.utils.data.Dataset:
    return torch.utils.data.Subset(data, range(min(limit, len(data)))) if limit else data


@torch.no_grad()
def cached_features(backbone: torch.nn.Module, data, batch_size: int,
                    mask_scale: float = 1.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(features, masks) per batch of ``data``: the backbone runs once, every head reads the cache.

    ``mask_scale`` < 1 keeps the masks at that fraction of their resolution (nearest), for training.
    """
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    cache = []
    for images, masks in loader:
        if mask_scale != 1.0:
            size = [max(1, round(s * mask_scale)) for s in masks.shape[-2:]]
            masks = F.interpolate(masks[:, None].float(), size=size, mode="nearest-exact")[:, 0].long()
        cache.append((features(backbone.eval(), images), masks))
    return cache


def train_head(head: torch.nn.Module, cache, epochs: int, lr: float) -> torch.nn.Module:
    """Cross-entropy at the masks' resolution (void ignored) over the cached features, AdamW, fixed epochs."""
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    head.train()
    for _ in range(epochs):
        for fmap, masks in cache:
            logits = F.interpolate(head(fmap), size=masks.shape[-2:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, masks, ignore_index=255)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return head.eval()


@torch.no_grad()
def score(head: torch.nn.Module, cache, num_classes: int) -> dict:
    """mIoU and pixel accuracy of ``head`` over cached test features, at the masks' resolution."""
    matrix = ConfusionMatrix(num_classes)
    for fmap, masks in cache:
        logits = F.interpolate(head(fmap), size=masks.shape[-2:], mode="bilinear", align_corners=False)
        matrix.update(logits.argmax(1), masks)
    result = matrix.compute()
    return {"miou": result["miou"], "pixel_accuracy": result["pixel_accuracy"], "iou": result["iou"]}


def build_row(backbone: torch.nn.Module, name: str, budget: float | None) -> torch.nn.Module:
    """The dense backbone, or a patched copy for a method (or variant) at a MACs budget."""
    if name == "dense":
        return backbone
    options = {"span": span_for(len(backbone.blocks))} if name in VARIANTS else {}
    return patch(copy.deepcopy(backbone), VARIANTS.get(name, name), macs=budget, **options).eval()


def save_segmentation(path: str | Path, model: SegmentationModel, size, command: str) -> None:
    """``model`` as a segmentation training checkpoint (``vitslim.train.load_segmentation`` and the CLI read it)."""
    state = SegmentationTask(model.num_classes).model_state(model)
    save_checkpoint(path, {**state, "run_record": {"command": command, "size": list(size), "head": "probe"}})


def row_key(name: str, budget: float) -> str:
    """A row's name in the work folder and the timing configs ("dense" as time_rows expects)."""
    return "dense" if name == "dense" else f"{name}@{budget}"


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    command = "python benchmarks/segment_camvid.py " + shlex.join(argv)
    size = tuple(int(v) for v in args.size.split(","))
    methods = [m for m in args.methods.split(",") if m]
    budgets = [float(b) for b in args.budgets.split(",") if b]
    threads, runs, epochs, mask_epochs, limit = args.threads, args.runs, args.epochs, args.mask_epochs, args.limit
    method_epochs = args.method_epochs
    work = Path(args.work) / args.name
    if smoke.ENABLED:  # the same code on tiny inputs: see smoke.py
        backbone = timm.create_model(smoke.TINY_ARCHITECTURE, **smoke.TINY_VIT).eval()
        size, data_folder = tuple(smoke.TINY_VIT["img_size"] for _ in range(2)), smoke.segmentation_folder()
        budgets, threads, runs, epochs, mask_epochs = budgets[:1], smoke.THREADS, smoke.RUNS, 1, min(mask_epochs, 1)
        method_epochs = 1
        work = smoke.work_dir() / "segment_camvid" / args.name
    else:
        backbone = timm.create_model(f"local-dir:{args.model}", pretrained=True, img_size=size).eval()
        data_folder = args.data
    torch.set_num_threads(threads)
    train = segmentation_split(data_folder, "train", backbone, size, train=False)  # a probe: no augmentation
    test = segmentation_split(data_folder, "test", backbone, size, train=False)
    num_classes, train, test = train.num_classes, _subset(train, limit), _subset(test, limit)
    work.mkdir(parents=True, exist_ok=True)
    names = [("dense", 1.0)] + [(m, b) for m in methods for b in budgets]

    if args.phase in ("accuracy", "all"):
        heads_path = work / "dense_heads.pt"
        linear = LinearHead(backbone.num_features, num_classes)
        mask = MaskTransformer(backbone.num_features, num_classes) if mask_epochs else None
        if heads_path.is_file():
            saved = torch.load(heads_path, weights_only=True)
            linear.load_state_dict(saved["linear"])
            if mask is not None:
                mask.load_state_dict(saved["mask"])
            probe_s = saved["seconds"]
        else:
            start = time.perf_counter()
            train_cache = cached_features(backbone, train, args.batch_size, args.loss_scale)
            train_head(linear, train_cache, epochs, args.lr)
            if mask is not None:
                train_head(mask, train_cache, mask_epochs, args.lr)
            del train_cache
            probe_s = time.perf_counter() - start
            state = {"linear": linear.state_dict(), "seconds": probe_s}
            if mask is not None:
                state["mask"] = mask.state_dict()
            atomic_write(heads_path, lambda f: torch.save(state, f))
        if args.checkpoint_out:
            save_segmentation(smoke.output_path(args.checkpoint_out), SegmentationModel(backbone, linear), size,
                              command)
        for name, budget in names:
            path = work / f"{name}@{budget}.json"
            record = _load(path)
            wants_head = args.under_method and name != "dense"
            if record is not None and (not wants_head or "linear_under_method" in record):
                continue  # done; a row without the head under the method gets only that part added
            print(f"{name}@{budget} ...", flush=True)
            start = time.perf_counter()
            model = build_row(backbone, name, budget)
            test_cache = cached_features(model, test, args.batch_size)
            if record is None:
                record = {"method": name, "budget": budget, "options": describe(model)["options"],
                          "linear": score(linear, test_cache, num_classes)}
                if mask is not None:
                    record["mask"] = score(mask, test_cache, num_classes)
            if wants_head:
                trained = train_head(copy.deepcopy(linear), cached_features(model, train, args.batch_size,
                                                                            args.loss_scale), method_epochs, args.lr)
                record["linear_under_method"] = score(trained, test_cache, num_classes)
            record["seconds"] = round(record.get("seconds", 0) + time.perf_counter() - start, 1)
            atomic_write(path, json.dumps(record) + "\n")

    if args.phase in ("speed", "all"):
        speed_path = work / "speed.json"
        if not speed_path.is_file():
            configs = {row_key(n, b): build_row(backbone, n, b) for n, b in names}
            rows = [{"method": n, "budget": b} for n, b in names]
            count_row_macs(rows, configs.values(), count_macs(backbone))
            speed = {"rows": {}}
            for batch in [int(b) for b in args.speed_batches.split(",")]:
                timed = [dict(r) for r in rows]
                speeds = time_rows(timed, configs, batch_size=batch, runs=runs, warmup=1, threads=threads,
                                   precision="fp32", allocator="tuned", progress=False)
                speed["protocol"] = {**protocol(backbone, speeds["dense"], batch_size=batch, runs=runs, warmup=1,
                                                precision="fp32"), "batch_size": args.speed_batches}
                for key, row in zip(configs, timed):
                    speed["rows"].setdefault(key, {"gmacs": row["gmacs"], "macs_ratio": row["macs_ratio"]})
                    speed["rows"][key].update({f"{k}_batch{batch}": row[k] for k in
                                               ("images_per_s", "speedup", "ideal_speedup") if k in row})
            atomic_write(speed_path, json.dumps(speed) + "\n")

    args.depth = len(backbone.blocks)
    report(work, names, num_classes, args, command, size, data_folder, len(train), len(test), probe_epochs=epochs)
    return 0


def report(work: Path, names, num_classes: int, args, command: str, size, data_folder, n_train: int, n_test: int,
           probe_epochs: int) -> None:
    """The table from every finished row in ``work``: mIoU of each head, the change against dense, speed."""
    speed = _load(work / "speed.json") or {"rows": {}}
    rows = []
    for name, budget in names:
        record = _load(work / f"{name}@{budget}.json")
        if record is None:
            continue
        row = {"method": name, "budget": budget, **speed["rows"].get(row_key(name, budget), {})}
        for head in ("linear", "mask", "linear_under_method"):
            if head in record:
                row[f"miou_{head}"] = record[head]["miou"]
        row["iou_linear"] = record["linear"]["iou"]
        rows.append(row)
    if not rows or rows[0]["method"] != "dense":
        print("no dense row yet: run the accuracy phase")
        return
    for row in rows:
        for head in ("linear", "mask", "linear_under_method"):
            base = rows[0].get(f"miou_{head}", rows[0].get("miou_linear"))
            if f"miou_{head}" in row:
                row[f"miou_{head}_delta"] = row[f"miou_{head}"] - base
    heads_record = torch.load(work / "dense_heads.pt", weights_only=True) if (work / "dense_heads.pt").is_file() else {}
    proto = {"model": f"{smoke.TINY_ARCHITECTURE} (smoke mode)" if smoke.ENABLED else args.model,
             "data": str(data_folder), "input": f"{size[0]}x{size[1]}", "train_images": n_train,
             "test_images": n_test, "heads": f"LinearHead ({probe_epochs} epochs)" + (
                 f" and MaskTransformer ({args.mask_epochs} epochs)" if "mask" in heads_record else "") +
             f" on frozen dense features, AdamW lr {args.lr}, batch {args.batch_size}, loss at {args.loss_scale:g} of"
             " the mask resolution" + (f"; under each method: the dense linear head trained {args.method_epochs} more"
                                       " epochs on the method's features"
                                       if any("miou_linear_under_method" in r for r in rows) else ""),
             "restore": "dropped", "prune_merge_span": "span=" + span_for(args.depth),
             **{f"speed {k}": v for k, v in speed.get("protocol", {}).items() if k != "input_size"}}
    out = smoke.results_dir(args.out)
    paths = save_report({"protocol": proto, "rows": rows}, out, args.name,
                        f"{args.name}: CamVid test, heads on a frozen ViT-S/14, methods switched on", command=command,
                        plot=False, columns=COLUMNS)
    print(format_table(rows, COLUMNS))
    print("wrote " + ", ".join(map(str, paths)))


if __name__ == "__main__":
    sys.exit(main())
