"""Layer 0 file and weight plumbing: the one atomic file writer and the one strict state-dict check.

Every file vitslim writes goes through ``atomic_write``: the bytes land in a uniquely named
temporary file beside the target, are flushed to disk and renamed over it, so a reader (or a
crash at any moment) sees either the old file or the new one, never half of one; two writers of
the same path never share a temporary file. Only the standard library and torch are used here.
"""
from __future__ import annotations

import os
import pathlib
import tempfile
from typing import BinaryIO, Callable, Mapping

import torch
from torch import nn

from vitslim.errors import VitslimError


def _umask() -> int:
    # mkstemp creates files 0600; the written file should get the permissions an ordinary open()
    # would give it. Reading the umask means setting it, so do it once, at import.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], None]) -> pathlib.Path:
    """Write ``data`` (bytes, text as UTF-8, or a callable that writes into a binary file) to ``path`` atomically."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path



def write_png(fig, path: str | os.PathLike, dpi: int = 100) -> pathlib.Path:
    """Save a matplotlib figure as PNG with ``atomic_write``, then close it (also when saving fails)."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    finally:
        plt.close(fig)

def _fsync_dir(folder: pathlib.Path) -> None:
    """Make the rename itself durable; best effort (not every platform can open a directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def state_mismatch(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                   ignore: frozenset[str] = frozenset()) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, wrong-shape) keys of ``state`` against a model's own state dict, in model order."""
    missing = [k for k in own if k not in state and k not in ignore]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    return missing, unexpected, wrong


def load_state_strict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """load_state_dict with every key and shape checked first, and a message that says what differs."""
    missing, unexpected, wrong = state_mismatch(model.state_dict(), state)
    if missing or unexpected or wrong:
        detail = "; ".join(f"{what}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                           for what, keys in (("missing", missing), ("unexpected", unexpected),
                                              ("wrong shape", wrong)) if keys)
        raise VitslimError(f"the checkpoint's weights do not fit the model ({detail}); was it trained with "
                           f"another architecture or method?")
    model.load_state_dict(state)
