"""Model families beyond the plain ViT: timm Eva (EVA-02, RoPE ViTs) through the same spine."""

import pytest
import torch
from conftest import tiny_vit
from hypothesis import given, settings
from hypothesis import strategies as st

import timm
import vitslim
from vitslim.errors import VitslimError
from vitslim.families import family_of, rotary_rows, with_identity_row
from vitslim.measure.speed import ideal_model
from vitslim.tokens import TokenState, bipartite_matching, init_source, keep_tokens, merge_matched

TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_classes=10)

EVA_VARIANTS = {  # every block and attention layout the eva family runs, at toy size
    "eva02": lambda: timm.create_model("eva02_tiny_patch14_224", **TINY),  # SwiGLU, rope, EvaAttention
    "eva02_post_norm": lambda: timm.create_model("eva02_tiny_patch14_224", use_post_norm=True, **TINY),
    "rope_axial": lambda: timm.create_model("vit_small_patch16_rope_224", **TINY),  # AttentionRope
    "rope_mixed": lambda: timm.create_model("vit_small_patch16_rope_mixed_224", **TINY),  # a table per block
    "rope_gqa_reg": lambda: timm.create_model("vit_small_patch16_rope_224", num_kv_heads=2, qkv_fused=False,
                                              num_reg_tokens=2, **TINY),
    "eva_layerscale_sep_qkv": lambda: timm.create_model("eva02_tiny_patch14_224", qkv_fused=False,
                                                        init_values=0.1, **TINY),
}
EVA_METHODS = {"tome": {"r": 0}, "evit": {"keep_rate": 1.0}, "topk": {"keep_rate": 1.0}, "atme": {"schedule": ""}}
REDUCING = [*sorted(EVA_METHODS), "spvit"]  # SPViT always adds a package token: no zero-reduction setting


def eva(variant: str) -> torch.nn.Module:
    """A toy Eva with every parameter perturbed (zero biases and unit norms would hide mistakes)."""
    torch.manual_seed(0)
    model = EVA_VARIANTS[variant]().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _images(batch=2):
    torch.manual_seed(1)
    return torch.randn(batch, 3, 32, 32)


def _features(model, x):
    with torch.inference_mode():
        return model.forward_head(model.forward_features(x), pre_logits=True) if not vitslim.is_patched(model) \
            else model.forward_head_state(model.forward_tokens(x), pre_logits=True)


@pytest.mark.parametrize("variant", sorted(EVA_VARIANTS))
@pytest.mark.parametrize("method", sorted(EVA_METHODS))
def test_zero_reduction_equals_the_model_and_unpatch_restores_it(variant, method):
    model = eva(variant)
    x = _images()
    with torch.inference_mode():
        ref = model(x)
    patched = vitslim.patch(model, method, **EVA_METHODS[method])
    with torch.inference_mode():
        torch.testing.assert_close(patched(x), ref, rtol=0, atol=1e-6)
    vitslim.unpatch(model)
    with torch.inference_mode():
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize("variant", ["eva02", "rope_mixed", "rope_gqa_reg"])
@pytest.mark.parametrize("method", REDUCING)
def test_reducing_matches_budget_and_batch_of_one(variant, method):
    model = eva(variant)
    dense = vitslim.count_macs(model)
    vitslim.patch(model, method, macs=0.6)
    macs = vitslim.count_macs(model) / dense
    assert abs(macs - 0.6) <= (0.05 if method == "atme" else 0.02 * 0.6), macs  # ATME: coarse steps on an 8x8 grid
    tokens = vitslim.describe(model)["tokens"]
    assert tokens[-1][1] < tokens[0][0]  # it really reduces
    x = _images(8)
    batched = _features(model, x)
    single = torch.cat([_features(model, x[i:i + 1]) for i in range(8)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", REDUCING)
def test_macs_budget_within_two_percent_on_eva02_at_224(method):
    dense = timm.create_model("eva02_tiny_patch14_224")
    dense_macs = vitslim.count_macs(dense)
    vitslim.patch(dense, method, macs=0.55)
    assert abs(vitslim.count_macs(dense) / dense_macs - 0.55) <= 0.02 * 0.55


@pytest.mark.parametrize("variant", ["eva02", "rope_mixed"])
def test_pruned_tokens_keep_their_rotary_positions(variant):
    """top-k pruning after block 0 equals timm's own blocks run on the kept tokens with their rotary rows."""
    model = eva(variant)
    x = _images()
    vitslim.patch(model, "topk", keep_rate=0.5, locations=[0])
    with torch.inference_mode():
        state = model.forward_tokens(x, trace_source=True)
        got = model.forward_head_state(state, pre_logits=True)
        kept = [torch.nonzero(s >= 0).flatten() for s in state.source]  # patches kept, in raster order
        tokens = model.patch_embed(x)
        tokens, rope = model._pos_embed(tokens)
        tokens = model.norm_pre(tokens)
        blocks = list(model.blocks)
        mixed = rope.dim() == 4
        tokens = blocks[0](tokens, rope=rope[0] if mixed else rope)
        p = model.num_prefix_tokens
        outs = []
        for b, idx in enumerate(kept):
            t = torch.cat([tokens[b:b + 1, :p], tokens[b:b + 1, p + idx]], dim=1)
            for i, blk in enumerate(blocks[1:], start=1):
                t = blk(t, rope=(rope[i][:, idx] if mixed else rope[idx]))
            outs.append(model.forward_head(model.norm(t), pre_logits=True))
    torch.testing.assert_close(got, torch.cat(outs), rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(op=st.sampled_from(["merge", "keep", "fuse"]), steps=st.integers(1, 4), batch=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_every_token_keeps_one_of_its_own_patches_as_position(op, steps, batch, seed):
    """After any prunes and merges, a token's rotary position is a patch it stands for (the fused token: none)."""
    torch.manual_seed(seed)
    p, grid = 1, (6, 6)
    n0 = grid[0] * grid[1]
    state = TokenState(x=torch.randn(batch, p + n0, 8), num_prefix=p, grid0=grid,
                       rope=torch.zeros(n0 + 1, 4), source=init_source(batch, grid, p, torch.device("cpu")))
    for _ in range(steps):
        n = state.x.shape[1] - p
        if n < 4:
            break
        if op == "merge":
            state = merge_matched(state, bipartite_matching(torch.randn(batch, n, 8), n // 3))
        else:
            idx = torch.rand(batch, n).topk(n // 2, dim=1).indices.sort(dim=1).values
            state = keep_tokens(state, idx, torch.rand(batch, n) if op == "fuse" else None)
    pos, n = state.positions().expand(batch, -1), state.x.shape[1] - p
    assert pos.shape == (batch, n)
    for b in range(batch):
        for t in range(n):
            if pos[b, t] == n0:  # no position: only a fused token
                assert op == "fuse"
            else:
                assert state.source[b, pos[b, t]] == p + t


def test_atme_merged_token_takes_its_anchors_position():
    model = eva("eva02")
    vitslim.patch(model, "atme", schedule="0:W,1:H")
    with torch.inference_mode():
        state = model.forward_tokens(_images(), trace_source=True)
    assert state.grid == (4, 4)
    anchors = torch.arange(8 * 8).view(8, 8)[::2, ::2].reshape(-1)  # the top-left patch of each 2x2 group
    assert torch.equal(state.positions().expand(2, -1), anchors.expand(2, -1))
    assert torch.equal(state.source.gather(1, anchors.expand(2, -1)) - 1, torch.arange(16).expand(2, -1))


def test_identity_row_leaves_a_token_unrotated():
    model = eva("eva02")
    _, rope = model._pos_embed(model.patch_embed(_images()))
    table = with_identity_row(rope)
    assert table.shape[0] == rope.shape[0] + 1 and torch.equal(table[:-1], rope)
    q = torch.randn(1, 4, 3, table.shape[-1] // 2)
    state = TokenState(x=torch.zeros(1, 4, 64), num_prefix=1, grid0=(8, 8), rope=table,
                       pos=torch.tensor([[rope.shape[0], 0, rope.shape[0]]]))
    rows = rotary_rows(state, 0)
    rotated = timm.layers.apply_rot_embed_cat(q, rows)
    assert torch.equal(rotated[:, :, 0], q[:, :, 0]) and torch.equal(rotated[:, :, 2], q[:, :, 2])


@pytest.mark.parametrize("method", ["sit", "prune_merge", "cdcp", "cait"])
def test_methods_that_do_not_carry_positions_are_refused_in_one_line(method):
    model = eva("eva02")
    with pytest.raises(VitslimError) as err:
        vitslim.patch(model, method, macs=0.6)
    message = str(err.value)
    assert "\n" not in message and f"{method} does not run on eva models" in message
    assert "atme, evit, spvit, tome, topk" in message
    assert not vitslim.is_patched(model)


def test_unsupported_eva_variants_are_refused():
    with pytest.raises(VitslimError, match="patch_drop_rate=0"):
        vitslim.patch(timm.create_model("eva02_tiny_patch14_224", patch_drop_rate=0.1, **TINY), "tome", r=1)
    with pytest.raises(VitslimError, match="ResNet is not supported"):
        vitslim.patch(timm.create_model("resnet10t", num_classes=10), "tome", r=1)


def test_ideal_of_an_eva_schedule_runs_the_dense_blocks():
    model = eva("rope_mixed")
    x = _images()
    with torch.inference_mode():
        ref = model(x)
    vitslim.patch(model, "tome", r=0)
    with torch.inference_mode():
        torch.testing.assert_close(ideal_model(model)(x), ref, rtol=0, atol=1e-6)
    vitslim.patch(model, "tome", r=4)
    with torch.inference_mode():
        assert ideal_model(model)(x).shape == ref.shape


def test_families_are_found_by_model_class():
    assert family_of(tiny_vit()).name == "vit" and not family_of(tiny_vit()).uses_positions(tiny_vit())
    rotary, absolute = eva("eva02"), timm.create_model("eva02_tiny_patch14_224", use_rot_pos_emb=False, **TINY)
    assert family_of(rotary).name == "eva" and family_of(rotary).uses_positions(rotary)
    assert not family_of(absolute).uses_positions(absolute)


@pytest.mark.parametrize("variant", ["eva02", "rope_mixed"])
def test_grad_checkpointing_recomputes_each_block_on_its_own_positions(variant):
    model = vitslim.patch(eva(variant), "tome", r=4).train()
    x = _images()
    model(x).square().sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    for g, p in zip(plain, model.parameters()):
        torch.testing.assert_close(p.grad, g)


@pytest.mark.parametrize("method, options", [("tome", {"r": 4}), ("spvit", {"keep_rate": 0.7})])
def test_eva_trains_a_step_with_a_reducing_method(method, options):
    """ToMe, and SPViT with its Gumbel masks and package tokens (each stage's gets no position)."""
    model = eva("eva02").train()
    vitslim.patch(model, method, **options)
    state = model.forward_tokens(_images(4))
    if method == "spvit":  # one package token per stage, appended without a position
        n0 = state.num_patches0
        assert state.x.shape[1] == 1 + n0 + 3 and torch.equal(state.pos[:, n0:], torch.full((4, 3), n0))
        assert {a.name for a in state.aux if hasattr(a, "name")} >= {"ratio"}
    out = model.forward_head_state(state)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("method", ["tome", "atme"])
def test_eva_saves_exports_to_onnx_and_compiles(method, tmp_path):
    """A rotary model with merged tokens leaves PyTorch like a ViT: one file, ONNX, one compiled graph."""
    pytest.importorskip("onnxruntime")
    import torch._dynamo

    from vitslim import export
    from vitslim.export.runtime import runtime

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_rope_mixed_224", **TINY).eval()
    vitslim.patch(model, method, macs=0.6)
    x = _images(3)
    with torch.inference_mode():
        ref = model(x)
    export.save(model, tmp_path / "m.safetensors")
    with torch.inference_mode():
        torch.testing.assert_close(export.load(tmp_path / "m.safetensors")(x), ref, rtol=0, atol=1e-6)
    session = export.onnx_session(export.to_onnx(model, tmp_path / "m.onnx", input_size=(3, 32, 32)))
    torch.testing.assert_close(session(x), ref, rtol=0, atol=1e-4)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = runtime(model, "compile")
    with torch.inference_mode():
        for batch in (2, 5):
            torch.testing.assert_close(compiled(_images(batch)), model(_images(batch)), rtol=0, atol=1e-4)
    counters = torch._dynamo.utils.counters
    assert (sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]) == (0, 1)


def test_a_saved_model_whose_layout_its_name_cannot_rebuild_is_refused(tmp_path):
    """A post-norm Eva has the same parameter names as the default pre-norm one: refused, not rebuilt wrong."""
    from vitslim import export

    model = vitslim.patch(eva("eva02_post_norm"), "tome", r=2)
    export.save(model, tmp_path / "post.safetensors")
    with pytest.raises(VitslimError, match="EvaBlockPostNorm"):
        export.load(tmp_path / "post.safetensors")
