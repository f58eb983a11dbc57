"""CAIT-style (vitslim reconstruction): ATME merging, CDCP masks, structural export, joint budget."""
import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vitslim
from vitslim import export
from vitslim.measure.macs import count_macs
from vitslim.methods.atme import merge_neighbours, parse_schedule
from vitslim.methods.cdcp import FREEZE_AT, RAMP_END, activation_importance, allocate, ramp_keep
from vitslim.tokens import TokenState, init_source
from vitslim.train.engine import set_progress


def _vit(**kwargs):
    """A tiny timm-created ViT (8x8 patches, head dim 32, so CDCP counts go in steps of 8)."""
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2, num_classes=10)
    args.update(kwargs)
    return timm.create_model("vit_tiny_patch16_224", **args).eval()


def _state(batch, grid, dim=8, p=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, p + grid[0] * grid[1], dim, generator=g)
    return TokenState(x=x, num_prefix=p, grid0=grid, grid=grid, source=init_source(batch, grid, p, x.device))


@settings(max_examples=15, deadline=None)
@given(h=st.integers(1, 7), w=st.integers(2, 7), axes=st.lists(st.sampled_from("WH"), min_size=1, max_size=3))
def test_atme_steps_keep_a_grid_sizes_and_a_full_source_map(h, w, axes):
    state = _state(2, (h, w))
    x0 = state.x.clone()
    for axis in axes:
        state = merge_neighbours(state, state.x, axis)
        gh, gw = state.grid
        assert state.x.shape[1] == 1 + gh * gw  # the patch tokens reshape to the recorded rectangle
        assert torch.allclose(state.sizes()[:, 1:].sum(1), torch.full((2,), float(h * w)))
        assert torch.equal(state.x[:, 0], x0[:, 0]) and (state.sizes()[:, 0] == 1).all()  # prefix apart
        # each token is the size-weighted mean of the patches that map to it
        for b in range(2):
            for t in range(gh * gw):
                members = (state.source[b] == 1 + t).nonzero()[:, 0]
                assert len(members) == int(state.sizes()[b, 1 + t])
                assert torch.allclose(state.x[b, 1 + t], x0[b, 1 + members].mean(0), atol=1e-5)
    assert (state.source >= 1).all()
    full = vitslim.unmerge_grid(state)
    assert full.shape == (2, 8, h, w)


def test_atme_neighbours_only_and_choice_by_similarity():
    state = _state(1, (1, 4), dim=2)
    # columns: a0, s1, a2, s3; s1 resembles a2 (right), s3 has only a2 on its left
    state.x[0, 1:] = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [5.0, 5.0]])
    out = merge_neighbours(state, state.x.clone(), "W")
    assert out.grid == (1, 2) and out.size[0, 1:].tolist() == [1.0, 3.0]
    assert out.source[0].tolist() == [1, 2, 2, 2]


def test_atme_constant_region_stays_constant_and_unmerge_restores_it():
    state = _state(2, (8, 8))
    patches = state.x[:, 1:].view(2, 8, 8, -1)
    patches[:, :, :4] = 0.5  # left half constant: its sources join a constant anchor (cosine 1)
    for axis in "WH":
        state = merge_neighbours(state, state.x, axis)
    assert state.grid == (4, 4)
    full = vitslim.unmerge_grid(state)  # (B, C, 8, 8): every patch gets the token that contains it
    assert torch.allclose(full[:, :, :, :4], torch.full_like(full[:, :, :, :4], 0.5))
    assert torch.equal(state.size[:, 1:].view(2, 4, 4)[:, :, :2], torch.full((2, 4, 2), 4.0))


def test_atme_zero_merging_is_dense_and_batch_one_equals_batch_eight():
    dense = _vit()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ref = dense(x)
        model = vitslim.patch(_vit(), "atme", schedule="")
        assert torch.equal(model(x), ref)
        vitslim.patch(model, "atme")
        y8 = model(x)
        y1 = torch.cat([model(x[i:i + 1]) for i in range(8)])
    assert torch.allclose(y8, y1, atol=1e-5)
    assert vitslim.describe(model)["tokens"] == [(65, 65), (65, 33), (33, 17), (17, 17)]  # default 1:W, 2:H


def test_atme_schedule_errors_have_hints():
    model = _vit()
    with pytest.raises(vitslim.VitslimError, match="W or H"):
        vitslim.patch(model, "atme", schedule="1:X")
    with pytest.raises(vitslim.VitslimError, match="out of range"):
        vitslim.patch(model, "atme", schedule="9:W")
    with pytest.raises(vitslim.VitslimError, match="BLOCK:AXIS"):
        vitslim.patch(model, "atme", schedule="1-W")
    with pytest.raises(vitslim.VitslimError, match="either schedule or macs"):
        vitslim.patch(model, "atme", macs=0.5, schedule="1:W")
    assert parse_schedule([(2, "h"), "0:W"], 4) == [(0, "W"), (2, "H")]


def _masks(model):
    return [r for r in model._vitslim_plan]


def test_cdcp_masks_are_head_consistent_qk_shared_and_hit_the_budget():
    model = vitslim.patch(_vit(), "cdcp", keep_rate=0.5)
    for r in _masks(model):
        kh, km = r.counts.tolist()
        assert r.mask_qk.sum() == kh == r.mask_v.sum() and r.mask_mlp.sum() == km
        assert kh % 8 == 0 and kh >= 8 and km % 8 == 0
        plan = r.train().channel_plan()
        qkv = plan.qkv_mask.detach().view(3, 2, 32)
        assert torch.equal(qkv[0], qkv[1])  # Q and K share m_qk
        assert torch.equal(qkv[:, 0], qkv[:, 1])  # same indices in every head
        r.eval()
    dense = count_macs(_vit())
    for target in (0.5, 0.7):
        vitslim.patch(model, "cdcp", macs=target)
        assert abs(count_macs(model) / dense - target) <= 0.02 * target


def test_cdcp_straight_through_gradient_reaches_the_scores():
    model = vitslim.patch(_vit(), "cdcp", keep_rate=0.5).train()
    logits = model.forward_head_state(model.forward_tokens(torch.randn(2, 3, 32, 32)))
    logits.sum().backward()
    scores = model.vitslim_reducers["0"].scores
    for p in (scores.qk, scores.v, scores.mlp):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_cdcp_eval_plan_is_cached_until_the_masks_change():
    model = vitslim.patch(_vit(), "cdcp", keep_rate=0.5).eval()
    x = torch.randn(2, 3, 32, 32)
    r = model.vitslim_reducers["0"]
    with torch.inference_mode():
        model(x)
        first = r.channel_plan()
        model(x)
        again = r.channel_plan()
    assert first.qkv_index is not None and first.mlp_index is not None
    assert all(a is b for a, b in zip(first, again))  # no nonzero() per forward
    # reselect at other counts: a new plan, equal to a freshly built model's
    for block in _masks(model):
        block.counts.copy_(torch.tensor([8, 64]))
        block.reselect()
    fresh = vitslim.patch(_vit(), "cdcp", keep_rate=0.5).eval()
    for block in _masks(fresh):
        block.counts.copy_(torch.tensor([8, 64]))
        block.reselect()
    with torch.no_grad():
        assert r.channel_plan().mlp_index.numel() == 64
        assert torch.equal(model(x), fresh(x))
        # load another model's state (other counts and masks): the cached plan follows it
        other = vitslim.patch(_vit(), "cdcp", keep_rate=0.7).eval()
        model.load_state_dict(other.state_dict())
        assert torch.equal(model(x), other(x))
        model.train()  # training's straight-through masks, then eval again: still the loaded masks
        model.eval()
        assert torch.equal(model(x), other(x))


def test_cdcp_progress_hook_ramps_then_freezes_the_masks():
    model = vitslim.patch(_vit(), "cdcp", keep_rate=0.5).train()
    modules = model  # the engine tells every reducer (Reducer.set_progress)
    blocks = _masks(model)
    total = 100
    set_progress(modules, 0, total)
    assert all(r.counts.tolist() == [32, 256] for r in blocks)  # dense at the start of the ramp
    kept = []
    for step in range(0, int(RAMP_END * total) + 1, 5):
        set_progress(modules, step, total)
        kept.append(sum(r.counts.sum().item() for r in blocks))
    assert kept == sorted(kept, reverse=True) and kept[-1] < kept[0]
    assert ramp_keep(0.5, 0.0) == 1.0 and ramp_keep(0.5, RAMP_END) == 0.5
    final = [r.counts.tolist() for r in blocks]
    assert final == [list(c) for c in allocate(blocks, 0.5)]
    set_progress(modules, int(FREEZE_AT * total), total)
    before = [r.mask_mlp.clone() for r in blocks]
    with torch.no_grad():
        for r in blocks:
            r.scores.mlp.mul_(-1)  # would flip every selection if not frozen
        model.forward_tokens(torch.randn(2, 3, 32, 32))
    assert all(torch.equal(b, r.mask_mlp) for b, r in zip(before, blocks))
    assert all(bool(r.frozen) for r in blocks)


def test_cdcp_ramp_and_freeze_happen_inside_a_real_fit(tmp_path):
    from vitslim.train import TrainConfig, fit

    model = vitslim.patch(_vit(), "cdcp", keep_rate=0.5)
    blocks = _masks(model)
    kept = []
    data = torch.utils.data.TensorDataset(torch.randn(80, 3, 32, 32), torch.randint(0, 10, (80,)))
    fit(model, data, config=TrainConfig(epochs=1, batch_size=4, lr=1e-3, log_every=1), out_dir=tmp_path,
        progress=False, on_step=lambda record: kept.append(sum(r.counts.sum().item() for r in blocks)))
    assert len(kept) == 20 and kept[0] > kept[-1] and kept == sorted(kept, reverse=True)  # the ramp, through the engine
    ramp_end = int(RAMP_END * 20)
    assert len(set(kept[ramp_end:])) == 1 and len(set(kept[:ramp_end + 1])) > 1  # counts fixed after the ramp
    assert all(bool(r.frozen) for r in blocks)  # past 90% of the run the masks are frozen


def test_cdcp_taylor_calibration_and_refusals():
    images = torch.randn(8, 3, 32, 32)
    model = vitslim.patch(_vit(), "cdcp", keep_rate=0.6, calibration=images)
    assert model.vitslim_config["options"]["importance"] == "taylor"
    with pytest.raises(vitslim.VitslimError, match="q/k norm"):
        vitslim.patch(_vit(qk_norm=True), "cdcp")
    with pytest.raises(vitslim.VitslimError, match="importance"):
        vitslim.patch(_vit(), "cdcp", importance="random")
    with pytest.raises(vitslim.VitslimError, match="unknown cdcp options"):
        vitslim.patch(_vit(), "cdcp", rate=0.5)


def test_activation_importance_is_the_norm_of_each_channels_own_contribution():
    """Per block: |contribution to the residual| of each MLP hidden and value channel (after LayerScale), and
    |q_c k_c^T| of each query/key channel over each image's logits; heads summed, computed here by hand."""
    model = _vit(init_values=0.5)
    with torch.no_grad():
        for blk in model.blocks:  # unequal gammas, so LayerScale must be taken into account
            blk.ls1.gamma.uniform_(0.1, 2.0)
            blk.ls2.gamma.uniform_(0.1, 2.0)
    images = torch.randn(6, 3, 32, 32)
    importance = activation_importance(model, images)
    captured = {}
    blk = model.blocks[2]
    handle = blk.register_forward_pre_hook(lambda _m, args: captured.setdefault("x", args[0]))
    model(images)
    handle.remove()
    heads, d = blk.attn.num_heads, blk.attn.head_dim
    with torch.no_grad():
        x = captured["x"]
        q, k, v = blk.attn.qkv(blk.norm1(x)).unflatten(-1, (3, heads, d)).permute(2, 0, 3, 1, 4)  # (B, H, N, d)
        o = torch.softmax(q @ k.transpose(-1, -2) * blk.attn.scale, -1) @ v  # (B, H, N, d): proj's input
        residual = x + blk.ls1(blk.attn.proj(o.transpose(1, 2).flatten(2)))
        hidden = blk.mlp.act(blk.mlp.fc1(blk.norm2(residual)))
        for c in (0, 7, 31):
            v_norm = sum(blk.ls1(o[:, h, :, c:c + 1] * blk.attn.proj.weight[:, h * d + c]).norm() for h in range(heads))
            qk_norm = sum(torch.einsum("bn,bm->bnm", q[:, h, :, c], k[:, h, :, c]).pow(2).sum().sqrt()
                          for h in range(heads))
            assert torch.allclose(importance[2]["v"][c], v_norm, rtol=1e-4)
            assert torch.allclose(importance[2]["qk"][c], qk_norm, rtol=1e-4)
        for j in (0, 5, 100):
            mlp_norm = blk.ls2(hidden[..., j:j + 1] * blk.mlp.fc2.weight[:, j]).norm()
            assert torch.allclose(importance[2]["mlp"][j], mlp_norm, rtol=1e-4)


def _half_dead_vit():
    """A tiny LayerScale ViT whose even channels carry constants in every block: q and k zero, v and the MLP
    hidden channel a bias only. Pruning only such channels, and holding them at their mean, changes nothing."""
    model = _vit(init_values=0.5)
    with torch.no_grad():
        for blk in model.blocks:
            heads, d = blk.attn.num_heads, blk.attn.head_dim
            w = blk.attn.qkv.weight.view(3, heads, d, -1)
            b = blk.attn.qkv.bias.view(3, heads, d)
            w[:, :, ::2] = 0
            b[:2, :, ::2] = 0
            b[2, :, ::2] = torch.randn(heads, d // 2)  # v = its bias: the attention output is that constant
            blk.mlp.fc1.weight[::2] = 0  # hidden = act(bias): constant
            blk.mlp.fc1.bias[::2] = torch.randn(blk.mlp.fc1.out_features // 2)
    return model


def test_fluctuation_prunes_constant_channels_first_and_compensates_them_exactly():
    images, x = torch.randn(16, 3, 32, 32), torch.randn(4, 3, 32, 32)
    dense = _half_dead_vit()
    compensated = vitslim.patch(_half_dead_vit(), "cdcp", keep_rate=0.6, importance="fluctuation", calibration=images)
    blocks = _masks(compensated)
    assert all(r.counts[0] < r.head_dim and r.counts[1] < r.hidden for r in blocks)  # pruned in every block
    for r in blocks:  # only dead channels pruned
        assert r.mask_qk[1::2].all() and r.mask_v[1::2].all() and r.mask_mlp[1::2].all()
    plain = vitslim.patch(_half_dead_vit(), "cdcp", keep_rate=0.6, importance="activation", calibration=images)
    with torch.no_grad():
        reference = dense(x)
        assert (compensated(x) - reference).abs().max() <= 1e-4
        assert (plain(x) - reference).abs().max() > 1e-2  # without the means, the constants are lost
        assert (export.slim(compensated)(x) - reference).abs().max() <= 1e-4  # means folded into the biases
        # a checkpoint restores the means: the rebuilt patch (no calibration) loads them from the state dict
        rebuilt = vitslim.patch(_half_dead_vit(), "cdcp", keep_rate=0.6, importance="fluctuation")
        rebuilt.load_state_dict(compensated.state_dict())
        assert torch.equal(rebuilt(x), compensated(x))


def test_activation_importance_option():
    images = torch.randn(8, 3, 32, 32)
    for method in ("cdcp", "cait"):
        model = vitslim.patch(_vit(), method, macs=0.6, importance="activation", calibration=images)
        assert model.vitslim_config["options"]["importance"] == "activation"
        assert abs(count_macs(model) / count_macs(vitslim.unpatch(_vit())) - 0.6) <= 0.02 * 0.6
    with pytest.raises(vitslim.VitslimError, match="data-free: drop calibration="):
        vitslim.patch(_vit(), "cdcp", importance="magnitude", calibration=images)


@pytest.mark.parametrize("method", ["cdcp", "cait"])
def test_slim_equals_masked_counts_drop_and_safetensors_round_trip(method, tmp_path):
    dense = _vit()
    model = vitslim.patch(_vit(), method, macs=0.5)
    x = torch.randn(4, 3, 32, 32)
    slimmed = export.slim(model)
    with torch.no_grad():
        assert (slimmed(x) - model(x)).abs().max() <= 1e-5
    assert count_macs(slimmed) == count_macs(model)
    assert abs(count_macs(slimmed) / count_macs(dense) - 0.5) <= 0.01
    n_params = sum(p.numel() for p in slimmed.parameters())
    expected = sum(p.numel() for p in dense.parameters())
    for blk, r in zip(dense.blocks, _masks(model)):
        kh, km = r.counts.tolist()
        heads, d, dim = blk.attn.num_heads, blk.attn.head_dim, 64
        expected -= (3 * heads * (d - kh)) * (dim + 1) + heads * (d - kh) * dim + (256 - km) * (2 * dim + 1)
    assert n_params == expected
    path = tmp_path / "slim.safetensors"
    export.save(slimmed, path)
    loaded = export.load(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), slimmed(x))
    if method == "cdcp":
        assert type(loaded) is timm.models.vision_transformer.VisionTransformer
        assert type(loaded.blocks[0].attn) is timm.layers.Attention
    else:
        assert loaded.vitslim_config["method"] == "atme"
    export.save(model, path)  # a masked model is sliced on the way out
    with torch.no_grad():
        assert torch.equal(export.load(path)(x), slimmed(x))
    assert sorted(f.name for f in tmp_path.iterdir()) == ["slim.safetensors"]  # written atomically, no temp left
    with pytest.raises(vitslim.VitslimError, match="not found"):
        export.load(tmp_path / "missing.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:100])
    with pytest.raises(vitslim.VitslimError, match="is the file complete"):
        export.load(tmp_path / "cut.safetensors")


def test_cait_budget_split_and_errors():
    dense = count_macs(_vit())
    model = _vit()
    for target in (0.5, 0.7):
        vitslim.patch(model, "cait", macs=target)
        assert abs(count_macs(model) / dense - target) <= 0.02 * target
        options = model.vitslim_config["options"]
        assert options["schedule"] and options["keep_rate"] < 1.0
    tokens_only = vitslim.patch(_vit(), "cait", macs=0.7, token_share=0.0).vitslim_config["options"]
    assert tokens_only["schedule"] == ""
    with pytest.raises(vitslim.VitslimError, match="token_share"):
        vitslim.patch(_vit(), "cait", macs=0.5, token_share=2)
    with pytest.raises(vitslim.VitslimError, match="either schedule/keep_rate or macs"):
        vitslim.patch(_vit(), "cait", macs=0.5, keep_rate=0.5)


def test_atme_macs_budget_points():
    """DeiT's layout (14x14 patches, 12 blocks) at a small width: 0.5 and 0.7 are budget points within 2%."""
    model = _vit(img_size=56, depth=12, embed_dim=32)
    dense = count_macs(model)
    for target in (0.5, 0.7):
        vitslim.patch(model, "atme", macs=target)
        assert abs(count_macs(model) / dense - target) <= 0.02 * target
        # merges= shapes the schedule at the same budget: exactly two merges, so each one earlier
        vitslim.patch(model, "atme", macs=target, merges=2)
        assert len(parse_schedule(model.vitslim_config["options"]["schedule"], 12)) == 2
        assert abs(count_macs(model) / dense - target) <= 0.02 * target
    with pytest.raises(vitslim.VitslimError, match="out of reach"):
        vitslim.patch(model, "atme", macs=0.05)
    with pytest.raises(vitslim.VitslimError, match="merges=4 is out of range"):
        vitslim.patch(model, "atme", macs=0.5, merges=4)
