"""Turning an A/B comparison into a config: B's settings where B wins, as override globs on top of A
(and configs, specs and overrides in words). Torch-free, so the GUI may import it at start-up.

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

import re
from collections.abc import Mapping, Sequence
from dataclasses import replace

from core.config import FLOAT, ModuleOverride, PTQConfig, QuantSpec
from core.errors import ConfigError

Resolution = tuple[QuantSpec | None, QuantSpec | None]  # (activation, weight); None = float
DEFAULT_MARGIN_DB = 0.5  # B's setting is taken only where B beats A by more than this


def resolved_specs(config: PTQConfig, module_name: str) -> Resolution:
    """(activation spec, weight spec) of a module under `config`; None means kept float."""
    return config.spec_for(module_name, "activation"), config.spec_for(module_name, "weight")


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


def with_overrides(config: PTQConfig, extra: Mapping[str, ModuleOverride]) -> PTQConfig:
    """`config` with `extra` appended after its own overrides (a re-used glob moves to the end)."""
    overrides = dict(config.overrides)
    for glob, value in extra.items():
        overrides.pop(glob, None)
        overrides[glob] = value
    return replace(config, overrides=overrides)


_LAYER_INDEX = re.compile(r"(?<=\.layers\.)\d+(?=\.|$)")


def derive_overrides(
    config_a: PTQConfig, config_b: PTQConfig, names: Sequence[str], winners: set[str]
) -> dict[str, ModuleOverride]:
    """Globs that, appended to A's overrides, give winners B's specs and everyone else A's."""
    winners = takeable_winners(config_a, config_b, names, winners)
    target = {n: resolved_specs(config_b if n in winners else config_a, n) for n in names}
    added: dict[str, ModuleOverride] = {}

    def current_config() -> PTQConfig:
        return with_overrides(config_a, added)

    current = {n: resolved_specs(config_a, n) for n in names}

    def try_add(glob: str, value: ModuleOverride) -> bool:
        nonlocal current
        trial = dict(added)
        trial.pop(glob, None)
        trial[glob] = value
        cfg = with_overrides(config_a, trial)
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
            if resolved_specs(with_overrides(config_a, trial), n) == target[n]:
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
        cfg = with_overrides(config_a, trial)
        if all(resolved_specs(cfg, n) == target[n] for n in names):
            added.pop(glob)
    return added


def takeable_winners(config_a: PTQConfig, config_b: PTQConfig, names: Sequence[str], winners: set[str]) -> set[str]:
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


def global_differences(a: PTQConfig, b: PTQConfig) -> list[str]:
    """Settings of B that differ from A's and cannot be per-module overrides (observer, percentile, momentum)."""
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
# In words (the CLI summary and the GUI both print these)
# ---------------------------------------------------------------------------------------------


def describe_config(config: PTQConfig) -> str:
    """One line: defaults, observer and overrides."""
    act, wgt = config.activation, config.weight
    obs = config.observer
    if obs == "percentile":
        obs += f" {config.percentile:g}"
    elif obs == "ema":
        obs += f" m={config.ema_momentum:g}"
    parts = [f"act {spec_text(act)}", f"weight {spec_text(wgt)}", f"observer {obs}"]
    if config.overrides:
        ov = ", ".join(f"{g}={override_text(o)}" for g, o in config.overrides.items())
        parts.append(f"overrides {{{ov}}}")
    return "; ".join(parts)


def spec_text(spec: QuantSpec | None) -> str:
    """A spec in words ("int16", "int8 symmetric per-channel"); None is "float"."""
    if spec is None:
        return FLOAT
    text = spec.dtype
    if spec.scheme != "affine":
        text += f" {spec.scheme}"
    if spec.per_channel:
        text += " per-channel"
    return text


def describe_resolution(res: Resolution) -> str:
    """A module's resolved (activation, weight) specs in words."""
    act, wgt = res
    if act is None and wgt is None:
        return FLOAT
    return f"act {spec_text(act)}, weight {spec_text(wgt)}"


def override_text(o: ModuleOverride) -> str:
    """An override in words ("act int16", "float")."""
    if o.keep_float:
        return FLOAT
    parts = []
    if o.activation is not None:
        parts.append(f"act {spec_text(o.activation)}")
    if o.weight is not None:
        parts.append(f"weight {spec_text(o.weight)}")
    return ", ".join(parts) or "(no change)"
