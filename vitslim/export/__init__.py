"""Deployment: one file per model (safetensors), ONNX, and the ways a model runs (backend x precision).

- ``save`` / ``load`` (``files``): any vitslim model, in its deployable form, to one safetensors file;
- ``to_onnx`` (``onnx``): ONNX at a given input size, checked against PyTorch in onnxruntime;
- ``deployable``, ``compile_model``, ``quantize_int8`` (``inference``): the inference form of a model;
- ``runtime`` (``runtime``): that form run one way (eager / torch.compile / onnxruntime, fp32 / bf16 / int8);
- ``slim`` (``channels``): CDCP/CAIT channel masks sliced into smaller layers.
"""
from vitslim.export.channels import CHANNEL_METHODS, channel_counts, resize_block, slice_block, slim
from vitslim.export.files import load, metadata, read_metadata, save
from vitslim.export.inference import BACKENDS, PRECISIONS, check_runtime, compile_model, deployable, quantize_int8
from vitslim.export.onnx import onnx_metadata, onnx_session, to_onnx
from vitslim.export.runtime import RuntimeModel, runtime

__all__ = ["BACKENDS", "CHANNEL_METHODS", "PRECISIONS", "RuntimeModel", "channel_counts", "check_runtime",
           "compile_model", "deployable", "load", "metadata", "onnx_metadata", "onnx_session", "quantize_int8",
           "read_metadata", "resize_block", "runtime", "save", "slice_block", "slim", "to_onnx"]
