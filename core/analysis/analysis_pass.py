"""One analysis pass per image: the per-module errors, the patch-error maps and the first divergence at once.

The three views each ran their own float and quantized passes over the same images
(``compare``, ``image_error_maps``, ``locate_divergence``). Here every image runs float and quantized
in lockstep, one step of the static path at a time (``QuantVisionModel.static_steps``: patch
embedder, RoPE tables, each encoder layer, pooler, standardize): the step runs float on the float
hidden state, then quantized on the quantized hidden state, then each of its units alone, quantized,
on its float input. Both taps are in place (``core.analysis.tap``): the PairTap pairs the step's
wrapper outputs and feeds the per-module accumulators (compare's ``CompareAccumulator``) and the
image's row statistics (heatmaps' ``RowErrorCollector``); the locator's unit tap (divergence's
``DivergenceSearch``) compares each unit's input and output and keeps what its local run needs.
Same calls on the same tensors, same accumulators, so the numbers equal the separate calls
exactly (tests/test_analysis_pass.py).

Memory: only the float and the quantized hidden states are carried from one step to the next; a
step's float outputs are paired and dropped before the next step runs. The quantized observers are
switched on one step at a time (every other observer stays float), so only that step's wrappers
hold fake-quantized weights (``cache_weights``): the model's weights are not doubled while it runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from core.analysis.compare import CompareAccumulator
from core.analysis.divergence import DivergenceResult, DivergenceSearch
from core.analysis.heatmaps import ImageErrorMaps, RowErrorCollector
from core.analysis.metrics import SAMPLE_SIZE
from core.analysis.records import CompareResult
from core.analysis.tap import (
    ALL_FLOAT,
    PairTap,
    Progress,
    enter_quant,
    model_device,
    model_inputs,
    single_image_batches,
)
from core.cancel import CancelToken
from core.wrappers.vision import StaticCarry, StaticStep

WHAT = "Analysis"  # names the step in the cancel message
STEPS_PER_IMAGE = 3  # progress ticks per image: a third of its steps each

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
        flags = _StepFlags(qmodel)
        rows: RowErrorCollector | None = None

        def on_pair(obs, fp: torch.Tensor, q: torch.Tensor) -> None:
            errors.fold(obs, fp, q)
            if rows is not None:
                rows.on_pair(obs, fp, q)

        with torch.no_grad(), PairTap(qmodel, errors.accs, on_pair, cancel, WHAT) as pair, search, qmodel.static_path():
            for batch in single_image_batches(batches):
                cancel.raise_if_cancelled(WHAT)
                inputs, ids = model_inputs(batch, device)
                image_id = ids[0] if ids else f"image {len(search.images) + 1}"
                paths = list(batch.get("paths") or [])
                rows = RowErrorCollector(qmodel, errors.outputs, inputs)
                profile = qmodel.build_profile(inputs["pixel_position_ids"])
                steps = qmodel.static_steps(profile)
                fp = q = StaticCarry(inputs["pixel_values"][:, : profile.num_patches])
                ticks = {len(steps) * k // STEPS_PER_IMAGE - 1 for k in range(1, STEPS_PER_IMAGE + 1)}
                for i, step in enumerate(steps):
                    cancel.raise_if_cancelled(WHAT)
                    fp_in = fp
                    # 1. float on the float hidden state: the step's wrapper outputs and unit tensors kept
                    pair.start("fp")
                    search.start("fp")
                    fp = step.run(fp)
                    # 2. quantized on the quantized hidden state: each output paired with its float twin
                    with flags.quantized(step):
                        pair.start("q")
                        search.start("q")
                        q = step.run(q)
                        pair.start("off")
                        # 3. the step's units alone, quantized, on their float inputs
                        if i == len(steps) - 1:
                            search.final_done(fp_in.hidden, fp.hidden, q.hidden)
                        else:
                            search.step_done()
                    del fp_in
                    if i in ticks:
                        tick(f"{image_id}: {i + 1}/{len(steps)} steps ({step.name or 'model'})")
                errors.add_final(fp.hidden, q.hidden, ids)
                maps[image_id] = rows.maps(image_id, str(paths[0]) if paths else None, fp.hidden, q.hidden)
                rows = None
                search.end_image(image_id)
                del fp, q
                if on_image is not None:
                    on_image(image_id, _result(errors, search, maps, t0))
    finally:
        search.release()
        qmodel.set_keep_float([])
    return _result(errors, search, maps, t0)


class _StepFlags:
    """Quantizes one static step at a time: every observer float except the step's own (as the model's
    keep-float set has them). Only the step's wrappers then hold fake-quantized weights."""

    def __init__(self, qmodel):
        self.qmodel = qmodel
        self.quant = qmodel.observer_flags()  # the quantized pass's flags (config + keep-float)
        self.names = [obs.module_name for obs in qmodel.observers()]
        self.by_step: dict[str, list[bool]] = {}
        qmodel.set_keep_float(ALL_FLOAT)  # drops every fake-quantized weight copy

    @contextmanager
    def quantized(self, step: StaticStep) -> Iterator[None]:
        """The step's observers as in the quantized pass inside the block, float again after it."""
        flags = self.by_step.get(step.name)
        if flags is None:
            flags = self.by_step[step.name] = [q and step.owns(n) for q, n in zip(self.quant, self.names)]
        self.qmodel.set_observer_flags(flags)
        try:
            yield
        finally:
            self.qmodel.set_observer_flags([False] * len(flags))


def _result(errors: CompareAccumulator, search: DivergenceSearch, maps: dict[str, ImageErrorMaps], t0: float) -> AnalysisResult:
    seconds = time.perf_counter() - t0
    return AnalysisResult(
        compare=errors.result(seconds), divergence=search.result(seconds), maps=dict(maps), seconds=seconds
    )
