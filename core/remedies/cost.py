"""What a configuration costs in the exported Circle file: an estimate from tensor sizes, per observer.

The exported file stores every constant (weights, norm scales, the position rows, the RoPE tables, the
pooling matrix) at its tensor's dtype: uint4 packed two to a byte, uint8 one byte, int16 two, float32
four for a constant kept float; each quantized tensor also carries its qparams (a float32 scale and an
int64 zero point per channel). Activations cost only their qparams. Linear biases are stored as int32
beside 8-bit activations and int64 beside 16-bit ones. The flatbuffer's own tables (tensor names, ops)
hardly depend on the dtypes and are left out, so the estimate is below the real size by about that
much; tests/test_mixed.py exports tiny models and reports the difference.

The tensor sizes come from one traced forward (``TensorSizes.measure``): every ``fq`` / ``fq_weight``
call names its observer and the tensor it sees, and a tensor that is one of the image layout's
precomputed constants (``StaticProfile``) is stored in the file rather than computed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from core.analysis.tap import MethodTap, model_device, model_inputs
from core.config import PTQConfig
from core.quant.dtypes import get_dtype
from core.quant.mode import Mode

QPARAM_BYTES = 4 + 8  # float32 scale + int64 zero point, per channel
FLOAT_BYTES = 4


@dataclass
class TensorSize:
    """One observer's tensor: elements, whether the file stores it (a constant), channels of its qparams."""

    numel: int
    constant: bool
    channels: int = 1
    bias: int = 0  # elements of the bias stored beside this weight (linear weights only)


@dataclass
class TensorSizes:
    """Tensor sizes of every observer (by observer name) for one image layout."""

    sizes: dict[str, TensorSize] = field(default_factory=dict)

    @classmethod
    def measure(cls, qmodel, batch: Mapping[str, Any]) -> TensorSizes:
        """Trace one quantized forward of the batch's first image (the model must be calibrated) and record
        what every observer sees; QUANT, because only that path runs the patch embedder's folded projection."""
        inputs, _ = model_inputs(batch, model_device(qmodel))
        inputs = {k: v[:1] for k, v in inputs.items()}
        tap = _SizeTap(qmodel)
        with torch.no_grad(), qmodel.mode_as(Mode.QUANT), tap:
            qmodel(**inputs, static=True)
        return cls(tap.sizes)

    def bytes_for(self, obs, spec_dtype: str | None) -> float:
        """Bytes observer `obs`'s tensor adds to the file at `spec_dtype` (None: kept float)."""
        size = self.sizes.get(obs.name)
        if size is None:
            return 0.0
        if spec_dtype is None:
            return float(FLOAT_BYTES * (size.numel + size.bias) if size.constant else 0)
        bits = get_dtype(spec_dtype).bits
        total = QPARAM_BYTES * size.channels
        if size.constant:
            total += size.numel * bits / 8
        return float(total)


def observer_dtype(config: PTQConfig, obs) -> str | None:
    """The dtype `config` gives observer `obs` (None when its module is kept float)."""
    spec, enabled = obs.spec_request.resolve(config, obs.module_name)
    return spec.dtype if enabled else None


def estimate_bytes(qmodel, config: PTQConfig, sizes: TensorSizes) -> int:
    """Estimated exported size in bytes of the model under `config` (module docstring)."""
    total = 0.0
    dtypes = {obs.name: observer_dtype(config, obs) for obs in qmodel.observers()}
    outputs = {obs.module_name: dtypes[obs.name] for obs in qmodel.observers() if obs.role == "output"}
    for obs in qmodel.observers():
        dtype = dtypes[obs.name]
        total += sizes.bytes_for(obs, dtype)
        size = sizes.sizes.get(obs.name)
        if size is not None and size.bias and dtype is not None:
            # The bias is stored on the (input scale x weight scale) grid: int64 beside 16-bit activations.
            act = outputs.get(obs.module_name)
            total += size.bias * (8 if act is not None and get_dtype(act).bits > 8 else 4)
    return int(round(total))


def wide_ops(qmodel, config: PTQConfig, sizes: TensorSizes, narrow_bits: int = 8) -> int:
    """Computed tensors (op outputs, not constants) held wider than `narrow_bits`: int16 or float."""
    count = 0
    for obs in qmodel.observers():
        size = sizes.sizes.get(obs.name)
        if size is None or size.constant:
            continue
        dtype = observer_dtype(config, obs)
        if dtype is None or get_dtype(dtype).bits > narrow_bits:
            count += 1
    return count


class _SizeTap(MethodTap):
    """Records the size of every tensor an observer sees, and which ones are stored constants."""

    def __init__(self, qmodel) -> None:
        super().__init__(self._around)
        self.qmodel = qmodel
        self.sizes: dict[str, TensorSize] = {}
        self.constants: set[int] = set()

    def targets(self):
        """The root's static forward (for the layout's constants), and every wrapper's fq and fq_weight."""
        out = [(self.qmodel, "forward_static")]
        for mod in self.qmodel.quant_modules():
            out += [(mod, "fq"), (mod, "fq_weight")]
        return out

    def _around(self, module, orig, *args, **kwargs):
        name = getattr(orig, "__name__", "")
        if name == "forward_static":
            profile = args[1]
            self.constants = {
                t.data_ptr() for t in (profile.pos_rows, profile.cos, profile.sin_signed, profile.pool) if t is not None
            }
        elif name in ("fq", "fq_weight"):
            x, obs = args[0], args[1]
            weight = name == "fq_weight"
            channels = int(obs.scale.numel()) if obs.per_channel else 1
            bias = getattr(getattr(module, "linear", None), "bias", None) if weight else None
            self.sizes[obs.name] = TensorSize(
                numel=int(x.numel()),
                constant=weight or x.data_ptr() in self.constants,
                channels=channels,
                bias=int(bias.numel()) if bias is not None and obs.role == "weight" else 0,
            )
        return orig(*args, **kwargs)
