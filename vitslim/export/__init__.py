"""Deployment: structural slicing of channel-pruned models and their safetensors save/load (``channels``)."""
from vitslim.export.channels import (CHANNEL_METHODS, channel_counts, load, metadata, resize_block, save,
                                     slice_block, slim)

__all__ = ["CHANNEL_METHODS", "channel_counts", "load", "metadata", "resize_block", "save", "slice_block", "slim"]
