"""Three-way check of an exported Circle model: torch FP vs torch fake-quant vs the Circle file.

For one image, every wrapper's output is taken three ways:

- **FP**: the static path in QUANT mode with every observer kept float (what ``core.analysis.compare``
  calls the FP reference: same wrappers, same graph, no fake-quant);
- **FQ**: the same path with the observers as they were at export (fake-quantized);
- **Circle**: the value of the matching tensor when TICO's Python reference runtime runs the
  written file in FAKE_QUANTIZE mode (quantized tensors are held dequantized, so the values
  compare directly with torch's).

Circle tensors are tied to our modules by the export's name map (``ExportResult.tensor_modules``,
built from each FX node's ``nn_module_stack``). **Pairing rule**: a module's output tensor is the
*last* Circle tensor, in operator order, produced inside that module's scope (the module itself
or any module below it) whose shape equals the torch output's shape, or equals it once size-1
dimensions are dropped. Containers therefore pair with the output of their last child (the
attention block with its o_proj output, a layer with its residual add), as in
``core.analysis.tap.module_output_observers``. The model's final output pairs with the graph output.

Metrics (``a`` is the reference, ``b`` the other side, over every value of the tensor):
PEIR = max|a - b| / (max a - min a); max_abs = max|a - b|; for fq_vs_circle on a quantized
tensor, steps = |a - b| / scale of the Circle tensor, ``within_one_step`` = share of values with
at most one step (a hair over counts: both sides round the same value independently), and
``max_steps`` the largest.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.analysis.tap import FqTap, module_output_observers
from core.data.images import ImagePreprocessor
from core.data.resources import sample_images
from core.errors import CancelledError, ExportError, NotCalibratedError, exception_line
from core.export.checks import summarize_circle
from core.export.pipeline import ExportResult, layout_fingerprint
from core.export.runtime import run_circle_tensors
from core.export.tensor_map import ROOT_MODULE
from core.export.verdict import STEP_HAIR, NoiseFloor, gemm_rounding_error, judge, rounding_noise
from core.io import finite_or_none
from core.quant.mode import Mode

Progress = Callable[[int, int, str], None]

__all__ = [
    "Diff",
    "ThreeWayRow",
    "ThreeWayResult",
    "three_way_check",
    "three_way_session",
    "ROOT_MODULE",
]


# --------------------------------------------------------------------------- results
@dataclass
class Diff:
    """Difference of two versions of one tensor (the first is the reference)."""

    peir: float
    max_abs: float
    within_one_step: float | None = None  # quantized Circle tensors only
    max_steps: float | None = None  # quantized Circle tensors only

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (inf/nan become null)."""
        return {
            "peir": finite_or_none(self.peir),
            "max_abs": finite_or_none(self.max_abs),
            "within_one_step": finite_or_none(self.within_one_step),
            "max_steps": finite_or_none(self.max_steps),
        }


@dataclass
class ThreeWayRow:
    """One module output, three ways: torch FP, torch fake-quant (FQ), Circle."""

    tensor: str  # Circle tensor name
    module: str  # our module name (ROOT_MODULE: the model's final output)
    shape: tuple[int, ...]  # Circle shape
    dtype: str  # Circle tensor type, e.g. UINT8, FLOAT32
    scale: float | None  # Circle qparams (None: the tensor has none)
    zero_point: int | None
    fp_vs_fq: Diff  # the quantization error of the torch model
    fq_vs_circle: Diff  # what the file adds on top of the fake-quant model (should be ~1 step)
    fp_vs_circle: Diff  # the total error of the file against float
    observer: str | None = None  # the torch observer whose output was compared
    operator: int = -1  # index of the Circle operator producing the tensor (-1: graph input)
    quantized: bool = True
    # torch fake-quant against itself under this machine's rounding noise (core.export.verdict), and the
    # verdict of fq_vs_circle judged against it: "verified", "check" or "failed".
    noise_floor: Diff | None = None
    verdict: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "tensor": self.tensor,
            "module": self.module,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "scale": finite_or_none(self.scale),
            "zero_point": self.zero_point,
            "quantized": self.quantized,
            "observer": self.observer,
            "operator": self.operator,
            "fp_vs_fq": self.fp_vs_fq.to_dict(),
            "fq_vs_circle": self.fq_vs_circle.to_dict(),
            "fp_vs_circle": self.fp_vs_circle.to_dict(),
            "noise_floor": self.noise_floor.to_dict() if self.noise_floor is not None else None,
            "verdict": self.verdict,
        }


@dataclass
class ThreeWayResult:
    """Rows in forward (Circle operator) order; the last row is the model's final output."""

    path: Path
    rows: list[ThreeWayRow]
    runtime: str
    intermediates_available: bool
    note: str
    unmatched: list[tuple[str, str]] = field(default_factory=list)  # (module, why no Circle tensor)
    unquantized: list[tuple[str, str]] = field(default_factory=list)  # (Circle tensor, module)
    image: str | None = None
    seconds: float = 0.0

    @property
    def output(self) -> ThreeWayRow | None:
        """The final-output row."""
        return self.rows[-1] if self.rows else None

    def row(self, module: str) -> ThreeWayRow | None:
        """The row of `module` (None when it has none)."""
        return next((r for r in self.rows if r.module == module), None)

    def worst(self, n: int = 10) -> list[ThreeWayRow]:
        """The n rows where the Circle file departs most from the fake-quant model (in steps, else PEIR)."""

        def key(r: ThreeWayRow) -> float:
            d = r.fq_vs_circle
            return -(d.max_steps if d.max_steps is not None else d.peir)

        return sorted(self.rows, key=key)[:n]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "path": str(self.path),
            "image": self.image,
            "runtime": self.runtime,
            "intermediates_available": self.intermediates_available,
            "note": self.note,
            "rows": [r.to_dict() for r in self.rows],
            "unmatched": [list(u) for u in self.unmatched],
            "unquantized": [list(u) for u in self.unquantized],
            "seconds": self.seconds,
        }

    def summary_lines(self) -> list[str]:
        """Human-readable lines: the note, one line per row, the unmatched modules and float tensors."""
        lines = [f"three-way check of {self.path.name} ({self.runtime})", self.note]
        width = max([len(r.module) for r in self.rows] + [6])
        lines.append(
            f"{'module':<{width}}  {'fp-vs-fq peir':>13}  {'fq-vs-circle peir':>17}  {'<=1 step':>8}  "
            f"{'max steps':>9}  {'noise <=1':>9}  {'verdict':>8}  {'fp-vs-circle peir':>17}  tensor"
        )
        for r in self.rows:
            d = r.fq_vs_circle
            within = f"{100 * d.within_one_step:7.2f}%" if d.within_one_step is not None else f"{'float':>8}"
            steps = f"{d.max_steps:9.2f}" if d.max_steps is not None else f"{'-':>9}"
            n = r.noise_floor
            noise = f"{100 * n.within_one_step:8.2f}%" if n is not None and n.within_one_step is not None else f"{'-':>9}"
            lines.append(
                f"{r.module:<{width}}  {r.fp_vs_fq.peir:13.3e}  {d.peir:17.3e}  {within}  {steps}  {noise}  "
                f"{r.verdict or '-':>8}  {r.fp_vs_circle.peir:17.3e}  {r.tensor}"
            )
        for module, why in self.unmatched:
            lines.append(f"not compared: {module}: {why}")
        if self.unquantized:
            lines.append(f"tensors without qparams: {len(self.unquantized)}")
            lines.extend(f"  {t} (module {m})" for t, m in self.unquantized)
        return lines


# --------------------------------------------------------------------------- public API
def three_way_check(
    qmodel: Any,
    export: ExportResult | str | os.PathLike[str],
    batch: Mapping[str, Any],
    progress: Progress | None = None,
    cancel: Any = None,
    *,
    tensor_modules: Mapping[str, str] | None = None,
    modules: Sequence[str] | None = None,
) -> ThreeWayResult:
    """Compare torch FP, torch fake-quant and the exported Circle file, module by module, on one image.

    `export` is the ExportResult of `export_circle` (its name map and layout are used) or a path
    to a .circle file, then with `tensor_modules` (Circle tensor -> module name, e.g. a saved
    ``ExportResult.tensor_modules``); without a name map only the final output is compared.
    `batch` is a preprocessed batch of one: the image layout the file was exported for.
    `modules` (dotted globs, a glob also names its children) limits the rows to those modules
    (the final output is always compared): every compared tensor is held three times in memory.
    """
    t0 = time.perf_counter()
    total, done = 4, 0

    def check_cancel() -> None:
        if cancel is not None and getattr(cancel, "cancelled", False):
            raise CancelledError("three-way check cancelled; run it again to get results")

    def step(message: str) -> None:
        nonlocal done
        check_cancel()
        done += 1
        if progress is not None:
            progress(done, total, message)

    path, data, names, layout, unquantized = _resolve_export(export, tensor_modules)
    from tico.circle.runtime.program import CircleProgram  # noqa: PLC0415 -- tico.circle.* costs ~0.6 s at import (measured); only export and its checks run it

    try:
        program = CircleProgram.from_bytes(data)
    except Exception as exc:
        raise ExportError(f"{path}: not a readable Circle model ({exception_line(exc)}); export the model again") from exc
    pixel_values, position_ids, image = _batch_of_one(batch)
    if layout and layout != layout_fingerprint(position_ids):
        raise ExportError(
            f"{path.name} was exported for another image layout than this batch: pass the image it was exported with"
        )
    expected = tuple(program.tensor(program.inputs[0]).shape) if program.inputs else ()
    if expected and tuple(pixel_values.shape) != expected:
        raise ExportError(
            f"{path.name} takes pixel values of shape {list(expected)}, the batch has {list(pixel_values.shape)}: "
            "preprocess the image with the max_soft_tokens the model was exported with"
        )
    quantized_file = any(t.is_quantized_integer and not t.is_constant for t in program.tensors)
    if names is not None and not unquantized:
        unquantized = _unquantized(data, names)

    # ---- torch: FP and fake-quant outputs of every wrapper, from the same static path
    step("torch passes")
    with qmodel.mode_as(_check_mode(qmodel, quantized_file)):
        targets = _output_targets(qmodel, modules)
        fp, fq, fp_out, fq_out, floors, rel = _torch_outputs(qmodel, targets, pixel_values, position_ids)

    # ---- pairing: module -> Circle tensor index
    step("pairing tensors")
    producer = {o: op.index for op in program.operators for o in op.outputs if o >= 0}
    order = sorted(producer, key=lambda i: producer[i])
    pairs: list[tuple[str, str, int]] = []  # (module, observer, tensor index)
    unmatched: list[tuple[str, str]] = []
    if names is not None:
        module_of = {t.index: names.get(t.name) for t in program.tensors}
        for module, observer in targets:
            value = fp.get(observer)
            if value is None:
                unmatched.append((module, "its output was not produced on the static path"))
                continue
            index = _pair(module, tuple(value.shape), order, module_of, program)
            if index is None:
                unmatched.append((module, f"no Circle tensor of shape {list(value.shape)} inside its scope"))
                continue
            pairs.append((module, observer, index))
    final_index = program.outputs[0]

    # ---- Circle: one run of the reference runtime; each wanted tensor is compared the moment it
    # exists and its torch pair dropped, so only two of the three copies are ever held.
    step("running the Circle model")
    wanted = {index for _, _, index in pairs} | {final_index}
    readers: dict[int, list[tuple[str, str]]] = {}
    uses: dict[str, int] = {}
    for module, observer, index in pairs:
        readers.setdefault(index, []).append((module, observer))
        uses[observer] = uses.get(observer, 0) + 1
    rows: list[ThreeWayRow] = []
    final_row: list[ThreeWayRow] = []

    def compare(index: int, value: np.ndarray) -> None:
        check_cancel()
        tensor, operator = program.tensor(index), producer.get(index, -1)
        for module, observer in readers.get(index, ()):
            rows.append(_row(module, observer, tensor, operator, fp[observer], fq[observer], value, floors.get(observer), rel))
            uses[observer] -= 1
            if not uses[observer]:
                del fp[observer], fq[observer]
        if index == final_index:
            final_row.append(_row(ROOT_MODULE, None, tensor, operator, fp_out, fq_out, value, floors.get(ROOT_MODULE), rel))

    compared, runtime_name, intermediates = run_circle_tensors(data, pixel_values, wanted, compare)

    step("comparing")
    unmatched += [(module, "the runtime did not expose its tensor") for module, _, index in pairs if index not in compared]
    rows.sort(key=lambda r: r.operator)  # forward order; ties keep the wrapper order
    rows += final_row

    if not intermediates:
        note = (
            "the runtime returned the graph output only: intermediate tensors are not compared, "
            "only the final output is"
        )
    elif names is None:
        note = "no name map was given (pass an ExportResult or tensor_modules): only the final output is compared"
    else:
        note = (
            f"every Circle tensor is exposed: {runtime_name} was run operator by operator and each module output "
            f"was taken from the last tensor of matching shape inside that module's scope ({len(rows) - 1} modules"
            + (f", {len(unmatched)} without a tensor" if unmatched else "")
            + ")"
        )
    return ThreeWayResult(
        path=path,
        rows=rows,
        runtime=runtime_name,
        intermediates_available=intermediates,
        note=note,
        unmatched=unmatched,
        unquantized=list(unquantized or []),
        image=image,
        seconds=time.perf_counter() - t0,
    )


def three_way_session(
    session: Any,
    export: ExportResult | str | os.PathLike[str],
    image: Any = None,
    progress: Progress | None = None,
    cancel: Any = None,
    *,
    tensor_modules: Mapping[str, str] | None = None,
    modules: Sequence[str] | None = None,
) -> ThreeWayResult:
    """three_way_check on a Session: its wrapped model and preprocessor, and by default the image
    Session.export uses (the first usable image). A quantized file needs a calibrated session
    (NotCalibratedError otherwise)."""
    if image is None:
        usable = session.usable_images()
        if usable:
            image = usable[0].path
        else:
            image = sample_images()[0]  # what export_circle falls back to
    patches = _exported_patches(export)
    pre = session.preprocessor
    k2 = int(session.qmodel.config.pooling_kernel_size) ** 2
    if patches and patches != int(pre.max_soft_tokens) * k2:
        pre = ImagePreprocessor(session.qmodel.config, max_soft_tokens=patches // k2)
    batch = dict(pre([image]))
    batch["image_ids"] = [Path(str(image)).name]
    return three_way_check(
        session.qmodel, export, batch, progress=progress, cancel=cancel, tensor_modules=tensor_modules, modules=modules
    )


# --------------------------------------------------------------------------- torch side
def _output_targets(qmodel: Any, globs: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """(module name, observer name) of every wrapper output (matching `globs`), in wrapper order."""
    def wanted(name: str) -> bool:
        return globs is None or any(fnmatchcase(name, g) or fnmatchcase(name, g + ".*") for g in globs)

    return [(name, obs.name) for name, _, obs in module_output_observers(qmodel) if wanted(name)]


class _Outputs(FqTap):
    """Keeps the first value each chosen observer sees (see core.analysis.tap.FqTap)."""

    def __init__(self, qmodel: Any, names: set[str]):
        super().__init__(qmodel, self._keep)
        self.names = names
        self.store: dict[str, torch.Tensor] = {}

    def _keep(self, obs: Any, y: torch.Tensor) -> None:
        if obs.name in self.names and obs.name not in self.store:
            self.store[obs.name] = y.detach().float().cpu().clone()


class _NoisyDiffs(FqTap):
    """On a pass under rounding noise, compares each chosen observer's first value with its clean twin."""

    def __init__(self, qmodel: Any, clean: Mapping[str, torch.Tensor]):
        super().__init__(qmodel, self._compare)
        self.clean = clean
        self.diffs: dict[str, Diff] = {}

    def _compare(self, obs: Any, y: torch.Tensor) -> None:
        if obs.name in self.clean and obs.name not in self.diffs:
            scale = float(obs.scale.max()) if obs.enabled and bool(obs.frozen) and self.qmodel.mode is Mode.QUANT else None
            self.diffs[obs.name] = _diff(self.clean[obs.name], y.detach().float().cpu(), scale)


def _torch_outputs(qmodel, targets, pixel_values, position_ids):
    """FP and fake-quant values of every target observer plus both final outputs, and the fake-quant
    pass against itself under this machine's rounding noise (core.export.verdict), per observer and final."""
    names = {obs for _, obs in targets}
    saved = qmodel.observer_flags()
    inputs = {"pixel_values": pixel_values, "pixel_position_ids": position_ids}
    try:
        with torch.no_grad():
            qmodel.set_observer_flags([False] * len(saved))
            with _Outputs(qmodel, names) as cap:
                fp_out = qmodel(**inputs, static=True).last_hidden_state.detach().float().cpu()
            fp = cap.store
            qmodel.set_observer_flags(saved)
            with _Outputs(qmodel, names) as cap:
                fq_out = qmodel(**inputs, static=True).last_hidden_state.detach().float().cpu()
            fq = cap.store
            rel = gemm_rounding_error(qmodel, int((position_ids[0] >= 0).all(dim=-1).sum()))
            with _NoisyDiffs(qmodel, fq) as noisy, rounding_noise(qmodel, rel, seed=1):
                noisy_out = qmodel(**inputs, static=True).last_hidden_state.detach().float().cpu()
            floors = noisy.diffs
            last = qmodel.observers()[-1] if qmodel.observers() else None
            out_scale = float(last.scale.max()) if last is not None and last.enabled and bool(last.frozen) and qmodel.mode is Mode.QUANT else None
            floors[ROOT_MODULE] = _diff(fq_out, noisy_out, out_scale)
    finally:
        qmodel.set_observer_flags(saved)
    return fp, fq, fp_out, fq_out, floors, rel


def _check_mode(qmodel: Any, quantized_file: bool) -> Mode:
    """The mode the torch passes run in (the file's: QUANT for a quantized file, else NO_QUANT)."""
    if qmodel.mode is Mode.CALIB:
        raise ExportError("the model is calibrating: convert it (QUANT) before the three-way check")
    if not quantized_file:
        return Mode.NO_QUANT
    if qmodel.mode is not Mode.QUANT and not qmodel.is_calibrated:
        raise NotCalibratedError("the Circle file is quantized but the model is not calibrated: calibrate it first")
    return Mode.QUANT


# --------------------------------------------------------------------------- circle side
def _resolve_export(export, tensor_modules):
    """(path, bytes, name map or None, export layout fingerprint or None, unquantized list)."""
    positions = None
    unquantized: list[tuple[str, str]] = []
    if isinstance(export, ExportResult):
        path = Path(export.path)
        names = dict(tensor_modules or export.tensor_modules or {}) or None
        positions = export.layout or None
        unquantized = list(export.unquantized)
    elif isinstance(export, (str, os.PathLike)):
        path = Path(export).expanduser()
        names = dict(tensor_modules) if tensor_modules else None
    else:
        raise ExportError(f"expected an ExportResult or a .circle path, not {type(export).__name__}")
    if not path.is_file():
        raise ExportError(f"{path}: no such Circle file; export the model first (or give the right path)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ExportError(f"{path}: cannot read the Circle file ({exc.strerror or exc}); check its permissions") from exc
    return path, data, names, positions, unquantized


def _exported_patches(export) -> int | None:
    """The number of input patches the file takes (its profile's max_patches)."""
    if isinstance(export, ExportResult):
        return int(export.max_patches) or None
    path = Path(export).expanduser()
    if not path.is_file():
        return None
    try:
        from tico.circle.runtime.program import CircleProgram  # noqa: PLC0415 -- tico.circle.* costs ~0.6 s at import (measured); only export and its checks run it

        program = CircleProgram.from_bytes(path.read_bytes())
        shape = program.tensor(program.inputs[0]).shape
        return int(shape[1]) if len(shape) == 3 else None
    except Exception:
        return None  # three_way_check reports the unreadable file


def _unquantized(data: bytes, names: Mapping[str, str]) -> list[tuple[str, str]]:
    return [(t, names.get(t, ROOT_MODULE)) for t in summarize_circle(data)["tensors_without_qparams"]]


def _batch_of_one(batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, str | None]:
    if not isinstance(batch, Mapping) or "pixel_values" not in batch or "pixel_position_ids" not in batch:
        raise ExportError("the three-way check needs a preprocessed batch (pixel_values and pixel_position_ids)")
    pixels = torch.as_tensor(batch["pixel_values"])[:1].float().cpu()
    positions = torch.as_tensor(batch["pixel_position_ids"])[:1].long().cpu()
    ids = batch.get("image_ids") or [None]
    return pixels, positions, ids[0]


def _pair(module, shape, order, module_of, program) -> int | None:
    """The last produced tensor inside `module`'s scope whose shape matches `shape` (see module doc)."""
    squeezed = tuple(d for d in shape if d != 1)
    prefix = module + "."
    for index in reversed(order):
        owner = module_of.get(index)
        if owner is None or not (owner == module or owner.startswith(prefix)):
            continue
        got = tuple(program.tensor(index).shape)
        if got == shape or tuple(d for d in got if d != 1) == squeezed:
            return index
    return None


# --------------------------------------------------------------------------- metrics
def _row(module, observer, tensor, operator, fp, fq, circle, floor: Diff | None = None, rel: float = 0.0) -> ThreeWayRow:
    from tico.circle.runtime.program import tensor_type_name  # noqa: PLC0415 -- tico.circle.* costs ~0.6 s at import (measured); only export and its checks run it

    c = torch.from_numpy(np.asarray(circle, dtype=np.float32).copy())
    fp = fp.float()
    fq = fq.float()
    if c.numel() == fq.numel() and c.shape != fq.shape:
        c = c.reshape(fq.shape)
    quantized = bool(tensor.is_quantized)
    scale = zero_point = None
    if quantized:
        q = tensor.quantization
        scales = np.asarray(q.scale, dtype=np.float64).reshape(-1)
        zps = np.asarray(q.zero_point).reshape(-1) if q.zero_point is not None else np.zeros(1, np.int64)
        scale = float(scales.max()) if scales.size else None
        zero_point = int(zps[0]) if zps.size else None
    fq_vs_circle = _diff(fq, c, scale)
    verdict = ""
    if floor is not None:
        verdict = judge(
            mode="quant" if scale else "float",
            within=fq_vs_circle.within_one_step, max_steps=fq_vs_circle.max_steps, max_abs=fq_vs_circle.max_abs,
            floor=NoiseFloor(rel, floor.within_one_step, floor.max_steps, floor.max_abs, 1, int(fq.numel())),
        ).level
    return ThreeWayRow(
        tensor=tensor.name,
        module=module,
        shape=tuple(int(d) for d in tensor.shape),
        dtype=tensor_type_name(tensor.tensor_type),
        scale=scale,
        zero_point=zero_point,
        fp_vs_fq=_diff(fp, fq),
        fq_vs_circle=fq_vs_circle,
        fp_vs_circle=_diff(fp, c),
        observer=observer,
        operator=int(operator),
        quantized=quantized,
        noise_floor=floor,
        verdict=verdict,
    )


def _diff(ref: torch.Tensor, other: torch.Tensor, scale: float | None = None) -> Diff:
    a = ref.reshape(-1).double()
    b = other.reshape(-1).double()
    if a.numel() != b.numel():
        return Diff(peir=math.inf, max_abs=math.inf)
    if a.numel() == 0:
        return Diff(0.0, 0.0, 1.0 if scale else None, 0.0 if scale else None)
    d = (a - b).abs()
    err = float(d.max())
    span = float(a.max() - a.min())
    peir = err / span if span > 0 else (0.0 if err == 0 else math.inf)
    within = steps = None
    if scale:
        within = float((d <= scale * (1 + STEP_HAIR)).double().mean())
        steps = err / scale
    return Diff(peir=peir, max_abs=err, within_one_step=within, max_steps=steps)

