"""Where ToMe's time goes at batch 1: its per-block steps timed inside a DeiT-S forward.

    python benchmarks/tome_overhead.py            # writes benchmarks/results/tome_overhead.{json,md}

Also times the two ways of gathering tokens (``gather`` with an expanded index vs a flat
``index_select``), the choice ``vitslim.tokens.gather_tokens`` makes. Smoke mode (VITSLIM_BENCH_SMOKE=1,
see smoke.py): a tiny ViT, 2 forwards, results in the smoke folder.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import smoke  # benchmarks/smoke.py, beside this file
import vitslim  # noqa: F401  (before timm)
import timm
import torch

from vitslim.methods.tome import ToMeMerge
from vitslim.tokens import Matching, merge_matched

OUT = smoke.results_dir(Path(__file__).parent / "results")


def step_times(batch: int = 1, budget: float = 0.6, forwards: int = 40) -> dict[str, float]:
    """Microseconds per block of each ToMe step, timed inside the patched forward."""
    spec, overrides = smoke.model_spec("deit_small_patch16_224")
    model = vitslim.patch(timm.create_model(spec, **overrides).eval(), "tome", macs=budget)
    totals: dict[str, float] = {}

    def tick(name: str, start: float) -> float:
        now = time.perf_counter()
        totals[name] = totals.get(name, 0.0) + now - start
        return now

    def timed_after_attn(self, state, attn):  # the same steps as ToMeMerge.after_attn, with timers
        r = min(self.r, (state.x.shape[1] - state.num_prefix) // 2)
        t = time.perf_counter()
        metric = attn.keys[:, state.num_prefix:]
        t = tick("keys (head mean)", t)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        t = tick("normalise", t)
        similarity = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)
        t = tick("similarity", t)
        best, best_dst = similarity.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
        t = tick("max + sort", t)
        src = order[:, :r]
        plan = Matching(order[:, r:], src, best_dst.gather(1, src))
        t = tick("plan", t)
        out = merge_matched(state, plan)
        tick("merge", t)
        return out

    original = ToMeMerge.after_attn
    ToMeMerge.after_attn = timed_after_attn
    try:
        x = torch.randn(batch, 3, *model.patch_embed.img_size)
        with torch.inference_mode():
            for _ in range(5):
                model(x)
            totals.clear()
            start = time.perf_counter()
            for _ in range(forwards):
                model(x)
            per_forward = (time.perf_counter() - start) / forwards
    finally:
        ToMeMerge.after_attn = original
    per_block = {k: 1e6 * v / forwards / len(model.blocks) for k, v in totals.items()}
    per_block["all steps"] = sum(per_block.values())
    per_block["forward (ms)"] = 1e3 * per_forward
    return per_block


def gather_vs_index_select(batch: int = 16, n: int = 150, channels: int = 384, repeats: int = 50) -> dict[str, float]:
    """Median milliseconds to pick 138 of n tokens per image, both ways."""
    x = torch.randn(batch, n, channels)
    idx = torch.randint(0, n, (batch, 138))
    flat = (idx + torch.arange(batch)[:, None] * n).reshape(-1)
    ways = {
        "gather (expanded index)": lambda: x.gather(1, idx[..., None].expand(-1, -1, channels)),
        "flat index_select": lambda: x.reshape(-1, channels).index_select(0, flat),
    }
    result = {}
    with torch.inference_mode():
        for name, fn in ways.items():
            fn()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            result[name] = 1e3 * statistics.median(times)
    return result


def main() -> None:
    """Measure and write the results."""
    torch.manual_seed(0)
    torch.set_num_threads(smoke.THREADS if smoke.ENABLED else 2)
    repeats = dict(forwards=2) if smoke.ENABLED else {}
    result = {"command": "python " + " ".join(sys.argv), "threads": 2, "torch": torch.__version__,
              "tome_steps_us_per_block_b1": step_times(**repeats),
              "gather_ms_b16_n150_c384": gather_vs_index_select(repeats=repeats.get("forwards", 50))}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "tome_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# ToMe's per-block cost at batch 1 (DeiT-S 224, macs=0.6, 2 threads)", "",
             f"Command: `{result['command']}`", "", "| step | us per block |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in result["tome_steps_us_per_block_b1"].items()]
    lines += ["", "| token gather (B 16, N 150, C 384, keep 138) | ms |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in result["gather_ms_b16_n150_c384"].items()]
    (OUT / "tome_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
