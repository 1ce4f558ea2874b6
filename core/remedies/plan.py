"""What to fix and what a fix did: the remedy plan (saved with the session) and each step's report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from core.errors import ConfigError
from core.io import json_safe

# Weight rounding (weights snapped to their grid, qparams pinned), outlier smoothing (function-
# preserving rescaling folded into the float weights), and per-module dtypes found by a search.
KINDS = ("smoothquant", "cle", "gptq", "adaround", "mixed")


@dataclass(frozen=True)
class RemedyStep:
    """One remedy: its kind, the module globs it applies to, and its settings (JSON-safe values)."""

    kind: str
    globs: tuple[str, ...] = ("*",)
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown remedy {self.kind!r}: use one of {', '.join(KINDS)}")
        object.__setattr__(self, "globs", tuple(self.globs))
        object.__setattr__(self, "params", dict(self.params))

    def to_json(self) -> dict[str, Any]:
        """The step as plain JSON values."""
        return {"kind": self.kind, "globs": list(self.globs), "params": json_safe(dict(self.params))}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RemedyStep:
        """Inverse of to_json."""
        return cls(kind=str(data["kind"]), globs=tuple(data.get("globs", ("*",))), params=dict(data.get("params", {})))


@dataclass
class RemedyReport:
    """What one applied step did: the modules it changed, its summary figures and its time."""

    step: RemedyStep
    modules: list[str] = field(default_factory=list)
    # kind-specific figures, JSON-safe: e.g. per-module weight error before/after, ranges before/after
    summary: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The report as plain JSON values."""
        return {
            "step": self.step.to_json(),
            "modules": list(self.modules),
            "summary": json_safe(self.summary),
            "seconds": float(self.seconds),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RemedyReport:
        """Inverse of to_json."""
        return cls(
            step=RemedyStep.from_json(data["step"]),
            modules=list(data.get("modules", [])),
            summary=dict(data.get("summary", {})),
            seconds=float(data.get("seconds", 0.0)),
        )


def plan_to_json(steps: Sequence[RemedyStep]) -> list[dict[str, Any]]:
    """A plan (steps in the order they are applied) as plain JSON values."""
    return [step.to_json() for step in steps]


def plan_from_json(data: Sequence[Mapping[str, Any]]) -> tuple[RemedyStep, ...]:
    """Inverse of plan_to_json."""
    return tuple(RemedyStep.from_json(item) for item in data)
