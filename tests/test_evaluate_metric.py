from pathlib import Path

import evaluate
import pytest
import torch

import offseg_hf
from offseg_hf.metrics import SegmentationMetrics

MODULE = Path(offseg_hf.__file__).parent / "evaluate_metric" / "offseg_mean_iou.py"


def test_evaluate_module_loads_offline_and_matches_the_library(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    metric = evaluate.load(str(MODULE), cache_dir=str(tmp_path))
    torch.manual_seed(0)
    predictions = [torch.randint(0, 5, (6, 7)) for _ in range(3)]
    references = [torch.randint(0, 6, (6, 7)) for _ in range(3)]
    for reference in references:
        reference[reference == 5] = 255
    references[0][:] = 1  # classes absent from one map, present in others
    result = metric.compute(
        predictions=[p.tolist() for p in predictions],
        references=[r.tolist() for r in references],
        num_labels=5,
        ignore_index=255,
    )
    library = SegmentationMetrics(5)
    for p, r in zip(predictions, references, strict=True):
        library.update(p, r)
    expected = library.compute()
    for key in expected:
        assert result[key] == pytest.approx(expected[key], nan_ok=True), key


def test_evaluate_module_on_the_hand_computed_case(tmp_path):
    metric = evaluate.load(str(MODULE), cache_dir=str(tmp_path))
    result = metric.compute(
        predictions=[[[0, 1, 1, 2], [0, 1, 0, 2]]], references=[[[0, 0, 1, 1], [0, 1, 255, 255]]], num_labels=4
    )
    assert result["mean_iou"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert result["overall_accuracy"] == pytest.approx(4 / 6)
