"""Dense prediction: full-grid features from patched models, segmentation data, heads and metrics."""
from vitslim.dense.data import IGNORE, LAYOUTS, PairedTransform, SegmentationFolder
from vitslim.dense.features import RESTORES, features
from vitslim.dense.heads import HEADS, LinearHead, MaskTransformer, SegmentationModel, build_head
from vitslim.dense.metrics import ConfusionMatrix, evaluate_segmentation

__all__ = ["IGNORE", "LAYOUTS", "PairedTransform", "SegmentationFolder", "RESTORES", "features", "HEADS",
           "LinearHead", "MaskTransformer", "SegmentationModel", "build_head", "ConfusionMatrix",
           "evaluate_segmentation"]
