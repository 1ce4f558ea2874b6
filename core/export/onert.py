"""Run an exported Circle file in ONE's own runtime (onert, the optional ``onert`` extra).

TICO's reference runtime checks the maths of a file; onert checks that a device runtime accepts
it. onert 0.1.0 (PyPI) has these limits that matter to our graphs, read from ONE's source
(runtime/onert) and confirmed by loading files:

- FULLY_CONNECTED's output shape is always 2-D (``inferFullyConnectedShape`` ignores
  ``keep_num_dims``), so the exporter feeds every linear a 2-D input and reshapes after it;
- BATCH_MATMUL rejects a constant operand (OperationValidator: "Constant lhs and rhs is not
  implemented yet"), so the pooler's constant matrix becomes a FULLY_CONNECTED weight
  (core.export.circle_edit.constant_matmul_as_fully_connected);
- an op's input and output dtypes must agree (STRIDED_SLICE float -> uint8 is refused);
- some CPU kernels exist in float only (``ONERT_FLOAT_ONLY``). To still run the rest of a
  quantized file in integer, :func:`core.export.circle_edit.bridge_float_ops` gives each such op a DEQUANTIZE before and a
  QUANTIZE after, in a copy used for this check only; the result names the ops it bridged.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from core.errors import ExportError
from core.export.circle_edit import bridge_float_ops

# op name -> why onert 0.1.0's CPU backend cannot run it on integer tensors (ONE runtime/onert).
ONERT_FLOAT_ONLY: dict[str, str] = {
    "GELU": "GELULayer::run handles FLOAT32 only",
    "RMS_NORM": "RmsNormLayer::run handles FLOAT32 only",
    "BATCH_MATMUL": "OperationValidator accepts FLOAT32 or INT8 operands only (not UINT8/INT16)",
    "STRIDED_SLICE": "StridedSliceLayer::run: 'unsupported data type' for UINT8 (value-preserving: exact in float)",
    # These two load and run, but give other numbers than TICO's runtime and torch:
    "FULLY_CONNECTED": "the UINT8 kernel reads one weight scale and zero point; our weights are per channel "
    "(left in integer, tiny's output is off by ~200 steps)",
    "MUL": "UINT8 MUL (with the FCs bridged) leaves 20% of tiny's outputs more than one step off, "
    "up to 5 steps; not isolated further",
}


@dataclass
class OnertResult:
    """The written file run by onert, compared with TICO's reference runtime and torch fake-quant."""

    ran: bool
    error: str | None = None  # why it did not load or run (onert's own message)
    max_abs_diff: float | None = None  # vs forward_export (torch fake-quant, the exported graph)
    within_one_step: float | None = None  # fraction within one output step of forward_export
    vs_tico: float | None = None  # max |onert - TICO reference runtime|
    within_one_step_tico: float | None = None
    bridged: dict[str, int] = field(default_factory=dict)  # op name -> count run in float (see bridge_float_ops)
    input_dtype: str = ""
    seconds: float = 0.0

    def summary(self) -> str:
        """One line for the CLI and the GUI."""
        if not self.ran:
            return f"onert: did not run ({self.error})"
        pct = f"{100 * self.within_one_step:.2f}%" if self.within_one_step is not None else "-"
        text = f"onert: ran; max |diff| vs torch {self.max_abs_diff:.4g} ({pct} within one step)"
        if self.vs_tico is not None:
            text += f", vs TICO runtime {self.vs_tico:.4g}"
        if self.bridged:
            text += "; in float there: " + ", ".join(f"{n} x{c}" for n, c in sorted(self.bridged.items()))
        return text


def onert_available() -> bool:
    """Whether the optional onert package can be imported."""
    try:
        import onert  # noqa: F401, PLC0415 -- an optional dependency: its absence is the answer
    except Exception:
        return False
    return True


def input_qparams(data: bytes) -> tuple[str, float | None, int | None]:
    """(dtype name, scale, zero point) of the Circle file's graph input; scale None for a float input."""
    from tico.circle.runtime.program import CircleProgram, tensor_type_name  # noqa: PLC0415 -- tico.circle.* costs ~0.6 s at import (measured); only export and its checks run it

    program = CircleProgram.from_bytes(data)
    tensor = program.tensor(program.inputs[0])
    if not tensor.is_quantized:
        return tensor_type_name(tensor.tensor_type), None, None
    return tensor_type_name(tensor.tensor_type), float(tensor.quantization.scale[0]), int(tensor.quantization.zero_point[0])


def quantize_input(pixel_values: Any, scale: float, zero_point: int, dtype: str = "uint8") -> np.ndarray:
    """Pixel values (floats as the preprocessor gives them) -> the integer input of a file: round(x / scale) + zp, clamped."""
    info = np.iinfo(np.dtype(dtype.lower()))
    x = np.asarray(pixel_values, dtype=np.float32)
    q = np.round(x.astype(np.float64) / scale) + zero_point  # round half to even, as TICO and torch do
    return np.clip(q, info.min, info.max).astype(dtype.lower())


def run_onert(data: bytes, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Load the Circle bytes in onert (CPU backend) and run them once; onert's errors become ExportError."""
    # The low-level session: onert 0.1.0's session.infer() re-sets the input tensorinfo, which its
    # binding cannot do for a uint8 input ("Cannot convert string to NNFW_TYPE: 'uint8'").
    from onert.native.libnnfw_api_pybind import infer, prepare_config  # noqa: PLC0415 -- onert is optional

    fd, path = tempfile.mkstemp(suffix=".circle")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        with _stderr_captured() as said:
            try:
                session = infer.nnfw_session(path, "cpu")
                session.set_prepare_config(prepare_config.ENABLE_INTERNAL_OUTPUT_ALLOC)
                session.prepare()
                for i, x in enumerate(inputs):
                    session.set_input(i, np.ascontiguousarray(x))
                session.run()
                outputs = [np.array(session.get_output(i), copy=True) for i in range(session.output_size())]
                del session
                error = None
            except Exception as exc:
                error = exc
        if error is not None:
            raise ExportError(f"onert refused the file: {_onert_message(error, said)}") from error
        return outputs
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


def check_in_onert(
    data: bytes,
    pixel_values: Any,
    reference: Any,
    tico_output: Any | None,
    step: float | None,
    bridge: Iterable[str] = ONERT_FLOAT_ONLY,
) -> OnertResult:
    """Run the file in onert on `pixel_values` and compare with forward_export (`reference`) and TICO's output."""
    start = time.perf_counter()
    dtype, scale, zero_point = input_qparams(data)
    result = OnertResult(ran=False, input_dtype=dtype)
    if not onert_available():
        result.error = "onert is not installed (pip install 'ptq-studio[onert]')"
        return result
    pixels = np.asarray(pixel_values.detach().cpu().float().numpy() if hasattr(pixel_values, "detach") else pixel_values)
    feed = pixels.astype(np.float32) if scale is None else quantize_input(pixels, scale, zero_point, dtype)
    try:
        bridged, result.bridged = bridge_float_ops(data, bridge)
        outputs = run_onert(bridged, [feed])
    except ExportError as exc:
        result.error = str(exc).split(": ", 1)[-1]
        result.seconds = time.perf_counter() - start
        return result
    got = _dequantized_output(data, outputs[0])
    ref = np.asarray(reference.detach().cpu().float().numpy() if hasattr(reference, "detach") else reference, dtype=np.float32)
    got = got.reshape(ref.shape)
    tol = step if step is not None else 1e-4
    diff = np.abs(got - ref)
    result.ran = True
    result.max_abs_diff = float(diff.max())
    result.within_one_step = float((diff <= tol * (1 + 1e-4)).mean())
    if tico_output is not None:
        tico = np.asarray(tico_output, dtype=np.float32).reshape(ref.shape)
        d = np.abs(got - tico)
        result.vs_tico = float(d.max())
        result.within_one_step_tico = float((d <= tol * (1 + 1e-4)).mean())
    result.seconds = time.perf_counter() - start
    return result


# --------------------------------------------------------------------------- helpers
def _dequantized_output(data: bytes, output: np.ndarray) -> np.ndarray:
    from tico.circle.runtime.program import CircleProgram  # noqa: PLC0415 -- tico.circle.* costs ~0.6 s at import (measured); only export and its checks run it

    program = CircleProgram.from_bytes(data)
    tensor = program.tensor(program.outputs[0])
    if not tensor.is_quantized:
        return np.asarray(output, dtype=np.float32)
    scale = float(tensor.quantization.scale[0])
    zp = int(tensor.quantization.zero_point[0])
    return ((np.asarray(output).astype(np.float64) - zp) * scale).astype(np.float32)


@contextlib.contextmanager
def _stderr_captured() -> Any:
    """Collect what native code writes to file descriptor 2: onert prints the reason for a refusal
    there and raises only NNFW_STATUS_ERROR."""
    said: list[str] = []
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(2)
        try:
            os.dup2(sink.fileno(), 2)
            yield said
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            said.append(sink.read().decode("utf-8", "replace"))


def _onert_message(exc: BaseException, said: Sequence[str]) -> str:
    """onert's reason for a refusal, on one line: the line it printed that names a check, else the exception."""
    printed = [line.strip() for text in said for line in text.splitlines() if line.strip()]
    reasons = [line for line in printed if "failed" in line.lower() or "error" in line.lower() or "unsupported" in line.lower()]
    text = reasons[-1] if reasons else " ".join(str(exc).split())
    return text or type(exc).__name__
