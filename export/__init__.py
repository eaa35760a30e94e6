"""Torch-free export of quantsim encodings: AIMET encodings files, QDQ ONNX for onnxruntime's integer kernels, runner.

Never imports torch (directly or indirectly): only onnx, onnxruntime, numpy and the standard library.
"""
from .encodings import (
    SUPPORTED_VERSIONS,
    Encodings,
    EncodingsError,
    TensorEncoding,
    grid,
    infer_channel_axes,
    quantize_array,
    read_encodings,
    validate,
    write_encodings,
)
from .qdq import QDQError, QDQOptions, build_qdq, build_qdq_file
from .runner import integer_kernel_report, make_session, run

__all__ = [
    "SUPPORTED_VERSIONS",
    "Encodings",
    "EncodingsError",
    "TensorEncoding",
    "grid",
    "infer_channel_axes",
    "quantize_array",
    "read_encodings",
    "validate",
    "write_encodings",
    "QDQError",
    "QDQOptions",
    "build_qdq",
    "build_qdq_file",
    "integer_kernel_report",
    "make_session",
    "run",
]
