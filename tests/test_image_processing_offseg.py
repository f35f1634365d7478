"""OffSegImageProcessor (offseg_hf/models/image_processing_offseg.py)."""

import numpy as np
import torch
from PIL import Image

from offseg_hf import OffSegImageProcessor


def test_image_processor_converts_to_rgb_and_post_processes_to_any_size(tiny_model):
    processor = OffSegImageProcessor(size={"height": 64, "width": 64})
    gray = Image.fromarray(np.full((40, 30), 128, dtype=np.uint8), mode="L")
    pixel_values = processor(gray, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 64, 64)
    with torch.no_grad():
        outputs = tiny_model(pixel_values=pixel_values)
    (seg,) = processor.post_process_semantic_segmentation(outputs, target_sizes=[(123, 45)])
    assert seg.shape == (123, 45) and seg.dtype == torch.int64


def test_saved_processor_names_no_class_of_its_own(tmp_path):
    """The model's config.json names the processor class (auto_map); a type or auto_map in
    preprocessor_config.json would make transformers derive a video processor and ask about custom code."""
    import json

    OffSegImageProcessor(size={"height": 64, "width": 64}).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert "auto_map" not in saved and "image_processor_type" not in saved
    assert saved["do_convert_rgb"] is True and saved["size"] == {"height": 64, "width": 64}
