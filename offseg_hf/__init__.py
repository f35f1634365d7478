"""offseg-hf: Offset Learning and OffSeg (ICCV 2025) as Hugging Face Transformers models."""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForSemanticSegmentation,
)

from .models.configuration_mask2former import MASK2FORMER_PAPER_FIGURES, MASK2FORMER_VARIANTS, OffSegMask2FormerConfig
from .models.configuration_offseg import PAPER_FIGURES, VARIANTS, OffSegConfig
from .models.image_processing_offseg import OffSegImageProcessor
from .models.modeling_mask2former import OffSegMask2FormerForSemanticSegmentation
from .models.modeling_offseg import (
    OffSegForSemanticSegmentation,
    OffSegModel,
    OffSegModelOutput,
    OffSegPreTrainedModel,
    OffSegSemanticSegmenterOutput,
)
from .models.offset_learning import MaskOffsetLearning, OffsetLearning, PerPixelClassifier

__version__ = "0.1.0"


def _register_auto_classes() -> None:
    """The one place OffSeg meets transformers' Auto classes, through their public registration APIs.

    `Auto*.register` makes `AutoConfig`/`AutoModel`/`AutoModelForSemanticSegmentation`/`AutoImageProcessor` (and so
    `pipeline`) resolve OffSeg folders when this package is imported; `register_for_auto_class` makes
    `save_pretrained` copy the code files, so a saved folder also loads with `trust_remote_code=True` where the
    package is not installed (the folder's `auto_map` is `configuration_offseg.AUTO_MAP`).
    """
    AutoConfig.register(OffSegConfig.model_type, OffSegConfig, exist_ok=True)
    AutoModel.register(OffSegConfig, OffSegModel, exist_ok=True)
    AutoModelForSemanticSegmentation.register(OffSegConfig, OffSegForSemanticSegmentation, exist_ok=True)
    AutoImageProcessor.register(
        OffSegConfig, image_processor_classes={"torchvision": OffSegImageProcessor}, exist_ok=True
    )
    OffSegConfig.register_for_auto_class()
    OffSegModel.register_for_auto_class("AutoModel")
    OffSegForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
    # Mask2Former with offset learning: its own config class on transformers' Mask2Former.
    AutoConfig.register(OffSegMask2FormerConfig.model_type, OffSegMask2FormerConfig, exist_ok=True)
    AutoModelForSemanticSegmentation.register(
        OffSegMask2FormerConfig, OffSegMask2FormerForSemanticSegmentation, exist_ok=True
    )
    AutoImageProcessor.register(
        OffSegMask2FormerConfig, image_processor_classes={"torchvision": OffSegImageProcessor}, exist_ok=True
    )
    OffSegMask2FormerConfig.register_for_auto_class()
    OffSegMask2FormerForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")


_register_auto_classes()

__all__ = [
    "MASK2FORMER_PAPER_FIGURES",
    "MASK2FORMER_VARIANTS",
    "MaskOffsetLearning",
    "OffSegConfig",
    "OffSegMask2FormerConfig",
    "OffSegMask2FormerForSemanticSegmentation",
    "OffSegForSemanticSegmentation",
    "OffSegImageProcessor",
    "OffSegModel",
    "OffSegModelOutput",
    "OffSegSemanticSegmenterOutput",
    "OffSegPreTrainedModel",
    "OffsetLearning",
    "PAPER_FIGURES",
    "PerPixelClassifier",
    "VARIANTS",
]
