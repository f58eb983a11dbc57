"""Dense prediction: full-grid features from patched models, the pruned-token restore, segmentation metrics."""
import copy

import pytest
import torch

import vitslim
from vitslim.dense import ConfusionMatrix, features
from vitslim.errors import VitslimError

from conftest import tiny_vit

ZERO_REDUCTION = [("tome", {"r": 0}), ("evit", {"keep_rate": 1.0}), ("topk", {"keep_rate": 1.0})]


@pytest.mark.parametrize("method,options", ZERO_REDUCTION)
@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_features_at_zero_reduction_equal_the_plain_models_patch_tokens(method, options, size):
    torch.manual_seed(0)
    dense = tiny_vit(dynamic_img_size=True).eval()
    patched = vitslim.patch(copy.deepcopy(dense), method, **options)
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        want = features(dense, images)
        got = features(patched, images)
        want_blocks = features(dense, images, blocks=[1, -1])
        got_blocks = features(patched, images, blocks=[1, -1])
        expected = dense.forward_features(images)[:, 1:]  # timm's own tokens after the final norm
    assert got.shape == (2, 64, size[0] // 4, size[1] // 4)
    torch.testing.assert_close(want.flatten(2).transpose(1, 2), expected)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_blocks, want_blocks, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,options", [("tome", {"r": 6}), ("atme", {"schedule": "1:W,2:H"}),
                                            ("evit", {"keep_rate": 0.5}), ("sit", {"keep_rate": 0.5})])
def test_features_keep_the_full_grid_when_tokens_are_reduced(method, options):
    model = vitslim.patch(tiny_vit(dynamic_img_size=True).eval(), method, **options)
    with torch.no_grad():
        out = features(model, torch.randn(2, 3, 24, 40))
        state = model.forward_tokens(torch.randn(2, 3, 24, 40), trace=True)
    assert out.shape == (2, 64, 6, 10) and torch.isfinite(out).all()
    assert state.trace[-1][1] < 60  # the last block ran on fewer tokens than the 60 patches


def _after_attention(model, images, block):
    """Dense tokens after the attention residual of ``block`` (what top-k prunes from there)."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    for blk in model.blocks[:block]:
        x = blk(x)
    blk = model.blocks[block]
    return x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))


def test_pruned_patches_get_the_value_their_token_had_when_dropped():
    torch.manual_seed(0)
    dense = tiny_vit().eval()
    model = vitslim.patch(copy.deepcopy(dense), "topk", keep_rate=0.5, locations=[2])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        state = model.forward_tokens(images, trace_source=True)
        out = features(model, images).flatten(2).transpose(1, 2)  # (B, 64, C)
        carried = dense.norm(_after_attention(dense, images, 2))[:, 1:]
    pruned = state.source < 0
    assert pruned.sum(1).tolist() == [32, 32]
    torch.testing.assert_close(out[pruned], carried[pruned], rtol=1e-5, atol=1e-5)
    kept = vitslim.unmerge(state)
    torch.testing.assert_close(out[~pruned], kept[~pruned])
    with torch.no_grad():  # top-k fuses nothing: "fused" falls back to the dropped value
        torch.testing.assert_close(features(model, images, restore="fused"), features(model, images))


def test_fused_restore_gives_evits_fused_token_and_dropped_gives_each_patch_its_own():
    torch.manual_seed(0)
    model = vitslim.patch(tiny_vit().eval(), "evit", keep_rate=0.5, locations=[1])
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        state = model.forward_tokens(images, trace_source=True)
        fused = features(model, images, restore="fused").flatten(2).transpose(1, 2)[0]
        dropped = features(model, images).flatten(2).transpose(1, 2)[0]
    gone = state.dropped.mask[0]
    assert int(gone.sum()) == 32 and (state.source[0][gone] == state.x.shape[1] - 1).all()  # into the last token
    torch.testing.assert_close(fused[gone], state.x[0, -1].expand(32, -1))
    assert not torch.allclose(dropped[gone], fused[gone])
    assert dropped[gone].unique(dim=0).shape[0] == 32  # each dropped patch keeps its own value


def test_features_rejects_bad_arguments_in_one_line():
    model = vitslim.patch(tiny_vit().eval(), "tome", r=2)
    images = torch.randn(1, 3, 32, 32)
    with pytest.raises(VitslimError, match="restore must be one of dropped, fused"):
        features(model, images, restore="zero")
    with pytest.raises(VitslimError, match=r"blocks must be block indices in \[-4, 3\], got 4"):
        features(model, images, blocks=[4])
    with pytest.raises(VitslimError, match="takes 32x32 images"):
        features(model, torch.randn(1, 3, 48, 48))


def test_confusion_matrix_matches_a_hand_computed_one():
    cm = ConfusionMatrix(3, ignore_index=255)
    target = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 255]]])
    prediction = torch.tensor([[[0, 1, 1, 1], [2, 0, 2, 0]]])
    cm.update(prediction, target)
    cm.update(torch.tensor([[[0]]]), torch.tensor([[[0]]]))  # accumulated over the split, not per image
    assert cm.counts.tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 1]]
    result = cm.compute()
    # IoU: class 0 2/(3+3-2)=0.5, class 1 2/(2+3-2)=2/3, class 2 1/(2+1-1)=0.5
    assert result["iou"] == pytest.approx([0.5, 2 / 3, 0.5])
    assert result["miou"] == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert result["pixel_accuracy"] == pytest.approx(5 / 7) and result["pixels"] == 7


def test_confusion_matrix_leaves_absent_classes_out_and_takes_logits():
    cm = ConfusionMatrix(4)
    logits = torch.zeros(1, 4, 1, 2)
    logits[0, 1, 0, 0] = logits[0, 0, 0, 1] = 1.0  # predicts [1, 0]
    cm.update(logits, torch.tensor([[[1, 0]]]))
    result = cm.compute()
    assert result["iou"] == [1.0, 1.0, None, None] and result["miou"] == 1.0


def test_confusion_matrix_rejects_bad_labels_and_shapes():
    cm = ConfusionMatrix(3)
    with pytest.raises(VitslimError, match=r"labels \[5\] are outside 0..2"):
        cm.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([[[0, 5], [1, 255]]]))
    with pytest.raises(VitslimError, match="differ in shape: upsample the logits"):
        cm.update(torch.zeros(1, 3, 4, 4), torch.zeros(1, 8, 8, dtype=torch.long))
