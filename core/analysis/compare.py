"""FP vs quantized (QUANT) output of every wrapper, streamed over images (metrics: core.analysis.metrics)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence

import torch

from core.analysis.metrics import SAMPLE_SIZE, ErrorAccumulator
from core.analysis.records import END_TO_END, CompareResult, ModuleError
from core.analysis.tap import PairTap, Progress, enter_quant, model_device, model_inputs, module_output_observers
from core.cancel import CancelToken

__all__ = ["compare", "clip_bounds"]


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
        outputs = module_output_observers(qmodel)
        accs: dict[str, ErrorAccumulator] = {}
        for _name, kind, obs in outputs:
            if obs.name not in accs:
                accs[obs.name] = ErrorAccumulator(obs.name, kind, clip_bounds(obs), sample_size, seed)
        final_clip = clip_bounds(getattr(qmodel, "obs_output", None))
        e2e = ErrorAccumulator(END_TO_END, "model", final_clip, sample_size, seed)
        images: list[str] = []
        done = 0

        def fold(obs, fp: torch.Tensor, q: torch.Tensor) -> None:
            accs[obs.name].update(fp, q)

        with torch.no_grad(), PairTap(qmodel, accs, fold) as tap:
            for batch in batches:
                cancel.raise_if_cancelled("Comparison")
                inputs, ids = model_inputs(batch, device)
                fp_out, q_out = tap.run(inputs, keep)
                e2e.update(fp_out, q_out)
                del fp_out, q_out
                images.extend(ids)
                done += int(inputs["pixel_values"].shape[0])
                if progress is not None:
                    progress(done, total or done, f"compared {done} image(s)")
    finally:
        qmodel.set_keep_float([])
    results = {name: acc.result() for name, acc in accs.items()}
    modules = []
    for name, kind, obs in outputs:
        r = results[obs.name]
        if r.num_values == 0:
            continue
        modules.append(ModuleError(**{**r.__dict__, "name": name, "kind": kind}))
    return CompareResult(
        modules=modules,
        end_to_end=e2e.result(),
        images=images,
        keep_float=keep,
        seconds=time.perf_counter() - t0,
    )
