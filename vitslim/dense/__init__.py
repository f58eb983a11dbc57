"""Dense prediction: full-grid features from patched models, segmentation data and metrics."""
from vitslim.dense.data import IGNORE, LAYOUTS, PairedTransform, SegmentationFolder
from vitslim.dense.features import RESTORES, features
from vitslim.dense.metrics import ConfusionMatrix

__all__ = ["IGNORE", "LAYOUTS", "PairedTransform", "SegmentationFolder", "RESTORES", "features", "ConfusionMatrix"]
