"""The `evaluate` metric module (offseg_hf/evaluation/evaluate_metric/offseg_mean_iou): loads offline from its folder,
needs no
offseg_hf, and gives bitwise the numbers of `offseg_hf.evaluation.metrics.SegmentationMetrics`."""

import json
import math
import sys
import textwrap
from pathlib import Path

import evaluate
import pytest
import torch

import offseg_hf
from offseg_hf.evaluation.metrics import SegmentationMetrics

from .conftest import run_python_elsewhere

FOLDER = Path(offseg_hf.__file__).parent / "evaluation" / "evaluate_metric" / "offseg_mean_iou"
KEYS = ("mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou", "per_category_accuracy")


@pytest.fixture(scope="module")
def metric(tmp_path_factory):
    return evaluate.load(str(FOLDER), cache_dir=str(tmp_path_factory.mktemp("evaluate")))


def module_of(metric):
    return sys.modules[type(metric).__module__]


def library(predictions, references, num_labels, ignore_index=255):
    metrics = SegmentationMetrics(num_labels, ignore_index)
    for prediction, reference in zip(predictions, references, strict=True):
        metrics.update(torch.as_tensor(prediction), torch.as_tensor(reference))
    return metrics


def assert_identical(result, expected):
    """Equal as floats, NaN where the other is NaN: no tolerance."""
    for key in KEYS:
        got, want = result[key], expected[key]
        got, want = (got, want) if isinstance(got, list) else ([got], [want])
        assert len(got) == len(want), key
        for a, b in zip(got, want, strict=True):
            assert (math.isnan(a) and math.isnan(b)) or a == b, (key, got, want)


# (predictions, references, num_labels, hand-computed confusion matrix rows=truth, cols=prediction)
HAND_CASES = {
    # 4 classes; 255 ignored; class 3 nowhere (left out of both means); class 2 only predicted (IoU 0 counts).
    "ignore_and_absent": (
        [[[0, 1, 1, 2], [0, 1, 0, 2]]],
        [[[0, 0, 1, 1], [0, 1, 255, 255]]],
        4,
        [[2, 1, 0, 0], [0, 2, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
    ),
    "all_wrong": ([[[1, 1, 0]]], [[[0, 0, 1]]], 2, [[0, 2], [1, 0]]),
    # Two maps of different sizes accumulate into one matrix.
    "two_maps": ([[[2, 2]], [[0], [2]]], [[[2, 0]], [[0], [1]]], 3, [[1, 0, 1], [0, 0, 1], [0, 0, 1]]),
}


@pytest.mark.parametrize("case", sorted(HAND_CASES))
def test_hand_computed_confusion_matrices(metric, case):
    predictions, references, num_labels, hand = HAND_CASES[case]
    confusion = module_of(metric).confusion_matrix(predictions, references, num_labels, 255)
    assert confusion.tolist() == hand
    assert library(predictions, references, num_labels).confusion.tolist() == hand
    result = metric.compute(predictions=predictions, references=references, num_labels=num_labels)
    assert_identical(result, library(predictions, references, num_labels).compute())


def test_hand_computed_scores(metric):
    predictions, references, num_labels, _ = HAND_CASES["ignore_and_absent"]
    result = metric.compute(predictions=predictions, references=references, num_labels=num_labels)
    # IoU0 = 2 / (3 + 2 - 2), IoU1 = 2 / (3 + 3 - 2), IoU2 = 0 / 1, IoU3 = 0 / 0 (left out).
    assert result["per_category_iou"][:3] == pytest.approx([2 / 3, 1 / 2, 0.0])
    assert math.isnan(result["per_category_iou"][3])
    assert result["mean_iou"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert result["mean_accuracy"] == pytest.approx(2 / 3)  # Acc0 = Acc1 = 2/3; classes 2, 3 have no truth
    assert result["overall_accuracy"] == pytest.approx(4 / 6)
    wrong = metric.compute(predictions=HAND_CASES["all_wrong"][0], references=HAND_CASES["all_wrong"][1], num_labels=2)
    assert (wrong["mean_iou"], wrong["mean_accuracy"], wrong["overall_accuracy"]) == (0.0, 0.0, 0.0)


def test_streamed_batches_equal_the_library_bitwise(metric):
    generator = torch.Generator().manual_seed(0)
    predictions = [torch.randint(0, 19, (23, 31), generator=generator) for _ in range(6)]
    references = [torch.randint(0, 20, (23, 31), generator=generator) for _ in range(6)]
    for reference in references:
        reference[reference == 19] = 255  # class 19 -> ignored; 19 classes, some rare
    references[0][:] = 3
    for start in (0, 2, 4):
        metric.add_batch(
            predictions=[p.tolist() for p in predictions[start : start + 2]],
            references=[r.tolist() for r in references[start : start + 2]],
        )
    assert_identical(metric.compute(num_labels=19), library(predictions, references, 19).compute())


def test_bad_inputs_are_named(metric):
    with pytest.raises(ValueError, match=r"ids \[7\]"):
        metric.compute(predictions=[[[0]]], references=[[[7]]], num_labels=3)
    with pytest.raises(ValueError, match="differ"):
        metric.compute(predictions=[[[0, 0]]], references=[[[0], [0]]], num_labels=3)


WITHOUT_PACKAGE = textwrap.dedent(
    """
    import json, sys
    sys.modules["offseg_hf"] = None  # the module must not need the package
    import evaluate
    metric = evaluate.load(sys.argv[1], cache_dir=sys.argv[2])
    predictions, references = json.loads(sys.argv[3]), json.loads(sys.argv[4])
    print(json.dumps(metric.compute(predictions=predictions, references=references, num_labels=4)))  # NaN survives
    """
)


@pytest.mark.slow
def test_loads_offline_from_its_folder_without_offseg_hf(tmp_path):
    predictions, references, num_labels, _ = HAND_CASES["ignore_and_absent"]
    arguments = [str(FOLDER), str(tmp_path / "cache"), json.dumps(predictions), json.dumps(references)]
    last_line = run_python_elsewhere(
        WITHOUT_PACKAGE, *arguments, cwd=tmp_path, HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1"
    )
    result = json.loads(last_line)  # floats, NaN included, round-trip exactly
    assert_identical(result, library(predictions, references, num_labels).compute())
