"""The one state machine every wrapper tree moves through together."""

from enum import Enum


class Mode(Enum):
    """Quantization mode of a whole wrapped model."""

    NO_QUANT = "no_quant"  # compute exactly what the original model computes
    CALIB = "calib"  # same math, observers record statistics
    QUANT = "quant"  # observers frozen; tensors pass through ATen fake-quant ops
