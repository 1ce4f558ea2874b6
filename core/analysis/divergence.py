"""Where quantization error first jumps along the model: the first-divergence locator.

The model runs the way ``core.analysis.compare`` runs it (``core.analysis.tap``): the FP reference is
QUANT mode with every observer kept float, then the quantized pass with only the config's keep-float
modules. Nothing here keeps a tensor beyond the image it belongs to.

First divergence (``locate_divergence``): along forward order, for every unit,

- input_sqnr_db   SQNR of the unit's input in the full quantized run against the FP run
                  (the error it inherits)
- output_sqnr_db  the same at its output (the cumulative error)
- local_sqnr_db   the unit run quantized on its *FP* input, compared with its FP output (the
                  error it adds by itself, nothing inherited)
- jump_db         min(input_sqnr_db, reference) - output_sqnr_db (how much SQNR the unit
                  loses; the reference is below)

A unit whose input carries no error at all (the patch embedder reads raw pixels, or everything
before it is kept float) has an infinite input SQNR, and an infinite jump would flag the first
unit merely for being first. Input SQNRs are therefore capped at the *reference* SQNR, the
median local SQNR over all units (what a typical unit of this model and config keeps when it
is the only one quantized): a cleaner input counts as clean, and a first unit is located only
when it is worse than a typical unit. The located unit is the one with the largest jump (the
earliest within ``TIE_DB`` of it). It *adds* the error itself when its local SQNR lies at least
``ADDS_MARGIN_DB`` below its input SQNR (capped the same way); otherwise it amplifies error it
inherited.

Units: ``unit="layer"``: patch_embedder, every encoder layer, pooler and "model" (the final
standardize, or the identity when the model has none); ``unit="module"``: every leaf wrapper
with an output observer (linears, norms, the pooler) and "model". Module units do not cover
the glue between leaves (attention's RoPE / scores / softmax / context, the MLP product, the
residual sums): error added there shows up as a drop between one unit's output and the next
unit's input, not as a jump.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from core.analysis.heatmaps import MODEL, ImageErrorMaps
from core.analysis.metrics import sqnr_from_sums
from core.analysis.tap import (
    MethodTap,
    Progress,
    enter_quant,
    first_tensor,
    fp_forward,
    model_device,
    model_inputs,
    quant_forward,
    single_image_batches,
    wrapper_kind,
)
from core.cancel import CancelToken
from core.data.device import batches_to_device
from core.errors import ConfigError
from core.io import finite_or_none
from core.wrappers.base import QuantModule

TIE_DB = 0.5
ADDS_MARGIN_DB = 3.0
UNITS = ("layer", "module")

__all__ = [
    "MODEL",
    "TIE_DB",
    "ADDS_MARGIN_DB",
    "UNITS",
    "DivergenceEntry",
    "DivergenceResult",
    "DivergenceSearch",
    "locate_divergence",
    "locate_divergence_batches",
    "divergence_units",
    "jump_db",
]


# ---------------------------------------------------------------------------------------------
# First-divergence locator
# ---------------------------------------------------------------------------------------------


@dataclass
class DivergenceEntry:
    """How much error one unit inherits, adds and passes on (SQNRs in dB, streamed over images)."""

    name: str
    kind: str
    input_sqnr_db: float
    output_sqnr_db: float
    local_sqnr_db: float
    jump_db: float
    local_mse: float
    cumulative_mse: float
    adds_error: bool = False  # its own quantization (on float input) is well below what it inherits

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; inf becomes null (an SQNR of null means no error at all)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "input_sqnr_db": finite_or_none(self.input_sqnr_db),
            "output_sqnr_db": finite_or_none(self.output_sqnr_db),
            "local_sqnr_db": finite_or_none(self.local_sqnr_db),
            "jump_db": finite_or_none(self.jump_db),
            "local_mse": finite_or_none(self.local_mse),
            "cumulative_mse": finite_or_none(self.cumulative_mse),
            "adds_error": self.adds_error,
        }


def _adds(local: float, inp: float, ref: float) -> bool:
    if math.isnan(local) or math.isnan(inp) or local == math.inf:
        return False
    return local <= min(inp, ref) - ADDS_MARGIN_DB


@dataclass
class DivergenceResult:
    """Every unit in forward order and the one where the error first jumps."""

    unit: str
    entries: list[DivergenceEntry]
    located: DivergenceEntry | None
    images: list[str]
    seconds: float = 0.0
    reference_db: float = math.inf  # input SQNRs above this count as clean (median local SQNR)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "unit": self.unit,
            "reference_db": finite_or_none(self.reference_db),
            "located": self.located.to_dict() if self.located else None,
            "summary": self.summary_line(),
            "images": list(self.images),
            "entries": [e.to_dict() for e in self.entries],
            "seconds": self.seconds,
        }

    def summary_line(self) -> str:
        """One line naming the located unit, its loss in numbers that add up, and whether it adds or amplifies."""
        e = self.located
        if e is None:
            return "first divergence: none (no unit loses SQNR)"
        if e.jump_db == math.inf or (math.isinf(e.output_sqnr_db) and e.output_sqnr_db > 0):
            return f"first divergence: none (no quantization error reaches {e.name})"
        # The loss is printed as the difference of the two numbers printed beside it, so that a
        # reader's subtraction agrees with it (it differs from jump_db by rounding, under 0.1 dB).
        out = round(e.output_sqnr_db, 1)
        if e.input_sqnr_db > self.reference_db:  # a clean input: the jump starts at the reference
            start = round(self.reference_db, 1)
            inp = "carries no error" if math.isinf(e.input_sqnr_db) else f"at {_db(e.input_sqnr_db)} dB, is cleaner than that"
            src = (f"the {start:.1f} dB reference (the median SQNR a unit keeps when it alone is quantized; its input "
                   f"{inp}, so it counts as {start:.1f} dB)")
        else:
            start = round(e.input_sqnr_db, 1)
            src = f"{start:.1f} dB at its input"
        how = "adds the error itself" if e.adds_error else "amplifies inherited error"
        return (f"first divergence: {e.name} loses {start - out:.1f} dB SQNR, from {src} to {out:.1f} dB at its "
                f"output; it {how} ({_db(e.local_sqnr_db)} dB SQNR when run alone on float input)")


def _db(x: float) -> str:
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.1f}"


@dataclass
class _Unit:
    name: str
    kind: str
    module: Any  # wrapper (None for "model")
    method: str  # "forward" | "forward_static" | "" for "model"
    orig: Any = None
    calls: int = 0
    fp_in: torch.Tensor | None = None
    fp_out: torch.Tensor | None = None
    q_rest: tuple | None = None  # (args[1:], kwargs) of the quantized call: constants as quantized
    sums: dict[str, list[float]] = field(default_factory=lambda: {k: [0.0, 0.0, 0] for k in ("in", "out", "local")})

    def add(self, which: str, fp: torch.Tensor, q: torch.Tensor) -> None:
        fp = fp.detach().reshape(-1).float()
        q = q.detach().reshape(-1).float()
        if fp.shape != q.shape:
            raise RuntimeError(f"{self.name}: float {which} has {fp.numel()} values, quantized {q.numel()}")
        d = q - fp
        s = self.sums[which]
        s[0] += float(torch.dot(fp, fp))
        s[1] += float(torch.dot(d, d))
        s[2] += int(fp.numel())

    def sqnr(self, which: str) -> float:
        ff, dd, n = self.sums[which]
        return sqnr_from_sums(ff, dd) if n else math.nan

    def mse(self, which: str) -> float:
        ff, dd, n = self.sums[which]
        return dd / n if n else math.nan


def _is_leaf(wrapper) -> bool:
    return not any(isinstance(m, QuantModule) for m in wrapper.modules() if m is not wrapper)


def divergence_units(qmodel, unit: str = "layer") -> list[tuple[str, str]]:
    """(name, kind) of the units the locator walks, in forward order."""
    return [(u.name, u.kind) for u in _units(qmodel, unit)]


def _units(qmodel, unit: str) -> list[_Unit]:
    if unit not in UNITS:
        raise ConfigError(f"unknown divergence unit {unit!r}; use 'layer' or 'module'")
    units: list[_Unit] = []
    if unit == "layer":
        pe = qmodel.patch_embedder
        units.append(_Unit(pe.module_name, wrapper_kind(pe), pe, "forward_static"))
        for layer in qmodel.encoder.layers:
            units.append(_Unit(layer.module_name, wrapper_kind(layer), layer, "forward"))
        pool = qmodel.pooler
        units.append(_Unit(pool.module_name, wrapper_kind(pool), pool, "forward_static"))
    else:
        for name, w in qmodel.wrappers():
            if getattr(w, "obs_output", None) is None or not _is_leaf(w):
                continue
            method = "forward_static" if hasattr(type(w), "forward_static") else "forward"
            units.append(_Unit(name, wrapper_kind(w), w, method))
    units.append(_Unit(MODEL, "model", None, ""))
    return units


class _UnitTap(MethodTap):
    """Taps each unit's entry method (``forward`` or, on the static path, ``forward_static``).

    The static path calls the patch embedder's and pooler's ``forward_static`` directly and each layer
    and leaf through ``__call__`` -> ``forward``. FP phase: the unit's activation input (first argument)
    and output are kept; quantized phase: both are compared with their FP twins as they are produced,
    and the remaining arguments (RoPE tables as the quantized model sees them, pooling matrix,
    position rows) are kept for the unit's local run.
    """

    def __init__(self, units: list[_Unit], cancel: CancelToken, what: str):
        super().__init__(self._around_unit)
        self.units = [u for u in units if u.module is not None]
        self._by_module = {id(u.module): u for u in self.units}
        self.phase = "off"
        self.cancel = cancel
        self.what = what  # names the step in the cancel message

    def targets(self) -> list[tuple[Any, str]]:
        """Each unit's entry method."""
        return [(u.module, u.method) for u in self.units]

    def __enter__(self):
        super().__enter__()
        for u in self.units:
            u.orig = self.original(u.module, u.method)
        return self

    def __exit__(self, *exc):
        super().__exit__(*exc)
        for u in self.units:
            u.fp_in = u.fp_out = u.q_rest = None

    def _around_unit(self, module, orig, *args, **kwargs):
        phase = self.phase
        if phase == "off":
            return orig(*args, **kwargs)
        self.cancel.raise_if_cancelled(self.what)
        u = self._by_module[id(module)]
        x = args[0]
        if phase == "fp":
            u.calls += 1
            u.fp_in = x.detach()
            out = orig(*args, **kwargs)
            u.fp_out = first_tensor(out).detach()
            return out
        if u.fp_in is not None:
            u.add("in", u.fp_in, x)
        u.q_rest = (args[1:], dict(kwargs))
        out = orig(*args, **kwargs)
        if u.fp_out is not None:
            u.add("out", u.fp_out, first_tensor(out))
        return out


def _check_ran_once(units: list[_Unit]) -> None:
    for u in units:
        if u.calls > 1:
            raise RuntimeError(f"{u.name} ran {u.calls} times for one image; the locator expects one")


def _run_alone(qmodel, units: list[_Unit], model_u: _Unit, cancel: CancelToken, what: str) -> None:
    """Run each unit quantized on its FP input; compare with its FP output ("local" error)."""
    # On the static path, as in forward_static: RMSNorm switches to its quantized static maths.
    with qmodel.static_path():
        for u in units:
            cancel.raise_if_cancelled(what)
            if u is model_u:
                if u.fp_in is not None:
                    u.add("local", u.fp_out, qmodel.standardize_pooled(u.fp_in))
                continue
            if not u.calls or u.fp_in is None:
                continue
            rest_args, rest_kwargs = u.q_rest or ((), {})
            out = first_tensor(u.orig(u.fp_in, *rest_args, **rest_kwargs))
            u.add("local", u.fp_out, out)
            del out
            # Free this image's tensors as we go (the model unit holds the pooler output).
            u.fp_in = u.fp_out = u.q_rest = None


class DivergenceSearch:
    """The locator's per-image steps over a stream of images; shared by ``locate_divergence_batches`` and
    the one analysis pass (core.analysis.analysis_pass).

    Inside ``with`` (model in QUANT mode, under ``torch.no_grad``) each unit's entry method is tapped.
    Per image: ``start("fp")``, the float pass, ``float_done(fp_final)``; ``start("q")``, the quantized
    pass, ``quant_done(fp_final, q_final)``; ``run_alone()``; ``end_image(image_id)``. ``result()``
    at any point: the entries of the images ended so far. ConfigError for an unknown unit.
    """

    def __init__(self, qmodel, unit: str, cancel: CancelToken, what: str = "Divergence search"):
        self.qmodel = qmodel
        self.unit = unit
        self.cancel = cancel
        self.what = what
        self.units = _units(qmodel, unit)
        self.by_name = {u.name: u for u in self.units}
        self.model_u = self.by_name[MODEL]
        self.pooler_name = qmodel.pooler.module_name
        self.images: list[str] = []
        self.tap = _UnitTap(self.units, cancel, what)
        # The pooler's output is the "model" unit's input; in layer mode the pooler is a unit
        # already, in module mode it is a leaf: either way its tap records that tensor.
        self.pooler_u = next((u for u in self.tap.units if u.module is qmodel.pooler), None)
        if self.pooler_u is None:
            raise RuntimeError(f"{self.pooler_name}: no unit taps the pooler")

    def __enter__(self):
        self.tap.__enter__()
        return self

    def __exit__(self, *exc):
        self.tap.__exit__(*exc)
        self.release()

    def release(self) -> None:
        """Drop the tensors kept for the current image."""
        for u in self.units:
            u.fp_in = u.fp_out = u.q_rest = None

    def start(self, phase: str) -> None:
        """Before the float ("fp") or the quantized ("q") pass of an image."""
        if phase == "fp":
            for u in self.tap.units:
                u.calls = 0
        self.tap.phase = phase

    def float_done(self, fp_final: torch.Tensor) -> None:
        """After the float pass: every unit ran once; the "model" unit's float input and output."""
        self.tap.phase = "off"
        _check_ran_once(self.tap.units)
        self.model_u.fp_in, self.model_u.fp_out = self.pooler_u.fp_out, fp_final

    def quant_done(self, fp_final: torch.Tensor, q_final: torch.Tensor) -> None:
        """After the quantized pass: the final output's cumulative error."""
        self.tap.phase = "off"
        self.model_u.add("out", fp_final, q_final)

    def run_alone(self) -> None:
        """Every unit alone, quantized, on its float input (its local error)."""
        _run_alone(self.qmodel, self.units, self.model_u, self.cancel, self.what)

    def step_done(self) -> None:
        """Lockstep (the analysis pass): after one step of the model ran float ("fp") then quantized ("q"),
        each unit that ran in it alone on its float input; their tensors are freed."""
        self.tap.phase = "off"
        ran = [u for u in self.tap.units if u.calls]
        _check_ran_once(ran)
        _run_alone(self.qmodel, ran, self.model_u, self.cancel, self.what)

    def final_done(self, fp_pooled: torch.Tensor, fp_final: torch.Tensor, q_final: torch.Tensor) -> None:
        """Lockstep: after the last step, the "model" unit (input: the pooler's float output)."""
        self.quant_done(fp_final, q_final)
        self.model_u.fp_in, self.model_u.fp_out = fp_pooled, fp_final
        _run_alone(self.qmodel, [self.model_u], self.model_u, self.cancel, self.what)
        self.model_u.fp_in = self.model_u.fp_out = None

    def end_image(self, image_id: str) -> None:
        """The image is done: free its tensors and count it."""
        self.release()
        self.images.append(image_id)

    def result(self, seconds: float = 0.0) -> DivergenceResult:
        """The DivergenceResult of the images ended so far."""
        entries, ref = _entries(self.units, self.by_name, self.pooler_name)
        return DivergenceResult(
            unit=self.unit,
            entries=entries,
            located=_locate(entries),
            images=list(self.images),
            seconds=seconds,
            reference_db=ref,
        )


def locate_divergence_batches(
    qmodel,
    batches: Iterable[Mapping],
    unit: str = "layer",
    progress: Progress | None = None,
    cancel: CancelToken | None = None,
    total: int | None = None,
    keep_float: Sequence[str] | None = None,
    on_image: Callable[[ImageErrorMaps], None] | None = None,
) -> DivergenceResult:
    """First-divergence search over preprocessor batches (streamed, one image at a time).

    ``keep_float``: extra modules kept float in the quantized runs (a what-if). ``on_image``:
    called once per image with an ImageErrorMaps of the final output only, built from the two
    passes the search runs anyway (a report's heatmaps at no extra forward).
    """
    cancel = cancel or CancelToken()
    keep = list(keep_float or [])
    search = DivergenceSearch(qmodel, unit, cancel)
    t0 = time.perf_counter()
    device = model_device(qmodel)
    steps_per_image = 3
    done = 0
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)  # type: ignore[arg-type]

    def tick(msg: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, steps_per_image * (total or len(search.images)), msg)

    try:
        cancel.raise_if_cancelled("Divergence search")
        enter_quant(qmodel)
        with torch.no_grad(), search:
            for batch in single_image_batches(batches):
                cancel.raise_if_cancelled("Divergence search")
                inputs, ids = model_inputs(batch, device)
                image_id = ids[0] if ids else f"image {len(search.images) + 1}"
                # 1. float reference
                search.start("fp")
                fp_final = fp_forward(qmodel, inputs)
                search.float_done(fp_final)
                tick(f"{image_id}: float pass")
                cancel.raise_if_cancelled("Divergence search")
                # 2. full quantized run: cumulative error at every unit's input and output
                search.start("q")
                q_final = quant_forward(qmodel, inputs, keep)
                search.quant_done(fp_final, q_final)
                if on_image is not None:
                    on_image(ImageErrorMaps.of_final_output(qmodel, inputs, image_id, fp_final, q_final))
                del q_final
                tick(f"{image_id}: quantized pass")
                # 3. every unit alone, quantized, on its float input
                search.run_alone()
                tick(f"{image_id}: units alone")
                search.end_image(image_id)
                del fp_final
    finally:
        search.release()
        qmodel.set_keep_float([])
    return search.result(time.perf_counter() - t0)


def _entries(units: list[_Unit], by_name: dict[str, _Unit], pooler_name: str) -> tuple[list[DivergenceEntry], float]:
    entries = []
    for u in units:
        if u.name == MODEL:
            # Its input is the pooler's output (a unit in both modes: the pooler is a leaf).
            inp = by_name[pooler_name].sqnr("out") if pooler_name in by_name else math.nan
        else:
            if not u.sums["out"][2]:
                continue  # never ran on the static path
            inp = u.sqnr("in")
        out = u.sqnr("out")
        entries.append(
            DivergenceEntry(
                name=u.name,
                kind=u.kind,
                input_sqnr_db=inp,
                output_sqnr_db=out,
                local_sqnr_db=u.sqnr("local"),
                jump_db=math.nan,
                local_mse=u.mse("local"),
                cumulative_mse=u.mse("out"),
            )
        )
    local = [e.local_sqnr_db for e in entries if not math.isnan(e.local_sqnr_db)]
    ref = float(np.median(local)) if local else math.inf
    for e in entries:
        e.jump_db = jump_db(e.input_sqnr_db, e.output_sqnr_db, ref)
        e.adds_error = _adds(e.local_sqnr_db, e.input_sqnr_db, ref)
    return entries, ref


def jump_db(inp: float, out: float, ref: float) -> float:
    """SQNR a unit loses: its input SQNR capped at the reference, minus its output SQNR (module docstring)."""
    if math.isnan(inp) or math.isnan(out):
        return math.nan
    # A clean input (or one cleaner than a typical unit keeps): measure from the reference.
    inp = min(inp, ref)
    if out == math.inf:
        return 0.0 if inp == math.inf else -math.inf
    return inp - out


def _locate(entries: list[DivergenceEntry]) -> DivergenceEntry | None:
    finite = [e for e in entries if not math.isnan(e.jump_db)]
    if not finite:
        return None
    best = max(e.jump_db for e in finite)
    if best == -math.inf:
        return None
    for e in finite:  # forward order: the earliest unit within TIE_DB of the largest jump
        if e.jump_db >= best - TIE_DB:
            return e
    return None


def locate_divergence(
    session,
    images=None,
    unit: str = "layer",
    progress: Progress | None = None,
    cancel: CancelToken | None = None,
    keep_float: Sequence[str] | None = None,
    on_image: Callable[[ImageErrorMaps], None] | None = None,
) -> DivergenceResult:
    """First-divergence search on a calibrated session's images (default: its usable image set)."""
    cancel = cancel or CancelToken()
    session.require_calibrated()
    cancel.raise_if_cancelled("Divergence search")
    entries = session.entries_for(images)

    callback = None
    if on_image is not None:
        seen = [0]

        def callback(maps: ImageErrorMaps) -> None:
            maps.path = str(entries[seen[0]].path)  # batches of one, in entry order
            seen[0] += 1
            on_image(maps)

    return locate_divergence_batches(
        session.qmodel,
        batches_to_device(session.batches(entries), session.device),
        unit=unit,
        progress=progress,
        cancel=cancel,
        total=len(entries),
        keep_float=keep_float,
        on_image=callback,
    )
