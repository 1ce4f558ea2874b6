"""The mixed-precision search over the units' options, apart from the model that measures them.

An assignment gives each unit (core.remedies.mixed_units) one of its options. An Evaluator measures an
assignment once (its noise, exported bytes and wide ops, through a `measure` function: the model's
forward in core.remedies.mixed, an additive formula in the tests) and keeps every point tried.

One run (search_units), on the same evaluations:

- single-unit measurements: each option of each unit with every other unit at its widest integer; the
  change of noise they show is `delta` (the additive noise model) and the greedy's sensitivity order.
- greedy (the reference): from the all-cheapest assignment, passes over the units, most sensitive first,
  move each unit one step up its chain of ever wider options until the target is reached; float only
  once every unit is at its widest integer.
- walk: options bought by noise removed per byte (each unit along the lower convex hull of its options)
  until the predicted noise meets the target, then evaluated until a point verifies.
- the additive model's cheapest assignment below the best verified point (branch and bound, exact under
  the model, NoiseModel.cheapest_not_ruled_out), evaluated; if it fails, the next one, a few times.
- local search from the walk's, the greedy's and that point (cheapest first): the cost-lowering moves, single
  (one unit to a cheaper option, or to a narrower one of the same cost) and exchanges (one unit to a
  cheaper option and another to a dearer one, cheaper together), those the additive model expects to
  meet the target first, by bytes saved, then the others by predicted noise; the first that meets the
  target is taken and the search goes on from it. It stops where no move does, with the whole
  neighbourhood evaluated, or when its evaluation budget (LOCAL_BUDGET_FACTOR times the evaluations
  before it) is spent; `Evaluator.checked` says which for each point it stopped at, and whether every
  cheaper assignment is ruled out by the additive model or was evaluated and falls below the target.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from core.analysis.metrics import sqnr_from_sums
from core.config import FLOAT
from core.io import json_safe
from core.remedies.mixed_units import MixedUnit, assignment_overrides, dominates

# The local search may evaluate this many times the configurations evaluated before it in a run (the
# single-unit measurements, the greedy and the walk): its cost stays a small multiple of theirs.
LOCAL_BUDGET_FACTOR = 3

NOTHING_CHEAPER = {"singles": 0, "exchanges": 0, "evaluated": 0, "complete": True, "additive_rules_out_cheaper": True}

NODE_LIMIT = 200_000  # branch-and-bound nodes of one additive-model check (well under a second)

Assignment = tuple[str, ...]
Move = tuple[tuple[int, str], ...]  # (unit index, new option) pairs


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


def noise_budget(signal: float, goal_db: float) -> float:
    """The sum of squared errors that SQNR `goal_db` allows against `signal`."""
    return signal / (10 ** (goal_db / 10))


class Evaluator:
    """Evaluates assignments (one option per unit) once each: `measure(assignment)` gives (noise, bytes,
    wide ops), `cost(assignment)` the bytes alone (no evaluation); every point tried joins `points`."""

    def __init__(
        self,
        units: Sequence[MixedUnit],
        measure: Callable[[Assignment], tuple[float, int, int]],
        cost: Callable[[Assignment], int],
        signal: float,
        points: list[ParetoPoint],
        tick: Callable[[str], None] | None = None,
    ) -> None:
        self.units, self.measure, self.cost, self.signal = list(units), measure, cost, signal
        self.tick = tick or (lambda message: None)
        self.points = points  # shared by every evaluator of one search
        self.seen: dict[tuple[Assignment, str], ParetoPoint] = {}
        self.noise: dict[Assignment, float] = {}
        self.checked: dict[Assignment, dict[str, Any]] = {}  # where the local search stopped: what it checked

    def evaluate(self, assignment: Sequence[str], origin: str, label: str = "") -> ParetoPoint:
        """The point of an assignment for `origin`; each assignment is measured once, and another origin
        reaching it gets its own point with the same figures."""
        key = tuple(assignment)
        known = self.seen.get((key, origin))
        if known is not None:
            return known
        twin = next((p for (k, _), p in self.seen.items() if k == key), None)
        if twin is None:
            self.tick(f"{origin}: evaluating configuration {len(self.noise) + 1}")
            noise, cost, wide = self.measure(key)
            self.noise[key] = noise
            figures = (cost, wide, sqnr_from_sums(self.signal, noise))
        else:
            figures = (twin.cost_bytes, twin.wide_ops, twin.sqnr_db)
        point = ParetoPoint(assignment_overrides(self.units, key), *figures, origin=origin, label=label)
        self.points.append(point)
        self.seen[(key, origin)] = point
        return point

    def met(self, assignment: Sequence[str], goal: float) -> bool | None:
        """Whether an evaluated assignment reaches `goal` (None if it was never evaluated)."""
        noise = self.noise.get(tuple(assignment))
        return None if noise is None else sqnr_from_sums(self.signal, noise) >= goal


def search_units(ev: Evaluator, goal: float, activation: str | None = None) -> tuple[ParetoPoint | None, str]:
    """One search over `ev`'s units (module docstring): the greedy's point and, when the goal is out of
    reach, why. The search's points are in `ev.points` (origin "search")."""
    units = ev.units
    suffix = f", {activation} activations" if activation else ""
    bottom = tuple(u.options[0] for u in units)
    top = tuple(u.widest_integer for u in units)
    ceiling = tuple(u.options[-1] for u in units)
    top_point = ev.evaluate(top, "baseline", "widest integer" + suffix)
    bottom_point = ev.evaluate(bottom, "baseline", "cheapest" + suffix)
    if bottom_point.sqnr_db >= goal:
        ev.evaluate(bottom, "search")
        # Every unit on its cheapest option: nothing is cheaper, there is nothing to check.
        ev.checked[bottom] = {**NOTHING_CHEAPER}
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
                ev.evaluate(with_option(top, i, option), "search", f"{u.glob} = {option}")
                row[option] = ev.noise[with_option(top, i, option)] - n_top
        delta.append(row)
    model = NoiseModel(unit_costs(ev, bottom), delta, n_top, noise_budget(ev.signal, goal))
    greedy = greedy_search(ev, delta, bottom, goal)
    found = _walk(ev, model, bottom, goal)
    budget = LOCAL_BUDGET_FACTOR * len(ev.noise)
    starts = [p for p in (found, greedy) if p is not None]
    # The walk buys along each unit's hull, which is not the additive model's optimum in general: try
    # the model's cheapest assignment below the best verified point, the next one if it fails, a few times.
    for _ in range(len(units)):
        below = min((model.cost_of(_assignment(units, p)) for p in starts), default=math.inf)
        guess, _ = model.cheapest_not_ruled_out(below, _failed(ev, goal))
        if guess is None:
            break
        point = ev.evaluate(guess, "search", "additive model's cheapest")
        if point.sqnr_db >= goal:
            starts.append(point)
            break
    for point in sorted(starts, key=lambda p: p.cost_bytes):
        before = len(ev.noise)
        local_search(ev, model, _assignment(units, point), goal, max(budget, 0))
        budget -= len(ev.noise) - before
    return greedy, ""


def _assignment(units: Sequence[MixedUnit], point: ParetoPoint) -> Assignment:
    return tuple(point.overrides[u.glob] for u in units)


def with_option(assignment: Sequence[str], index: int, option: str) -> Assignment:
    """`assignment` with unit `index` on `option`."""
    out = list(assignment)
    out[index] = option
    return tuple(out)


def greedy_search(ev: Evaluator, delta: Sequence[Mapping[str, float]], bottom: Assignment, goal: float):
    """The reference: sensitivity-ordered, one step at a time (module docstring); its point or None."""
    units = ev.units
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


def unit_costs(ev: Evaluator, bottom: Assignment) -> list[dict[str, int]]:
    """Each option's cost over the unit's cheapest, per unit. The estimate is a sum over observers and a
    unit's line alone decides its observers' dtypes, so the cost of an assignment is the sum of these."""
    base = ev.cost(bottom)
    return [{o: ev.cost(with_option(bottom, i, o)) - base for o in u.options} for i, u in enumerate(ev.units)]


@dataclass
class NoiseModel:
    """Per unit, each option's bytes over the cheapest and its noise change measured alone around the
    widest integer point (n_top); n_goal is the noise the target allows."""

    costs: list[dict[str, int]]
    delta: list[dict[str, float]]
    n_top: float
    n_goal: float

    def change(self, current: Sequence[str], move: Move) -> tuple[int, float]:
        """(bytes saved, noise added) by a move from `current`, as the model predicts them."""
        saved = sum(self.costs[i][current[i]] - self.costs[i][o] for i, o in move)
        added = sum(self.delta[i][o] - self.delta[i][current[i]] for i, o in move)
        return saved, added

    def cost_of(self, assignment: Sequence[str]) -> int:
        """An assignment's bytes over the all-cheapest one."""
        return sum(self.costs[i][o] for i, o in enumerate(assignment))

    def cheapest_not_ruled_out(
        self, below: int, skip: frozenset[Assignment] = frozenset(), node_limit: int = NODE_LIMIT
    ) -> tuple[Assignment | None, bool]:
        """The cheapest assignment costing less than `below` (cost_of) that the model does not rule out,
        leaving out those in `skip`; and whether the branch and bound went through every branch (else
        the answer is the best found within `node_limit` nodes).

        With the units' noise additive, an assignment's noise is n_top + the sum of its options' changes,
        and, each unit's own noise being >= 0 and >= its change, at least the sum of the positive changes:
        it is ruled out when either exceeds n_goal."""
        n = len(self.costs)
        # An option whose own change exceeds n_goal is ruled out whatever the others do; the bounds on the
        # rest use only the options left, and the units with the widest spread of cost branch first.
        allowed = [
            [o for o in sorted(c, key=c.__getitem__) if self.delta[i][o] <= self.n_goal]
            for i, c in enumerate(self.costs)
        ]
        if not all(allowed):
            return None, True
        perm = sorted(range(n), key=lambda i: self.costs[i][allowed[i][0]] - self.costs[i][allowed[i][-1]])
        rest_cost, rest_delta, rest_pos = [0] * (n + 1), [0.0] * (n + 1), [0.0] * (n + 1)
        for k in reversed(range(n)):
            i = perm[k]
            rest_cost[k] = rest_cost[k + 1] + self.costs[i][allowed[i][0]]
            rest_delta[k] = rest_delta[k + 1] + min(self.delta[i][o] for o in allowed[i])
            rest_pos[k] = rest_pos[k + 1] + max(0.0, min(self.delta[i][o] for o in allowed[i]))
        best: list[Any] = [below, None]
        nodes = [0]
        chosen: list[str] = [""] * n

        def visit(k: int, cost: int, changes: float, positive: float) -> None:
            nodes[0] += 1
            if nodes[0] > node_limit or cost + rest_cost[k] >= best[0]:
                return
            if self.n_top + changes + rest_delta[k] > self.n_goal or positive + rest_pos[k] > self.n_goal:
                return
            if k == n:
                if tuple(chosen) not in skip:
                    best[0], best[1] = cost, tuple(chosen)
                return
            i = perm[k]
            for o in allowed[i]:
                d = self.delta[i][o]
                chosen[i] = o
                visit(k + 1, cost + self.costs[i][o], changes + d, positive + max(0.0, d))

        visit(0, 0, 0.0, 0.0)
        return best[1], nodes[0] <= node_limit


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


def _walk(ev: Evaluator, model: NoiseModel, bottom: Assignment, goal: float) -> ParetoPoint | None:
    """Buy hull steps by noise removed per byte until the predicted noise meets the goal, then evaluate
    until a point verifies."""
    costs, delta = model.costs, model.delta
    hulls = [_hull(costs[i], delta[i]) for i in range(len(ev.units))]
    position = [0] * len(ev.units)
    current = list(bottom)
    predicted = model.n_top + sum(delta[i][current[i]] for i in range(len(ev.units)))
    while True:
        if predicted <= model.n_goal:
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


def cheaper_moves(units: Sequence[MixedUnit], costs: Sequence[Mapping[str, int]], current: Sequence[str]):
    """The cost-lowering moves from `current`: (singles, exchanges). A single puts one unit on a cheaper
    option, or on a narrower one of the same cost (fewer wide ops); an exchange puts one unit on a cheaper
    option and another on a dearer (or equally dear) one, the two together cheaper."""
    singles: list[Move] = []
    down: list[tuple[int, str, int]] = []
    up: list[tuple[int, str, int]] = []
    for i, u in enumerate(units):
        here = costs[i][current[i]]
        for o in u.options:
            if o == current[i]:
                continue
            if costs[i][o] < here:
                singles.append(((i, o),))
                down.append((i, o, here - costs[i][o]))
            else:
                up.append((i, o, costs[i][o] - here))
                if costs[i][o] == here and dominates(current[i], o):
                    singles.append(((i, o),))
    exchanges: list[Move] = [((i, o), (j, p)) for i, o, s in down for j, p, c in up if j != i and s > c]
    return singles, exchanges


def local_search(ev: Evaluator, model: NoiseModel, start: Assignment, goal: float, budget: int) -> Assignment:
    """From `start` (it meets the goal) take cost-lowering moves that keep the goal (module docstring),
    evaluating at most `budget` new configurations; the assignment it stops at, with what was checked
    there in ev.checked."""
    current = tuple(start)
    ev.evaluate(current, "search")
    first = len(ev.noise)
    while True:
        singles, exchanges = cheaper_moves(ev.units, model.costs, current)
        measured = ev.noise[current]
        ranked = []
        for move in singles + exchanges:
            saved, added = model.change(current, move)
            predicted = measured + added
            fails = predicted > model.n_goal
            ranked.append((fails, predicted if fails else -saved, move))
        ranked.sort(key=lambda r: r[:2])
        accepted = None
        for *_, move in ranked:
            trial = _moved(current, move)
            known = ev.met(trial, goal)
            if known is False or (known is None and len(ev.noise) - first >= budget):
                continue
            if ev.evaluate(trial, "search").sqnr_db >= goal:
                accepted = trial
                break
        if accepted is None:
            evaluated = sum(_moved(current, m) in ev.noise for m in singles + exchanges)
            ev.checked[current] = {
                "singles": len(singles),
                "exchanges": len(exchanges),
                "evaluated": evaluated,
                "complete": evaluated == len(singles) + len(exchanges),
                "additive_rules_out_cheaper": _rules_out_cheaper(ev, model, current, goal),
            }
            return current
        current = accepted


def _failed(ev: Evaluator, goal: float) -> frozenset[Assignment]:
    return frozenset(a for a in ev.noise if not ev.met(a, goal))


def _rules_out_cheaper(ev: Evaluator, model: NoiseModel, current: Assignment, goal: float) -> bool:
    """Whether every assignment cheaper than `current` is either ruled out by the additive model or was
    evaluated and falls below the goal (the whole branch and bound gone through)."""
    guess, exhaustive = model.cheapest_not_ruled_out(model.cost_of(current), _failed(ev, goal))
    return guess is None and exhaustive


def _moved(current: Assignment, move: Move) -> Assignment:
    for i, o in move:
        current = with_option(current, i, o)
    return current
