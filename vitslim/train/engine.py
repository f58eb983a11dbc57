"""The training engine: ``fit`` fine-tunes a (patched) model, on one process or many (torchrun + DDP).

Design points (each is why something below looks the way it does):
- **Same run on any number of processes.** ``batch_size`` is the global batch. Each epoch's order
  is one seeded permutation; global batch k is a fixed slice of it and rank r takes the r-th
  part. Augmentation is seeded per (seed, epoch, image), not per worker or rank. So 1 process
  and N processes see the same images, augmented the same way, and DDP's gradient average
  equals the single-process gradient (up to float summation order). Mixup/cutmix and
  drop-path draw per rank, so those runs differ across world sizes, as in every DDP trainer.
- **Exact resume.** A checkpoint holds the weights, optimizer, lr schedule, grad scaler, every
  rank's RNG states and the position inside the epoch. The sampler restarts at that batch and
  the loader takes its seed from its own generator, never from the global RNG, so a resumed
  run continues the same random streams (exact on CPU with ``deterministic=True``).
- **Methods plug in through declared hooks, never attribute names.** ``StudentForward`` runs a
  patched model's ``forward_tokens`` and gives the loss the state's ``aux`` list (``AuxLoss``,
  ``TokenTarget``: see losses.py). Parameter groups come from each reducer's ``param_options()``
  (e.g. SiT's reverse modules at 5x lr with decay on every parameter, no decay on
  Prune-and-Merge's merge and reconstruct matrices), and every reducer's ``set_progress(step,
  total_steps)`` is called before each step (CDCP's sparsity ramp and mask freezing). The
  teacher a method needs by default comes from ``Method.needs_teacher`` (``wants_teacher``).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import pathlib
import random
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from vitslim._version import __version__
from vitslim.data import SeededAugment
from vitslim.errors import VitslimError
from vitslim.families import family_of
from vitslim.train.checkpoint import load_state_strict, read_checkpoint, save_checkpoint
from vitslim.train.config import TrainConfig
from vitslim.io import atomic_write
from vitslim.methods.base import ParamOptions, get_method
from vitslim.patch import is_patched, unpatch
from vitslim.train.losses import Criterion
from vitslim.train.task import StudentForward, Task, all_reduce_sum

LAST, BEST = "last.pt", "best.pt"
FROZEN_TOKENS = ("cls_token", "pos_embed", "dist_token", "reg_token")


# --- processes -------------------------------------------------------------------------------------


def distributed_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) for a single process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _init_distributed(device: torch.device) -> bool:
    """Join torchrun's process group (nccl on GPU, gloo on CPU); True if this call created it."""
    _, world, _ = distributed_env()
    if world == 1 or dist.is_initialized():
        return False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def _device(config: TrainConfig) -> torch.device:
    if config.device != "auto":
        return torch.device(config.device)
    if torch.cuda.is_available():
        return torch.device("cuda", distributed_env()[2])
    return torch.device("cpu")


# --- data ------------------------------------------------------------------------------------------


class GlobalBatchSampler(torch.utils.data.Sampler):
    """This rank's share of each global batch of a seeded per-epoch permutation, from a start batch."""

    def __init__(self, size: int, batch_size: int, rank: int, world: int, seed: int):
        if batch_size % world:
            raise VitslimError(f"batch_size {batch_size} must be divisible by the number of processes ({world})")
        if size < batch_size:
            raise VitslimError(f"the training data has {size} images, fewer than one batch of {batch_size}: "
                               f"lower --batch-size")
        self.size, self.batch_size, self.rank, self.world, self.seed = size, batch_size, rank, world, seed
        self.local = batch_size // world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Use epoch's permutation, beginning at global batch ``start``."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.size // self.batch_size - self.start

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch))
        for k in range(self.start, self.size // self.batch_size):  # drop_last: every step has the full batch
            first = k * self.batch_size + self.rank * self.local
            yield order[first:first + self.local].tolist()


def _loader(dataset, batch_sampler, config: TrainConfig, device: torch.device) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_sampler, num_workers=config.workers, pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(config.seed),  # keeps the loader off the global RNG
        persistent_workers=False,
    )


# --- model pieces ----------------------------------------------------------------------------------


def set_drop_path(model: nn.Module, rate: float) -> None:
    """Stochastic depth rising linearly to ``rate`` over the blocks (timm's schedule)."""
    from timm.layers import DropPath

    blocks = family_of(model).blocks(model)
    depth = len(blocks)
    for i, blk in enumerate(blocks):
        r = rate * i / max(depth - 1, 1)
        for name in ("drop_path1", "drop_path2"):
            if hasattr(blk, name):
                setattr(blk, name, DropPath(r) if r > 0 else nn.Identity())


def _reducers(model: nn.Module) -> dict[str, nn.Module]:
    """Every reducer of the patched model(s) inside ``model``, keyed by its full module name."""
    found = {}
    for name, module in model.named_modules():
        if is_patched(module):
            owner = f"{name}." if name else ""
            found.update({f"{owner}vitslim_reducers.{key}": r for key, r in module.vitslim_reducers.items()})
    return found


def set_progress(model: nn.Module, step: int, total_steps: int) -> None:
    """Tell every reducer of a patched model the step about to run (``Reducer.set_progress``)."""
    for reducer in _reducers(model).values():
        reducer.set_progress(step, total_steps)


def _param_options(model: nn.Module) -> dict[str, ParamOptions]:
    """Every reducer's ``param_options()`` keyed by full parameter-name prefix."""
    found = {}
    for key, reducer in _reducers(model).items():
        for prefix, options in reducer.param_options().items():
            found[f"{key}.{prefix}"] = options
    return found


def param_groups(model: nn.Module, config: TrainConfig, backbone_prefix: str = "") -> list[dict[str, Any]]:
    """AdamW groups: no decay on 1-D weights and tokens; lr scales for method modules and the backbone.

    Parameters outside ``backbone_prefix`` (a segmentation head) form the "head" kind: full lr, never frozen.
    """
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    declared = _param_options(model)
    groups: dict[tuple, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        in_backbone = name.startswith(backbone_prefix)
        if config.freeze_tokens and in_backbone and name[len(backbone_prefix):] in FROZEN_TOKENS:
            p.requires_grad_(False)
        if not p.requires_grad:
            continue
        is_method = ".vitslim_reducers." in f".{name}"  # a module a method added (under any owner)
        matches = [prefix for prefix in declared if name.startswith(prefix)]
        options = declared[max(matches, key=len)] if matches else ParamOptions()
        kind = "method" if is_method else "backbone" if in_backbone else "head"
        scale = options.lr_scale
        if scale is None:
            scale = {"method": config.method_lr_scale, "backbone": config.backbone_lr_scale, "head": 1.0}[kind]
        decay = config.weight_decay if p.ndim > 1 and name not in skip else 0.0
        if options.weight_decay == "all":
            decay = config.weight_decay
        elif options.weight_decay == "none":
            decay = 0.0
        key = (kind, float(scale), decay)
        group = groups.setdefault(key, dict(params=[], names=[], kind=kind, lr_scale=key[1], weight_decay=decay))
        group["params"].append(p)
        group["names"].append(name)
    if not groups:
        raise VitslimError("the model has no trainable parameters")
    return list(groups.values())


AS_RELEASED_LR = 1e-6  # the lr Prune-and-Merge's released optimizer is built with (lr_groups="as_released")


def build_optimizer(model: nn.Module, config: TrainConfig, steps_per_epoch: int,
                    total_steps: int, backbone_prefix: str = "") -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR,
                                               Callable[[int], float]]:
    """AdamW over ``param_groups``, a per-step schedule (each group: its scale x the base curve), the base curve."""
    groups = param_groups(model, config, backbone_prefix)
    peak = config.peak_lr
    frozen_lr = config.lr_groups == "as_released"  # Prune-and-Merge's released code: decayed weights stay at 1e-6
    for g in groups:
        g["constant"] = frozen_lr and g["weight_decay"] > 0
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k not in ("names", "constant")}
                                   | {"lr": AS_RELEASED_LR if g["constant"] else peak * g["lr_scale"]}
                                   for g in groups], lr=peak, betas=config.betas, eps=config.eps)
    warmup = round(config.warmup_epochs * steps_per_epoch)
    frozen_until = config.freeze_backbone_epochs * steps_per_epoch

    def base(step: int) -> float:
        return lr_factor(step, total_steps, warmup, peak, config.min_lr, config.warmup_lr)

    def schedule(kind: str, constant: bool) -> Callable[[int], float]:
        if constant:
            return lambda step: 1.0
        if kind == "backbone" and frozen_until:
            return lambda step: 0.0 if step < frozen_until else base(step)
        return base

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [schedule(g["kind"], g["constant"]) for g in groups])
    return optimizer, scheduler, lambda step: peak * base(step)


def _autocast(config: TrainConfig, device: torch.device):
    if config.precision == "fp16" and device.type != "cuda":
        raise VitslimError("precision fp16 needs a GPU (it needs a grad scaler); use bf16 on CPU")
    if config.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if config.precision == "bf16" else torch.float16)


def lr_factor(step: int, total: int, warmup: int, peak: float, min_lr: float, warmup_lr: float) -> float:
    """Linear warm-up from warmup_lr to the peak, then cosine to min_lr, as a fraction of the peak lr."""
    if step < warmup:
        return (warmup_lr + (peak - warmup_lr) * step / warmup) / peak
    t = (step - warmup) / max(total - warmup, 1)
    return (min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))) / peak


# --- RNG state -------------------------------------------------------------------------------------


def _rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _gather_rng(device: torch.device) -> list[dict[str, Any]]:
    state = _rng_state(device)
    if not dist.is_initialized():
        return [state]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


# --- logging ---------------------------------------------------------------------------------------


class JsonlLog:
    """Appends one JSON object per line (rank 0 only); flushed per record so a crash loses nothing."""

    def __init__(self, path: pathlib.Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record: Any) -> None:
        """Append ``record`` with a wall-clock time stamp."""
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")


# --- fit -------------------------------------------------------------------------------------------


def _check_resume(payload: dict[str, Any], config: TrainConfig) -> None:
    saved = payload.get("config", {})
    ignore = {"workers", "device", "log_every", "eval_every", "checkpoint_every"}
    now = config.to_dict()
    differ = sorted(k for k in now if k not in ignore and k in saved and saved[k] != now[k])
    if differ:
        detail = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in differ)
        raise VitslimError(f"cannot resume: the training options differ from the checkpoint's ({detail}); "
                           f"resume with the same command line")


def _load_weights(model: nn.Module, payload: dict[str, Any], task: Task) -> None:
    """Resume: the checkpoint's weights into the same (already patched) model, checked first."""
    if payload.get("task", "classification") != task.name:
        raise VitslimError(f"cannot resume: the checkpoint is from a {payload.get('task', 'classification')} run, "
                           f"this run is {task.name}")
    backbone = task.backbone(model)
    cfg = backbone.vitslim_config if is_patched(backbone) else {}
    saved = (payload.get("method"), payload.get("options") or {})
    if saved != (cfg.get("method"), cfg.get("options") or {}):
        raise VitslimError(f"cannot resume: the checkpoint was trained as {saved[0] or 'dense'} {saved[1]}, the model "
                           f"is {cfg.get('method') or 'dense'} {cfg.get('options') or {}}; patch it the same way")
    load_state_strict(model, payload["model"])


def resume_path(resume: str | os.PathLike | None, out_dir: str | os.PathLike | None) -> pathlib.Path | None:
    """The checkpoint a run continues from: ``resume``, or for "auto" ``out_dir/last.pt`` when it exists."""
    if resume == "auto":
        last = pathlib.Path(out_dir) / LAST if out_dir is not None else None
        return last if last is not None and last.is_file() else None
    return pathlib.Path(resume) if resume else None


def fit(model: nn.Module, data: Any, *, val_data: Any = None, teacher: nn.Module | None = None,
        config: TrainConfig | None = None, out_dir: str | os.PathLike | None = None,
        resume: str | os.PathLike | None = None, progress: bool = True, eval_before: bool = False,
        on_step: Callable[[dict[str, Any]], None] | None = None,
        run_record: dict[str, Any] | None = None, task: Task | None = None) -> dict[str, Any]:
    """Fine-tune ``model`` (patched or not) on ``data``; returns per-epoch history and final metrics.

    ``data``/``val_data`` are dataset specs for ``build_dataset`` ("cifar10", a folder, ...) or
    Dataset objects. ``teacher`` is the dense model for distillation. Checkpoints (``last.pt``,
    ``best.pt``), ``log.jsonl`` and ``summary.json`` (``run_record`` + config + result) go to
    ``out_dir`` (rank 0). ``resume`` continues a run exactly; "auto" resumes from
    ``out_dir/last.pt`` when it exists. ``eval_before`` also evaluates before the first step
    (logged as epoch -1). ``on_step`` gets every logged step record. ``task`` says what is
    predicted, lost and measured (default ``Task()``: classification; ``SegmentationTask`` for a
    ``SegmentationModel``). Under torchrun, every process calls fit.
    """
    config = config or TrainConfig()
    rank, world, _ = distributed_env()
    device = _device(config)
    created_group = _init_distributed(device)
    try:
        run = _Run(model, config, rank, world, device, out_dir, progress, on_step, run_record, task or Task())
        return run.fit(data, val_data, teacher, resume_path(resume, out_dir), eval_before)
    finally:
        if created_group:
            dist.destroy_process_group()


class _Run:
    """One call of ``fit``: its model, optimiser, schedule, position and logs, step by step."""

    def __init__(self, model: nn.Module, config: TrainConfig, rank: int, world: int, device: torch.device,
                 out_dir: str | os.PathLike | None, progress: bool,
                 on_step: Callable[[dict[str, Any]], None] | None, run_record: dict[str, Any] | None,
                 task: Task):
        self.model, self.config, self.rank, self.world, self.device = model, config, rank, world, device
        self.task = task
        self.out = pathlib.Path(out_dir) if out_dir is not None else None
        self.progress, self.on_step, self.run_record = progress, on_step, run_record
        self.step = self.start_epoch = self.start_batch = 0
        self.best = -1.0
        self.history: list[dict[str, Any]] = []

    # --- set-up ------------------------------------------------------------------------------------

    def _seed(self) -> None:
        config, rank = self.config, self.rank
        torch.manual_seed(config.seed + rank)
        np.random.seed((config.seed + rank) % 2**32)
        random.seed(config.seed + rank)
        if config.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def _data(self, data: Any, val_data: Any) -> None:
        config, model = self.config, self.model
        self.train_set = SeededAugment(self.task.dataset(data, "train", model, config), config.seed)
        self.val_set = self.task.dataset(val_data, "test", model, None) if val_data is not None else None
        self.sampler = GlobalBatchSampler(len(self.train_set), config.batch_size, self.rank, self.world, config.seed)
        self.steps_per_epoch = len(self.train_set) // config.batch_size
        self.total_steps = config.epochs * self.steps_per_epoch
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)

    def _optimisation(self, teacher: nn.Module | None) -> None:
        config, model, device = self.config, self.model, self.device
        model.to(device).train()
        self.task.prepare(model, config)
        self.teacher = teacher.to(device).eval().requires_grad_(False) if teacher is not None else None
        self.optimizer, self.scheduler, self.base_lr = build_optimizer(model, config, self.steps_per_epoch,
                                                                       self.total_steps, self.task.backbone_prefix)
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16" and device.type == "cuda")
        self.autocast = _autocast(config, device)
        self.mixup = self.task.mixup(config, self.world, model)
        self.criterion = Criterion(label_smoothing=config.label_smoothing, kd_weight=config.kd_weight,
                                   kd_tau=config.kd_tau, kd_mode=config.kd_mode, kd_norm=config.kd_norm,
                                   token_weight=config.token_weight, aux_weight=config.aux_weight)
        if self.criterion.needs_teacher and self.teacher is None:
            raise VitslimError("kd_weight > 0 needs a teacher: pass teacher= (the dense model; CLI: --teacher dense)")

    def _restore(self, payload: dict[str, Any]) -> None:
        _load_weights(self.model, payload, self.task)  # in place: the optimizer already holds these parameters
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        self.step, self.start_epoch, self.start_batch = payload["step"], payload["epoch"], payload["batch_in_epoch"]
        self.best = payload.get("best_metric", payload.get("best_top1", -1.0))
        self.history = list(payload.get("history", []))
        rng = payload["rng"]
        _set_rng_state(rng[self.rank] if self.rank < len(rng) else rng[0], self.device)

    def _student(self) -> nn.Module:
        student = StudentForward(self.model, self.task)
        if self.world > 1:
            student = nn.parallel.DistributedDataParallel(
                student, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.config.find_unused_parameters)
        return student

    # --- the run -----------------------------------------------------------------------------------

    def fit(self, data: Any, val_data: Any, teacher: nn.Module | None, resume: pathlib.Path | None,
            eval_before: bool) -> dict[str, Any]:
        """Set up, maybe resume, train to the end; the result ``fit`` returns."""
        payload = read_checkpoint(resume) if resume else None
        if payload is not None:
            _check_resume(payload, self.config)
        self._seed()
        if self.config.drop_path is not None:
            set_drop_path(self.task.backbone(self.model), self.config.drop_path)
        self._data(data, val_data)
        self._optimisation(teacher)
        if payload is not None:
            self._restore(payload)
        self.student = self._student()
        self.log = JsonlLog(self.out / "log.jsonl" if self.out is not None and self.rank == 0 else None)
        if self.rank == 0:
            self.log.write(event="resume" if payload else "start", step=self.step, total_steps=self.total_steps,
                           world=self.world, device=str(self.device), config=self.config.to_dict(),
                           task=self.task.name, method=self._method())
        if eval_before and self.val_set is not None and payload is None:
            self._eval_before()
        # counted in images, so the bar's rate is images/s and its ETA covers the whole run
        self.bar = tqdm(total=self.total_steps * self.config.batch_size, initial=self.step * self.config.batch_size,
                        desc="train", unit="img", disable=not self.progress or self.rank != 0, dynamic_ncols=True)
        try:
            for epoch in range(self.start_epoch, self.epochs):
                if self.step >= self.total_steps:
                    break
                self._epoch(epoch)
        finally:
            self.bar.close()
            # Drop the DDP wrapper now, while the process group is alive: if its reducer were the last
            # owner of a gloo group, the group's destructor would join gloo's thread holding the GIL
            # that thread waits for (a hang at exit), e.g. when fit's caller outlives destroy_process_group.
            self.student = None
        return self._result()

    def _eval_before(self) -> None:
        record = dict(event="eval", epoch=-1, step=0, **self._evaluate())
        self.history.append(record)
        if self.rank == 0:
            self.log.write(**record)
            tqdm.write(f"before training: {self.task.describe(record)}")

    def _method(self) -> str | None:
        backbone = self.task.backbone(self.model)
        return backbone.vitslim_config["method"] if is_patched(backbone) else None

    def _evaluate(self) -> dict[str, Any]:
        return self.task.evaluate(self.model, self.val_set, self.rank, self.world, self.device,
                                  self.progress and self.rank == 0)

    def _epoch(self, epoch: int) -> None:
        config = self.config
        first = self.start_batch if epoch == self.start_epoch else 0
        self.sampler.set_epoch(epoch, first)
        self.train_set.epoch = epoch
        sums = torch.zeros(2, dtype=torch.float64)  # loss sum, steps
        t_epoch = self.t_log = time.perf_counter()
        self.images_since = 0
        batch_in_epoch = first
        for images, targets in _loader(self.train_set, self.sampler, config, self.device):
            value = self._train_step(images, targets)
            batch_in_epoch += 1
            sums += torch.tensor([value, 1.0], dtype=torch.float64)
            if config.checkpoint_every and self.step % config.checkpoint_every == 0 and self.step < self.total_steps:
                self._checkpoint(LAST, epoch, batch_in_epoch)
            if self.step >= self.total_steps:
                break
        sums = all_reduce_sum(sums)
        seconds = time.perf_counter() - t_epoch
        record = dict(event="epoch", epoch=epoch, step=self.step, train_loss=round((sums[0] / sums[1]).item(), 6),
                      seconds=round(seconds, 1),
                      train_images_per_s=round((batch_in_epoch - first) * config.batch_size / seconds, 1))
        last_epoch = self.step >= self.total_steps
        if self.val_set is not None and (last_epoch or (config.eval_every and (epoch + 1) % config.eval_every == 0)):
            record.update(self._evaluate())
            self.best = max(self.best, record[self.task.metric])
        self.history.append(record)
        if self.rank == 0:
            self.log.write(**record)
            self.bar.write(_epoch_line(record, self.task))
        if batch_in_epoch >= self.steps_per_epoch:
            self._checkpoint(LAST, epoch + 1, 0)
        else:  # max_steps ended the run inside an epoch
            self._checkpoint(LAST, epoch, batch_in_epoch)
        metric = self.task.metric
        if metric in record and record[metric] >= self.best and self.rank == 0 and self.out is not None:
            save_checkpoint(self.out / BEST, read_checkpoint(self.out / LAST))

    def _train_step(self, images: Tensor, targets: Tensor) -> float:
        """One optimiser step; returns the loss (and logs every ``log_every`` steps)."""
        config, device = self.config, self.device
        lr = self.base_lr(self.step)  # the lr of this step (before group scales)
        set_progress(self.model, self.step, self.total_steps)
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        with self.autocast:
            outputs, aux = self.student(images)
            teacher_fn = self.task.teacher_outputs(self.teacher, images) if self.teacher is not None else None
            loss, parts = self.task.loss(self.criterion, outputs, targets, aux, teacher_fn)
        value = loss.item()
        if not math.isfinite(value):
            raise VitslimError(f"the loss became {value} at step {self.step}: lower the lr, or use "
                               f"precision fp32; the last good checkpoint is in {self.out}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if config.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), config.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        self.images_since += config.batch_size
        if self.step % config.log_every == 0 or self.step == self.total_steps:
            self._log_step(loss, parts, lr)
        self.bar.set_postfix(step=f"{self.step}/{self.total_steps}", loss=f"{value:.3f}", lr=f"{lr:.2e}",
                             refresh=False)
        self.bar.update(config.batch_size)
        return value

    def _log_step(self, loss: Tensor, parts: dict[str, Tensor], lr: float) -> None:
        names = sorted(parts)
        mean = all_reduce_sum(torch.stack([loss.detach().float().cpu()] +
                                           [parts[k].float().cpu() for k in names])) / self.world
        now = time.perf_counter()
        record = dict(event="step", step=self.step, epoch=self.sampler.epoch, loss=round(mean[0].item(), 6),
                      **{k: round(v.item(), 6) for k, v in zip(names, mean[1:])},
                      lr=lr, images_per_s=round(self.images_since / (now - self.t_log), 1))
        self.t_log, self.images_since = now, 0
        if self.rank == 0:
            self.log.write(**record)
        if self.on_step is not None:
            self.on_step(record)

    def _checkpoint(self, name: str, epoch: int, batch_in_epoch: int) -> None:
        rng = _gather_rng(self.device)  # every rank takes part in the gather
        if self.rank != 0 or self.out is None:
            return
        save_checkpoint(self.out / name, {
            **self.task.model_state(self.model), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng,
            "step": self.step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "total_steps": self.total_steps,
            "config": self.config.to_dict(), "best_metric": self.best, "metric": self.task.metric,
            "task": self.task.name, "history": self.history,
            "vitslim_version": __version__, "world_size": self.world, "run_record": self.run_record or {},
        })

    def _result(self) -> dict[str, Any]:
        final = self.history[-1] if self.history else {}
        best = self.best if self.best >= 0 else None
        result = {"history": self.history, "final": final, "metric": self.task.metric, "best_metric": best,
                  **({"best_top1": best} if self.task.metric == "top1" else {}),
                  "steps": self.step, "total_steps": self.total_steps,
                  "checkpoint": str(self.out / LAST) if self.out is not None else None}
        if self.run_record is not None and self.rank == 0 and self.out is not None:
            summary = {**self.run_record, "config": self.config.to_dict(), **result}
            atomic_write(self.out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
        return result


def _epoch_line(record: dict[str, Any], task: Task) -> str:
    text = f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}, {record['train_images_per_s']:.0f} img/s"
    if task.metric in record:
        text += f", {task.describe(record)}"
    return text


def wants_teacher(model: nn.Module, config: TrainConfig, choice: str = "auto") -> bool:
    """Whether to distil from the dense model: "dense" yes, "none" no, "auto" when KD is on or the method asks."""
    if choice not in ("auto", "dense", "none"):
        raise VitslimError(f"teacher must be 'auto', 'dense' or 'none', got {choice!r}")
    if choice != "auto":
        return choice == "dense"
    if config.kd_weight > 0:
        return True
    if not is_patched(model):
        return False
    cfg = model.vitslim_config
    return get_method(cfg["method"]).needs_teacher(cfg["options"])


def teacher_copy(model: nn.Module) -> nn.Module:
    """A frozen dense copy of ``model`` (unpatched) to distil from."""
    teacher = copy.deepcopy(model)
    unpatch(teacher)
    return teacher.eval().requires_grad_(False)
