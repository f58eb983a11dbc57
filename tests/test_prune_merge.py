"""Prune-and-Merge: scoring, the global plan, merge/reconstruct matrices, full grid, budgets, static shapes."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vitslim
import timm
from vitslim.calibration import backward_bytes, dense_copy
from vitslim.measure.macs import analytic_macs, count_macs
from vitslim.methods.prune_merge import (LayerPlan, PruneMerge, calibrate, data_free_images, global_plan, load_scores,
                                         merge_matrix, pinv, save_scores)
from vitslim.train import TrainConfig
from vitslim.train.engine import build_optimizer, param_groups

from conftest import tiny_vit


def _model(**kwargs):
    torch.manual_seed(0)
    return tiny_vit(**kwargs)  # 8x8 = 64 patches + CLS, depth 4, width 64


def _scores(depth=4, n=64, seed=1):
    return torch.rand(depth, n, generator=torch.Generator().manual_seed(seed)) + 0.01


def test_global_plan_hits_the_official_keep_and_prune_counts():
    # the worked example of the reference: 196 patches, 12 blocks, prune 0.1, keep 0.6
    plans = global_plan(_scores(12, 196), keep_rate=0.6, prune_rate=0.1, blocks=list(range(12)))
    assert sum(int(p.pruned.sum()) for p in plans) == 19 * 12
    assert sum(len(p.centres) for p in plans) == 117 * 12
    for plan in plans:
        assert not plan.pruned[plan.centres].any()  # roles are disjoint
    # the depth discount keeps more centres early (equal raw scores: the discount alone decides)
    flat = torch.ones(12, 196) + 1e-3 * _scores(12, 196)
    counts = [len(p.centres) for p in global_plan(flat, 0.5, 0.1, list(range(12)))]
    assert counts[0] == 196 and counts == sorted(counts, reverse=True)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.05, 0.9), st.floats(0.0, 0.1), st.booleans(), st.integers(1, 3))
def test_merge_matrix_groups_are_contiguous_and_cover_every_kept_patch(seed, keep, prune, quirk, prefix):
    scores = torch.rand(1, 64, generator=torch.Generator().manual_seed(seed)) + 0.01
    plan = global_plan(scores, keep, prune, [0])[0]
    m = merge_matrix(plan, grid_width=8, num_prefix=prefix, row_quirk=quirk)
    assert m.shape == (prefix + len(plan.centres), prefix + 64)
    assert torch.equal(m[:prefix, :prefix], torch.eye(prefix, dtype=m.dtype))
    assert (m[:prefix, prefix:] == 0).all() and (m[prefix:, :prefix] == 0).all()  # prefix tokens apart
    patches = m[prefix:, prefix:]
    owners = (patches != 0).float()
    # every kept patch is in exactly one group; pruned patches in none
    assert torch.equal(owners.sum(0), (~plan.pruned).double())
    for g, c in enumerate(plan.centres):
        assert patches[g, c] == 1.0  # the centre's own weight
        cols = (owners[g] != 0).nonzero().flatten()
        span = torch.arange(int(cols.min()), int(cols.max()) + 1)
        assert bool(plan.pruned[span].logical_or(owners[g, span] != 0).all())  # contiguous up to pruned gaps
    assert ((patches.sum(1) >= 1.0 - 1e-12)).all()  # rows are not normalised: the centre weighs 1


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.05, 0.9), st.floats(0.0, 0.1), st.integers(1, 3), st.booleans())
def test_closed_form_pinv_equals_torch_pinv(seed, keep, prune, prefix, zeros):
    scores = torch.rand(1, 64, generator=torch.Generator().manual_seed(seed)) + 0.01
    if zeros:
        scores[0, :6] = 0.0  # zero-score patches: zero weights, zero-norm rows are possible
    m = merge_matrix(global_plan(scores, keep, prune, [0])[0], grid_width=8, num_prefix=prefix)
    assert torch.allclose(pinv(m), torch.linalg.pinv(m), rtol=0, atol=1e-12)
    dense = torch.randn(5, 9, dtype=torch.float64)  # overlapping rows: torch's SVD pinv
    assert torch.equal(pinv(dense), torch.linalg.pinv(dense))


def test_merge_matrix_splits_at_midpoints_and_row_ends():
    # 2 rows of 4 patches, centres 1 and 6, equal scores: the midpoint ceil(3.5)=4 is a row end
    plan = LayerPlan(torch.zeros(8, dtype=torch.bool), [1, 6], torch.ones(8, dtype=torch.float64))
    m = merge_matrix(plan, grid_width=4, num_prefix=1, row_quirk=False)
    assert m[1, 1:].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert m[2, 1:].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    # the official quirk: a centre in the last column (3) counts as the next row, so its group runs on
    plan = LayerPlan(torch.zeros(8, dtype=torch.bool), [3, 7], torch.ones(8, dtype=torch.float64))
    quirk = merge_matrix(plan, grid_width=4, num_prefix=1, row_quirk=True)
    plain = merge_matrix(plan, grid_width=4, num_prefix=1, row_quirk=False)
    assert quirk[1, 1:].tolist() == [1, 1, 1, 1, 1, 0, 0, 0] and plain[1, 1:].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]


def test_no_pruning_and_all_centres_equals_the_dense_model():
    dense = _model()
    model = vitslim.patch(_model(), "prune_merge", scores=_scores(), keep_rate=1.0, prune_rate=0.0)
    for reducer in model.vitslim_reducers.values():
        assert torch.equal(reducer.merge, torch.eye(65))  # M = identity
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), dense(x), atol=1e-6)


def test_reconstruct_is_the_pseudo_inverse_of_merge():
    model = vitslim.patch(_model(), "prune_merge", scores=_scores(), keep_rate=0.4, prune_rate=0.1)
    for reducer in model.vitslim_reducers.values():
        m, r = reducer.merge.double(), reducer.reconstruct.double()
        assert torch.allclose(m @ r, torch.eye(m.shape[0], dtype=m.dtype), atol=1e-5)  # merge(reconstruct(z)) = z
        proj = r @ m  # the orthogonal projection onto the centre subspace (the row space of M)
        assert torch.allclose(proj @ proj, proj, atol=1e-5) and torch.allclose(proj, proj.T, atol=1e-5)
        pruned = reducer.bypass.bool()
        assert (r[pruned] == 0).all() and (m[:, pruned] == 0).all()  # pruned tokens only bypass


def test_every_block_returns_the_full_grid_and_pruned_tokens_bypass():
    model = vitslim.patch(_model(), "prune_merge", scores=_scores(), keep_rate=0.4, prune_rate=0.1)
    opts = model.vitslim_config["options"]
    trace = vitslim.describe(model)["tokens"]
    assert [t[0] for t in trace] == [1 + c for c in opts["tokens"]]  # blocks run on m_l tokens
    state = model.forward_tokens(torch.randn(2, 3, 32, 32), trace_source=True)
    assert state.x.shape == (2, 65, 64) and state.size is None and state.grid == (8, 8)
    assert vitslim.unmerge_grid(state).shape == (2, 64, 8, 8)
    # a pruned token leaves its block unchanged
    reducer, blk = model.vitslim_reducers["0"], model.blocks[0]
    x = torch.randn(2, 65, 64)
    from vitslim.patch import block_forward
    from vitslim.tokens import TokenState

    out = block_forward(blk, TokenState(x=x.clone(), num_prefix=1, grid0=(8, 8), grid=(8, 8)), reducer).x
    pruned = reducer.bypass.bool()
    assert pruned.any() and torch.equal(out[:, pruned], x[:, pruned])


def test_batch_one_equals_batch_eight_and_macs_include_merge_and_reconstruct():
    model = vitslim.patch(_model(), "prune_merge", scores=_scores(), keep_rate=0.5, prune_rate=0.1)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        y8 = model(x)
        y1 = torch.cat([model(x[i:i + 1]) for i in range(8)])
    assert torch.allclose(y8, y1, atol=1e-5)
    tokens = vitslim.describe(model)["tokens"]
    pruned = sum(model.vitslim_config["options"]["pruned"])
    # M (m x N) and R (N x m) on C channels, and the pruned tokens added back (one add per element)
    extra = sum(2 * m_in * 65 * 64 for m_in, _ in tokens) + pruned * 64
    assert count_macs(model) == analytic_macs(model, tokens) + extra


@pytest.mark.parametrize("target", [0.5, 0.7])
def test_macs_budget(target):
    dense = count_macs(_model())
    model = vitslim.patch(_model(), "prune_merge", macs=target, scores=_scores(), prune_rate=0.1)
    assert abs(count_macs(model) / dense - target) <= 0.02 * target
    assert model.vitslim_config["options"]["prune_rate"] == 0.1


def test_calibration_is_deterministic_and_leaves_the_model_unchanged():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = [blk.attn.fused_attn for blk in model.blocks]
    a, b = calibrate(model, seed=3), calibrate(model, seed=3)
    assert a.shape == (4, 64) and torch.equal(a, b) and (a >= 0).all() and a.sum() > 0
    assert not torch.equal(a, calibrate(model, seed=4))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert [blk.attn.fused_attn for blk in model.blocks] == fused  # scored on a copy
    images, labels = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    loader = [(images[:3], labels[:3]), (images[3:], labels[3:])]
    assert torch.equal(calibrate(model, loader), calibrate(model, loader))
    one = calibrate(model, (images[:3], labels[:3]))
    two = calibrate(model, loader)
    assert not torch.allclose(one, two)  # the second batch adds


def test_calibration_matches_a_hand_computed_score():
    model = _model(depth=1)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    attn = model.blocks[0].attn
    attn.fused_attn = False
    kept = {}
    handle = attn.attn_drop.register_forward_hook(lambda m, i, o: kept.setdefault("a", o))
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    (grad,) = torch.autograd.grad(loss, kept["a"])
    handle.remove()
    attn.fused_attn = True
    a = kept["a"]
    expected = (a * grad).sum((0, 1, 2))[1:].abs() / (2 * 4 * 65)
    assert torch.allclose(calibrate(model, (images, labels))[0], expected.detach(), rtol=1e-4, atol=1e-12)


def test_micro_batches_give_the_whole_batch_scores():
    # the score is |sum over a batch's images| per batch: micro-batches must add signed sums, abs per batch
    model = _model()
    images, labels = torch.randn(7, 3, 32, 32), torch.randint(0, 10, (7,))
    per_image = backward_bytes(dense_copy(model), explicit_attention=True)
    for data in ((images, labels), images):
        whole = calibrate(model, data)  # the tiny model fits: one pass per batch
        for budget in (1, 3 * per_image):  # micro-batches of 1 image, and of 3 (3 + 3 + 1)
            assert torch.allclose(calibrate(model, data, memory_budget=budget), whole, rtol=1e-4, atol=1e-12)
    one_per_batch = calibrate(model, [(images[i:i + 1], labels[i:i + 1]) for i in range(7)]) / 7  # abs per image
    assert not torch.allclose(one_per_batch, calibrate(model, (images, labels)), rtol=1e-2)


def test_data_free_pass_scores_fewer_images_on_big_models():
    sizes = {}
    for name in ("deit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224"):
        with torch.device("meta"):  # shapes only: no weights allocated
            sizes[name] = data_free_images(timm.create_model(name))
    # DeiT-S keeps its 2 batches of 16 noise images (same plans as before); ViT-L/16 scores 2 images
    assert sizes == {"deit_small_patch16_224": 32, "vit_base_patch16_224": 8, "vit_large_patch16_224": 2}


@pytest.mark.parametrize("kwargs", [{}, {"reg_tokens": 2}, {"class_token": False, "global_pool": "avg"}])
def test_level_macs_formula_equals_the_counted_macs(kwargs):
    base = _model(**kwargs)
    dense = count_macs(base)
    for options in (dict(keep_rate=0.4, prune_rate=0.1), dict(keep_rate=0.7, prune_rate=0.0),
                    dict(keep_rate=0.3, blocks=[1, 3])):
        formula = PruneMerge.level_macs(base, dict(scores=_scores(), **options), dense)
        assert formula == count_macs(vitslim.patch(_model(**kwargs), "prune_merge", scores=_scores(), **options))


def test_bf16_autocast_forward_and_backward():
    model = vitslim.patch(_model(), "prune_merge", scores=_scores(), keep_rate=0.4, prune_rate=0.1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.shape == (2, 10) and torch.allclose(low.float(), reference, atol=0.1, rtol=0.1)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = model.forward_tokens(x)
    assert state.x.dtype == torch.float32  # the token stream keeps timm's dtype under autocast
    model.forward_head_state(state).float().sum().backward()
    assert all(r.merge.grad is not None and r.reconstruct.grad.abs().sum() > 0 for r in model.vitslim_reducers.values())


def test_scores_file_round_trip_and_rebuild_from_options(tmp_path):
    path = save_scores(tmp_path / "s.safetensors", _scores(), data="test")
    assert torch.equal(load_scores(path), _scores())
    model = vitslim.patch(_model(), "prune_merge", scores=str(path), keep_rate=0.5)
    with torch.no_grad():  # as if trained: M and R move off their initial values
        for reducer in model.vitslim_reducers.values():
            reducer.merge.add_(0.01 * torch.randn_like(reducer.merge))
            reducer.reconstruct.add_(0.01 * torch.randn_like(reducer.reconstruct))
    # the checkpoint path: the resolved options (no scores) rebuild the shapes, the state dict the values
    options = model.vitslim_config["options"]
    assert "scores" not in options and len(options["tokens"]) == 4
    rebuilt = vitslim.patch(_model(), "prune_merge", **options)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    with pytest.raises(vitslim.VitslimError, match="vitslim calibrate"):
        load_scores(tmp_path / "missing.safetensors")


def test_prefix_tokens_pass_through_untouched():
    model = vitslim.patch(_model(reg_tokens=2), "prune_merge", scores=_scores(), keep_rate=0.5)
    m = model.vitslim_reducers["0"].merge
    assert m.shape[1] == 67 and torch.equal(m[:3, :3], torch.eye(3))
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_static_plan_compiles_once_and_exports():
    model = vitslim.patch(_model(), "prune_merge", scores=_scores(), keep_rate=0.5, prune_rate=0.1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        explanation = torch._dynamo.explain(model)(x)
        assert explanation.graph_count == 1 and explanation.graph_break_count == 0
        exported = torch.export.export(model, (x,))
        assert torch.allclose(exported.module()(x), expected, atol=1e-6)


def test_merge_and_reconstruct_train_at_the_full_lr_without_decay():
    model = vitslim.patch(_model(), "prune_merge", scores=_scores(), keep_rate=0.5)
    groups = param_groups(model, TrainConfig(weight_decay=0.05))
    mr = [g for g in groups if any(n.endswith((".merge", ".reconstruct")) for n in g["names"])]
    assert len(mr) == 1 and mr[0]["weight_decay"] == 0.0 and mr[0]["lr_scale"] == 1.0
    assert len(mr[0]["names"]) == 8
    decayed = vitslim.patch(_model(), "prune_merge", scores=_scores(), keep_rate=0.5, decay_mr=True)
    assert all(g["weight_decay"] == 0.05 for g in param_groups(decayed, TrainConfig(weight_decay=0.05))
               if any(n.endswith(".merge") for n in g["names"]))
    # lr_groups="as_released": the released code's optimizer, decayed weights stuck at 1e-6
    optimizer, scheduler, _ = build_optimizer(decayed, TrainConfig(lr=1e-4, lr_groups="as_released"), 10, 10)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    lrs = {g["weight_decay"]: g["lr"] for g in optimizer.param_groups}
    assert lrs[0.05] == 1e-6 and 1e-6 < lrs[0.0] < 1e-4


def test_bad_options_say_what_to_do():
    with pytest.raises(vitslim.VitslimError, match="keep_rate \\+ prune_rate <= 1"):
        vitslim.patch(_model(), "prune_merge", scores=_scores(), keep_rate=0.95, prune_rate=0.1)
    with pytest.raises(vitslim.VitslimError, match="calibrate this model"):
        vitslim.patch(_model(), "prune_merge", scores=torch.rand(4, 49))
    with pytest.raises(vitslim.VitslimError, match="either calibration= .* or scores="):
        vitslim.patch(_model(), "prune_merge", scores=_scores(), calibration=torch.randn(2, 3, 32, 32))
    with pytest.raises(vitslim.VitslimError, match="unknown prune_merge options"):
        vitslim.patch(_model(), "prune_merge", scores=_scores(), keep=0.5)
    model = vitslim.patch(_model(), "prune_merge", scores=_scores())
    with pytest.raises(vitslim.VitslimError, match="takes 32x32 images"):
        model(torch.randn(1, 3, 16, 16))


# --- the segmentation span variant (PM-Segmenter) ------------------------------------------------------


def test_span_variant_with_the_identity_merge_equals_the_dense_model():
    base = _model().eval()
    model = vitslim.patch(_model().eval(), "prune_merge", span="1:2", scores=_scores(), keep_rate=1.0)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), base(images), rtol=0, atol=0)


def test_span_variant_merges_once_keeps_the_tokens_through_the_span_and_restores_the_grid():
    from vitslim.dense import features

    model = vitslim.patch(_model().eval(), "prune_merge", span="1:2", scores=_scores(), keep_rate=0.25)
    options = model.vitslim_config["options"]
    assert options["span"] == "1:2" and options["prune_rate"] == 0.0 and options["tokens"] == [16]
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        state = model.forward_tokens(images, trace=True)
        seen = {}
        model.forward_tokens(images, trace_source=True,
                             on_block=lambda i, s: seen.__setitem__(i, s.computed_source().clone()))
        fmap = features(model, images)
    assert state.trace == [(65, 65), (17, 17), (17, 17), (65, 65)]  # block 1 in, block 2 out: 16 + CLS
    assert len(seen[1].unique()) == 16 and (seen[1] >= 1).all()  # every patch lives in one of the 16 tokens
    assert torch.equal(seen[3][0], torch.arange(64) + 1)  # identity again after the reconstruct
    assert fmap.shape == (2, 64, 8, 8)
    assert PruneMerge.level_macs(_model(), dict(span="1:2", scores=_scores(), keep_rate=0.25),
                                 count_macs(_model())) == count_macs(model)


def test_span_scores_are_the_normalised_blocks_averaged_over_the_span():
    scores = _scores()
    scores[3] *= 1000  # outside the span: must not matter
    model = vitslim.patch(_model(), "prune_merge", span="0:2", scores=scores, keep_rate=0.25)
    chosen = scores[:3] / scores[:3].norm(dim=1, keepdim=True)
    want = sorted(chosen.mean(0).argsort(descending=True)[:16].tolist())
    assert model.vitslim_reducers["0"].merge.shape == (17, 65)
    centres = [int(i) for i in (model.vitslim_reducers["0"].merge[1:, 1:] == 1).float().argmax(1)]
    assert centres == want


def test_span_variant_with_macs_and_a_checkpoint_round_trip():
    from vitslim.train.checkpoint import model_state, restore_model

    model = vitslim.patch(_model(), "prune_merge", span="1:3", scores=_scores(), macs=0.8)
    assert abs(count_macs(model) / count_macs(_model()) - 0.8) < 0.05
    with torch.no_grad():
        model.vitslim_reducers["1"].merge.add_(0.01 * torch.randn_like(model.vitslim_reducers["1"].merge))
    rebuilt = restore_model(model_state(model), _model())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(images), model.eval()(images))


@pytest.mark.parametrize("options,message", [
    (dict(span="1:2", prune_rate=0.1), "prune_rate must be 0"),
    (dict(span="3:1"), "0 <= a <= b < 4"),
    (dict(span="one:two"), "span must look like"),
    (dict(span="1:2", blocks=[0, 1]), "span= or blocks="),
])
def test_span_variant_errors_say_what_to_do(options, message):
    with pytest.raises(vitslim.VitslimError, match=message):
        vitslim.patch(_model(), "prune_merge", scores=_scores(), keep_rate=0.5, **options)
