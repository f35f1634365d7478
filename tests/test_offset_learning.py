"""OffsetLearning against a direct, per-sample transcription of the paper's equations (3)-(13) + LayerNorm, and
MaskOffsetLearning (Mask2Former) against the official `Offset_Learning_Mask`."""

import pytest
import torch
from torch.nn import functional as F

from offseg_hf import MaskOffsetLearning, OffsetLearning
from offseg_hf.models import fast_offset_learning
from offseg_hf.models.fast_offset_learning import pad_class_rows


def reference(module: OffsetLearning, features: torch.Tensor) -> torch.Tensor:
    """Literal per-sample implementation, in the paper's (HW, C) / (K, C) notation."""
    batch, channels, height, width = features.shape
    W = module.class_embeddings  # (K, C)
    outputs = []
    for b in range(batch):
        E = features[b].reshape(channels, height * width).t()  # (HW, C)
        A_c = W @ E.t()  # (K, HW)  eq. 4
        W_adj = W
        if module.class_offset_proj is not None:
            A_cls = torch.softmax(A_c, dim=1)  # softmax over HW, eq. 5
            F_cls = A_cls @ E  # (K, C) eq. 6
            dW = F_cls @ module.class_offset_proj.weight.t()  # eq. 7
            W_adj = W + dW  # eq. 8
        E_adj = E
        if module.feature_offset_proj is not None:
            A_pos = torch.softmax(A_c, dim=0).t()  # softmax over K, transposed: (HW, K), eq. 9
            F_pos = A_pos @ W  # (HW, C) eq. 10
            dE = F_pos @ module.feature_offset_proj.weight.t()  # eq. 11
            E_adj = E + dE  # eq. 12
        M = W_adj @ E_adj.t()  # (K, HW) eq. 13
        M = F.layer_norm(M.t(), (M.shape[0],), module.mask_norm.weight, module.mask_norm.bias, module.mask_norm.eps)
        outputs.append(M.t().reshape(-1, height, width))
    return torch.stack(outputs)


def make_module(class_offset=True, feature_offset=True, num_classes=7, channels=16, dtype=torch.float64):
    torch.manual_seed(0)
    module = OffsetLearning(num_classes, channels, class_offset=class_offset, feature_offset=feature_offset)
    with torch.no_grad():
        # Larger than the 0.02 init so both softmaxes are far from uniform and every term matters.
        module.class_embeddings.normal_(0, 0.5)
        for proj in (module.class_offset_proj, module.feature_offset_proj):
            if proj is not None:
                proj.weight.normal_(0, 0.3)
        module.mask_norm.weight.normal_(1, 0.2)
        module.mask_norm.bias.normal_(0, 0.2)
    return module.to(dtype)


@pytest.mark.parametrize("class_offset", [True, False])
@pytest.mark.parametrize("feature_offset", [True, False])
@pytest.mark.parametrize("num_classes", [7, 8, 19])  # the GEMMs pad 7 and 19 class rows to 8 and 24; 8 needs none
def test_matches_paper_equations(class_offset, feature_offset, num_classes):
    module = make_module(class_offset, feature_offset, num_classes=num_classes)
    features = torch.randn(3, 16, 5, 9, dtype=torch.float64)
    out = module(features)
    assert out.shape == (3, num_classes, 5, 9)
    torch.testing.assert_close(out, reference(module, features), rtol=1e-10, atol=1e-10)


def test_class_rows_are_zero_padded_to_a_multiple_of_8():
    rows = torch.randn(2, 150, 4)
    padded = pad_class_rows(rows)
    assert padded.shape == (2, 152, 4) and torch.equal(padded[:, :150], rows) and not padded[:, 150:].any()
    eight = rows[:, :8]
    assert pad_class_rows(eight) is eight  # already a multiple: no copy
    # ADE20K's 150 classes on a channels-last 1/4-resolution map: equal to the paper's equations.
    module = make_module(num_classes=150, channels=16)
    features = torch.randn(1, 16, 12, 10, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    scores, attention = module(features, output_class_attention=True)
    torch.testing.assert_close(scores, reference(module, features), rtol=1e-10, atol=1e-10)
    assert attention.shape == (1, 150, 12, 10)
    torch.testing.assert_close(attention.sum(dim=(2, 3)), torch.ones(1, 150, dtype=torch.float64))


def test_matches_paper_equations_float32():
    module = make_module(dtype=torch.float32)
    features = torch.randn(2, 16, 11, 6)
    torch.testing.assert_close(module(features), reference(module, features), rtol=1e-5, atol=1e-5)


def test_both_branches_off_is_layernorm_of_per_pixel_scores():
    module = make_module(class_offset=False, feature_offset=False)
    features = torch.randn(2, 16, 4, 3, dtype=torch.float64)
    W = module.class_embeddings
    scores = torch.einsum("bchw,kc->bhwk", features, W)  # E W^T
    expected = F.layer_norm(scores, (7,), module.mask_norm.weight, module.mask_norm.bias).permute(0, 3, 1, 2)
    torch.testing.assert_close(module(features), expected)
    assert module.class_offset_proj is None and module.feature_offset_proj is None


def test_branches_change_the_output():
    features = torch.randn(2, 16, 4, 4, dtype=torch.float64)
    outs = {(c, f): make_module(c, f)(features) for c in (True, False) for f in (True, False)}
    keys = list(outs)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            assert not torch.allclose(outs[a], outs[b]), (a, b)


def test_gradients_reach_every_parameter_and_the_input():
    module = make_module(dtype=torch.float32)
    features = torch.randn(2, 16, 6, 5, requires_grad=True)
    target = torch.randint(0, 7, (2, 6, 5))
    F.cross_entropy(module(features), target).backward()
    for name, param in module.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert features.grad.abs().sum() > 0


def test_bf16_autocast_with_float32_softmax(monkeypatch):
    """CUDA's autocast runs softmax in float32 and matrix products in bf16, so the feature-offset product meets a
    float32 Softmax_K(A) and bf16 scores (on an H200: "Input dtypes must be the same" in the in-place baddbmm, every
    offset model under bf16 autocast). CPU autocast keeps softmax in bf16: its float32 result is imitated here."""
    module = make_module(num_classes=13, dtype=torch.float32)
    features = torch.randn(2, 16, 6, 7, requires_grad=True)
    expected = module(features)
    softmax_over_classes = fast_offset_learning.softmax_over_classes
    monkeypatch.setattr(fast_offset_learning, "softmax_over_classes", lambda a: softmax_over_classes(a.float()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = module(features)
    torch.testing.assert_close(scores.float(), expected, rtol=0, atol=0.1)  # bf16: 0.03 off at scores up to 3
    scores.float().sum().backward()
    assert features.grad is not None and torch.isfinite(features.grad).all()


def test_rejects_wrong_channel_count():
    module = make_module(dtype=torch.float32)
    with pytest.raises(ValueError, match="16 feature channels"):
        module(torch.randn(1, 8, 4, 4))


# -- MaskOffsetLearning (Mask2Former) ---------------------------------------------------------------------------


def mask_reference(module: MaskOffsetLearning, queries: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """The official `Offset_Learning_Mask` written out per sample: F' is formed, then masks = q' F'^T."""
    batch, channels, height, width = features.shape
    outputs = []
    for b in range(batch):
        q = queries[b]  # (Q, C)
        feats = features[b].reshape(channels, height * width).t()  # F: (HW, C)
        A = q @ feats.t()  # (Q, HW)
        q_adj = q + (torch.softmax(A, dim=1) @ feats) @ module.class_offset_proj.weight.t()  # softmax over HW
        f_adj = feats + (torch.softmax(A, dim=0).t() @ q) @ module.feature_offset_proj.weight.t()  # over queries
        outputs.append(torch.einsum("qc,nc->qn", q_adj, f_adj).reshape(-1, height, width))
    return torch.stack(outputs)


def make_mask_module(channels=16, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    module = MaskOffsetLearning(channels)
    with torch.no_grad():  # larger than the 0.02 init, so both offset terms weigh
        module.class_offset_proj.weight.normal_(0, 0.3)
        module.feature_offset_proj.weight.normal_(0, 0.3)
    return module.to(dtype)


def mask_inputs(batch=3, queries=7, channels=16, size=(5, 9), dtype=torch.float64, seed=1):
    generator = torch.Generator().manual_seed(seed)
    # Scores q.F of a few units: both softmaxes far from uniform.
    q = 0.5 * torch.randn(batch, queries, channels, generator=generator, dtype=dtype)
    return q, torch.randn(batch, channels, *size, generator=generator, dtype=dtype)


def test_mask_offset_learning_matches_the_official_formula():
    module = make_mask_module()
    q, features = mask_inputs()
    masks = module(q, features)
    assert masks.shape == (3, 7, 5, 9)
    torch.testing.assert_close(masks, mask_reference(module, q, features), rtol=1e-10, atol=1e-10)
    # float32: the (Q, Q) arrangement equals the literal order up to rounding.
    module, q, features = module.float(), q.float(), features.float()
    torch.testing.assert_close(module(q, features), mask_reference(module, q, features), rtol=1e-5, atol=1e-5)


def test_mask_offset_learning_without_offsets_is_the_plain_product():
    module = make_mask_module()
    q, features = mask_inputs()
    plain = torch.einsum("bqc,bchw->bqhw", q, features)
    with_offsets = module(q, features)
    assert (with_offsets - plain).abs().max() > 1.0  # the offsets do move the masks at these weights
    with torch.no_grad():
        module.class_offset_proj.weight.zero_()
    feature_offset_only = module(q, features)
    with torch.no_grad():
        module.feature_offset_proj.weight.zero_()
    torch.testing.assert_close(module(q, features), plain, rtol=0, atol=1e-12)
    # Each offset term counts on its own.
    assert not torch.allclose(feature_offset_only, plain) and not torch.allclose(feature_offset_only, with_offsets)


def test_mask_offset_learning_gradients_reach_both_projections_and_inputs():
    module = make_mask_module(dtype=torch.float32)
    q, features = (t.float().requires_grad_() for t in mask_inputs())
    target = (torch.rand(3, 7, 5, 9, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    F.binary_cross_entropy_with_logits(module(q, features), target).backward()
    for name, param in module.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert q.grad.abs().sum() > 0 and features.grad.abs().sum() > 0


def test_mask_offset_learning_rejects_wrong_channel_counts():
    module = make_mask_module(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"16 channels.*mask embeddings \(2, 7, 16\) and mask features \(2, 8, 4, 4\)"):
        module(torch.randn(2, 7, 16), torch.randn(2, 8, 4, 4))
    with pytest.raises(ValueError, match=r"mask embeddings \(2, 7, 8\) and mask features \(2, 16, 4, 4\)"):
        module(torch.randn(2, 7, 8), torch.randn(2, 16, 4, 4))
