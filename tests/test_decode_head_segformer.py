"""mmseg's SegFormer head with the factorised fusion (offseg_hf/models/decode_head_segformer.py)."""

import torch
from torch.nn import functional as F


def test_decoder_equals_literal_mmseg_head(tiny_model):
    """The factorised fusion equals mmseg's concat -> 1x1 conv -> BN -> ReLU."""
    decoder = tiny_model.offseg.decode_head
    with torch.no_grad():
        features = tiny_model.offseg.encoder(torch.randn(2, 3, 90, 70)).feature_maps
        size = features[0].shape[-2:]
        upsampled = [
            F.interpolate(proj(x), size=size, mode="bilinear", align_corners=False)
            for x, proj in zip(features, decoder.stage_projections, strict=True)
        ]
        expected = decoder.fusion(torch.cat(upsampled, dim=1))
        torch.testing.assert_close(decoder(features), expected, rtol=1e-5, atol=1e-5)
