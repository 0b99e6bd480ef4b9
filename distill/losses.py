"""Distillation losses as small terms; a student's objective is their weighted sum."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton's KD: KL(softmax(t/T) || softmax(s/T)), batch mean, times T² so gradients keep their scale."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def ce_loss(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy to hard targets (true labels, or the teacher's argmax)."""
    return F.cross_entropy(student_logits.float(), targets)


@dataclass
class Objective:
    """weights of the terms: kd (soft teacher logits), ce_teacher (teacher argmax), ce_label (true labels)."""

    kd: float = 1.0
    ce_teacher: float = 0.0
    ce_label: float = 0.0
    temperature: float = 4.0

    def __call__(self, out: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor | None) -> torch.Tensor:
        total = out.new_zeros(())
        if self.kd:
            total = total + self.kd * kd_loss(out, _need(teacher, "kd"), self.temperature)
        if self.ce_teacher:
            total = total + self.ce_teacher * ce_loss(out, _need(teacher, "ce_teacher").argmax(1))
        if self.ce_label:
            total = total + self.ce_label * ce_loss(out, _need(labels, "ce_label"))
        return total

    @property
    def needs_teacher(self) -> bool:
        return bool(self.kd or self.ce_teacher)


def _need(x: torch.Tensor | None, term: str) -> torch.Tensor:
    if x is None:
        raise ValueError(f"the {term} loss term needs targets this data source does not give")
    return x
