"""Integer dtypes that observers can target."""

from __future__ import annotations

from dataclasses import dataclass

from core.errors import ConfigError


@dataclass(frozen=True)
class QDType:
    """An integer storage type: its name, width and signedness."""

    name: str
    bits: int
    signed: bool

    @property
    def qmin(self) -> int:
        """Smallest representable integer."""
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        """Largest representable integer."""
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def levels(self) -> int:
        """Number of representable integers."""
        return 1 << self.bits


DTYPES: dict[str, QDType] = {
    d.name: d
    for d in (
        QDType("uint8", 8, False),
        QDType("int8", 8, True),
        QDType("int16", 16, True),
        QDType("uint4", 4, False),
        QDType("int4", 4, True),
    )
}


def get_dtype(name: str) -> QDType:
    """Return the dtype called `name`, or raise ConfigError listing the valid names."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(
            f"unknown quantization dtype {name!r}: use one of {', '.join(DTYPES)}"
        ) from None
