"""Plain top-k: EViT without fusion, the simple baseline Haurum et al. found hard to beat.

At the chosen blocks, keep the ceil(keep_rate * n) patch tokens with the highest head-averaged
CLS attention and drop the rest (their patches map to -1 in the source map).
"""
from vitslim.methods.base import register
from vitslim.methods.evit import EViT


@register
class TopK(EViT):
    """CLS-attention top-k pruning; same knobs as EViT."""

    name = "topk"
    fuse = False
