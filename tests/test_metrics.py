import math

import pytest
import torch

from offseg_hf.evaluation.metrics import SegmentationMetrics


def test_hand_computed_confusion_with_ignore_and_absent_classes():
    # 4 classes; class 3 appears nowhere (excluded); class 2 only predicted (IoU 0 counts, Acc excluded).
    labels = torch.tensor([[0, 0, 1, 1], [0, 1, 255, 255]])
    preds = torch.tensor([[0, 1, 1, 2], [0, 1, 3 - 3, 2]])
    metric = SegmentationMetrics(num_labels=4)
    metric.update(preds, labels)
    # Valid pixels: (0->0), (0->1), (1->1), (1->2), (0->0), (1->1)
    expected = torch.zeros(4, 4, dtype=torch.int64)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[1, 2] = 2, 1, 2, 1
    assert torch.equal(metric.confusion, expected)
    result = metric.compute()
    # IoU0 = 2 / (3 + 2 - 2) = 2/3; IoU1 = 2 / (3 + 3 - 2) = 1/2; IoU2 = 0 / (0 + 1 - 0) = 0; IoU3 NaN.
    assert result["per_category_iou"][:3] == pytest.approx([2 / 3, 1 / 2, 0.0])
    assert math.isnan(result["per_category_iou"][3])
    assert result["mean_iou"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    # Acc0 = 2/3, Acc1 = 2/3; classes 2 and 3 have no ground truth -> excluded.
    assert result["mean_accuracy"] == pytest.approx(2 / 3)
    assert result["overall_accuracy"] == pytest.approx(4 / 6)


def test_all_wrong_gives_zero():
    metric = SegmentationMetrics(num_labels=2)
    metric.update(torch.tensor([1, 1, 0]), torch.tensor([0, 0, 1]))
    result = metric.compute()
    assert result["mean_iou"] == 0.0 and result["mean_accuracy"] == 0.0 and result["overall_accuracy"] == 0.0


def test_streaming_equals_one_shot_and_merge_sums():
    torch.manual_seed(0)
    preds, labels = torch.randint(0, 5, (6, 7, 9)), torch.randint(0, 6, (6, 7, 9))
    labels[labels == 5] = 255
    whole = SegmentationMetrics(5)
    whole.update(preds, labels)
    first, second = SegmentationMetrics(5), SegmentationMetrics(5)
    for i in range(3):
        first.update(preds[i], labels[i])
    for i in range(3, 6):
        second.update(preds[i], labels[i])
    first.merge(second.confusion)
    assert torch.equal(first.confusion, whole.confusion)
    streamed, one_shot = first.compute(), whole.compute()
    for key in one_shot:
        assert streamed[key] == pytest.approx(one_shot[key], nan_ok=True), key


def test_bad_inputs_are_named():
    metric = SegmentationMetrics(3)
    with pytest.raises(ValueError, match=r"\[7\]"):
        metric.update(torch.tensor([0]), torch.tensor([7]))
    with pytest.raises(ValueError, match="shape"):
        metric.update(torch.zeros(2, 2), torch.zeros(2, 3))
