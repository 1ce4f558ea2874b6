"""A/B configurations: two PTQ configs of one session, calibrated side by side and compared.

Config A is the session's own config and calibrated wrapped model. Config B gets its own
wrapped model, prepared from the same float model (``core.ptq.prepare`` deep-copies it) and
calibrated on the same images A was calibrated on. Both are then evaluated on the same
evaluation images with ``core.analysis.compare.compare`` and their per-module errors are paired.

Memory: B is a second full copy of the model's weights plus its observers (tiny: a few MB;
e2b: roughly another copy of the float model, ~0.7 GB in float32, plus histograms): call
``ABComparison.release()`` when the comparison is done.

Turning a comparison into a config (``ABResult.winning_overrides``) is explained in
``core.analysis.ab_overrides``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core.analysis.ab_overrides import (
    DEFAULT_MARGIN_DB,
    derive_overrides,
    describe_config,
    describe_resolution,
    global_differences,
    override_text,
    resolved_specs,
    takeable_winners,
    with_overrides,
)
from core.analysis.compare import compare
from core.analysis.records import CompareResult, ModuleError
from core.config import ModuleOverride, PTQConfig
from core.data.device import batches_to_device
from core.errors import CancelledError, ConfigError, NoImagesError, NotCalibratedError
from core.io import finite_or_none
from core.ptq import calibrate, convert, prepare

Progress = Callable[[int, int, str], None]

TIE_DB = 0.1  # |delta| at or below this is reported as a tie

__all__ = [
    "ABState",
    "ABModule",
    "ABResult",
    "ABComparison",
    "ab_summary_lines",
    "resolved_specs",
    "describe_config",
    "owner_modules",
    "pair_results",
    "DEFAULT_MARGIN_DB",
    "TIE_DB",
]

# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass
class ABState:
    """Config B's calibrated wrapped model, built from a session's float model and images."""

    config: PTQConfig
    qmodel: Any  # core.wrappers.vision.QuantVisionModel, in QUANT mode
    model_spec: str
    image_ids: list[str]
    images_done: int
    seconds: float
    same_images_as_a: bool  # calibrated on exactly the images A was calibrated on

    def release(self) -> None:
        """Drop B's wrapped model (its weights are a second copy of the model)."""
        self.qmodel = None


@dataclass
class ABModule:
    """One module's error under A and B. delta_sqnr_db = B - A (positive: B is better)."""

    name: str
    kind: str
    a: ModuleError
    b: ModuleError
    delta_sqnr_db: float
    winner: str  # "A" | "B" | "tie"
    config_differs: bool  # the module's own resolved specs differ between A and B
    spec_a: str = ""  # short description of A's resolved specs for this module
    spec_b: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (no samples)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "a": self.a.to_dict(),
            "b": self.b.to_dict(),
            "delta_sqnr_db": finite_or_none(self.delta_sqnr_db),
            "winner": self.winner,
            "config_differs": self.config_differs,
            "spec_a": self.spec_a,
            "spec_b": self.spec_b,
        }


@dataclass
class ABResult:
    """A and B evaluated on the same images, per module and end to end."""

    config_a: PTQConfig
    config_b: PTQConfig
    modules: list[ABModule]
    end_to_end_a: ModuleError
    end_to_end_b: ModuleError
    images: list[str]
    # Every module that owns observers (root "" included), in forward order: the names
    # overrides are resolved against (also what config_export needs to expand globs).
    module_names: list[str] = field(default_factory=list)
    global_differences: list[str] = field(default_factory=list)
    result_a: CompareResult | None = field(default=None, repr=False)
    result_b: CompareResult | None = field(default=None, repr=False)
    seconds: float = 0.0

    @property
    def end_to_end_delta_db(self) -> float:
        """End-to-end SQNR of B minus A (positive: B is better)."""
        return _delta(self.end_to_end_a.sqnr_db, self.end_to_end_b.sqnr_db)

    @property
    def end_to_end_winner(self) -> str:
        """"A", "B" or "tie" on end-to-end SQNR."""
        return _winner(self.end_to_end_delta_db, TIE_DB)

    def module(self, name: str) -> ABModule:
        """The paired errors of one module (KeyError if it was not compared)."""
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(name)

    def winning_modules(self, margin_db: float = DEFAULT_MARGIN_DB) -> list[str]:
        """Modules whose own config differs and where B beats A by more than margin_db."""
        return [m.name for m in self.modules if m.config_differs and _beats(m.delta_sqnr_db, margin_db)]

    def untakeable_modules(self, margin_db: float = DEFAULT_MARGIN_DB) -> list[str]:
        """Winning modules whose B settings cannot be written on top of A (see takeable_winners)."""
        winners = self.winning_modules(margin_db)
        taken = takeable_winners(self.config_a, self.config_b, self.module_names, set(winners))
        return [n for n in winners if n not in taken]

    def winning_overrides(self, margin_db: float = DEFAULT_MARGIN_DB) -> dict[str, ModuleOverride]:
        """B's settings where B wins by more than margin_db, as override globs on top of config A.

        Values are ``core.config.ModuleOverride`` (what ``PTQConfig.overrides`` holds; keep-float is
        ``ModuleOverride(keep_float=True)``, JSON ``"float"``). See the module docstring for how
        the globs are derived.
        """
        winners = set(self.winning_modules(margin_db))
        return derive_overrides(self.config_a, self.config_b, self.module_names, winners)

    def merged_config(self, margin_db: float = DEFAULT_MARGIN_DB) -> PTQConfig:
        """Config A with the winning overrides appended (later globs win)."""
        return with_overrides(self.config_a, self.winning_overrides(margin_db))

    def to_dict(self, margin_db: float = DEFAULT_MARGIN_DB) -> dict[str, Any]:
        """JSON-ready dict (CLI --json): configs, errors, winners and the suggested overrides."""
        return {
            "config_a": self.config_a.to_dict(),
            "config_b": self.config_b.to_dict(),
            "images": list(self.images),
            "end_to_end": {
                "a": self.end_to_end_a.to_dict(),
                "b": self.end_to_end_b.to_dict(),
                "delta_sqnr_db": finite_or_none(self.end_to_end_delta_db),
                "winner": self.end_to_end_winner,
            },
            "modules": [m.to_dict() for m in self.modules],
            "margin_db": margin_db,
            "winning_overrides": {g: o.to_json() for g, o in self.winning_overrides(margin_db).items()},
            "global_differences": list(self.global_differences),
        }


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------


def _calibration_entries(session) -> tuple[list, bool]:
    """The images A was calibrated on ("used") when there are any, else every usable image."""
    usable = list(session.usable_images())
    used = [e for e in usable if e.status == "used"]
    if session.state == "calibrated" and used:
        return used, True
    return usable, session.state != "calibrated"


class ABComparison:
    """Config A (the session) and config B side by side: calibrate B, compare, merge.

    The one A/B API of both front ends::

        ab = ABComparison(session, config_b)
        ab.calibrate_b(progress, cancel)  # B on A's images; the session is never touched
        result = ab.compare(images, progress, cancel)  # an ABResult
        ab.release()  # B's model copy is a second copy of the weights

    Cancelling either step raises core.errors.CancelledError and keeps nothing of that step.
    """

    def __init__(self, session, config_b: PTQConfig | None = None) -> None:
        self.session = session
        self.config_b = config_b
        self.state: ABState | None = None
        self.result: ABResult | None = None

    @property
    def config_a(self) -> PTQConfig:
        """The session's current config."""
        return self.session.config

    def calibrate_b(
        self, config_b: PTQConfig | None = None, progress: Progress | None = None, cancel=None, batch_size: int = 1
    ) -> ABState:
        """Prepare config B (the given one, or the one held) on the session's float model,
        calibrate it on A's images and freeze it.

        The session (config A, its wrapped model and statistics) is never touched. An earlier
        B is released first, also when this run fails. Cancelling raises CancelledError and
        drops B (a half-calibrated B would make an unfair comparison).
        """
        config_b = config_b or self.config_b
        if config_b is None:
            raise ConfigError("no config B given: pass the second PTQConfig to compare against")
        if not isinstance(config_b, PTQConfig):
            raise ConfigError(f"config B must be a PTQConfig, got {type(config_b).__name__}")
        # The previous B goes first: three model copies at once would not fit for e2b.
        self.release()
        self.config_b, self.result = config_b, None
        session = self.session
        # A mistyped glob would otherwise calibrate B for minutes and report a tie.
        config_b.check_globs(owner_modules(session.qmodel), "config B override")
        entries, same = _calibration_entries(session)
        if not entries:
            raise NoImagesError(None, "the session has no usable image to calibrate config B on")
        t0 = time.perf_counter()
        batch_size = max(1, int(batch_size))
        qmodel = prepare(session.model, config_b)  # deep copy: session.model stays A's source
        qmodel.to(session.device)
        qmodel.eval()
        try:
            res = calibrate(
                qmodel,
                batches_to_device(session.batches(entries, batch_size), session.device),
                progress=progress,
                cancel=cancel,
                reset=True,
                total=(len(entries) + batch_size - 1) // batch_size,
            )
            if cancel is not None:  # calibrate stops between batches; B must have seen every image
                cancel.raise_if_cancelled()
        except CancelledError:
            raise CancelledError(
                "calibration of config B cancelled by the user; config A is unchanged, run it again"
            ) from None
        convert(qmodel)
        self.state = ABState(
            config=config_b,
            qmodel=qmodel,
            model_spec=session.model_spec,
            image_ids=[e.image_id or e.path for e in entries[: res.images_done]],
            images_done=res.images_done,
            seconds=time.perf_counter() - t0,
            same_images_as_a=same,
        )
        return self.state

    def compare(
        self, images=None, progress: Progress | None = None, cancel=None, tie_db: float = TIE_DB
    ) -> ABResult:
        """Evaluate A (the session) and B on the same images (default: the session's) and pair
        their per-module errors. Raises CancelledError when cancelled; nothing is kept then."""
        session, state = self.session, self.state
        if state is None:
            raise NotCalibratedError("config B is not calibrated yet: run calibrate_b first")
        if session.state != "calibrated":
            raise NotCalibratedError("config A is not calibrated yet: calibrate the session before comparing")
        if state.qmodel is None:
            raise NotCalibratedError("config B was released: run calibrate_b again")
        if state.model_spec != session.model_spec:
            raise ConfigError(
                f"config B was built from model {state.model_spec!r}, the session now holds "
                f"{session.model_spec!r}: run calibrate_b again"
            )
        entries = session.entries_for(images)
        n = len(entries)
        t0 = time.perf_counter()

        def run(qmodel, offset: int, label: str) -> CompareResult:
            # One progress bar for both passes: A counts 0..n, B n..2n.
            def shifted(done: int, _total: int, msg: str) -> None:
                progress(offset + done, 2 * n, f"config {label}: {msg}")

            batches = batches_to_device(session.batches(entries), session.device)
            return compare(qmodel, batches, progress=shifted if progress else None, cancel=cancel, total=n)

        res_a = run(session.qmodel, 0, "A")
        res_b = run(state.qmodel, n, "B")
        self.result = _pair(session.config, state.config, res_a, res_b, owner_modules(session.qmodel), tie_db)
        self.result.seconds = time.perf_counter() - t0
        return self.result

    def summary_lines(self, margin_db: float = DEFAULT_MARGIN_DB, top: int = 10) -> list[str]:
        """One-screen summary of the last comparison."""
        if self.result is None:
            return ["no A/B comparison yet"]
        return ab_summary_lines(self.result, margin_db=margin_db, top=top)

    def release(self) -> None:
        """Free config B's model copy."""
        if self.state is not None:
            self.state.release()
        self.state = None


def _pair(
    config_a: PTQConfig,
    config_b: PTQConfig,
    res_a: CompareResult,
    res_b: CompareResult,
    names: list[str],
    tie_db: float,
) -> ABResult:
    """A's and B's per-module errors side by side, each module judged on its own resolved specs."""
    by_b = {m.name: m for m in res_b.modules}
    modules: list[ABModule] = []
    for ma in res_a.modules:
        mb = by_b.get(ma.name)
        if mb is None:
            continue
        ra, rb = resolved_specs(config_a, ma.name), resolved_specs(config_b, ma.name)
        delta = _delta(ma.sqnr_db, mb.sqnr_db)
        modules.append(
            ABModule(
                name=ma.name,
                kind=ma.kind,
                a=ma,
                b=mb,
                delta_sqnr_db=delta,
                winner=_winner(delta, tie_db),
                config_differs=ra != rb,
                spec_a=describe_resolution(ra),
                spec_b=describe_resolution(rb),
            )
        )
    return ABResult(
        config_a=config_a,
        config_b=config_b,
        modules=modules,
        end_to_end_a=res_a.end_to_end,
        end_to_end_b=res_b.end_to_end,
        images=list(res_a.images),
        module_names=names,
        global_differences=global_differences(config_a, config_b),
        result_a=res_a,
        result_b=res_b,
    )


def pair_results(
    config_a: PTQConfig, config_b: PTQConfig, res_a: CompareResult, res_b: CompareResult, names: list[str], tie_db: float = TIE_DB
) -> ABResult:
    """Two evaluations on the same images paired as A and B (e.g. before and after a remedy)."""
    return _pair(config_a, config_b, res_a, res_b, names, tie_db)


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------


def ab_summary_lines(result: ABResult, margin_db: float = DEFAULT_MARGIN_DB, top: int = 10) -> list[str]:
    """A one-screen text summary for the CLI and the GUI."""
    a, b = result.end_to_end_a, result.end_to_end_b
    counts = {"A": 0, "B": 0, "tie": 0}
    for m in result.modules:
        counts[m.winner] += 1
    lines = [
        f"A: {describe_config(result.config_a)}",
        f"B: {describe_config(result.config_b)}",
        f"images: {len(result.images)}",
        f"end to end SQNR: A {_db(a.sqnr_db)}  B {_db(b.sqnr_db)}  B-A {_signed_db(result.end_to_end_delta_db)}"
        f"  -> {result.end_to_end_winner}",
        f"end to end PEIR: A {a.peir:.4f}  B {b.peir:.4f}",
        f"modules: B better {counts['B']}, A better {counts['A']}, tie {counts['tie']} (tie: |B-A| <= {TIE_DB} dB)",
    ]
    ranked = sorted(result.modules, key=lambda m: -abs(m.delta_sqnr_db) if math.isfinite(m.delta_sqnr_db) else -1e9)
    if ranked:
        lines.append(f"largest differences (top {min(top, len(ranked))}):")
        width = max(len(m.name) for m in ranked[:top])
        for m in ranked[:top]:
            mark = "*" if m.config_differs else " "
            lines.append(
                f" {mark} {m.name:<{width}}  A {_db(m.a.sqnr_db)}  B {_db(m.b.sqnr_db)}  B-A {_signed_db(m.delta_sqnr_db)}  {m.winner}"
            )
        lines.append("   (* = the module's own config differs between A and B)")
    overrides = result.winning_overrides(margin_db)
    if overrides:
        lines.append(f"take from B (wins by > {margin_db:g} dB), as overrides on top of A:")
        for glob, o in overrides.items():
            lines.append(f"   {glob}: {override_text(o)}")
    else:
        lines.append(f"take from B: nothing (no module whose own config differs wins by > {margin_db:g} dB)")
    blocked = result.untakeable_modules(margin_db)
    if blocked:
        lines.append(
            f"not taken (B wins, but keep-float rules block writing it on top of A): {', '.join(blocked[:5])}"
            + (" ..." if len(blocked) > 5 else "")
        )
    for g in result.global_differences:
        lines.append(f"note: {g} differs between A and B and cannot be a per-module override; A's is kept")
    return lines


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def owner_modules(qmodel) -> list[str]:
    """Names of the modules that own observers, in forward order (root "" included); what override globs match."""
    seen: dict[str, None] = {}
    for obs in qmodel.observers():
        seen.setdefault(obs.module_name, None)
    return list(seen)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _delta(a: float, b: float) -> float:
    a, b = float(a), float(b)
    if math.isinf(a) and math.isinf(b) and (a > 0) == (b > 0):
        return 0.0
    d = b - a
    return 0.0 if math.isnan(d) else d


def _winner(delta: float, tie_db: float) -> str:
    if delta > tie_db:
        return "B"
    if delta < -tie_db:
        return "A"
    return "tie"


def _beats(delta: float, margin_db: float) -> bool:
    return delta > margin_db


def _db(x: float) -> str:
    x = float(x)
    return f"{x:6.2f} dB" if math.isfinite(x) else ("   inf dB" if x > 0 else "  -inf dB")


def _signed_db(x: float) -> str:
    x = float(x)
    return f"{x:+6.2f} dB" if math.isfinite(x) else ("+inf dB" if x > 0 else "-inf dB")
