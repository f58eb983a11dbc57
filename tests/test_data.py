"""vitslim.data: dataset specs, layouts, transforms, subsets and their errors."""
import collections
import pathlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

import vitslim
import timm

from conftest import tiny_vit
from vitslim.errors import VitslimError
from vitslim import data

REPO = pathlib.Path(vitslim.__file__).resolve().parents[1]


def _shared(name: str) -> pathlib.Path:
    root = data.data_root()
    if root is None or not (root / name).is_dir():
        pytest.skip(f"shared data {name} is not available")
    return root / name


def _write_images(folder: pathlib.Path, count: int, size=(12, 10), mode="RGB", value=0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new(mode, size, color=(value + i) % 256 if mode == "L" else (value, i, 0)).save(folder / f"{i:03d}.png")


def _error(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(VitslimError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


# --- data root ----------------------------------------------------------------------------------


def test_data_root_env_and_checkout_default(monkeypatch, tmp_path):
    monkeypatch.setenv("VITSLIM_DATA", str(tmp_path))
    assert data.data_root() == tmp_path
    monkeypatch.delenv("VITSLIM_DATA")
    beside = REPO.parent / "shared" / "data"
    assert data.data_root() == (beside if beside.is_dir() else None)


# --- digits -------------------------------------------------------------------------------------


def test_digits_splits_are_fixed_stratified_and_disjoint():
    train_x, train_y = data.digits_split("train")
    test_x, test_y = data.digits_split("test")
    assert train_x.shape == (1437, 8, 8) and test_x.shape == (360, 8, 8) and test_x.dtype == np.uint8
    assert sorted(collections.Counter(test_y.tolist()).values())[0] >= 35  # stratified: ~36 per class
    train_rows = {row.tobytes() for row in train_x}
    assert sum(row.tobytes() in train_rows for row in test_x) < 5  # (digits has a few duplicate images)
    _error("splits 'train' and 'test'", data.digits_split, "val")


def test_digits_dataset_is_the_default_models_input():
    dataset = data.build_dataset("digits")
    image, label = dataset[0]
    assert len(dataset) == 360 and image.shape == (1, 28, 28) and dataset.classes == list("0123456789")
    x, y = data.digits_tensors("test")
    assert torch.equal(image, x[0]) and label == y[0]
    assert abs(x.mean().item()) < 0.2 and 0.8 < x.std().item() < 1.2  # normalised with the train statistics


def test_digits_train_split_shifts_without_flipping():
    train = data.build_dataset("digits", "train")
    x, _ = data.digits_tensors("train")
    fill = -data.DIGITS_DATA_CFG["mean"][0] / data.DIGITS_DATA_CFG["std"][0]
    torch.manual_seed(0)
    for i in range(20):
        augmented = train[i][0]
        s = data.DIGITS_SHIFT
        padded = torch.nn.functional.pad(x[i], (s, s, s, s), value=fill)
        crops = [padded[:, dy:dy + 28, dx:dx + 28] for dy in range(2 * s + 1) for dx in range(2 * s + 1)]
        assert any(torch.allclose(augmented, c, atol=1e-5) for c in crops)


def test_train_loader_augments_reproducibly_from_its_seed():
    # calibration scores come from such a loader: the same seed must give the same crops, whatever the global RNG
    def first_batch(seed, global_seed):
        torch.manual_seed(global_seed)
        loader = data.build_loader("digits", "train", batch_size=16, limit=32, seed=seed)
        return next(iter(loader))[0]

    assert torch.equal(first_batch(0, 1), first_batch(0, 2))
    assert not torch.equal(first_batch(0, 1), first_batch(1, 1))


def test_digits_for_an_rgb_model():
    model = tiny_vit(img_size=32)
    image, _ = data.build_dataset("digits", model=model)[0]
    cfg = data.data_config(model)
    assert image.shape == (3, 32, 32) and cfg["input_size"] == (3, 32, 32)
    pixels = image * torch.tensor(cfg["std"])[:, None, None] + torch.tensor(cfg["mean"])[:, None, None]
    assert torch.allclose(pixels[0], pixels[1], atol=1e-5) and pixels.max() > 0.5  # grey digit as RGB


# --- shared data: short names -------------------------------------------------------------------


def test_cifar10_short_name_both_splits():
    root = _shared("cifar10")
    test = data.build_dataset("cifar10")
    assert len(test) == 10_000 and test.classes[:2] == ["airplane", "automobile"]
    assert collections.Counter(test.targets)[9] == 1000
    assert len(data.build_dataset(str(root), "train")) == 50_000
    _error("no 'val' split folder; present: test, train", data.build_dataset, "cifar10", "val")


def test_reference_model_is_accurate_on_200_cifar10_images():
    _shared("cifar10")
    folder = data.data_root().parent / "models" / "cifar10-vit-d12w128"
    if not folder.is_dir():
        pytest.skip("reference model is not available")
    from vitslim.zoo import load_model

    model = load_model(str(folder))
    loader = data.build_loader("cifar10", model=model, limit=200, batch_size=100)
    labels = torch.cat([y for _, y in loader])
    assert torch.bincount(labels).tolist() == [20] * 10  # the subset is class-balanced
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in loader)
    assert correct / 200 > 0.40  # 10% is chance; the model scores 66% on the full test set


def test_imagenet_labels_csv_layout():
    _shared("imagenet-val-1300")
    dataset = data.build_dataset("imagenet-val-1300", limit=30)
    assert len(dataset) == 30 and len(dataset.classes) == 1000 and dataset.classes[0] == "tench"
    assert len(data.build_dataset("imagenet-val-1300")) == 1300
    image, label = dataset[0]
    assert image.shape == (3, 224, 224) and 0 <= label < 1000  # timm's ImageNet eval transform by default
    again = data.build_dataset("imagenet-val-1300", limit=30)
    assert again.items == dataset.items  # deterministic subset


# --- folder layouts -----------------------------------------------------------------------------


def test_image_folder_layout_with_model_transform(tmp_path):
    for i, name in enumerate(["zebra", "ant", "cat"]):
        _write_images(tmp_path / name, 3 + i, value=40 * i)
    dataset = data.build_dataset(str(tmp_path), model=tiny_vit(img_size=32))
    assert dataset.classes == ["ant", "cat", "zebra"] and len(dataset) == 12
    assert collections.Counter(dataset.targets) == {0: 4, 1: 5, 2: 3}
    image, _ = dataset[0]
    assert image.shape == (3, 32, 32)
    # a 1-channel model gets grey images
    grey = tiny_vit(img_size=16, in_chans=1)
    assert data.build_dataset(str(tmp_path), model=grey)[0][0].shape == (1, 16, 16)


def test_image_folder_uses_model_mean_and_std(tmp_path):
    _write_images(tmp_path / "a", 1, size=(32, 32), mode="L", value=255)
    overlay = dict(input_size=(1, 32, 32), mean=(0.5,), std=(0.25,), crop_pct=1.0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, in_chans=1, depth=1,
                              pretrained_cfg_overlay=overlay)
    image, _ = data.build_dataset(str(tmp_path), model=model)[0]
    assert torch.allclose(image, torch.full((1, 32, 32), 2.0))  # (1.0 - 0.5) / 0.25


def test_split_subfolder_layout(tmp_path):
    _write_images(tmp_path / "train" / "a", 2)
    _write_images(tmp_path / "train" / "b", 2)
    _write_images(tmp_path / "val" / "a", 1)
    _write_images(tmp_path / "val" / "b", 3)
    assert len(data.build_dataset(str(tmp_path), "val", model=tiny_vit())) == 4
    assert len(data.build_dataset(str(tmp_path), "train", model=tiny_vit())) == 4
    _error("no 'test' split folder; present: train, val", data.build_dataset, str(tmp_path), model=tiny_vit())


def test_labels_csv_layout_and_errors(tmp_path):
    _write_images(tmp_path / "images", 4)
    (tmp_path / "labels.csv").write_text("file,label\n000.png,2\n001.png,0\n002.png,2\n003.png,1\n")
    dataset = data.build_dataset(str(tmp_path), model=tiny_vit())
    assert dataset.targets == [2, 0, 2, 1] and dataset.classes == ["0", "1", "2"]
    (tmp_path / "classes.csv").write_text("index,wnid,name\n0,n0,zero\n1,n1,one\n2,n2,two\n3,n3,three\n")
    assert data.build_dataset(str(tmp_path), model=tiny_vit()).classes == ["zero", "one", "two", "three"]
    (tmp_path / "labels.csv").write_text("image,class\n000.png,2\n")
    _error("needs the header 'file,label'", data.build_dataset, str(tmp_path))
    (tmp_path / "labels.csv").write_text("file,label\n000.png,2\n999.png,1\n")
    _error("1 images listed .* are missing, e.g. .*999.png", data.build_dataset, str(tmp_path))


def test_loader_batches_shuffling_and_seed():
    loader = data.build_loader("digits", batch_size=50)
    images, labels = next(iter(loader))
    assert images.shape == (50, 1, 28, 28) and labels.tolist() == data.digits_split("test")[1][:50].tolist()
    first = [y for _, y in data.build_loader("digits", "train", limit=100, batch_size=100, seed=3)][0]
    second = [y for _, y in data.build_loader("digits", "train", limit=100, batch_size=100, seed=3)][0]
    other = [y for _, y in data.build_loader("digits", "train", limit=100, batch_size=100, seed=4)][0]
    assert torch.equal(first, second) and not torch.equal(first, other)
    assert sorted(first.tolist()) == sorted(other.tolist())


# --- subsets ------------------------------------------------------------------------------------


def test_limit_is_balanced_and_spread():
    targets = [0] * 10 + [1] * 2 + [2] * 30
    keep = data.balanced_subset(targets, 9)
    assert collections.Counter(targets[i] for i in keep) == {0: 3, 1: 2, 2: 4}
    assert keep == sorted(keep) and keep[-1] > 30  # spread over class 2, not its first four


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=60), st.integers(1, 70))
def test_limit_properties(targets, limit):
    keep = data.balanced_subset(targets, limit)
    assert len(keep) == min(limit, len(targets)) and len(set(keep)) == len(keep)
    counts = collections.Counter(targets[i] for i in keep)
    available = collections.Counter(targets)
    # classes that are not exhausted differ by at most one image
    open_counts = [counts[c] for c in available if counts[c] < available[c]]
    assert not open_counts or max(counts.values()) - min(open_counts) <= 1


# --- errors -------------------------------------------------------------------------------------


def test_missing_path_empty_dir_and_unknown_names(tmp_path, monkeypatch):
    _error("does not exist", data.build_dataset, str(tmp_path / "nope"))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    _error("no images in", data.build_dataset, str(tmp_path / "empty"))
    _write_images(tmp_path / "loose", 2)
    _error("2 loose images", data.build_dataset, str(tmp_path / "loose"))
    monkeypatch.setenv("VITSLIM_DATA", str(tmp_path))
    _error("no dataset 'cifar100' under .*available: empty, loose", data.build_dataset, "cifar100")
    monkeypatch.setattr(data, "data_root", lambda: None)
    _error("set VITSLIM_DATA", data.build_dataset, "cifar10")
    _error("limit must be a positive", data.build_dataset, "digits", limit=0)


def test_undecodable_image(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "bad.jpg").write_bytes(b"not a jpeg")
    dataset = data.build_dataset(str(tmp_path), model=tiny_vit())
    _error("cannot decode image .*bad.jpg", dataset.__getitem__, 0)
