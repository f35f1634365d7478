import contextlib

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from transformers.modeling_outputs import SemanticSegmenterOutput

from offseg_hf.evaluation.inference import (
    evaluate_dataset,
    predict_labels,
    predict_logits,
    rescale_size,
    slide_inference,
    whole_inference,
    window_boxes,
)


class PixelLocal(nn.Module):
    """Logits at full resolution that depend only on each pixel's own values."""

    def __init__(self, num_labels=4):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Conv2d(3, num_labels, 1)

    def forward(self, pixel_values):
        return SemanticSegmenterOutput(logits=torch.tanh(self.proj(pixel_values)))


class WindowIndex(nn.Module):
    """Returns, for the n-th image it is called on, constant logits equal to n (in call order)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, pixel_values):
        n = pixel_values.shape[0]
        values = torch.arange(self.calls, self.calls + n, dtype=torch.float32)
        self.calls += n
        # Logits at half resolution, as a real model's: the resize to the window must keep them constant.
        h, w = pixel_values.shape[-2] // 2 + 1, pixel_values.shape[-1] // 2 + 1
        return SemanticSegmenterOutput(logits=values.view(n, 1, 1, 1).expand(n, 1, h, w).clone())


def test_pixel_local_model_gives_the_same_result_whole_and_sliding():
    model = PixelLocal()
    images = torch.randn(2, 3, 37, 53)
    with torch.no_grad():
        whole = whole_inference(model, images)
        slide = slide_inference(model, images, num_labels=4, crop_size=(16, 16), stride=(12, 12))
    torch.testing.assert_close(slide, whole, rtol=0, atol=1e-6)


def test_window_count_and_overlap_averaging_by_hand():
    # 7x10 image, crop 4, stride 3: rows max(7-4+3-1, 0)//3 + 1 = 2, cols max(10-4+2, 0)//3 + 1 = 3.
    boxes = window_boxes(7, 10, (4, 4), (3, 3))
    assert boxes == [(0, 4, 0, 4), (0, 4, 3, 7), (0, 4, 6, 10), (3, 7, 0, 4), (3, 7, 3, 7), (3, 7, 6, 10)]
    model = WindowIndex()
    with torch.no_grad():
        logits = slide_inference(model, torch.zeros(1, 3, 7, 10), num_labels=1, crop_size=(4, 4), stride=(3, 3))
    assert model.calls == 6  # windows 0..5 get values 0..5
    value = logits[0, 0]
    assert value[0, 0] == 0  # only window 0
    assert value[0, 3] == (0 + 1) / 2  # windows 0 and 1 overlap in column 3
    assert value[3, 3] == (0 + 1 + 3 + 4) / 4  # four windows meet at (3, 3)
    assert value[6, 9] == 5  # only the last window
    assert value[3, 6] == (1 + 2 + 4 + 5) / 4


def test_windows_smaller_image_than_crop():
    assert window_boxes(300, 700, (512, 512), (480, 480)) == [(0, 300, 0, 512), (0, 300, 188, 700)]


@pytest.mark.parametrize(
    "size, expected",
    [((512, 683), (512, 683)), ((375, 500), (512, 683)), ((1024, 2048), (512, 1024)), ((200, 4000), (102, 2048))],
)
def test_keep_ratio_resize_matches_mmcv(size, expected):
    assert rescale_size(*size, (2048, 512)) == expected


def test_predict_logits_resizes_to_the_original_image():
    model = PixelLocal()
    with torch.no_grad():
        logits = predict_logits(
            model, torch.randn(1, 3, 40, 60), (81, 123), mode="slide", num_labels=4, crop_size=(32, 32), stride=(24, 24)
        )
    assert logits.shape == (1, 4, 81, 123)
    with pytest.raises(ValueError, match="slide' or 'whole"):
        predict_logits(model, torch.randn(1, 3, 8, 8), (8, 8), mode="grid")


def test_predict_labels_gives_each_image_its_own_size():
    model = PixelLocal()
    images = torch.randn(2, 3, 40, 60)
    sizes = [(81, 123), (20, 30)]
    with torch.no_grad():
        labels = predict_labels(model, images, sizes, mode="slide", num_labels=4, crop_size=(32, 32), stride=(24, 24))
        for i, size in enumerate(sizes):
            expected = predict_logits(model, images[i : i + 1], size, "slide", 4, (32, 32), (24, 24)).argmax(1)[0]
            assert labels[i].shape == size and torch.equal(labels[i], expected)
    with pytest.raises(ValueError, match="original sizes"):
        predict_labels(model, images, sizes[:1])


def test_predict_labels_in_row_bands_equal_the_whole_resize(monkeypatch):
    # A 0.05 MiB budget makes the 400x300 resize of 4 classes (1.9 MB) run in bands of a few rows.
    monkeypatch.setenv("OFFSEG_RESIZE_BUDGET_MB", "0.05")
    model = PixelLocal()
    images = torch.randn(2, 3, 40, 60)
    sizes = [(400, 300), (57, 333)]
    with torch.no_grad():
        labels = predict_labels(model, images, sizes, mode="whole")
        for i, size in enumerate(sizes):
            expected = predict_logits(model, images[i : i + 1], size, "whole").argmax(1)[0]
            assert torch.equal(labels[i], expected)


# ------------------------------------------------------------------------------------------------------------
# evaluate_dataset


class QuarterResolution(nn.Module):
    """A per-pixel linear map to K classes, then 4x4 average pooling: logits at 1/4 resolution, as a real model's.
    Written elementwise in float64 so an image's logits do not depend on the batch it runs in."""

    def __init__(self, num_labels=3):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(num_labels, 3, generator=generator, dtype=torch.float64))
        self.batch_sizes, self.modes_seen = [], []

    def forward(self, pixel_values):
        self.batch_sizes.append(pixel_values.shape[0])
        self.modes_seen.append(self.training)
        w = self.weight[None, :, :, None, None]  # (1, K, 3, 1, 1)
        x = pixel_values[:, None]  # (B, 1, 3, h, w)
        per_pixel = x[:, :, 0] * w[:, :, 0] + x[:, :, 1] * w[:, :, 1] + x[:, :, 2] * w[:, :, 2]  # (B, K, h, w)
        return SemanticSegmenterOutput(logits=F.avg_pool2d(per_pixel, 4))


def eval_samples(num_labels=3):
    """Resized inputs (24x32 but for one 32x24) with labels at various original sizes, some pixels ignored."""
    generator = torch.Generator().manual_seed(1)
    shapes = [((24, 32), (30, 40)), ((24, 32), (27, 36)), ((24, 32), (24, 32)), ((24, 32), (48, 64))]
    shapes += [((32, 24), (40, 30)), ((24, 32), (33, 44)), ((24, 32), (21, 28))]
    samples = []
    for resized, original in shapes:
        labels = torch.randint(0, num_labels, original, generator=generator)
        labels[torch.rand(original, generator=generator) < 0.1] = 255
        samples.append({"pixel_values": torch.randn(3, *resized, generator=generator), "labels": labels})
    return samples


def reference_confusion(model, samples, num_labels=3):
    """mmseg's whole-image protocol written out: logits -> input size -> original size -> argmax -> counts."""
    confusion = np.zeros((num_labels, num_labels), dtype=np.int64)
    with torch.no_grad():
        for sample in samples:
            pixel_values = sample["pixel_values"][None].double()
            logits = model(pixel_values=pixel_values).logits
            logits = F.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
            logits = F.interpolate(logits, size=sample["labels"].shape, mode="bilinear", align_corners=False)
            prediction, labels = logits.argmax(1)[0].numpy().ravel(), sample["labels"].numpy().ravel()
            keep = labels != 255
            np.add.at(confusion, (labels[keep], prediction[keep]), 1)
    return confusion


def test_evaluate_dataset_equals_the_protocol_written_out_at_any_batch_size():
    model, samples = QuarterResolution(), eval_samples()
    expected = reference_confusion(model, samples)
    assert expected.sum() > 0.8 * sum(s["labels"].numel() for s in samples)  # a real check: ~90% labelled
    for batch_size in (1, 3, 8):
        model.batch_sizes.clear()
        metrics = evaluate_dataset(model, samples, 3, batch_size=batch_size)
        np.testing.assert_array_equal(metrics.confusion.numpy(), expected)
        # Consecutive samples of equal resized size share a pass; the 32x24 one breaks the run.
        assert model.batch_sizes == {1: [1] * 7, 3: [3, 1, 1, 2], 8: [4, 1, 2]}[batch_size]


def test_shards_of_two_processes_sum_to_the_whole_set():
    model, samples = QuarterResolution(), eval_samples()
    shards = [evaluate_dataset(model, samples, 3, shard=(rank, 2), batch_size=2).confusion for rank in (0, 1)]
    np.testing.assert_array_equal(shards[1].numpy(), reference_confusion(model, samples[1::2]))
    np.testing.assert_array_equal(shards[0].numpy(), reference_confusion(model, samples[0::2]))
    whole = evaluate_dataset(model, samples, 3, batch_size=2).confusion
    assert torch.equal(shards[0] + shards[1], whole)
    with pytest.raises(ValueError, match="shard"):
        evaluate_dataset(model, samples, 3, shard=(2, 2))


def test_protocol_arguments_reach_predict_labels_and_autocast_wraps_each_forward(monkeypatch):
    from offseg_hf.evaluation import inference

    calls, entered = [], []
    real = inference.predict_labels

    def spy(model, pixel_values, original_sizes, **kwargs):
        calls.append(kwargs)
        return real(model, pixel_values, original_sizes, **kwargs)

    @contextlib.contextmanager
    def autocast():
        entered.append(True)
        yield

    monkeypatch.setattr(inference, "predict_labels", spy)
    model, samples = QuarterResolution(), eval_samples()[:2]
    evaluate_dataset(model, samples, 3, mode="slide", crop_size=[16, 16], stride=(12, 12), autocast=autocast)
    assert calls == [{"mode": "slide", "num_labels": 3, "crop_size": (16, 16), "stride": (12, 12)}] * 2
    # A 24x32 input in windows of 16 every 12: 2 x 3 windows, batched into one forward pass per image.
    assert len(entered) == len(model.batch_sizes) == 2 and model.batch_sizes == [6, 6]


def test_eval_mode_meanwhile_and_every_modules_mode_restored():
    model = nn.Sequential(QuarterResolution())
    model.extra = nn.BatchNorm2d(3).eval()  # e.g. a backbone kept in eval mode (norm_eval) inside a training model
    model.train()
    model.extra.eval()
    evaluate_dataset(model[0], eval_samples()[:1], 3)  # the inner module alone
    evaluate_dataset(model, [], 3)
    assert model.training and model[0].training and not model.extra.training
    inner = model[0]
    inner.train()
    evaluate_dataset(inner, eval_samples()[:2], 3)
    assert inner.modes_seen[-2:] == [False, False] and inner.training

    def broken(pixel_values):
        raise RuntimeError("out of memory")

    inner.forward = broken
    with pytest.raises(RuntimeError, match="out of memory"):
        evaluate_dataset(inner, eval_samples()[:1], 3)
    assert inner.training


def test_half_precision_logits_are_resized_in_float32():
    class HalfLogits(nn.Module):
        def forward(self, pixel_values):
            return SemanticSegmenterOutput(logits=torch.ones(pixel_values.shape[0], 2, 3, 4, dtype=torch.bfloat16))

    assert whole_inference(HalfLogits(), torch.zeros(1, 3, 12, 16)).dtype == torch.float32
