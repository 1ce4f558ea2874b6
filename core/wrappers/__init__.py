"""Quant wrappers for every module class of Gemma4VisionModel."""

from core.wrappers.base import QuantContext, QuantModule
from core.wrappers.registry import WRAPPERS, UnsupportedModuleError, wrap
from core.wrappers.vision import QuantVisionModel, StaticProfile, VisionExportModule

__all__ = [
    "QuantContext",
    "QuantModule",
    "QuantVisionModel",
    "StaticProfile",
    "VisionExportModule",
    "WRAPPERS",
    "UnsupportedModuleError",
    "wrap",
]
