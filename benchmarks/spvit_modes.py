"""SPViT accuracy under three forwards of one trained checkpoint (methods.md 3.6):
(a) vitslim inference: deterministic top-k per image, real gather (what `vitslim eval` runs);
(b) the official evaluation: the masked training forward with Gumbel noise (no speed-up);
(c) the masked training forward with argmax decisions (adaptive count per image, no noise).

    python benchmarks/spvit_modes.py CHECKPOINT [--limit N] [--data cifar10]

Smoke mode (VITSLIM_BENCH_SMOKE=1, see smoke.py): at most 16 images, digits when the data is missing.
"""
from __future__ import annotations

import argparse
import json

import smoke  # benchmarks/smoke.py, beside this file
import torch

import vitslim
from vitslim.data import build_loader


def accuracy(model, loader, masked: bool, gumbel: bool = True) -> tuple[float, float]:
    """Top-1 and the mean fraction of patches kept at the last stage."""
    correct = total = 0
    kept = []
    model.train(masked)
    for stage in model.vitslim_reducers.values():
        stage.gumbel = gumbel
    with torch.no_grad():
        for images, labels in loader:
            state = model.forward_tokens(images)
            logits = model.forward_head_state(state)
            correct += int((logits.argmax(1) == labels).sum())
            total += len(labels)
            if masked:
                kept.append(state.kernel.keep[-1].mean().item())
            else:
                kept.append((state.x.shape[1] - state.num_prefix - len(model.vitslim_reducers)) /
                            state.num_patches0)
    return correct / total, sum(kept) / len(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--data", default="cifar10", help="test data (default cifar10)")
    args = parser.parse_args()
    if smoke.ENABLED:
        args.limit, args.data = min(args.limit or smoke.IMAGES, smoke.IMAGES), smoke.data(args.data)
    torch.manual_seed(0)
    torch.set_num_threads(smoke.THREADS if smoke.ENABLED else 2)
    model = vitslim.load(args.checkpoint)
    loader = build_loader(args.data, "test", model=model, batch_size=256, limit=args.limit)
    rows = {"(a) top-k inference": accuracy(model, loader, masked=False),
            "(b) masked + Gumbel (official eval)": accuracy(model, loader, masked=True, gumbel=True),
            "(c) masked + argmax": accuracy(model, loader, masked=True, gumbel=False)}
    print(json.dumps({k: {"top1": v[0], "kept_last_stage": v[1]} for k, v in rows.items()}, indent=2))


if __name__ == "__main__":
    main()
