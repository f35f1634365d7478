"""The modeling code a Hub repo carries: configurations, models, backbones, decode heads, offset learning, FreqFusion,
the loss and the image processor.

Every module here imports only `torch`, `transformers`, `timm`, `safetensors`, the standard library and its
neighbours in this folder (relative, one level: `from .x import y`). That is what `save_pretrained` copies beside the
weights and what `trust_remote_code=True` loads where offseg-hf is not installed (`tests/test_layering.py`).
"""
