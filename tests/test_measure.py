"""MACs against the analytic formula and the published anchors; speed and accuracy helpers."""
import pytest
import timm
import torch
from conftest import tiny_vit

import vitslim
from vitslim.measure import analytic_macs, compare_speed, evaluate, ideal_model, latency, throughput


@pytest.mark.parametrize("name,gmacs", [
    ("deit_tiny_patch16_224", 1.254), ("deit_small_patch16_224", 4.599), ("deit_base_patch16_224", 17.564),
])
@pytest.mark.parametrize("fused", [True, False])
def test_dense_deit_macs_match_the_analytic_formula(name, gmacs, fused):
    model = timm.create_model(name)
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    counted = vitslim.count_macs(model)
    assert counted == analytic_macs(model)
    assert abs(counted / 1e9 - gmacs) < 0.001
    ops = vitslim.count_macs(model, by_op=True)
    attention = "_scaled_dot_product_flash_attention_for_cpu" if fused else "bmm"
    assert ops[attention] == 12 * 2 * 197 * 197 * model.embed_dim  # QK^T and AV, all heads


@pytest.mark.parametrize("r,expected", [(8, 3.416), (13, 2.703), (16, 2.291)])
def test_tome_deit_small_matches_the_published_macs(r, expected):
    model = vitslim.patch(timm.create_model("deit_small_patch16_224"), "tome", r=r)
    counted = vitslim.count_macs(model)
    ideal = analytic_macs(model, vitslim.describe(model)["tokens"])
    assert abs(ideal / 1e9 - expected) < 0.01
    # the counter adds the matching's own work on top of the dense blocks, and nothing else big
    assert ideal < counted < ideal * 1.005


@pytest.mark.parametrize("keep,expected", [(0.9, 4.022), (0.7, 3.029), (0.5, 2.309)])
def test_evit_deit_small_matches_the_published_macs(keep, expected):
    model = vitslim.patch(timm.create_model("deit_small_patch16_224"), "evit", keep_rate=keep)
    assert abs(vitslim.count_macs(model) / 1e9 - expected) < 0.01


def test_distilled_deit_counts_both_heads():
    model = timm.create_model("deit_tiny_distilled_patch16_224")
    assert vitslim.count_macs(model) == analytic_macs(model)


def test_count_macs_per_image_is_batch_independent():
    model = vitslim.patch(tiny_vit(), "tome", r=4)
    assert vitslim.count_macs(model, batch_size=1) == vitslim.count_macs(model, batch_size=4)


def test_speed_helpers_report_the_protocol():
    model = tiny_vit()
    result = throughput(model, batch_size=4, runs=5, warmup=1, threads=1)
    assert result["images_per_s"] > 0 and result["runs"] == 5 and result["threads"] == 1
    assert result["median_ms"] <= result["p90_ms"]
    assert latency(model, runs=5, warmup=1)["batch_size"] == 1
    with pytest.raises(ValueError, match=">= 5"):
        throughput(model, runs=3)


def test_ideal_model_runs_the_schedule_without_reduction_work():
    model = vitslim.patch(tiny_vit(), "tome", r=8)
    ideal = ideal_model(model)
    tokens = vitslim.describe(model)["tokens"]
    assert analytic_macs(model, tokens) == vitslim.count_macs(ideal)
    speeds = compare_speed({"patched": model, "ideal": ideal}, batch_size=2, runs=5, warmup=1)
    assert set(speeds) == {"patched", "ideal"}


def test_evaluate_counts_top1_and_top5():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([[0.0, 9, 8, 7, 6, 5, 1], [9.0, 0, 1, 2, 3, 4, 5]])[: x.shape[0]]

    loader = [(torch.zeros(2, 1), torch.tensor([1, 6]))]
    result = evaluate(Fixed(), loader, progress=False)
    assert result == {"top1": 0.5, "top5": 1.0, "n": 2}


def test_paired_ratio_cancels_drift_that_a_ratio_of_medians_keeps():
    from vitslim.measure.speed import paired_ratio

    # the machine slows down 3x half way; the method is always twice as fast as dense
    dense = {"times_ms": [10, 10, 10, 30, 30, 30]}
    method = {"times_ms": [5, 5, 5, 15, 15, 15]}
    assert paired_ratio(dense, method) == 2.0
    method_drifted = {"times_ms": [5, 5, 15, 15, 15, 15]}  # slowed one round earlier
    assert paired_ratio(dense, method_drifted) == 2.0


def test_run_compare_measures_prebuilt_models_beside_dense_and_their_ideals():
    import copy

    from vitslim import export
    from vitslim.errors import VitslimError
    from vitslim.measure.compare import run_compare

    dense = tiny_vit()
    merged = vitslim.patch(copy.deepcopy(dense), "tome", r=4)  # native options: no MACs target
    slim = export.slim(vitslim.patch(copy.deepcopy(dense), "cdcp", macs=0.6))
    timing = dict(batch_size=2, runs=5, warmup=1, threads=1, progress=False)
    result = run_compare(dense, ["evit"], [0.7], models={"tome r=4": merged}, **timing)
    assert [r["method"] for r in result["rows"]] == ["dense", "evit", "tome r=4"]
    row = result["rows"][2]
    assert row["gmacs"] == vitslim.count_macs(merged) / 1e9 and row["budget"] == round(row["macs_ratio"], 3)
    assert row["options"]["r"] == [4] * 4 and row["tokens"] == [list(t) for t in vitslim.describe(merged)["tokens"]]
    assert row["ideal_speedup"] > 0 and row["measured_over_ideal"] > 0
    result = run_compare(dense, [], [], models=[("cdcp@0.6 (exported)", slim, {"budget": 0.6, "note": "sliced"})],
                         **timing)
    row = result["rows"][1]
    assert row["method"] == "cdcp@0.6 (exported)" and row["note"] == "sliced"
    assert abs(row["macs_ratio"] - 0.6) <= 0.03  # the sliced model is what was measured
    assert set(result["protocol"]) >= {"batch_size", "runs", "threads", "allocator", "speed", "macs"}
    with pytest.raises(VitslimError, match="taken"):
        run_compare(dense, [], [], models={"dense": slim}, **timing)


@pytest.mark.parametrize("flag,value,message", [
    ("--batch-size", "0", "batch size must be a whole number >= 1, got 0"),
    ("--runs", "0", "runs must be >= 5 for a trustworthy median, got 0"),
])
def test_bench_rejects_timing_it_cannot_measure_in_one_line(flag, value, message, capsys):
    from vitslim.cli import main

    assert main(["bench", "--model", "deit_tiny_patch16_224", "--methods", "tome", flag, value]) == 2
    assert capsys.readouterr().err.strip() == f"vitslim: error: {message}"


def test_a_speedup_search_starts_at_the_macs_guess_and_times_few_levels(monkeypatch):
    """fit_speedup times the level at 1/speedup of the MACs first and starts where the speed per MACs measured
    there puts the target: when speed follows MACs it times 3 of the 199 top-k levels (the bisection alone
    times 10) and picks a level that meets the target, within 1% of the MACs of the mildest one that does."""
    from vitslim.measure import latency_budget
    from vitslim.measure.macs import count_macs

    model = tiny_vit(depth=6)
    dense_macs = count_macs(model)
    timed = []

    def fake_compare_speed(models, batch_size, runs, threads):  # speed = 0.95 / MACs ratio, no clock
        ratio = count_macs(models["model"]) / dense_macs
        timed.append(ratio)
        return {"dense": {"times_ms": [1.0]}, "model": {"times_ms": [ratio / 0.95]}}

    monkeypatch.setattr(latency_budget, "compare_speed", fake_compare_speed)
    record = latency_budget.fit_speedup(model, 1.5, "topk")
    assert record["speedup"] >= 1.5 and len(timed) <= 3
    assert 0.95 / 1.5 - 0.015 < count_macs(model) / dense_macs <= 0.95 / 1.5  # 1.5x needs 0.633 of the MACs
    with pytest.raises(vitslim.VitslimError, match="speedup=1000 is out of reach"):
        latency_budget.fit_speedup(tiny_vit(depth=6), 1000, "topk")


def test_a_latency_search_starts_at_the_macs_guess_too(monkeypatch):
    """fit_latency times the dense model once and starts from MACs the same way: with a latency that is 1 ms
    of overhead plus 9 ms x the MACs ratio, a 6 ms target (0.556 of the MACs) is found timing 4 models, the
    dense one included, and the level meets it within 1% of the dense MACs."""
    from vitslim.measure import latency_budget
    from vitslim.measure.macs import count_macs

    model = tiny_vit(depth=6)
    dense_macs = count_macs(model)
    timed = []

    def fake_latency(m, runs, threads):
        timed.append(count_macs(m) / dense_macs)
        return {"median_ms": 1.0 + 9.0 * timed[-1]}

    monkeypatch.setattr(latency_budget, "latency", fake_latency)
    record = latency_budget.fit_latency(model, 6.0, "topk")
    assert timed[0] == 1.0 and len(timed) <= 4 and record["latency_ms"] <= 6.0
    assert record["dense_ms"] == 10.0  # the dense model's latency, timed once, is kept beside the result
    assert 5 / 9 - 0.015 < count_macs(model) / dense_macs <= 5 / 9
