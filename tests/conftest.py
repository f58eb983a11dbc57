"""Test set-up: offline hub, the torchvision shim before timm, shared fixtures."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # an accidental download fails in 0.2 s, not 47 s

import pytest  # noqa: E402
import torch  # noqa: E402

import vitslim  # noqa: E402,F401  (installs the torchvision shim before timm)
import timm  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """Keep the embedded default model's cache out of the user's home, shared by the session."""
    if "VITSLIM_CACHE" not in os.environ:
        os.environ["VITSLIM_CACHE"] = str(tmp_path_factory.mktemp("vitslim-cache"))
    yield


def tiny_vit(**kwargs) -> torch.nn.Module:
    """A small random-init timm ViT (fast on CPU) with overrides."""
    args = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_classes=10)
    args.update(kwargs)
    return timm.models.vision_transformer.VisionTransformer(**args).eval()
