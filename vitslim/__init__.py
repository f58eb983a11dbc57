"""vitslim: token and channel compression for timm Vision Transformers."""
from vitslim import _compat  # noqa: F401  (must run before timm is imported anywhere)

__version__ = "0.1.0"
