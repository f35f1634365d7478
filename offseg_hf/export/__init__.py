"""Leaving Python: ONNX export and ONNX Runtime inference (`onnx.py`), the export-friendly forms of `transformers`
modules that the exporters need (`segformer.py`, `swin.py`), and BatchNorm folding for inference (`batchnorm.py`).
Command line: `python -m offseg_hf.export`."""

from .batchnorm import fuse_for_inference

__all__ = ["fuse_for_inference"]
