"""PTQ Studio core: the PTQ wrapper library for Gemma4VisionModel (no Qt here, ever)."""

import importlib

from core import errors
from core.cancel import CancelToken

# Everything else loads on first use: `ptq-studio --help` imports this package, and torch plus
# transformers would cost it seconds and hundreds of MB before a single argument is read.
_LAZY = {
    "FLOAT": "core.config",
    "PTQConfig": "core.config",
    "QuantSpec": "core.config",
    "ImagePreprocessor": "core.data.images",
    "load_model": "core.models",
    "CalibrationResult": "core.ptq",
    "calibrate": "core.ptq",
    "convert": "core.ptq",
    "prepare": "core.ptq",
    "Mode": "core.quant.mode",
    "Session": "core.session",
    "observer_table": "core.analysis.observer_table",
    "compare": "core.analysis.compare",
    "sensitivity": "core.analysis.sensitivity",
    "export_circle": "core.export.pipeline",
    "image_error_maps": "core.analysis.heatmaps",
    "locate_divergence": "core.analysis.divergence",
    "locate_extreme": "core.analysis.provenance",
    "rank_images": "core.analysis.provenance",
    "three_way_check": "core.analysis.threeway",
    "three_way_session": "core.analysis.threeway",
    "ABComparison": "core.analysis.abtest",
}

__all__ = [
    "errors",
    "CancelToken",
    "FLOAT",
    "PTQConfig",
    "QuantSpec",
    "ImagePreprocessor",
    "load_model",
    "CalibrationResult",
    "calibrate",
    "convert",
    "prepare",
    "Mode",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'core' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
