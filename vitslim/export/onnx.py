"""ONNX export of any vitslim model, checked against PyTorch in onnxruntime before it is kept.

``to_onnx(model, path, input_size=(3, H, W))`` exports the deployable form of the model
(``vitslim.export.deployable``: training-only modules left out, channel masks sliced) with
PyTorch's ``torch.export``-based exporter: every method's token counts are fixed by the input size,
so the graph is static except, with ``batch="dynamic"``, the batch size. The file is written only
after onnxruntime ran it on random images at two batch sizes and matched PyTorch (max abs logit
difference <= ``atol``): an export that differs from its model raises, it is never a warning.
``precision="int8"`` then quantises the graph's MatMul weights with onnxruntime's dynamic
quantisation (checked for agreement with the fp32 model within a looser, stated tolerance).
onnxruntime and onnx are an optional extra: ``pip install vitslim[onnx]``.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pathlib
import tempfile
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from vitslim._version import __version__
from vitslim.errors import VitslimError
from vitslim.export.inference import deployable
from vitslim.io import atomic_write
from vitslim.measure.macs import default_input_size
from vitslim.patch import check_input, is_patched

OPSET = 18
ATOL = 1e-4  # max abs logit difference fp32 onnxruntime vs PyTorch
INT8_RTOL = 0.25  # int8: ||onnx - torch|| / ||torch|| over the check batch (quantisation error, not a bug)
_INSTALL = "pip install 'vitslim[onnx]' (onnx and onnxruntime)"


def require(module: str) -> Any:
    """The module (onnx, onnxscript, onnxruntime), or a VitslimError saying how to install it."""
    try:
        return __import__(module)
    except ImportError:
        raise VitslimError(f"ONNX export and the onnxruntime backend need {module}: {_INSTALL}") from None


class OnnxSession:
    """An onnxruntime session that takes and returns torch tensors (CPU), with the thread count fixed."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        try:
            self.session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise VitslimError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0]}") from None
        inputs = self.session.get_inputs()[0]
        self.input_name, self.input_shape = inputs.name, list(inputs.shape)

    def __call__(self, images: Tensor) -> Tensor:
        """Logits of ``images`` (B, C, H, W) from the ONNX graph."""
        fixed = [(i, d) for i, d in enumerate(self.input_shape) if isinstance(d, int)]
        if images.dim() != len(self.input_shape) or any(images.shape[i] != d for i, d in fixed):
            want = "x".join(str(d) if isinstance(d, int) else "B" for d in self.input_shape)
            raise VitslimError(f"this ONNX model takes inputs of shape {want}, got {tuple(images.shape)}: export "
                               "it again with --input-size / --batch dynamic for other shapes")
        out = self.session.run(None, {self.input_name: images.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(out)


def onnx_session(path: str | os.PathLike, threads: int | None = None) -> OnnxSession:
    """An onnxruntime session on an exported file, callable on torch tensors."""
    if not os.path.isfile(path):
        raise VitslimError(f"{path} not found: write one with vitslim.export.to_onnx or `vitslim export --format onnx`")
    return OnnxSession(path, threads)


def _check_batch(batch: int | str) -> int | None:
    if batch == "dynamic":
        return None
    if isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1:
        return batch
    raise VitslimError(f"batch must be a whole number >= 1 or 'dynamic', got {batch!r}")


def _export_proto(model: nn.Module, example: Tensor, dynamic: bool) -> bytes:
    """The ONNX bytes of ``model`` traced on ``example`` (batch dimension dynamic or not)."""
    require("onnx")
    require("onnxscript")
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic else None
    log = io.StringIO()
    # no torch.no_grad() here: the exporter's decomposition fails under it for some graphs (ToMe's)
    with warnings.catch_warnings(), contextlib.redirect_stdout(log):
        warnings.simplefilter("ignore")  # the exporter's advice is for its own developers
        try:
            # strict (dynamo) tracing: the non-strict tracer would run the Python of the forward and
            # fill the tokens' lru caches with traced tensors, which later eager calls would read
            exported = torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes, strict=True)
            program = torch.onnx.export(exported, dynamo=True, opset_version=OPSET, external_data=False,
                                        optimize=True, input_names=["images"], output_names=["logits"])
        except VitslimError:
            raise
        except Exception as exc:  # noqa: BLE001 - torch.export raises many types; say which model failed
            method = model.vitslim_config["method"] if is_patched(model) else "the dense model"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise VitslimError(f"{method} does not export to ONNX: {first[:300]}") from None
    return program.model_proto.SerializeToString()


def _with_metadata(proto: bytes, meta: dict[str, Any]) -> bytes:
    onnx = require("onnx")
    graph = onnx.load_from_string(proto)
    entry = graph.metadata_props.add()
    entry.key, entry.value = "vitslim", json.dumps(meta, default=str)
    return graph.SerializeToString()


def _quantize_int8(proto: bytes) -> bytes:
    """Dynamic int8 quantisation of the graph's weights (onnxruntime.quantization)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx = require("onnx")
    graph = onnx.load_from_string(proto)
    del graph.graph.value_info[:]  # the exporter's stale intermediate shapes fail the quantiser's shape inference
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = pathlib.Path(tmp, "fp32.onnx"), pathlib.Path(tmp, "int8.onnx")
        src.write_bytes(graph.SerializeToString())
        quiet = logging.getLogger()  # the quantiser logs advice through the root logger
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        finally:
            quiet.setLevel(level)
        return dst.read_bytes()


def check_onnx(proto_path: str | os.PathLike, model: nn.Module, inputs: list[Tensor], precision: str,
               atol: float = ATOL) -> float:
    """Run the ONNX file and ``model`` on each input; raise if they differ. Returns the max abs difference."""
    session = OnnxSession(proto_path, threads=torch.get_num_threads())
    worst = 0.0
    for x in inputs:
        with torch.inference_mode():
            ref = model(x).float()
        out = session(x)
        diff = (out - ref).abs().max().item()
        worst = max(worst, diff)
        if precision == "int8":
            rel = ((out - ref).norm() / ref.norm().clamp_min(1e-12)).item()
            if rel > INT8_RTOL:
                raise VitslimError(f"the int8 ONNX model is too far from the fp32 model at batch {x.shape[0]} "
                                   f"(relative error {rel:.3f} > {INT8_RTOL}): export fp32 instead")
        elif not diff <= atol:
            raise VitslimError(f"the ONNX model differs from the PyTorch model at batch {x.shape[0]} (max abs "
                               f"logit difference {diff:.2e} > {atol:.0e}): not written; please report this")
    return worst


def to_onnx(model: nn.Module, path: str | os.PathLike | None = None, *, input_size: tuple[int, int, int] | None = None,
            batch: int | str = "dynamic", precision: str = "fp32", check: bool = True,
            atol: float = ATOL) -> pathlib.Path:
    """Export ``model`` (any method, or dense) to ONNX at ``input_size``; checked in onnxruntime first.

    ``path`` None writes a temporary file (for ``runtime(..., backend="onnxruntime")``) that the
    caller removes. The check needs onnxruntime; ``check=False`` skips it (not recommended).
    """
    if precision not in ("fp32", "int8"):
        raise VitslimError(f"ONNX precision must be fp32 or int8, got {precision!r}")
    fixed_batch = _check_batch(batch)
    inference = deployable(model)
    size = tuple(input_size or default_input_size(inference))
    if len(size) != 3:
        raise VitslimError(f"input_size must be (C, H, W), got {input_size!r}")
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(fixed_batch or 2, *size, generator=gen)  # trace at 2: batch 1 would specialise
    check_input(inference, example)
    proto = _export_proto(inference, example, dynamic=fixed_batch is None)
    if precision == "int8":
        proto = _quantize_int8(proto)
    meta = {"format": "vitslim-onnx", "method": inference.vitslim_config["method"] if is_patched(inference) else None,
            "options": inference.vitslim_config["options"] if is_patched(inference) else {},
            "input_size": list(size), "batch": fixed_batch or "dynamic", "precision": precision,
            "opset": OPSET, "vitslim_version": __version__}
    proto = _with_metadata(proto, meta)
    check_sizes = [fixed_batch] if fixed_batch else [1, 3]
    inputs = [torch.randn(b, *size, generator=gen) for b in check_sizes]
    if check:  # on a scratch copy: a file that fails the check is never written
        with tempfile.TemporaryDirectory() as tmp:
            candidate = pathlib.Path(tmp, "candidate.onnx")
            candidate.write_bytes(proto)
            check_onnx(candidate, inference, inputs, precision, atol)
    if path is None:
        fd, path = tempfile.mkstemp(prefix="vitslim-", suffix=".onnx")
        os.close(fd)
    return atomic_write(path, proto)


def onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The vitslim entry of an exported ONNX file (method, options, input size, batch, precision)."""
    onnx = require("onnx")
    try:
        graph = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError and others for damaged files
        raise VitslimError(f"cannot read {path} as ONNX ({exc})") from None
    entry = {p.key: p.value for p in graph.metadata_props}.get("vitslim")
    if entry is None:
        raise VitslimError(f"{path} has no vitslim metadata: it was not written by vitslim.export.to_onnx")
    return json.loads(entry)
