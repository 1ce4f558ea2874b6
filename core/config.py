"""PTQ configuration: default activation and weight specs plus per-module overrides."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import Any, Mapping

from core.errors import ConfigError
from core.quant.dtypes import get_dtype

FLOAT = "float"  # override value that keeps a module in float
SCHEMES = ("affine", "symmetric")
OBSERVERS = ("minmax", "ema", "percentile")
# The soft-token budget per image when nobody chooses one: Gemma 4's own default image size (a
# 3x3-pooled patch grid of up to 2520 patches). Here, not in core.data.images, so that the CLI's
# help can show it without loading torch.
DEFAULT_SOFT_TOKENS = 280


def closest_names(pattern: str, names: Iterable[str], n: int = 3) -> list[str]:
    """The `n` names most like `pattern` (difflib), for "did you mean" hints."""
    pool = [x for x in dict.fromkeys(names) if x]
    # Wildcards say nothing about spelling; compare the literal parts of the glob.
    literal = pattern.replace("*", "").replace("?", "") or pattern
    return difflib.get_close_matches(literal, pool, n=n, cutoff=0.0)


def check_globs(globs: Iterable[str], names: Sequence[str], what: str = "module", source: str = "") -> None:
    """Raise ConfigError for the first glob that matches none of `names`, naming the closest ones.

    A module glob also matches a module's children (PTQConfig.matches), so ``encoder.layers.0``
    covers every module inside that layer; an image glob matches the name itself.
    """
    names = list(names)
    for glob in globs:
        if what == "module":
            hit = any(PTQConfig.matches(glob, name) for name in names)
        else:
            hit = any(fnmatchcase(name, glob) for name in names)
        if hit:
            continue
        near = closest_names(glob, names)
        hint = f"closest {what}s: {', '.join(near)}" if near else f"there is no {what} to match"
        where = f"{source} " if source else ""
        raise ConfigError(f"{where}{glob!r} matches no {what} ({hint}); fix the spelling or drop it")


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: integer dtype, scheme and granularity."""

    dtype: str = "uint8"
    scheme: str = "affine"
    per_channel: bool = False

    def __post_init__(self) -> None:
        get_dtype(self.dtype)
        if self.scheme not in SCHEMES:
            raise ConfigError(f"unknown scheme {self.scheme!r}: use one of {', '.join(SCHEMES)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {"dtype": self.dtype, "scheme": self.scheme, "per_channel": self.per_channel}


def _spec_from(value: Any, base: QuantSpec) -> QuantSpec:
    if isinstance(value, QuantSpec):
        return value
    if isinstance(value, str):
        return replace(base, dtype=value)
    if isinstance(value, Mapping):
        unknown = set(value) - {"dtype", "scheme", "per_channel"}
        if unknown:
            raise ConfigError(f"unknown quantization spec keys {sorted(unknown)}")
        return replace(base, **dict(value))
    raise ConfigError(f"cannot read a quantization spec from {value!r}")


@dataclass(frozen=True)
class ModuleOverride:
    """What an override glob changes: activations, weights, or keeps the module float."""

    keep_float: bool = False
    activation: QuantSpec | None = None
    weight: QuantSpec | None = None

    def to_json(self) -> Any:
        """Plain-JSON form (the shortest one that reads back the same)."""
        if self.keep_float:
            return FLOAT
        out: dict[str, Any] = {}
        if self.activation is not None:
            out["activation"] = self.activation.to_dict()
        if self.weight is not None:
            out["weight"] = self.weight.to_dict()
        return out


@dataclass(frozen=True)
class PTQConfig:
    """Defaults match TICO's PTQConfig: uint8 affine activations, uint8 affine per-channel weights, min-max."""

    activation: QuantSpec = QuantSpec()
    weight: QuantSpec = QuantSpec(per_channel=True)
    observer: str = "minmax"
    percentile: float = 99.99
    ema_momentum: float = 0.9
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.observer not in OBSERVERS:
            raise ConfigError(f"unknown observer {self.observer!r}: use one of {', '.join(OBSERVERS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile {self.percentile} must lie in (50, 100]")
        if not 0.0 <= self.ema_momentum < 1.0:
            raise ConfigError(f"ema_momentum {self.ema_momentum} must lie in [0, 1)")
        parsed = {glob: self._parse_override(glob, value) for glob, value in dict(self.overrides).items()}
        object.__setattr__(self, "overrides", parsed)

    def _parse_override(self, glob: str, value: Any) -> ModuleOverride:
        if isinstance(value, ModuleOverride):
            return value
        if isinstance(value, QuantSpec):
            return ModuleOverride(activation=value)
        if value == FLOAT or value is None:
            return ModuleOverride(keep_float=True)
        if isinstance(value, str):
            # A bare dtype name changes the module's activations (the common "int16 here" case).
            return ModuleOverride(activation=_spec_from(value, self.activation))
        if isinstance(value, Mapping) and ({"activation", "weight"} & set(value)):
            act = value.get("activation")
            wgt = value.get("weight")
            return ModuleOverride(
                activation=None if act is None else _spec_from(act, self.activation),
                weight=None if wgt is None else _spec_from(wgt, self.weight),
            )
        if isinstance(value, Mapping):
            return ModuleOverride(activation=_spec_from(value, self.activation))
        raise ConfigError(f"override for {glob!r}: cannot read {value!r}; use 'float', a dtype name or a spec mapping")

    @staticmethod
    def matches(glob: str, module_name: str) -> bool:
        """Whether `glob` names `module_name` or one of its parents."""
        return fnmatchcase(module_name, glob) or fnmatchcase(module_name, glob + ".*")

    def spec_for(self, module_name: str, kind: str) -> QuantSpec | None:
        """The spec of a tensor of `kind` ('activation' or 'weight') in `module_name`; None keeps it float."""
        spec = self.activation if kind == "activation" else self.weight
        # Among dtype overrides the later glob wins; a keep-float glob wins over every dtype
        # override, wherever it stands (a module the user keeps float never gets quantized back).
        for glob, override in self.overrides.items():
            if not self.matches(glob, module_name):
                continue
            if override.keep_float:
                return None
            chosen = override.activation if kind == "activation" else override.weight
            if chosen is not None:
                spec = chosen
        return spec

    def with_keep_float(self, globs: list[str] | tuple[str, ...]) -> "PTQConfig":
        """A copy that also keeps the modules matching `globs` in float."""
        overrides = dict(self.overrides)
        for glob in globs:
            overrides[glob] = ModuleOverride(keep_float=True)
        return replace(self, overrides=overrides)

    def check_globs(self, module_names: Sequence[str], source: str = "override") -> None:
        """ConfigError if an override or keep-float glob matches none of `module_names`."""
        check_globs(self.overrides, module_names, "module", source)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, read back by from_dict."""
        return {
            "activation": self.activation.to_dict(),
            "weight": self.weight.to_dict(),
            "observer": self.observer,
            "percentile": self.percentile,
            "ema_momentum": self.ema_momentum,
            "overrides": {glob: o.to_json() for glob, o in self.overrides.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PTQConfig":
        """Inverse of to_dict; raises ConfigError on unknown keys or values."""
        known = {"activation", "weight", "observer", "percentile", "ema_momentum", "overrides"}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown config keys {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        if "activation" in data:
            kwargs["activation"] = _spec_from(data["activation"], QuantSpec())
        if "weight" in data:
            kwargs["weight"] = _spec_from(data["weight"], QuantSpec(per_channel=True))
        for key in ("observer", "percentile", "ema_momentum", "overrides"):
            if key in data:
                kwargs[key] = data[key]
        return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# The one override grammar and the one config builder, shared by the GUI and the CLI
# ---------------------------------------------------------------------------------------------

OVERRIDE_FIX = "write GLOB=DTYPE, e.g. encoder.layers.*=int16 or pooler=float"


def parse_override_line(line: str, source: str) -> tuple[str, Any] | None:
    """One override line as (glob, PTQConfig.overrides value); None for a blank or comment line.

    The grammar (the A/B tab's override box and ``ptq-studio ab --b-override`` both):
    ``GLOB = DTYPE`` sets the module's activations, ``GLOB = float`` keeps it in float, and
    ``GLOB = ACT / WEIGHT`` sets activations and weights (``-`` leaves one side as configured);
    ``:`` may stand for ``=`` and ``#`` starts a comment. A line that says none of these raises
    ConfigError naming `source` (e.g. "override line 3" or "--b-override") and the line.
    """
    text = line.split("#", 1)[0].strip()
    if not text:
        return None
    glob, sep, value = text.partition("=")
    if not sep:
        glob, sep, value = text.partition(":")
    glob, value = glob.strip(), value.strip()
    if not sep or not glob or not value:
        raise ConfigError(f"{source} {line.strip()!r}: {OVERRIDE_FIX}")
    if "/" not in value:
        return glob, value
    act, _, wgt = (v.strip() for v in value.partition("/"))
    spec = {k: v for k, v in (("activation", act), ("weight", wgt)) if v and v != "-"}
    if not spec:
        raise ConfigError(f"{source} {line.strip()!r}: give an activation or a weight dtype, e.g. {glob}=int16/uint4")
    return glob, spec


def parse_override_lines(lines: str | Iterable[str], source: str = "override line") -> dict[str, Any]:
    """Override lines (see parse_override_line) as PTQConfig.overrides values, in order.

    A text is split into lines and an error names its line number ("override line 2"); a
    sequence (command-line arguments) is read item by item and an error names the item.
    """
    numbered = isinstance(lines, str)
    items = lines.splitlines() if isinstance(lines, str) else list(lines)
    out: dict[str, Any] = {}
    for number, raw in enumerate(items, start=1):
        parsed = parse_override_line(raw, f"{source} {number}" if numbered else source)
        if parsed is not None:
            out[parsed[0]] = parsed[1]
    return out


def override_line(glob: str, value: Any) -> str | None:
    """The line parse_override_line reads back as this override's JSON form (None if dtypes cannot say it)."""
    if isinstance(value, str):
        return f"{glob} = {value}"
    if not isinstance(value, Mapping):
        return None
    act, wgt = value.get("activation"), value.get("weight")
    if act and not wgt and set(act) <= {"dtype", "scheme", "per_channel"}:
        return f"{glob} = {act['dtype']}"
    if act or wgt:
        return f"{glob} = {act['dtype'] if act else '-'} / {wgt['dtype'] if wgt else '-'}"
    return None


def build_config(
    base: PTQConfig | None = None,
    *,
    activation: str | None = None,
    weight: str | None = None,
    observer: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    keep_float: Sequence[str] = (),
) -> PTQConfig:
    """A PTQConfig from front-end choices (CLI flags, GUI widgets) on top of `base` (default PTQConfig()).

    A dtype replaces only the dtype of base's activation / weight spec (scheme and granularity
    stay); None keeps base's choice. `overrides` replaces base's overrides; `keep_float` globs
    are added last, so they win over every dtype override (PTQConfig.spec_for).
    """
    config = base if base is not None else PTQConfig()
    changes: dict[str, Any] = {}
    if activation is not None:
        changes["activation"] = replace(config.activation, dtype=activation)
    if weight is not None:
        changes["weight"] = replace(config.weight, dtype=weight)
    if observer is not None:
        changes["observer"] = observer
    if overrides is not None:
        changes["overrides"] = dict(overrides)
    config = replace(config, **changes)
    return config.with_keep_float(list(keep_float)) if keep_float else config
