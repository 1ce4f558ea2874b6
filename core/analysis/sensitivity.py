"""Sensitivity sweep: keep one unit (an encoder layer or a module kind) in float at a time and rank the
units by how much that improves the end-to-end SQNR.

The shape of an analysis view: a module function taking a wrapped model and preprocessor batches
(``sensitivity``), a Session method that feeds it the session's images (``Session.sensitivity``), and a
view that draws the result records.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

import torch

from core.analysis.metrics import ErrorAccumulator
from core.analysis.records import END_TO_END, ModuleError, SensitivityEntry
from core.analysis.tap import Progress, enter_quant, fp_forward, model_device, model_inputs, quant_forward
from core.cancel import CancelToken
from core.errors import ConfigError

__all__ = ["sensitivity", "sensitivity_units"]

_LAYER_RE = re.compile(r"^(?P<prefix>.*?\blayers)\.(?P<idx>\d+)(?:\.(?P<rest>.+))?$")


def sensitivity_units(qmodel, unit: str = "layer") -> list[tuple[str, list[str]]]:
    """Units for the sweep: (display name, keep-float globs), in forward order.

    unit="layer": one entry per encoder layer ("encoder.layers.N").
    unit="kind": one entry per module kind across all layers ("encoder.layers.*.mlp.down_proj",
    "encoder.layers.*.self_attn", ...), plus each quantized module outside the layers.
    """
    if unit not in ("layer", "kind"):
        raise ConfigError(f"unknown sensitivity unit {unit!r}; use 'layer' or 'kind'")
    names = [n for n, _ in qmodel.wrappers()]
    units: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    for n in names:
        m = _LAYER_RE.match(n)
        if unit == "layer":
            if not m:
                continue
            key = f"{m.group('prefix')}.{m.group('idx')}"
        else:
            if m:
                if not m.group("rest"):
                    continue  # the whole layer is the "layer" unit, not a kind
                key = f"{m.group('prefix')}.*.{m.group('rest')}"
            else:
                if n in ("", "model") or _is_container(n, names):
                    continue
                key = n
        if key not in seen:
            # PTQConfig.matches: a glob names a module and everything below it.
            seen.add(key)
            units.append((key, [key]))
    return units


def _is_container(name: str, names: Sequence[str]) -> bool:
    """True for wrappers that only hold layers (the encoder): keeping them float = everything."""
    pre = name + "."
    return any(_LAYER_RE.match(n) and n.startswith(pre) for n in names)


def sensitivity(
    qmodel,
    batches: Iterable[Mapping],
    unit: str = "layer",
    progress: Progress | None = None,
    cancel: CancelToken | None = None,
    total: int | None = None,
) -> tuple[ModuleError, list[SensitivityEntry]]:
    """Baseline end-to-end error, then one entry per unit kept in float, best improvement first.

    The FP output does not depend on what is kept in float, so the FP pass runs once per image
    and only the QUANT pass is repeated per unit. Raises core.errors.CancelledError when
    cancelled; the model is left in QUANT mode with only the config's keep-float modules.
    With `total` (the number of batches) the batches are streamed, not held.
    """
    cancel = cancel or CancelToken()
    if total is None:
        batches = list(batches)
        total = len(batches)
    units = sensitivity_units(qmodel, unit)
    steps = total * (len(units) + 1)
    device = model_device(qmodel)
    enter_quant(qmodel)
    base = ErrorAccumulator(END_TO_END, "model", None, 0)
    accs = [ErrorAccumulator(name, unit, None, 0) for name, _ in units]
    done = 0

    def tick(msg):
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, steps, msg)

    try:
        with torch.no_grad():
            for bi, batch in enumerate(batches):
                cancel.raise_if_cancelled("Sensitivity sweep")
                inputs, _ = model_inputs(batch, device)
                fp_out = fp_forward(qmodel, inputs)
                base.update(fp_out, quant_forward(qmodel, inputs, []))
                tick(f"image {bi + 1}/{total}: baseline")
                for (name, globs), acc in zip(units, accs):
                    cancel.raise_if_cancelled("Sensitivity sweep")
                    acc.update(fp_out, quant_forward(qmodel, inputs, globs))
                    tick(f"image {bi + 1}/{total}: {name} in float")
    finally:
        qmodel.set_keep_float([])
    baseline = base.result()
    entries = []
    for (name, globs), acc in zip(units, accs):
        r = acc.result()
        entries.append(
            SensitivityEntry(
                name=name,
                peir=r.peir,
                sqnr_db=r.sqnr_db,
                improvement_db=_improvement(r.sqnr_db, baseline.sqnr_db),
                globs=list(globs),
            )
        )
    entries.sort(key=lambda e: (-_finite_key(e.improvement_db), e.name))
    return baseline, entries


def _improvement(new: float, old: float) -> float:
    if math.isinf(new) and math.isinf(old):
        return 0.0
    return new - old


def _finite_key(x: float) -> float:
    return 1e300 if x == math.inf else (-1e300 if x == -math.inf or math.isnan(x) else x)
