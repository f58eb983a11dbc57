"""Fine-tuning: ``fit`` (one process or torchrun/DDP), losses, recipes, checkpoints."""
from vitslim.train.checkpoint import load, read_checkpoint, save_checkpoint
from vitslim.train.config import RECIPES, TrainConfig
from vitslim.train.engine import fit, teacher_copy
from vitslim.train.losses import AuxLoss, Criterion, TokenTarget

__all__ = ["fit", "TrainConfig", "RECIPES", "load", "read_checkpoint", "save_checkpoint", "teacher_copy", "AuxLoss",
           "TokenTarget", "Criterion"]
