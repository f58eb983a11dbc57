"""PiT (timm PoolingVisionTransformer): token methods inside each stage, the grid restored before each pooling."""
import json

import pytest
import torch

import timm
import vitslim
from vitslim.errors import VitslimError
from vitslim.families import family_of
from vitslim.measure.speed import ideal_model
from vitslim.train.task import teacher_outputs

# three stages (2, 6, 4 blocks) at widths 16, 32, 64 on a 7x7 -> 4x4 -> 2x2 grid: every PiT code path, tiny
TINY = dict(img_size=64, base_dims=[16, 16, 16], heads=[1, 2, 4], num_classes=10)
ZERO = {"tome": {"r": 0}, "evit": {"keep_rate": 1.0}, "topk": {"keep_rate": 1.0}, "atme": {"schedule": ""}}
REDUCING = [*sorted(ZERO), "spvit"]  # SPViT always adds a package token: no zero-reduction setting


def pit(distilled: bool = False, **overrides) -> torch.nn.Module:
    """A tiny PiT with every parameter perturbed (zero biases and unit norms would hide mistakes)."""
    torch.manual_seed(0)
    name = "pit_ti_distilled_224" if distilled else "pit_ti_224"
    model = timm.create_model(name, **{**TINY, **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _images(batch=2, size=64):
    torch.manual_seed(1)
    return torch.randn(batch, 3, size, size)


def _logits(model, x):
    with torch.inference_mode():
        return model(x)


@pytest.mark.parametrize("distilled", [False, True])
@pytest.mark.parametrize("method", sorted(ZERO))
def test_zero_reduction_equals_the_model_and_unpatch_restores_it(method, distilled):
    model = pit(distilled)
    x = _images()
    ref = _logits(model, x)
    vitslim.patch(model, method, **ZERO[method])
    torch.testing.assert_close(_logits(model, x), ref, rtol=0, atol=1e-6)
    vitslim.unpatch(model)
    assert torch.equal(_logits(model, x), ref)
    assert not hasattr(model, "_vitslim_blocks")


@pytest.mark.parametrize("method", REDUCING)
def test_reducing_matches_budget_and_batch_of_one(method):
    model = pit(img_size=224)  # 27x27 -> 14x14 -> 7x7: fine enough steps for a 2% budget
    dense = vitslim.count_macs(model)
    vitslim.patch(model, method, macs=0.6)
    assert abs(vitslim.count_macs(model) / dense - 0.6) <= 0.02 * 0.6
    tokens = vitslim.describe(model)["tokens"]
    assert tokens[1][1] < tokens[0][0]  # it reduces inside the first stage
    x = _images(8, 224)
    batched = _logits(model, x)
    single = torch.cat([_logits(model, x[i:i + 1]) for i in range(8)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)


def test_pruned_patches_come_back_with_their_dropped_value_before_the_pooling():
    """top-k after block 0's attention, by hand with timm's own modules: the kept tokens run block 0's MLP
    and block 1, the pruned ones keep their value from the moment they were dropped; then timm's pooling
    and the rest of the model."""
    model = pit()
    x = _images()
    vitslim.patch(model, "topk", keep_rate=0.5, locations=[0])
    taps = {}
    with torch.inference_mode():
        got = model(x)
        model.forward_tokens(x, on_block=lambda i, s: taps.setdefault(i, s.source.clone()))
        vitslim.unpatch(model)
        stage = model.transformers[0]
        tokens = model.pos_drop(model.patch_embed(x) + model.pos_embed)
        cls = model.cls_token.expand(2, -1, -1)
        h = torch.cat([cls, tokens.flatten(2).transpose(1, 2)], dim=1)
        blk0, blk1 = stage.blocks
        h = h + blk0.attn(blk0.norm1(h))  # the attention residual: where top-k drops
        grid, cls_out = h[:, 1:].clone(), []
        for b in range(2):
            kept = torch.nonzero(taps[1][b] >= 0).flatten()  # patches still alive after block 1, in raster order
            assert 0 < len(kept) < grid.shape[1]
            t = h[b:b + 1, torch.cat([torch.zeros(1, dtype=torch.long), kept + 1])]
            t = t + blk0.mlp(blk0.norm2(t))
            t = blk1(t)
            grid[b, kept] = t[0, 1:]
            cls_out.append(t[:, :1])
        side = grid.transpose(1, 2).reshape(2, -1, *model.patch_embed.grid_size)
        side, cls_tokens = model.transformers[1:]((side, torch.cat(cls_out)))
        want = model.forward_head(model.norm(cls_tokens))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_spvit_trains_a_step_with_package_tokens_through_the_pooling():
    """Gumbel masks in each stage, the package tokens carried across the poolings, the ratio loss per stage,
    and the final token distillation shaped like the dense teacher's last-stage tokens."""
    model = pit().train()
    teacher = pit()
    vitslim.patch(model, "spvit", keep_rate=0.7)
    assert model.vitslim_config["options"]["locations"] == [1, 3, 9]  # one selector per stage
    assert model.vitslim_config["options"]["keep_rate"] == [0.7, 0.7, 0.7]  # targets restart in every stage
    x = _images(4)
    state = model.forward_tokens(x)
    n_last = state.num_patches0
    assert state.unplaced == 3 and state.x.shape[1] == 1 + n_last + 3  # masked, not removed, while training
    assert [a.name for a in state.aux] == ["ratio", "ratio", "ratio", "token"]
    target = state.aux[-1]
    _, teacher_tokens = teacher_outputs(teacher, x)({target.block})
    assert teacher_tokens[target.block].shape == target.student.shape
    out = model.forward_head_state(state)
    (out.square().mean() + sum(a.value for a in state.aux[:3])).backward()
    selectors = [p for n, p in model.named_parameters() if n.startswith("vitslim_reducers")]
    assert all(p.grad is not None for p in selectors) and all(p.grad.abs().sum() > 0 for p in selectors[:3])


def test_spvit_prunes_for_real_at_inference():
    model = vitslim.patch(pit(img_size=224), "spvit", keep_rate=0.5).eval()
    with torch.inference_mode():
        state = model.forward_tokens(_images(2, 224))
    assert state.unplaced == 3  # the three stages' package tokens, mapped through both poolings
    assert state.x.shape[1] == 1 + int(49 * 0.5) + 3
    tokens = [n for n, _ in vitslim.describe(model)["tokens"]]
    assert tokens[:3] == [1 + 729, 1 + 364 + 1, 1 + 196 + 1]  # pruned after stage 1's selector; full grid again
    assert tokens[-1] == 1 + 24 + 3


@pytest.mark.parametrize("method", ["sit", "prune_merge", "cdcp", "cait"])
def test_methods_that_do_not_run_on_pit_are_refused_in_one_line(method):
    model = pit()
    with pytest.raises(VitslimError) as err:
        vitslim.patch(model, method, macs=0.6)
    message = str(err.value)
    assert "\n" not in message and f"{method} does not run on pit models" in message
    assert "atme, evit, spvit, tome, topk" in message
    assert not vitslim.is_patched(model)


def test_the_wrong_image_size_is_refused_in_one_line():
    model = vitslim.patch(pit(), "tome", r=2)
    with pytest.raises(VitslimError, match="this model takes 64x64 images, got 32x32"):
        model(_images(1, 32))


def test_ideal_of_a_pit_schedule_runs_the_dense_stages():
    model = pit()
    x = _images()
    ref = _logits(model, x)
    vitslim.patch(model, "tome", r=0)
    with torch.inference_mode():
        torch.testing.assert_close(ideal_model(model)(x), ref, rtol=0, atol=1e-6)
    vitslim.patch(model, "evit", keep_rate=0.5)
    with torch.inference_mode():
        assert ideal_model(model)(x).shape == ref.shape


def test_atme_merges_within_each_stage_and_its_budgets_reach_half():
    model = pit(img_size=224)
    vitslim.patch(model, "atme", macs=0.5)
    tokens = [n for n, _ in vitslim.describe(model)["tokens"]]
    assert tokens[0] == 1 + 27 * 27 and tokens[2] == 1 + 14 * 14 and tokens[8] == 1 + 7 * 7  # each stage starts whole
    with torch.inference_mode():
        state = model.forward_tokens(_images(2, 224))
    assert state.grid is not None and state.x.shape[1] == 1 + state.grid[0] * state.grid[1]  # still a grid


def test_pit_family_describes_its_stages():
    model = pit()
    family = family_of(model)
    assert family.name == "pit" and len(family.blocks(model)) == 12
    assert family.stage_patches(model) == [49] * 2 + [16] * 6 + [4] * 4
    assert vitslim.describe(model)["tokens"] == [(50, 50)] * 2 + [(17, 17)] * 6 + [(5, 5)] * 4
    assert family.teacher_tokens(model, _images())[1].shape == (2, 4, 64)


@pytest.mark.parametrize("method", ["tome", "spvit"])
def test_pit_saves_and_exports_to_onnx(method, tmp_path):
    pytest.importorskip("onnxruntime")
    from vitslim import export

    options = {"macs": 0.6} if method == "tome" else {"keep_rate": 0.5}  # SPViT's selectors cost much at 64 px
    model = vitslim.patch(pit(distilled=method == "tome"), method, **options)
    x = _images(3)
    ref = _logits(model, x)
    export.save(model, tmp_path / "m.safetensors")
    torch.testing.assert_close(_logits(export.load(tmp_path / "m.safetensors"), x), ref, rtol=0, atol=1e-6)
    session = export.onnx_session(export.to_onnx(model, tmp_path / "m.onnx", input_size=(3, 64, 64)))
    torch.testing.assert_close(session(x), ref, rtol=0, atol=1e-4)


def test_dense_features_refuse_pit_in_one_line():
    from vitslim.dense.features import features

    with pytest.raises(VitslimError, match="shrink their patch grid between stages"):
        features(vitslim.patch(pit(), "tome", r=2), _images())


def test_pit_fine_tunes_with_spvit_through_the_engine_and_loads_back(tmp_path):
    """The engine's SPViT recipe losses (ratio per stage, token distillation against the dense PiT's last stage),
    and a checkpoint rebuilt from the PiT's inferred spec."""
    import numpy as np
    from PIL import Image

    from vitslim.train import TrainConfig, fit, load, teacher_copy

    for label, base in (("dark", 70), ("bright", 180)):
        (tmp_path / "data" / "train" / label).mkdir(parents=True)
        for i in range(8):
            pixels = np.clip(base + np.random.default_rng(i).normal(0, 40, (64, 64, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / "train" / label / f"{i}.png")
    model = pit(num_classes=2)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 64, 64), "crop_pct": 1.0}
    teacher = teacher_copy(model)
    vitslim.patch(model, "spvit", keep_rate=0.7)
    config = TrainConfig(epochs=1, batch_size=8, lr=1e-3, warmup_epochs=0.0, log_every=1, deterministic=True,
                         kd_weight=0.5, token_weight=0.5)
    fit(model, str(tmp_path / "data"), teacher=teacher, config=config, out_dir=tmp_path / "run", progress=False)
    steps = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s["event"] == "step"]
    assert len(steps) == 2 and {"ratio", "token"} <= set(steps[0])
    loaded = load(tmp_path / "run" / "last.pt")
    x = _images(3)
    torch.testing.assert_close(_logits(loaded, x), _logits(model.eval(), x), rtol=0, atol=0)


def test_pit_compiles_to_one_graph():
    """The stage ends (restore, pool, restart) have no data-dependent branch: one graph for batches >= 2."""
    import torch._dynamo

    from vitslim.export.runtime import runtime

    model = vitslim.patch(pit(), "tome", r=3)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = runtime(model, "compile")
    with torch.inference_mode():
        for batch in (2, 5):
            torch.testing.assert_close(compiled(_images(batch)), model(_images(batch)), rtol=0, atol=1e-4)
    counters = torch._dynamo.utils.counters
    assert (sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]) == (0, 1)
