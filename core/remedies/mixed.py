"""Mixed precision to a target: the cheapest per-module dtypes that reach an end-to-end SQNR.

Candidates per unit (core.remedies.mixed_units) in cost order: weights uint4 < uint8 < int16,
activations uint8 < int16, float as the last resort (leaf units only). By default the activation
dtype is one choice for the whole model (the search runs once with uint8 and once with int16
activations): that is what TICO 0.3 exports as evaluated (search_mixed_precision's docstring). The
cost of a configuration is its estimated exported size (core.remedies.cost), with the number of ops
computed in a wider dtype reported beside it. Every configuration is evaluated on the same images against float references
computed once; the model is retargeted (core.ptq.retarget), never recalibrated.

The searches (the greedy reference; the walk and the exact optimum of the additive noise model, each
verified; the local search over cost-lowering moves from the points they verify) are in
core.remedies.mixed_search, apart from the model; this module measures the configurations they ask
for and collects the result.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from core.analysis.metrics import sqnr_from_sums
from core.analysis.tap import fp_forward, model_device, model_inputs, quant_forward
from core.cancel import CancelToken
from core.config import PTQConfig
from core.errors import ConfigError
from core.io import json_safe
from core.ptq import retarget
from core.quant.mode import Mode
from core.remedies.cost import TensorSizes, estimate_bytes, wide_ops
from core.remedies.mixed_search import Evaluator, ParetoPoint, search_units
from core.remedies.mixed_units import ACTIVATION_DTYPES, MixedUnit, assignment_overrides, config_with, mixed_units

ORIGINS = ("search", "greedy", "baseline")
ACTIVATION_MODES = ("uniform", "per-unit")


@dataclass
class MixedPrecisionResult:
    """Every point tried, the cheapest that reaches the target (search and greedy), and the target."""

    target: dict[str, Any]
    points: list[ParetoPoint] = field(default_factory=list)
    chosen: ParetoPoint | None = None
    greedy: ParetoPoint | None = None
    reason: str = ""  # why nothing was chosen (target out of reach), empty otherwise
    units: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # What the local search checked around the chosen point (mixed_search.local_search): its cost-lowering
    # singles and exchanges, how many were evaluated (all below the target), whether that is all of them,
    # and whether every cheaper assignment is ruled out by the additive noise model or was evaluated and
    # falls below the target. Empty when the chosen point is not where a local search stopped.
    neighbourhood: dict[str, Any] = field(default_factory=dict)

    @property
    def target_sqnr_db(self) -> float:
        """The end-to-end SQNR the points were asked to reach."""
        return float(self.target["sqnr_db"])

    def front(self) -> list[ParetoPoint]:
        """The non-dominated points tried (pareto_front)."""
        return pareto_front(self.points)

    def to_json(self) -> dict[str, Any]:
        """The result as plain JSON values; chosen and greedy are indices into points."""
        return {
            "target": json_safe(self.target),
            "points": [p.to_json() for p in self.points],
            "chosen": _index(self.points, self.chosen),
            "greedy": _index(self.points, self.greedy),
            "reason": self.reason,
            "units": list(self.units),
            "seconds": float(self.seconds),
            "neighbourhood": json_safe(self.neighbourhood),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MixedPrecisionResult:
        """Inverse of to_json."""
        points = [ParetoPoint.from_json(p) for p in data.get("points", [])]
        chosen, greedy = data.get("chosen"), data.get("greedy")
        return cls(
            target=dict(data.get("target", {})),
            points=points,
            chosen=None if chosen is None else points[int(chosen)],
            greedy=None if greedy is None else points[int(greedy)],
            reason=str(data.get("reason", "")),
            units=list(data.get("units", [])),
            seconds=float(data.get("seconds", 0.0)),
            neighbourhood=dict(data.get("neighbourhood", {})),
        )


def _index(points: Sequence[ParetoPoint], point: ParetoPoint | None) -> int | None:
    if point is None:
        return None
    return next(i for i, p in enumerate(points) if p is point)


def pareto_front(points: Sequence[ParetoPoint]) -> list[ParetoPoint]:
    """The points no other point beats on both size and SQNR (smaller or equal size, higher or equal
    SQNR, one of them strictly), cheapest first; of equal points the first one tried stays."""
    front: list[ParetoPoint] = []
    for p in sorted(points, key=lambda p: (p.cost_bytes, -p.sqnr_db)):
        if front and front[-1].sqnr_db >= p.sqnr_db:
            continue
        front.append(p)
    return front


def apply_mixed_point(qmodel, config: PTQConfig, point: ParetoPoint) -> PTQConfig:
    """Give the calibrated model `point`'s dtypes on top of `config` (statistics kept, qparams recomputed)."""
    new = config_with(config, point.overrides)
    retarget(qmodel, new)
    return new


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def _references(qmodel, batches) -> tuple[list[dict], list[torch.Tensor]]:
    """Each batch's model inputs and its float output (float64, flat): the QUANT graph kept float."""
    device = model_device(qmodel)
    inputs = [model_inputs(b, device)[0] for b in batches]
    with torch.no_grad():
        return inputs, [fp_forward(qmodel, x).reshape(-1).double() for x in inputs]


def _noise(qmodel, inputs, refs) -> float:
    """Sum of squared differences of the quantized outputs from the float references."""
    noise = 0.0
    with torch.no_grad():
        for x, ref in zip(inputs, refs):
            d = quant_forward(qmodel, x, []).reshape(-1).double() - ref
            noise += float(torch.dot(d, d))
    return noise


def end_to_end_sqnr(qmodel, config: PTQConfig, batches: Sequence[Mapping[str, Any]]) -> float:
    """End-to-end SQNR (dB) of the calibrated model under `config`'s dtypes on these images; the model
    comes back with its own config, qparams and mode."""
    original, flags = qmodel.ctx.config, qmodel.observer_flags()
    try:
        with qmodel.mode_as(Mode.QUANT):
            inputs, refs = _references(qmodel, list(batches))
            retarget(qmodel, config)
            noise = _noise(qmodel, inputs, refs)
    finally:
        retarget(qmodel, original)
        qmodel.set_observer_flags(flags)
    return sqnr_from_sums(sum(float(torch.dot(r, r)) for r in refs), noise)


def _model_evaluator(qmodel, base: PTQConfig, units: list[MixedUnit], references, sizes: TensorSizes, tick, points):
    """An Evaluator whose configurations run on the model: the float references computed once."""
    inputs, refs = references

    def config(assignment: Sequence[str]) -> PTQConfig:
        return config_with(base, assignment_overrides(units, assignment))

    def measure(assignment: Sequence[str]) -> tuple[float, int, int]:
        new = config(assignment)
        retarget(qmodel, new)
        return _noise(qmodel, inputs, refs), estimate_bytes(qmodel, new, sizes), wide_ops(qmodel, new, sizes)

    def cost(assignment: Sequence[str]) -> int:
        return estimate_bytes(qmodel, config(assignment), sizes)

    signal = sum(float(torch.dot(r, r)) for r in refs)
    return Evaluator(units, measure, cost, signal, points, tick)


# ---------------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------------


def _resolve_target(target_sqnr_db, within_db_of_int16) -> dict[str, Any]:
    if (target_sqnr_db is None) == (within_db_of_int16 is None):
        raise ConfigError("mixed precision needs one target: target_sqnr_db (dB) or within_db_of_int16 (dB), not both")
    value = target_sqnr_db if target_sqnr_db is not None else within_db_of_int16
    if (
        not isinstance(value, (int, float))
        or not math.isfinite(value)
        or (within_db_of_int16 is not None and value < 0)
    ):
        raise ConfigError(f"mixed-precision target {value!r} must be a finite number of dB (within: >= 0)")
    if target_sqnr_db is not None:
        return {"kind": "sqnr", "sqnr_db": float(target_sqnr_db)}
    return {"kind": "within_int16", "within_db": float(within_db_of_int16)}


def search_mixed_precision(
    qmodel,
    config,
    batches: Sequence[Mapping[str, Any]],
    *,
    target_sqnr_db: float | None = None,
    within_db_of_int16: float | None = None,
    progress: Callable[..., None] | None = None,
    cancel=None,
    unit: str = "kind",
    activations: str = "uniform",
) -> MixedPrecisionResult:
    """Search per-module dtypes for the cheapest configuration that reaches the target on these images.

    activations="uniform" (the default) gives every module the same activation dtype and chooses the
    weights (and float) per unit, once with uint8 and once with int16 activations: TICO 0.3 converts
    only some activation dtype changes inside the graph (a linear from int16 into uint8 is refused,
    "Unsupported dtype: From int16 to uint8"; one from uint8 into int16 is computed in uint8), so only
    uniform activations export as evaluated.
    "per-unit" chooses activations per unit too (cheaper points that may not export).
    The model must be calibrated; it comes back with `config`'s dtypes, qparams and mode (also when
    cancelled: CancelledError). `progress(done, total, message)` is called per evaluated configuration.
    """
    start = time.perf_counter()
    target = _resolve_target(target_sqnr_db, within_db_of_int16)
    if activations not in ACTIVATION_MODES:
        raise ConfigError(f"unknown activations mode {activations!r}; use one of {', '.join(ACTIVATION_MODES)}")
    batches = list(batches)
    if not batches:
        raise ConfigError("mixed precision needs at least one evaluation image")
    if not isinstance(config, PTQConfig):
        raise ConfigError(f"expected a PTQConfig, got {type(config).__name__}")
    cancel = cancel or CancelToken()
    modes = ACTIVATION_DTYPES if activations == "uniform" else (None,)
    runs = [mixed_units(qmodel, config, unit, activation=a) for a in modes]
    if not runs[-1]:
        raise ConfigError("every module is kept float: there is no dtype to choose")
    original_config, original_flags = qmodel.ctx.config, qmodel.observer_flags()
    planned = 3 + sum(len(u.options) + 1 for units in runs for u in units)
    done = 0

    def tick(message: str) -> None:
        nonlocal done, planned
        cancel.raise_if_cancelled("Mixed-precision search")
        done += 1
        planned = max(planned, done + 1)
        if progress is not None:
            progress(done, planned, message)

    points: list[ParetoPoint] = []
    try:
        with qmodel.mode_as(Mode.QUANT):
            sizes = TensorSizes.measure(qmodel, batches[0])
            references = _references(qmodel, batches)
            evs = [_model_evaluator(qmodel, config, units, references, sizes, tick, points) for units in runs]
            # The last run's widest integer options are int16 everywhere.
            int16 = evs[-1].evaluate(tuple(u.widest_integer for u in runs[-1]), "baseline", "all int16")
            if target["kind"] == "within_int16":
                target = {**target, "int16_sqnr_db": int16.sqnr_db, "sqnr_db": int16.sqnr_db - target["within_db"]}
            outcomes = [search_units(ev, target["sqnr_db"], mode) for ev, mode in zip(evs, modes)]
    finally:
        retarget(qmodel, original_config)
        qmodel.set_observer_flags(original_flags)
    result = MixedPrecisionResult(target=target, points=points, units=[u.glob for u in runs[-1]])
    goal = result.target_sqnr_db
    greedy = [g for g, _ in outcomes if g is not None]
    result.greedy = min(greedy, key=_cost_key) if greedy else None
    met = [p for p in points if p.origin == "search" and p.sqnr_db >= goal]
    result.chosen = min(met, key=_cost_key) if met else None
    if result.chosen is not None:
        key = tuple(result.chosen.overrides.values())
        result.neighbourhood = next((dict(ev.checked[key]) for ev in evs if key in ev.checked), {})
    if result.chosen is None:
        result.reason = next((r for _, r in reversed(outcomes) if r), "no configuration tried reaches the target")
    result.seconds = time.perf_counter() - start
    return result


def _cost_key(p: ParetoPoint) -> tuple[int, int, float]:
    return (p.cost_bytes, p.wide_ops, -p.sqnr_db)
