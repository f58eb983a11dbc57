"""Training-free channel pruning on real pretrained weights: CDCP and CAIT by channel importance.

    python benchmarks/channel_importance.py --name dinov2_channel_importance --budgets 0.7,0.5

The backbone is the team's real pretrained ViT-S/14 (``$VITSLIM_SHARED/models/dinov2-vits14-imgfocus``,
DINOv2 layout with LayerScale) at 224 px (16x16 patches), frozen. A linear probe (multinomial logistic
regression, L-BFGS) on the dense CLS feature of ``--train-per-class`` CIFAR-10 training images per class
becomes the model's head, so every row is one whole classifier: top-1 on ``--test`` balanced CIFAR-10
test images (upsampled to 224), and the mean cosine of its CLS feature to the dense model's on the same
images. Each channel method at each budget (``macs=``) with each channel importance (and each token
method, e.g. ToMe, once per budget for reference):
- ``magnitude``: data-free (products of weight norms);
- ``taylor``: |sum a dL/da| over ``--calibration`` training images (cross-entropy of the probe head);
- ``activation``: weight norm times activation norm over the same images (Wanda-style);
- ``fluctuation``: the same on the activations' deviation from their mean, and pruned channels held
  at their calibration mean (FLAP-style mean compensation).
Calibration images are training images the probe never saw. Rows are kept in ``--work`` as they
finish (an interrupted run resumes); smoke mode (VITSLIM_BENCH_SMOKE=1): the tiny ViT, a few images.
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
from torch.utils.data import DataLoader, Subset

from vitslim.data import balanced_subset, build_dataset
from vitslim.io import atomic_write
from vitslim.measure.macs import count_macs
from vitslim.patch import patch

SHARED = Path(os.environ.get("VITSLIM_SHARED", Path(__file__).resolve().parents[2] / "shared"))
IMPORTANCES = ("magnitude", "taylor", "activation", "fluctuation")
CHANNEL_METHODS = ("cdcp", "cait")


def build_parser() -> argparse.ArgumentParser:
    """The script's options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="dinov2_channel_importance")
    p.add_argument("--model", default=str(SHARED / "models/dinov2-vits14-imgfocus"))
    p.add_argument("--data", default="cifar10")
    p.add_argument("--methods", default="cdcp,cait,tome", help="channel methods (each importance) and token "
                   "methods (one row per budget, for reference)")
    p.add_argument("--budgets", default="0.7,0.5")
    p.add_argument("--importances", default=",".join(IMPORTANCES))
    p.add_argument("--train-per-class", type=int, default=100, help="probe training images per class")
    p.add_argument("--test", type=int, default=1000, help="balanced test images")
    p.add_argument("--calibration", type=int, default=256, help="calibration images (train split, not the probe's)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=os.environ.get("VITSLIM_BENCH_WORK", str(Path.home() / ".cache/vitslim")))
    p.add_argument("--out", default="benchmarks/results")
    return p


def cls_and_logits(model: torch.nn.Module, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pre-head CLS features, the logits and the labels of every image in ``loader``."""
    captured: list[torch.Tensor] = []
    handle = model.head.register_forward_pre_hook(lambda _m, inputs: captured.append(inputs[0].detach()))
    logits, labels = [], []
    try:
        with torch.inference_mode():
            for images, targets in loader:
                logits.append(model(images))
                labels.append(targets)
    finally:
        handle.remove()
    return torch.cat(captured), torch.cat(logits), torch.cat(labels)


def fit_probe(features: torch.Tensor, labels: torch.Tensor, classes: int, weight_decay: float = 1e-3) -> torch.nn.Linear:
    """Multinomial logistic regression on standardised-free features, full-batch L-BFGS."""
    probe = torch.nn.Linear(features.shape[1], classes)
    torch.nn.init.zeros_(probe.weight)
    torch.nn.init.zeros_(probe.bias)
    optimizer = torch.optim.LBFGS(probe.parameters(), lr=1, max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(features), labels) + weight_decay * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    command = "python benchmarks/channel_importance.py " + shlex.join(argv)
    methods = [m for m in args.methods.split(",") if m]
    budgets = [float(b) for b in args.budgets.split(",") if b]
    importances = [i for i in args.importances.split(",") if i]
    per_class, n_test, n_calib, threads = args.train_per_class, args.test, args.calibration, args.threads
    work, out, data = Path(args.work) / "channel_importance" / args.name, Path(args.out), args.data
    if smoke.ENABLED:  # the same code on tiny inputs: see smoke.py
        model = timm.create_model(smoke.TINY_ARCHITECTURE, **{**smoke.TINY_VIT, "num_classes": 0}).eval()
        budgets, per_class, n_test, n_calib, threads = budgets[:1], 2, smoke.IMAGES, 8, smoke.THREADS
        work, out, data = smoke.work_dir() / "channel_importance" / args.name, smoke.results_dir(out), smoke.data(data)
    else:
        model = timm.create_model(f"local-dir:{args.model}", pretrained=True, img_size=224).eval()
    torch.set_num_threads(threads)
    work.mkdir(parents=True, exist_ok=True)
    train = build_dataset(data, "train", model=model, evaluation=True)
    test = build_dataset(data, "test", model=model)
    classes = len(set(train.targets))
    chosen = balanced_subset(train.targets, per_class * classes + n_calib)
    probe_images, calib_images = chosen[:per_class * classes], chosen[per_class * classes:]
    load = dict(batch_size=args.batch_size, num_workers=0)
    test_loader = DataLoader(Subset(test, balanced_subset(test.targets, n_test)), **load)
    calibration = DataLoader(Subset(train, calib_images), **load)

    probe_path = work / "probe.pt"
    if not probe_path.is_file():  # the dense probe: the head of every row
        start = time.perf_counter()
        features, _, labels = cls_and_logits(_with_head(model, torch.nn.Identity()),
                                             DataLoader(Subset(train, probe_images), **load))
        probe = fit_probe(features, labels, classes)
        torch.save({"state": probe.state_dict(), "seconds": time.perf_counter() - start}, probe_path)
    saved = torch.load(probe_path, weights_only=True)
    probe = torch.nn.Linear(model.num_features, classes)
    probe.load_state_dict(saved["state"])
    classifier = _with_head(model, probe)
    dense_macs = count_macs(classifier)
    dense_cls, dense_logits, labels = cls_and_logits(classifier, test_loader)

    rows_path = work / "rows.json"
    rows = json.loads(rows_path.read_text()) if rows_path.is_file() else {}
    wanted = [("dense", 1.0, "-")] + [(m, b, i) for m in methods for b in budgets
                                      for i in (importances if m in CHANNEL_METHODS else ["-"])]
    for method, budget, importance in wanted:
        key = f"{method}@{budget}/{importance}"
        if key in rows:
            continue
        start = time.perf_counter()
        if method == "dense":
            cls, logits, macs = dense_cls, dense_logits, dense_macs
        else:
            options = dict(macs=budget) if importance == "-" else dict(macs=budget, importance=importance)
            if importance not in ("-", "magnitude"):
                options.update(calibration=calibration, calibration_batches=len(calibration))
            patched = patch(copy.deepcopy(classifier), method, **options).eval()
            macs = count_macs(patched)
            cls, logits, _ = cls_and_logits(patched, test_loader)
        rows[key] = {"method": method, "budget": budget, "importance": importance, "macs_ratio": macs / dense_macs,
                     "top1": (logits.argmax(1) == labels).float().mean().item(),
                     "cls_cosine": F.cosine_similarity(cls, dense_cls, dim=1).mean().item(),
                     "seconds": time.perf_counter() - start}
        atomic_write(rows_path, json.dumps(rows, indent=2) + "\n")
        print(f"{key}: top-1 {rows[key]['top1']:.2%}, CLS cosine {rows[key]['cls_cosine']:.4f}", flush=True)
    report(args.name, command, [rows[f"{m}@{b}/{i}"] for m, b, i in wanted], out,
           dict(train_per_class=per_class, test=len(labels), calibration=len(calib_images), threads=threads,
                size=int(model.patch_embed.img_size[0])))
    return 0


def _with_head(backbone: torch.nn.Module, head: torch.nn.Module) -> torch.nn.Module:
    """A copy of the backbone (shared weights) whose head is ``head``."""
    model = copy.copy(backbone)
    model._modules = dict(backbone._modules, head=head)
    return model


def report(name: str, command: str, rows: list[dict], out: Path, setup: dict) -> None:
    """Markdown + JSON table of the rows."""
    dense = rows[0]["top1"]
    lines = [f"# {name}: training-free channel pruning by importance (dinov2-vits14 backbone, CIFAR-10 probe)", "",
             "Command:", "", f"    {command}", "",
             f"Setup: linear probe on the dense CLS feature of {setup['train_per_class']} training images per class; "
             f"top-1 on {setup['test']} balanced test images at {setup['size']} px; calibration on {setup['calibration']} other "
             f"training images; {setup['threads']} threads. Dense top-1 **{dense:.2%}**.", "",
             "| method | MACs target | importance | MACs ratio | top-1 | vs dense | CLS cosine to dense |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['budget']:.2f} | {r['importance']} | {r['macs_ratio']:.3f} | "
                     f"{r['top1']:.2%} | {100 * (r['top1'] - dense):+.2f} pts | {r['cls_cosine']:.4f} |")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / f"{name}.md", "\n".join(lines) + "\n")
    atomic_write(out / f"{name}.json", json.dumps({"command": command, "setup": setup, "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
