"""Leaf wrappers: linear (plain and clippable), RMSNorm, vision MLP.

A linear may hold a second copy of its weight, rounded by GPTQ or AdaRound onto a pinned grid
(``pin_weight``). Only the quantized path (QUANT, weight quantized, pin holding) and the export use
it; the float weight stays the original, so every float reference is the untouched model.
"""

from __future__ import annotations

import math

import tico  # noqa: F401  (registers torch.ops.circle_custom.rms_norm, the Circle RMS_NORM op)
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.gemma4 import modeling_gemma4 as hf

from core.quant.mode import Mode
from core.wrappers.base import QuantContext, QuantModule
from core.wrappers.registry import register, wrap

_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@torch.no_grad()
def weight_fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """Per-row sums of the weight's bit patterns as integers: exact and independent of summation
    order and thread count (integer addition), and changed by any rescaling of the weight."""
    bits = weight.detach().contiguous().view(_BITS[weight.element_size()])
    return bits.sum(dim=-1, dtype=torch.int64)


@register(nn.Linear)
class QuantLinear(QuantModule):
    """nn.Linear: per-channel weight observer and one output observer."""

    def __init__(self, linear: nn.Linear, module_name: str, ctx: QuantContext) -> None:
        super().__init__(module_name, ctx)
        self.linear = linear
        self.obs_weight = self._observer("weight", "weight", channels=linear.out_features)
        self.obs_output = self._observer("output")
        self.register_buffer("weight_fq", None, persistent=False)
        self.register_buffer("weight_rounded", None, persistent=False)
        self.register_buffer("rounded_from", None, persistent=False)  # fingerprint of the float weight it was rounded from

    def collect_weights(self) -> None:
        if self.weight_rounded is not None and not torch.equal(self.rounded_from, weight_fingerprint(self.linear.weight)):
            # The float weight changed since it was rounded (a later SmoothQuant or CLE rescaled it,
            # and the session recalibrates after those): copy and grid belong to the old weight.
            self.obs_weight.unpin()
            self.clear_rounding()
        # A pinned weight still records its range (the Ranges tab shows it); its qparams stay pinned.
        self.obs_weight.collect(self.linear.weight, "weights")

    def cache_weights(self) -> None:
        if self.weight_rounded is not None and not self.obs_weight.is_pinned:
            # The pin was dropped (a new dtype gives the weight another grid): the rounded codes
            # mean nothing there, so the plain fake-quant of the float weight takes over.
            self.weight_rounded = self.rounded_from = None
        with torch.no_grad():
            self.weight_fq = self.obs_weight.fake_quant(self._quantized_source()) if self.obs_weight.enabled else None

    @property
    def rounded_weight(self) -> torch.Tensor | None:
        """The weight rounded onto its pinned grid (GPTQ, AdaRound) that QUANT and export use; None
        when the weight is not rounded or its pin no longer holds."""
        if self.weight_rounded is None or not self.obs_weight.is_pinned:
            return None
        return self.weight_rounded

    @torch.no_grad()
    def pin_weight(self, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Pin the grid (scale, zero_point) and keep `weight` rounded onto it for QUANT and export.

        The float weight (``linear.weight``) is never written: NO_QUANT, CALIB and every float
        reference keep computing the original model."""
        self.obs_weight.pin_qparams(scale, zero_point)
        self.restore_rounding(self.obs_weight.fake_quant(weight.detach().to(self.linear.weight)))
        if self.weight_fq is not None or bool(self.obs_weight.frozen):
            self.cache_weights()

    def restore_rounding(self, weight: torch.Tensor) -> None:
        """Put back a rounded copy (a saved session's, an undo's); its pin comes with the observer state."""
        own = self.linear.weight
        if weight.shape != own.shape:
            raise ValueError(f"{self.module_name}: a rounded weight of shape {tuple(weight.shape)} does not fit {tuple(own.shape)}")
        self.weight_rounded = weight.detach().to(device=own.device, dtype=own.dtype).clone()
        self.rounded_from = weight_fingerprint(own)

    def clear_rounding(self) -> None:
        """Forget the rounded copy: QUANT fake-quantizes the float weight again (the pin is the observer's)."""
        self.weight_rounded = self.rounded_from = None
        if self.weight_fq is not None:
            self.cache_weights()

    def _quantized_source(self) -> torch.Tensor:
        # Read on every quantized forward, so no buffer value is read here (torch.export traces it):
        # cache_weights, which every entry into QUANT runs, drops a copy whose pin no longer holds.
        return self.linear.weight if self.weight_rounded is None else self.weight_rounded

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        quantized = self.ctx.mode is Mode.QUANT and self.obs_weight.enabled
        weight = self.fq_weight(self._quantized_source() if quantized else self.linear.weight, self.obs_weight, self.weight_fq)
        if self.ctx.exporting and x.dim() > 2:
            # ONE's runtime (onert) gives FULLY_CONNECTED a 2-D output whatever keep_num_dims says, so
            # rank-checking ops after it (RMS_NORM, TRANSPOSE) refuse the file. Explicit 2-D in and
            # reshape out keep every runtime's shapes equal; the values are the same.
            y = F.linear(x.reshape(-1, x.shape[-1]), weight, self.linear.bias)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        return F.linear(x, weight, self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fq(self._project(x), self.obs_output)


@register(hf.Gemma4ClippableLinear)
class QuantClippableLinear(QuantLinear):
    """Gemma4ClippableLinear: optional input/output clamps, each clamp output observed."""

    def __init__(self, module: nn.Module, module_name: str, ctx: QuantContext) -> None:
        QuantModule.__init__(self, module_name, ctx)  # not QuantLinear's: observers differ
        self.clip_in = self.clip_out = False
        if module.use_clipped_linears:
            # Infinite bounds make a clamp a no-op, so it gets no observer of its own.
            self.clip_in = bool(math.isfinite(float(module.input_min)) or math.isfinite(float(module.input_max)))
            self.clip_out = bool(math.isfinite(float(module.output_min)) or math.isfinite(float(module.output_max)))
        self.source = module
        self.linear = module.linear
        if self.clip_in:
            self.obs_input_clamped = self._observer("input_clamped")
        self.obs_weight = self._observer("weight", "weight", channels=self.linear.out_features)
        if self.clip_out:
            self.obs_linear = self._observer("linear")
        self.obs_output = self._observer("output")
        self.register_buffer("weight_fq", None, persistent=False)
        self.register_buffer("weight_rounded", None, persistent=False)
        self.register_buffer("rounded_from", None, persistent=False)  # fingerprint of the float weight it was rounded from

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        src = self.source
        if src.use_clipped_linears:
            x = torch.clamp(x, src.input_min, src.input_max)
            if self.clip_in:
                x = self.fq(x, self.obs_input_clamped)
        y = self._project(x)
        if src.use_clipped_linears:
            if self.clip_out:
                y = self.fq(y, self.obs_linear)
            y = torch.clamp(y, src.output_min, src.output_max)
        return self.fq(y, self.obs_output)


@register(hf.Gemma4RMSNorm)
class QuantRMSNorm(QuantModule):
    """Gemma4RMSNorm with or without scale; one Circle RMS_NORM op on the static path."""

    def __init__(self, module: nn.Module, module_name: str, ctx: QuantContext) -> None:
        super().__init__(module_name, ctx)
        self.source = module
        self.eps = float(module.eps)
        self.with_scale = bool(module.with_scale)
        self.obs_weight = self._observer("weight", "weight", per_channel=False, spec_from="activation")
        self.obs_output = self._observer("output")
        self.register_buffer("weight_fq", None, persistent=False)
        self.register_buffer("unit_weight", None, persistent=False)

    def set_width(self, width: int) -> None:
        """Create the unit scale of a scale-less norm up front (tracing must not create state)."""
        if not self.with_scale:
            self.unit_weight = torch.ones(width, dtype=torch.float32)

    def _raw_weight(self) -> torch.Tensor:
        if not self.with_scale:
            if self.unit_weight is None:
                raise RuntimeError(f"{self.module_name}: a norm without scale needs set_width() before use")
            return self.unit_weight
        weight = self.source.weight
        # No-op casts still become to/_assert_tensor_metadata nodes in the exported graph.
        return weight if weight.dtype == torch.float32 else weight.float()

    def collect_weights(self) -> None:
        self.obs_weight.collect(self._raw_weight(), "weights")

    def cache_weights(self) -> None:
        with torch.no_grad():
            self.weight_fq = self.obs_weight.fake_quant(self._raw_weight()) if self.obs_weight.enabled else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.ctx.static:
            out = self.source(x)  # runtime NO_QUANT path: the original maths, bit for bit
        else:
            weight = self.fq_weight(self._raw_weight(), self.obs_weight, self.weight_fq)
            out = torch.ops.circle_custom.rms_norm(x if x.dtype == torch.float32 else x.float(), weight, self.eps)
            if out.dtype != x.dtype:
                out = out.type_as(x)
        return self.fq(out, self.obs_output)


@register(hf.Gemma4VisionMLP)
class QuantVisionMLP(QuantModule):
    """Gemma4VisionMLP: down(act(gate(x)) * up(x)) with the activation and product observed."""

    def __init__(self, module: nn.Module, module_name: str, ctx: QuantContext) -> None:
        super().__init__(module_name, ctx)
        self.act_fn = module.act_fn
        self.gate_proj = wrap(module.gate_proj, f"{module_name}.gate_proj", ctx)
        self.obs_act = self._observer("act")
        self.up_proj = wrap(module.up_proj, f"{module_name}.up_proj", ctx)
        self.obs_product = self._observer("product")
        self.down_proj = wrap(module.down_proj, f"{module_name}.down_proj", ctx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.fq(self.act_fn(self.gate_proj(x)), self.obs_act)
        product = self.fq(act * self.up_proj(x), self.obs_product)
        return self.down_proj(product)
