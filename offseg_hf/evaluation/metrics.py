"""Streaming semantic-segmentation metrics with mmseg's semantics (mIoU, mAcc, aAcc, per-class IoU/Acc).

The state is one (K, K) confusion matrix accumulated over the whole set (rows: ground truth, columns:
prediction), so the result does not depend on batching and processes combine by summing their matrices.

mmseg's rules, kept here:
* pixels whose label is the ignore index do not count;
* IoU_k = TP / (TP + FP + FN) and Acc_k = TP / (TP + FN); a class absent from both prediction and ground
  truth has IoU 0/0 = NaN and does not count in mIoU; a class absent from the ground truth has Acc NaN and does
  not count in mAcc (if it was predicted, its IoU is 0 and does count);
* aAcc = sum TP / number of labelled pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SegmentationMetrics:
    """Accumulates a confusion matrix over batches of predicted and ground-truth label maps."""

    num_labels: int
    ignore_index: int = 255
    confusion: torch.Tensor = field(init=False)

    def __post_init__(self):
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be positive, got {self.num_labels}.")
        self.confusion = torch.zeros(self.num_labels, self.num_labels, dtype=torch.int64)

    def reset(self) -> None:
        self.confusion.zero_()

    def update(self, predictions: torch.Tensor, labels: torch.Tensor) -> None:
        """Add label maps of equal shape: predictions in [0, K), labels in [0, K) or the ignore index."""
        if predictions.shape != labels.shape:
            raise ValueError(
                f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} differ in shape."
            )
        predictions = predictions.reshape(-1).long()
        labels = labels.reshape(-1).long()
        valid = labels != self.ignore_index
        predictions, labels = predictions[valid], labels[valid]
        k = self.num_labels
        if labels.numel() and (labels.min() < 0 or labels.max() >= k):
            bad = torch.unique(labels[(labels < 0) | (labels >= k)]).tolist()
            raise ValueError(f"labels contain ids {bad[:10]} outside [0, {k}) that are not the ignore index.")
        if predictions.numel() and (predictions.min() < 0 or predictions.max() >= k):
            raise ValueError(f"predictions contain ids outside [0, {k}).")
        counts = torch.bincount(labels * k + predictions, minlength=k * k)
        self.confusion += counts.reshape(k, k).to(self.confusion.device, torch.int64)

    def merge(self, confusion: torch.Tensor) -> None:
        """Add another matrix, e.g. the sum gathered from other processes."""
        self.confusion += confusion.to(self.confusion.device, torch.int64)

    def compute(self) -> dict[str, float | list[float]]:
        """mIoU, mAcc, aAcc (fractions in [0, 1]) and per-class IoU / Acc (NaN where undefined)."""
        confusion = self.confusion.double()
        true_positive = confusion.diag()
        area_label = confusion.sum(dim=1)
        area_prediction = confusion.sum(dim=0)
        union = area_label + area_prediction - true_positive
        iou = true_positive / union  # NaN where the class is absent from both
        accuracy = true_positive / area_label  # NaN where absent from the ground truth
        total = area_label.sum()
        return {
            "mean_iou": _nanmean(iou),
            "mean_accuracy": _nanmean(accuracy),
            "overall_accuracy": float(true_positive.sum() / total) if total > 0 else float("nan"),
            "per_category_iou": iou.tolist(),
            "per_category_accuracy": accuracy.tolist(),
        }


def _nanmean(values: torch.Tensor) -> float:
    finite = values[~values.isnan()]
    return float(finite.mean()) if finite.numel() else float("nan")


__all__ = ["SegmentationMetrics"]
