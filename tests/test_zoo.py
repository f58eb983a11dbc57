"""vitslim.zoo: every model loading path, its errors, and the embedded default model."""
import json
import pathlib
import socket
import threading
import time

import pytest
import torch

import vitslim  # noqa: F401  (torchvision shim before timm)
import timm
from safetensors.torch import save_file

from vitslim import data, zoo
from vitslim.errors import VitslimError

SMALL = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=10)
NAME = "vit_tiny_patch16_224"  # built with SMALL overrides: fast on CPU


def _reference_model_dir() -> pathlib.Path:
    root = data.data_root()
    folder = root.parent / "models" / "cifar10-vit-d12w128" if root else None
    if folder is None or not (folder / "model.safetensors").is_file():
        pytest.skip("shared/models/cifar10-vit-d12w128 is not available")
    return folder


def _random_small(**overrides) -> torch.nn.Module:
    torch.manual_seed(1)
    model = timm.create_model(NAME, **{**SMALL, **overrides})
    with torch.no_grad():  # non-default values everywhere, so a load that skips a tensor shows
        for p in model.parameters():
            p.normal_()
    return model.eval()


def _same_weights(a: torch.nn.Module, b: torch.nn.Module, skip=()) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa if k not in skip)


def _error(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(VitslimError, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# --- cache dir and names ----------------------------------------------------------------------------


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VITSLIM_CACHE", str(tmp_path / "c"))
    assert zoo.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("VITSLIM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zoo.cache_dir() == tmp_path / "xdg" / "vitslim"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert zoo.cache_dir() == tmp_path / "home" / ".cache" / "vitslim"


def test_timm_name_random_init_in_eval_mode():
    model = zoo.load_model(NAME, **SMALL)
    assert not model.training
    assert len(model.blocks) == 2 and model.head.out_features == 10
    assert model.patch_embed.num_patches == 64
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_unknown_name_suggests_matches():
    message = _error("unknown timm model", zoo.load_model, "deit_smal_patch16_224")
    assert "deit_small_patch16_224" in message and "list_models" in message


def test_bad_model_option_is_one_line_error():
    _error("cannot build timm model", zoo.load_model, NAME, no_such_option=3)


# --- pretrained weights from the hub ----------------------------------------------------------------


def test_pretrained_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    message = _error("unreachable", zoo.load_model, "deit_tiny_patch16_224", pretrained=True)
    assert time.perf_counter() - start < 10
    assert "--checkpoint PATH" in message and "HF_HUB_OFFLINE" in message


def test_pretrained_probe_gives_up_on_a_hanging_network(monkeypatch):
    # Without HF_HUB_OFFLINE the probe must not wait for DNS retries: simulate a connect that hangs.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    release = threading.Event()

    def hang(*args, **kwargs):
        release.wait(60)
        raise OSError("timed out")

    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.perf_counter()
    try:
        message = _error("unreachable", zoo.load_model, "deit_tiny_patch16_224", pretrained=True)
    finally:
        release.set()
    assert time.perf_counter() - start < 10
    assert "huggingface.co" in message and "--checkpoint" in message


def test_pretrained_probe_reports_refused_connection(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the probe dials port 443 on this host

    def refuse(*args, **kwargs):
        raise ConnectionRefusedError("refused")

    monkeypatch.setattr(socket, "create_connection", refuse)
    _error(r"127\.0\.0\.1\) is unreachable: refused", zoo.load_model, NAME, pretrained=True)


def test_pretrained_loads_offline_from_the_hub_cache(monkeypatch, tmp_path):
    # Weights already in the Hugging Face cache load through timm's real hub path, offline.
    import huggingface_hub.constants

    body = {k: v for k, v in SMALL.items() if k != "num_classes"}  # the hub checkpoint has 1000 classes
    source = _random_small(**body, num_classes=1000)
    hub_id = timm.models.get_pretrained_cfg(NAME).hf_hub_id
    repo = tmp_path / ("models--" + hub_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(source.state_dict(), str(repo / "snapshots" / ("0" * 40) / "model.safetensors"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _same_weights(zoo.load_model(NAME, pretrained=True, **body), source)


# --- local checkpoints ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "pth-wrapped"])
def test_checkpoint_file_loads_exactly(tmp_path, fmt):
    source = _random_small()
    path = tmp_path / f"weights.{fmt.split('-')[0]}"
    if fmt == "safetensors":
        save_file(source.state_dict(), str(path))
    elif fmt == "pth":
        torch.save(source.state_dict(), path)
    else:  # a training checkpoint: wrapped, with a DataParallel prefix and extra entries
        torch.save({"model": {"module." + k: v for k, v in source.state_dict().items()}, "epoch": 3}, path)
    model = zoo.load_model(NAME, checkpoint=str(path), **SMALL)
    assert not model.training and _same_weights(model, source)
    assert not _same_weights(zoo.load_model(NAME, **SMALL), source)


def test_checkpoint_with_new_num_classes_keeps_the_body(tmp_path):
    source = _random_small()
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    model = zoo.load_model(NAME, checkpoint=str(tmp_path / "w.safetensors"), **{**SMALL, "num_classes": 5})
    assert model.head.out_features == 5
    body = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in body.items())


def test_timm_model_folder_as_spec_and_as_checkpoint(tmp_path):
    source = _random_small()
    timm.models.save_for_hf(source, str(tmp_path / "folder"), safe_serialization=True)
    folder = str(tmp_path / "folder")
    assert _same_weights(zoo.load_model(folder), source)
    assert _same_weights(zoo.load_model(checkpoint=folder), source)  # the folder brings its architecture
    assert _same_weights(zoo.load_model(NAME, checkpoint=folder, **SMALL), source)


def test_reference_model_folder_matches_timm_local_dir():
    folder = _reference_model_dir()
    model = zoo.load_model(str(folder))
    expected = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert not model.training and _same_weights(model, expected)
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["input_size"] == (3, 32, 32) and cfg["mean"][0] == pytest.approx(0.4914)
    assert len(model.blocks) == 12 and model.patch_embed.num_patches == 64


# --- bad checkpoints ------------------------------------------------------------------------------


def test_missing_checkpoint(tmp_path):
    _error("does not exist", zoo.load_model, NAME, checkpoint=str(tmp_path / "nope.safetensors"), **SMALL)


@pytest.mark.parametrize("suffix", ["safetensors", "pth"])
def test_truncated_checkpoint(tmp_path, suffix):
    path = tmp_path / f"w.{suffix}"
    state = _random_small().state_dict()
    save_file(state, str(path)) if suffix == "safetensors" else torch.save(state, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _error("corrupt, truncated", zoo.load_model, NAME, checkpoint=str(path), **SMALL)


def test_checkpoint_with_code_is_never_unpickled(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weights": torch.zeros(1), "hook": pathlib.Path("x")}, path)  # an arbitrary class instance
    _error("corrupt, truncated or not a weights file", zoo.load_model, NAME, checkpoint=str(path), **SMALL)


def test_checkpoint_of_another_depth(tmp_path):
    save_file(_random_small(depth=3).state_dict(), str(tmp_path / "w.safetensors"))
    message = _error("does not fit", zoo.load_model, NAME, checkpoint=str(tmp_path / "w.safetensors"), **SMALL)
    assert "0 missing" in message and "12 unexpected (e.g. blocks.2." in message
    assert "depth 3, width 64" in message


def test_checkpoint_of_another_width(tmp_path):
    save_file(_random_small(embed_dim=128).state_dict(), str(tmp_path / "w.safetensors"))
    message = _error("other shapes", zoo.load_model, NAME, checkpoint=str(tmp_path / "w.safetensors"), **SMALL)
    assert "width 128" in message


def test_checkpoint_with_other_classes_suggests_num_classes(tmp_path):
    save_file(_random_small(num_classes=7).state_dict(), str(tmp_path / "w.safetensors"))
    body = {k: v for k, v in SMALL.items() if k != "num_classes"}  # so the model has timm's 1000 classes
    _error("pass num_classes=7", zoo.load_model, NAME, checkpoint=str(tmp_path / "w.safetensors"), **body)


def test_weights_file_or_plain_folder_as_model(tmp_path):
    save_file(_random_small().state_dict(), str(tmp_path / "w.safetensors"))
    _error("is a weights file, not a model", zoo.load_model, str(tmp_path / "w.safetensors"))
    _error("no config.json", zoo.load_model, str(tmp_path))
    _error("does not exist", zoo.load_model, str(tmp_path / "missing"))


# --- the embedded default -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def default_first():
    """The first default_model() call of the session (trains unless the cache already holds it)."""
    start = time.perf_counter()
    model = zoo.default_model()
    return model, time.perf_counter() - start


def test_default_model_architecture_and_preprocessing(default_first):
    model, _ = default_first
    assert isinstance(model, timm.models.VisionTransformer) and not model.training
    assert model.global_pool == "token" and model.cls_token is not None
    assert model.patch_embed.num_patches == 196 and len(model.blocks) == 4
    assert model.embed_dim == 64 and model.blocks[0].attn.head_dim == 16
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["input_size"] == (1, 28, 28) and tuple(cfg["mean"]) == data.DIGITS_DATA_CFG["mean"]


def test_default_model_accuracy_and_cached_record(default_first):
    model, _ = default_first
    loader = data.build_loader("digits", model=model, batch_size=128)  # the generic PIL + timm transform path
    correct = total = 0
    with torch.no_grad():
        for images, labels in loader:
            correct += (model(images).argmax(1) == labels).sum().item()
            total += len(labels)
    assert total == 360 and correct / total >= 0.95
    config = json.loads((zoo.cache_dir() / zoo.DEFAULT_NAME / "config.json").read_text())
    assert config["vitslim"]["test_accuracy"] == pytest.approx(correct / total, abs=1e-3)
    assert config["vitslim"]["recipe"]["epochs"] == zoo.DEFAULT_RECIPE["epochs"]


def test_default_model_second_call_loads_the_cache(default_first, monkeypatch):
    model, _ = default_first
    monkeypatch.setattr(zoo, "train_default_model", lambda *a, **k: pytest.fail("retrained a cached model"))
    start = time.perf_counter()
    again = zoo.load_model("default")
    assert time.perf_counter() - start < 5
    assert again is not model and _same_weights(again, model)


def test_default_with_new_num_classes(default_first):
    model = zoo.load_model("default", num_classes=3)
    assert model.head.out_features == 3
    assert torch.equal(model.pos_embed, default_first[0].pos_embed)


def _session_default_folder(default_first) -> pathlib.Path:
    return zoo.cache_dir() / zoo.DEFAULT_NAME  # before the test points VITSLIM_CACHE elsewhere


def test_corrupt_cache_is_retrained_and_replaced_atomically(monkeypatch, tmp_path, default_first):
    session_folder = _session_default_folder(default_first)
    monkeypatch.setenv("VITSLIM_CACHE", str(tmp_path))
    calls = []

    def train(progress=True):
        calls.append(1)
        return zoo.load_model(str(session_folder)), dict(test_accuracy=1.0, train_seconds=0.0)

    monkeypatch.setattr(zoo, "train_default_model", train)
    folder = tmp_path / zoo.DEFAULT_NAME
    folder.mkdir()
    (folder / "config.json").write_text((session_folder / "config.json").read_text())
    (folder / "model.safetensors").write_bytes(b"\0" * 100)  # corrupt weights
    model = zoo.default_model()
    assert calls == [1] and _same_weights(model, default_first[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == [zoo.DEFAULT_NAME]  # no temp or old folders left
    zoo.default_model()
    assert calls == [1]  # the rewritten cache is read back, not retrained


def test_crash_while_caching_leaves_no_half_written_model(monkeypatch, tmp_path, default_first):
    session_folder = _session_default_folder(default_first)
    monkeypatch.setenv("VITSLIM_CACHE", str(tmp_path))
    monkeypatch.setattr(zoo, "train_default_model",
                        lambda progress=True: (zoo.load_model(str(session_folder)),
                                                               dict(test_accuracy=1.0, train_seconds=0.0)))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dumps", crash)  # dies after the weights file, before config.json
    with pytest.raises(KeyboardInterrupt):
        zoo.default_model()
    assert list(tmp_path.iterdir()) == []
