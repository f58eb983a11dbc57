"""The training engine: losses against hand-computed values, groups and schedule, checkpoints, resume, DDP."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vitslim
from vitslim.errors import VitslimError
from vitslim.train import AuxLoss, Criterion, TokenTarget, TrainConfig, fit, load, read_checkpoint, teacher_copy
from vitslim.train.checkpoint import save_checkpoint
from vitslim.methods import ParamOptions
from vitslim.train.engine import GlobalBatchSampler, lr_factor, param_groups
from vitslim.train.losses import FINAL, kd_loss, masked_mse
from vitslim.zoo import _write_folder, load_model

from conftest import tiny_vit

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=2)


# --- fixtures: a tiny model folder and a tiny two-class image folder --------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> pathlib.Path:
    """A timm model folder (config.json + safetensors) of a 2-block, 16-px ViT."""
    torch.manual_seed(0)
    model = tiny_vit(**TINY)
    folder = tmp_path_factory.mktemp("models") / "tiny"
    cfg = dict(input_size=[3, 16, 16], interpolation="bilinear", crop_pct=1.0, crop_mode="center",
               mean=[0.5] * 3, std=[0.25] * 3, num_classes=2, first_conv="patch_embed.proj", classifier="head")
    model.pretrained_cfg = cfg
    _write_folder(folder, model, dict(architecture="vit_tiny_patch16_224", num_classes=2,
                                      model_args={**TINY, "img_size": [16, 16]}, pretrained_cfg=cfg))
    return folder


@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory) -> pathlib.Path:
    """An ImageFolder of 2 classes x 24 images (dark vs bright, noisy), train/test splits."""
    root = tmp_path_factory.mktemp("data") / "twoclass"
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("test", 8)):
        for label, base in (("dark", 70), ("bright", 180)):
            (root / split / label).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(base + rng.normal(0, 40, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    return root


def _model(folder):
    return load_model(str(folder))


def _config(**kw) -> TrainConfig:
    base = dict(epochs=2, batch_size=8, lr=1e-3, warmup_epochs=0.5, log_every=1, deterministic=True)
    base.update(kw)
    return TrainConfig(**base)


def _steps(log: pathlib.Path) -> list[dict]:
    return [r for r in map(json.loads, log.read_text().splitlines()) if r["event"] == "step"]


def _cli(*args: str, cwd: pathlib.Path, torchrun: int = 0) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               "-m", "vitslim", "train", *args]
    else:
        cmd = [sys.executable, "-m", "vitslim", "train", *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 180) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


# --- losses ----------------------------------------------------------------------------------------


def test_kd_loss_matches_hand_computed_kl():
    s = torch.tensor([[1.0, 2.0, 0.0]])
    t = torch.tensor([[0.0, 1.0, 3.0]])
    tau = 2.0
    p_t = np.exp(t.numpy()[0] / tau) / np.exp(t.numpy()[0] / tau).sum()
    p_s = np.exp(s.numpy()[0] / tau) / np.exp(s.numpy()[0] / tau).sum()
    expected = tau ** 2 * float((p_t * np.log(p_t / p_s)).sum())
    assert kd_loss(s, t, tau).item() == pytest.approx(expected, rel=1e-5)
    # Prune-and-Merge's normalisation divides by B * num_classes instead of B
    assert kd_loss(s, t, tau, norm="elements").item() == pytest.approx(expected / 3, rel=1e-5)
    assert kd_loss(t, t, tau).item() == pytest.approx(0.0, abs=1e-7)


def test_cross_entropy_with_smoothing_and_soft_targets():
    logits = torch.tensor([[2.0, 0.0]])
    logp = torch.log_softmax(logits, 1)[0]
    eps = 0.1
    expected = -((1 - eps + eps / 2) * logp[0] + (eps / 2) * logp[1])
    crit = Criterion(label_smoothing=eps)
    total, parts = crit(logits, torch.tensor([0]))
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    soft = torch.tensor([[0.25, 0.75]])
    total, _ = Criterion()(logits, soft)
    assert total.item() == pytest.approx(-(0.25 * logp[0] + 0.75 * logp[1]).item(), rel=1e-6)


def test_criterion_combines_kd_modes_tokens_and_aux():
    logits, target = torch.tensor([[1.0, -1.0], [0.5, 0.5]]), torch.tensor([0, 1])
    t_logits = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    ce = F.cross_entropy(logits, target).item()
    kd = kd_loss(logits, t_logits, 1.0).item()
    student = torch.ones(2, 3, 4)
    t_tokens = {1: torch.zeros(2, 3, 4), FINAL: torch.full((2, 3, 4), 2.0)}
    asked = []

    def teacher(blocks):
        asked.append(blocks)
        return t_logits, t_tokens

    aux = [AuxLoss("ratio", torch.tensor(0.3)), TokenTarget(student, 1, weight=0.5),
           TokenTarget(student, FINAL, weight=1.0, mask=torch.tensor([[1, 0, 0], [0, 0, 0]]), name="final")]
    crit = Criterion(kd_weight=0.4, kd_mode="convex", token_weight=2.0, aux_weight=3.0)
    total, parts = crit(logits, target, aux, teacher)
    # token: 0.5 * MSE(1, 0) = 0.5; final: MSE(1, 2) over the one kept token = 1; ratio 0.3
    expected = 0.6 * ce + 0.4 * kd + 2.0 * (0.5 + 1.0) + 3.0 * 0.3
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert parts["token"].item() == pytest.approx(0.5) and parts["final"].item() == pytest.approx(1.0)
    assert asked == [{1, FINAL}]
    total_add, _ = Criterion(kd_weight=0.4)(logits, target, [], teacher)
    assert total_add.item() == pytest.approx(ce + 0.4 * kd, rel=1e-5)


def test_token_distillation_errors_are_clear():
    with pytest.raises(VitslimError, match="teacher"):
        Criterion(kd_weight=1.0)(torch.zeros(1, 2), torch.tensor([0]))
    with pytest.raises(VitslimError, match="patch grid"):
        masked_mse(torch.zeros(1, 3, 4), torch.zeros(1, 4, 4))
    assert masked_mse(torch.ones(1, 2, 2), torch.ones(1, 2, 2)).item() == 0.0


# --- config, groups, schedule, sampler ------------------------------------------------------------


def test_recipes_build_and_bad_options_fail_clearly():
    for name in vitslim.train.RECIPES:
        cfg = TrainConfig.from_recipe(name, epochs=1)
        assert cfg.recipe == name and cfg.epochs == 1
    pm = TrainConfig.from_recipe("prune_merge", batch_size=256)
    assert pm.peak_lr == pytest.approx(1e-4 * 256 / 512) and pm.kd_norm == "elements" and pm.kd_tau == 20
    with pytest.raises(VitslimError, match="unknown training option"):
        TrainConfig.from_recipe("evit", learning_rate=1)
    with pytest.raises(VitslimError, match="unknown recipe"):
        TrainConfig.from_recipe("nope")
    with pytest.raises(VitslimError, match="kd_mode"):
        TrainConfig(kd_mode="mix")


def test_param_groups_decay_and_lr_scales():
    model = tiny_vit(depth=2)
    vitslim.patch(model, "tome", r=2)
    extra = torch.nn.Linear(4, 4)
    reducer = model.vitslim_reducers["0"]
    reducer.extra = extra
    reducer.param_options = lambda: {"extra.": ParamOptions(lr_scale=5.0)}  # the declared hook, overridden
    groups = param_groups(model, TrainConfig(weight_decay=0.1, backbone_lr_scale=0.5, method_lr_scale=2.0))
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["blocks.0.attn.qkv.weight"]["weight_decay"] == 0.1
    for name in ("blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "cls_token", "pos_embed"):
        assert by_name[name]["weight_decay"] == 0.0, name
    assert by_name["blocks.0.attn.qkv.weight"]["lr_scale"] == 0.5
    assert by_name["vitslim_reducers.0.extra.weight"]["lr_scale"] == 5.0
    assert by_name["vitslim_reducers.0.extra.weight"]["kind"] == "method"
    frozen = param_groups(model, TrainConfig(freeze_tokens=True))
    assert "cls_token" not in {n for g in frozen for n in g["names"]}


def test_lr_schedule_warmup_then_cosine():
    f = [lr_factor(s, 100, 10, 1e-3, 1e-5, 1e-6) * 1e-3 for s in range(101)]
    assert f[0] == pytest.approx(1e-6) and f[10] == pytest.approx(1e-3)
    assert f[5] == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    assert f[55] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert f[100] == pytest.approx(1e-5)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def test_frozen_backbone_epochs_and_group_scales_in_the_schedule():
    from vitslim.train.engine import build_optimizer

    model = tiny_vit(depth=2)
    vitslim.patch(model, "tome", r=2)
    model.vitslim_reducers["0"].extra = torch.nn.Linear(4, 4)
    config = TrainConfig(lr=1e-3, min_lr=0, warmup_epochs=0, freeze_backbone_epochs=1, method_lr_scale=5.0,
                         backbone_lr_scale=0.01)
    optimizer, scheduler, base_lr = build_optimizer(model, config, steps_per_epoch=5, total_steps=20)
    seen = []
    for step in range(20):
        seen.append({g["kind"]: g["lr"] for g in optimizer.param_groups})
        assert base_lr(step) == pytest.approx(1e-3 * lr_factor(step, 20, 0, 1e-3, 0, 1e-6))
        optimizer.step()
        scheduler.step()
    assert all(s["backbone"] == 0 for s in seen[:5]) and seen[5]["backbone"] == pytest.approx(0.01 * base_lr(5))
    assert seen[0]["method"] == pytest.approx(5e-3) and seen[10]["method"] == pytest.approx(5 * base_lr(10))
    with pytest.raises(VitslimError, match="fp16 needs a GPU"):
        fit(model, torch.utils.data.TensorDataset(torch.zeros(8, 3, 32, 32), torch.zeros(8, dtype=torch.long)),
            config=TrainConfig(precision="fp16", batch_size=4), progress=False)


def test_global_batches_are_the_same_for_any_world_size():
    single = GlobalBatchSampler(37, 8, 0, 1, seed=3)
    single.set_epoch(2)
    shards = [GlobalBatchSampler(37, 8, r, 2, seed=3) for r in range(2)]
    for s in shards:
        s.set_epoch(2)
    whole = list(single)
    assert len(whole) == 4 and all(len(b) == 8 for b in whole)
    for k, (a, b) in enumerate(zip(*shards)):
        assert a + b == whole[k]
    single.set_epoch(2, start=3)
    assert list(single) == whole[3:]
    with pytest.raises(VitslimError, match="divisible"):
        GlobalBatchSampler(37, 9, 0, 2, seed=0)
    with pytest.raises(VitslimError, match="fewer than one batch"):
        GlobalBatchSampler(5, 8, 0, 1, seed=0)


# --- fit, checkpoints and resume -------------------------------------------------------------------


def test_fit_learns_and_checkpoint_loads_back_patched(tiny_folder, tiny_images, tmp_path):
    torch.manual_seed(0)
    model = _model(tiny_folder)
    teacher = teacher_copy(model)
    vitslim.patch(model, "tome", r=3)
    result = fit(model, str(tiny_images), val_data=str(tiny_images), teacher=teacher,
                 config=_config(epochs=3, lr=3e-3, kd_weight=0.5), out_dir=tmp_path, progress=False,
                 eval_before=True)
    before, after = result["history"][0], result["final"]
    assert before["event"] == "eval" and after["top1"] > before["top1"] and after["top1"] >= 0.9
    steps = _steps(tmp_path / "log.jsonl")
    assert [s["step"] for s in steps] == list(range(1, 19)) and {"ce", "kd", "lr"} <= set(steps[0])
    loaded = load(tmp_path / "last.pt")
    assert vitslim.describe(loaded)["options"] == model.vitslim_config["options"]
    x = torch.randn(3, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # the CLI's loader accepts the checkpoint as a model too
    assert vitslim.is_patched(load_model(str(tmp_path / "last.pt")))


def _run(tiny_folder, tiny_images, out, stop_at=None, resume=None, **kw):
    torch.manual_seed(123)  # the method's and model's initial state: identical in both runs
    model = _model(tiny_folder)
    teacher = teacher_copy(model)
    vitslim.patch(model, "evit", keep_rate=0.5)

    def on_step(record):
        if stop_at is not None and record["step"] == stop_at:
            raise KeyboardInterrupt  # what a kill between steps looks like from inside

    # augmentation, drop-path, mixup and label smoothing all draw random numbers: resume must restore them
    config = _config(epochs=3, kd_weight=0.5, drop_path=0.1, mixup=0.5, label_smoothing=0.1,
                     checkpoint_every=4, **kw)
    fit(model, str(tiny_images), teacher=teacher, config=config, out_dir=out, progress=False,
        on_step=on_step, resume=resume)
    return model


def test_interrupted_and_resumed_run_ends_with_identical_weights(tiny_folder, tiny_images, tmp_path):
    straight = _run(tiny_folder, tiny_images, tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_folder, tiny_images, tmp_path / "b", stop_at=11)  # 6 steps per epoch: checkpoints at 4, 6, 8
    payload = read_checkpoint(tmp_path / "b" / "last.pt")
    assert (payload["step"], payload["epoch"], payload["batch_in_epoch"]) == (8, 1, 2)  # resumes mid-epoch
    resumed = _run(tiny_folder, tiny_images, tmp_path / "b", resume="auto")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    losses_a = [s["loss"] for s in _steps(tmp_path / "a" / "log.jsonl")]
    losses_b = {s["step"]: s["loss"] for s in _steps(tmp_path / "b" / "log.jsonl")}  # resumed steps overwrite
    assert [losses_b[k + 1] for k in range(len(losses_a))] == losses_a


def test_resume_refuses_changed_options(tiny_folder, tiny_images, tmp_path):
    model = _model(tiny_folder)
    fit(model, str(tiny_images), config=_config(epochs=1), out_dir=tmp_path, progress=False)
    with pytest.raises(VitslimError, match="lr: 0.001 -> 0.002"):
        fit(_model(tiny_folder), str(tiny_images), config=_config(epochs=1, lr=2e-3), out_dir=tmp_path,
            progress=False, resume=tmp_path / "last.pt")


def test_truncated_checkpoint_gives_clear_error_and_crash_keeps_previous(tiny_folder, tiny_images, tmp_path,
                                                                           monkeypatch):
    model = _model(tiny_folder)
    fit(model, str(tiny_images), config=_config(epochs=1), out_dir=tmp_path, progress=False)
    last = tmp_path / "last.pt"
    good = read_checkpoint(last)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(VitslimError, match="truncated or corrupt.*last.pt"):
        read_checkpoint(cut)
    with pytest.raises(VitslimError, match="truncated or corrupt"):
        fit(_model(tiny_folder), str(tiny_images), config=_config(epochs=1), resume=cut, progress=False)

    def dying_save(obj, f, *a, **k):  # the process dies half-way through writing the next checkpoint
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError):
        save_checkpoint(last, {"step": 99})
    monkeypatch.undo()
    assert read_checkpoint(last)["step"] == good["step"]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    with pytest.raises(VitslimError, match="not a vitslim training checkpoint"):
        torch.save({"a": torch.zeros(1)}, tmp_path / "plain.pt")
        read_checkpoint(tmp_path / "plain.pt")


# --- command line and processes --------------------------------------------------------------------


def test_cli_train_errors_are_one_line(tmp_path, capsys):
    from vitslim.cli import main

    assert main(["train", "--kd-weight", "-1"]) == 2
    assert "kd_weight must be >= 0" in capsys.readouterr().err
    assert main(["train", "--model", "vit_tiny_patch16_224"]) == 2
    assert "give --data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--recipe", "nope"])


def test_torchrun_two_processes_follow_the_single_process_loss(tiny_folder, tiny_images, tmp_path):
    """Same global batch of 8: two gloo processes x 4 images vs one process x 8, dense model.

    Tolerance: 1e-4 relative per step. DDP sums the gradients in another order, so the weights
    differ in the last bits and the difference grows slowly over the steps. (With a method that
    makes discrete choices, e.g. ToMe's matching, a flipped choice can move a later loss more.)
    """
    common = ["--model", str(tiny_folder), "--data", str(tiny_images), "--epochs", "2", "--batch-size", "8",
              "--lr", "1e-3", "--log-every", "1", "--no-eval", "--no-progress", "--deterministic", "true",
              "--threads", "1"]
    two = _cli(*common, "--out", str(tmp_path / "two"), cwd=tmp_path, torchrun=2)
    one = _cli(*common, "--out", str(tmp_path / "one"), cwd=tmp_path)
    _finish(two)
    _finish(one)
    a, b = _steps(tmp_path / "one" / "log.jsonl"), _steps(tmp_path / "two" / "log.jsonl")
    assert len(a) == len(b) == 12
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4), (x["step"], x["loss"], y["loss"])
    start = json.loads((tmp_path / "two" / "log.jsonl").read_text().splitlines()[0])
    assert start["world"] == 2
    w1 = read_checkpoint(tmp_path / "one" / "last.pt")["model"]
    w2 = read_checkpoint(tmp_path / "two" / "last.pt")["model"]
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4


def test_killed_cli_run_resumes_to_the_same_weights(tiny_folder, tiny_images, tmp_path):
    common = ["--model", str(tiny_folder), "--data", str(tiny_images), "--method", "topk", "--macs", "0.8",
              "--epochs", "20", "--batch-size", "8", "--checkpoint-every", "2", "--no-eval", "--no-progress",
              "--deterministic", "true", "--threads", "1", "--seed", "5"]
    whole = _cli(*common, "--out", str(tmp_path / "whole"), cwd=tmp_path)
    _finish(whole)
    killed = _cli(*common, "--out", str(tmp_path / "killed"), cwd=tmp_path)
    last = tmp_path / "killed" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and killed.poll() is None:
        if last.is_file() and read_checkpoint(last)["step"] >= 6:
            break
        time.sleep(0.05)
    if killed.poll() is not None:
        pytest.skip("the run finished before it could be killed")
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert read_checkpoint(last)["step"] < 120
    _finish(_cli(*common, "--out", str(tmp_path / "killed"), "--resume", "auto", cwd=tmp_path))
    w1 = read_checkpoint(tmp_path / "whole" / "last.pt")["model"]
    w2 = read_checkpoint(last)["model"]
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["steps"] == 120 and "--resume" in summary["command"]


def test_method_losses_flow_from_the_forward_into_training(tiny_folder, tiny_images, tmp_path, monkeypatch):
    """A method's AuxLoss and TokenTarget (put in state.aux by its reducer) reach the loss and train its modules."""
    from vitslim.methods.base import _REGISTRY, Method, Reducer
    from vitslim.train.losses import AuxLoss, TokenTarget

    class PullToOne(Reducer):
        def __init__(self, block: int):
            super().__init__()
            self.block, self.scale = block, torch.nn.Parameter(torch.tensor(3.0))

        def after_block(self, state):
            if self.training:
                state.aux.append(AuxLoss("pull", (self.scale - 1) ** 2))
                state.aux.append(TokenTarget(state.x[:, state.num_prefix:], self.block, weight=1.0, name="match"))
            return state

    class PullMethod(Method):
        name = "test_pull"

        def resolve(self, model, **options):
            return {}

        def reducers(self):
            return {1: PullToOne(1)}

    monkeypatch.setitem(_REGISTRY, "test_pull", PullMethod)  # registered for this test only
    model = _model(tiny_folder)
    teacher = teacher_copy(model)
    vitslim.patch(model, "test_pull")
    records = []
    fit(model, str(tiny_images), teacher=teacher, config=_config(epochs=2, lr=1e-2, method_lr_scale=5.0),
        progress=False, on_step=records.append)
    assert records[0]["match"] == pytest.approx(0.0, abs=1e-10)  # the student starts as the teacher
    assert records[0]["pull"] == pytest.approx(4.0) and records[-1]["match"] > 0
    # Adam moves a parameter by at most ~lr per step: 12 steps at 1x lr (1e-2, warm-up, cosine) move it < 0.12
    assert 3.0 - model.vitslim_reducers["1"].scale.item() > 0.15


def test_compare_measures_a_loaded_checkpoint_as_trained(tiny_folder, tiny_images, tmp_path):
    from vitslim.measure.compare import run_compare

    model = _model(tiny_folder)
    vitslim.patch(model, "topk", keep_rate=0.5)
    fit(model, str(tiny_images), config=_config(epochs=1), out_dir=tmp_path, progress=False)
    trained = load(tmp_path / "last.pt")
    result = run_compare(trained, ["tome"], [0.8], batch_size=2, runs=5, warmup=1, progress=False)
    names = [r["method"] for r in result["rows"]]
    assert names == ["dense", "topk (as loaded)", "tome"]
    dense, as_loaded = result["rows"][:2]
    assert dense["macs_ratio"] == 1.0 and as_loaded["macs_ratio"] < 0.9
    assert as_loaded["budget"] == round(as_loaded["macs_ratio"], 3)
    assert vitslim.is_patched(trained) and trained.vitslim_config["options"]["keep_rate"] == 0.5
