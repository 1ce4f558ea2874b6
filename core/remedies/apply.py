"""Applying a remedy plan: validate it, run its steps in their fixed order on a copy of the model,
and measure the end-to-end and per-module error before and after on the same images.

Order: outlier smoothing (SmoothQuant, CLE) changes activation ranges, so the statistics are
recalibrated right after it; weight rounding (GPTQ, AdaRound) then snaps the weights to the grid
of those statistics; mixed precision last, because it measures the model the earlier steps left.

The plan runs on a deep copy of the wrapped model (``fix_model``): a cancelled or failed run
leaves the session's model, observers and config exactly as they were, and only a finished run
is swapped in by the caller. The copy costs a second set of weights while the fix runs.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from core.analysis.abtest import ABResult, owner_modules, pair_results
from core.analysis.compare import compare
from core.analysis.observer_table import observer_table
from core.analysis.records import CompareResult, ObserverRecord
from core.config import PTQConfig, check_globs
from core.errors import CancelledError, ConfigError, one_line
from core.io import finite_or_none
from core.ptq import calibrate, convert
from core.remedies import mixed, rounding, smoothing
from core.remedies.plan import RemedyReport, RemedyStep

Progress = Callable[[int, int, str], None]

# The phase of each kind: steps run phase by phase, in plan order within a phase.
PHASES = {"smoothquant": 0, "cle": 0, "gptq": 1, "adaround": 1, "mixed": 2}
DEFAULT_ALPHA = 0.5  # SmoothQuant's migration strength when a step gives none (the paper's default)
MIXED_TARGETS = ("target_sqnr_db", "within_db_of_int16")


@dataclass
class FixOutcome:
    """What apply_plan did: each step's report, the config after it, the search (if any)."""

    reports: list[RemedyReport]
    config: PTQConfig
    mixed: Any = None  # core.remedies.mixed.MixedPrecisionResult of a search step
    recalibrated: bool = False


@dataclass
class FixResult:
    """A finished fix: its reports and the error before and after it on the same images."""

    steps: tuple[RemedyStep, ...]
    reports: list[RemedyReport]
    before: CompareResult
    after: CompareResult
    comparison: ABResult  # A = before the fix, B = after it (the A/B views draw it)
    observers_before: list[ObserverRecord] = field(default_factory=list, repr=False)
    mixed: Any = None
    recalibrated: bool = False
    seconds: float = 0.0

    @property
    def sqnr_before_db(self) -> float:
        """End-to-end SQNR before the fix."""
        return float(self.before.end_to_end.sqnr_db)

    @property
    def sqnr_after_db(self) -> float:
        """End-to-end SQNR after the fix."""
        return float(self.after.end_to_end.sqnr_db)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: the steps' reports and the end-to-end and per-module SQNR before/after."""
        return {
            "steps": [s.to_json() for s in self.steps],
            "reports": [r.to_json() for r in self.reports],
            "images": list(self.after.images),
            "end_to_end": {
                "before_sqnr_db": finite_or_none(self.sqnr_before_db),
                "after_sqnr_db": finite_or_none(self.sqnr_after_db),
                "delta_db": finite_or_none(self.comparison.end_to_end_delta_db),
            },
            "modules": [
                {"name": m.name, "before_sqnr_db": finite_or_none(m.a.sqnr_db), "after_sqnr_db": finite_or_none(m.b.sqnr_db),
                 "delta_db": finite_or_none(m.delta_sqnr_db)}
                for m in self.comparison.modules
            ],
            "mixed": _mixed_json(self.mixed),
            "recalibrated": self.recalibrated,
            "seconds": self.seconds,
        }


# ---------------------------------------------------------------------------------------------
# Validation (before any long work)
# ---------------------------------------------------------------------------------------------


def validate_plan(qmodel, steps: Sequence[RemedyStep]) -> None:
    """ConfigError naming the first step setting or glob that cannot work on this model."""
    if not steps:
        raise ConfigError("the remedy plan is empty: choose at least one remedy")
    names = [name for name, _ in qmodel.wrappers()]
    for step in steps:
        check_globs(step.globs, names, "module", f"{step.kind}:")
        if step.kind == "smoothquant":
            for glob, alpha in smoothquant_alphas(step).items():
                if not 0.0 < alpha <= 1.0:
                    raise ConfigError(f"smoothquant alpha {alpha:g} for {glob!r} must lie in (0, 1]")
        if step.kind == "mixed" and "overrides" in step.params:
            check_globs(list(step.params["overrides"]), names, "module", "mixed precision point:")
        elif step.kind == "mixed":
            given = [k for k in MIXED_TARGETS if step.params.get(k) is not None]
            if len(given) != 1:
                raise ConfigError("mixed precision needs exactly one target: a target SQNR (dB) or 'within X dB of int16'")


def smoothquant_alphas(step: RemedyStep) -> dict[str, float]:
    """glob -> alpha of a SmoothQuant step: params["alphas"] per glob, else params["alpha"] for all."""
    alpha = float(step.params.get("alpha", DEFAULT_ALPHA))
    per_glob = dict(step.params.get("alphas", {}))
    return {glob: float(per_glob.get(glob, alpha)) for glob in step.globs}


def ordered(steps: Sequence[RemedyStep]) -> list[RemedyStep]:
    """The steps in the order they run: smoothing, rounding, mixed (plan order within each)."""
    return sorted(steps, key=lambda s: PHASES[s.kind])


# ---------------------------------------------------------------------------------------------
# Running a plan
# ---------------------------------------------------------------------------------------------


def _phase(progress: Progress | None, name: str) -> Progress | None:
    """progress with every message prefixed by the step's name."""
    if progress is None:
        return None
    return lambda done, total, message="": progress(done, total, f"{name}{' · ' + message if message else ''}")


def apply_plan(
    qmodel,
    config: PTQConfig,
    steps: Sequence[RemedyStep],
    calib_batches: Sequence[Mapping[str, Any]],
    eval_batches: Sequence[Mapping[str, Any]],
    *,
    recalibrate: Callable[..., None],
    progress: Progress | None = None,
    cancel=None,
) -> FixOutcome:
    """Apply the steps IN PLACE in their fixed order; `recalibrate(qmodel)` runs after smoothing."""
    reports: list[RemedyReport] = []
    search = None
    recalibrated = False
    plan = ordered(steps)
    for i, step in enumerate(plan):
        if cancel is not None:
            cancel.raise_if_cancelled(step.kind)
        if not recalibrated and PHASES[step.kind] > 0 and any(PHASES[s.kind] == 0 for s in plan[:i]):
            recalibrate(qmodel)
            recalibrated = True
        sub = _phase(progress, step.kind)
        t0 = time.perf_counter()
        if step.kind == "smoothquant":
            report = smoothing.apply_smoothquant(qmodel, calib_batches, smoothquant_alphas(step), progress=sub, cancel=cancel)
        elif step.kind == "cle":
            report = smoothing.apply_cle(qmodel, step.globs, progress=sub, cancel=cancel)
        elif step.kind in rounding.METHODS:
            report = rounding.apply_weight_rounding(
                qmodel, calib_batches, step.globs, step.kind, progress=sub, cancel=cancel, **dict(step.params)
            )
        else:
            report, config, search = _apply_mixed(qmodel, config, step, eval_batches, sub, cancel)
        report.seconds = report.seconds or time.perf_counter() - t0
        reports.append(report)
    if not recalibrated and plan and PHASES[plan[-1].kind] == 0:
        recalibrate(qmodel)  # smoothing only: the statistics must follow the new activations
        recalibrated = True
    return FixOutcome(reports=reports, config=config, mixed=search, recalibrated=recalibrated)


def _apply_mixed(qmodel, config, step: RemedyStep, batches, progress, cancel):
    """Search (or take the given point) and apply it: (report, new config, search result or None)."""
    params = dict(step.params)
    search = None
    if "overrides" in params:
        point = mixed.ParetoPoint(
            overrides=dict(params["overrides"]),
            cost_bytes=int(params.get("cost_bytes", 0)),
            wide_ops=int(params.get("wide_ops", 0)),
            sqnr_db=float(params.get("sqnr_db", float("nan"))),
            origin=str(params.get("origin", "picked")),
        )
    else:
        search = mixed.search_mixed_precision(
            qmodel, config, batches,
            target_sqnr_db=params.get("target_sqnr_db"), within_db_of_int16=params.get("within_db_of_int16"),
            progress=progress, cancel=cancel,
        )
        point = search.chosen
        if point is None:
            why = one_line(search.reason) if search.reason else f"no configuration tried reaches the target {search.target}"
            raise ConfigError(f"mixed precision: {why}; lower the target")
    new_config = mixed.apply_mixed_point(qmodel, config, point)
    modules = [name for name, _ in qmodel.wrappers() if any(PTQConfig.matches(g, name) for g in point.overrides)]
    summary = {"parameters": [], "point": asdict(point), "search": _mixed_json(search)}
    return RemedyReport(step=step, modules=modules, summary=summary), new_config, search


def _mixed_json(search) -> dict[str, Any] | None:
    """A MixedPrecisionResult as plain values (None stays None)."""
    return None if search is None else asdict(search)


def recalibrator(batches: Sequence[Mapping[str, Any]], cancel=None) -> Callable[..., None]:
    """recalibrate(qmodel) for apply_plan: fresh statistics on these batches, then QUANT."""

    def recalibrate(qmodel) -> None:
        res = calibrate(qmodel, batches, cancel=cancel, reset=True, total=len(batches))
        if res.cancelled:
            raise CancelledError("the fix was cancelled while recalibrating; the session is unchanged")
        convert(qmodel)

    return recalibrate


def fix_model(
    qmodel,
    config: PTQConfig,
    steps: Sequence[RemedyStep],
    calib_batches: Sequence[Mapping[str, Any]],
    eval_batches: Sequence[Mapping[str, Any]],
    *,
    progress: Progress | None = None,
    cancel=None,
) -> tuple[Any, FixResult, PTQConfig]:
    """Apply the plan to a copy of the calibrated model: (fixed copy, FixResult, its config).

    `qmodel` itself is only read (its error is measured before the fix), so a cancel or an error
    anywhere leaves it exactly as it was."""
    t0 = time.perf_counter()
    steps = tuple(steps)
    validate_plan(qmodel, steps)
    n = len(eval_batches)
    before = compare(qmodel, eval_batches, progress=_phase(progress, "before"), cancel=cancel, total=n)
    records_before = observer_table(qmodel)
    fixed = copy.deepcopy(qmodel)
    outcome = apply_plan(
        fixed, config, steps, calib_batches, eval_batches,
        recalibrate=recalibrator(calib_batches, cancel), progress=progress, cancel=cancel,
    )
    after = compare(fixed, eval_batches, progress=_phase(progress, "after"), cancel=cancel, total=n)
    names = owner_modules(qmodel)
    result = FixResult(
        steps=steps,
        reports=outcome.reports,
        before=before,
        after=after,
        comparison=pair_results(config, outcome.config, before, after, names),
        observers_before=records_before,
        mixed=outcome.mixed,
        recalibrated=outcome.recalibrated,
        seconds=time.perf_counter() - t0,
    )
    return fixed, result, outcome.config


def changed_parameters(reports: Sequence[RemedyReport]) -> list[str]:
    """Every float parameter the reports changed (summary["parameters"]), in first-seen order."""
    return list(dict.fromkeys(p for r in reports for p in r.summary.get("parameters", [])))
