import pytest
import torch
from torch import nn
from transformers.modeling_outputs import SemanticSegmenterOutput

from offseg_hf.inference import (
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
