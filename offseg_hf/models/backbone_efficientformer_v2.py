"""EfficientFormerV2 (timm) as OffSeg's segmentation backbone, for any input size.

timm builds EfficientFormerV2 for one input size: its attention layers reshape to the token grid of that size
and add a relative-position bias table laid out for it. The official OffSeg backbone keeps the bias for a
512x512 input (a 16x16 grid in the last two stages) and, for any other input, resizes the expanded
(heads, N_query, N_key) bias matrix bicubically to the attention's actual shape. This module builds timm's
model for 512x512 and swaps in the two attention classes below, which run timm's own submodules and
parameters on whatever grid arrives and resize the bias the official way. At 512x512 nothing is resized and the
outputs equal timm's model exactly. The state dict is timm's (minus the classifier), so timm checkpoints load.

Outputs: the maps after each of the four stages (strides 4/8/16/32), without extra norms.
"""

from __future__ import annotations

import os

import timm
import torch
from timm.models.efficientformer_v2 import Attention2d, Attention2dDownsample
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedConfig
from transformers import initialization as init

from .configuration_offseg import EFFICIENTFORMER_V2_MODELS
from .encoder import EncoderOutput, no_attentions_error
from .fast_layers import pointwise_conv
from .forms import HasForms
from .layers import initialise_with
from .state_dict_checks import require_fit

# The official segmentation backbone's attention biases are laid out for this input size.
BIAS_INPUT_SIZE = 512

SUPPORTED_MODELS = EFFICIENTFORMER_V2_MODELS  # the configuration's list: a config is checked before any module exists

# timm's ImageNet model has these; the segmentation backbone does not use them.
CLASSIFIER_KEYS = ("norm.", "head.", "head_dist.")


def _resized_bias(module: nn.Module, queries: int, keys: int) -> torch.Tensor:
    """The (heads, N, N) bias of `module`, bicubically resized to (heads, queries, keys).

    At the table's own size bicubic interpolation reads each value at its own position (weights 0, 1, 0, 0) and
    returns the table unchanged. Traced, compiled or exported, the resize runs at every size with no branch on it,
    so one graph serves every input size; in plain eager it is skipped at the table's size. In eager inference (no
    autograd through the table, not tracing) the result is memoised for the last grid, keyed by the table's version
    counter and storage, so a `load_state_dict` or optimizer step invalidates it.
    """
    table = module.attention_biases
    memoise = not (
        torch.compiler.is_compiling() or torch.jit.is_tracing() or (torch.is_grad_enabled() and table.requires_grad)
    )
    if memoise:
        key = (table._version, table.data_ptr(), table.device, table.dtype, queries, keys)
        cached = module.__dict__.get("_resized_bias")
        if cached is not None and cached[0] == key:
            return cached[1]
        table = table.detach()
    bias = table[:, module.attention_bias_idxs]  # (heads, N, N)
    tracing = torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.compiler.is_exporting()
    if tracing or bias.shape[-2:] != (queries, keys):
        # Skipped in plain eager at the table's own size, where it is the identity: in training (no memo) it would
        # run forward and backward in every attention call for nothing.
        bias = F.interpolate(bias.unsqueeze(0), size=(queries, keys), mode="bicubic", align_corners=False)[0]
    if memoise:
        module.__dict__["_resized_bias"] = (key, bias)
    return bias


def _attention_bias_init_(module: nn.Module) -> None:
    # timm starts the biases at zero. The index table is a non-persistent buffer: after loading (transformers builds
    # the model on the meta device) nothing else fills it, so it is recomputed here.
    init.zeros_(module.attention_biases)
    indices = module.attention_bias_idxs
    init.copy_(indices, module._compute_attention_bias_idxs(device=indices.device))


class ResizableAttention2d(HasForms, Attention2d):
    """timm's `Attention2d` (talking-head attention with a local value branch) on any token grid."""

    def _talking_head(self, conv: nn.Conv2d, attn: torch.Tensor) -> torch.Tensor:
        """A 1x1 convolution over the heads of the (B, heads, N, N) attention; in the fast form a matrix product
        (`fast_layers.pointwise_conv`)."""
        return conv(attn) if self.form == "reference" else pointwise_conv(conv, attn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_size, _, height, width = x.shape
        if self.stride_conv is not None:
            x = self.stride_conv(x)  # (B, C, ceil(H/2), ceil(W/2))
        grid_h, grid_w = x.shape[-2:]
        tokens = grid_h * grid_w
        q = self.q(x).reshape(batch_size, self.num_heads, -1, tokens).transpose(-1, -2)  # (B, heads, N, kd)
        k = self.k(x).reshape(batch_size, self.num_heads, -1, tokens)  # (B, heads, kd, N)
        v = self.v(x)
        v_local = self.v_local(v)
        v = v.reshape(batch_size, self.num_heads, -1, tokens).transpose(-1, -2)  # (B, heads, N, d)

        attn = (q @ k) * self.scale + _resized_bias(self, tokens, tokens)  # (B, heads, N, N)
        attn = self._talking_head(self.talking_head2, self._talking_head(self.talking_head1, attn).softmax(dim=-1))

        x = (attn @ v).transpose(2, 3).reshape(batch_size, self.dh, grid_h, grid_w) + v_local
        if self.upsample is not None:
            # Back to the input grid; equals timm's scale-2 upsample when the input size is even. Channels-last
            # input: ATen's CPU bilinear kernel on this wide, small NCHW map (e.g. 1024 x 16 x 16) takes a slow
            # layout round trip (same values either way; docs/speed.md has the measured cost).
            x = F.interpolate(
                x.contiguous(memory_format=torch.channels_last),
                size=(height, width),
                mode="bilinear",
                align_corners=False,
            )
        return self.proj(self.act(x))


class ResizableAttention2dDownsample(Attention2dDownsample):
    """timm's `Attention2dDownsample` (stride-2 queries over all keys) on any token grid."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_size, _, height, width = x.shape
        keys = height * width
        q = self.q(x)  # (B, heads*kd, ceil(H/2), ceil(W/2))
        out_h, out_w = q.shape[-2:]
        queries = out_h * out_w
        q = q.reshape(batch_size, self.num_heads, -1, queries).transpose(-1, -2)  # (B, heads, Nq, kd)
        k = self.k(x).reshape(batch_size, self.num_heads, -1, keys)  # (B, heads, kd, N)
        v = self.v(x)
        v_local = self.v_local(v)  # (B, dh, ceil(H/2), ceil(W/2))
        v = v.reshape(batch_size, self.num_heads, -1, keys).transpose(-1, -2)  # (B, heads, N, d)

        attn = (q @ k) * self.scale + _resized_bias(self, queries, keys)  # (B, heads, Nq, N)
        x = (attn.softmax(dim=-1) @ v).transpose(2, 3).reshape(batch_size, self.dh, out_h, out_w) + v_local
        return self.proj(self.act(x))


class EfficientFormerV2Backbone(nn.Module):
    """Stem + the four stages of timm's EfficientFormerV2; returns the four stage outputs (see `encoder.py`).

    Args:
        model_name: a timm EfficientFormerV2 name, e.g. `"efficientformerv2_s1"`.
        drop_path_rate: stochastic depth of the backbone (official: S1 0.0, S2 0.02, L 0.1).
        norm_eval: keep the backbone's BatchNorm layers in eval mode while training (running statistics frozen,
            affine weights still learn), mmseg's `norm_eval`.
    """

    def __init__(self, model_name: str, drop_path_rate: float = 0.0, norm_eval: bool = False):
        super().__init__()
        if model_name not in SUPPORTED_MODELS:
            raise ValueError(f"Unsupported EfficientFormerV2 {model_name!r}; supported: {', '.join(SUPPORTED_MODELS)}.")
        model = timm.create_model(
            model_name, pretrained=False, num_classes=0, img_size=BIAS_INPUT_SIZE, drop_path_rate=drop_path_rate
        )
        for module in model.modules():
            if type(module) is Attention2d:
                module.__class__ = ResizableAttention2d
                initialise_with(module, _attention_bias_init_)
            elif type(module) is Attention2dDownsample:
                module.__class__ = ResizableAttention2dDownsample
                initialise_with(module, _attention_bias_init_)
        self.stem = model.stem
        self.stages = model.stages
        self.channels = [info["num_chs"] for info in model.feature_info]
        self.norm_eval = norm_eval

    has_attentions = False
    display_name = "EfficientFormerV2"
    pretrained_sources = "a timm state-dict file or a timm name like efficientformerv2_s1.snap_dist_in1k"

    @staticmethod
    def accepts_pretrained(name_or_path: str) -> bool:
        return "efficientformer" in name_or_path.lower() or os.path.isfile(name_or_path)

    @classmethod
    def from_encoder_config(cls, config: PreTrainedConfig) -> EfficientFormerV2Backbone:
        """From a `TimmBackboneConfig` naming the model, with the extra keys `drop_path_rate` and `norm_eval`."""
        return cls(
            config.backbone,
            drop_path_rate=getattr(config, "drop_path_rate", 0.0),
            norm_eval=getattr(config, "norm_eval", False),
        )

    def train(self, mode: bool = True) -> EfficientFormerV2Backbone:
        super().train(mode)
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward(self, pixel_values: torch.Tensor, output_attentions: bool = False) -> EncoderOutput:
        if output_attentions:
            raise no_attentions_error("EfficientFormerV2")
        # Channels-last throughout: oneDNN's depthwise convolutions and ATen's bilinear upsampling are faster on it
        # (docs/speed.md); the stage outputs are channels-last too.
        x = self.stem(pixel_values.contiguous(memory_format=torch.channels_last))  # (B, C0, H/4, W/4)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return EncoderOutput(feature_maps=tuple(features))

    def load_pretrained(self, name_or_path: str) -> list[str]:
        """ImageNet (or other) weights from a local timm state-dict file (`.safetensors`, `.pth`, `.bin`, read
        without executing pickled code) or a timm model name such as `"efficientformerv2_s1.snap_dist_in1k"`, which
        timm downloads. Returns the checkpoint keys not used (see `load_timm_state_dict`)."""
        if os.path.isfile(name_or_path):
            state_dict = timm.models.load_state_dict(name_or_path, weights_only=True)
        else:
            state_dict = timm.create_model(name_or_path, pretrained=True).state_dict()
        return self.load_timm_state_dict(state_dict)

    def load_timm_state_dict(self, state_dict: dict[str, torch.Tensor]) -> list[str]:
        """Load a timm EfficientFormerV2 state dict (e.g. ImageNet weights); returns the keys not used.

        The classifier (`norm`, `head`, `head_dist`) is dropped. Attention-bias tables whose shape differs (timm's
        ImageNet models are built for 224x224, a 7x7 grid) are left at their current values, as the official
        backbone does: it loads ImageNet weights but trains its 512x512 biases from zero. Any other missing or
        mismatched key is an error.
        """
        own = self.state_dict()
        unused = [k for k in state_dict if k.startswith(CLASSIFIER_KEYS)]
        selected = {k: v for k, v in state_dict.items() if not k.startswith(CLASSIFIER_KEYS)}
        for key, value in list(selected.items()):
            if key.endswith("attention_biases") and key in own and own[key].shape != value.shape:
                unused.append(key)
                del selected[key]
        skipped_biases = {k for k in unused if k.endswith("attention_biases")}
        require_fit(
            own, selected, "State dict does not fit the EfficientFormerV2 backbone", skipped_biases.__contains__
        )
        self.load_state_dict(selected, strict=False)
        return unused
