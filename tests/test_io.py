"""vitslim.io: the atomic file writer and the strict state-dict check every module shares."""
import os
import stat
import threading

import pytest
import torch

from conftest import tiny_vit
from vitslim.errors import VitslimError
from vitslim.io import atomic_write, load_state_strict, state_mismatch


@pytest.mark.parametrize("data,expected", [(b"\x00\x01bytes", b"\x00\x01bytes"), ("text é", "text é".encode()),
                                           (lambda f: f.write(b"from a callable"), b"from a callable")])
def test_atomic_write_bytes_text_and_callable(tmp_path, data, expected):
    path = atomic_write(tmp_path / "sub" / "out.bin", data)  # creates the folder
    assert path == tmp_path / "sub" / "out.bin" and path.read_bytes() == expected
    assert os.listdir(path.parent) == ["out.bin"]  # no temporary file left


def test_atomic_write_gives_ordinary_file_permissions(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    path = atomic_write(tmp_path / "report.md", "x")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0600


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_write(path, b"old")

    def crash(f):
        f.write(b"half of the new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["ckpt.pt"]


def test_concurrent_writers_never_share_a_temp_file(tmp_path):
    path, started = tmp_path / "shared.txt", threading.Barrier(4)

    def write(i):
        def body(f):
            started.wait()  # all four are inside their temporary files at once
            f.write(str(i).encode() * 1000)
        atomic_write(path, body)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    content = path.read_bytes()
    assert len(content) == 1000 and len(set(content)) == 1  # one writer's whole file, not a mix
    assert os.listdir(tmp_path) == ["shared.txt"]


def test_torch_save_through_a_callable(tmp_path):
    state = {"w": torch.arange(5.0)}
    path = atomic_write(tmp_path / "s.pt", lambda f: torch.save(state, f))
    assert torch.equal(torch.load(path, weights_only=True)["w"], state["w"])


def test_strict_loader_names_what_differs():
    model = tiny_vit(depth=2)
    state = tiny_vit(depth=3, embed_dim=32, num_heads=2).state_dict()
    missing, unexpected, wrong = state_mismatch(model.state_dict(), state)
    assert not missing and unexpected[0].startswith("blocks.2.") and "cls_token" in wrong
    with pytest.raises(VitslimError, match=r"unexpected: blocks\.2\..*wrong shape: cls_token"):
        load_state_strict(model, state)
    del state["cls_token"]
    assert state_mismatch(model.state_dict(), state, ignore=frozenset({"cls_token"}))[0] == []
    source = tiny_vit(depth=2)
    load_state_strict(model, source.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
