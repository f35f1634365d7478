"""Every preset still computes what it computed when the reference fixture was written: logits of name-seeded
weights on a fixed input, compared with tests/fixtures/reference_logits.safetensors (written once by
tests/fixtures/make_reference_logits.py on a known-good commit, never regenerated here).

The comparison is a tolerance check on every machine. Another CPU model, or another oneDNN/MKL kernel choice on the
same ISA, sums in another order: measured across an Intel Xeon (AMX) and an AMD EPYC (AVX-512) with the same torch
build, float64 logits differ by up to 4.2e-14 and float32 ones by up to 1.8e-5. A change of function moves logits
by far more than either tolerance. Bitwise equality is only meaningful between two computations in one process
(benchmarks/against_checkout.py does that for refactors)."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).with_name("fixtures")
sys.path.insert(0, str(FIXTURES))
from make_reference_logits import CASES, build, input_pixels  # noqa: E402

REFERENCE = load_file(str(FIXTURES / "reference_logits.safetensors"))

# Absolute tolerances on logits of magnitude up to about 4 (the fixture's own). float64: over three orders of
# magnitude above the cross-CPU spread and still far below what float32 rounding anywhere in the model would leave.
# float32: ten times the cross-CPU spread.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-4}
TAGS = {torch.float64: "fp64", torch.float32: "fp32"}


def assert_matches_reference(logits: torch.Tensor, reference: torch.Tensor) -> None:
    torch.testing.assert_close(logits, reference, rtol=0, atol=TOLERANCE[reference.dtype])


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_the_reference_fixture(case):
    model = build(case, torch.float64)
    for dtype in (torch.float64, torch.float32):
        model.to(dtype)  # the name-seeded values are drawn in float64, so float32 gets them rounded, as the fixture
        with torch.no_grad():
            logits = model(input_pixels().to(dtype)).logits
        assert_matches_reference(logits, REFERENCE[f"{case}:{TAGS[dtype]}"])


@pytest.mark.parametrize(
    ("dtype", "size", "passes"),
    [
        (torch.float64, 1e-14, True),  # another CPU's summation order
        (torch.float64, 1e-3, False),
        (torch.float32, 1e-6, True),
        (torch.float32, 2e-5, True),  # the largest cross-CPU difference measured
        (torch.float32, 1e-3, False),
    ],
)
def test_the_fixture_check_tolerates_rounding_and_catches_changes(dtype, size, passes):
    # The fixture's own values, perturbed as another machine's kernels (or a real change) would perturb them. The
    # check reads no provenance (CPU kind, torch build): it must hold on any machine.
    reference = REFERENCE[f"segformer-b0-offset:{TAGS[dtype]}"]
    signs = torch.randint(0, 2, reference.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    perturbed = reference + size * signs.to(dtype)
    if passes:
        assert_matches_reference(perturbed, reference)
    else:
        with pytest.raises(AssertionError):
            assert_matches_reference(perturbed, reference)
