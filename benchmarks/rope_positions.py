"""Rotary positions of merged tokens: the rule vitslim ships against the alternatives, on real images.

In a RoPE model every token is rotated by its position in every block, so a merged token needs one.
vitslim's rule (docs/families.md): a ToMe merge keeps the destination's position. No pretrained
RoPE weights are reachable here, so this trains a small RoPE ViT (timm ``vit_small_patch16_rope_224``
layout: rotary positions only, no absolute embedding) on CIFAR-10 through ``vitslim.train.fit``
(checkpoints every epoch; rerun the same command to resume), then measures training-free top-1 on
the 10,000 test images for ToMe at each budget under each rule:

  destination  the merged token keeps the position of the token it merged into (vitslim)
  centroid     the patch nearest to the mean position of all the patches the token stands for
  none         merged tokens (size > 1) are not rotated at all, like the CLS token

and EViT at the same budgets, whose fused token has no position (vitslim) or the centroid of the
patches fused into it. The alternatives are applied after each reduction from the traced source map.

    python benchmarks/rope_positions.py --epochs 3 --budgets 0.5,0.7 --name rope_positions_cifar10

Smoke mode (VITSLIM_BENCH_SMOKE=1, see smoke.py): four blocks, two training steps on 16 images, 16 test
images, the first budget, one thread, reports in the smoke folder.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import sys
import time

import smoke  # benchmarks/smoke.py, beside this file
import vitslim  # noqa: F401  (before timm)
import timm
import torch
from tqdm.auto import tqdm

from vitslim.data import build_dataset, build_loader
from vitslim.io import atomic_write
from vitslim.methods.evit import AttentiveKeep
from vitslim.methods.tome import ToMeMerge
from vitslim.tokens import TokenState
from vitslim.train.config import TrainConfig
from vitslim.train.engine import fit

MODEL_ARGS = dict(img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4, num_classes=10)
CIFAR_CFG = dict(input_size=(3, 32, 32), interpolation="bilinear", crop_pct=1.0, crop_mode="center",
                 mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), num_classes=10)
RULES = {"tome": ["destination", "centroid", "none"], "evit": ["none", "centroid"]}
SHIPPED = {"tome": "destination", "evit": "none"}


def build_model() -> torch.nn.Module:
    """The small RoPE ViT (random init) with CIFAR-10's data config (four blocks in smoke mode)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_rope_224", **{**MODEL_ARGS, **({"depth": 4} if smoke.ENABLED else {})})
    model.pretrained_cfg = {**model.pretrained_cfg, **CIFAR_CFG}
    return model


def rule_positions(state: TokenState, rule: str) -> torch.Tensor:
    """Each patch-side token's position under ``rule``, from the traced source map (B, n0)."""
    p, n0 = state.num_prefix, state.num_patches0
    batch, n = state.x.shape[0], state.x.shape[1] - p
    shipped = state.positions().expand(batch, -1)
    token = state.source - p  # patch -> patch-side token (negative: pruned, or a prefix)
    counts = torch.zeros(batch, n + 1).scatter_add_(1, token.clamp(min=-1) + 1, torch.ones(batch, n0))[:, 1:]
    merged = counts > 1
    if rule == "none":
        return torch.where(merged, torch.full_like(shipped, n0), shipped)
    h, w = state.grid0
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(1, n0, 2)
    sums = torch.zeros(batch, n + 1, 2).scatter_add_(1, (token.clamp(min=-1) + 1).unsqueeze(-1).expand(-1, -1, 2),
                                                     coords.expand(batch, -1, -1).float())[:, 1:]
    centre = (sums / counts.clamp(min=1).unsqueeze(-1)).round().long()
    centroid = centre[..., 0] * w + centre[..., 1]
    return torch.where(counts > 0, centroid, shipped)  # tokens standing for no patch keep theirs


class RulePositions:
    """Mixed in front of a reducer: after its reduction, the rule's positions (the shipped rule: vitslim's own)."""

    rule = shipped = ""

    def after_attn(self, state, attn):
        state = super().after_attn(state, attn)
        if self.rule != self.shipped and state.source is not None:
            state.pos = rule_positions(state, self.rule)
        return state


class RuleMerge(RulePositions, ToMeMerge):
    shipped = SHIPPED["tome"]


class RuleKeep(RulePositions, AttentiveKeep):
    shipped = SHIPPED["evit"]


def top1(model: torch.nn.Module, loader, desc: str) -> float:
    """Top-1 (%) with the traced forward (the rules read the source map)."""
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for images, labels in tqdm(loader, desc=desc, leave=False):
            if vitslim.is_patched(model):
                logits = model.forward_head_state(model.forward_tokens(images, trace_source=True))
            else:
                logits = model(images)
            correct += (logits.argmax(1) == labels).sum().item()
            total += labels.numel()
    return 100.0 * correct / total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--budgets", default="0.5,0.7")
    parser.add_argument("--limit", type=int, default=None, help="test images (default all 10,000)")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--data", default="cifar10")
    parser.add_argument("--work", default="vitslim-out/rope_positions")
    parser.add_argument("--results", default="benchmarks/results")
    parser.add_argument("--name", default="rope_positions_cifar10")
    args = parser.parse_args(argv)
    command = "python benchmarks/rope_positions.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    results, work, data = smoke.results_dir(args.results), args.work, smoke.data(args.data)
    steps, train_limit, limit = None, args.train_limit, args.limit
    if smoke.ENABLED:
        work, steps, train_limit, limit = str(smoke.work_dir() / "rope_positions"), 2, smoke.IMAGES, smoke.IMAGES
    torch.set_num_threads(smoke.THREADS if smoke.ENABLED else 2)
    model = build_model()
    config = TrainConfig(epochs=args.epochs, max_steps=steps, batch_size=8 if smoke.ENABLED else 128, lr=1e-3,
                         warmup_epochs=0.3, warmup_lr=1e-5, weight_decay=0.05, label_smoothing=0.1,
                         precision="bf16", seed=0)
    started = time.time()
    train = data
    if train_limit:
        train = build_dataset(data, "train", model=model, limit=train_limit, augment=config.augment())
    fit(model, train, val_data=None, config=config, out_dir=work, resume="auto", progress=not smoke.ENABLED)
    train_minutes = (time.time() - started) / 60
    loader = build_loader(data, "test", model=model, batch_size=256, limit=limit)
    rows = [{"method": "dense", "macs": 1.0, "rule": "-", "top1": top1(model, loader, "dense")}]
    dense_macs = vitslim.count_macs(model)
    for method, rules in RULES.items():
        budgets = [float(b) for b in args.budgets.split(",")]
        for budget in budgets[:1] if smoke.ENABLED else budgets:
            vitslim.patch(model, method, macs=budget)
            macs = vitslim.count_macs(model) / dense_macs
            for rule in rules:
                cls = RuleMerge if method == "tome" else RuleKeep
                for reducer in model.vitslim_reducers.values():
                    reducer.__class__, reducer.rule = cls, rule
                label = rule + (" (vitslim)" if rule == SHIPPED[method] else "")
                rows.append({"method": method, "macs": round(macs, 3), "rule": label,
                             "top1": top1(model, loader, f"{method}@{budget} {rule}")})
            vitslim.unpatch(model)
    result = {"command": command, "model": {"architecture": "vit_small_patch16_rope_224", **MODEL_ARGS},
              "train": {"epochs": args.epochs, "minutes_this_run": round(train_minutes, 1),
                        **{k: getattr(config, k) for k in ("batch_size", "lr", "weight_decay", "label_smoothing",
                                                           "precision")}},
              "test_images": len(loader.dataset), "rows": rows}
    lines = [f"# {args.name}: rotary position of merged tokens", "", "Command:", "", f"    {command}", "",
             f"Small RoPE ViT ({MODEL_ARGS['depth']} blocks, width {MODEL_ARGS['embed_dim']}, rotary positions "
             f"only) trained {args.epochs} epochs on CIFAR-10 here; training-free top-1 on {len(loader.dataset)} "
             "test images.",
             "", "| method | MACs ratio | position of a merged / fused token | top-1 |", "|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['macs']:.3f} | {r['rule']} | {r['top1']:.2f} |" for r in rows]
    out = pathlib.Path(results)
    atomic_write(out / f"{args.name}.json", json.dumps(result, indent=1) + "\n")
    atomic_write(out / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
