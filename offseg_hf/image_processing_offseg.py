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

    def to_dict(self) -> dict:
        # The class is named by the model's config.json (`auto_map["AutoImageProcessor"]`, see
        # configuration_offseg.AUTO_MAP), not here: transformers derives a *video* processor from an `auto_map` found
        # in preprocessor_config.json, which makes `pipeline(...)` on a saved folder ask whether to run custom code,
        # and a processor type here would stop AutoImageProcessor from reading config.json where the package is not
        # installed. Without either, it reads config.json (the registered class, or the folder's code).
        output = super().to_dict()
        output.pop("auto_map", None)
        output.pop("image_processor_type", None)
        return output


__all__ = ["OffSegImageProcessor"]
