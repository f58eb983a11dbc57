"""Export (slim) the CDCP/CAIT runs of a fine-tune benchmark and evaluate the exported models on CIFAR-10.

For each run folder: vitslim.load(last.pt) -> vitslim.export.slim -> save OUT/RUN/model.safetensors
-> vitslim.export.load -> top-1 on the CIFAR-10 test set (fp32), written to OUT/RUN/exported.json,
which finetune_report.py adds to its table. The reported accuracy is the exported model's.

    python benchmarks/cait_export_eval.py OUT RUN... [--data cifar10] [--limit N]
"""
from __future__ import annotations

import argparse
import json
import pathlib

import vitslim
import torch

from vitslim import export
from vitslim.measure.accuracy import evaluate
from vitslim.data import build_loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--data", default="cifar10", help="test data (default cifar10)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, help="evaluate on only this many test images (smoke tests)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for run in args.runs:
        folder = args.out / run
        model = vitslim.load(folder / "last.pt")
        slim = export.slim(model)
        export.save(slim, folder / "model.safetensors")
        loaded = export.load(folder / "model.safetensors")
        loader = build_loader(args.data, "test", model=loaded, batch_size=128, limit=args.limit)
        acc = evaluate(loaded, loader, progress=False, threads=args.threads)
        record = {"top1": acc["top1"], "top5": acc["top5"], "n": acc["n"],
                  "gmacs": vitslim.count_macs(loaded) / 1e9, "channels": loaded.vitslim_channels,
                  "params": sum(p.numel() for p in loaded.parameters())}
        (folder / "exported.json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"{run}: exported top-1 {acc['top1']:.2%} ({record['gmacs']:.4f} GMACs)")


if __name__ == "__main__":
    main()
