"""Losses of the retriever, one per file (pytorch-metric-learning style).

- `GradeSupConLoss` (Stage 1): label-aware supervised contrastive loss, PML's `SupConLoss` with
  grade-aware positive/negative masks.
- `MultiClassCircleLoss` (Stage 2): for every pair of grades g > h, grade-g products must beat
  grade-h products by a margin, with circle-loss style adaptive weights.
"""
from trainer.losses.base import GradedBatchLoss
from trainer.losses.grade_supcon import GradeSupConLoss
from trainer.losses.multi_class_circle import MultiClassCircleLoss

__all__ = ["GradedBatchLoss", "GradeSupConLoss", "MultiClassCircleLoss"]
