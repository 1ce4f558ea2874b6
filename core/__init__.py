"""PTQ Studio core: the PTQ wrapper library for Gemma4VisionModel (no Qt here, ever)."""

from core import errors
from core.cancel import CancelToken
from core.config import FLOAT, PTQConfig, QuantSpec
from core.images import ImagePreprocessor
from core.models import load_model
from core.ptq import CalibrationResult, calibrate, convert, prepare
from core.quant.mode import Mode

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
    # Heavier or later parts load on first use so `import core` stays quick.
    if name == "Session":
        from core.session import Session

        return Session
    if name in ("observer_table", "compare", "sensitivity"):
        import core.inspect as inspect_mod

        return getattr(inspect_mod, name)
    if name == "export_circle":
        from core.export import export_circle

        return export_circle
    lazy = {
        "image_error_maps": "core.diagnostics",
        "locate_divergence": "core.diagnostics",
        "locate_extreme": "core.provenance",
        "rank_images": "core.provenance",
        "three_way_check": "core.threeway",
        "three_way_session": "core.threeway",
        "compare_ab": "core.abtest",
        "calibrate_b": "core.abtest",
        "ABComparison": "core.abtest",
    }
    if name in lazy:
        import importlib

        return getattr(importlib.import_module(lazy[name]), name)
    raise AttributeError(f"module 'core' has no attribute {name!r}")
