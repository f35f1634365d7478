"""Evaluation as mmseg does it: whole-image and sliding-window inference (`inference.py`) and mIoU over a whole set
(`metrics.py`; `evaluate_metric/` is the same metric as an `evaluate` module)."""
