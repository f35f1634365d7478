"""Data: segmentation data sets from the Hub, local folders and the ADE20K layout (`datasets.py`), the mmseg
augmentation pipeline (`transforms.py`) and the synthetic demo set (`demo.py`)."""
