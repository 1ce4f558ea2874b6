"""A/B configurations: two PTQ configs of one session, calibrated side by side and compared.

Config A is the session's own config and calibrated wrapped model. Config B gets its own
wrapped model, prepared from the same float model (``core.ptq.prepare`` deep-copies it) and
calibrated on the same images A was calibrated on. Both are then evaluated on the same
evaluation images with ``core.analysis.compare.compare`` and their per-module errors are paired.

Memory: B is a second full copy of the model's weights plus its observers (tiny: a few MB;
e2b: roughly another copy of the float model, ~0.7 GB in float32, plus histograms). Drop the
``ABState`` (or call ``ABState.release()``) when the comparison is done.

Turning a comparison into a config (``ABResult.winning_overrides``)
-------------------------------------------------------------------
Only modules whose *own* resolved specs differ between A and B can be credited to the
config change; a module downstream of a change also gets better or worse, but the cause is
upstream. For every module that owns observers, its resolved specs are
``(config.spec_for(name, "activation"), config.spec_for(name, "weight"))`` under A and under
B (``spec_for`` applies the defaults and the override globs in order, later globs winning;
``None`` means kept float). A module "wins for B" when those specs differ and B's SQNR at
the module's output beats A's by more than ``margin_db``. The target config gives winning
modules B's specs and every other module A's.

That target is written as override globs appended to A's overrides, greedily and verified
after each step (a glob only goes in when every module whose resolution it changes reaches
its target):

1. B's own override globs, in B's order (so ``"encoder.layers.*"`` comes back as written
   when every module it changes wins);
2. per-kind globs across layers (``encoder.layers.*.mlp.down_proj``) when all layers agree;
3. exact module names, parents before children (an exact name also matches the module's
   children, so children that need something else follow with their own entry).

Two rules of PTQConfig limit what can be taken: a keep-float glob wins over every other glob,
and a glob reaches the module's children. So a module A keeps float, or one B keeps float
while a child of it stays quantized, cannot be taken (``ABResult.untakeable_modules``).

Global settings (observer kind, percentile, EMA momentum) cannot be overrides: they are
listed in ``ABResult.global_differences`` and ``merged_config()`` keeps A's.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from core.analysis.compare import compare
from core.analysis.records import CompareResult, ModuleError
from core.config import FLOAT, ModuleOverride, PTQConfig, QuantSpec
from core.data.device import batches_to_device
from core.errors import CancelledError, ConfigError, NoImagesError, NotCalibratedError

Progress = Callable[[int, int, str], None]

DEFAULT_MARGIN_DB = 0.5
TIE_DB = 0.1  # |delta| at or below this is reported as a tie

__all__ = [
    "ABState",
    "ABModule",
    "ABResult",
    "ABComparison",
    "calibrate_b",
    "compare_ab",
    "ab_summary_lines",
    "resolved_specs",
    "describe_config",
    "owner_modules",
    "DEFAULT_MARGIN_DB",
    "TIE_DB",
]

Resolution = tuple[QuantSpec | None, QuantSpec | None]  # (activation, weight); None = float


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
            "delta_sqnr_db": _json_float(self.delta_sqnr_db),
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
        """Winning modules whose B settings cannot be written on top of A (see _takeable)."""
        winners = self.winning_modules(margin_db)
        taken = _takeable(self.config_a, self.config_b, self.module_names, set(winners))
        return [n for n in winners if n not in taken]

    def winning_overrides(self, margin_db: float = DEFAULT_MARGIN_DB) -> dict[str, ModuleOverride]:
        """B's settings where B wins by more than margin_db, as override globs on top of config A.

        Values are ``core.config.ModuleOverride`` (what ``PTQConfig.overrides`` holds; keep-float is
        ``ModuleOverride(keep_float=True)``, JSON ``"float"``). See the module docstring for how
        the globs are derived.
        """
        winners = set(self.winning_modules(margin_db))
        return _derive_overrides(self.config_a, self.config_b, self.module_names, winners)

    def merged_config(self, margin_db: float = DEFAULT_MARGIN_DB) -> PTQConfig:
        """Config A with the winning overrides appended (later globs win)."""
        return _apply(self.config_a, self.winning_overrides(margin_db))

    def to_dict(self, margin_db: float = DEFAULT_MARGIN_DB) -> dict[str, Any]:
        """JSON-ready dict (CLI --json): configs, errors, winners and the suggested overrides."""
        return {
            "config_a": self.config_a.to_dict(),
            "config_b": self.config_b.to_dict(),
            "images": list(self.images),
            "end_to_end": {
                "a": self.end_to_end_a.to_dict(),
                "b": self.end_to_end_b.to_dict(),
                "delta_sqnr_db": _json_float(self.end_to_end_delta_db),
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


def calibrate_b(
    session,
    config_b: PTQConfig,
    progress: Progress | None = None,
    cancel=None,
    batch_size: int = 1,
) -> ABState:
    """Prepare config B on the session's float model, calibrate it on A's images, freeze it.

    The session (config A, its wrapped model and statistics) is never touched. Cancelling
    raises core.errors.CancelledError and drops B (a half-calibrated B would make an unfair
    comparison).
    """
    from core.ptq import calibrate, convert, prepare

    if not isinstance(config_b, PTQConfig):
        raise ConfigError(f"config B must be a PTQConfig, got {type(config_b).__name__}")
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
    total = (len(entries) + batch_size - 1) // batch_size
    res = calibrate(
        qmodel,
        batches_to_device(session.batches(entries, batch_size), session.device),
        progress=progress,
        cancel=cancel,
        reset=True,
        total=total,
    )
    if res.cancelled or res.batches_done == 0:
        del qmodel
        raise CancelledError("calibration of config B cancelled by the user; config A is unchanged, run it again")
    convert(qmodel)
    return ABState(
        config=config_b,
        qmodel=qmodel,
        model_spec=session.model_spec,
        image_ids=[e.image_id or e.path for e in entries[: res.images_done]],
        images_done=res.images_done,
        seconds=time.perf_counter() - t0,
        same_images_as_a=same,
    )


def compare_ab(
    session,
    ab_state: ABState,
    images=None,
    progress: Progress | None = None,
    cancel=None,
    tie_db: float = TIE_DB,
) -> ABResult:
    """Evaluate A (the session) and B on the same images (default: the session's) and pair
    their per-module errors. Raises CancelledError when cancelled; nothing is kept then."""
    if session.state != "calibrated":
        raise NotCalibratedError("config A is not calibrated yet: calibrate the session before comparing")
    if ab_state.qmodel is None:
        raise NotCalibratedError("config B was released: run calibrate_b again")
    if ab_state.model_spec != session.model_spec:
        raise ConfigError(
            f"config B was built from model {ab_state.model_spec!r}, the session now holds "
            f"{session.model_spec!r}: run calibrate_b again"
        )
    entries = session.entries_for(images)
    n = len(entries)
    t0 = time.perf_counter()

    def shifted(offset: int, label: str) -> Progress | None:
        if progress is None:
            return None
        return lambda done, total, msg: progress(offset + done, 2 * n, f"config {label}: {msg}")

    res_a = compare(
        session.qmodel,
        batches_to_device(session.batches(entries), session.device),
        progress=shifted(0, "A"),
        cancel=cancel,
        total=n,
    )
    res_b = compare(
        ab_state.qmodel,
        batches_to_device(session.batches(entries), session.device),
        progress=shifted(n, "B"),
        cancel=cancel,
        total=n,
    )
    config_a, config_b = session.config, ab_state.config
    names = owner_modules(session.qmodel)
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
                spec_a=_describe_resolution(ra),
                spec_b=_describe_resolution(rb),
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
        global_differences=_global_differences(config_a, config_b),
        result_a=res_a,
        result_b=res_b,
        seconds=time.perf_counter() - t0,
    )


class ABComparison:
    """Keeps config A (the session) and config B side by side: calibrate B, compare, merge."""

    def __init__(self, session, config_b: PTQConfig | None = None) -> None:
        self.session = session
        self.config_b = config_b
        self.state: ABState | None = None
        self.result: ABResult | None = None

    @property
    def config_a(self) -> PTQConfig:
        """The session's current config."""
        return self.session.config

    def calibrate_b(self, config_b: PTQConfig | None = None, progress: Progress | None = None, cancel=None) -> ABState:
        """Calibrate config B (the given one, or the one this comparison holds); see calibrate_b().
        An earlier B is released first, also when this run is cancelled."""
        config_b = config_b or self.config_b
        if config_b is None:
            raise ConfigError("no config B given: pass the second PTQConfig to compare against")
        # The previous B goes first: three model copies at once would not fit for e2b.
        self.release()
        self.config_b, self.result = config_b, None
        self.state = calibrate_b(self.session, config_b, progress=progress, cancel=cancel)
        return self.state

    def compare(self, images=None, progress: Progress | None = None, cancel=None) -> ABResult:
        """Evaluate A and B on the same images; see compare_ab()."""
        if self.state is None:
            raise NotCalibratedError("config B is not calibrated yet: run calibrate_b first")
        self.result = compare_ab(self.session, self.state, images=images, progress=progress, cancel=cancel)
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


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------


def describe_config(config: PTQConfig) -> str:
    """One line: defaults, observer and overrides."""
    act, wgt = config.activation, config.weight
    obs = config.observer
    if obs == "percentile":
        obs += f" {config.percentile:g}"
    elif obs == "ema":
        obs += f" m={config.ema_momentum:g}"
    parts = [f"act {_spec_text(act)}", f"weight {_spec_text(wgt)}", f"observer {obs}"]
    if config.overrides:
        ov = ", ".join(f"{g}={_override_text(o)}" for g, o in config.overrides.items())
        parts.append(f"overrides {{{ov}}}")
    return "; ".join(parts)


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
            lines.append(f"   {glob}: {_override_text(o)}")
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
# Override derivation
# ---------------------------------------------------------------------------------------------


def resolved_specs(config: PTQConfig, module_name: str) -> Resolution:
    """(activation spec, weight spec) of a module under `config`; None means kept float."""
    return config.spec_for(module_name, "activation"), config.spec_for(module_name, "weight")


def owner_modules(qmodel) -> list[str]:
    """Names of the modules that own observers, in forward order (root "" included); what override globs match."""
    seen: dict[str, None] = {}
    for obs in qmodel.observers():
        seen.setdefault(obs.module_name, None)
    return list(seen)


def _as_override(res: Resolution) -> ModuleOverride:
    act, wgt = res
    if act is None and wgt is None:
        return ModuleOverride(keep_float=True)
    if act is None or wgt is None:  # spec_for never splits these; guard anyway
        raise ConfigError("a module cannot keep only its activations or only its weights in float")
    return ModuleOverride(activation=act, weight=wgt)


def _override_options(res: Resolution) -> list[ModuleOverride]:
    """Ways to write a target resolution, shortest first (the full form always works)."""
    full = _as_override(res)
    if full.keep_float:
        return [full]
    return [ModuleOverride(activation=full.activation), ModuleOverride(weight=full.weight), full]


def _apply(config: PTQConfig, extra: Mapping[str, ModuleOverride]) -> PTQConfig:
    """`config` with `extra` appended after its own overrides (a re-used glob moves to the end)."""
    overrides = dict(config.overrides)
    for glob, value in extra.items():
        overrides.pop(glob, None)
        overrides[glob] = value
    return replace(config, overrides=overrides)


_LAYER_INDEX = re.compile(r"(?<=\.layers\.)\d+(?=\.|$)")


def _derive_overrides(
    config_a: PTQConfig, config_b: PTQConfig, names: Sequence[str], winners: set[str]
) -> dict[str, ModuleOverride]:
    """Globs that, appended to A's overrides, give winners B's specs and everyone else A's."""
    winners = _takeable(config_a, config_b, names, winners)
    target = {n: resolved_specs(config_b if n in winners else config_a, n) for n in names}
    added: dict[str, ModuleOverride] = {}

    def current_config() -> PTQConfig:
        return _apply(config_a, added)

    current = {n: resolved_specs(config_a, n) for n in names}

    def try_add(glob: str, value: ModuleOverride) -> bool:
        nonlocal current
        trial = dict(added)
        trial.pop(glob, None)
        trial[glob] = value
        cfg = _apply(config_a, trial)
        new = {n: resolved_specs(cfg, n) for n in names}
        changed = [n for n in names if new[n] != current[n]]
        if not changed or any(new[n] != target[n] for n in changed):
            return False
        added.clear()
        added.update(trial)
        current = new
        return True

    def pending() -> list[str]:
        return [n for n in names if current[n] != target[n]]

    if not pending():
        return {}
    # 1. B's own globs, as B wrote them.
    for glob, value in config_b.overrides.items():
        if pending():
            try_add(glob, value)
    # 2. One glob per module kind across layers, parents first (a parent's glob covers its
    #    children when they all agree).
    for n in sorted(pending(), key=_depth):
        if current[n] == target[n]:
            continue
        general = _LAYER_INDEX.sub("*", n)
        if general != n:
            for option in _override_options(target[n]):
                if try_add(general, option):
                    break
    # 3. Exact names, shallow before deep; a module's entry also reaches its children, which
    #    are deeper and so get their own later entry when they need one.
    for n in sorted(names, key=_depth):  # all names: a parent's entry may disturb any child
        if current[n] == target[n]:
            continue
        glob = n  # the root's name "" is a glob matching the root alone (not "*")
        for option in _override_options(target[n]):
            trial = dict(added)
            trial.pop(glob, None)
            trial[glob] = option
            if resolved_specs(_apply(config_a, trial), n) == target[n]:
                break
        added.clear()
        added.update(trial)  # children it disturbs come later in this loop and get fixed
        cfg = current_config()
        current = {m: resolved_specs(cfg, m) for m in names}
    leftover = pending()
    if leftover:  # only reachable through a bug: say so instead of returning a wrong config
        raise ConfigError(f"could not express B's settings for {leftover[0]} as overrides on top of A")
    # 4. Drop entries a later one makes redundant (e.g. a child's glob under its parent's).
    for glob in list(added):
        trial = {g: v for g, v in added.items() if g != glob}
        cfg = _apply(config_a, trial)
        if all(resolved_specs(cfg, n) == target[n] for n in names):
            added.pop(glob)
    return added


def _takeable(config_a: PTQConfig, config_b: PTQConfig, names: Sequence[str], winners: set[str]) -> set[str]:
    """The winners whose B settings can be appended to A as overrides.

    In PTQConfig.spec_for a keep-float glob is absorbing (it wins over every other glob, earlier
    or later) and a glob always reaches the module's children too. So a module kept float by
    A cannot be changed by adding globs, and a module B keeps float can only be taken when all
    its children end up float as well (they do in B; a child that stays with A blocks it).
    """
    taken = {n for n in winners if n in names and resolved_specs(config_a, n)[0] is not None}
    changed = True
    while changed:
        changed = False
        for n in sorted(taken):
            if resolved_specs(config_b, n)[0] is not None:
                continue
            prefix = n + "." if n else None
            children = [m for m in names if prefix is not None and m.startswith(prefix)]
            if any(resolved_specs(config_b if m in taken else config_a, m)[0] is not None for m in children):
                taken.discard(n)
                changed = True
    return taken


def _depth(name: str) -> int:
    """Parents sort before their children; the root ("") first of all."""
    return name.count(".") if name else -1


def _global_differences(a: PTQConfig, b: PTQConfig) -> list[str]:
    out = []
    if a.observer != b.observer:
        out.append(f"observer ({a.observer} vs {b.observer})")
    else:
        if a.observer == "percentile" and a.percentile != b.percentile:
            out.append(f"percentile ({a.percentile:g} vs {b.percentile:g})")
        if a.observer == "ema" and a.ema_momentum != b.ema_momentum:
            out.append(f"ema_momentum ({a.ema_momentum:g} vs {b.ema_momentum:g})")
    return out


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


def _json_float(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _spec_text(spec: QuantSpec | None) -> str:
    if spec is None:
        return FLOAT
    text = spec.dtype
    if spec.scheme != "affine":
        text += f" {spec.scheme}"
    if spec.per_channel:
        text += " per-channel"
    return text


def _describe_resolution(res: Resolution) -> str:
    act, wgt = res
    if act is None and wgt is None:
        return FLOAT
    return f"act {_spec_text(act)}, weight {_spec_text(wgt)}"


def _override_text(o: ModuleOverride) -> str:
    if o.keep_float:
        return FLOAT
    parts = []
    if o.activation is not None:
        parts.append(f"act {_spec_text(o.activation)}")
    if o.weight is not None:
        parts.append(f"weight {_spec_text(o.weight)}")
    return ", ".join(parts) or "(no change)"


def _db(x: float) -> str:
    x = float(x)
    return f"{x:6.2f} dB" if math.isfinite(x) else ("   inf dB" if x > 0 else "  -inf dB")


def _signed_db(x: float) -> str:
    x = float(x)
    return f"{x:+6.2f} dB" if math.isfinite(x) else ("+inf dB" if x > 0 else "-inf dB")
