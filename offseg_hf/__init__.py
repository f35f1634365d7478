"""offseg-hf: Offset Learning and OffSeg (ICCV 2025) as Hugging Face Transformers models."""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForSemanticSegmentation,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES

from .configuration_offseg import PAPER_FIGURES, VARIANTS, OffSegConfig
from .image_processing_offseg import OffSegImageProcessor
from .modeling_offseg import (
    OffSegForSemanticSegmentation,
    OffSegModel,
    OffSegModelOutput,
    OffSegPreTrainedModel,
)
from .offset_learning import OffsetLearning, PerPixelClassifier

__version__ = "0.1.0"

AutoConfig.register(OffSegConfig.model_type, OffSegConfig, exist_ok=True)
AutoModel.register(OffSegConfig, OffSegModel, exist_ok=True)
AutoModelForSemanticSegmentation.register(OffSegConfig, OffSegForSemanticSegmentation, exist_ok=True)
AutoImageProcessor.register(OffSegConfig, image_processor_classes={"torchvision": OffSegImageProcessor}, exist_ok=True)

# The image-segmentation pipeline checks model names against this static table rather than the registry
# above; without the entry it logs a spurious "not supported" error for OffSeg.
MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES.setdefault(OffSegConfig.model_type, "OffSegForSemanticSegmentation")

# save_pretrained then writes the code and an `auto_map`, so `trust_remote_code=True` loads a saved folder
# where this package is not installed.
OffSegConfig.register_for_auto_class()
OffSegModel.register_for_auto_class("AutoModel")
OffSegForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
OffSegImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "OffSegConfig",
    "OffSegForSemanticSegmentation",
    "OffSegImageProcessor",
    "OffSegModel",
    "OffSegModelOutput",
    "OffSegPreTrainedModel",
    "OffsetLearning",
    "PAPER_FIGURES",
    "PerPixelClassifier",
    "VARIANTS",
]
