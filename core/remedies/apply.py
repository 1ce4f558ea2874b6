"""Applying a remedy plan: validate it, run its steps in their fixed order on a copy of the model,
and measure the error before and after on the same images with the one analysis pass
(``core.analysis.analysis_pass``: per-module errors, the first divergence and the patch-error maps
at once, per layer as the Errors tab's default), so the before/after views need no second run.

Order: outlier smoothing (SmoothQuant, CLE) changes activation ranges, so the statistics are
recalibrated right after it; weight rounding (GPTQ, AdaRound) then snaps the weights to the grid
of those statistics; mixed precision last, because it measures the model the earlier steps left.

The plan runs on a deep copy of the wrapped model (``fix_model``): a cancelled or failed run
leaves the session's model, observers and config exactly as they were, and only a finished run
is swapped in by the caller. The copy costs a second set of weights while the fix runs.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from core.analysis.abtest import ABResult, owner_modules, pair_results
from core.analysis.analysis_pass import AnalysisResult, analyse
from core.analysis.divergence import DivergenceResult
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
DIVERGENCE_UNIT = "layer"  # the unit the before/after divergence is located at (the Errors tab's default)


@dataclass
class FixOutcome:
    """What apply_plan did: each step's report, the config after it, the search (if any)."""

    reports: list[RemedyReport]
    config: PTQConfig
    mixed: Any = None  # core.remedies.mixed.MixedPrecisionResult of a search step
    recalibrated: bool = False


@dataclass
class DivergenceShift:
    """The first divergence before a fix, and what became of it after: the unit located before and its
    local SQNR (the error it adds alone, on float input) before and after, and the unit located after."""

    unit: str  # "layer" or "module"
    before: str | None  # the unit located before the fix (None: the locator found none)
    before_local_db: float
    after_local_db: float  # the same unit's local SQNR after the fix
    after: str | None  # the unit located after the fix
    after_after_local_db: float  # that unit's local SQNR after the fix

    @classmethod
    def of(cls, before: DivergenceResult, after: DivergenceResult) -> DivergenceShift:
        """The shift between two locator results on the same images."""
        first = before.located.name if before.located is not None else None
        now = after.located.name if after.located is not None else None
        locals_after = {e.name: e.local_sqnr_db for e in after.entries}
        nan = float("nan")
        return cls(
            unit=before.unit,
            before=first,
            before_local_db=before.located.local_sqnr_db if before.located is not None else nan,
            after_local_db=locals_after.get(first, nan) if first is not None else nan,
            after=now,
            after_after_local_db=after.located.local_sqnr_db if after.located is not None else nan,
        )

    def lines(self) -> tuple[str, str]:
        """(before, after) in words: the located unit and its local SQNR, then what the locator says now."""
        if self.before is None:
            first = "Before the fix: first divergence none (no unit loses SQNR)."
            same = ""
        else:
            first = f"Before the fix: first divergence at {self.before} (local SQNR {_db_text(self.before_local_db)})."
            gain = self.after_local_db - self.before_local_db
            change = f", {gain:+.2f} dB" if math.isfinite(gain) else ""
            same = f"{self.before} now {_db_text(self.after_local_db)}{change}; "
        if self.after is None:
            where = "none (no unit loses SQNR)"
        elif self.after == self.before:
            where = f"still at {self.after}"
        else:
            where = f"now at {self.after} (local SQNR {_db_text(self.after_after_local_db)})"
        return first, f"After: {same}the first divergence is {where}."

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the located units and local SQNRs (inf/nan as null)."""
        return {
            "unit": self.unit,
            "before": {"located": self.before, "local_sqnr_db": finite_or_none(self.before_local_db)},
            "after": {
                "same_unit_local_sqnr_db": finite_or_none(self.after_local_db),
                "located": self.after,
                "local_sqnr_db": finite_or_none(self.after_after_local_db),
            },
        }


def _db_text(x: float) -> str:
    """An SQNR for a sentence: inf as "exact", nan as "not measured"."""
    if math.isnan(x):
        return "not measured"
    return "exact (no error)" if math.isinf(x) and x > 0 else f"{x:.2f} dB"


@dataclass
class FixResult:
    """A finished fix: its reports and the error before and after it on the same images."""

    steps: tuple[RemedyStep, ...]
    reports: list[RemedyReport]
    before: CompareResult  # = before_analysis.compare
    after: CompareResult  # = after_analysis.compare
    comparison: ABResult  # A = before the fix, B = after it (the A/B views draw it)
    # The whole analyses (first divergence, per-image patch-error maps): held in memory for the
    # views, never saved with the session (its remedies file keeps only the reports).
    before_analysis: AnalysisResult | None = field(default=None, repr=False)
    after_analysis: AnalysisResult | None = field(default=None, repr=False)
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

    @property
    def divergence(self) -> DivergenceShift | None:
        """The first divergence before -> after (None without the analyses)."""
        if self.before_analysis is None or self.after_analysis is None:
            return None
        return DivergenceShift.of(self.before_analysis.divergence, self.after_analysis.divergence)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: the steps' reports, the end-to-end and per-module SQNR and the first divergence before/after."""
        shift = self.divergence
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
            "divergence": None if shift is None else shift.to_dict(),
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
    before = _analyse(qmodel, eval_batches, _phase(progress, "before"), cancel)
    records_before = observer_table(qmodel)
    fixed = copy.deepcopy(qmodel)
    outcome = apply_plan(
        fixed, config, steps, calib_batches, eval_batches,
        recalibrate=recalibrator(calib_batches, cancel), progress=progress, cancel=cancel,
    )
    after = _analyse(fixed, eval_batches, _phase(progress, "after"), cancel)
    names = owner_modules(qmodel)
    result = FixResult(
        steps=steps,
        reports=outcome.reports,
        before=before.compare,
        after=after.compare,
        comparison=pair_results(config, outcome.config, before.compare, after.compare, names),
        before_analysis=before,
        after_analysis=after,
        observers_before=records_before,
        mixed=outcome.mixed,
        recalibrated=outcome.recalibrated,
        seconds=time.perf_counter() - t0,
    )
    return fixed, result, outcome.config


def _analyse(qmodel, batches: Sequence[Mapping[str, Any]], progress: Progress | None, cancel) -> AnalysisResult:
    """One analysis pass (errors, divergence, maps) over the evaluation batches, per layer."""
    return analyse(qmodel, batches, unit=DIVERGENCE_UNIT, progress=progress, cancel=cancel, total=len(batches))


def changed_parameters(reports: Sequence[RemedyReport]) -> list[str]:
    """Every float parameter the reports changed (summary["parameters"]), in first-seen order."""
    return list(dict.fromkeys(p for r in reports for p in r.summary.get("parameters", [])))
