"""Training configuration and the published recipes as named option sets.

Every field of ``TrainConfig`` is also a ``vitslim train`` flag (``--kd-weight 1.0``), and a
recipe is just a dict of fields: ``TrainConfig.from_recipe("evit", epochs=2)`` starts from the
recipe and overrides what the caller gives. Recipes copy the published ImageNet settings
(each recipe cites its source); for our small CIFAR-10 reference model pass fewer epochs or
``max_steps`` -- everything else (lr scaling rule, losses, groups) carries over.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from vitslim.errors import VitslimError


@dataclass
class TrainConfig:
    """All knobs of ``vitslim.train.fit``; defaults are a plain DeiT-style fine-tune."""

    # schedule
    epochs: int = 10
    max_steps: int | None = None  # stop after this many optimizer steps; the schedule spans min(steps, epochs)
    batch_size: int = 128  # global batch over all processes
    lr: float = 5e-4
    lr_base_batch: int | None = None  # linear scaling rule: lr * batch_size / lr_base_batch (e.g. 512)
    min_lr: float = 1e-6
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-6
    # optimizer and parameter groups
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float | None = None  # max global grad norm
    method_lr_scale: float = 1.0  # lr multiplier for parameters a method adds (a reducer's own lr_scale wins)
    backbone_lr_scale: float = 1.0  # lr multiplier for the original model's parameters (SPViT: 0.01)
    freeze_backbone_epochs: int = 0  # backbone lr is 0 for these first epochs (SPViT: 5)
    freeze_tokens: bool = False  # cls/dist/register tokens and pos_embed stay fixed (SPViT)
    lr_groups: str = "uniform"  # "as_released": Prune-and-Merge's released optimizer, where only the
    # no-decay group gets the scheduled lr and every decayed weight (M and R too) stays at 1e-6
    # losses
    label_smoothing: float = 0.0
    kd_weight: float = 0.0  # logit distillation from the teacher; 0 = off
    kd_tau: float = 1.0
    kd_mode: str = "add"  # "add": CE + a*KD; "convex": (1-a)*CE + a*KD (DeiT)
    kd_norm: str = "batch"  # "batch": KL per image; "elements": per logit element (Prune-and-Merge)
    token_weight: float = 1.0  # multiplies the methods' token-distillation targets
    aux_weight: float = 1.0  # multiplies the methods' own losses (keep ratio, budget)
    # augmentation (timm)
    crop: str = "auto"  # "rrc" (RandomResizedCrop), "pad" (4-px padded random crop, CIFAR style); auto: pad <= 64 px
    hflip: float = 0.5
    color_jitter: float | None = None
    auto_augment: str | None = None  # timm string, e.g. "rand-m9-mstd0.5-inc1"
    re_prob: float = 0.0  # random erasing
    mixup: float = 0.0
    cutmix: float = 0.0
    drop_path: float | None = None  # set the model's stochastic depth (None: leave as built)
    # run
    precision: str = "fp32"  # fp32 | bf16 (CPU or GPU) | fp16 (GPU, with a grad scaler)
    seed: int = 0
    deterministic: bool = False  # torch deterministic algorithms (exact resume on CPU)
    workers: int = 0
    device: str = "auto"  # auto: cuda:<local rank> when available, else cpu
    eval_every: int = 1  # epochs; 0 = only at the end
    checkpoint_every: int = 0  # also checkpoint every K optimizer steps (0: only at epoch ends)
    log_every: int = 20  # steps between JSONL step records
    find_unused_parameters: bool = False  # DDP: for methods whose modules skip some steps
    recipe: str | None = None

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.min_lr >= 0 and self.warmup_lr >= 0, "min_lr and warmup_lr must be >= 0"),
            (self.warmup_epochs >= 0, "warmup_epochs must be >= 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.clip_grad is None or self.clip_grad > 0, "clip_grad must be > 0 (or None)"),
            (self.method_lr_scale >= 0 and self.backbone_lr_scale >= 0, "lr scales must be >= 0"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (self.kd_weight >= 0 and self.kd_tau > 0, "kd_weight must be >= 0 and kd_tau > 0"),
            (self.kd_mode in ("add", "convex"), "kd_mode must be 'add' or 'convex'"),
            (self.kd_norm in ("batch", "elements"), "kd_norm must be 'batch' or 'elements'"),
            (self.lr_groups in ("uniform", "as_released"), "lr_groups must be 'uniform' or 'as_released'"),
            (self.crop in ("auto", "rrc", "pad"), "crop must be 'auto', 'rrc' or 'pad'"),
            (self.mixup >= 0 and self.cutmix >= 0 and 0 <= self.re_prob <= 1, "mixup/cutmix >= 0, re_prob in [0, 1]"),
            (self.precision in ("fp32", "bf16", "fp16"), "precision must be fp32, bf16 or fp16"),
            (self.eval_every >= 0 and self.checkpoint_every >= 0 and self.log_every >= 1,
             "eval_every and checkpoint_every must be >= 0, log_every >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise VitslimError(f"training config: {message}")
        if self.recipe is not None and self.recipe not in RECIPES:
            raise VitslimError(f"unknown recipe {self.recipe!r}; known recipes: {', '.join(sorted(RECIPES))}")

    @property
    def peak_lr(self) -> float:
        """The lr after the linear scaling rule."""
        return self.lr * self.batch_size / self.lr_base_batch if self.lr_base_batch else self.lr

    @classmethod
    def from_recipe(cls, recipe: str | None = None, **overrides: Any) -> "TrainConfig":
        """The recipe's fields with ``overrides`` on top (unknown keys are an error)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise VitslimError(f"unknown training option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        if recipe is not None and recipe not in RECIPES:
            raise VitslimError(f"unknown recipe {recipe!r}; known recipes: {', '.join(sorted(RECIPES))}")
        fields = {k: v for k, v in RECIPES.get(recipe, {}).items() if k != "source"}
        fields.update(overrides)
        return cls(recipe=recipe, **fields)

    def augment(self) -> dict[str, Any]:
        """Keyword arguments of ``data.train_transform`` for this config."""
        return dict(crop=self.crop, hflip=self.hflip, color_jitter=self.color_jitter,
                    auto_augment=self.auto_augment, re_prob=self.re_prob)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python fields (for checkpoints and logs)."""
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out


# Published fine-tuning recipes (ImageNet, DeiT backbones). "source" says where each comes from;
# fields not given keep TrainConfig's defaults. Teacher = the dense model whenever kd/token weights are on.
RECIPES: dict[str, dict[str, Any]] = {
    "deit-ft": dict(
        source="generic DeiT fine-tune: AdamW 5e-4 x batch/512, cosine, 5 warm-up epochs, wd 0.05, "
               "label smoothing 0.1, RandAugment, mixup 0.8 / cutmix 1.0, random erasing 0.25",
        epochs=30, lr=5e-4, lr_base_batch=512, min_lr=1e-6, warmup_epochs=5, weight_decay=0.05,
        label_smoothing=0.1, auto_augment="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0, re_prob=0.25,
    ),
    "evit": dict(
        source="EViT official finetune.sh (docs/training.md): 30 epochs, lr 2e-5 -> 2e-6 cosine, wd 1e-6, "
               "no warm-up, DeiT augmentation, no distillation",
        epochs=30, lr=2e-5, min_lr=2e-6, warmup_epochs=0, weight_decay=1e-6, label_smoothing=0.1,
        auto_augment="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0, re_prob=0.25,
    ),
    "topk": dict(
        source="Haurum et al. TokenReduction (docs/training.md): 30 epochs, lr 1e-3 x batch/1024, 20 warm-up "
               "epochs, DeiT augmentation",
        epochs=30, lr=1e-3, lr_base_batch=1024, warmup_epochs=20, weight_decay=0.05, label_smoothing=0.1,
        auto_augment="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0, re_prob=0.25,
    ),
    "tome": dict(
        source="ToMe is training-free; its optional fine-tune follows the DeiT recipe. [DESIGN] the deit-ft "
               "settings with logit distillation from the dense model (kd 0.5, convex, tau 1)",
        epochs=30, lr=5e-4, lr_base_batch=512, warmup_epochs=5, weight_decay=0.05, label_smoothing=0.1,
        auto_augment="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0, re_prob=0.25,
        kd_weight=0.5, kd_mode="convex", kd_tau=1.0,
    ),
    "prune_merge": dict(
        source="Prune-and-Merge official commands (docs/methods/prune_merge.md): 60 epochs, lr 1e-4 x batch/512, cosine to "
               "1e-6, no warm-up, wd 1e-3, CE + 1.0 * tau^2 KL (tau 20) per logit element, color jitter 0.4, "
               "no RandAugment, random erasing 0.25, mixup 0.8 / cutmix 1.0, label smoothing 0.1 (applies "
               "through the mixup targets)",
        epochs=60, lr=1e-4, lr_base_batch=512, min_lr=1e-6, warmup_epochs=0, weight_decay=1e-3,
        label_smoothing=0.1, color_jitter=0.4, re_prob=0.25, mixup=0.8, cutmix=1.0,
        kd_weight=1.0, kd_tau=20.0, kd_mode="add", kd_norm="elements",
    ),
    "sit": dict(
        source="SiT exp/*/train.sh (docs/methods/sit.md): lr 2e-4 x batch/512, cosine to 1e-5, no warm-up, "
               "wd 0.05, RandAugment m9, mixup 0.8 / cutmix 1.0, label smoothing 0.1, random erasing 0.25, "
               "drop-path 0.1; FRD: token 2.0 (the method's targets) + logits 2.0 (tau 1); reverse modules "
               "at 5x lr (set by the method). 30 epochs for DeiT [DESIGN]; the LV-ViT run is 135",
        epochs=30, lr=2e-4, lr_base_batch=512, min_lr=1e-5, warmup_epochs=0, weight_decay=0.05,
        label_smoothing=0.1, auto_augment="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0, re_prob=0.25,
        drop_path=0.1, kd_weight=2.0, kd_tau=1.0, kd_mode="add", token_weight=2.0,
    ),
    "spvit": dict(
        source="SPViT (docs/methods/spvit.md): 30 epochs (DeiT-S), base lr 5e-4 x batch/512 for the selectors, "
               "cosine to 1e-5, backbone frozen 5 epochs then 1% lr, cls/pos frozen, wd 0.05, DeiT "
               "augmentation, fp32; CE + 0.5 KL (tau 1) + 0.5 token MSE + ratio loss 2.0/3 per stage (method)",
        epochs=30, lr=5e-4, lr_base_batch=512, min_lr=1e-5, warmup_epochs=0, weight_decay=0.05,
        backbone_lr_scale=0.01, freeze_backbone_epochs=5, freeze_tokens=True, label_smoothing=0.1,
        auto_augment="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0, re_prob=0.25, drop_path=0.1,
        kd_weight=0.5, kd_tau=1.0, kd_mode="add", token_weight=0.5, precision="fp32",
    ),
    "cait": dict(
        source="[DESIGN] CAIT joint recipe (docs/methods/cait.md; the paper's schedule is unknown): 30 epochs, AdamW "
               "5e-5 x batch/512 cosine, wd 0.05, DeiT augmentation, (1-0.5) CE + 0.5 KL (tau 1)",
        epochs=30, lr=5e-5, lr_base_batch=512, weight_decay=0.05, label_smoothing=0.1,
        auto_augment="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0, re_prob=0.25,
        kd_weight=0.5, kd_tau=1.0, kd_mode="convex",
    ),
}
