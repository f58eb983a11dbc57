"""SiT: token slimming module, reverse module, FRD, budgets, inference model."""
import pytest
import torch

import vitslim
from vitslim.measure.macs import analytic_macs, count_macs
from vitslim.methods.sit import ReverseSlimmer, TokenSlimmer, stage_counts
from vitslim.train import Criterion, TrainConfig, fit, load, teacher_copy
from vitslim.train.engine import param_groups
from vitslim.train.task import StudentForward, teacher_outputs

from conftest import tiny_vit


def _sit(**options):
    torch.manual_seed(0)
    model = tiny_vit()  # 32 px, patch 4: 64 patches + CLS, depth 4 -> slims before blocks 1, 2, 3
    return vitslim.patch(model, "sit", **options)


def test_token_counts_per_stage_follow_the_schedule():
    model = _sit(keep_rate=0.5)
    tokens = vitslim.describe(model)["tokens"]
    assert [t[0] for t in tokens] == [65, 33, 17, 9]
    assert stage_counts(196, [0.5] * 3) == [98, 49, 24]  # the official LV-ViT counts at 224 px
    assert stage_counts(196, [0.7] * 3) == [137, 96, 67]
    model = _sit(keep_rate=[0.75, 0.5], locations=[1, 3])
    assert [t[0] for t in vitslim.describe(model)["tokens"]] == [65, 49, 49, 25]


def test_aggregation_weights_sum_to_one_over_inputs_and_sizes_are_kept():
    slimmer = TokenSlimmer(64, 10)
    x = torch.randn(3, 40, 64)
    a = slimmer.weights(x)
    assert a.shape == (3, 40, 10) and torch.allclose(a.sum(1), torch.ones(3, 10))
    model = _sit(keep_rate=0.5, reverse=False).eval()
    with torch.no_grad():
        state = model.forward_tokens(torch.randn(2, 3, 32, 32), trace_source=True)
    assert state.x.shape[1] == 9
    assert torch.allclose(state.size[:, 1:].sum(1), torch.full((2,), 64.0))  # soft sizes: still 64 patches
    grid = vitslim.unmerge_grid(state)
    assert grid.shape == (2, 64, 8, 8) and (state.source >= 1).all()  # every patch maps to a live token


def test_identity_like_slimmer_equals_dense(monkeypatch):
    model = _sit(keep_rate=0.5, locations=[2], reverse=False).eval()
    dense = vitslim.unpatch(teacher_copy(model))
    slimmer = TokenSlimmer(64, 64)
    monkeypatch.setattr(slimmer, "weights", lambda x: torch.eye(64).expand(x.shape[0], 64, 64))
    model.vitslim_reducers["2"].slimmer = slimmer
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), dense(x), atol=1e-5)


def test_batch_one_and_batch_eight_agree_per_image():
    model = _sit(keep_rate=0.5).eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(8)])
    assert torch.allclose(together, alone, atol=1e-5)


def test_macs_count_the_slimmer_and_the_budget_search_lands():
    model = _sit(keep_rate=0.5, reverse=False)
    tokens = vitslim.describe(model)["tokens"]
    blocks_only = analytic_macs(model, [tuple(t) for t in tokens])
    c = 64
    # the MLP (C -> C/2 -> m per input token), the aggregation A^T X and the size update A^T s
    slim = sum(n * (c * c // 2 + c // 2 * m) + m * n * c + m * n for n, m in ((64, 32), (32, 16), (16, 8)))
    assert count_macs(model) == blocks_only + slim
    dense = count_macs(vitslim.unpatch(tiny_vit()))
    for target in (0.5, 0.7):
        model = vitslim.patch(tiny_vit(), "sit", macs=target)
        assert abs(count_macs(model) / dense - target) <= 0.02 * target


def test_frd_is_zero_when_student_and_teacher_agree_and_trains_through_the_reverse_modules():
    torch.manual_seed(0)
    model = tiny_vit()
    teacher = teacher_copy(model)
    vitslim.patch(model, "sit", keep_rate=1.0)  # nothing slimmed: the student is the teacher
    model.train()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    logits, aux = StudentForward(model)(images)
    assert len(aux) == 4  # one FRD target per block
    _, parts = Criterion(kd_weight=2.0, token_weight=2.0)(logits, labels, aux, teacher_outputs(teacher, images))
    assert parts["frd"].item() == pytest.approx(0.0, abs=1e-10) and parts["kd"].item() == pytest.approx(0, abs=1e-6)

    vitslim.patch(model, "sit", keep_rate=0.5)
    logits, aux = StudentForward(model.train())(images)
    total, parts = Criterion(kd_weight=2.0, token_weight=2.0)(logits, labels, aux, teacher_outputs(teacher, images))
    assert parts["frd"].item() > 0
    total.backward()
    rtsm = model.vitslim_reducers["3"].reverse
    assert isinstance(rtsm, ReverseSlimmer) and rtsm.token_mlp.fc1.weight.grad.abs().sum() > 0


def test_reverse_modules_train_at_5x_with_decay_and_are_dropped_for_inference(tmp_path):
    model = _sit(keep_rate=0.5)
    groups = param_groups(model, TrainConfig(weight_decay=0.05))
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["vitslim_reducers.1.reverse.norm1.bias"]["lr_scale"] == 5.0
    assert by_name["vitslim_reducers.1.reverse.norm1.bias"]["weight_decay"] == 0.05  # decay on everything
    assert by_name["vitslim_reducers.1.slimmer.mlp.fc1.bias"]["weight_decay"] == 0.0
    assert by_name["vitslim_reducers.1.slimmer.mlp.fc1.weight"]["lr_scale"] == 1.0

    teacher = teacher_copy(vitslim.unpatch(tiny_vit()))
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 32, 32), torch.arange(16) % 10)
    fit(model, data, teacher=teacher, config=TrainConfig(epochs=1, batch_size=8, kd_weight=1.0, token_weight=2.0),
        out_dir=tmp_path, progress=False)
    deployed = load(tmp_path / "last.pt", model=tiny_vit())  # built by hand: the checkpoint has no architecture
    assert deployed.vitslim_config["options"]["reverse"] is False
    assert not any("reverse" in k for k in deployed.state_dict())
    fresh = vitslim.patch(tiny_vit(), "sit", **deployed.vitslim_config["options"])
    fresh.load_state_dict(deployed.state_dict())  # strict: the inference model's weights, nothing else
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))
    assert any("reverse" in k for k in load(tmp_path / "last.pt", model=tiny_vit(), training=True).state_dict())


def test_bad_options_fail_clearly():
    with pytest.raises(vitslim.VitslimError, match="locations must be >= 1"):
        vitslim.patch(tiny_vit(), "sit", locations=[0, 2])
    with pytest.raises(vitslim.VitslimError, match="unknown sit options"):
        vitslim.patch(tiny_vit(), "sit", ratio=0.5)
    with pytest.raises(vitslim.VitslimError, match="keep_rate"):
        vitslim.patch(tiny_vit(), "sit", keep_rate=0)
