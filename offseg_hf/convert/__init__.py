"""Official mmseg checkpoints into this package's format (`official.py`: one rule table per family), and the one
door to a preset that starts from ImageNet weights (`from_pretrained_encoder`). Command line: `python -m
offseg_hf.convert`."""

from .official import convert_state_dict, from_pretrained_encoder, load_official_checkpoint, official_key

__all__ = ["convert_state_dict", "from_pretrained_encoder", "load_official_checkpoint", "official_key"]
