"""One wrapper per Hugging Face module class; an unknown class is an error, never silently float."""

from __future__ import annotations

from torch import nn
from transformers.models.gemma4 import modeling_gemma4 as hf

from core.wrappers.attention import QuantVisionAttention, QuantVisionEncoder, QuantVisionEncoderLayer
from core.wrappers.base import QuantContext, QuantModule
from core.wrappers.layers import QuantClippableLinear, QuantLinear, QuantRMSNorm, QuantVisionMLP
from core.wrappers.vision import QuantPatchEmbedder, QuantPooler, QuantVisionModel

WRAPPERS: dict[type, type[QuantModule]] = {
    nn.Linear: QuantLinear,
    hf.Gemma4ClippableLinear: QuantClippableLinear,
    hf.Gemma4RMSNorm: QuantRMSNorm,
    hf.Gemma4VisionMLP: QuantVisionMLP,
    hf.Gemma4VisionAttention: QuantVisionAttention,
    hf.Gemma4VisionEncoderLayer: QuantVisionEncoderLayer,
    hf.Gemma4VisionEncoder: QuantVisionEncoder,
    hf.Gemma4VisionPatchEmbedder: QuantPatchEmbedder,
    hf.Gemma4VisionPooler: QuantPooler,
    hf.Gemma4VisionModel: QuantVisionModel,
}


class UnsupportedModuleError(TypeError):
    """A module class has no quant wrapper."""


def wrap(module: nn.Module, module_name: str, ctx: QuantContext) -> QuantModule:
    """Wrap `module` with the wrapper registered for its exact class."""
    cls = WRAPPERS.get(type(module))
    if cls is None:
        raise UnsupportedModuleError(
            f"no quant wrapper for {type(module).__module__}.{type(module).__qualname__} at {module_name or '<root>'}"
        )
    return cls(module, module_name, ctx)
