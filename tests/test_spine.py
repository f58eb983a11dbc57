"""The spine: patch/unpatch equivalence on every supported ViT variant, token bookkeeping, unmerge."""
import copy

import pytest
import torch
from conftest import tiny_vit
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.models.deit import VisionTransformerDistilled

import vitslim
from vitslim.patch import block_forward
from vitslim.tokens import TokenState, bipartite_matching, init_source, keep_tokens, merge_matched

ZERO_REDUCTION = [("tome", {"r": 0}), ("evit", {"keep_rate": 1.0}), ("topk", {"keep_rate": 1.0})]
REDUCING = [("tome", {"r": 6}), ("evit", {"keep_rate": 0.5}), ("topk", {"keep_rate": 0.5})]


def distilled_deit(**kw):
    args = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_classes=10)
    return VisionTransformerDistilled(**{**args, **kw}).eval()


VARIANTS = {
    "deit": lambda: tiny_vit(),
    "distilled": lambda: distilled_deit(),
    "registers": lambda: tiny_vit(reg_tokens=4),
    "layerscale": lambda: tiny_vit(init_values=0.1, no_embed_class=True),
    "qk_norm": lambda: tiny_vit(qk_norm=True),
    "avg_pool": lambda: tiny_vit(global_pool="avg", class_token=False, fc_norm=True),
    "avg_pool_cls": lambda: tiny_vit(global_pool="avg"),
    "dynamic": lambda: tiny_vit(dynamic_img_size=True),
}


def _images(variant, batch=2):
    torch.manual_seed(1)
    if variant == "dynamic":
        return torch.randn(batch, 3, 24, 40)  # non-square, not the built size
    return torch.randn(batch, 3, 32, 32)


def _randomise(model):
    """LayerScale and norms start at trivial values; perturb them so mistakes would show."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma")) or "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _model_for(variant, method):
    """The variant, with its trivial parameters perturbed; skips CLS-attention methods without a CLS."""
    model = _randomise(VARIANTS[variant]())
    if model.cls_token is None and method != "tome":
        pytest.skip("CLS-attention methods need a class token (tested in test_methods)")
    return model


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("method,options", ZERO_REDUCTION)
def test_zero_reduction_equals_original_and_unpatch_is_exact(variant, method, options):
    model = _model_for(variant, method)
    x = _images(variant)
    with torch.inference_mode():
        expected = model(x)
        vitslim.patch(model, method, **options)
        assert vitslim.is_patched(model)
        patched = model(x)
        vitslim.unpatch(model)
        restored = model(x)
    assert (patched - expected).abs().max() <= 1e-5
    assert torch.equal(restored, expected)
    assert type(model).__name__ == VARIANTS[variant]().__class__.__name__
    assert not any("vitslim" in k for k in model.state_dict())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("method,options", REDUCING)
def test_reduction_runs_on_every_variant_and_keeps_prefix_tokens(variant, method, options):
    model = _model_for(variant, method)
    vitslim.patch(model, method, **options)
    x = _images(variant, batch=3)
    with torch.inference_mode():
        state = model.forward_tokens(x, trace_source=True)
        logits = model(x)
    p = model.num_prefix_tokens
    assert torch.isfinite(logits).all()
    assert state.x.shape[1] < p + state.num_patches0
    # the prefix tokens were never merged: each still stands for exactly one token
    assert torch.equal(state.size[:, :p], torch.ones(3, p))
    # no patch maps onto a prefix token
    assert (state.source < 0).logical_or(state.source >= p).all()


def test_batch_one_and_batch_eight_agree_per_image():
    for method, options in REDUCING:
        model = vitslim.patch(tiny_vit(depth=6), method, **options)
        x = torch.randn(8, 3, 32, 32)
        with torch.inference_mode():
            batched = model(x)
            single = torch.cat([model(x[i:i + 1]) for i in range(8)])
        assert (batched - single).abs().max() <= 1e-4, method


def _run_blocks(model, x, check):
    """The patched forward, block by block, calling ``check(state)`` after each block."""
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    grid = tuple(model.patch_embed.grid_size)
    state = TokenState(x=tokens, num_prefix=model.num_prefix_tokens, grid0=grid, grid=grid,
                       prop_attn=model.vitslim_config["prop_attn"])
    state.source = init_source(x.shape[0], grid, state.num_prefix, x.device)
    for blk, reducer in zip(model.blocks, model._vitslim_plan):
        state = block_forward(blk, state, reducer)
        check(state)
    return state


@settings(max_examples=15, deadline=None)
@given(method=st.sampled_from(["tome", "evit", "topk"]), strength=st.integers(1, 12),
       batch=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_sizes_are_conserved_at_every_layer(method, strength, batch, seed):
    torch.manual_seed(seed)
    model = tiny_vit(depth=5)
    options = {"r": strength} if method == "tome" else {"keep_rate": strength / 13, "locations": [1, 2, 3]}
    vitslim.patch(model, method, **options)
    n0 = model.patch_embed.num_patches

    def check(state):
        p = state.num_prefix
        pruned = (state.source < 0).sum(1).to(state.sizes().dtype)
        torch.testing.assert_close(state.sizes()[:, p:].sum(1) + pruned, torch.full((batch,), float(n0)))
        # every patch's token, if any, is a patch-side token that exists
        assert int(state.source.max()) < state.x.shape[1]
        # a token's size is the number of patches that map to it
        counts = torch.zeros(state.x.shape[:2]).scatter_add_(
            1, state.source.clamp(min=0), (state.source >= 0).float())
        torch.testing.assert_close(counts[:, p:], state.sizes()[:, p:])

    with torch.inference_mode():
        _run_blocks(model, torch.randn(batch, 3, 32, 32), check)


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 3), n=st.integers(2, 40), r_frac=st.floats(0, 1), prefix=st.integers(0, 3),
       sized=st.booleans(), seed=st.integers(0, 2**16))
def test_merge_equals_size_weighted_average_of_its_sources(batch, n, r_frac, prefix, sized, seed):
    torch.manual_seed(seed)
    x = torch.randn(batch, prefix + n, 8)
    size = torch.randint(1, 5, (batch, prefix + n)).float() if sized else None
    if size is not None:
        size[:, :prefix] = 1
    state = TokenState(x=x, num_prefix=prefix, grid0=(1, n), size=size,
                       source=init_source(batch, (1, n), prefix, x.device))
    r = int(r_frac * (n // 2))
    out = merge_matched(state, bipartite_matching(torch.randn(batch, n, 4), r))
    assert out.x.shape == (batch, prefix + n - r, 8)
    sizes = torch.ones(batch, prefix + n) if size is None else size
    full_source = torch.cat([torch.arange(prefix).expand(batch, prefix), out.source], dim=1)
    assign = torch.zeros(batch, prefix + n - r, prefix + n).scatter_(1, full_source[:, None, :], 1.0)
    weights = assign * sizes[:, None, :]
    torch.testing.assert_close(out.x, weights @ x / weights.sum(-1, keepdim=True))
    torch.testing.assert_close(out.size, weights.sum(-1))


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 3), n=st.integers(1, 30), k_frac=st.floats(0.01, 1), fuse=st.booleans(),
       seed=st.integers(0, 2**16))
def test_keep_tokens_gathers_and_fuses(batch, n, k_frac, fuse, seed):
    torch.manual_seed(seed)
    x = torch.randn(batch, 1 + n, 8)
    k = max(1, int(k_frac * n))
    idx = torch.rand(batch, n).topk(k, dim=1).indices.sort(dim=1).values
    w = torch.rand(batch, n)
    state = TokenState(x=x, num_prefix=1, grid0=(1, n), source=init_source(batch, (1, n), 1, x.device))
    out = keep_tokens(state, idx, w if fuse else None)
    kept = torch.stack([x[b, 1:][idx[b]] for b in range(batch)])
    torch.testing.assert_close(out.x[:, 1:1 + k], kept)
    if fuse:
        dropped = torch.ones(batch, n, dtype=torch.bool).scatter_(1, idx, False)
        torch.testing.assert_close(out.x[:, -1], ((w * dropped)[..., None] * x[:, 1:]).sum(1))
        torch.testing.assert_close(out.size[:, -1], dropped.sum(1).float())
    else:
        assert int((out.source < 0).sum()) == batch * (n - k)


def test_unmerge_restores_the_grid_and_exact_values_when_all_tokens_are_equal():
    """Identical patch tokens: merging with proportional attention must be lossless."""
    model = tiny_vit(depth=4)
    with torch.no_grad():
        model.pos_embed.zero_()
    dense = copy.deepcopy(model)
    x = torch.full((2, 3, 32, 32), 0.5)
    with torch.inference_mode():
        dense_tokens = dense.forward_features(x)[:, 1:]
        vitslim.patch(model, "tome", r=10)
        state = model.forward_tokens(x, trace_source=True)
    assert state.x.shape[1] == 1 + 64 - 10 * 4  # really merged
    full = vitslim.unmerge(state)
    assert full.shape == (2, 64, 64)
    torch.testing.assert_close(full, dense_tokens, atol=1e-5, rtol=1e-5)
    grid = vitslim.unmerge_grid(state)
    assert grid.shape == (2, 64, 8, 8)
    torch.testing.assert_close(grid.flatten(2).transpose(1, 2), full)


def test_unmerge_on_a_non_square_dynamic_grid():
    model = vitslim.patch(tiny_vit(dynamic_img_size=True), "tome", r=4)
    with torch.inference_mode():
        state = model.forward_tokens(torch.randn(1, 3, 24, 40), trace_source=True)
    assert state.grid0 == (6, 10)
    assert vitslim.unmerge_grid(state).shape == (1, 64, 6, 10)


def test_size_weighted_average_pooling():
    """Avg pooling after merging must weight each token by the patches it stands for."""
    model = vitslim.patch(tiny_vit(global_pool="avg", class_token=False, fc_norm=False), "tome", r=8)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        state = model.forward_tokens(x, trace_source=True)
        pooled = model.forward_head_state(state, pre_logits=True)
    torch.testing.assert_close(pooled, vitslim.unmerge(state).mean(1))


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = vitslim.patch(tiny_vit(), "tome", r=4).train()
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for g, p in zip(plain, model.parameters()):
        torch.testing.assert_close(p.grad, g)


def test_proportional_attention_stays_on_the_fused_kernel():
    model = vitslim.patch(tiny_vit(), "tome", r=4)
    assert model.vitslim_config["prop_attn"]
    ops = vitslim.count_macs(model, by_op=True)
    assert "_scaled_dot_product_flash_attention_for_cpu" in ops
    assert "bmm" in ops  # the matching


def test_repatching_replaces_the_method():
    model = tiny_vit()
    vitslim.patch(model, "tome", r=2)
    vitslim.patch(model, "evit", keep_rate=0.5)
    assert vitslim.describe(model)["method"] == "evit"
    assert len(model.vitslim_reducers) == len(vitslim.describe(model)["options"]["locations"])
    vitslim.unpatch(model)
    assert type(model).__name__ == "VisionTransformer"


def test_patching_keeps_the_models_train_or_eval_mode_in_its_reducers():
    """An eval model patched with a learned method must not run its selectors in training mode."""
    model = vitslim.patch(tiny_vit().eval(), "spvit", keep_rate=0.7)
    assert not any(m.training for m in model.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # no Gumbel noise: the same logits twice
    model = vitslim.patch(tiny_vit().train(), "spvit", keep_rate=0.7)
    assert all(m.training for m in model.vitslim_reducers.modules())


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(st.integers(0, 3), min_size=1, max_size=40), target=st.integers(-2, 60),
       start=st.integers(-3, 45), closest=st.booleans())
def test_the_budget_search_from_a_guess_finds_the_same_level(steps, target, start, closest):
    """search_level(start=...) (steps out from a guess, for timed costs) gives the bisection's answer or the same
    error, for any falling cost, target and guess; a guess at the answer costs at most three evaluations."""
    from vitslim.budget import OutOfReach, search_level

    costs = [sum(steps[i:]) for i in range(len(steps))]  # falls weakly with the level, plateaus included
    max_level, wanted = len(costs) - 1, float(target)

    def run(guess):
        evaluated = []
        try:
            level = search_level(lambda lv: evaluated.append(lv) or costs[lv], wanted, max_level, closest=closest,
                                 start=guess)
        except OutOfReach:
            level = "out of reach"
        return level, len(set(evaluated))

    answer, _ = run(None)
    assert run(start)[0] == answer
    if answer != "out of reach":
        assert run(answer)[1] <= 3


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(st.integers(0, 3), min_size=1, max_size=60), target=st.integers(0, 90),
       start=st.integers(0, 60), resolution=st.integers(1, 8))
def test_a_coarse_budget_search_meets_the_target_within_its_resolution(steps, target, start, resolution):
    """search_level(resolution=k) (a timed cost: single levels are below the noise) returns a level that meets the
    target and is at most k - 1 levels stronger than the mildest that does, from any start."""
    from vitslim.budget import OutOfReach, search_level

    costs = [sum(steps[i:]) for i in range(len(steps))]
    mildest = next((level for level, c in enumerate(costs) if c <= target), None)
    for guess in (None, start):
        try:
            level = search_level(costs.__getitem__, target, len(costs) - 1, closest=False, start=guess,
                                 resolution=resolution)
        except OutOfReach:
            assert mildest is None
            continue
        assert costs[level] <= target and mildest <= level <= mildest + resolution - 1
