"""Quant wrappers for every module class of Gemma4VisionModel.

Importing this package imports every wrapper module, and each registers its classes with the
registry (core.wrappers.registry.register), so ``wrap`` knows them all.
"""

from core.wrappers import attention, layers, vision  # noqa: F401  (each registers its wrappers)
from core.wrappers.base import QuantContext, QuantModule
from core.wrappers.registry import WRAPPERS, UnsupportedModuleError, register, wrap
from core.wrappers.vision import QuantVisionModel, StaticProfile, VisionExportModule

__all__ = [
    "QuantContext",
    "QuantModule",
    "QuantVisionModel",
    "StaticProfile",
    "VisionExportModule",
    "WRAPPERS",
    "UnsupportedModuleError",
    "register",
    "wrap",
]
