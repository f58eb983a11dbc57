"""What the ``vitslim`` command's modules share: option parsing, model and training flags, the command line."""
from __future__ import annotations

import argparse
import shlex
from typing import Any, Sequence

from vitslim.errors import VitslimError


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _size(text: str) -> tuple[int, int]:
    """HxW or H,W in pixels (one number: a square)."""
    try:
        values = [int(v) for v in text.lower().replace("x", ",").split(",") if v]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH in pixels, e.g. 224x320, got {text!r}") from None
    return values[0], values[-1]


def _option(text: str) -> tuple[str, str, str]:
    """METHOD.KEY=VALUE or KEY=VALUE; the value is read by the method's option type (e.g. r=[8,4])."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"options look like key=value or method.key=value, got {text!r}")
    key, raw = text.split("=", 1)
    method, _, key = key.rpartition(".")
    return method, key, raw


def _options_for(method: str, given: list[tuple[str, str, str]]) -> dict[str, Any]:
    """The --option values meant for ``method``, typed by its options dataclass."""
    from vitslim.methods.base import get_method

    options_type = get_method(method).Options
    return {key: options_type.parse_value(key, raw) for scope, key, raw in given if scope in ("", method)}


def _command(args: argparse.Namespace) -> str:
    """The command line, as recorded in reports and summaries."""
    return "vitslim " + " ".join(shlex.quote(a) for a in args.argv)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="'default' (the embedded digits ViT), a timm model name, or a timm model folder")
    p.add_argument("--checkpoint", help="weights for --model: .safetensors, .pth or a timm model folder")
    p.add_argument("--pretrained", action="store_true", help="download the model's hub weights (needs internet)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for timing (default 2)")


def _add_patch_args(p: argparse.ArgumentParser, method_help: str) -> None:
    """--method, --macs and --option: patch the loaded model before the command's work."""
    p.add_argument("--method", help=method_help)
    p.add_argument("--macs", type=float, help="MACs budget for --method")
    p.add_argument("--option", type=_option, action="append", default=[],
                   help="method option key=value (repeatable)")


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _none_or(kind):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)
    parse.__name__ = kind.__name__.strip("_")
    return parse


def _flag_type(hint: Any):
    """An argparse type and metavar for a TrainConfig field's annotation (Optional fields also take 'none')."""
    import types
    import typing

    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    base = args[0] if optional else hint
    kind = {bool: _bool, int: int, float: float, str: str}.get(base, _floats)  # tuple[float, float]: "a,b"
    name = getattr(base, "__name__", "floats").upper()
    return (_none_or(kind) if optional else kind), name


def _add_train_args(p: argparse.ArgumentParser) -> None:
    import dataclasses
    import typing

    from vitslim.train.config import RECIPES, TrainConfig

    _add_model_args(p)
    p.add_argument("--data", help="training data: 'digits', 'cifar10', an ImageFolder or labels.csv folder "
                                  "(default: digits for the default model)")
    p.add_argument("--split", default="train", help="training split (default train)")
    p.add_argument("--val-split", default="test", help="evaluation split of --data (default test)")
    p.add_argument("--limit", type=int, help="train on only this many images (evenly spread over classes)")
    p.add_argument("--val-limit", type=int, help="evaluate on only this many images")
    p.add_argument("--no-eval", action="store_true", help="skip evaluation")
    p.add_argument("--eval-before", action="store_true", help="also evaluate before the first step")
    p.add_argument("--method", help="patch with this method before training")
    p.add_argument("--macs", type=float, help="MACs budget for --method")
    p.add_argument("--latency-ms", type=float,
                   help="spvit: choose the keep rates for this batch-1 latency measured on this machine")
    p.add_argument("--option", type=_option, action="append", default=[], help="method option key=value")
    p.add_argument("--recipe", choices=sorted(RECIPES), help="a published recipe; flags below override it")
    p.add_argument("--teacher", default="auto", choices=["auto", "dense", "none"],
                   help="distil from the dense model (auto: when --kd-weight > 0 or the method distils tokens)")
    p.add_argument("--out", help="folder for checkpoints and log.jsonl (default vitslim-out/train-METHOD)")
    p.add_argument("--resume", help="checkpoint to continue from, or 'auto' (OUT/last.pt when present)")
    p.add_argument("--no-progress", action="store_true")
    group = p.add_argument_group("training options (default: the recipe's, else TrainConfig's)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "recipe":
            continue
        kind, metavar = _flag_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        group.add_argument("--" + f.name.replace("_", "-"), dest="cfg_" + f.name, default=argparse.SUPPRESS,
                           type=kind, metavar=metavar, help=f"(default {default})")


def _patch_as_asked(model, args: argparse.Namespace, init_seed: int = 0) -> None:
    """Patch ``model`` with --method (at --macs, with --option, new modules from ``init_seed``); refuse --macs/--option
    without a method."""
    if args.method:
        from vitslim.patch import patch

        patch(model, args.method, macs=args.macs, init_seed=init_seed, **_options_for(args.method, args.option))
    elif args.macs or args.option:
        raise VitslimError("--macs and --option need --method")


def _method_list(text: str) -> list[str]:
    """Comma-separated method names, each one known; a one-line error otherwise."""
    from vitslim.methods.base import methods as known_methods

    methods = [m.strip() for m in text.split(",") if m.strip()]
    for m in methods:
        if m not in known_methods():
            raise VitslimError(f"unknown method {m!r}; known methods: {', '.join(known_methods())}")
    return methods


def _method_options(args: argparse.Namespace, methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    for method, key, _ in args.option:
        if method and method not in methods:
            raise VitslimError(f"--option {method}.{key}: {method!r} is not among --methods {list(methods)}")
    return {m: _options_for(m, args.option) for m in methods}
