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


# every other method at zero reduction, on a model built for the non-square size (Prune-and-Merge's plan is static)
ZERO_REDUCTION_FIXED = [("prune_merge", {"keep_rate": 1.0, "prune_rate": 0.0}),
                        ("prune_merge", {"keep_rate": 1.0, "span": "1:2"}), ("atme", {"schedule": ""}),
                        ("sit", {"keep_rate": 1.0}), ("cdcp", {"keep_rate": 1.0}),
                        ("cait", {"schedule": "", "keep_rate": 1.0})]


@pytest.mark.parametrize("method,options", ZERO_REDUCTION_FIXED)
def test_features_at_zero_reduction_equal_dense_for_the_other_methods(method, options):
    torch.manual_seed(0)
    dense = tiny_vit(img_size=(24, 40)).eval()
    patched = vitslim.patch(copy.deepcopy(dense), method, **options).eval()
    images = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        torch.testing.assert_close(features(patched, images), features(dense, images), rtol=1e-5, atol=1e-5)
        for g, w in zip(features(patched, images, blocks=[1, 3]), features(dense, images, blocks=[1, 3]), strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_spvit_at_keep_rate_one_still_adds_its_package_token():
    # SPViT's package token (the sum of zero dropped tokens) joins attention at every selector, so even at
    # keep_rate 1 the features differ slightly from dense: the method, not the restore (docs/dense.md)
    dense = tiny_vit(dynamic_img_size=True).eval()
    patched = vitslim.patch(copy.deepcopy(dense), "spvit", keep_rate=1.0).eval()
    images = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        difference = (features(patched, images) - features(dense, images)).abs().max()
    assert 0 < difference < 0.05


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


# --- segmentation data -----------------------------------------------------------------------------

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from vitslim.dense.data import IGNORE, PairedTransform, SegmentationFolder  # noqa: E402


def _write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def _image(h=6, w=8):
    return np.random.default_rng(0).integers(0, 255, (h, w, 3))


def _mask(values, h=6, w=8):
    return np.resize(np.asarray(values), (h, w))


@pytest.mark.parametrize("layout", ["camvid", "ade20k", "voc", "cityscapes"])
def test_each_layout_reads_its_pairs_and_maps_labels_with_one_ignore_value(tmp_path, layout):
    if layout == "camvid":
        root = tmp_path / "camvid"
        _write(root / "val/images/a.jpg", _image())
        _write(root / "val/masks/a.png", _mask([0, 3, 10, 11]))  # 11 = void
        split, want, classes = "val", [0, 3, 10, IGNORE], 11
    elif layout == "ade20k":
        root = tmp_path / "ADEChallengeData2016"
        _write(root / "images/validation/ADE_val_1.jpg", _image())
        _write(root / "annotations/validation/ADE_val_1.png", _mask([0, 1, 150, 7]))  # 0 = ignore
        split, want, classes = "val", [IGNORE, 0, 149, 6], 150
        root = tmp_path  # the folder that holds ADEChallengeData2016 works too
    elif layout == "voc":
        root = tmp_path / "VOC2012"
        _write(root / "JPEGImages/2007_1.jpg", _image())
        _write(root / "SegmentationClass/2007_1.png", _mask([0, 20, 255, 5]))
        (root / "ImageSets/Segmentation").mkdir(parents=True)
        (root / "ImageSets/Segmentation/val.txt").write_text("2007_1\n")
        split, want, classes = "val", [0, 20, IGNORE, 5], 21
    else:
        root = tmp_path / "cityscapes"
        _write(root / "leftImg8bit/val/bonn/bonn_0_0_leftImg8bit.png", _image())
        _write(root / "gtFine/val/bonn/bonn_0_0_gtFine_labelTrainIds.png", _mask([0, 18, 255, 3]))
        split, want, classes = "val", [0, 18, IGNORE, 3], 19
    data = SegmentationFolder(root, split)
    image, labels = data[0]
    assert len(data) == 1 and data.num_classes == classes and image.size == (8, 6)
    assert labels[0, :4].tolist() == want and labels.dtype == np.int64


def test_ignored_pixels_do_not_count_in_the_metrics(tmp_path):
    root = tmp_path / "camvid"
    _write(root / "test/images/a.png", _image(2, 2))
    _write(root / "test/masks/a.png", [[0, 11], [1, 11]])
    data = SegmentationFolder(root, "test")
    _, labels = data[0]
    cm = ConfusionMatrix(data.num_classes)
    cm.update(torch.tensor([[[0, 5], [1, 7]]]), torch.from_numpy(labels)[None])
    assert cm.compute()["pixels"] == 2 and cm.compute()["pixel_accuracy"] == 1.0


def test_segmentation_data_errors_say_what_to_do(tmp_path):
    with pytest.raises(VitslimError, match="no segmentation layout vitslim knows"):
        (tmp_path / "empty" / "x").mkdir(parents=True)
        SegmentationFolder(tmp_path / "empty")
    root = tmp_path / "roads"
    _write(root / "train/images/a.jpg", _image())
    _write(root / "train/masks/a.png", _mask([0, 1]))
    with pytest.raises(VitslimError, match="say how many classes"):
        SegmentationFolder(root, "train")
    with pytest.raises(VitslimError, match="no split 'val' with images/ and masks/ \\(splits here: train\\)"):
        SegmentationFolder(root, "val", num_classes=2)
    _write(root / "train/masks/a.png", _mask([0, 1], h=3, w=8))
    with pytest.raises(VitslimError, match="is 8x3 but its image a.jpg is 8x6"):
        SegmentationFolder(root, "train", num_classes=2)[0]
    _write(root / "train/masks/a.png", _mask([0, 4]))
    with pytest.raises(VitslimError, match=r"label values \[4\] outside the 2 classes"):
        SegmentationFolder(root, "train", num_classes=2)[0]
    with pytest.raises(VitslimError, match="layout must be auto or one of"):
        SegmentationFolder(root, "train", layout="coco")


def test_paired_transform_keeps_image_and_mask_aligned():
    torch.manual_seed(0)
    h, w = 12, 16
    image = np.zeros((h, w, 3), dtype=np.uint8)
    image[:, : w // 2, 0] = 255  # left half red, and labelled 1
    labels = np.zeros((h, w), dtype=np.int64)
    labels[:, : w // 2] = 1
    train = PairedTransform((8, 8), train=True, mean=(0, 0, 0), std=(1, 1, 1), scale=(0.5, 2.0))
    for _ in range(20):
        x, y = train(Image.fromarray(image), labels)
        assert x.shape == (3, 8, 8) and y.shape == (8, 8)
        valid = y != IGNORE
        clear = valid & ((x[0] > 0.9) | (x[0] < 0.1))  # pixels not blended by the resize
        assert clear.sum() >= valid.sum() - 8  # at most one blended column
        assert torch.equal((x[0] > 0.5)[clear], y[clear] == 1)  # every kept pixel keeps its label
        assert (x[:, ~valid] == 0).all()  # padding: image at the mean, mask ignored
    x, y = PairedTransform((6, 10), train=False, mean=(0.5,) * 3, std=(0.5,) * 3)(Image.fromarray(image), labels)
    assert x.shape == (3, 6, 10) and torch.equal(y, torch.from_numpy(labels))  # the mask keeps its resolution


# --- heads and evaluation --------------------------------------------------------------------------

from vitslim.dense import LinearHead, MaskTransformer, SegmentationModel, build_head, evaluate_segmentation  # noqa: E402


def test_linear_head_is_one_linear_map_per_patch():
    head = LinearHead(8, 3)
    fmap = torch.randn(2, 8, 4, 5)
    want = torch.einsum("bchw,kc->bkhw", fmap, head.classifier.weight) + head.classifier.bias[None, :, None, None]
    torch.testing.assert_close(head(fmap), want)


def test_mask_transformer_decodes_classes_with_patches_and_follows_a_class_permutation():
    torch.manual_seed(0)
    head = MaskTransformer(16, 5, depth=2, width=32, num_heads=2).eval()
    fmap = torch.randn(2, 16, 3, 4)
    out = head(fmap)
    assert out.shape == (2, 5, 3, 4) and len(head.blocks) == 2
    # the classes are decoded jointly: each class's mask depends on the patches, and a class
    # embedding moved to another slot moves its mask (up to the LayerNorm over classes, a per-pixel
    # affine map whose weight and bias are shared across classes at init)
    perm = torch.tensor([2, 0, 1, 4, 3])
    with torch.no_grad():
        head.class_embed.copy_(head.class_embed[:, perm])
    torch.testing.assert_close(head(fmap), out[:, perm], rtol=1e-4, atol=1e-4)
    out.sum().backward()
    assert head.class_embed.grad is not None and head.proj_in.weight.grad.abs().sum() > 0


def test_segmentation_model_upsamples_to_the_image_and_equals_dense_at_zero_reduction():
    torch.manual_seed(0)
    dense = tiny_vit(dynamic_img_size=True).eval()
    head = build_head("linear", 64, 4)
    images = torch.randn(2, 3, 24, 40)
    plain = SegmentationModel(dense, head).eval()
    patched = SegmentationModel(vitslim.patch(copy.deepcopy(dense), "tome", r=0), head).eval()
    with torch.no_grad():
        out = plain(images)
        torch.testing.assert_close(patched(images), out, rtol=1e-5, atol=1e-5)
    assert out.shape == (2, 4, 24, 40)
    with pytest.raises(VitslimError, match="head must be one of linear, mask"):
        build_head("fpn", 64, 4)


def test_evaluate_segmentation_scores_at_the_masks_resolution():
    class Oracle(torch.nn.Module):
        """Logits at half the mask size whose upsampled argmax is the left/right split of the masks."""

        def forward(self, images):
            logits = torch.zeros(images.shape[0], 2, 4, 4)
            logits[:, 0, :, :2] = logits[:, 1, :, 2:] = 1.0
            return logits

    masks = torch.zeros(3, 8, 8, dtype=torch.long)
    masks[:, :, 4:] = 1
    masks[0, 0, 0] = IGNORE
    loader = [(torch.zeros(2, 3, 16, 16), masks[:2]), (torch.zeros(1, 3, 16, 16), masks[2:])]
    result = evaluate_segmentation(Oracle(), loader, 2)
    assert result["miou"] == 1.0 and result["pixels"] == 3 * 64 - 1
