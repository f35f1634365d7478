"""SegNeXt's LightHam decoder and its NMF (offseg_hf/models/decode_head_lightham.py): deterministic evaluation with
seeded
bases, the official global-RNG switch, fresh draws in training, the factorisation itself and the output geometry."""

import pytest
import torch
from torch.nn import functional as F

from offseg_hf import OffSegConfig, OffSegForSemanticSegmentation
from offseg_hf.models.configuration_offseg import DECODE_HEAD_OPTIONS
from offseg_hf.models.decode_head_lightham import EVAL_BASES, MatrixFactorization

from .conftest import randomize_norms
from .test_backbone_mscan import SMALL_MSCAN

NMF_BUFFER = "offseg.decode_head.hamburger.nmf.eval_bases"


def segnext(variant: str = "segnext-t-offset", seed: int = 0, **overrides) -> OffSegForSemanticSegmentation:
    """A SegNeXt-T with one block per stage and the default NMF settings, in eval mode, norms randomised."""
    torch.manual_seed(seed)
    config = OffSegConfig.from_variant(variant, num_labels=5, encoder_config=dict(SMALL_MSCAN), **overrides)
    model = OffSegForSemanticSegmentation(config).eval()
    randomize_norms(model, seed)
    return model


def images(batch: int = 1, height: int = 64, width: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def logits_of(model, pixel_values):
    with torch.no_grad():
        return model(pixel_values).logits


def nmf_input(batch: int = 2, channels: int = 32, height: int = 6, width: int = 8, seed: int = 0) -> torch.Tensor:
    """Non-negative features, as the NMF sees them after the Hamburger's ReLU."""
    return torch.rand(batch, channels, height, width, generator=torch.Generator().manual_seed(seed))


# --- Determinism of the default (seeded) evaluation bases ---


def test_eval_logits_do_not_depend_on_the_global_rng():
    model, pixels = segnext(), images()
    first = logits_of(model, pixels)
    torch.rand(1000)  # advance the global RNG
    second = logits_of(model, pixels)
    torch.manual_seed(12345)
    third = logits_of(model, pixels)
    assert torch.equal(first, second) and torch.equal(first, third)


def test_eval_batch_equals_the_single_image_forwards():
    model, pixels = segnext(), images(batch=3)
    with torch.no_grad():
        batched = (model.offseg(pixels).last_hidden_state, model(pixels).logits)
        singles = [(model.offseg(p).last_hidden_state, model(p).logits) for p in pixels.split(1)]
    # Measured: embeddings within 4e-6, logits within 2.4e-5 (offset learning's LayerNorm over the nearly equal class
    # scores of a fresh model magnifies float32 rounding). Per-image bases would differ by orders of magnitude more.
    for index, tolerance in ((0, 1e-5), (1, 5e-5)):
        expected = torch.cat([single[index] for single in singles])
        torch.testing.assert_close(batched[index], expected, rtol=0, atol=tolerance)
    assert not torch.allclose(batched[1][0], batched[1][1])  # the images differ, so must their logits


def test_eval_bases_come_from_the_config_seed_not_the_state_dict():
    model = segnext(seed=0)
    assert NMF_BUFFER in dict(model.named_buffers())
    assert not [key for key in model.state_dict() if "eval_bases" in key]
    twin = segnext(seed=1)  # other random weights and another global RNG state while building
    twin.load_state_dict(model.state_dict())
    pixels = images()
    assert torch.equal(twin.get_buffer(NMF_BUFFER), model.get_buffer(NMF_BUFFER))
    assert torch.equal(logits_of(twin, pixels), logits_of(model, pixels))

    other_seed = segnext(seed=0, decode_head_config={"seed": 1})
    other_seed.load_state_dict(model.state_dict())
    assert not torch.equal(other_seed.get_buffer(NMF_BUFFER), model.get_buffer(NMF_BUFFER))
    assert not torch.allclose(logits_of(other_seed, pixels), logits_of(model, pixels))


def test_save_and_from_pretrained_keep_the_eval_bases_and_logits(tmp_path):
    model, pixels = segnext(), images()
    model.save_pretrained(tmp_path)
    torch.manual_seed(99)
    loaded = OffSegForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert loaded.config.decode_head_config == {**DECODE_HEAD_OPTIONS["lightham"], "seed": 0, "eval_bases": "seeded"}
    assert torch.equal(loaded.get_buffer(NMF_BUFFER), model.get_buffer(NMF_BUFFER))
    assert torch.equal(logits_of(loaded, pixels), logits_of(model, pixels))


def test_fresh_eval_bases_are_non_negative_with_unit_columns():
    bases = segnext().get_buffer(NMF_BUFFER)
    assert bases.shape == (1, 256, 16)  # decoder_hidden_size x nmf_rank
    assert bases.min() >= 0
    torch.testing.assert_close(bases.norm(dim=1), torch.ones(1, 16))
    expected = F.normalize(torch.rand((1, 256, 16), generator=torch.Generator().manual_seed(0)), dim=1)
    assert torch.equal(bases, expected)


# --- The official behaviour: fresh global-RNG bases, also in evaluation ---


def test_global_rng_eval_bases_follow_the_global_rng():
    model, pixels = segnext(decode_head_config={"eval_bases": "global_rng"}), images()
    assert not torch.allclose(logits_of(model, pixels), logits_of(model, pixels))
    torch.manual_seed(0)
    first = logits_of(model, pixels)
    torch.manual_seed(0)
    assert torch.equal(first, logits_of(model, pixels))


def test_global_rng_first_draw_is_the_official_normalised_uniform():
    nmf = MatrixFactorization(32, rank=8, eval_bases="global_rng").eval()
    torch.manual_seed(0)
    drawn = nmf._initial_bases(2, torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    assert torch.equal(drawn, F.normalize(torch.rand((2, 32, 8)), dim=1))

    # The forward uses exactly that draw: a seeded module holding it as its bases gives the same reconstruction.
    x = nmf_input(batch=1)
    torch.manual_seed(0)
    official = nmf(x)
    seeded = MatrixFactorization(32, rank=8).eval()
    torch.manual_seed(0)
    seeded.eval_bases.copy_(F.normalize(torch.rand((1, 32, 8)), dim=1))
    assert torch.equal(seeded(x), official)


# --- Training: fresh global-RNG bases on every forward, one draw per image ---


def test_training_draws_fresh_bases_every_forward_and_per_image():
    nmf = MatrixFactorization(32, rank=8).train()
    x = nmf_input()
    assert not torch.allclose(nmf(x), nmf(x))
    torch.manual_seed(3)
    first = nmf(x)
    torch.manual_seed(3)
    assert torch.equal(first, nmf(x))

    twins = nmf_input(batch=1).expand(2, -1, -1, -1)
    out = nmf(twins)
    assert not torch.allclose(out[0], out[1])
    nmf.eval()  # the seeded bases are shared by every image
    out = nmf(twins)
    assert torch.equal(out[0], out[1])


# --- The factorisation ---


def test_nmf_reconstructs_an_exactly_low_rank_matrix():
    generator = torch.Generator().manual_seed(0)
    channels, rank, height, width = 64, 16, 8, 12
    bases = torch.rand(2, channels, rank, generator=generator)
    coefficients = torch.rand(2, rank, height * width, generator=generator)
    x = torch.bmm(bases, coefficients).reshape(2, channels, height, width)

    def relative_error(steps: int) -> float:
        nmf = MatrixFactorization(channels, rank=rank, eval_steps=steps).eval()
        with torch.no_grad():
            return ((x - nmf(x)).norm() / x.norm()).item()

    # Measured: 0.057 with the default 7 steps, 0.158 with none (one coefficient update from the softmax start).
    default, none = relative_error(7), relative_error(0)
    assert default < 0.1
    assert default < 0.5 * none


def test_nmf_shape_sign_and_dtype():
    nmf = MatrixFactorization(32, rank=8).eval()
    x = nmf_input()
    out = nmf(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.abs().sum() > 0
    out64 = nmf(x.double())
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), out, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="expects 32 channels, got 16"):
        nmf(x[:, :16])


def test_nmf_keeps_bf16_under_autocast_and_computes_in_float32():
    nmf = MatrixFactorization(32, rank=8).eval()
    x = nmf_input().bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = nmf(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    reference = nmf(x.float())
    # Only the final rounding to bf16 separates them (bf16 keeps 8 significant bits).
    torch.testing.assert_close(out.float(), reference, rtol=1e-2, atol=1e-3)


def test_gradients_flow_through_the_updates_to_the_input():
    nmf = MatrixFactorization(32, rank=8).train()
    x = nmf_input().requires_grad_()
    (nmf(x) * torch.linspace(-1, 1, 8)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_unknown_eval_bases_value_lists_the_known_ones():
    with pytest.raises(ValueError, match="eval_bases") as info:
        OffSegConfig.from_variant("segnext-t-offset", decode_head_config={"eval_bases": "x"})
    assert set(EVAL_BASES) == {"seeded", "global_rng"}
    for known in EVAL_BASES:
        assert known in str(info.value)
    with pytest.raises(ValueError, match="global_rng"):
        MatrixFactorization(32, eval_bases="fixed")


# --- Output geometry ---


@pytest.mark.parametrize("variant", ["segnext-t-offset", "segnext-t"])
def test_outputs_are_at_one_eighth_for_sizes_not_multiple_of_32(variant):
    model = segnext(variant)
    pixels = images(batch=2, height=70, width=90)
    with torch.no_grad():
        outputs = model.offseg(pixels)
        logits = model(pixels).logits
    assert outputs.last_hidden_state.shape == (2, model.config.decoder_hidden_size, 9, 12)  # ceil(70/8), ceil(90/8)
    assert logits.shape == (2, 5, 9, 12)
    assert model.config.classifier == ("offset" if variant.endswith("offset") else "per_pixel")


def test_nmf_keeps_the_memory_layout_of_its_input_and_its_values():
    nmf = MatrixFactorization(32, rank=8).eval()
    x = nmf_input()
    channels_last = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        default, fast = nmf(x), nmf(channels_last)
    assert default.is_contiguous() and fast.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast, default, rtol=0, atol=1e-6)


def test_mscan_features_come_out_channels_last_and_equal_the_default_layout():
    model = segnext().eval()
    pixel_values = images()
    with torch.no_grad():
        features = model.offseg.encoder(pixel_values).feature_maps
        assert all(f.is_contiguous(memory_format=torch.channels_last) for f in features)
        # The same convolutions on contiguous (NCHW) memory: run the stages' modules on a contiguous copy.
        x, reference = pixel_values, []
        for i in range(1, 5):
            x = getattr(model.offseg.encoder, f"patch_embed{i}")(x.contiguous())
            for block in getattr(model.offseg.encoder, f"block{i}"):
                x = block(x.contiguous())
            x = getattr(model.offseg.encoder, f"norm{i}")(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()
            reference.append(x)
    for fast, slow in zip(features, reference, strict=True):
        torch.testing.assert_close(fast, slow, rtol=0, atol=1e-4)


def test_configs_saved_with_the_flat_head_keys_load_into_the_head_section(tmp_path):
    """Configs written before the head options had their own section (`nmf_*`, `decoder_stage_channels`) load with
    the same values; a key no head has is refused with the head's options named."""
    saved = OffSegConfig.from_variant("segnext-t-offset").to_dict()
    del saved["decode_head_config"]
    saved.update(nmf_rank=8, nmf_eval_steps=3, nmf_eval_bases="global_rng", nmf_seed=5)
    config = OffSegConfig.from_dict(saved)
    assert config.decode_head_config == {
        "rank": 8,
        "train_steps": 6,
        "eval_steps": 3,
        "eval_bases": "global_rng",
        "seed": 5,
    }
    assert not any(key.startswith("nmf_") for key in config.to_dict())
    offseg = OffSegConfig.from_variant("offseg-t").to_dict()
    del offseg["decode_head_config"]
    offseg["decoder_stage_channels"] = [8, 8, 16, 32]
    assert OffSegConfig.from_dict(offseg).decode_head_config == {"stage_channels": [8, 8, 16, 32]}
    with pytest.raises(ValueError, match=r"no option\(s\) \['rank'\]; its options: \['stage_channels'\]"):
        OffSegConfig.from_variant("offseg-t", decode_head_config={"rank": 4})
