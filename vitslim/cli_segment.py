"""``vitslim segment``: semantic segmentation on a (patched) ViT backbone, from the command line.

    vitslim segment train    a linear or mask-transformer head (backbone frozen or fine-tuned), optionally
                             under a method; checkpoints, resume, mIoU on the validation split
    vitslim segment eval     mIoU, pixel accuracy and per-class IoU of a trained checkpoint, optionally
                             with a method switched on
    vitslim segment compare  methods x budgets under a dense-trained head: MACs, speed at the segmentation
                             size (batch sizes of --batch-sizes), mIoU and its change; report and a picture
"""
from __future__ import annotations

import argparse
import pathlib
from typing import Any

from vitslim.cli_common import (_add_train_args, _command, _floats, _method_list, _method_options, _option,
                                _patch_as_asked, _size)
from vitslim.errors import VitslimError


def _add_data(p: argparse.ArgumentParser, split: str) -> None:
    p.add_argument("--data", required=True, help="a segmentation folder: CamVid-style (split/images, split/masks), "
                                                 "ADEChallengeData2016, VOC (JPEGImages...) or Cityscapes")
    p.add_argument("--layout", default="auto", help="auto, folder, ade20k, voc or cityscapes")
    p.add_argument("--split", default=split, help=f"split to use (default {split})")
    p.add_argument("--num-classes", type=int, help="classes of a plain folder (CamVid and the named layouts know)")
    p.add_argument("--void", type=int, help="label value to ignore in a plain folder (255 is always ignored)")
    p.add_argument("--limit", type=int, help="use only the first N images")


def add_parser(sub: Any) -> None:
    """The ``segment`` command and its three subcommands, on the ``vitslim`` subparsers ``sub``."""
    segment = sub.add_parser("segment", help="semantic segmentation: train | eval | compare",
                             description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = segment.add_subparsers(dest="segment_command", required=True)

    train = actions.add_parser("train", help="train a head (and optionally the backbone) under a method")
    _add_train_args(train)  # the classification trainer's flags: model, method, data splits, TrainConfig
    train.set_defaults(val_split="val")
    train.add_argument("--size", type=_size, required=True, help="input H,W (multiples of the patch size)")
    train.add_argument("--head", default="linear", choices=["linear", "mask"])
    train.add_argument("--freeze-backbone", action="store_true", help="train only the head")
    train.add_argument("--restore", default="dropped", choices=["dropped", "fused"],
                       help="what pruned patches get (docs/dense.md)")
    train.add_argument("--layout", default="auto")
    train.add_argument("--num-classes", type=int)
    train.add_argument("--void", type=int)

    evaluate = actions.add_parser("eval", help="mIoU of a trained segmentation checkpoint")
    evaluate.add_argument("checkpoint", help="a `vitslim segment train` checkpoint (OUT/best.pt or last.pt)")
    _add_data(evaluate, "test")
    evaluate.add_argument("--method", help="switch this method on under the trained head (training-free)")
    evaluate.add_argument("--macs", type=float, help="MACs budget for --method")
    evaluate.add_argument("--option", type=_option, action="append", default=[], help="method option key=value")
    evaluate.add_argument("--batch-size", type=int, default=1)
    evaluate.add_argument("--threads", type=int, default=2)

    compare = actions.add_parser("compare", help="methods x budgets under a dense-trained head: speed and mIoU")
    compare.add_argument("checkpoint", help="a `vitslim segment train` checkpoint trained on the dense backbone")
    _add_data(compare, "test")
    compare.add_argument("--methods", default="tome,atme,prune_merge,evit,topk", help="comma-separated")
    compare.add_argument("--budgets", type=_floats, default=[0.5, 0.7], help="MACs targets (default 0.5,0.7)")
    compare.add_argument("--option", type=_option, action="append", default=[],
                         help="method option, e.g. prune_merge.span=2:10 (repeatable)")
    compare.add_argument("--batch-sizes", default="1,8", help="batch sizes to time (default 1,8)")
    compare.add_argument("--runs", type=int, default=5)
    compare.add_argument("--threads", type=int, default=2)
    compare.add_argument("--pictures", type=int, default=3, help="images in the prediction picture (0: none)")
    compare.add_argument("--out", default="vitslim-out", help="folder for the report")
    compare.add_argument("--name", default="segment_compare")
    compare.add_argument("--no-plot", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Dispatch ``vitslim segment ...``."""
    return {"train": _train, "eval": _eval, "compare": _compare}[args.segment_command](args)


def _folder(args: argparse.Namespace, split: str, backbone, size, train: bool):
    from vitslim.dense.data import segmentation_split

    return segmentation_split(args.data, split, backbone, size, train=train, layout=args.layout,
                              num_classes=args.num_classes, void=args.void)


def _limited(data, limit: int | None):
    import torch

    return torch.utils.data.Subset(data, range(min(limit, len(data)))) if limit else data


def _train(args: argparse.Namespace) -> int:
    import torch

    from vitslim.train.config import TrainConfig
    from vitslim.train.engine import distributed_env, fit, resume_path, teacher_copy, wants_teacher
    from vitslim.train.segmentation import SegmentationTask, segmentation_model
    from vitslim.zoo import load_model

    if args.data is None:
        raise VitslimError("give --data: a segmentation folder (e.g. CamVid)")
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_")}
    config = TrainConfig.from_recipe(args.recipe, **overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    backbone = load_model(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained, img_size=args.size)
    teacher = teacher_copy(backbone)
    _patch_as_asked(backbone, args, init_seed=config.seed)
    train_set = _folder(args, args.split, backbone, args.size, train=True)
    val_set = None if args.no_eval else _limited(_folder(args, args.val_split, backbone, args.size, train=False),
                                                 args.val_limit)
    torch.manual_seed(config.seed)  # the new head's weights: one --seed, one starting model
    model = segmentation_model(backbone, args.head, train_set.num_classes, restore=args.restore)
    task = SegmentationTask(train_set.num_classes, size=args.size, freeze_backbone=args.freeze_backbone)
    if args.freeze_backbone or not wants_teacher(backbone, config, args.teacher):
        teacher = None
    out = pathlib.Path(args.out or f"vitslim-out/segment-{args.method or 'dense'}-{args.head}")
    record = {"command": _command(args), "method": args.method, "macs": args.macs, "head": args.head,
              "size": list(args.size), "teacher": "dense" if teacher is not None else None}
    result = fit(model, _limited(train_set, args.limit), val_data=val_set, teacher=teacher, config=config,
                 out_dir=out, resume=resume_path(args.resume, out), progress=not args.no_progress,
                 eval_before=args.eval_before, run_record=record, task=task)
    if distributed_env()[0] == 0:
        final, line = result["final"], f"trained {result['steps']} steps"
        if "miou" in final:
            line += f": mIoU {final['miou']:.2%} on {final['n']} images"
        print(f"{line}; checkpoint {result['checkpoint']}, log {out / 'log.jsonl'}")
    return 0


def _loaded(args: argparse.Namespace):
    """The checkpoint's SegmentationModel and its input size."""
    from vitslim.train.checkpoint import read_checkpoint
    from vitslim.train.segmentation import segmentation_from_payload

    payload = read_checkpoint(args.checkpoint)
    model = segmentation_from_payload(payload, source=args.checkpoint)
    size = (payload.get("run_record") or {}).get("size")
    size = tuple(size) if size else tuple(model.backbone.patch_embed.img_size)
    return model, size


def _eval(args: argparse.Namespace) -> int:
    import torch

    from vitslim.dense.metrics import evaluate_segmentation
    from vitslim.measure.macs import count_macs
    from vitslim.patch import is_patched

    torch.set_num_threads(args.threads)
    model, size = _loaded(args)
    if args.method and is_patched(model.backbone):
        raise VitslimError("this checkpoint's backbone is already patched: evaluate it without --method")
    _patch_as_asked(model.backbone, args)
    data = _folder(args, args.split, model.backbone, size, train=False)
    loader = torch.utils.data.DataLoader(_limited(data, args.limit), batch_size=args.batch_size)
    scores = evaluate_segmentation(model, loader, model.num_classes, progress=True)
    print(f"mIoU {scores['miou']:.2%}  pixel accuracy {scores['pixel_accuracy']:.2%}  on {len(loader.dataset)} "
          f"images at {size[0]}x{size[1]}  ({count_macs(model.backbone) / 1e9:.4f} backbone GMACs)")
    for name, iou in zip(data.class_names, scores["iou"]):
        print(f"  {name:>14}: " + ("-" if iou is None else f"{iou:.2%}"))
    return 0


def _compare(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from vitslim.dense.compare import prediction_figure, run_segment_compare
    from vitslim.measure.report import format_table, save_report
    from vitslim.patch import is_patched

    torch.set_num_threads(args.threads)
    methods = _method_list(args.methods)
    model, size = _loaded(args)
    if is_patched(model.backbone):
        raise VitslimError("segment compare switches methods on under a head trained on the dense backbone: give a "
                           "checkpoint trained without --method")
    data = _folder(args, args.split, model.backbone, size, train=False)
    subset = _limited(data, args.limit)
    loader = torch.utils.data.DataLoader(subset, batch_size=1)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    result, segmenters = run_segment_compare(model, methods, args.budgets, loader, batch_sizes=batch_sizes,
                                             runs=args.runs, threads=args.threads,
                                             options=_method_options(args, methods))
    result["protocol"].update(data=args.data, split=args.split, images=len(subset), input=f"{size[0]}x{size[1]}")
    paths = save_report(result, args.out, args.name, f"vitslim segment compare: {args.checkpoint}",
                        command=_command(args), plot=not args.no_plot)
    if args.pictures:
        picks = [subset[i] for i in np.linspace(0, len(subset) - 1, min(args.pictures, len(subset))).astype(int)]
        images = torch.stack([p[0] for p in picks])
        masks = torch.stack([torch.nn.functional.interpolate(p[1][None, None].float(), size=size,
                                                             mode="nearest-exact")[0, 0].long() for p in picks])
        mean, std = data.transform.mean, data.transform.std
        pictures = [(img * std + mean).clamp(0, 1).permute(1, 2, 0).numpy() for img in images]
        paths.append(prediction_figure(segmenters, images, masks, pictures, pathlib.Path(args.out) / f"{args.name}_masks.png",
                                       model.num_classes, data.class_names))
    print(format_table(result["rows"]))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
