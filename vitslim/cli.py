"""The ``vitslim`` command: a thin layer over the library.

    vitslim compare   methods x MACs budgets: MACs, throughput, speed-up (measured and ideal), top-1
    vitslim bench     the same without data: speed only
    vitslim eval      top-1/top-5 of a (patched) model on a dataset
    vitslim train     fine-tune a (patched) model, with distillation from the dense model;
                      many processes: torchrun --nproc_per_node N -m vitslim train ...
    vitslim export    any model, patched or trained, to one file: safetensors (vitslim.export.load) or
                      ONNX (checked in onnxruntime); channel masks sliced, training-only modules left out
    vitslim calibrate Prune-and-Merge's scoring pass on data: saves the scores and prints the plan
                      (then: --method prune_merge --option scores=FILE)
    vitslim segment   semantic segmentation: train | eval | compare (vitslim segment --help)
    vitslim visualize which patches share a token after chosen blocks, per method: one PNG per image,
                      a row per method (pruned patches grey, fused ones darkened)
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Any, Sequence

from vitslim import cli_segment
from vitslim.cli_common import (_add_model_args, _add_patch_args, _add_train_args, _command, _floats, _ints, _method_list,
                                _method_options, _option, _options_for, _patch_as_asked, _size)
from vitslim.errors import VitslimError
from vitslim.measure.macs import count_macs
from vitslim.patch import check_input, describe, patch

DEFAULT_METHODS = "tome,evit,topk"


def _add_data_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--data", required=required,
                   help="'digits', 'cifar10', 'imagenet-val-1300', an ImageFolder or a labels.csv folder "
                        "(default: digits for the default model)")
    p.add_argument("--split", default="test", help="split folder to use when the data has one (default test)")
    p.add_argument("--limit", type=int, help="use only this many images (evenly spread)")
    p.add_argument("--eval-batch-size", type=int, default=128)


def _add_method_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated (default {DEFAULT_METHODS})")
    p.add_argument("--budgets", type=_floats, default=[0.5, 0.7],
                   help="MACs targets as fractions of dense (default 0.5,0.7)")
    p.add_argument("--option", type=_option, action="append", default=[],
                   help="extra method option, e.g. evit.keep_order=False (repeatable)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size for throughput (default 32)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per model, median reported (>= 5)")
    p.add_argument("--backend", default="eager", choices=["eager", "compile", "onnxruntime"],
                   help="how every model runs, dense too: eager PyTorch (default), torch.compile, or exported "
                        "to ONNX and run by onnxruntime (pip install 'vitslim[onnx]')")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "int8"],
                   help="fp32 (default); bf16 weights and activations; int8 dynamic quantisation of the Linear "
                        "layers (eager: torch.ao; onnxruntime: its own)")
    p.add_argument("--allocator", default="tuned", choices=["tuned", "default"],
                   help="tuned (default): keep freed buffers in the heap while timing (docs/measurement.md)")
    p.add_argument("--out", default="vitslim-out", help="folder for the JSON / markdown / PNG report")
    p.add_argument("--name", default=None, help="report file name (default: compare or bench)")
    p.add_argument("--no-plot", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``vitslim`` command."""
    parser = argparse.ArgumentParser(prog="vitslim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    compare = sub.add_parser("compare", help="methods x budgets: MACs, speed and accuracy against dense")
    _add_model_args(compare)
    _add_data_args(compare, required=False)
    _add_method_args(compare)
    bench = sub.add_parser("bench", help="methods x budgets: MACs and speed only (no data)")
    _add_model_args(bench)
    _add_method_args(bench)
    evaluate = sub.add_parser("eval", help="top-1/top-5 of a model, optionally patched")
    _add_model_args(evaluate)
    _add_data_args(evaluate, required=False)
    _add_patch_args(evaluate, "patch with this method first")
    train = sub.add_parser("train", help="fine-tune a (patched) model with distillation; checkpoints, resume, DDP")
    _add_train_args(train)
    calibrate = sub.add_parser("calibrate", help="Prune-and-Merge scoring pass on data: scores file + plan")
    _add_model_args(calibrate)
    calibrate.add_argument("--data", help="calibration data (default: digits for the default model)")
    calibrate.add_argument("--split", default="train", help="split to calibrate on (default train)")
    calibrate.add_argument("--limit", type=int, help="use only this many images (evenly spread over classes)")
    calibrate.add_argument("--batch-size", type=int, default=128, help="images per batch (default 128)")
    calibrate.add_argument("--iters", type=int, default=50, help="batches (default 50; the official pass: 250 of 256)")
    calibrate.add_argument("--seed", type=int, default=0,
                           help="seed of the batch order and of the train split's augmentation")
    calibrate.add_argument("--macs", type=float, help="print the plan for this MACs budget")
    calibrate.add_argument("--option", type=_option, action="append", default=[],
                           help="prune_merge option for the printed plan, e.g. keep_rate=0.6 (repeatable)")
    calibrate.add_argument("--out", default="vitslim-out/prune_merge_scores.safetensors", help="scores file")
    calibrate.add_argument("--no-progress", action="store_true")
    cli_segment.add_parser(sub)
    vis = sub.add_parser("visualize", help="pictures of which patches share a token after chosen blocks")
    _add_model_args(vis)
    vis.add_argument("images", nargs="+", metavar="IMAGE", help="image files to draw")
    vis.add_argument("--method", help="comma-separated methods, one row each ('dense' too); "
                                      "default: the method of a patched --checkpoint")
    vis.add_argument("--macs", type=float, help="MACs budget for every --method (fraction of dense)")
    vis.add_argument("--option", type=_option, action="append", default=[],
                     help="method option key=value or method.key=value (repeatable)")
    vis.add_argument("--blocks", type=_ints, help="0-based blocks to draw, e.g. 2,5,11 (negative: from the end; "
                                                  "default about 1/4 and 1/2 through, and the last)")
    vis.add_argument("--image-size", type=_size, metavar="HxW",
                     help="input size instead of the model's (non-square needs a dynamic_img_size model)")
    vis.add_argument("--out", default="visualize", help="folder for the PNGs (default visualize)")
    exp = sub.add_parser("export", help="any model (a training checkpoint, or --model patched with --method) to "
                                        "one safetensors or ONNX file")
    exp.add_argument("source", nargs="?", help="a vitslim training checkpoint (e.g. OUT/last.pt), patched as trained; "
                                               "or give --model (and --method) instead")
    _add_model_args(exp)
    _add_patch_args(exp, "patch --model with this method first")
    exp.add_argument("--format", default=None, choices=["safetensors", "onnx"],
                     help="default: from --out's suffix (.onnx or .safetensors)")
    exp.add_argument("--input-size", type=_ints, metavar="C,H,W",
                     help="ONNX: the input size the graph is fixed to (default the model's)")
    exp.add_argument("--batch", default="dynamic", help="ONNX: a fixed batch size, or 'dynamic' (default)")
    exp.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "int8"],
                     help="safetensors: fp32 or bf16 weights; ONNX: fp32 or int8 (onnxruntime dynamic quantisation)")
    exp.add_argument("--out", required=True, help="the file to write (vitslim.export.load / onnxruntime read it)")
    auto = sub.add_parser("auto", help="search every training-free method and setting for a MACs, latency or "
                                       "speed-up target on held-out images; save the best (docs/auto.md)")
    _add_model_args(auto)
    auto.add_argument("--data", help="labelled data with a train split (held-out images) and --split to report on "
                                     "(default: digits for the default model)")
    target = auto.add_mutually_exclusive_group(required=True)
    target.add_argument("--macs", type=float, help="MACs target, a fraction of dense (met within 2%%)")
    target.add_argument("--latency-ms", type=float, help="batch-1 latency target on this machine (--threads threads)")
    target.add_argument("--speedup", type=float, help="throughput target: this many times the dense model's at "
                                                      "--batch-size, timed here (--threads threads, --runs rounds)")
    auto.add_argument("--task", default="classify", choices=["classify", "segment"],
                      help="segment: --model is a `vitslim segment train` checkpoint and --data a segmentation folder; "
                           "the methods run under its head, ranked and reported by mIoU (default classify)")
    auto.add_argument("--backend", default="eager", choices=["eager", "compile", "onnxruntime"],
                      help="what latency and speed-up are timed on (the deployable form, vitslim.export.runtime)")
    auto.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "int8"],
                      help="precision timed and scored at (bf16/int8 change the predictions the ranking sees)")
    auto.add_argument("--batch-size", type=int, default=32, help="batch size of --speedup timing (default 32)")
    auto.add_argument("--runs", type=int, default=5, help="timed rounds per --speedup measurement (default 5)")
    auto.add_argument("--split", default="test", help="split the chosen model is reported on (default test)")
    auto.add_argument("--limit", type=int, help="report on only this many images of --split (evenly spread)")
    auto.add_argument("--holdout", type=int, default=256,
                      help="train-split images the candidates are ranked on (default 256)")
    auto.add_argument("--calibration", type=int, default=256,
                      help="other train-split images the calibrated candidates score channels/tokens on "
                           "(default 256; 0: search only data-free settings)")
    auto.add_argument("--methods", help="comma-separated methods to search (default: every training-free one)")
    auto.add_argument("--time-budget", type=float, help="seconds: when they are spent, patch no further candidate "
                                                        "and stop the successive halving")
    auto.add_argument("--finetune-budget", type=int, metavar="STEPS",
                      help="fine-tune the best --finetune-top candidates this many steps with distillation from the "
                           "dense model (train images not held out), re-rank them, save the best")
    auto.add_argument("--finetune-top", type=int, default=3, help="how many candidates to fine-tune (default 3)")
    auto.add_argument("--finetune-batch-size", type=int, default=32, help="fine-tuning batch size (default 32)")
    auto.add_argument("--finetune-lr", type=float, default=1e-4, help="fine-tuning peak lr (default 1e-4)")
    auto.add_argument("--eval-batch-size", type=int, default=64)
    auto.add_argument("--out", required=True, help="folder: model.safetensors, auto.md/json/png, the search record")
    auto.add_argument("--no-progress", action="store_true")
    return parser


def _run_auto(args: argparse.Namespace) -> int:
    from vitslim.autosearch import METRIC_NAMES, auto

    if args.task == "segment":
        from vitslim.train.segmentation import load_segmentation

        if args.model == "default":
            raise VitslimError("give --model: a `vitslim segment train` checkpoint (its head is kept, the methods run "
                               "under it)")
        if args.data is None:
            raise VitslimError("give --data: the segmentation folder the head was trained on (a train split to rank "
                               "on, --split to report on)")
        model, data = load_segmentation(args.model), args.data
    else:
        model = _load(args)
        data = _required_data(args, model, "with a train split to rank on")
    result = auto(model, data, args.out, macs=args.macs, latency_ms=args.latency_ms, speedup=args.speedup,
                  speed_batch=args.batch_size, runs=args.runs, task=args.task, backend=args.backend,
                  precision=args.precision, holdout=args.holdout, calibration=args.calibration,
                  report_limit=args.limit, report_split=args.split,
                  methods=_method_list(args.methods) if args.methods else None, time_budget=args.time_budget,
                  finetune_steps=args.finetune_budget, finetune_top=args.finetune_top,
                  finetune_batch=args.finetune_batch_size, finetune_lr=args.finetune_lr, threads=args.threads, batch_size=args.eval_batch_size, progress=not args.no_progress,
                  command=_command(args))
    metric = result["metric"]
    print(f"chosen: {result['chosen']} ({result['method']} {result['options']}), {result['macs_ratio']:.3f} of the "
          f"dense MACs, {METRIC_NAMES[metric]} {result[metric]:.2%} on {result['report_images']} "
          f"{result['report_split']} images (dense {result['dense_' + metric]:.2%})")
    print(f"wrote {', '.join(f'{args.out}/{name}' for name in result['files'])}, auto.md, auto.json, auto.png")
    return 0


def _load(args: argparse.Namespace):
    from vitslim.zoo import load_model

    return load_model(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained)


def _loader(args: argparse.Namespace, model):
    from vitslim.data import build_loader

    data = args.data or _default_data(args, model)
    if data is None:
        return None
    return build_loader(data, args.split, model=model, batch_size=args.eval_batch_size, limit=args.limit)


def _default_data(args: argparse.Namespace, model) -> str | None:
    """digits for the embedded default model (also when it comes back from a training checkpoint)."""
    is_digits = (getattr(model, "pretrained_cfg", None) or {}).get("tag") == "digits"
    return "digits" if args.model == "default" or is_digits else None


def _required_data(args: argparse.Namespace, model, purpose: str) -> str:
    """--data, else digits for the default model; a one-line error otherwise."""
    data = args.data or _default_data(args, model)
    if data is None:
        raise VitslimError(f"give --data ({purpose}) for a model other than the default")
    return data


def _run_compare(args: argparse.Namespace, with_data: bool) -> int:
    from vitslim.measure.compare import run_compare
    from vitslim.measure.report import format_table, save_report

    methods = _method_list(args.methods)
    model = _load(args)
    loader = _loader(args, model) if with_data else None
    if with_data and loader is None:
        print("vitslim: no --data for this model: measuring speed only", file=sys.stderr)
    runner, runtime = _runner(args)
    result = run_compare(model, methods, args.budgets, loader=loader, batch_size=args.batch_size,
                         runs=args.runs, threads=args.threads, allocator=args.allocator,
                         options=_method_options(args, methods), runner=runner, runtime=runtime)
    name = args.name or ("compare" if with_data else "bench")
    command = _command(args)
    title = f"vitslim {name}: {args.model}"
    paths = save_report(result, args.out, name, title, command=command, plot=not args.no_plot)
    print(format_table(result["rows"]))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _runner(args: argparse.Namespace) -> tuple[Any, dict[str, str] | None]:
    """How every model is run (--backend, --precision): a runtime builder, or None for eager fp32."""
    from vitslim.export.inference import check_runtime
    from vitslim.export.onnx import require
    from vitslim.export.runtime import runtime

    check_runtime(args.backend, args.precision)
    if args.backend == "eager" and args.precision == "fp32":
        return None, None
    if args.backend == "onnxruntime":
        require("onnxruntime")  # before the slow patching
    return (functools.partial(runtime, backend=args.backend, precision=args.precision, threads=args.threads),
            {"backend": args.backend, "precision": args.precision})


def _run_eval(args: argparse.Namespace) -> int:
    from vitslim.measure import evaluate

    model = _load(args)
    _patch_as_asked(model, args)
    loader = _loader(args, model)
    if loader is None:
        raise VitslimError("give --data for a model other than the default")
    acc = evaluate(model, loader, threads=args.threads)
    macs = count_macs(model) / 1e9
    print(f"top-1 {acc['top1']:.2%}  top-5 {acc['top5']:.2%}  on {acc['n']} images  ({macs:.4f} GMACs)")
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from vitslim.export.files import save
    from vitslim.export.inference import deployable
    from vitslim.export.onnx import to_onnx

    if args.source and args.checkpoint:
        raise VitslimError("give the training checkpoint either as SOURCE or as --checkpoint, not both")
    model = _load(argparse.Namespace(**{**vars(args), "checkpoint": args.source or args.checkpoint}))
    _patch_as_asked(model, args)
    fmt = args.format or ("onnx" if args.out.lower().endswith(".onnx") else "safetensors")
    if fmt == "onnx":
        batch = args.batch if args.batch == "dynamic" else _positive_int(args.batch, "--batch")
        size = tuple(args.input_size) if args.input_size else None
        if size is not None and len(size) != 3:
            raise VitslimError(f"--input-size takes C,H,W, e.g. 3,224,224; got {args.input_size}")
        path = to_onnx(model, args.out, input_size=size, batch=batch, precision=args.precision)
        what = "checked in onnxruntime against PyTorch"
    else:
        if args.input_size or args.batch != "dynamic":
            raise VitslimError("--input-size and --batch are for --format onnx")
        save(model, args.out, precision=args.precision)
        path, what = args.out, f"{args.precision} weights"
    inference = deployable(model)
    params = sum(p.numel() for p in inference.parameters()) / 1e6
    method = describe(model)["method"]
    print(f"wrote {path} ({fmt}, {method}, {what}): {params:.2f} M parameters, "
          f"{count_macs(inference) / 1e9:.4f} GMACs per image")
    return 0


def _positive_int(text: str, flag: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise VitslimError(f"{flag} takes a whole number >= 1 or 'dynamic', got {text!r}")
    return value


def _run_train(args: argparse.Namespace) -> int:
    import pathlib

    import torch

    from vitslim.measure import fit_latency
    from vitslim.train.config import TrainConfig
    from vitslim.train.engine import fit, teacher_copy
    from vitslim.data import build_dataset
    from vitslim.train.engine import distributed_env, resume_path, wants_teacher

    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_")}
    config = TrainConfig.from_recipe(args.recipe, **overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = _load(args)
    data = _required_data(args, model, "a dataset to train on")
    out = pathlib.Path(args.out or f"vitslim-out/train-{args.method or 'dense'}")
    teacher = teacher_copy(model)  # the dense weights before any patching; dropped below unless wanted
    record: dict[str, Any] = {"command": _command(args), "method": args.method, "macs": args.macs,
                              "recipe": args.recipe}
    options = _options_for(args.method, args.option) if args.method else {}
    resume = resume_path(args.resume, out)
    if args.latency_ms is not None:
        if args.method != "spvit" or args.macs is not None:
            raise VitslimError("--latency-ms goes with --method spvit (and without --macs)")
        if resume is not None:  # the checkpoint holds the options its latency search chose
            from vitslim.train.checkpoint import read_checkpoint

            saved = read_checkpoint(resume)
            patch(model, saved.get("method") or args.method, **(saved.get("options") or {}))
            record["latency"] = (saved.get("run_record") or {}).get("latency")
        else:
            record["latency"] = fit_latency(model, args.latency_ms, args.method, threads=args.threads,
                                            init_seed=config.seed, **options)
    else:
        _patch_as_asked(model, args, init_seed=config.seed)
    if not wants_teacher(model, config, args.teacher):
        teacher = None
    record["teacher"] = "dense" if teacher is not None else None
    train_set = build_dataset(data, args.split, model=model, limit=args.limit, augment=config.augment())
    val_set = None if args.no_eval else build_dataset(data, args.val_split, model=model, limit=args.val_limit)
    result = fit(model, train_set, val_data=val_set, teacher=teacher, config=config, out_dir=out,
                 resume=resume, progress=not args.no_progress, eval_before=args.eval_before, run_record=record)
    if distributed_env()[0] == 0:
        final = result["final"]
        line = f"trained {result['steps']} steps"
        if "top1" in final:
            line += f": top-1 {final['top1']:.2%} on {final['n']} images"
        print(f"{line}; checkpoint {result['checkpoint']}, log {out / 'log.jsonl'}")
    return 0


def _run_calibrate(args: argparse.Namespace) -> int:
    import json

    import torch

    from vitslim.data import build_loader
    from vitslim.io import atomic_write
    from vitslim.methods.prune_merge import calibrate, save_scores

    if args.threads:
        torch.set_num_threads(args.threads)
    model = _load(args)
    data = _required_data(args, model, "images to calibrate on")
    loader = build_loader(data, args.split, model=model, batch_size=args.batch_size, limit=args.limit,
                          shuffle=True, seed=args.seed)
    scores = calibrate(model, loader, batches=args.iters, seed=args.seed, progress=not args.no_progress)
    images = min(args.iters * args.batch_size, len(loader.dataset))
    command = _command(args)
    path = save_scores(args.out, scores, model=args.model, data=data, split=args.split, images=images,
                       command=command)
    options = _options_for("prune_merge", args.option)
    dense = count_macs(model)
    patch(model, "prune_merge", macs=args.macs, scores=scores, **options)
    plan = model.vitslim_config["options"]
    roles = describe(model)["plan"]
    plan_path = path.with_suffix(".plan.json")
    atomic_write(plan_path, json.dumps({"command": command, "options": plan, "blocks": roles}, indent=1) + "\n")
    print(f"scores of {len(scores)} blocks from {images} images -> {path}; plan -> {plan_path}")
    print(f"plan at keep_rate {plan['keep_rate']}, prune_rate {plan['prune_rate']} "
          f"({count_macs(model) / dense:.3f} of the dense MACs):")
    print("  centres per block: " + " ".join(str(t) for t in plan["tokens"]))
    print("  pruned per block:  " + " ".join(str(t) for t in plan["pruned"]))
    print(f"use it: --method prune_merge --option scores={path} (with --macs or --option keep_rate=...)")
    return 0


def _run_visualize(args: argparse.Namespace) -> int:
    import pathlib

    from vitslim.dense.features import block_indices, check_one_grid
    from vitslim.dense.visualize import load_images, save_figure, token_groups
    from vitslim.measure.compare import build_configs

    names = [m.strip() for m in (args.method or "").split(",") if m.strip()]
    methods = _method_list(",".join(m for m in names if m != "dense"))
    missing = [p for p in args.images if not os.path.isfile(p)]
    if missing:  # before loading the model, which can take a while
        raise VitslimError(f"no image file {', '.join(missing)}: give paths of images (png, jpg, ...)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model = _load(args)
    check_one_grid(model)  # token maps need one patch grid (not PiT's stages)
    block_indices(args.blocks, len(model.blocks))  # a bad --blocks fails before the budget searches
    images, pictures = load_images(args.images, model, size=args.image_size)
    check_input(model, images)  # e.g. a non-square --image-size on a model without dynamic_img_size
    dense, configs, _ = build_configs(model, methods, [args.macs], _method_options(args, methods))
    if "dense" not in names:
        configs.pop("dense")
    if not configs:
        raise VitslimError("give --method, e.g. --method tome,topk --macs 0.6")
    input_size = tuple(images.shape[1:])
    dense_macs = count_macs(dense, input_size)
    rows = {}
    for name, m in configs.items():
        label = f"{name.split('@')[0]}: {count_macs(m, input_size) / dense_macs:.2f} of dense MACs"
        rows[label] = token_groups(m, images, args.blocks)
    out = pathlib.Path(args.out)
    stems: set[str] = set()
    for b, path in enumerate(args.images):
        stem = pathlib.Path(path).stem
        stem = f"{stem}-{b}" if stem in stems else stem  # two images of one name in different folders
        stems.add(stem)
        per_image = {label: {i: g[b] for i, g in groups.items()} for label, groups in rows.items()}
        written = save_figure(out / f"{stem}.png", pictures[b], per_image, title=f"{args.model}: {path}")
        print(f"wrote {written}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vitslim`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded in reports as the command that made them
    os.environ.setdefault("TQDM_MININTERVAL", "1")
    try:
        if args.command == "eval":
            return _run_eval(args)
        if args.command == "train":
            return _run_train(args)
        if args.command == "calibrate":
            return _run_calibrate(args)
        if args.command == "export":
            return _run_export(args)
        if args.command == "segment":
            return cli_segment.run(args)
        if args.command == "visualize":
            return _run_visualize(args)
        if args.command == "auto":
            return _run_auto(args)
        return _run_compare(args, with_data=args.command == "compare")
    except VitslimError as exc:
        print(f"vitslim: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vitslim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
