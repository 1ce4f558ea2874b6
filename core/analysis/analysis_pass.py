"""One analysis pass per image: the per-module errors, the patch-error maps and the first divergence at once.

The three views each ran their own float and quantized passes over the same images
(``compare``, ``image_error_maps``, ``locate_divergence``). Here every image runs once in
float and once quantized with both taps in place (``core.analysis.tap``): the PairTap pairs every
wrapper output of the two passes and feeds both the per-module accumulators (compare's
``CompareAccumulator``) and the image's row statistics (heatmaps' ``RowErrorCollector``), while
the locator's unit tap (divergence's ``DivergenceSearch``) keeps each unit's float input and
output; then each unit runs alone on its float input. Same passes, same tensors, same
accumulators in the same order as the separate calls, so the numbers are the same (a test).

Memory is bounded by one image: the float pass keeps the image's wrapper outputs until their
quantized twins are produced, and the unit tap holds (mostly the same) unit inputs and outputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from core.analysis.compare import CompareAccumulator
from core.analysis.divergence import DivergenceResult, DivergenceSearch
from core.analysis.heatmaps import ImageErrorMaps, RowErrorCollector
from core.analysis.metrics import SAMPLE_SIZE
from core.analysis.records import CompareResult
from core.analysis.tap import (
    PairTap,
    Progress,
    enter_quant,
    fp_forward,
    model_device,
    model_inputs,
    quant_forward,
    single_image_batches,
)
from core.cancel import CancelToken

WHAT = "Analysis"  # names the step in the cancel message
STEPS_PER_IMAGE = 3  # float pass, quantized pass, units alone

__all__ = ["STEPS_PER_IMAGE", "AnalysisResult", "analyse"]


@dataclass
class AnalysisResult:
    """What one analysis pass found: per-module errors, the first divergence, each image's error maps."""

    compare: CompareResult
    divergence: DivergenceResult
    maps: dict[str, ImageErrorMaps] = field(default_factory=dict)  # by image id, in image order
    seconds: float = 0.0

    @property
    def images(self) -> list[str]:
        """The image ids the numbers are from, in order."""
        return list(self.compare.images)


def analyse(
    qmodel,
    batches: Iterable[Mapping],
    unit: str = "layer",
    keep_float: Sequence[str] | None = None,
    progress: Progress | None = None,
    cancel: CancelToken | None = None,
    total: int | None = None,
    on_image: Callable[[str, AnalysisResult], None] | None = None,
    sample_size: int = SAMPLE_SIZE,
    seed: int = 0,
) -> AnalysisResult:
    """Per-module errors, first divergence and patch-error maps of a calibrated wrapped model, one pass per image.

    ``batches``: preprocessor mappings (plus optional "image_ids" and "paths"), split into images of
    one. ``keep_float``: modules kept float in the quantized pass (a what-if; the maps then show it
    too). ``on_image(image_id, partial result)`` after each image: the numbers of the images so far.
    The model is left in QUANT mode with only the config's keep-float modules. Raises
    core.errors.CancelledError when cancelled.
    """
    cancel = cancel or CancelToken()
    keep = list(keep_float or [])
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)  # type: ignore[arg-type]
    search = DivergenceSearch(qmodel, unit, cancel, WHAT)
    t0 = time.perf_counter()
    device = model_device(qmodel)
    maps: dict[str, ImageErrorMaps] = {}
    done = 0

    def tick(msg: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, STEPS_PER_IMAGE * (total or len(search.images) + 1), msg)

    try:
        cancel.raise_if_cancelled(WHAT)
        enter_quant(qmodel)
        qmodel.set_keep_float(keep)  # before the accumulators: keep-float outputs have no clip bounds
        errors = CompareAccumulator(qmodel, keep, sample_size, seed)
        rows: RowErrorCollector | None = None

        def on_pair(obs, fp: torch.Tensor, q: torch.Tensor) -> None:
            errors.fold(obs, fp, q)
            if rows is not None:
                rows.on_pair(obs, fp, q)

        with torch.no_grad(), PairTap(qmodel, errors.accs, on_pair, cancel, WHAT) as pair, search:
            for batch in single_image_batches(batches):
                cancel.raise_if_cancelled(WHAT)
                inputs, ids = model_inputs(batch, device)
                image_id = ids[0] if ids else f"image {len(search.images) + 1}"
                paths = list(batch.get("paths") or [])
                rows = RowErrorCollector(qmodel, errors.outputs, inputs)
                # 1. float reference: every wrapper output and unit input/output kept
                pair.start("fp")
                search.start("fp")
                fp_out = fp_forward(qmodel, inputs)
                search.float_done(fp_out)
                tick(f"{image_id}: float pass")
                cancel.raise_if_cancelled(WHAT)
                # 2. quantized: each wrapper output paired with its float twin as it is produced
                pair.start("q")
                search.start("q")
                q_out = quant_forward(qmodel, inputs, keep)
                pair.start("off")
                search.quant_done(fp_out, q_out)
                errors.add_final(fp_out, q_out, ids)
                maps[image_id] = rows.maps(image_id, str(paths[0]) if paths else None, fp_out, q_out)
                rows = None
                del q_out
                tick(f"{image_id}: quantized pass")
                # 3. every unit alone, quantized, on its float input
                search.run_alone()
                search.end_image(image_id)
                del fp_out
                tick(f"{image_id}: units alone")
                if on_image is not None:
                    on_image(image_id, _result(errors, search, maps, t0))
    finally:
        search.release()
        qmodel.set_keep_float([])
    return _result(errors, search, maps, t0)


def _result(errors: CompareAccumulator, search: DivergenceSearch, maps: dict[str, ImageErrorMaps], t0: float) -> AnalysisResult:
    seconds = time.perf_counter() - t0
    return AnalysisResult(
        compare=errors.result(seconds), divergence=search.result(seconds), maps=dict(maps), seconds=seconds
    )
