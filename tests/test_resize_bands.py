"""Row-band resize + argmax (offseg_hf/models/resize_bands.py): the label map, values and scores of the whole resize, in
bounded memory."""

import itertools
import json
import textwrap
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F
from transformers import SegformerImageProcessor

from offseg_hf import OffSegImageProcessor
from offseg_hf.models.resize_bands import (
    BUDGET_ENV,
    _ChannelsLastPlan,
    _Plan,
    arithmetic,
    aten_kernel,
    channels_last_arithmetic,
    resize_argmax,
    resize_budget_bytes,
    rows_per_band,
)

from .conftest import run_python_elsewhere

# (classes, input height, input width) -> (output height, output width): odd up- and down-sampling factors in
# each dimension, including a 1-row/1-column input, unchanged sizes and outputs far from the inputs.
RESIZES = [
    ((5, 7, 9), (101, 67)),  # x14.4 / x7.4 up
    ((4, 33, 29), (19, 151)),  # down 1.7 / up 5.2
    ((3, 40, 61), (97, 43)),  # up 2.4 / down 1.4
    ((6, 1, 13), (131, 29)),  # one input row
    ((2, 17, 1), (60, 140)),  # one input column
    ((7, 64, 64), (64, 200)),  # height unchanged
    ((5, 129, 91), (53, 91)),  # width unchanged, height down 2.4
]
BAND_ROWS = [1, 2, 7, 10_000]  # one row, small bands, one band larger than the image


def random_logits(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * 4).to(dtype)


def ties_free_logits(shape, size, dtype=torch.float32) -> torch.Tensor:
    """Random logits (the first seed) whose resized top two classes are several float32 ulps apart everywhere, so
    the argmax does not hinge on rounding (resizes cross between classes, so some seeds come close)."""
    for seed in range(100):
        logits = random_logits(shape, dtype, seed)
        top2 = whole(logits, size).topk(min(2, shape[0]), dim=0).values
        if shape[0] == 1 or (top2[0] - top2[1]).min() > 2e-5:
            return logits
    raise AssertionError(f"no ties-free logits of shape {shape} for {size}")


def whole(logits: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]


def channels_last(logits: torch.Tensor) -> torch.Tensor:
    """The same values laid out as offset learning's classifier returns them (classes innermost)."""
    return logits[None].contiguous(memory_format=torch.channels_last)[0]


def banded_values(logits: torch.Tensor, size, band_rows: int) -> tuple[torch.Tensor, bool]:
    """The resize formed band by band as ATen's kernel for it would, and whether the build's forms were found."""
    if aten_kernel(logits, size) == "channels_last":
        form = channels_last_arithmetic(logits.device.type, logits.dtype, logits.shape[0])
        plan = _ChannelsLastPlan(logits, size, form)
    else:
        layout = logits[None].is_contiguous(memory_format=torch.channels_last) and not logits.is_contiguous()
        form = arithmetic(logits.device.type, logits.dtype, layout)
        plan = _Plan(logits, size, form)
    values = logits.new_empty(logits.shape[0], *size)
    for start in range(0, size[0], band_rows):
        plan.band(logits, start, values[:, start : start + band_rows])
    return values, form.exact


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, size", RESIZES)
def test_bands_give_the_whole_resize_bitwise_and_its_label_map(shape, size, dtype, layout):
    logits = ties_free_logits(shape, size, dtype)
    logits = channels_last(logits) if layout == "channels_last" else logits
    expected = whole(logits, size)
    for band_rows in BAND_ROWS:
        values, exact = banded_values(logits, size, band_rows)
        if exact:  # the build's rounding forms were found: every value is F.interpolate's
            assert torch.equal(values, expected), (band_rows, (values - expected).abs().max())
        else:
            torch.testing.assert_close(values, expected)
        result = resize_argmax(logits, size, band_rows=band_rows)
        assert result.label_map.dtype == torch.int64 and result.label_map.shape == size
        assert torch.equal(result.label_map, expected.argmax(dim=0))


def test_this_build_rounds_like_one_of_the_candidate_forms():
    # Builds fuse (or not) the kernels' sums in one of the candidate orders for float32 and float64 on the CPU; a
    # build that does neither would leave the bands approximate (still within rounding, see the test above).
    for dtype in (torch.float32, torch.float64):
        assert arithmetic("cpu", dtype).exact, arithmetic("cpu", dtype)
        for num_labels in (1, 2, 3, 4, 19, 150):
            form = channels_last_arithmetic("cpu", dtype, num_labels)
            assert form.exact and form.chains[0][0] == 0 and form.chains[-1][1] == num_labels, form


def test_the_bands_follow_the_kernel_aten_takes():
    logits = random_logits((5, 8, 8))
    assert aten_kernel(logits, (100, 200)) == "generic"
    assert aten_kernel(channels_last(logits), (100, 200)) == "channels_last"  # offset learning's logits
    assert aten_kernel(logits, (60, 68)) == "channels_last"  # height + width <= 128
    threads = torch.get_num_threads()  # one under pytest-xdist (conftest.py), the cores otherwise
    try:
        torch.set_num_threads(2)
        assert aten_kernel(channels_last(logits[:3]), (100, 200)) == "generic"  # 3 classes: only on one thread
        torch.set_num_threads(1)
        assert aten_kernel(logits[:3], (100, 200)) == "channels_last"
        three = ties_free_logits((3, 9, 7), (150, 90))
        expected = whole(three, (150, 90))  # ATen's channels-last kernel, on one thread
        values, exact = banded_values(three, (150, 90), 7)
        assert not exact or torch.equal(values, expected)
        assert torch.equal(resize_argmax(three, (150, 90), band_rows=7).label_map, expected.argmax(dim=0))
    finally:
        torch.set_num_threads(threads)


def test_ties_break_as_in_the_whole_resize():
    # Integer logits resized 2x and 4x give many exactly equal classes; the bands pick the same (first) one.
    generator = torch.Generator().manual_seed(3)
    logits = torch.randint(-2, 3, (6, 9, 11), generator=generator).float()
    logits[:, 4] = float("nan")  # NaN counts as the maximum in both
    for size, laid_out in itertools.product([(18, 44), (36, 22), (101, 77)], [logits, channels_last(logits)]):
        expected = whole(laid_out, size).argmax(dim=0)
        assert (whole(laid_out, size).topk(2, dim=0).values.diff(dim=0) == 0).any()  # there are ties
        for band_rows in BAND_ROWS:
            assert torch.equal(resize_argmax(laid_out, size, band_rows=band_rows).label_map, expected)


@pytest.mark.parametrize("shape, size", RESIZES[:4])
def test_scores_equal_the_whole_computation(shape, size):
    logits = ties_free_logits(shape, size)
    resized = whole(logits, size)
    labels = resized.argmax(dim=0)
    maps = logits.abs() + 0.1  # non-negative class maps (Mask2Former's kind)
    resized_maps = whole(maps, size)
    kinds = {
        "softmax": (logits, resized.softmax(dim=0)),
        "normalised": (maps, resized_maps / resized_maps.sum(dim=0, keepdim=True)),
    }
    for kind, (inputs, probabilities) in kinds.items():
        map_labels = resized_maps.argmax(dim=0) if kind == "normalised" else labels
        for band_rows in BAND_ROWS:
            result = resize_argmax(inputs, size, scores=kind, band_rows=band_rows)
            assert torch.equal(result.label_map, map_labels)
            for class_id in range(shape[0]):
                inside = map_labels == class_id
                assert result.pixel_counts[class_id] == inside.sum()
                if inside.any():
                    expected = probabilities[class_id][inside].double().mean().item()
                    assert result.scores[class_id].item() == pytest.approx(expected, rel=1e-6, abs=1e-7)
                else:
                    assert torch.isnan(result.scores[class_id])


def test_half_precision_logits_are_resized_in_float32():
    logits = ties_free_logits((4, 9, 7), (83, 121)).to(torch.bfloat16)
    expected = whole(logits.float(), (83, 121)).argmax(dim=0)
    for band_rows in (3, None):
        assert torch.equal(resize_argmax(logits, (83, 121), band_rows=band_rows).label_map, expected)


def test_small_outputs_take_the_channels_last_form_and_what_fits_is_resized_whole():
    # Outputs with height + width <= 128 take ATen's channels-last kernel on the CPU even for contiguous logits.
    logits = random_logits((9, 13, 11))
    for size in [(60, 68), (5, 3)]:
        values, exact = banded_values(logits, size, 2)
        assert not exact or torch.equal(values, whole(logits, size))
        assert torch.equal(resize_argmax(logits, size, band_rows=1).label_map, whole(logits, size).argmax(dim=0))
    assert torch.equal(resize_argmax(logits, (300, 200)).label_map, whole(logits, (300, 200)).argmax(dim=0))


def test_rows_per_band_follows_the_budget():
    # 150 classes, 1/8 logits of a 512x512 input, a 12 MP photo.
    rows = rows_per_band(150, 64, 3024, 4032, torch.float32, 256 * 2**20)
    assert 40 <= rows <= 110
    assert rows_per_band(150, 64, 3024, 4032, torch.float64, 256 * 2**20) < rows  # 8-byte values: fewer rows
    assert rows_per_band(150, 64, 3024, 4032, torch.float32, 64 * 2**20) < rows / 3
    assert rows_per_band(300, 64, 3024, 4032, torch.float32, 256 * 2**20) < rows  # more classes: fewer rows
    assert rows_per_band(150, 64, 3024, 4032, torch.float32, 2**20) == 1  # at least one row
    assert rows_per_band(2, 64, 300, 400, torch.float32, 256 * 2**20) == 300  # at most the image
    # Downsampling reads more input rows per output row, and gathers them: fewer rows for the same budget.
    assert rows_per_band(150, 6048, 3024, 4032, torch.float32, 256 * 2**20) < rows / 2
    # The channels-last form holds the band and per-run rows only: more rows; unfused sums need temporaries.
    budget = 256 * 2**20
    assert rows_per_band(150, 64, 3024, 4032, torch.float32, budget, "channels_last") > rows
    assert rows_per_band(150, 64, 3024, 4032, torch.float32, budget, "channels_last_unfused") < rows


def test_budget_comes_from_the_argument_the_environment_or_the_default(monkeypatch):
    monkeypatch.delenv(BUDGET_ENV, raising=False)
    assert resize_budget_bytes() == 256 * 2**20
    assert resize_budget_bytes(8) == 8 * 2**20
    monkeypatch.setenv(BUDGET_ENV, "32")
    assert resize_budget_bytes() == 32 * 2**20 and resize_budget_bytes(8) == 8 * 2**20
    monkeypatch.setenv(BUDGET_ENV, "lots")
    with pytest.raises(ValueError, match=f"{BUDGET_ENV}='lots' is not a number of MiB"):
        resize_budget_bytes()
    with pytest.raises(ValueError, match="must be a positive number of MiB"):
        resize_budget_bytes(0)


def test_image_processor_post_processing_equals_segformers_in_bands():
    """`post_process_semantic_segmentation` (what `pipeline("image-segmentation")` calls) gives transformers'
    SegFormer result, with bands forced by a small budget."""
    logits = random_logits((2, 6, 8, 8), seed=5)
    outputs = SimpleNamespace(logits=logits)
    sizes = [(300, 257), (91, 401)]
    expected = SegformerImageProcessor().post_process_semantic_segmentation(outputs, target_sizes=sizes)
    banded = OffSegImageProcessor(resize_budget_mb=0.05).post_process_semantic_segmentation(outputs, sizes)
    per_call = OffSegImageProcessor().post_process_semantic_segmentation(outputs, sizes, resize_budget_mb=0.05)
    for expected_map, banded_map, call_map in zip(expected, banded, per_call, strict=True):
        assert banded_map.dtype == torch.int64 and torch.equal(banded_map, expected_map)
        assert torch.equal(call_map, expected_map)
    assert rows_per_band(6, 8, 300, 257, torch.float32, int(0.05 * 2**20)) < 300  # the budget did force bands
    # Without target sizes, or asking for the resized logits themselves: SegFormer's own.
    unsized = OffSegImageProcessor().post_process_semantic_segmentation(outputs)
    assert torch.equal(unsized[0], logits[0].argmax(dim=0))
    with_scores = OffSegImageProcessor().post_process_semantic_segmentation(outputs, sizes, True)
    assert with_scores[0].segmentation_scores.shape == (6, 300, 257)


def test_image_processor_on_a_models_channels_last_logits_equals_segformers(tiny_model):
    # Offset learning's classifier returns channels-last logits, which ATen resizes with its channels-last kernel.
    processor = OffSegImageProcessor(size={"height": 64, "width": 64}, resize_budget_mb=0.01)
    with torch.no_grad():
        outputs = tiny_model(**processor(images=torch.rand(2, 3, 40, 50), return_tensors="pt", do_rescale=False))
    assert outputs.logits[:1].is_contiguous(memory_format=torch.channels_last)
    sizes = [(321, 203), (150, 499)]
    expected = SegformerImageProcessor().post_process_semantic_segmentation(outputs, target_sizes=sizes)
    for banded, whole_map in zip(processor.post_process_semantic_segmentation(outputs, sizes), expected, strict=True):
        assert torch.equal(banded, whole_map)
    assert rows_per_band(6, 8, 321, 203, torch.float32, int(0.01 * 2**20), "channels_last") < 321  # bands, indeed


# The peak resident memory of one resize in a fresh process: whole, then banded under a 48 MiB budget.
PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from offseg_hf.models.resize_bands import arithmetic, resize_argmax

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    torch.set_num_threads(1)
    arithmetic("cpu", torch.float32)
    logits = torch.randn(150, 64, 64, generator=torch.Generator().manual_seed(0))
    mode = sys.argv[1]
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # VmHWM := VmRSS
    before = status("VmRSS")
    if mode == "whole":
        labels = torch.nn.functional.interpolate(logits[None], size=(900, 1200), mode="bilinear").argmax(1)[0]
    else:
        labels = resize_argmax(logits, (900, 1200), budget_mb=48).label_map
    print(json.dumps({"growth": status("VmHWM") - before, "labels": labels.sum().item()}))
    """
)


@pytest.mark.slow
def test_peak_memory_stays_within_the_budget_plus_the_label_map(tmp_path):
    try:
        (tmp_path / "probe").write_text("")
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident memory")
    runs = {mode: json.loads(run_python_elsewhere(PEAK_SCRIPT, mode, cwd=tmp_path)) for mode in ("whole", "bands")}
    assert runs["whole"]["labels"] == runs["bands"]["labels"]
    label_map = 900 * 1200 * 8
    assert runs["whole"]["growth"] > 150 * 900 * 1200 * 4  # the (K, H, W) tensor: 0.6 GB
    assert runs["bands"]["growth"] <= 48 * 2**20 + label_map + 8 * 2**20, runs  # budget + label map + slack
