"""`evaluate` metric module: mean IoU with mmseg's semantics, computed by `offseg_hf.metrics`.

    import evaluate
    metric = evaluate.load("path/to/offseg_hf/evaluate_metric/offseg_mean_iou.py")
    metric.compute(predictions=[pred_map, ...], references=[label_map, ...], num_labels=150, ignore_index=255)

It imports `offseg_hf.metrics` rather than carrying a copy of the confusion-matrix code, so the library, the
training loop and this module give the same numbers by construction (it needs `offseg_hf` installed).
"""

import datasets
import evaluate
import numpy as np
import torch

from offseg_hf.metrics import SegmentationMetrics

_DESCRIPTION = """Mean IoU, mean accuracy and overall accuracy of semantic segmentation from a confusion matrix
accumulated over the whole set, as mmseg computes them: pixels labelled `ignore_index` do not count, and classes
absent from both predictions and references are left out of the means."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of 2D integer label maps.
    references: list of 2D integer label maps of the same sizes (`ignore_index` marks unlabelled pixels).
    num_labels: number of classes.
    ignore_index: label value to ignore (default 255).
Returns:
    mean_iou, mean_accuracy, overall_accuracy (fractions), per_category_iou, per_category_accuracy (NaN where a
    class is undefined).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class OffsegMeanIoU(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
                }
            ),
        )

    def _compute(self, predictions, references, num_labels: int, ignore_index: int = 255):
        metrics = SegmentationMetrics(num_labels=num_labels, ignore_index=ignore_index)
        for prediction, reference in zip(predictions, references, strict=True):
            metrics.update(torch.as_tensor(np.asarray(prediction)), torch.as_tensor(np.asarray(reference)))
        return metrics.compute()
