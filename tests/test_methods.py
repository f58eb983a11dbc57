"""Per-method schedules, the common macs= budget, and bad options."""
import pytest
import timm
import torch
from conftest import tiny_vit

import vitslim
from vitslim import VitslimError
from vitslim.methods.tome import parse_r


def test_methods_are_registered():
    assert {"tome", "evit", "topk"} <= set(vitslim.methods())


def test_tome_token_counts_follow_r():
    model = vitslim.patch(timm.create_model("deit_tiny_patch16_224"), "tome", r=13)
    tokens = vitslim.describe(model)["tokens"]
    expected, n = [], 197
    for _ in range(12):
        after = n - min(13, (n - 1) // 2)
        expected.append((n, after))
        n = after
    assert tokens == expected
    assert tokens[-1][1] == 41  # ToMe's published DeiT count


def test_tome_r_schedules():
    assert parse_r(13, 12) == [13] * 12
    assert parse_r([4, 3], 4) == [4, 3, 0, 0]
    assert parse_r((13, -1.0), 12) == [26, 23, 21, 18, 16, 14, 11, 9, 7, 4, 2, 0]
    model = vitslim.patch(tiny_vit(depth=4), "tome", r=(4, -1.0))
    assert [a - m for a, m in vitslim.describe(model)["tokens"]] == parse_r((4, -1.0), 4)


def test_tome_budget_keeps_the_shape_of_its_inflection():
    """macs= with inflection spreads the merges on ToMe's linear schedule: decreasing, even or increasing."""
    dense = vitslim.count_macs(tiny_vit(depth=6))
    shapes = {}
    for inflection in (-0.5, 0.0, 0.5):
        model = vitslim.patch(tiny_vit(depth=6), "tome", macs=0.6, inflection=inflection)
        assert abs(vitslim.count_macs(model) / dense - 0.6) <= 0.02 * 0.6
        shapes[inflection] = model.vitslim_config["options"]["r"]
    assert shapes[-0.5] == sorted(shapes[-0.5], reverse=True) and shapes[-0.5][0] > 2 * shapes[-0.5][-1]
    assert max(shapes[0.0]) - min(shapes[0.0]) <= 1
    assert shapes[0.5] == sorted(shapes[0.5]) and shapes[0.5][-1] > 2 * shapes[0.5][0]
    with pytest.raises(vitslim.VitslimError, match="inflection 2.0 is out of range"):
        vitslim.patch(tiny_vit(depth=6), "tome", macs=0.6, inflection=2.0)


def test_tome_caps_r_at_half_the_patch_tokens():
    model = vitslim.patch(tiny_vit(depth=3), "tome", r=1000)
    assert [t for t, _ in vitslim.describe(model)["tokens"]] == [65, 33, 17]


@pytest.mark.parametrize("method,fused", [("evit", 1), ("topk", 0)])
def test_keep_methods_reduce_only_at_their_locations(method, fused):
    model = vitslim.patch(timm.create_model("deit_small_patch16_224"), method, keep_rate=0.7)
    tokens = vitslim.describe(model)["tokens"]
    n, expected = 196, []
    for i in range(12):
        before = 1 + n
        if i in (3, 6, 9):
            n = -(-7 * n // 10) + fused  # ceil(0.7 n) kept, plus EViT's fused token
        expected.append((before, 1 + n))
    assert tokens == expected


def test_evit_keep_order_option():
    model = vitslim.patch(tiny_vit(), "evit", keep_rate=0.5, keep_order=False)
    assert vitslim.describe(model)["options"]["keep_order"] is False
    assert "keep_order=False" in repr(model.vitslim_reducers)


@pytest.mark.parametrize("method", ["tome", "evit", "topk"])
@pytest.mark.parametrize("budget", [0.5, 0.7])
def test_macs_budget_is_hit_within_two_percent(method, budget):
    dense = timm.create_model("deit_tiny_patch16_224")
    dense_macs = vitslim.count_macs(dense)
    model = vitslim.patch(dense, method, macs=budget)
    assert abs(vitslim.count_macs(model) / dense_macs - budget) <= 0.02 * budget
    assert vitslim.describe(model)["macs_target"] == budget


def test_macs_budget_on_the_small_reference_shape():
    model = vitslim.patch(tiny_vit(depth=8), "evit", macs=0.6)
    dense = vitslim.count_macs(vitslim.unpatch(tiny_vit(depth=8)))
    assert abs(vitslim.count_macs(model) / dense - 0.6) <= 0.012


@pytest.mark.parametrize("call,message", [
    (lambda m: vitslim.patch(m, "nope"), "known methods: atme, cait, cdcp, evit, prune_merge, sit, spvit, tome, topk"),
    (lambda m: vitslim.patch(m, "tome", r=-1), "r must be >= 0"),
    (lambda m: vitslim.patch(m, "tome", r=[1] * 9), "9 entries for a 4-block model"),
    (lambda m: vitslim.patch(m, "tome", r=(4, 3.0)), "inflection"),
    (lambda m: vitslim.patch(m, "tome", r="x"), "r must be an int"),
    (lambda m: vitslim.patch(m, "tome", k=3), "unknown tome options"),
    (lambda m: vitslim.patch(m, "evit", keep_rate=0), "would remove every token"),
    (lambda m: vitslim.patch(m, "evit", keep_rate=1.5), "out of range"),
    (lambda m: vitslim.patch(m, "topk", keep_rate=-0.2), "out of range"),
    (lambda m: vitslim.patch(m, "evit", locations=[7]), "blocks are 0..3"),
    (lambda m: vitslim.patch(m, "evit", keep_rate=[0.5, 0.5], locations=[1]), "2 keep rates for 1"),
    (lambda m: vitslim.patch(m, "tome", macs=0), "out of range"),
    (lambda m: vitslim.patch(m, "tome", macs=1.5), "out of range"),
    (lambda m: vitslim.patch(m, "tome", macs="half"), "fraction"),
    (lambda m: vitslim.patch(m, "topk", macs=0.01), "out of reach"),
    (lambda m: vitslim.patch(m, "tome", macs=0.5, r=3), "either r or macs"),
])
def test_bad_options_give_one_clear_error(call, message):
    model = tiny_vit()
    with pytest.raises(VitslimError, match=message):
        call(model)
    assert not vitslim.is_patched(model)


@pytest.mark.parametrize("method", ["evit", "topk"])
def test_cls_attention_methods_need_a_class_token(method):
    with pytest.raises(VitslimError, match="has no class token: use tome"):
        vitslim.patch(tiny_vit(global_pool="avg", class_token=False), method, keep_rate=0.5)


def test_unsupported_models_are_refused_with_the_supported_list():
    with pytest.raises(VitslimError, match="supports timm VisionTransformer"):
        vitslim.patch(timm.create_model("resnet18"), "tome", r=1)
    with pytest.raises(VitslimError, match="block 0 is a ParallelThingsBlock"):
        vitslim.patch(timm.create_model("vit_small_patch16_18x2_224"), "tome", r=1)


def test_wrong_image_size_is_a_clear_error():
    model = vitslim.patch(tiny_vit(), "tome", r=2)
    with pytest.raises(VitslimError, match="takes 32x32 images, got 48x48"):
        model(torch.randn(1, 3, 48, 48))
    with pytest.raises(VitslimError, match=r"expected images of shape \(B, 3, H, W\)"):
        model(torch.randn(1, 1, 32, 32))


def test_bad_options_with_a_budget_leave_a_patched_model_as_it_was():
    model = vitslim.patch(tiny_vit(), "tome", r=2)
    with pytest.raises(VitslimError, match="blocks are 0..3"):
        vitslim.patch(model, "evit", macs=0.5, locations=[9])
    assert vitslim.describe(model)["options"]["r"] == [2, 2, 2, 2]


@pytest.mark.parametrize("method", ["spvit", "sit"])
def test_new_modules_start_from_the_patch_seed_not_the_global_rng(method):
    # the budget search attaches a varying number of times, so an unseeded init would differ run to run
    def reducer_weights(seed, rng_before):
        torch.manual_seed(rng_before)
        model = vitslim.patch(tiny_vit(), method, macs=0.6, init_seed=seed)
        after = torch.rand(1)  # the caller's stream continues as if patch had drawn nothing
        torch.manual_seed(rng_before)
        tiny_vit()
        assert torch.equal(after, torch.rand(1))
        return [p.detach().clone() for p in model.vitslim_reducers.parameters()]

    same = [torch.equal(a, b) for a, b in zip(reducer_weights(0, 1), reducer_weights(0, 2))]
    other = [torch.equal(a, b) for a, b in zip(reducer_weights(0, 1), reducer_weights(3, 1))]
    assert same and all(same)
    assert not all(other)
