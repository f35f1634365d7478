"""`evaluate` metric: mIoU / mAcc / aAcc of semantic segmentation with mmseg's semantics (the OffSeg paper's).

    import evaluate
    metric = evaluate.load("path/to/offseg_hf/evaluation/evaluate_metric/offseg_mean_iou")   # this folder, offline
    metric.add_batch(predictions=[pred_map, ...], references=[label_map, ...])
    metric.compute(num_labels=150, ignore_index=255)

Self-contained (torch, numpy, datasets, evaluate; not offseg-hf), so this folder also works as a Hub metric
Space where offseg-hf is not installed. It repeats `offseg_hf.evaluation.metrics.SegmentationMetrics` operation for
operation (one int64 confusion matrix over all maps, then the same float64 divisions and NaN-skipping means), and
offseg-hf's tests check that both give bitwise-identical numbers.
"""

import datasets
import evaluate
import numpy as np
import torch

_DESCRIPTION = """Mean IoU, mean accuracy and overall accuracy from one confusion matrix accumulated over every
map, as mmseg computes them: pixels labelled `ignore_index` do not count; IoU_k = TP / (TP + FP + FN) and
Acc_k = TP / (TP + FN); a class absent from both predictions and references (IoU 0/0) is left out of mIoU, a
class absent from the references (Acc 0/0) is left out of mAcc, and a class that is only predicted has IoU 0,
which counts."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of 2D integer label maps in [0, num_labels).
    references: list of 2D integer label maps of the same sizes, in [0, num_labels) or `ignore_index`.
    num_labels: number of classes.
    ignore_index: label value that marks unlabelled pixels (default 255).
Returns:
    mean_iou, mean_accuracy, overall_accuracy: fractions in [0, 1].
    per_category_iou, per_category_accuracy: lists of num_labels values, NaN where undefined.
Example:
    >>> metric = evaluate.load("offseg_hf/evaluation/evaluate_metric/offseg_mean_iou")
    >>> metric.compute(predictions=[[[0, 1], [1, 1]]], references=[[[0, 1], [0, 255]]], num_labels=2)["mean_iou"]
    0.5
"""

_CITATION = """@inproceedings{zhang2025offseg,
  title = {Revisiting Efficient Semantic Segmentation: Learning Offsets for Better Spatial and Class Feature Alignment},
  author = {Zhang, Shi-Chen and Li, Yunheng and Wu, Yu-Huan and Hou, Qibin and Cheng, Ming-Ming},
  booktitle = {ICCV},
  year = {2025}
}"""


def confusion_matrix(predictions, references, num_labels: int, ignore_index: int) -> torch.Tensor:
    """(K, K) int64 counts, rows ground truth, columns prediction, over all maps."""
    confusion = torch.zeros(num_labels, num_labels, dtype=torch.int64)
    for index, (prediction, reference) in enumerate(zip(predictions, references, strict=True)):
        prediction, reference = torch.as_tensor(np.asarray(prediction)), torch.as_tensor(np.asarray(reference))
        if prediction.shape != reference.shape:
            raise ValueError(
                f"map {index}: prediction {tuple(prediction.shape)} and reference {tuple(reference.shape)} differ."
            )
        prediction, reference = prediction.reshape(-1).long(), reference.reshape(-1).long()
        valid = reference != ignore_index
        prediction, reference = prediction[valid], reference[valid]
        if reference.numel() and (reference.min() < 0 or reference.max() >= num_labels):
            bad = torch.unique(reference[(reference < 0) | (reference >= num_labels)]).tolist()
            raise ValueError(f"map {index}: references contain ids {bad[:10]} outside [0, {num_labels}).")
        if prediction.numel() and (prediction.min() < 0 or prediction.max() >= num_labels):
            raise ValueError(f"map {index}: predictions contain ids outside [0, {num_labels}).")
        counts = torch.bincount(reference * num_labels + prediction, minlength=num_labels * num_labels)
        confusion += counts.reshape(num_labels, num_labels)
    return confusion


def scores(confusion: torch.Tensor) -> dict:
    """mmseg's mIoU / mAcc / aAcc and per-class IoU / Acc from a confusion matrix."""
    confusion = confusion.double()
    true_positive = confusion.diag()
    area_label = confusion.sum(dim=1)
    area_prediction = confusion.sum(dim=0)
    iou = true_positive / (area_label + area_prediction - true_positive)  # NaN where absent from both
    accuracy = true_positive / area_label  # NaN where absent from the references
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


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class OffsegMeanIou(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
                }
            ),
            reference_urls=["https://github.com/HVision-NKU/OffSeg"],
        )

    def _compute(self, predictions, references, num_labels: int, ignore_index: int = 255):
        return scores(confusion_matrix(predictions, references, num_labels, ignore_index))
