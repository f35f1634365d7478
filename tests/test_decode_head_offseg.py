"""The OffSeg pixel decoder (offseg_hf/models/decode_head_offseg.py)."""

import torch

from offseg_hf.models.decode_head_offseg import interleave_channels


def test_interleave_matches_official_reshape_order():
    hr, lr = torch.randn(2, 8, 3, 3), torch.randn(2, 12, 3, 3)
    b, _, h, w = hr.shape
    official = torch.cat([hr.reshape(b * 4, -1, h, w), lr.reshape(b * 4, -1, h, w)], dim=1).reshape(b, -1, h, w)
    assert torch.equal(interleave_channels(hr, lr), official)
