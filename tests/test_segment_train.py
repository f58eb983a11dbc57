"""Segmentation through the training engine: SegmentationTask's loss, metric, checkpoints and resume."""
import copy

import numpy as np
import pytest
import torch

import vitslim
from vitslim.errors import VitslimError
from vitslim.train import TrainConfig, fit, teacher_copy
from vitslim.train.engine import param_groups
from vitslim.train.segmentation import SegmentationTask, load_segmentation, segmentation_model

from conftest import tiny_vit

CLASSES = 3


def _folder(root, images=8, size=32):
    """A CamVid-style folder whose labels follow the colour of 8x8 blocks (learnable by a linear probe)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for kind in ("images", "masks"):
            (root / split / kind).mkdir(parents=True)
        for i in range(images):
            labels = np.repeat(rng.integers(0, CLASSES, (size // 8, size // 8)), 8, 0).repeat(8, 1).astype(np.uint8)
            colours = np.array([[220, 30, 30], [30, 220, 30], [30, 30, 220]], dtype=np.int64)
            image = np.clip(colours[labels] + rng.integers(-20, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            labels[:2, :2] = 255  # a few ignored pixels
            Image.fromarray(image).save(root / split / "images" / f"{i}.png")
            Image.fromarray(labels).save(root / split / "masks" / f"{i}.png")
    return str(root)


def _config(**overrides):
    base = dict(epochs=3, batch_size=4, lr=3e-3, weight_decay=0.0, log_every=1, deterministic=True)
    return TrainConfig(**{**base, **overrides})


def test_a_frozen_backbone_linear_head_learns_and_best_is_picked_by_miou(tmp_path):
    torch.manual_seed(0)
    model = segmentation_model(tiny_vit(), "linear", CLASSES)
    frozen = copy.deepcopy(model.backbone.state_dict())
    data = _folder(tmp_path / "data")
    task = SegmentationTask(CLASSES, size=(32, 32), freeze_backbone=True)
    result = fit(model, data, val_data=data, config=_config(epochs=4), out_dir=tmp_path / "run", progress=False,
                 eval_before=True, task=task)
    before, after = result["history"][0], result["history"][-1]
    assert result["metric"] == "miou" and "best_top1" not in result
    assert after["miou"] > before["miou"] + 0.2 and after["n"] == 8
    assert result["best_metric"] == max(r["miou"] for r in result["history"] if r["epoch"] >= 0)
    for name, value in model.backbone.state_dict().items():  # the backbone did not move
        torch.testing.assert_close(value, frozen[name])
    restored = load_segmentation(tmp_path / "run" / "last.pt", backbone=tiny_vit())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(restored(images), model.eval()(images))


def test_fine_tuning_a_patched_backbone_distils_features_and_groups_head_apart(tmp_path):
    torch.manual_seed(0)
    backbone = vitslim.patch(tiny_vit(), "tome", r=4)
    model = segmentation_model(backbone, "mask", CLASSES, depth=1)
    teacher = teacher_copy(backbone)
    task = SegmentationTask(CLASSES, size=(32, 32))
    config = _config(epochs=1, kd_weight=1.0, backbone_lr_scale=0.1)
    kinds = {g["kind"]: g for g in param_groups(model, config, task.backbone_prefix)}
    assert set(kinds) == {"backbone", "head"}
    assert all(n.startswith("head.") for n in kinds["head"]["names"]) and kinds["head"]["lr_scale"] == 1.0
    assert kinds["backbone"]["lr_scale"] == 0.1
    steps = []
    fit(model, _folder(tmp_path / "data"), teacher=teacher, config=config, progress=False, task=task,
        on_step=steps.append)
    assert steps and all(s["feature_kd"] > 0 and s["ce"] > 0 for s in steps)
    # the distillation target is the dense backbone's final-norm patch tokens: zero when student == teacher
    same = segmentation_model(copy.deepcopy(teacher), "linear", CLASSES)
    images, masks = torch.randn(2, 3, 32, 32), torch.zeros(2, 32, 32, dtype=torch.long)
    outputs, aux = task.forward(same, images)
    _, parts = task.loss(vitslim.train.Criterion(kd_weight=1.0), outputs, masks, aux,
                         task.teacher_outputs(teacher, images))
    assert parts["feature_kd"].item() < 1e-10


def test_a_resumed_segmentation_run_ends_where_the_uninterrupted_one_does(tmp_path):
    data = _folder(tmp_path / "data", images=4)
    task = SegmentationTask(CLASSES, size=(32, 32))

    def run(out, resume=None, on_step=None):
        torch.manual_seed(0)
        model = segmentation_model(vitslim.patch(tiny_vit(), "topk", keep_rate=0.5), "linear", CLASSES)
        fit(model, data, config=_config(epochs=2), out_dir=out, resume=resume, progress=False, task=task,
            on_step=on_step)
        return model

    def crash(record):
        if record["step"] == 2:
            raise RuntimeError("interrupted")

    whole = run(tmp_path / "whole")
    with pytest.raises(RuntimeError, match="interrupted"):
        run(tmp_path / "half", on_step=crash)
    resumed = run(tmp_path / "half", resume="auto")
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_segmentation_training_refuses_what_masks_cannot_follow(tmp_path):
    model = segmentation_model(tiny_vit(), "linear", CLASSES)
    task = SegmentationTask(CLASSES, size=(32, 32))
    with pytest.raises(VitslimError, match="mixup/cutmix"):
        fit(model, _folder(tmp_path / "data", images=4), config=_config(mixup=0.8), progress=False, task=task)
    with pytest.raises(VitslimError, match="SegmentationModel"):
        task.backbone(tiny_vit())
    with pytest.raises(VitslimError, match="not a segmentation checkpoint"):
        torch.manual_seed(0)
        out = tmp_path / "cls"
        fit(tiny_vit(), torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)),
            config=_config(epochs=1), out_dir=out, progress=False)
        load_segmentation(out / "last.pt")


def _model_folder(path):
    from timm.models import save_for_hf

    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_classes=0)
    model = __import__("timm").create_model("vit_tiny_patch16_224", **args)
    save_for_hf(model, str(path), model_args=args, safe_serialization=True)
    return str(path)


def test_segment_cli_trains_evaluates_and_compares(tmp_path, capsys):
    import json

    from vitslim.cli import main

    data, model = _folder(tmp_path / "data"), _model_folder(tmp_path / "model")
    out = tmp_path / "run"
    assert main(["segment", "train", "--model", model, "--data", data, "--size", "32,32", "--num-classes", "3",
                 "--val-split", "test", "--freeze-backbone", "--epochs", "3", "--batch-size", "4", "--lr", "3e-3",
                 "--out", str(out), "--no-progress"]) == 0
    assert "mIoU" in capsys.readouterr().out and (out / "best.pt").is_file()
    assert main(["segment", "eval", str(out / "best.pt"), "--data", data, "--num-classes", "3",
                 "--method", "tome", "--macs", "0.7"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("mIoU") and "on 8 images at 32x32" in printed
    assert main(["segment", "compare", str(out / "best.pt"), "--data", data, "--num-classes", "3",
                 "--methods", "tome,prune_merge", "--budgets", "0.7", "--option", "prune_merge.span=1:2",
                 "--batch-sizes", "1,2", "--pictures", "2", "--out", str(tmp_path / "cmp")]) == 0
    report = json.loads((tmp_path / "cmp" / "segment_compare.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"dense", "tome", "prune_merge"} and rows["prune_merge"]["options"]["span"] == "1:2"
    assert all("miou" in r and "speedup_batch2" in r for r in rows.values())
    assert (tmp_path / "cmp" / "segment_compare_masks.png").is_file()
    assert (tmp_path / "cmp" / "segment_compare.png").is_file()
    # errors: a classification checkpoint, a missing folder
    assert main(["segment", "eval", str(out / "best.pt"), "--data", str(tmp_path / "nothing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
