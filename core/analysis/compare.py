"""FP vs quantized (QUANT) output of every wrapper, streamed over images (metrics: core.analysis.metrics)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence

import torch

from core.analysis.metrics import SAMPLE_SIZE, ErrorAccumulator
from core.analysis.records import END_TO_END, CompareResult, ModuleError
from core.analysis.tap import PairTap, Progress, enter_quant, model_device, model_inputs, module_output_observers
from core.cancel import CancelToken

__all__ = ["compare", "clip_bounds", "CompareAccumulator"]


def clip_bounds(obs) -> tuple[float, float] | None:
    """Values outside these bounds are clipped by the observer's grid (None: kept float).

    The representable range widened by half a step on each side: a value within half a step
    of the edge rounds onto the edge code like any other value, so it does not count.
    """
    if obs is None or not obs.enabled:
        return None
    lo, hi = obs.representable_range()
    half = 0.5 * float(obs.scale.max())
    return lo - half, hi + half


class CompareAccumulator:
    """compare's running statistics: one ErrorAccumulator per wrapper output plus the end-to-end one.

    Built on a model already in QUANT mode with the comparison's keep-float set (keep-float observers
    are disabled, so their outputs have no clip bounds). ``fold`` is a PairTap's ``on_pair``; shared
    by ``compare`` and the one analysis pass (core.analysis.analysis_pass).
    """

    def __init__(self, qmodel, keep: Sequence[str], sample_size: int = SAMPLE_SIZE, seed: int = 0):
        self.keep = list(keep)
        self.outputs = module_output_observers(qmodel)
        self.accs: dict[str, ErrorAccumulator] = {}
        for _name, kind, obs in self.outputs:
            if obs.name not in self.accs:
                self.accs[obs.name] = ErrorAccumulator(obs.name, kind, clip_bounds(obs), sample_size, seed)
        final_clip = clip_bounds(getattr(qmodel, "obs_output", None))
        self.e2e = ErrorAccumulator(END_TO_END, "model", final_clip, sample_size, seed)
        self.images: list[str] = []

    def fold(self, obs, fp: torch.Tensor, q: torch.Tensor) -> None:
        """Add one paired (float, quantized) tensor of an output observer."""
        self.accs[obs.name].update(fp, q)

    def add_final(self, fp_out: torch.Tensor, q_out: torch.Tensor, image_ids: Sequence[str]) -> None:
        """Add a batch's final outputs (the end-to-end error) and its image ids."""
        self.e2e.update(fp_out, q_out)
        self.images.extend(image_ids)

    def result(self, seconds: float = 0.0) -> CompareResult:
        """The CompareResult of everything folded so far (the accumulators keep running)."""
        results = {name: acc.result() for name, acc in self.accs.items()}
        modules = []
        for name, kind, obs in self.outputs:
            r = results[obs.name]
            if r.num_values == 0:
                continue
            modules.append(ModuleError(**{**r.__dict__, "name": name, "kind": kind}))
        return CompareResult(
            modules=modules,
            end_to_end=self.e2e.result(),
            images=list(self.images),
            keep_float=list(self.keep),
            seconds=seconds,
        )


def compare(
    qmodel,
    batches: Iterable[Mapping],
    progress: Progress | None = None,
    cancel: CancelToken | None = None,
    keep_float: Sequence[str] | None = None,
    sample_size: int = SAMPLE_SIZE,
    total: int | None = None,
    seed: int = 0,
) -> CompareResult:
    """FP vs quantized (QUANT) output of every wrapper of a wrapped model, streamed over the batches.

    Each image runs twice: once with every observer kept float (the FP reference), once
    quantized. Each batch is a preprocessor mapping (plus optional "image_ids"). Modules matching
    ``keep_float`` stay float for this comparison only. The model is left in QUANT mode with
    only the config's keep-float modules. Raises core.errors.CancelledError when cancelled.
    """
    cancel = cancel or CancelToken()
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)  # type: ignore[arg-type]
    keep = list(keep_float or [])
    t0 = time.perf_counter()
    device = model_device(qmodel)
    try:
        enter_quant(qmodel)
        qmodel.set_keep_float(keep)
        acc = CompareAccumulator(qmodel, keep, sample_size, seed)
        done = 0
        with torch.no_grad(), PairTap(qmodel, acc.accs, acc.fold) as tap:
            for batch in batches:
                cancel.raise_if_cancelled("Comparison")
                inputs, ids = model_inputs(batch, device)
                fp_out, q_out = tap.run(inputs, keep)
                acc.add_final(fp_out, q_out, ids)
                del fp_out, q_out
                done += int(inputs["pixel_values"].shape[0])
                if progress is not None:
                    progress(done, total or done, f"compared {done} image(s)")
    finally:
        qmodel.set_keep_float([])
    return acc.result(time.perf_counter() - t0)
