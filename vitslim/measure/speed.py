"""Throughput and latency, measured the same way everywhere.

Protocol: eval mode, ``torch.inference_mode()``, a fixed thread count, warm-up passes, then the
median (and p90) of at least 5 timed passes. ``compare_speed`` times several models round-robin
in one run (dense first), so drift on the machine hits them all alike and speed-ups are ratios
measured in the same run. ``ideal_model`` is the bar a token schedule is judged by: the dense
blocks run on the same token counts with no reduction work.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import statistics
import time
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from vitslim.errors import VitslimError
from vitslim.families import ModelWrapper, family_of
from vitslim.kernels import DEFAULT_KERNEL
from vitslim.measure.macs import default_input_size
from vitslim.tokens import TokenState

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_allocator_state = "default"


def tune_allocator() -> str:
    """Keep freed buffers in glibc's heap (no page faults per forward); returns the allocator state."""
    global _allocator_state
    if _allocator_state == "default":
        try:
            mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
        except (OSError, AttributeError):  # not glibc: nothing to tune
            return _allocator_state
        if mallopt(_M_MMAP_THRESHOLD, 1 << 30) and mallopt(_M_TRIM_THRESHOLD, 1 << 30):
            _allocator_state = "tuned (glibc mallopt mmap/trim thresholds 1 GiB)"
    return _allocator_state


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[int]:
    """Run the block with ``n`` torch threads (unchanged when ``n`` is falsy), restoring the count after;
    yields the count in use."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _autocast(precision: str):
    dtype = _DTYPES[precision]
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _summary(times: list[float], batch_size: int) -> dict[str, Any]:
    ordered = sorted(times)
    median = statistics.median(ordered)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return {"images_per_s": batch_size / median, "median_ms": 1e3 * median, "p90_ms": 1e3 * p90,
            "runs": len(times), "batch_size": batch_size, "times_ms": [1e3 * t for t in times]}


def paired_ratio(slow: dict[str, Any], fast: dict[str, Any]) -> float:
    """Median over rounds of slow/fast time, from two results of one ``compare_speed`` run.

    Each round times every model once, so pairing rounds cancels drift on the machine that a
    ratio of two medians would keep; time related models next to each other for the best effect.
    """
    return statistics.median(a / b for a, b in zip(slow["times_ms"], fast["times_ms"]))


def check_timing(batch_size: int, runs: int, warmup: int = 0, precision: str = "fp32",
                 allocator: str = "tuned") -> None:
    """Raise a VitslimError that says what to pass when a timing setting cannot give a measurement."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise VitslimError(f"batch size must be a whole number >= 1, got {batch_size!r}")
    if not isinstance(runs, int) or runs < 5:
        raise VitslimError(f"runs must be >= 5 for a trustworthy median, got {runs!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise VitslimError(f"warmup must be a whole number >= 0, got {warmup!r}")
    if precision not in _DTYPES:
        raise VitslimError(f"precision must be one of {', '.join(sorted(_DTYPES))}, got {precision!r}")
    if allocator not in ("tuned", "default"):
        raise VitslimError(f"allocator must be 'tuned' or 'default', got {allocator!r}")


def compare_speed(models: dict[str, nn.Module], batch_size: int = 32, *,
                  input_size: tuple[int, int, int] | None = None, runs: int = 7, warmup: int = 2,
                  threads: int | None = 2, precision: str = "fp32",
                  allocator: str = "tuned", progress: bool = False) -> dict[str, dict[str, Any]]:
    """Time several models round-robin on the same input; each gets images/s, median and p90."""
    check_timing(batch_size, runs, warmup, precision, allocator)
    allocator_state = tune_allocator() if allocator == "tuned" else _allocator_state
    first = next(iter(models.values()))
    x = torch.randn(batch_size, *(input_size or default_input_size(first)))
    times: dict[str, list[float]] = {name: [] for name in models}
    modes = {name: m.training for name, m in models.items()}
    with torch_threads(threads) as used, torch.inference_mode(), _autocast(precision):
        try:
            for m in models.values():
                m.eval()
                for _ in range(warmup):
                    m(x)
            for _ in tqdm(range(runs), desc=f"timing {len(models)} models, batch {batch_size}",
                          disable=not progress, leave=False):
                for name, m in models.items():
                    start = time.perf_counter()
                    m(x)
                    times[name].append(time.perf_counter() - start)
        finally:
            for name, m in models.items():
                m.train(modes[name])
    info = {"threads": used, "precision": precision, "allocator": allocator_state, "torch": torch.__version__}
    return {name: {**_summary(t, batch_size), **info} for name, t in times.items()}


def throughput(model: nn.Module, batch_size: int = 32, **kwargs: Any) -> dict[str, Any]:
    """Median images/s at ``batch_size`` (see ``compare_speed`` for the options)."""
    return compare_speed({"model": model}, batch_size, **kwargs)["model"]


def latency(model: nn.Module, *, runs: int = 30, warmup: int = 5, **kwargs: Any) -> dict[str, Any]:
    """Batch-1 latency: median and p90 in milliseconds."""
    return compare_speed({"model": model}, 1, runs=runs, warmup=warmup, **kwargs)["model"]


class IdealSchedule(ModelWrapper):
    """The dense blocks of ``model`` run on its schedule's token counts, with no reduction work."""

    def __init__(self, model: nn.Module, tokens: list[tuple[int, int]]):
        super().__init__()
        self.model, self.tokens, self.family = model, tokens, family_of(model)

    def wrapped_model(self) -> nn.Module:
        """The patched model whose schedule this runs."""
        return self.model

    def forward(self, images: Tensor) -> Tensor:
        """Logits of a dense pass that simply truncates to each block's token counts."""
        m, family = self.model, self.family
        x, grid, rope = family.embed(m, images)
        state = TokenState(x=x, num_prefix=family.num_prefix(m), grid0=grid or (1, 1), grid=grid, rope=rope)
        for i, (blk, (n_attn, n_mlp)) in enumerate(zip(family.blocks(m), self.tokens)):
            state.x = state.x[:, :n_attn]  # the rotary rows follow: the first patches, in order
            state.x, _ = family.attn_residual(blk, state.x, family.block_positions(state, i), state.num_prefix,
                                              None, DEFAULT_KERNEL, False)
            state.x = family.mlp_residual(blk, state.x[:, :n_mlp], DEFAULT_KERNEL)
            state = family.after_block(m, state, i)  # a stage end pads the grid back (no source traced)
        return family.head(m, TokenState(x=m.norm(state.x), num_prefix=state.num_prefix, grid0=state.grid0))


def ideal_model(model: nn.Module, input_size: tuple[int, int, int] | None = None) -> nn.Module:
    """The ideal for a patched model's token schedule (shares its weights)."""
    from vitslim.patch import describe

    return IdealSchedule(model, describe(model, input_size)["tokens"])
