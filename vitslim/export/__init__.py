"""Deployment: structural slicing of channel-pruned models and their safetensors save/load (``channels``)."""
from vitslim.export.channels import channel_counts, load, metadata, resize_block, save, slice_block, slim

__all__ = ["channel_counts", "load", "metadata", "resize_block", "save", "slice_block", "slim"]
