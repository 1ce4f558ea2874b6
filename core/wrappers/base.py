"""Base class of every quant wrapper and the context the whole tree shares."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from core.config import PTQConfig, QuantSpec
from core.quant.mode import Mode
from core.quant.observers import Observer, make_observer


@dataclass(frozen=True)
class SpecRequest:
    """What an observer asked the config for: which spec (activation or weight), whether it must be
    per tensor, and its channel count. Kept on the observer so new dtypes can be applied without
    building the tree again (core.ptq.retarget)."""

    spec_kind: str
    per_tensor: bool = False
    channels: int | None = None

    def resolve(self, config: PTQConfig, module_name: str) -> tuple[QuantSpec, bool]:
        """The spec this request gets from `config` and whether the tensor is quantized (False: kept float)."""
        spec = config.spec_for(module_name, self.spec_kind)
        enabled = spec is not None
        if spec is None:
            spec = config.activation if self.spec_kind == "activation" else config.weight
        if self.per_tensor and spec.per_channel:
            spec = replace(spec, per_channel=False)
        return spec, enabled


@dataclass
class QuantContext:
    """State shared by every wrapper of one tree, so a mode switch reaches all of them at once."""

    config: PTQConfig
    mode: Mode = Mode.NO_QUANT
    source: str | None = None  # image currently flowing through (observer provenance)
    exporting: bool = False  # inside forward_export: weights pass through fake-quant ops
    static: bool = False  # on the per-image static path (CALIB, QUANT, export) rather than HF's padded one
    observers: list[Observer] = field(default_factory=list)


class QuantModule(nn.Module):
    """A wrapper of one Hugging Face module: owns named observers, reads the mode from the context."""

    def __init__(self, module_name: str, ctx: QuantContext) -> None:
        super().__init__()
        self.module_name = module_name
        # Kept out of the module tree on purpose: the context is shared, not a child.
        object.__setattr__(self, "_ctx", ctx)

    @property
    def ctx(self) -> QuantContext:
        """The context shared by the whole wrapped tree."""
        return self._ctx

    @property
    def mode(self) -> Mode:
        """The mode of the whole tree."""
        return self._ctx.mode

    def _observer(
        self,
        role: str,
        kind: str = "activation",
        *,
        channels: int | None = None,
        per_channel: bool | None = None,
        spec_from: str | None = None,
    ) -> Observer:
        """Create and register `obs_<role>`; call in forward order so listings follow the data.

        `spec_from` picks the config spec ('activation' or 'weight') when it differs from `kind`:
        elementwise constants such as RMSNorm scales are weights that take the activation dtype.
        """
        config = self._ctx.config
        request = SpecRequest(spec_from or kind, per_channel is False, channels)
        spec, enabled = request.resolve(config, self.module_name)
        observer_kind = config.observer if kind == "activation" else "minmax"
        name = f"{self.module_name}.{role}" if self.module_name else role
        obs = make_observer(
            observer_kind,
            momentum=config.ema_momentum,
            percentile=config.percentile,
            name=name,
            module_name=self.module_name,
            role=role,
            kind=kind,
            spec=spec,
            enabled=enabled,
            channels=channels,
        )
        obs.spec_request = request
        self.add_module(f"obs_{role}", obs)
        self._ctx.observers.append(obs)
        return obs

    def fq(self, x: torch.Tensor, obs: Observer) -> torch.Tensor:
        """Collect (CALIB) or fake-quantize (QUANT) `x`; identity in NO_QUANT or when kept float."""
        mode = self._ctx.mode
        if mode is Mode.CALIB:
            obs.collect(x, self._ctx.source)
            return x
        if mode is Mode.QUANT and obs.enabled:
            return obs.fake_quant(x)
        return x

    def fq_weight(self, weight: torch.Tensor, obs: Observer, cached: torch.Tensor | None) -> torch.Tensor:
        """Weights: the cached fake-quantized copy at runtime, the explicit op under export."""
        if self._ctx.mode is not Mode.QUANT or not obs.enabled:
            return weight
        if self._ctx.exporting or cached is None:
            # The converter reads weight qparams from this op, so export must keep it.
            return obs.fake_quant(weight)
        return cached

    def collect_weights(self) -> None:
        """Record weight statistics (weights do not depend on images)."""

    def cache_weights(self) -> None:
        """Precompute fake-quantized weights after qparams are frozen."""
