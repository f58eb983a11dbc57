"""The package version (one place, below everything else)."""

__version__ = "0.1.0"
