"""SPViT: selector, masked training forward, package token, real pruning at inference, budgets."""
import pytest
import torch

import vitslim
from vitslim.measure.macs import count_macs
from vitslim.methods.spvit import TokenSelector, keep_targets
from vitslim.methods.spvit import policy_attention as _policy_attention
from vitslim.train import Criterion, teacher_copy
from vitslim.train.task import StudentForward, teacher_outputs
from vitslim.train.losses import AuxLoss, TokenTarget

from conftest import tiny_vit


def _spvit(**options):
    torch.manual_seed(0)
    return vitslim.patch(tiny_vit(), "spvit", **options)  # 64 patches + CLS, depth 4: selectors before 1, 2, 3


def test_targets_and_scheduled_token_counts():
    assert keep_targets(0.7, [0, 0, 0]) == [0.7, 0.49, 0.343]
    assert keep_targets([0.617, 0.369, 0.137], [0, 0, 0]) == [0.617, 0.369, 0.137]  # the official DeiT targets
    with pytest.raises(vitslim.VitslimError, match="must not grow"):
        keep_targets([0.5, 0.7, 0.3], [0, 0, 0])
    # a model with stages (PiT) restores its grid between them: the targets restart in each stage
    assert keep_targets(0.7, [0, 0, 1, 2]) == [0.7, 0.49, 0.7, 0.7]
    assert keep_targets([0.5, 0.7], [0, 1]) == [0.5, 0.7]
    model = _spvit(keep_rate=0.5).eval()
    # int(64 * 0.5^s) patches alive after stage s, plus one package token per stage so far
    assert [t[0] for t in vitslim.describe(model)["tokens"]] == [65, 1 + 32 + 1, 1 + 16 + 2, 1 + 8 + 3]


def test_training_forward_keeps_shapes_and_masks_the_dropped_tokens():
    model = _spvit(keep_rate=0.5).train()
    x = torch.randn(4, 3, 32, 32)
    state = model.forward_tokens(x)
    assert state.x.shape == (4, 65 + 3, 64)  # nothing removed, three package tokens appended
    policy = state.kernel.policy  # the masked-attention kernel SPViT installs for the later blocks
    assert policy.shape == (4, 68) and torch.equal(policy[:, 0], torch.ones(4)) and (policy[:, -3:] == 1).all()
    kept = policy[:, 1:65]
    assert set(kept.unique().tolist()) <= {0.0, 1.0} and 0 < kept.sum() < kept.numel()
    # the masks are nested: what stage 2 keeps, stage 1 kept
    assert ((state.kernel.keep[2] <= state.kernel.keep[1]) & (state.kernel.keep[1] <= state.kernel.keep[0])).all()
    # masked attention: a dropped key gets (almost) no weight from other queries, but itself
    logits = torch.randn(4, 2, 68, 68)
    attn = _policy_attention(logits, policy)
    dropped = (policy == 0).nonzero()
    b, j = dropped[0].tolist()
    others = [i for i in range(68) if i != j]
    assert attn[b, :, others, j].max() < 1e-6 and attn[b, :, j, j].min() > 0
    assert torch.allclose(attn.sum(-1), torch.ones(4, 2, 68), atol=1e-5)
    names = [a.name for a in state.aux]
    assert names.count("ratio") == 3 and isinstance(state.aux[-1], TokenTarget)


def test_ratio_loss_and_token_target_values():
    model = _spvit(keep_rate=0.5).train()
    state = model.forward_tokens(torch.randn(4, 3, 32, 32))
    ratios = [a for a in state.aux if isinstance(a, AuxLoss)]
    for stage, (loss, keep, target) in enumerate(zip(ratios, state.kernel.keep, [0.5, 0.25, 0.125])):
        assert loss.value.item() == pytest.approx(2.0 / 3 * (keep.mean().item() - target) ** 2, rel=1e-5)
    token = state.aux[-1]
    assert token.block == -1 and token.student.shape == (4, 64, 64) and torch.equal(token.mask, state.kernel.keep[-1] > 0.5)


def test_package_token_is_the_keep_probability_weighted_sum_of_dropped_tokens():
    from vitslim.tokens import TokenState, init_source

    model = _spvit(keep_rate=0.5).eval()
    stage = model.vitslim_reducers["1"]
    x = torch.randn(2, 65, 64)
    with torch.no_grad():
        _, prob = stage.selector(x[:, 1:])
        state = TokenState(x=x.clone(), num_prefix=1, grid0=(8, 8), source=init_source(2, (8, 8), 1, x.device))
        state = stage.before_block(state)
    assert state.x.shape == (2, 1 + 32 + 1, 64)
    for b in range(2):
        kept = prob[b].topk(32).indices.sort().values
        dropped = torch.ones(64, dtype=torch.bool)
        dropped[kept] = False
        assert torch.equal(state.x[b, 1:33], x[b, 1 + kept])  # kept in raster order
        expected = (prob[b, dropped, None] * x[b, 1:][dropped]).sum(0)  # not normalised, as in training
        assert torch.allclose(state.x[b, -1], expected, atol=1e-5)
        assert state.size[b, -1].item() == 32  # the package stands for the 32 dropped patches
        assert (state.source[b, dropped] == 33).all()  # their patches map to the package token


def test_inference_prunes_the_same_count_per_image_at_any_batch_size():
    model = _spvit(keep_rate=0.6).eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(8)])
        state = model.forward_tokens(x)
    assert torch.allclose(together, alone, atol=1e-5)
    assert state.x.shape[1] == 1 + int(64 * 0.6 ** 3 + 1e-9) + 3
    with torch.no_grad():  # deterministic: no Gumbel noise at inference
        assert torch.equal(model(x), together)


def test_budget_search_meets_the_macs_target_and_counts_the_selectors():
    dense = count_macs(vitslim.unpatch(tiny_vit()))
    for target in (0.5, 0.7):
        model = vitslim.patch(tiny_vit(), "spvit", macs=target)
        assert abs(count_macs(model) / dense - target) <= 0.02 * target
    # the selectors' Linear layers are in the count: with keep_rate 1.0 nothing is pruned, yet MACs grow
    assert count_macs(vitslim.patch(tiny_vit(), "spvit", keep_rate=1.0)) > dense


def test_training_through_the_engine_losses():
    torch.manual_seed(0)
    model = tiny_vit()
    teacher = teacher_copy(model)
    vitslim.patch(model, "spvit", keep_rate=0.5)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    logits, aux = StudentForward(model.train())(images)
    total, parts = Criterion(kd_weight=0.5, token_weight=0.5)(logits, labels, aux, teacher_outputs(teacher, images))
    assert {"ce", "kd", "ratio", "token"} <= set(parts) and parts["token"].item() > 0
    total.backward()
    selector = model.vitslim_reducers["1"].selector
    assert selector.in_proj.weight.grad.abs().sum() > 0  # gradients reach the selector through the masks


def test_selector_weights_are_shared_across_heads():
    sel = TokenSelector(64, 4)
    assert sel.in_proj.weight.shape == (16, 16)  # one scorer on d = 16 channels, applied to every head
    decision, prob = sel(torch.randn(2, 10, 64))
    assert decision.shape == (2, 10, 2) and ((prob > 0) & (prob < 1)).all()


def test_latency_budget_records_what_it_measured():
    from vitslim.measure import fit_latency

    model = tiny_vit()
    record = fit_latency(model, 1e6, runs=5)  # any setting is fast enough: no pruning needed
    options = model.vitslim_config["options"]
    assert options["keep_rate"] == [1.0, 1.0, 1.0] and 0 < record["latency_ms"] < 1e6
    # the measurement goes to the run record, not into the options (options must match on resume)
    assert "latency_ms" not in options and record["options"] == options
    with pytest.raises(vitslim.VitslimError, match="out of reach"):
        fit_latency(tiny_vit(), 1e-6, runs=5)
    from vitslim.measure import fit_latency as generic
    generic(tiny_vit(), 1e6, "tome", runs=5)  # any method with budget levels


def test_cli_latency_budget_needs_spvit(capsys):
    from vitslim.cli import main

    assert main(["train", "--model", "vit_tiny_patch16_224", "--data", "cifar10", "--method", "tome",
                 "--latency-ms", "5"]) == 2
    assert "--latency-ms goes with --method spvit" in capsys.readouterr().err


def test_cli_latency_budget_run_resumes(tmp_path, capsys):
    """The measured latency goes to the run record, so the same --latency-ms command can resume."""
    import json

    from vitslim.cli import main

    command = ["train", "--method", "spvit", "--latency-ms", "1e6", "--epochs", "1", "--batch-size", "8",
               "--limit", "16", "--no-eval", "--no-progress", "--out", str(tmp_path), "--resume", "auto"]
    assert main(command) == 0
    assert main(command) == 0, capsys.readouterr().err  # before the fix: "cannot resume: ... latency_ms"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 0 < summary["latency"]["latency_ms"] < 1e6 and "latency_ms" not in summary["latency"]["options"]
