"""Training helpers: datasets, loaders and the recipes behind vitslim's bundled models."""
