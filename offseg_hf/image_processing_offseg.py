"""Image processor for OffSeg: `transformers`' SegFormer processor, converting any input to RGB."""

from __future__ import annotations

from transformers.models.segformer.image_processing_segformer import SegformerImageProcessor


class OffSegImageProcessor(SegformerImageProcessor):
    """SegFormer's image processor (resize to 512x512, ImageNet mean/std, optional label reduction) with RGB
    conversion on by default, so grayscale and RGBA images give the 3-channel input the model expects.

    `post_process_semantic_segmentation(outputs, target_sizes)` resizes the logits bilinearly to each target
    size before the argmax, whatever resolution the model's logits have (1/8 for SegFormer-offset).
    """

    do_convert_rgb = True


__all__ = ["OffSegImageProcessor"]
