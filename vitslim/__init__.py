"""vitslim: token and channel compression for timm Vision Transformers."""
from vitslim import _compat  # noqa: F401  (must run before timm is imported anywhere)

from vitslim._version import __version__

from vitslim.errors import VitslimError
from vitslim.methods import methods
from vitslim.patch import describe, is_patched, patch, unpatch
from vitslim.tokens import TokenState, unmerge, unmerge_grid

__all__ = ["VitslimError", "TokenState", "methods", "patch", "unpatch", "describe", "is_patched",
           "unmerge", "unmerge_grid", "count_macs", "load", "auto"]


def __getattr__(name: str):
    # measurement pulls in more of torch; load it on first use
    if name == "count_macs":
        from vitslim.measure.macs import count_macs

        return count_macs
    if name == "load":
        from vitslim.train.checkpoint import load

        return load
    if name == "auto":
        from vitslim.autosearch import auto

        return auto
    if name == "measure":
        import vitslim.measure as measure

        return measure
    raise AttributeError(f"module 'vitslim' has no attribute {name!r}")
