"""Training losses: cross-entropy, logit distillation, token distillation and the methods' own terms.

Methods talk to the loss through ``TokenState.aux`` while training:
- ``AuxLoss(name, value)``: a term the method computed and weighted itself (keep-ratio / budget
  losses); the engine adds ``aux_weight * value``.
- ``TokenTarget(student, block, weight, mask)``: "these student tokens should match the dense
  teacher's patch tokens at ``block``" (SiT's FRD: reverse-module output against each teacher
  block; SPViT: final-norm tokens, only where kept). The engine runs the teacher, collects the
  asked-for blocks and adds ``token_weight * weight * MSE``.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from vitslim.errors import VitslimError
from vitslim.tokens import FINAL, AuxLoss, TokenTarget

__all__ = ["FINAL", "AuxLoss", "TokenTarget", "Criterion", "cross_entropy", "kd_loss", "masked_mse"]


def cross_entropy(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy against class indices (with label smoothing) or soft targets (mixup; already smoothed)."""
    if target.dim() == logits.dim():  # soft targets: timm's Mixup folds the smoothing into them
        return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, tau: float = 1.0, norm: str = "batch") -> Tensor:
    """tau^2 * KL(softmax(t/tau) || softmax(s/tau)), per image ("batch") or per logit element ("elements")."""
    log_p_s = F.log_softmax(student_logits.float() / tau, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / tau, dim=-1)
    kl = torch.sum(log_p_t.exp() * (log_p_t - log_p_s))
    # "elements" divides by B * num_classes, as Prune-and-Merge's official loss does (docs/methods/prune_merge.md)
    divisor = student_logits.numel() if norm == "elements" else student_logits.shape[0]
    return kl * (tau * tau) / divisor


def masked_mse(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error over all elements, or over the tokens where mask is true (mean over kept B*n*C)."""
    if student.shape != teacher.shape:
        raise VitslimError(f"token distillation: student tokens {tuple(student.shape)} and teacher tokens "
                           f"{tuple(teacher.shape)} differ; a method must give tokens on the teacher's patch grid")
    sq = (student.float() - teacher.float()).pow(2)
    if mask is None:
        return sq.mean()
    m = mask.to(sq.dtype)[..., None]
    return (sq * m).sum() / (m.sum() * sq.shape[-1]).clamp_min(1.0)


class Criterion:
    """The training loss: CE (+ smoothing), logit KD, token distillation and method terms, as named parts."""

    def __init__(self, *, label_smoothing: float = 0.0, kd_weight: float = 0.0, kd_tau: float = 1.0,
                 kd_mode: str = "add", kd_norm: str = "batch", token_weight: float = 1.0, aux_weight: float = 1.0):
        if kd_mode not in ("add", "convex"):
            raise VitslimError(f"kd_mode must be 'add' (CE + a*KD) or 'convex' ((1-a)*CE + a*KD), got {kd_mode!r}")
        if kd_norm not in ("batch", "elements"):
            raise VitslimError(f"kd_norm must be 'batch' or 'elements', got {kd_norm!r}")
        self.label_smoothing, self.kd_weight, self.kd_tau = label_smoothing, kd_weight, kd_tau
        self.kd_mode, self.kd_norm = kd_mode, kd_norm
        self.token_weight, self.aux_weight = token_weight, aux_weight

    @property
    def needs_teacher(self) -> bool:
        """Whether any configured term reads the teacher (token targets may still ask for it)."""
        return self.kd_weight > 0

    def __call__(self, logits: Tensor, target: Tensor, aux: Iterable[Any] = (),
                 teacher: Callable[[set[int]], tuple[Tensor, dict[int, Tensor]]] | None = None
                 ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss and its detached parts; ``teacher(blocks)`` gives (logits, {block: patch tokens})."""
        aux = list(aux)
        ce = cross_entropy(logits, target, self.label_smoothing)
        parts: dict[str, Tensor] = {"ce": ce}
        total = ce
        teacher_logits, teacher_tokens = self.ask_teacher(aux, teacher)
        if self.kd_weight > 0:
            kd = kd_loss(logits, teacher_logits, self.kd_tau, self.kd_norm)
            parts["kd"] = kd
            a = self.kd_weight
            total = (1 - a) * ce + a * kd if self.kd_mode == "convex" else ce + a * kd
        return self.add_method_terms(total, parts, aux, teacher_tokens)

    def ask_teacher(self, aux: list, teacher: Callable[[set[int]], tuple[Tensor, dict[int, Tensor]]] | None
                    ) -> tuple[Tensor | None, dict[int, Tensor]]:
        """The teacher's (logits, tokens) for the KD term and the blocks the aux's token targets name."""
        targets = [a for a in aux if isinstance(a, TokenTarget)]
        if not (self.kd_weight > 0 or (targets and self.token_weight > 0)):
            return None, {}
        if teacher is None:
            raise VitslimError("distillation is on (kd_weight > 0 or a method's token targets) but there is no "
                               "teacher: pass teacher= (the dense model) or set kd_weight=0")
        return teacher({t.block for t in targets} if self.token_weight > 0 else set())

    def add_method_terms(self, total: Tensor, parts: dict[str, Tensor], aux: list,
                         teacher_tokens: dict[int, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """``total`` plus the methods' token targets and own losses; all parts detached."""
        if self.token_weight > 0:
            for t in aux:
                if isinstance(t, TokenTarget):
                    term = t.weight * masked_mse(t.student, teacher_tokens[t.block], t.mask)
                    parts[t.name] = parts[t.name] + term if t.name in parts else term
                    total = total + self.token_weight * term
        for a in aux:
            if isinstance(a, AuxLoss):
                parts[a.name] = parts[a.name] + a.value if a.name in parts else a.value
                total = total + self.aux_weight * a.value
        return total, {k: v.detach() for k, v in parts.items()}
