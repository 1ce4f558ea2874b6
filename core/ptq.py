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
