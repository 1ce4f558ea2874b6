"""prepare / calibrate / convert: the PTQ pipeline over a wrapped Gemma4VisionModel."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from core.cancel import CancelToken
from core.config import PTQConfig
from core.errors import CancelledError, ConfigError
from core.quant.dtypes import get_dtype
from core.quant.mode import Mode
from core.wrappers.base import QuantContext
from core.wrappers.registry import wrap
from core.wrappers.vision import QuantVisionModel

Progress = Callable[[int, int, str], None]


@dataclass
class CalibrationResult:
    """What one calibrate() call did."""

    batches_done: int
    images_done: int
    total_batches: int | None
    cancelled: bool
    seconds: float


def prepare(model: nn.Module, config: PTQConfig | None = None) -> QuantVisionModel:
    """Wrap a copy of `model` (left untouched) for PTQ; the result starts in NO_QUANT."""
    config = config or PTQConfig()
    if not isinstance(config, PTQConfig):
        raise ConfigError(f"expected a PTQConfig, got {type(config).__name__}")
    if getattr(model.config, "_attn_implementation", "eager") not in ("eager", None):
        # The wrappers mirror eager attention (they observe the probabilities), so parity is against it.
        model = copy.deepcopy(model)
        model.config._attn_implementation = "eager"  # noqa: SLF001 -- the attribute HF attention reads at forward time
    else:
        model = copy.deepcopy(model)
    model.eval()
    ctx = QuantContext(config=config)
    qmodel = wrap(model, "", ctx)
    qmodel.eval()
    return qmodel


def _batch_size(batch: Mapping[str, Any]) -> int:
    return int(batch["pixel_values"].shape[0])


def calibrate(
    qmodel: QuantVisionModel,
    batches: Iterable[Mapping[str, Any]],
    progress: Progress | None = None,
    cancel: CancelToken | None = None,
    reset: bool = False,
    total: int | None = None,
) -> CalibrationResult:
    """Run `batches` through the model in CALIB mode; stops cleanly between batches when cancelled.

    Statistics accumulate across calls unless `reset`; a cancelled run keeps the statistics of
    the batches it completed. Each batch is the preprocessor's mapping, optionally with
    "image_ids" naming its images (observer provenance).
    """
    start = time.perf_counter()
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)  # type: ignore[arg-type]
    qmodel.enable_calibration(reset=reset or not any(o.has_stats for o in qmodel.observers()))
    done_batches = done_images = 0
    cancelled = False
    try:
        with torch.no_grad():
            for batch in batches:
                if cancel is not None:
                    cancel.raise_if_cancelled()
                qmodel(
                    pixel_values=batch["pixel_values"],
                    pixel_position_ids=batch["pixel_position_ids"],
                    image_ids=batch.get("image_ids"),
                )
                done_batches += 1
                done_images += _batch_size(batch)
                if progress is not None:
                    progress(done_batches, total or done_batches, f"calibrated {done_images} images")
    except CancelledError:
        # The one place a cancel is caught: the batches already done keep their statistics, and the
        # result says the run stopped early (callers report "cancelled after k/n").
        cancelled = True
    finally:
        qmodel.set_mode(Mode.NO_QUANT)
    return CalibrationResult(done_batches, done_images, total, cancelled, time.perf_counter() - start)


def convert(qmodel: QuantVisionModel) -> QuantVisionModel:
    """Freeze qparams (raises NotCalibratedError if an observer saw nothing) and enter QUANT."""
    qmodel.freeze()
    return qmodel


def retarget(qmodel: QuantVisionModel, config: PTQConfig) -> list[str]:
    """Give a prepared model `config`'s per-module dtypes without recalibrating; returns the observers changed.

    Calibration runs the float maths whatever the dtypes (CALIB never fake-quantizes), so the
    statistics a new preparation would collect on the same images are the ones held already: only
    the specs, the kept-float flags, the qparams and the cached fake-quantized weights change, and
    the result equals preparing with `config` and calibrating again. What the statistics themselves
    depend on (the observer and its settings, per-channel or per-tensor ranges) cannot change here.
    """
    if not isinstance(config, PTQConfig):
        raise ConfigError(f"expected a PTQConfig, got {type(config).__name__}")
    old = qmodel.ctx.config
    for key in ("observer", "percentile", "ema_momentum"):
        if getattr(config, key) != getattr(old, key):
            raise ConfigError(
                f"the new config changes {key} ({getattr(old, key)} -> {getattr(config, key)}): prepare and calibrate again"
            )
    observers = qmodel.observers()
    updates = []
    for obs in observers:
        spec, enabled = obs.spec_request.resolve(config, obs.module_name)
        per_channel = bool(spec.per_channel and obs.spec_request.channels is not None)
        if per_channel != obs.per_channel:
            raise ConfigError(
                f"the new config makes {obs.name} per-{'channel' if per_channel else 'tensor'}: prepare and calibrate again"
            )
        updates.append((obs, spec, enabled))
    changed: list[str] = []
    for obs, spec, enabled in updates:
        if spec == obs.spec and enabled == obs.enabled:
            continue
        obs.spec, obs.qdtype, obs.enabled = spec, get_dtype(spec.dtype), enabled
        if bool(obs.frozen):
            obs.compute_qparams()
        changed.append(obs.name)
    qmodel.ctx.config = config
    if changed and qmodel.ctx.mode is Mode.QUANT:
        # A parent may fold a child's qparams into its constants (the patch embedder's bias), so every
        # wrapper refreshes: cheap next to one forward.
        for wrapper in qmodel.quant_modules():
            wrapper.cache_weights()
    return changed
