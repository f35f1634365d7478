"""Image processor for OffSeg: `transformers`' SegFormer processor, converting any input to RGB, with the resize of the
logits to the image done in row bands (bounded memory, the same label map)."""

from __future__ import annotations

import torch
from transformers.models.segformer.image_processing_segformer import SegformerImageProcessor

from .resize_bands import resize_argmax


class OffSegImageProcessor(SegformerImageProcessor):
    """SegFormer's image processor (resize to 512x512, ImageNet mean/std, optional label reduction) with RGB
    conversion on by default, so grayscale and RGBA images give the 3-channel input the model expects.

    `post_process_semantic_segmentation(outputs, target_sizes)` resizes the logits bilinearly to each target
    size before the argmax, whatever resolution the model's logits have (1/8 for SegFormer-offset), as SegFormer's
    does, but a band of rows at a time (`offseg_hf.models.resize_bands`): the same label maps without the (K, H, W)
    resized
    logits, whose size grows with the image (7.3 GB for a 12 MP photo at 150 classes). `resize_budget_mb` (an
    argument here or of the call) caps the bands' working memory; unset, $OFFSEG_RESIZE_BUDGET_MB, else 256 MiB.
    """

    do_convert_rgb = True
    resize_budget_mb = None

    def post_process_semantic_segmentation(
        self,
        outputs,
        target_sizes: list[tuple] | None = None,
        return_segmentation_scores: bool = False,
        resize_budget_mb: float | None = None,
    ):
        """SegFormer's post-processing: per image, the logits resized to `target_sizes[i]` (bilinear) and their
        argmax, (H, W) int64; computed in row bands. Without target sizes (the argmax at the logits' size) or with
        `return_segmentation_scores` (which returns the (K, H, W) resized logits themselves), SegFormer's own."""
        if target_sizes is None or return_segmentation_scores:
            return super().post_process_semantic_segmentation(outputs, target_sizes, return_segmentation_scores)
        logits = outputs.logits
        if len(logits) != len(target_sizes):
            raise ValueError("Make sure that you pass in as many target sizes as the batch dimension of the logits")
        budget = self.resize_budget_mb if resize_budget_mb is None else resize_budget_mb
        if isinstance(target_sizes, torch.Tensor):
            target_sizes = target_sizes.tolist()
        return [
            resize_argmax(image_logits, tuple(size), budget_mb=budget).label_map
            for image_logits, size in zip(logits, target_sizes, strict=True)
        ]

    def post_process_label_map_and_scores(
        self, logits: torch.Tensor, target_size: tuple[int, int], scores: str = "softmax"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's (K, h, w) logits -> its label map (H, W) at `target_size` and each class's mean score over
        the pixels it wins, (K,) float64 (NaN for classes it wins none): "softmax" scores for logits, "normalised"
        for non-negative class maps (Mask2Former). Row bands as above; what the Inference Endpoints handler reports.
        """
        result = resize_argmax(logits, tuple(target_size), scores=scores, budget_mb=self.resize_budget_mb)
        return result.label_map, result.scores

    def to_dict(self) -> dict:
        # The class is named by the model's config.json (`auto_map["AutoImageProcessor"]`, see
        # configuration_offseg.AUTO_MAP), not here: transformers derives a *video* processor from an `auto_map` found
        # in preprocessor_config.json, which makes `pipeline(...)` on a saved folder ask whether to run custom code,
        # and a processor type here would stop AutoImageProcessor from reading config.json where the package is not
        # installed. Without either, it reads config.json (the registered class, or the folder's code).
        output = super().to_dict()
        output.pop("auto_map", None)
        output.pop("image_processor_type", None)
        if output.get("resize_budget_mb") is None:  # unset: the environment's or the default budget, decided at use
            output.pop("resize_budget_mb", None)
        return output


__all__ = ["OffSegImageProcessor"]
