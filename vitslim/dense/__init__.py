"""Dense prediction: full-grid features from patched models (``features``) and segmentation metrics."""
from vitslim.dense.features import RESTORES, features
from vitslim.dense.metrics import ConfusionMatrix

__all__ = ["RESTORES", "features", "ConfusionMatrix"]
