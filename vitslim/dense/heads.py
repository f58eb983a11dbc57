"""Segmentation heads on full-grid ViT features, and the model that puts backbone and head together.

- ``LinearHead``: one linear map per patch from the backbone width to the classes (Segmenter's linear
  decoder, the usual linear probe).
- ``MaskTransformer``: Segmenter's mask transformer (Strudel et al., ICCV 2021): the patch features,
  projected to the decoder width, and one learned embedding per class go through transformer layers
  together (2 by default); each class's mask is the scalar product of the L2-normalised patch and
  class features, then a LayerNorm over the classes.
``SegmentationModel`` runs a (patched or plain) timm ViT through ``vitslim.dense.features`` and the head,
and upsamples the logits bilinearly to the input image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from vitslim.dense.features import features_and_state
from vitslim.errors import VitslimError


class LinearHead(nn.Module):
    """Per-patch linear classifier: (B, C, H, W) features -> (B, K, H, W) logits."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.num_classes, self._spec = num_classes, dict(kind="linear", dim=dim, num_classes=num_classes)
        self.classifier = nn.Linear(dim, num_classes)
        trunc_normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def spec(self) -> dict:
        """``build_head`` arguments that rebuild this head (stored in checkpoints)."""
        return dict(self._spec)

    def forward(self, fmap: Tensor) -> Tensor:
        """Logits on the patch grid."""
        return self.classifier(fmap.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class MaskTransformer(nn.Module):
    """Segmenter's mask transformer: class embeddings decoded jointly with the patch tokens."""

    def __init__(self, dim: int, num_classes: int, *, depth: int = 2, width: int | None = None,
                 num_heads: int | None = None, drop_path: float = 0.0):
        super().__init__()
        width = width or dim
        num_heads = num_heads or max(1, width // 64)
        self.num_classes = num_classes
        self._spec = dict(kind="mask", dim=dim, num_classes=num_classes, depth=depth, width=width,
                          num_heads=num_heads, drop_path=drop_path)
        self.proj_in = nn.Linear(dim, width)
        self.class_embed = nn.Parameter(torch.zeros(1, num_classes, width))
        self.blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path=drop_path)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.proj_patch = nn.Parameter(torch.randn(width, width) * width ** -0.5)
        self.proj_classes = nn.Parameter(torch.randn(width, width) * width ** -0.5)
        self.mask_norm = nn.LayerNorm(num_classes)
        trunc_normal_(self.class_embed, std=0.02)
        self.apply(_init_linear)

    def spec(self) -> dict:
        """``build_head`` arguments that rebuild this head (stored in checkpoints)."""
        return dict(self._spec)

    def forward(self, fmap: Tensor) -> Tensor:
        """(B, C, H, W) features -> (B, K, H, W) mask logits."""
        b, _, h, w = fmap.shape
        x = self.proj_in(fmap.flatten(2).transpose(1, 2))
        x = torch.cat([x, self.class_embed.expand(b, -1, -1)], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        patches, classes = x[:, : h * w] @ self.proj_patch, x[:, h * w:] @ self.proj_classes
        masks = F.normalize(patches, dim=-1) @ F.normalize(classes, dim=-1).transpose(1, 2)
        return self.mask_norm(masks).transpose(1, 2).reshape(b, self.num_classes, h, w)


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


HEADS = {"linear": LinearHead, "mask": MaskTransformer}


class SegmentationModel(nn.Module):
    """A timm ViT backbone (patched or not) and a head: images (B, 3, H, W) -> logits (B, K, H, W)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, *, restore: str = "dropped"):
        super().__init__()
        self.backbone, self.head, self.restore = backbone, head, restore

    @property
    def num_classes(self) -> int:
        """The head's class count."""
        return self.head.num_classes

    def forward(self, images: Tensor) -> Tensor:
        """Full-grid features, the head, then bilinear upsampling to the image size."""
        return self.forward_parts(images)[0]

    def forward_parts(self, images: Tensor) -> tuple[Tensor, Tensor, list]:
        """(logits at the image size, full-grid features, the method's aux list) for training."""
        fmap, state = features_and_state(self.backbone, images, restore=self.restore)
        return upsample(self.head(fmap), images.shape[-2:]), fmap, state.aux if state is not None else []

    def grid_logits(self, images: Tensor) -> Tensor:
        """The head's logits (B, K, h, w) on the patch grid, before upsampling (``upsample`` gives ``forward``'s)."""
        return self.head(features_and_state(self.backbone, images, restore=self.restore)[0])

    def no_weight_decay(self) -> set[str]:
        """The backbone's no-decay names (position embedding, tokens) and the head's class embeddings."""
        names = {f"backbone.{n}" for n in getattr(self.backbone, "no_weight_decay", lambda: set())()}
        return names | {f"head.{n}" for n, _ in self.head.named_parameters() if n == "class_embed"}


def upsample(logits: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Logits (B, K, h, w) resized bilinearly to ``size``: how predictions reach the image and the masks."""
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def build_head(kind: str, dim: int, num_classes: int, **kwargs) -> nn.Module:
    """A head by name: "linear" or "mask" (Segmenter's mask transformer)."""
    if kind not in HEADS:
        raise VitslimError(f"head must be one of {', '.join(HEADS)}, got {kind!r}")
    return HEADS[kind](dim, num_classes, **kwargs)
