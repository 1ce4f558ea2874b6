"""One wrapper per Hugging Face module class; an unknown class is an error, never silently float.

Each wrapper module registers its classes with ``@register(HFClass)``; importing ``core.wrappers``
imports them all, so the registry is full before the first ``wrap``. The wrappers call ``wrap``
for their children, and the registry imports none of them: no import cycle.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from core.wrappers.base import QuantContext, QuantModule

WRAPPERS: dict[type, type[QuantModule]] = {}


class UnsupportedModuleError(TypeError):
    """A module class has no quant wrapper."""


def register(*module_classes: type) -> Callable[[type[QuantModule]], type[QuantModule]]:
    """Class decorator: `cls` wraps exactly these module classes (no subclass matching)."""

    def add(cls: type[QuantModule]) -> type[QuantModule]:
        for module_class in module_classes:
            if module_class in WRAPPERS:
                raise TypeError(f"{module_class.__qualname__} already has a wrapper: {WRAPPERS[module_class].__qualname__}")
            WRAPPERS[module_class] = cls
        return cls

    return add


def wrap(module: nn.Module, module_name: str, ctx: QuantContext) -> QuantModule:
    """Wrap `module` with the wrapper registered for its exact class."""
    cls = WRAPPERS.get(type(module))
    if cls is None:
        raise UnsupportedModuleError(
            f"no quant wrapper for {type(module).__module__}.{type(module).__qualname__} at {module_name or '<root>'}"
        )
    return cls(module, module_name, ctx)
