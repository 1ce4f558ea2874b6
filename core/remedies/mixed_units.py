"""The units a mixed-precision search assigns dtypes to, their candidate dtypes, and the configs they make.

A unit owns the observers of the modules its glob names exactly (``encoder.layers.*.mlp.down_proj``
owns the down projections' weight and output observers, not those of a child). A glob also names a
module's children (PTQConfig.matches), so an assignment is written parents first: a child's line comes
later and wins for its own observers (PTQConfig.spec_for: among dtype overrides the later glob wins).
Keeping a module float wins over every dtype wherever it stands, so only a unit whose glob names no
other unit's observers (a leaf) may be kept float.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from core.config import FLOAT, PTQConfig, build_config, parse_override_lines
from core.errors import ConfigError

ACTIVATION_DTYPES = ("uint8", "int16")  # cheapest first
WEIGHT_DTYPES = ("uint4", "uint8", "int16")
UNITS = ("kind", "layer", "module")
ROOT_GLOB = "*"  # the root's own observers (module name "") can only be named by "*"
_LAYER_RE = re.compile(r"^(?P<prefix>.*?\blayers)\.(?P<idx>\d+)(?:\.(?P<rest>.+))?$")


@dataclass(frozen=True)
class MixedUnit:
    """One unit: its glob, the observers it owns, whether it has weights, and its options, cheapest first."""

    glob: str
    observers: tuple[str, ...]
    has_weight: bool
    leaf: bool
    options: tuple[str, ...]

    @property
    def widest_integer(self) -> str:
        """The widest option short of float (options are cheapest first)."""
        return [o for o in self.options if o != FLOAT][-1]


def option_text(activation: str | None, weight: str | None) -> str:
    """The override text of one option: ``float``, ``ACT`` or ``ACT / WEIGHT``."""
    if activation is None:
        return FLOAT
    return f"{activation} / {weight}" if weight else activation


def option_dtypes(option: str) -> tuple[str | None, str | None]:
    """(activation, weight) dtypes of an option text; (None, None) for float."""
    if option == FLOAT:
        return None, None
    act, _, weight = (part.strip() for part in option.partition("/"))
    return act, weight or None


def dominates(a: str, b: str) -> bool:
    """Whether option `a` is at least as wide as `b` on both activations and weights (float is widest)."""
    if a == FLOAT:
        return True
    if b == FLOAT:
        return False
    (aa, aw), (ba, bw) = option_dtypes(a), option_dtypes(b)
    wider_act = ACTIVATION_DTYPES.index(aa) >= ACTIVATION_DTYPES.index(ba)
    wider_weight = aw is None or bw is None or WEIGHT_DTYPES.index(aw) >= WEIGHT_DTYPES.index(bw)
    return wider_act and wider_weight


def _unit_key(module_name: str, unit: str) -> str:
    if not module_name:
        return ROOT_GLOB
    if unit == "module":
        return module_name
    m = _LAYER_RE.match(module_name)
    if unit == "layer":
        return f"{m.group('prefix')}.{m.group('idx')}" if m else module_name.split(".")[0]
    if m:
        return f"{m.group('prefix')}.*" + (f".{m.group('rest')}" if m.group("rest") else "")
    return module_name


def mixed_units(qmodel, config: PTQConfig, unit: str = "kind", activation: str | None = None) -> list[MixedUnit]:
    """The units of `qmodel` (parents first), leaving out those `config` keeps entirely float.

    unit="kind": one unit per module kind across the encoder layers (as the sensitivity sweep's kinds)
    plus each module outside them; "layer": one per encoder layer plus each top-level module;
    "module": one per wrapper. With `activation` every unit's options hold that activation dtype
    (only weights and float are chosen); without, activations are chosen per unit too.
    """
    if unit not in UNITS:
        raise ConfigError(f"unknown mixed-precision unit {unit!r}; use one of {', '.join(UNITS)}")
    observers = qmodel.observers()
    owned: dict[str, list] = {}
    for obs in observers:
        owned.setdefault(_unit_key(obs.module_name, unit), []).append(obs)
    units = []
    for glob, own in owned.items():
        if not any(config.spec_for(o.module_name, o.spec_request.spec_kind) is not None for o in own):
            continue  # the config keeps it float: nothing to choose
        names = {o.name for o in own}
        covered = [o for o in observers if glob == ROOT_GLOB or PTQConfig.matches(glob, o.module_name)]
        leaf = glob != ROOT_GLOB and all(o.name in names for o in covered)
        has_weight = any(o.spec_request.spec_kind == "weight" for o in own)
        acts = ACTIVATION_DTYPES if activation is None else (activation,)
        options = [option_text(a, w) for a in acts for w in (WEIGHT_DTYPES if has_weight else (None,))]
        if leaf:
            options.append(FLOAT)
        units.append((len(covered), MixedUnit(glob, tuple(o.name for o in own), has_weight, leaf, tuple(options))))
    # Parents first: a glob covering more observers is written before the globs it contains.
    units.sort(key=lambda item: -item[0])
    return [u for _, u in units]


def assignment_overrides(units: Sequence[MixedUnit], assignment: Sequence[str]) -> dict[str, str]:
    """The override lines (glob -> option text, parents first) of one option per unit."""
    return {u.glob: option for u, option in zip(units, assignment)}


def config_with(base: PTQConfig, overrides: Mapping[str, str]) -> PTQConfig:
    """`base` with `overrides` (glob -> override text) written after its own, so they win for dtypes."""
    parsed = parse_override_lines([f"{glob} = {text}" for glob, text in overrides.items()], "mixed-precision point")
    merged = {g: o for g, o in base.overrides.items() if g not in parsed}
    merged.update(parsed)
    return build_config(base, overrides=merged)
