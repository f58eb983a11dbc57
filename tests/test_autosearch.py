"""vitslim auto: the search meets its target as measured, ranks on held-out train images, resumes, fails clearly."""
import copy
import hashlib
import json

import pytest
import torch

import vitslim
from vitslim import autosearch, export
from vitslim.autosearch_tasks import SearchTask
from vitslim.cli import main
from vitslim.data import build_dataset, digits_split
from vitslim.measure import evaluate
from vitslim.zoo import load_model

FAST = dict(holdout=48, calibration=64, report_limit=120, progress=False)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    out = tmp_path_factory.mktemp("auto")
    result = vitslim.auto(load_model("default"), "digits", out, macs=0.6, **FAST)
    return out, result


def test_meets_the_macs_target_and_its_recorded_accuracy_is_a_re_evaluation(searched):
    out, result = searched
    assert abs(result["macs_ratio"] - 0.6) <= 0.02 * 0.6
    model = export.load(out / "model.safetensors")
    dense = vitslim.count_macs(load_model("default"))
    assert abs(vitslim.count_macs(model) / dense - 0.6) <= 0.02 * 0.6
    loader = torch.utils.data.DataLoader(build_dataset("digits", "test", model=model, limit=120), batch_size=64)
    assert evaluate(model, loader, progress=False)["top1"] == result["top1"]
    recorded = json.loads((out / "auto.json").read_text())
    assert recorded["chosen"] == result["chosen"] and (out / "auto.md").is_file() and (out / "auto.png").is_file()
    # successive halving: every candidate on the first quarter, fewer on more images, the chosen one on all 48
    scored = [set(c.get("holdout_top1", {})) for c in result["candidates"].values() if "error" not in c]
    assert all("12" in s for s in scored) and sum("48" in s for s in scored) < len(scored)
    assert "48" in result["candidates"][result["chosen"]]["holdout_top1"]
    # ranked by fidelity: the chosen one is the closest to the dense model's predictions on all 48 images
    finalists = {n: c["holdout_kl"]["48"] for n, c in result["candidates"].items() if "48" in c.get("holdout_kl", {})}
    assert min(finalists.values()) == finalists[result["chosen"]] >= 0


def test_held_out_images_come_from_the_train_split_and_never_from_the_reported_one(searched):
    _, result = searched
    train, _ = digits_split("train")
    test, _ = digits_split("test")
    held = {hashlib.sha1(train[i].tobytes()).hexdigest() for i in result["holdout_indices"]}
    calibration = {hashlib.sha1(train[i].tobytes()).hexdigest() for i in result["calibration_indices"]}
    reported = {hashlib.sha1(image.tobytes()).hexdigest() for image in test}
    assert len(held) == 48 and result["holdout_split"] == "train" and result["report_split"] == "test"
    assert len(calibration) == 64 and not held & reported and not calibration & (held | reported)


def test_a_calibrated_candidate_is_rebuilt_with_its_calibration():
    """The search ranks and saves the model the calibration pass made, not a data-free rebuild of its options."""
    dense = load_model("default")
    _, calibration = autosearch._train_images(SearchTask(dense), "digits", 48, 64)
    loader = torch.utils.data.DataLoader(calibration, batch_size=32)
    cand = next(c for c in autosearch.candidates(dense) if c.name == "cdcp fluctuation")
    prepared = autosearch._prepare(dense, cand, loader)
    entry = autosearch._measure(dense, cand, prepared, {"macs": 0.7}, vitslim.count_macs(dense), runs=5)
    assert entry["options"]["importance"] == "fluctuation"
    rebuilt = autosearch._rebuild(dense, "cdcp", {**prepared, **entry["options"]})
    keep = entry["options"]["keep_rate"]
    direct = vitslim.patch(copy.deepcopy(dense), "cdcp", keep_rate=keep, importance="fluctuation", calibration=loader)
    data_free = vitslim.patch(copy.deepcopy(dense), "cdcp", keep_rate=keep)

    def state(model):
        return [v for k, v in sorted(model.state_dict().items()) if ".scores." in k or "_mean" in k]
    assert state(rebuilt) and all(torch.equal(a, b) for a, b in zip(state(rebuilt), state(direct)))
    assert not all(torch.equal(a, b) for a, b in zip(state(rebuilt), state(data_free)))


def test_an_unreachable_latency_target_is_one_line_and_exit_code_2(tmp_path, capsys):
    code = main(["auto", "--latency-ms", "0.001", "--methods", "tome", "--holdout", "16", "--out", str(tmp_path),
                 "--no-progress"])
    err = capsys.readouterr().err.splitlines()[-1]  # (a first use trains the default model before it)
    assert code == 2 and err.startswith("vitslim: error: no setting meets")
    assert "no setting meets latency_ms=0.001" in err and "tome" in err and "ask for at least" in err
    assert "the closest is tome" in err and "at its strongest setting (" in err and " ms), with " in err


def test_an_interrupted_search_resumes_without_measuring_again(tmp_path, monkeypatch):
    measure, top1 = autosearch._measure, autosearch._score
    calls = {"measure": 0, "top1": 0}

    def counted_measure(*args, **kwargs):
        calls["measure"] += 1
        return measure(*args, **kwargs)

    def interrupted_top1(*args, **kwargs):
        calls["top1"] += 1
        if calls["top1"] == 3:
            raise KeyboardInterrupt  # a kill in the middle of the first rung
        return top1(*args, **kwargs)

    monkeypatch.setattr(autosearch, "_measure", counted_measure)
    monkeypatch.setattr(autosearch, "_score", interrupted_top1)
    methods = ["tome", "topk", "evit"]
    with pytest.raises(KeyboardInterrupt):
        vitslim.auto(load_model("default"), "digits", tmp_path, macs=0.6, methods=methods, **FAST)
    record = json.loads((tmp_path / "auto_record.json").read_text())
    assert len(record["candidates"]) == 6 and calls["measure"] == 6  # tome, evit, topk x2 each: all patched
    assert sum("holdout_top1" in c for c in record["candidates"].values()) == 2
    calls.update(measure=0, top1=0)
    monkeypatch.setattr(autosearch, "_score", lambda *a, **k: (calls.__setitem__("top1", calls["top1"] + 1), top1(*a, **k))[1])
    result = vitslim.auto(load_model("default"), "digits", tmp_path, macs=0.6, methods=methods, **FAST)
    assert calls["measure"] == 0  # every candidate's budget came from the record
    assert calls["top1"] == 4 + 3 + 2  # rung 1: the four not yet scored; rung 2: 3 of 6; rung 3: 2 of 3
    assert result["chosen"] in record["candidates"]


def test_a_time_budget_bounds_the_patching_and_a_rerun_measures_the_rest(tmp_path):
    methods = ["tome", "topk", "evit"]
    first = vitslim.auto(load_model("default"), "digits", tmp_path, macs=0.6, methods=methods, time_budget=1e-3, **FAST)
    assert list(first["candidates"]) == ["tome"] and first["chosen"] == "tome"
    assert first["not_measured"] == ["tome decreasing", "evit", "evit early", "topk", "topk early"]
    assert "Not measured (time budget spent): tome decreasing, evit" in (tmp_path / "auto.md").read_text()
    second = vitslim.auto(load_model("default"), "digits", tmp_path, macs=0.6, methods=methods, **FAST)
    assert len(second["candidates"]) == 6 and not second["not_measured"]
    assert second["seconds"] > first["seconds"]  # the time of the first run counts in the resumed search


def test_a_record_of_another_search_is_refused(searched):
    out, _ = searched
    with pytest.raises(vitslim.VitslimError, match="records another search"):
        vitslim.auto(load_model("default"), "digits", out, macs=0.5, **FAST)


def test_an_unreachable_speedup_is_said_in_speed_ups(tmp_path, capsys):
    code = main(["auto", "--speedup", "1000", "--methods", "topk", "--holdout", "16", "--runs", "5",
                 "--batch-size", "8", "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err.splitlines()[-1]
    assert code == 2 and err.startswith("vitslim: error: no setting meets")
    assert "no setting meets speedup=1000.0" in err and "its strongest setting on this model gives" in err
    # what the fastest setting found costs in accuracy
    assert "the closest is topk" in err and "held-out top-1 against the dense model's" in err


def test_held_out_images_are_seen_as_at_evaluation_not_augmented():
    """The train split's images, but through the evaluation transform: the same tensors every time."""
    held, calibration = autosearch._train_images(SearchTask(load_model("default")), "digits", 16, 16)
    assert all(torch.equal(held[i][0], held[i][0]) and torch.equal(calibration[i][0], calibration[i][0])
               for i in range(16))
    with pytest.raises(vitslim.VitslimError, match="report on another split"):
        vitslim.auto(load_model("default"), "digits", "unused", macs=0.6, report_split="train")


def test_segmentation_search_runs_methods_under_the_trained_head_and_reports_miou(tmp_path, capsys):
    """--task segment: the backbone is patched to the target under the checkpoint's head, ranked by the KL of its
    per-patch predictions, and the saved checkpoint's mIoU on the reported split is the recorded one."""
    from test_segment_train import _folder, _model_folder

    from vitslim.dense import evaluate_segmentation
    from vitslim.dense.data import segmentation_split
    from vitslim.train.segmentation import load_segmentation

    data, backbone = _folder(tmp_path / "data"), _model_folder(tmp_path / "backbone")
    head = tmp_path / "head"
    assert main(["segment", "train", "--model", backbone, "--data", data, "--size", "32,32", "--num-classes", "3",
                 "--val-split", "test", "--freeze-backbone", "--epochs", "2", "--batch-size", "4", "--lr", "3e-3",
                 "--out", str(head), "--no-progress"]) == 0
    out = tmp_path / "auto"
    assert main(["auto", "--task", "segment", "--model", str(head / "last.pt"), "--data", data, "--macs", "0.6",
                 "--methods", "tome,topk", "--holdout", "8", "--calibration", "0", "--out", str(out),
                 "--no-progress"]) == 0
    assert "mIoU" in capsys.readouterr().out
    result = json.loads((out / "auto.json").read_text())
    assert result["task"] == "segment" and result["files"] == ["model.pt"] and abs(result["macs_ratio"] - 0.6) <= 0.012
    assert all("holdout_miou" in c and "holdout_top1" not in c for c in result["candidates"].values() if "error" not in c)
    chosen = load_segmentation(out / "model.pt")
    assert chosen.backbone.vitslim_config["method"] == result["method"]
    dense = load_segmentation(head / "last.pt")
    torch.testing.assert_close(chosen.head.state_dict(), dense.head.state_dict())  # the trained head, unchanged
    test = segmentation_split(data, "test", chosen.backbone, (32, 32), train=False, num_classes=3)
    scores = evaluate_segmentation(chosen, torch.utils.data.DataLoader(test, batch_size=1), 3)
    assert scores["miou"] == result["miou"] and result["report_images"] == 8
    # a classification model is refused for --task segment, a segmentation one for classify
    assert main(["auto", "--task", "segment", "--data", data, "--macs", "0.6", "--out", str(tmp_path / "x")]) == 2
    assert "give --model: a `vitslim segment train` checkpoint" in capsys.readouterr().err
    with pytest.raises(vitslim.VitslimError, match="task='segment'"):
        vitslim.auto(dense, data, tmp_path / "y", macs=0.6, task="classify")


def test_bf16_search_scores_and_saves_the_bf16_model(tmp_path):
    """--precision bf16: the ranking and the recorded top-1 are the bf16 model's, and the file holds bf16 weights."""
    from vitslim.export import runtime

    result = vitslim.auto(load_model("default"), "digits", tmp_path, macs=0.6, methods=["tome"], precision="bf16",
                          **FAST)
    assert result["precision"] == "bf16" and export.read_metadata(tmp_path / "model.safetensors")["dtype"] == "bf16"
    saved = runtime(export.load(tmp_path / "model.safetensors"), "eager", "bf16")
    # the wrapper's data config is its model's (it was ImageNet's normalisation before)
    loader = torch.utils.data.DataLoader(build_dataset("digits", "test", model=saved, limit=120), batch_size=64)
    assert evaluate(saved, loader, progress=False)["top1"] == result["top1"]
    assert "timed and scored with eager at bf16" in (tmp_path / "auto.md").read_text()
    with pytest.raises(vitslim.VitslimError, match="int8 .* runs eager only"):
        vitslim.auto(load_model("default"), "digits", tmp_path / "z", macs=0.6, backend="compile", precision="int8")


def test_an_onnxruntime_latency_search_times_the_onnx_graph_and_writes_it(tmp_path):
    pytest.importorskip("onnxruntime")
    from vitslim.export import onnx_metadata

    result = vitslim.auto(load_model("default"), "digits", tmp_path, latency_ms=1000.0, methods=["tome"],
                          backend="onnxruntime", **FAST)
    entry = result["candidates"]["tome"]
    assert result["backend"] == "onnxruntime" and 0 < entry["latency_ms"] < 1000
    assert result["files"] == ["model.safetensors", "model.onnx"]
    assert onnx_metadata(tmp_path / "model.onnx")["method"] == "tome"


def test_finetune_budget_trains_the_finalists_re_ranks_them_and_resumes(tmp_path, monkeypatch):
    """--finetune-budget: the best few are fine-tuned with distillation (closer to dense than before), re-ranked
    by held-out KL, the saved model is the fine-tuned winner; a rerun trains and scores nothing again."""
    kwargs = dict(macs=0.5, methods=["topk", "evit"], finetune_steps=12, finetune_top=2, finetune_batch=16,
                  finetune_lr=3e-4, **FAST)
    result = vitslim.auto(load_model("default"), "digits", tmp_path, **kwargs)
    finalists = result["finetune"]["candidates"]
    assert len(finalists) == 2 and result["chosen"] in finalists and result["finetune"]["kept"] == "fine-tuned"
    after = {n: result["candidates"][n]["finetuned"]["12"] for n in finalists}
    assert result["chosen"] == min(after, key=lambda n: after[n]["holdout_kl"])
    for name in finalists:  # both scored on all 48 held-out images before and after
        assert after[name]["holdout_kl"] < result["candidates"][name]["holdout_kl"]["48"]  # closer to dense
    saved = export.load(tmp_path / "model.safetensors")
    loader = torch.utils.data.DataLoader(build_dataset("digits", "test", model=saved, limit=120), batch_size=64)
    assert evaluate(saved, loader, progress=False)["top1"] == result["top1"]
    rebuilt = autosearch._rebuild(load_model("default"), result["method"], result["options"])
    assert not all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), rebuilt.state_dict().values()))
    assert "Fine-tuned: the best 2 for 12 steps" in (tmp_path / "auto.md").read_text()
    assert "fine-tuned 12 steps" in (tmp_path / "auto.md").read_text()
    # resumed: the finished runs come back from their checkpoints, nothing is scored again
    calls = []
    score = autosearch._score
    monkeypatch.setattr(autosearch, "_score", lambda *a, **k: (calls.append(1), score(*a, **k))[1])
    again = vitslim.auto(load_model("default"), "digits", tmp_path, **kwargs)
    assert not calls and again["chosen"] == result["chosen"] and again["top1"] == result["top1"]


def test_a_finalist_that_fine_tuning_moves_away_from_dense_is_kept_training_free(tmp_path):
    """ToMe at 0.5 MACs on the digits model is nearly lossless: the label loss moves it away from the dense model,
    so the saved model is its training-free form (the fine-tuned one is only recorded)."""
    result = vitslim.auto(load_model("default"), "digits", tmp_path, macs=0.5, methods=["tome"], finetune_steps=12,
                          finetune_top=1, finetune_batch=16, finetune_lr=3e-4, **FAST)
    entry = result["candidates"][result["chosen"]]
    assert result["finetune"]["kept"] == "training-free"
    assert entry["finetuned"]["12"]["holdout_kl"] > entry["holdout_kl"]["48"]
    saved = export.load(tmp_path / "model.safetensors")
    rebuilt = autosearch._rebuild(load_model("default"), result["method"], result["options"])
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), rebuilt.state_dict().values()))
    assert "training-free: no fine-tuned finalist came closer" in (tmp_path / "auto.md").read_text()
