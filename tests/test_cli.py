"""The ``vitslim`` command on the embedded default, and its one-line errors."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vitslim.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_compare_on_the_embedded_default(tmp_path, capsys):
    assert main(["compare", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "compare.json").read_text())
    rows = report["rows"]
    assert [(r["method"], r["budget"]) for r in rows] == [("dense", 1.0)] + [
        (m, b) for m in ("tome", "evit", "topk") for b in (0.5, 0.7)]
    assert rows[0]["top1"] >= 0.95  # the embedded default is a real, trained model
    for row in rows[1:]:
        assert abs(row["macs_ratio"] - row["budget"]) <= 0.02 * row["budget"]
        assert row["speedup"] > 0 and row["ideal_speedup"] > 0 and 0 <= row["top1"] <= 1
        assert row["top1_delta"] == pytest.approx(row["top1"] - rows[0]["top1"])
    assert report["protocol"]["batch_size"] == 32 and report["command"].startswith("vitslim compare")
    assert (tmp_path / "compare.png").stat().st_size > 10_000
    markdown = (tmp_path / "compare.md").read_text()
    assert "| method |" in markdown and "topk" in markdown
    out = capsys.readouterr().out
    assert "measured/ideal" in out and "wrote" in out


def test_bench_needs_no_data(tmp_path):
    args = ["bench", "--model", "deit_tiny_patch16_224", "--methods", "tome", "--budgets", "0.6",
            "--batch-size", "2", "--out", str(tmp_path)]
    assert main(args) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert len(rows) == 2 and "top1" not in rows[1]
    assert abs(rows[1]["macs_ratio"] - 0.6) <= 0.012
    assert not (tmp_path / "bench.png").exists()


def test_eval_a_patched_default_model(capsys):
    assert main(["eval", "--method", "tome", "--macs", "0.6"]) == 0
    line = capsys.readouterr().out
    top1 = float(re.search(r"top-1 ([\d.]+)%", line).group(1))
    assert 50 < top1 <= 100 and "on 360 images" in line


def test_export_any_method_then_compare_it_deployed(tmp_path, capsys):
    import torch

    from vitslim.export import load, onnx_metadata, onnx_session
    from vitslim.zoo import load_model

    onnx_file, weights = tmp_path / "tome.onnx", tmp_path / "cdcp.safetensors"
    assert main(["export", "--method", "tome", "--macs", "0.7", "--out", str(onnx_file), "--batch", "3"]) == 0
    assert main(["export", "--method", "cdcp", "--macs", "0.7", "--out", str(weights)]) == 0
    out = capsys.readouterr().out
    assert "onnx, tome, checked in onnxruntime" in out and "safetensors, cdcp, fp32 weights" in out
    assert onnx_metadata(onnx_file)["batch"] == 3
    model = load_model("default")
    x = torch.randn(3, *model.patch_embed.proj.weight.shape[1:2], *model.patch_embed.img_size)
    tome = __import__("vitslim").patch(load_model("default"), "tome", macs=0.7)
    with torch.no_grad():
        assert (onnx_session(onnx_file)(x) - tome(x)).abs().max() <= 1e-4
        assert load(weights)(x).shape == (3, model.num_classes)
    assert main(["compare", "--methods", "tome", "--budgets", "0.7", "--backend", "onnxruntime",
                 "--precision", "int8", "--out", str(tmp_path), "--no-plot"]) == 0
    report = json.loads((tmp_path / "compare.json").read_text())
    assert (report["protocol"]["backend"], report["protocol"]["precision"]) == ("onnxruntime", "int8")
    assert report["rows"][0]["top1"] >= 0.9 and report["rows"][1]["measured_over_ideal"] > 0


@pytest.mark.parametrize("args,message", [
    (["export", "--out", "x.safetensors", "--batch", "4"], "--input-size and --batch are for --format onnx"),
    (["export", "--out", "x.onnx", "--batch", "0"], "--batch takes a whole number >= 1 or 'dynamic'"),
    (["export", "--out", "x.safetensors", "--precision", "int8"], "int8: export to ONNX"),
    (["bench", "--backend", "compile", "--precision", "int8"], "eager only"),
    (["bench", "--methods", "tome,magic"], "unknown method 'magic'; known methods: atme, cait, cdcp, evit, prune_merge, sit, spvit, tome, topk"),
    (["bench", "--model", "no_such_vit"], "no_such_vit"),
    (["eval", "--data", "/no/such/dir"], "/no/such/dir"),
    (["eval", "--method", "evit", "--option", "keep_rate=2"], "out of range"),
    (["eval", "--macs", "0.5"], "need --method"),
])
def test_bad_input_is_one_line_on_stderr(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitslim: error:") and message in err
    assert "\n" not in err and "Traceback" not in err


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "vitslim", "--help"], capture_output=True, text=True, check=True)
    assert "compare" in out.stdout and "bench" in out.stdout


def test_readme_quick_start_and_ci_run_the_same_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    quick = readme.split("## Quick start", 1)[1].split("##", 1)[0]
    commands = [line.strip() for line in quick.splitlines() if line.strip().startswith("python3 -m venv")]
    assert len(commands) == 2, "the quick start is exactly two commands"
    assert commands[0].endswith("vitslim compare")
    test_command = commands[1].replace("HF_HUB_OFFLINE=1 ", "")
    assert test_command in ci


def test_calibrate_saves_scores_and_plan_that_patch_takes(tmp_path, capsys):
    import torch

    from vitslim.methods.prune_merge import load_scores

    out = tmp_path / "scores.safetensors"
    assert main(["calibrate", "--iters", "2", "--batch-size", "8", "--option", "keep_rate=0.5",
                 "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "centres per block" in printed and "scores=" in printed
    scores = load_scores(out)
    assert scores.ndim == 2 and (scores > 0).any()
    plan = json.loads(out.with_suffix(".plan.json").read_text())
    assert plan["options"]["keep_rate"] == 0.5
    assert sum(len(b["centres"]) for b in plan["blocks"].values()) == sum(plan["options"]["tokens"])
    assert main(["eval", "--method", "prune_merge", "--option", "keep_rate=0.5", "--option",
                 f"scores={out}"]) == 0
    assert "top-1" in capsys.readouterr().out
    assert torch.equal(load_scores(out), scores)
