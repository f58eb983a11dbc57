"""`vitslim visualize` and vitslim.dense.visualize: which patches share a token, for every method."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_vit
from vitslim.cli import main
from vitslim.dense.visualize import (FUSED, PRUNED, count_tokens, draw_token_groups, group_outlines, load_images,
                                     save_figure, token_groups)
from vitslim.errors import VitslimError
from vitslim.patch import patch
from vitslim.zoo import _write_folder

TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_classes=5)  # an 8x8 grid
# native knobs, not macs=: a budget search costs seconds, and the CLI test covers --macs
NATIVE = {"tome": dict(r=6), "topk": dict(keep_rate=0.5), "evit": dict(keep_rate=0.5), "atme": {},
          "prune_merge": {}, "cdcp": {}}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return tiny_vit(**TINY)


@pytest.fixture(scope="module")
def patched(tiny):
    """The tiny ViT patched with each method's native options, built once per module."""
    return {method: patch(copy.deepcopy(tiny), method, **options) for method, options in NATIVE.items()}


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32)


def _computed_tokens(model, images) -> dict[int, list[int]]:
    """Per block, the patch tokens (prefix left out) each image's block computed its MLP on."""
    counts = {}

    def tap(i, state):
        counts[i] = [state.x.shape[1] - state.num_prefix] * state.x.shape[0]

    with torch.inference_mode():
        state = model.forward_tokens(images, trace=True, on_block=tap)
    return counts, state.trace


def test_without_reduction_every_patch_is_its_own_token(tiny, patched, images):
    identity = (torch.arange(64) + 1).view(8, 8)  # token index: after the CLS token, in raster order
    for model in (tiny, patch(copy.deepcopy(tiny), "tome", r=0)):
        groups = token_groups(model, images, [0, -1])
        assert list(groups) == [0, 3]
        for ids in groups.values():
            assert ids.shape == (2, 8, 8) and ids.dtype == torch.long
            assert torch.equal(ids, identity.expand(2, 8, 8))
    channels = token_groups(patched["cdcp"], images)  # prunes channels, not tokens
    assert all(torch.equal(ids, identity.expand(2, 8, 8)) for ids in channels.values())


@pytest.mark.parametrize("method", ["tome", "topk", "evit", "atme"])
def test_one_group_per_token_the_block_computed_on(patched, images, method):
    model = patched[method]
    groups = token_groups(model, images, range(4))
    counts, _ = _computed_tokens(model, images)
    for block, ids in groups.items():
        assert [count_tokens(ids[b]) for b in range(2)] == counts[block], block
    assert count_tokens(groups[3][0]) < 64  # the budget really reduced the tokens


def test_tome_groups_grow_as_tokens_merge(patched, images):
    groups = token_groups(patched["tome"], images, [0, 3])
    early, late = groups[0][0].flatten(), groups[3][0].flatten()
    assert (early >= 0).all() and (late >= 0).all()  # merging prunes no patch
    for token in early.unique():  # patches that shared a token early still share one later
        assert late[early == token].unique().numel() == 1


def test_topk_pruned_patches_are_minus_one_and_stay_pruned(patched, images):
    model = patched["topk"]
    groups = token_groups(model, images, range(4))
    counts, _ = _computed_tokens(model, images)
    last = groups[3]
    assert (last == PRUNED).any() and not (last <= FUSED).any()
    assert int((last[0] >= 0).sum()) == counts[3][0]  # every kept patch is its own token
    for block in range(3):
        assert ((groups[block] == PRUNED) <= (groups[block + 1] == PRUNED)).all()


def test_evit_fused_patches_differ_from_pruned_ones(patched, images):
    last = token_groups(patched["evit"], images, [-1])[3]
    assert (last <= FUSED).any() and not (last == PRUNED).any()


def test_prune_merge_groups_are_contiguous_raster_runs(patched, images):
    model = patched["prune_merge"]
    groups = token_groups(model, images, range(4))
    _, trace = _computed_tokens(model, images)
    for block, ids in groups.items():
        assert torch.equal(ids[0], ids[1])  # a static plan: the same for every image
        raster = ids[0].flatten()
        kept = raster[raster >= 0]
        assert count_tokens(ids[0]) == trace[block][0] - 1  # the merged tokens the block's attention ran on
        for token in kept.unique():  # each group: one run along the kept patches in raster order
            where = (kept == token).nonzero().flatten()
            assert torch.equal(where, torch.arange(int(where[0]), int(where[-1]) + 1))
    assert any(count_tokens(ids[0]) < 64 for ids in groups.values())


def test_non_square_inputs_use_the_patch_grid():
    torch.manual_seed(0)
    model = patch(tiny_vit(**TINY, dynamic_img_size=True), "tome", r=4)
    groups = token_groups(model, torch.randn(1, 3, 24, 40), [0, 3])
    assert groups[0].shape == (1, 6, 10)
    assert count_tokens(groups[0][0]) == 60 - 4 and count_tokens(groups[3][0]) == 60 - 16
    picture = draw_token_groups(np.zeros((24, 40, 3)), groups[3][0])
    assert picture.shape == (24, 40, 3)


def test_draw_colours_outlines_and_shades():
    groups = np.array([[5, 5, 7, 7], [5, 5, 8, 8], [PRUNED, PRUNED, FUSED, FUSED], [PRUNED, PRUNED, FUSED, FUSED]])
    image = np.full((32, 32, 3), 200, dtype=np.uint8)  # patches of 8x8 pixels
    out = draw_token_groups(image, groups, outline=(1.0, 0.0, 0.0))
    assert out.shape == (32, 32, 3) and out.dtype == np.float64 and 0 <= out.min() and out.max() <= 1
    red = (out == (1.0, 0.0, 0.0)).all(axis=2)
    assert red[:16, 15].all() and red[7, 16:].all()  # between 5 | 7 and 8, between 7 / 8
    assert not red[:15, :15].any() and not red[17:, :15].any()  # inside one group: no outline
    assert np.allclose(out[20, 3], 200 / 255 * 0.3)  # pruned: dark grey
    assert np.allclose(out[20, 20], 200 / 255 * 0.45)  # fused: the image darkened, not the pruned grey
    assert np.allclose(out[0, 0], out[14, 14]) and not np.allclose(out[0, 0], out[0, 20])  # one colour per token
    again = draw_token_groups(image, np.where(groups == 5, 5, 9), outline=(1.0, 0.0, 0.0))
    assert np.allclose(again[3, 3], out[3, 3])  # a token's colour depends on its id only
    assert group_outlines(np.zeros((4, 4))).sum() == 0


def test_save_figure_and_load_images(tiny, patched, tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    batch, pictures = load_images([tmp_path / "photo.png"], tiny)
    assert batch.shape == (1, 3, 32, 32) and pictures[0].shape == (32, 32, 3)
    assert 0 <= pictures[0].min() and pictures[0].max() <= 1
    groups = token_groups(patched["tome"], batch, [1, 3])
    path = save_figure(tmp_path / "out" / "photo.png", pictures[0], {"tome": {i: g[0] for i, g in groups.items()}})
    assert Image.open(path).size[0] > Image.open(path).size[1] > 100  # one row: the image, then two blocks
    with pytest.raises(VitslimError, match="no image file"):
        load_images([tmp_path / "missing.png"], tiny)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(VitslimError, match="cannot decode image"):
        load_images([tmp_path / "broken.png"], tiny)
    with pytest.raises(VitslimError, match=r"blocks must be block indices in \[-4, 3\], got 4"):
        token_groups(tiny, batch, [4])


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny):
    """A timm model folder of the tiny ViT, as `--model` takes it."""
    folder = tmp_path_factory.mktemp("models") / "tiny"
    cfg = dict(input_size=[3, 32, 32], interpolation="bilinear", crop_pct=1.0, crop_mode="center",
               mean=[0.5] * 3, std=[0.25] * 3, num_classes=5, first_conv="patch_embed.proj", classifier="head")
    _write_folder(folder, tiny, dict(architecture="vit_tiny_patch16_224", num_classes=5,
                                     model_args={**TINY, "img_size": [32, 32]}, pretrained_cfg=cfg))
    return folder


def test_cli_writes_one_png_per_image_with_a_row_per_method(tiny_folder, tmp_path, capsys):
    for name in ("a", "b"):
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 45, 3), dtype=np.uint8)).save(
            tmp_path / f"{name}.png")
    out = tmp_path / "vis"
    args = ["visualize", "--model", str(tiny_folder), "--method", "tome,dense", "--macs", "0.7",
            "--blocks", "1,-1", "--out", str(out), str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert main(args) == 0
    written = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]
    assert f"wrote {out / 'a.png'}" in written
    width, height = Image.open(out / "a.png").size
    assert height > 200 and width > 2 * 200  # 2 rows (tome, dense) x 3 panels (image, 2 blocks)


@pytest.mark.parametrize("extra,message", [
    (["--method", "tome", "missing.png"], "no image file missing.png"),
    (["--method", "tome", "--blocks", "4", "IMG"], "blocks must be block indices in [-4, 3], got 4"),
    (["--method", "tome,magic", "IMG"], "unknown method 'magic'"),
    (["IMG"], "give --method"),
    (["--method", "tome", "--image-size", "24x40", "IMG"], "this model takes 32x32 images, got 24x40"),
])
def test_cli_bad_input_is_one_line(tiny_folder, tmp_path, capsys, extra, message):
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    extra = [str(tmp_path / "img.png") if a == "IMG" else a for a in extra]
    assert main(["visualize", "--model", str(tiny_folder), "--out", str(tmp_path / "vis"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitslim: error:") and message in err and "\n" not in err
    assert not (tmp_path / "vis").exists()
