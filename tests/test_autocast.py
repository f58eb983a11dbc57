"""Every registered method trains a step through the training engine and evaluates under bf16 autocast (CPU)."""
import pytest
import torch

import vitslim
from vitslim.measure.macs import count_macs
from vitslim.train import TrainConfig, fit, teacher_copy

from conftest import tiny_vit

# options that really reduce the tiny model (8x8 patches, depth 4); atme: its default schedule (1:W, 2:H)
OPTIONS = {"atme": {}}
EXPECTED = {"tome", "evit", "topk", "sit", "spvit", "prune_merge", "atme", "cdcp", "cait"}


def test_every_registered_method_is_covered():
    assert EXPECTED <= set(vitslim.methods())


@pytest.mark.parametrize("method", vitslim.methods())
def test_train_step_and_eval_under_bf16_autocast(method):
    torch.manual_seed(0)
    model = tiny_vit()
    teacher = teacher_copy(model)  # sit and spvit distil tokens; the others distil logits
    dense_macs = count_macs(model)
    vitslim.patch(model, method, **OPTIONS.get(method, {"macs": 0.7}))
    assert count_macs(model) < 0.95 * dense_macs  # the method really reduces
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32), torch.arange(8) % 10)
    config = TrainConfig(precision="bf16", max_steps=1, epochs=1, batch_size=4, lr=1e-3, kd_weight=0.5,
                         log_every=1)
    records = []
    result = fit(model, data, teacher=teacher, config=config, progress=False, on_step=records.append)
    assert result["steps"] == 1 and len(records) == 1 and torch.isfinite(torch.tensor(records[0]["loss"]))
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the step changed weights
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
