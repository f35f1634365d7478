"""Configuration of SegNeXt's MSCAN encoder: the `encoder_config` of the SegNeXt presets (kept apart from the
encoder's modules so that configurations import no modeling code)."""

from __future__ import annotations

from transformers import PreTrainedConfig


class MSCANConfig(PreTrainedConfig):
    r"""
    Configuration of an MSCAN encoder (the `encoder_config` of SegNeXt variants, model type `"mscan"`).

    Args:
        num_channels (`int`, *optional*, defaults to 3): input channels.
        hidden_sizes (`list[int]`, *optional*, defaults to `[32, 64, 160, 256]`): widths of the four stages.
        depths (`list[int]`, *optional*, defaults to `[3, 3, 5, 2]`): blocks per stage.
        mlp_ratios (`list[int]`, *optional*, defaults to `[8, 8, 4, 4]`): MLP expansion per stage.
        strip_kernel_sizes (`list[int]`, *optional*, defaults to `[7, 11, 21]`): lengths of the strip-convolution
            branches of the attention gate.
        drop_path_rate (`float`, *optional*, defaults to 0.1): stochastic depth, rising linearly over the blocks.
        hidden_dropout_prob (`float`, *optional*, defaults to 0.0): dropout inside the MLPs.
        layer_scale_init_value (`float`, *optional*, defaults to 0.01): initial value of the layer scales.
        norm_eval (`bool`, *optional*, defaults to `False`): keep the BatchNorms in eval mode while training
            (mmseg's `norm_eval`); the official SegNeXt runs train them.

    Defaults are MSCAN-T.
    """

    model_type = "mscan"

    num_channels: int = 3
    hidden_sizes: list[int] | tuple[int, ...] = (32, 64, 160, 256)
    depths: list[int] | tuple[int, ...] = (3, 3, 5, 2)
    mlp_ratios: list[int] | tuple[int, ...] = (8, 8, 4, 4)
    strip_kernel_sizes: list[int] | tuple[int, ...] = (7, 11, 21)
    drop_path_rate: float = 0.1
    hidden_dropout_prob: float = 0.0
    layer_scale_init_value: float = 1e-2
    norm_eval: bool = False


__all__ = ["MSCANConfig"]
