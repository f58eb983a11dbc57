"""``runtime(model, backend, precision)``: a model's deployable form, run one way, measured like any model.

The wrapped model takes fp32 images and returns fp32 logits like the original, so every
measurement (speed, accuracy) runs on it unchanged (``vitslim.measure.compare.run_compare``'s
``runner``). Backends and precisions: ``vitslim.export.inference``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vitslim.export.inference import check_runtime, compile_model, deployable, quantize_int8
from vitslim.export.onnx import onnx_session, to_onnx
from vitslim.families import ModelWrapper


class RuntimeModel(ModelWrapper):
    """A deployable model run one way: fp32 images in, fp32 logits out, whatever runs inside."""

    def __init__(self, model: nn.Module, runner: Any, backend: str, precision: str,
                 input_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model, self.backend, self.precision, self.input_dtype = model, backend, precision, input_dtype
        self.runner = runner

    def wrapped_model(self) -> nn.Module:
        """The deployable model this runs."""
        return self.model

    def forward(self, images: Tensor) -> Tensor:
        """Logits (fp32) of the images (fp32), through the backend."""
        return self.runner(images.to(self.input_dtype)).float()

    def extra_repr(self) -> str:
        return f"backend={self.backend}, precision={self.precision}"


def runtime(model: nn.Module, backend: str = "eager", precision: str = "fp32", *,
            input_size: tuple[int, int, int] | None = None, threads: int | None = None) -> RuntimeModel:
    """The deployable form of ``model`` run by ``backend`` at ``precision`` (the original is not changed).

    onnxruntime: the model is exported (``to_onnx``, checked) to a temporary file, loaded into a
    session with ``threads`` intra-op threads (default: torch's), and the file removed.
    """
    check_runtime(backend, precision)
    if backend == "onnxruntime":  # to_onnx makes the deployable form itself
        path = to_onnx(model, None, input_size=input_size, batch="dynamic", precision=precision)
        try:
            session = onnx_session(path, threads)
        finally:
            path.unlink(missing_ok=True)
        return RuntimeModel(model, session, backend, precision)
    inference = deployable(model)
    dtype = torch.float32
    if precision == "bf16":
        inference, dtype = inference.to(torch.bfloat16), torch.bfloat16
    elif precision == "int8":
        inference = quantize_int8(inference)
    runner = compile_model(inference) if backend == "compile" else inference
    return RuntimeModel(inference, runner, backend, precision, input_dtype=dtype)
