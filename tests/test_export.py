"""Deployment: one file per model, ONNX in onnxruntime, torch.compile, bf16 and int8 (issue 14)."""
import pytest
import timm
import torch
import torch._dynamo

import vitslim
from vitslim import export
from vitslim.errors import VitslimError
from vitslim.export.inference import check_runtime
from vitslim.export.runtime import runtime

pytest.importorskip("onnxruntime")

ALL = vitslim.methods()


def _vit(**kwargs):
    """A tiny timm-created ViT (its architecture is recorded, so save() can describe it)."""
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2, num_classes=10)
    args.update(kwargs)
    return timm.create_model("vit_tiny_patch16_224", **args).eval()


def _patched(method: str):
    model = _vit()
    return model if method == "dense" else vitslim.patch(model, method, macs=0.7).eval()


def _max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("method", ALL)
def test_save_load_gives_identical_outputs(method, tmp_path):
    model = _patched(method)
    x = torch.randn(3, 3, 32, 32)
    path = tmp_path / "model.safetensors"
    export.save(model, path)
    loaded = export.load(path)
    with torch.no_grad():
        ref = model(x)
        assert _max_diff(loaded(x), ref) <= 1e-6
    meta = export.read_metadata(path)
    expected = "atme" if method == "cait" else None if method in ("cdcp", "dense") else method
    assert meta["method"] == expected and meta["dtype"] == "fp32"
    assert vitslim.count_macs(loaded) == vitslim.count_macs(export.deployable(model))


def test_training_only_modules_are_left_out_and_bf16_weights(tmp_path):
    model = vitslim.patch(_vit(), "sit", keep_rate=0.5, reverse=True).eval()
    assert any("reverse" in k for k in model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    export.save(model, tmp_path / "sit.safetensors")
    loaded = export.load(tmp_path / "sit.safetensors")
    assert not any("reverse" in k for k in loaded.state_dict())
    with torch.no_grad():
        assert _max_diff(loaded(x), model(x)) <= 1e-6
    export.save(model, tmp_path / "sit_bf16.safetensors", precision="bf16")
    half = export.load(tmp_path / "sit_bf16.safetensors")
    assert half.pos_embed.dtype == torch.bfloat16
    assert (tmp_path / "sit_bf16.safetensors").stat().st_size < 0.6 * (tmp_path / "sit.safetensors").stat().st_size
    with torch.no_grad():
        assert _max_diff(half(x.bfloat16()), model(x)) <= 0.1


@pytest.mark.parametrize("method", ["dense", *ALL])
def test_onnx_matches_pytorch_at_two_batch_sizes(method, tmp_path):
    model = _patched(method)
    path = export.to_onnx(model, tmp_path / "m.onnx", input_size=(3, 32, 32))  # checks batch 1 and 3 itself
    session = export.onnx_session(path)
    for batch in (2, 5):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            assert _max_diff(session(x), model(x)) <= 1e-4
    meta = export.onnx_metadata(path)
    assert meta["input_size"] == [3, 32, 32] and meta["batch"] == "dynamic"
    assert meta["method"] == ("atme" if method == "cait" else None if method in ("cdcp", "dense") else method)


def test_onnx_fixed_batch_int8_and_errors(tmp_path):
    model = _patched("tome")
    path = export.to_onnx(model, tmp_path / "b4.onnx", batch=4)
    session = export.onnx_session(path)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert _max_diff(session(x), model(x)) <= 1e-4
    with pytest.raises(VitslimError, match="takes inputs of shape 4x3x32x32"):
        session(torch.randn(2, 3, 32, 32))
    int8 = export.to_onnx(model, tmp_path / "int8.onnx", precision="int8")  # checked against fp32 (rel. error)
    onnx = pytest.importorskip("onnx")
    assert "MatMulInteger" in {node.op_type for node in onnx.load(str(int8)).graph.node}
    with pytest.raises(VitslimError, match="batch must be"):
        export.to_onnx(model, tmp_path / "x.onnx", batch=0)
    with pytest.raises(VitslimError, match="precision"):
        export.to_onnx(model, tmp_path / "x.onnx", precision="bf16")
    with pytest.raises(VitslimError, match="this model takes 32x32"):
        export.to_onnx(model, tmp_path / "x.onnx", input_size=(3, 48, 48))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b4.onnx", "int8.onnx"]  # nothing half-written


def test_a_graph_that_cannot_export_is_refused_clearly(tmp_path, monkeypatch):
    from vitslim.methods import tome

    model = _patched("tome")
    original = tome.ToMeMerge.after_attn

    def data_dependent(self, state, attn):  # a Python branch on a value: no static graph
        if state.x.sum() > 0:
            return original(self, state, attn)
        return state

    monkeypatch.setattr(tome.ToMeMerge, "after_attn", data_dependent)
    with pytest.raises(VitslimError, match="tome does not export to ONNX"):
        export.to_onnx(model, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_files_that_are_not_vitslim_exports(tmp_path):
    onnx = pytest.importorskip("onnx")
    with pytest.raises(VitslimError, match="not found"):
        export.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a model")
    with pytest.raises(VitslimError, match="cannot read"):
        export.load(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(VitslimError, match="not written by vitslim.export.save"):
        export.load(tmp_path / "plain.safetensors")
    graph = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    onnx.save(graph, tmp_path / "plain.onnx")
    with pytest.raises(VitslimError, match="not written by vitslim.export.to_onnx"):
        export.onnx_metadata(tmp_path / "plain.onnx")
    with pytest.raises(VitslimError, match="int8"):
        export.save(_vit(), tmp_path / "x.safetensors", precision="int8")


def _compile_and_count(method: str, batches: tuple[int, ...]) -> tuple[int, int]:
    """Compile the patched model, check it against eager at each batch: (graph breaks, graphs compiled)."""
    model = _patched(method)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = runtime(model, "compile")
    with torch.inference_mode():
        for batch in batches:
            x = torch.randn(batch, 3, 32, 32)
            assert _max_diff(compiled(x), model(x)) <= 1e-4
    counters = torch._dynamo.utils.counters
    return sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("method", ["dense", *ALL])
def test_compiled_equals_eager_one_graph_no_breaks(method):
    assert _compile_and_count(method, (2, 5)) == (0, 1)  # one graph for both batch sizes


def test_compiled_batch_one_compiles_once_more():
    """Dynamo specialises size-1 dimensions: batch 1 gets one graph of its own, then every batch reuses one."""
    assert _compile_and_count("tome", (1, 4, 1, 3)) == (0, 2)


@pytest.mark.parametrize("method", ["tome", "prune_merge", "cait"])
def test_bf16_and_int8_runtimes_stay_close_to_fp32(method):
    model = _patched(method)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        for precision, tolerance in (("bf16", 0.1), ("int8", 0.15)):
            out = runtime(model, "eager", precision)(x)
            assert out.dtype == torch.float32
            rel = ((out - ref).norm() / ref.norm()).item()
            assert rel <= tolerance, (precision, rel)
    assert any(type(m).__module__.startswith("torch.ao.nn.quantized")
               for m in runtime(model, "eager", "int8").modules())
    if method == "tome":  # bf16 compiles too
        with torch.no_grad():
            out = runtime(model, "compile", "bf16")(x)
        assert ((out - ref).norm() / ref.norm()).item() <= 0.1


def test_runtime_refuses_pairs_that_cannot_run():
    with pytest.raises(VitslimError, match="backend must be one of"):
        check_runtime("tensorrt", "fp32")
    with pytest.raises(VitslimError, match="eager only"):
        check_runtime("compile", "int8")
    with pytest.raises(VitslimError, match="does not export bf16 ONNX"):
        check_runtime("onnxruntime", "bf16")


def test_reference_model_top1_in_bf16_and_int8():
    """On the embedded default (digits) model: bf16 and int8 top-1 within 1.5 points of fp32."""
    from vitslim.data import build_loader
    from vitslim.measure import evaluate
    from vitslim.zoo import load_model

    model = load_model("default")
    loader = build_loader("digits", "test", model=model, batch_size=128)
    fp32 = evaluate(model, loader)["top1"]
    for precision in ("bf16", "int8"):
        top1 = evaluate(runtime(model, "eager", precision), loader)["top1"]
        assert abs(top1 - fp32) <= 0.015, (precision, top1, fp32)
