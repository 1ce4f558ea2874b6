"""Mixed precision to a target: the cheapest per-module dtypes that reach an end-to-end SQNR.

Candidates per unit (core.remedies.mixed_units) in cost order: weights uint4 < uint8 < int16,
activations uint8 < int16, float as the last resort (leaf units only). By default the activation
dtype is one choice for the whole model (the search runs once with uint8 and once with int16
activations): that is what TICO 0.3 exports as evaluated (search_mixed_precision's docstring). The
cost of a configuration is its estimated exported size (core.remedies.cost), with the number of ops
computed in a wider dtype reported beside it. Every configuration is evaluated on the same images against float references
computed once; the model is retargeted (core.ptq.retarget), never recalibrated.

Two searches run on the same evaluations:

- greedy (the reference): units ordered by sensitivity (the noise a unit adds when it alone is at its
  cheapest option and every other unit at its widest integer option); from the all-cheapest
  configuration, passes over the units, most sensitive first, move each unit one step up its chain of
  ever wider options until the target is reached; float only once every unit is at its widest integer.
- search: the single-unit measurements give each option's noise change; with the noise of the units
  taken as additive, options are bought in order of noise removed per byte (each unit along the lower
  convex hull of its options) until the predicted noise meets the target; that point is verified by
  evaluation (the walk goes on until one is), then each unit is demoted one option at a time while the
  target still holds. The greedy's point goes through the same demotion, so the search is never dearer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from core.analysis.metrics import sqnr_from_sums
from core.analysis.tap import fp_forward, model_device, model_inputs, quant_forward
from core.cancel import CancelToken
from core.config import FLOAT, PTQConfig
from core.errors import ConfigError
from core.io import json_safe
from core.ptq import retarget
from core.quant.mode import Mode
from core.remedies.cost import TensorSizes, estimate_bytes, wide_ops
from core.remedies.mixed_units import (
    ACTIVATION_DTYPES,
    MixedUnit,
    assignment_overrides,
    config_with,
    dominates,
    mixed_units,
)

ORIGINS = ("search", "greedy", "baseline")
ACTIVATION_MODES = ("uniform", "per-unit")


@dataclass
class ParetoPoint:
    """One configuration tried: its overrides (glob -> override text), exported size, wide ops, SQNR."""

    overrides: dict[str, str]
    cost_bytes: int
    wide_ops: int
    sqnr_db: float
    origin: str = "search"  # "search", "greedy" (the sensitivity-ordered reference) or "baseline"
    label: str = ""  # what the point is, e.g. "all int16" for a baseline

    def to_json(self) -> dict[str, Any]:
        """The point as plain JSON values (an infinite SQNR becomes null)."""
        return json_safe(asdict(self))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ParetoPoint:
        """Inverse of to_json."""
        sqnr = data.get("sqnr_db")
        return cls(
            overrides={str(k): str(v) for k, v in dict(data.get("overrides", {})).items()},
            cost_bytes=int(data["cost_bytes"]),
            wide_ops=int(data.get("wide_ops", 0)),
            sqnr_db=math.inf if sqnr is None else float(sqnr),
            origin=str(data.get("origin", "search")),
            label=str(data.get("label", "")),
        )


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


class _Evaluator:
    """Evaluates assignments (one option per unit) on fixed images: float references computed once."""

    def __init__(self, qmodel, base: PTQConfig, units: list[MixedUnit], references, sizes: TensorSizes, tick, points):
        self.qmodel, self.base, self.units, self.sizes, self.tick = qmodel, base, units, sizes, tick
        self.points: list[ParetoPoint] = points  # shared by every evaluator of one search
        self.seen: dict[tuple[tuple[str, ...], str], ParetoPoint] = {}
        self.noise: dict[tuple[str, ...], float] = {}
        self.inputs, self.refs = references
        self.signal = sum(float(torch.dot(r, r)) for r in self.refs)

    def config(self, assignment: Sequence[str]) -> PTQConfig:
        """The config of an assignment."""
        return config_with(self.base, assignment_overrides(self.units, assignment))

    def cost(self, assignment: Sequence[str]) -> int:
        """Estimated exported bytes of an assignment."""
        return estimate_bytes(self.qmodel, self.config(assignment), self.sizes)

    def evaluate(self, assignment: Sequence[str], origin: str, label: str = "") -> ParetoPoint:
        """The point of an assignment for `origin`; each assignment is evaluated once, and another origin
        reaching it gets its own point with the same figures."""
        key = tuple(assignment)
        known = self.seen.get((key, origin))
        if known is not None:
            return known
        twin = next((p for (k, _), p in self.seen.items() if k == key), None)
        if twin is None:
            config = self.config(key)
            self.tick(f"{origin}: evaluating configuration {len(self.noise) + 1}")
            retarget(self.qmodel, config)
            noise = self.noise[key] = _noise(self.qmodel, self.inputs, self.refs)
            figures = (estimate_bytes(self.qmodel, config, self.sizes), wide_ops(self.qmodel, config, self.sizes))
            sqnr = sqnr_from_sums(self.signal, noise)
        else:
            figures, sqnr = (twin.cost_bytes, twin.wide_ops), twin.sqnr_db
        point = ParetoPoint(assignment_overrides(self.units, key), figures[0], figures[1], sqnr, origin, label)
        self.points.append(point)
        self.seen[(key, origin)] = point
        return point

    def met(self, assignment: Sequence[str], goal: float) -> bool | None:
        """Whether an evaluated assignment reaches `goal` (None if it was never evaluated)."""
        noise = self.noise.get(tuple(assignment))
        return None if noise is None else sqnr_from_sums(self.signal, noise) >= goal


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
            evs = [_Evaluator(qmodel, config, units, references, sizes, tick, points) for units in runs]
            # The last run's widest integer options are int16 everywhere.
            int16 = evs[-1].evaluate(tuple(u.widest_integer for u in runs[-1]), "baseline", "all int16")
            if target["kind"] == "within_int16":
                target = {**target, "int16_sqnr_db": int16.sqnr_db, "sqnr_db": int16.sqnr_db - target["within_db"]}
            outcomes = [_run(ev, target["sqnr_db"], mode) for ev, mode in zip(evs, modes)]
    finally:
        retarget(qmodel, original_config)
        qmodel.set_observer_flags(original_flags)
    result = MixedPrecisionResult(target=target, points=points, units=[u.glob for u in runs[-1]])
    goal = result.target_sqnr_db
    greedy = [g for g, _ in outcomes if g is not None]
    result.greedy = min(greedy, key=_cost_key) if greedy else None
    met = [p for p in points if p.origin == "search" and p.sqnr_db >= goal]
    result.chosen = min(met, key=_cost_key) if met else None
    if result.chosen is None:
        result.reason = next((r for _, r in reversed(outcomes) if r), "no configuration tried reaches the target")
    result.seconds = time.perf_counter() - start
    return result


def _cost_key(p: ParetoPoint) -> tuple[int, int, float]:
    return (p.cost_bytes, p.wide_ops, -p.sqnr_db)


def _run(ev: _Evaluator, goal: float, activation: str | None) -> tuple[ParetoPoint | None, str]:
    """One search over `ev`'s units: the greedy's point and, when the goal is out of reach, why."""
    units = ev.units
    suffix = f", {activation} activations" if activation else ""
    bottom = tuple(u.options[0] for u in units)
    top = tuple(u.widest_integer for u in units)
    ceiling = tuple(u.options[-1] for u in units)
    top_point = ev.evaluate(top, "baseline", "widest integer" + suffix)
    bottom_point = ev.evaluate(bottom, "baseline", "cheapest" + suffix)
    if bottom_point.sqnr_db >= goal:
        ev.evaluate(bottom, "search")
        return ev.evaluate(bottom, "greedy"), ""
    if top_point.sqnr_db < goal:
        ceiling_point = ev.evaluate(ceiling, "baseline", "widest integer, leaves float" + suffix)
        if ceiling_point.sqnr_db < goal:
            return None, (
                f"target {goal:.2f} dB is out of reach: the widest integer dtypes with every leaf module float "
                f"reach {ceiling_point.sqnr_db:.2f} dB on these images{suffix}"
            )
    # Single-unit measurements around the widest integer point: the noise each option adds (float: removes).
    n_top = ev.noise[top]
    delta: list[dict[str, float]] = []
    for i, u in enumerate(units):
        row = {u.widest_integer: 0.0}
        for option in u.options:
            if option != u.widest_integer:
                ev.evaluate(_with(top, i, option), "search", f"{u.glob} = {option}")
                row[option] = ev.noise[_with(top, i, option)] - n_top
        delta.append(row)
    n_goal = ev.signal / (10 ** (goal / 10))
    costs = _unit_costs(ev, units, bottom)
    greedy = _greedy(ev, units, delta, bottom, goal)
    found = _knapsack_walk(ev, units, delta, costs, bottom, n_top, n_goal, goal)
    best = None
    for point in sorted((p for p in (found, greedy) if p is not None), key=lambda p: p.cost_bytes):
        if best is None or point.cost_bytes < best.cost_bytes:
            demoted = _demote(ev, units, delta, costs, _assignment_of(units, point), n_goal, goal)
            best = demoted if best is None or demoted.cost_bytes < best.cost_bytes else best
    return greedy, ""


def _with(assignment: Sequence[str], index: int, option: str) -> tuple[str, ...]:
    out = list(assignment)
    out[index] = option
    return tuple(out)


def _assignment_of(units: Sequence[MixedUnit], point: ParetoPoint) -> tuple[str, ...]:
    return tuple(point.overrides[u.glob] for u in units)


def _greedy(ev, units, delta, bottom, goal) -> ParetoPoint | None:
    """The reference: sensitivity-ordered, one step at a time (module docstring)."""
    order = sorted(range(len(units)), key=lambda i: -delta[i][units[i].options[0]])
    current = list(bottom)
    while True:
        moved = False
        allow_float = all(current[i] in (units[i].widest_integer, FLOAT) for i in order)
        for i in order:
            step = _next_wider(units[i], current[i], allow_float)
            if step is None:
                continue
            current[i] = step
            moved = True
            point = ev.evaluate(current, "greedy")
            if point.sqnr_db >= goal:
                return point
        if not moved:
            return None


def _next_wider(unit: MixedUnit, option: str, allow_float: bool) -> str | None:
    """The cheapest option of `unit` wider than `option` on both sides (float only if allowed)."""
    for candidate in unit.options:
        if candidate == option or not dominates(candidate, option):
            continue
        if candidate == FLOAT and not allow_float:
            return None
        return candidate
    return None


def _unit_costs(ev: _Evaluator, units: Sequence[MixedUnit], bottom: Sequence[str]) -> list[dict[str, int]]:
    """Each option's cost over the unit's cheapest, per unit. The estimate is a sum over observers and a
    unit's line alone decides its observers' dtypes, so the cost of an assignment is the sum of these."""
    base = ev.cost(bottom)
    return [{o: ev.cost(_with(bottom, i, o)) - base for o in u.options} for i, u in enumerate(units)]


def _hull(costs: dict[str, int], delta: dict[str, float]) -> list[str]:
    """The options on the lower convex hull of (cost, added noise), cheapest first."""
    pts = sorted(costs, key=lambda o: (costs[o], delta[o]))
    useful = []
    for o in pts:  # drop options that cost more and remove no more noise
        if useful and delta[o] >= delta[useful[-1]]:
            continue
        useful.append(o)
    hull: list[str] = []
    for o in useful:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies above the segment a-o: buying o straight from a removes more noise per byte.
            cross = (costs[b] - costs[a]) * (delta[o] - delta[a]) - (delta[b] - delta[a]) * (costs[o] - costs[a])
            if cross <= 0:
                hull.pop()
            else:
                break
        hull.append(o)
    return hull


def _knapsack_walk(ev, units, delta, costs, bottom, n_top, n_goal, goal) -> ParetoPoint | None:
    """Buy hull steps by noise removed per byte until the predicted noise meets the goal, then evaluate
    until a point verifies."""
    hulls = [_hull(costs[i], delta[i]) for i in range(len(units))]
    position = [0] * len(units)
    current = list(bottom)
    predicted = n_top + sum(delta[i][current[i]] for i in range(len(units)))
    while True:
        if predicted <= n_goal:
            point = ev.evaluate(current, "search")
            if point.sqnr_db >= goal:
                return point
        best, best_rate = None, 0.0
        for i, hull in enumerate(hulls):
            if position[i] + 1 >= len(hull):
                continue
            a, b = hull[position[i]], hull[position[i] + 1]
            # A step that costs no byte (a linear's 16-bit output) is bought first, at its noise gain.
            rate = (delta[i][a] - delta[i][b]) / max(costs[i][b] - costs[i][a], 1)
            if best is None or rate > best_rate:
                best, best_rate = i, rate
        if best is None:
            return None
        position[best] += 1
        old = current[best]
        current[best] = hulls[best][position[best]]
        predicted += delta[best][current[best]] - delta[best][old]


def _demote(ev, units, delta, costs, assignment, n_goal, goal) -> ParetoPoint:
    """From a point that meets the goal, make it cheaper while the goal holds: move one unit to a
    cheaper option; failing that, exchange (one unit cheaper, another wider, cheaper in all); at last
    narrow the options that cost no byte (fewer ops in a wide dtype at the same size).

    Moves are tried by predicted noise per byte saved, those whose predicted noise (the measured noise
    of the current point plus the moves' single-unit changes) meets the goal first; exchanges only when
    it does, and at most one per unit per round.
    """
    current = tuple(assignment)
    point = ev.evaluate(current, "search")
    for phase in ("saving", "narrowing"):
        while True:
            accepted = _try_moves(
                ev, current, _moves(units, delta, costs, current, ev.noise[current], n_goal, phase), goal
            )
            if accepted is None and phase == "saving":
                pairs = _exchanges(units, delta, costs, current, ev.noise[current], n_goal)
                accepted = _try_moves(ev, current, pairs[: len(units)], goal)
            if accepted is None:
                break
            current, point = accepted
    return point


def _try_moves(ev, current, moves, goal) -> tuple[tuple[str, ...], ParetoPoint] | None:
    """Evaluate the moves in order; the first that keeps the goal (its assignment and point), or None."""
    for _, changes in moves:
        trial = tuple(current)
        for i, o in changes:
            trial = _with(trial, i, o)
        if ev.met(trial, goal) is False:
            continue
        candidate = ev.evaluate(trial, "search")
        if candidate.sqnr_db >= goal:
            return trial, candidate
    return None


def _moves(units, delta, costs, current, measured, n_goal, phase) -> list[tuple[float, tuple]]:
    """Single-unit moves: cheaper options ("saving") or narrower ones of the same cost ("narrowing")."""
    moves = []
    for i, u in enumerate(units):
        for o in u.options:
            saved = costs[i][current[i]] - costs[i][o]
            narrower = o != current[i] and dominates(current[i], o)
            if (phase == "saving" and saved > 0) or (phase == "narrowing" and saved == 0 and narrower):
                added = delta[i][o] - delta[i][current[i]]
                # Single moves are few: those the additive model expects to fail are tried too, last
                # (the model is measured around the widest point and errs on either side far from it).
                moves.append((measured + added > n_goal, added / max(saved, 1), ((i, o),)))
    return [(key[1], changes) for *key, changes in sorted(moves)]


def _exchanges(units, delta, costs, current, measured, n_goal) -> list[tuple[float, tuple]]:
    """Pairs of moves, one unit cheaper and another wider, that save bytes together: most saved first."""
    down = [(i, o) for i, u in enumerate(units) for o in u.options if costs[i][o] < costs[i][current[i]]]
    up = [(j, p) for j, u in enumerate(units) for p in u.options if delta[j][p] < delta[j][current[j]]]
    pairs = []
    for i, o in down:
        for j, p in up:
            if i == j:
                continue
            saved = costs[i][current[i]] - costs[i][o] + costs[j][current[j]] - costs[j][p]
            added = delta[i][o] - delta[i][current[i]] + delta[j][p] - delta[j][current[j]]
            if saved > 0 and measured + added <= n_goal:
                pairs.append((-float(saved), ((i, o), (j, p))))
    return sorted(pairs)
