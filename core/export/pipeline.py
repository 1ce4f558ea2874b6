"""Static Circle export of a wrapped Gemma4VisionModel, verified by running the written file.

Pipeline: ``as_export_module`` (one image layout) -> ``torch.export`` -> TICO's converter
(decompositions, FX legalize/quantization passes, serialisation, Circle O1 optimisation; driven by
core.export.runtime) -> staged write (core.io.StagedFile) -> TICO's Python reference runtime on the
example input, compared with ``forward_export`` and with the runtime ``forward`` of the same wrapped
model -> rename onto the target.

Name map: every Circle tensor is tied to the module that made it (``ExportResult.tensor_modules``,
built by core.export.tensor_map); core.analysis.threeway uses it. Structural checks of the graph and
of the written file live in core.export.checks.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from core.data.images import DEFAULT_SOFT_TOKENS, ImagePreprocessor
from core.data.resources import sample_images
from core.errors import (
    CancelledError,
    ExportError,
    NotCalibratedError,
    PTQStudioError,
    UnwritablePathError,
    exception_line,
)
from core.export.checks import check_graph, structural_problems, summarize_circle
from core.export.circle_edit import constant_matmul_as_fully_connected, quantize_float_input
from core.export.onert import check_in_onert
from core.export.runtime import convert_to_circle, reference_outputs
from core.export.tensor_map import ROOT_MODULE, TensorOrigins, module_paths, module_scopes, tensor_module_map
from core.export.verdict import NoiseFloor, Verdict, judge, noise_floor, within_one_step
from core.io import StagedFile
from core.quant import meta_kernels
from core.quant.mode import Mode

# torch.export must not run the fake-quantize kernels on real zero tensors (see meta_kernels).
meta_kernels.register()

Progress = Callable[[int, int, str], None]

# Stage names, in order; ExportResult.timings uses the same keys.
STAGES = (
    "export module",
    "torch.export",
    "decompositions",
    "converter passes",
    "serialisation",
    "circle optimisation",
    "write",
    "verify",
)


@dataclass
class VerifyResult:
    """The written file run by a reference runtime, compared with the torch model."""

    max_abs_diff: float  # vs forward_export (the exact graph that was exported)
    peir: float  # max |diff| / (max - min) of the forward_export output
    within_one_step: float  # fraction of output elements within one output quantization step
    max_steps: float  # max |diff| / step
    runtime: str
    vs_runtime_forward: float | None = None  # max |diff| vs qmodel(pixel_values, pixel_position_ids)
    mode: str = "quant"  # "quant" | "float"
    step: float | None = None  # output quantization step (None for a float export: tolerance 1e-4 used)
    output_observer: str | None = None
    export_vs_forward: float | None = None  # max |forward_export - forward| in torch
    seconds: float = 0.0
    # torch against itself under this machine's rounding noise, and what the numbers mean
    # (core.export.verdict): the same rules on every CPU.
    noise_floor: NoiseFloor | None = None
    verdict: Verdict | None = None
    # The same file run by ONE's runtime (core.export.onert.OnertResult); None when not attempted.
    onert: Any = None


@dataclass
class ExportResult:
    """What export_circle wrote and how it checked it."""

    path: Path
    bytes: int
    seconds: float
    op_counts: dict[str, int]
    tensors_without_qparams: list[str]
    io_tensors: list[str]
    verify: VerifyResult | None
    timings: dict[str, float] = field(default_factory=dict)
    mode: str = "quant"
    graph_nodes: int = 0  # call_function nodes of the torch.export graph
    soft_tokens: int = 0
    patches: int = 0  # valid patches of the profile
    max_patches: int = 0
    unquantized_details: dict[str, str] = field(default_factory=dict)
    # Circle tensor name -> our module name (dotted wrapper name; ROOT_MODULE for the model's own
    # ops and the graph input). Every tensor of the file is mapped; see core.export.tensor_map.
    tensor_modules: dict[str, str] = field(default_factory=dict)
    # tensors_without_qparams with the module that produced them (or, for a constant, uses it).
    unquantized: list[tuple[str, str]] = field(default_factory=list)
    # Fingerprint of the export profile's pixel_position_ids (layout_fingerprint): a three-way
    # check must feed the same image layout.
    layout: str = ""
    # Ops whose non-constant inputs and output differ in dtype with no QUANTIZE/DEQUANTIZE/CAST
    # between them: a failure (runtimes refuse or misread them), see summarize_circle.
    dtype_mismatches: list[str] = field(default_factory=list)
    # "integer": the graph input is integer with the pixels' qparams (feed core.export.onert.quantize_input
    # of the pixel values); "float": float32 input followed by a QUANTIZE op.
    input_dtype: str = "integer"


# --------------------------------------------------------------------------- public API
def export_circle(
    qmodel: Any,
    example: Any = None,
    out_path: str | os.PathLike[str] | None = None,
    verify: bool = True,
    progress: Progress | None = None,
    cancel: Any = None,
    *,
    mode: str | None = None,
    max_soft_tokens: int | None = None,
    image: Any = None,
    preprocessor: Any = None,
    strict: bool = False,
    circle_optimize: bool = False,
    compile_config: Any = None,
    input_dtype: str = "integer",
) -> ExportResult:
    """Export `qmodel` for one image layout to a static Circle file at `out_path` and verify it.

    `example` is a preprocessed batch of one (mapping with pixel_values and pixel_position_ids)
    or its pixel_position_ids; without it, `image` (or a bundled sample) is preprocessed at
    `max_soft_tokens`. `mode` is "quant" or "float" (default: the model's current mode).
    `input_dtype` "integer" gives a quantized model an integer input with the pixels' qparams,
    "float" a float32 input followed by a QUANTIZE op.
    The file is verified under a temporary name and renamed onto `out_path` only then: a failure
    or a cancel at any stage leaves any earlier file at `out_path` byte-identical.
    """
    start = time.perf_counter()
    # Session passes out_path positionally as the second argument; accept both orders.
    if isinstance(example, (str, os.PathLike)) and not isinstance(out_path, (str, os.PathLike)):
        example, out_path = out_path, example
    if out_path is None:
        raise ExportError("no output file given: pass out_path, e.g. model.circle")
    out = Path(out_path).expanduser()
    _check_writable(out)

    export_mode = _resolve_mode(qmodel, mode)
    input_dtype = _resolve_input_dtype(input_dtype)
    pixel_values, position_ids = _example_tensors(qmodel, example, image, max_soft_tokens, preprocessor)

    timings: dict[str, float] = {}
    total = len(STAGES) if verify else len(STAGES) - 1
    done = 0

    def step(name: str, check_cancel: bool = True) -> None:
        nonlocal done
        if check_cancel:
            _check_cancel(cancel, out)
        done += 1
        if progress is not None:
            progress(done, total, name)

    with qmodel.mode_as(Mode.QUANT if export_mode == "quant" else Mode.NO_QUANT):
        t = time.perf_counter()
        module = qmodel.as_export_module(position_ids).eval()
        profile = module.profile
        # One eager run before tracing: it is the verification reference, and it fills any
        # tensor a wrapper caches lazily with a real value (under torch.export it would be fake).
        with torch.no_grad():
            reference = module(pixel_values).detach().float().cpu().clone()
            forward = None
            if verify:  # the runtime forward now, so its activations are gone before conversion starts
                forward = qmodel(pixel_values=pixel_values, pixel_position_ids=position_ids).last_hidden_state
                forward = forward.detach().float().cpu().clone()
        timings["export module"] = time.perf_counter() - t
        step("export module built")

        with _weight_caches_released(qmodel):
            t = time.perf_counter()
            try:
                with torch.no_grad(), module_scopes(qmodel):
                    program = torch.export.export(module, (pixel_values,), strict=strict)
            except PTQStudioError:
                raise
            except Exception as exc:  # torch.export errors are long; the first line names the cause
                raise ExportError(f"torch.export failed: {exception_line(exc)}") from exc
            timings["torch.export"] = time.perf_counter() - t
            graph_nodes = sum(1 for n in program.graph.nodes if n.op == "call_function")
            step(f"torch.export done ({graph_nodes} nodes)")

            problems = check_graph(program, convertible=False)
            if problems:
                raise ExportError(f"the static graph has {len(problems)} unsupported nodes (first: {problems[0]})")

            scopes = module_paths(module)
            holder = [program]
            del program
            origins = TensorOrigins()
            circle_bytes = convert_to_circle(
                holder, timings, step, lambda: _check_cancel(cancel), circle_optimize, compile_config, origins.record
            )
            circle_bytes = constant_matmul_as_fully_connected(circle_bytes)
            if input_dtype == "float":
                circle_bytes = quantize_float_input(circle_bytes)
            gc.collect()

            # The file is staged beside `out`, verified there, and renamed over `out` only when
            # everything passed and nobody cancelled: until then the earlier file is untouched.
            with StagedFile(out) as staged:
                t = time.perf_counter()
                try:
                    staged.write(circle_bytes)
                except OSError as exc:
                    raise UnwritablePathError(out, exc.strerror or str(exc)) from exc
                timings["write"] = time.perf_counter() - t
                step("written beside the target" + ("; verifying" if verify else ""))
                del circle_bytes

                written = staged.path.read_bytes()
                summary = summarize_circle(written)
                tensor_modules = tensor_module_map(written, origins, scopes)
                result = ExportResult(
                    path=out,
                    bytes=len(written),
                    seconds=0.0,
                    op_counts=summary["op_counts"],
                    tensors_without_qparams=summary["tensors_without_qparams"],
                    io_tensors=summary["io_tensors"],
                    verify=None,
                    timings=timings,
                    mode=export_mode,
                    graph_nodes=graph_nodes,
                    soft_tokens=profile.soft_tokens,
                    patches=profile.num_patches,
                    max_patches=profile.max_patches,
                    unquantized_details=summary["unquantized_details"],
                    tensor_modules=tensor_modules,
                    unquantized=[(t, tensor_modules.get(t, ROOT_MODULE)) for t in summary["tensors_without_qparams"]],
                    layout=layout_fingerprint(position_ids),
                    dtype_mismatches=summary["dtype_mismatches"],
                    input_dtype=input_dtype if export_mode == "quant" else "float",
                )
                if verify:
                    t = time.perf_counter()
                    result.verify = verify_circle(
                        written, qmodel, module, pixel_values, position_ids, mode=export_mode, reference=reference, forward=forward,
                        structural=structural_problems(result, qmodel.kept_float_modules()),
                    )
                    timings["verify"] = time.perf_counter() - t
                    result.verify.seconds = timings["verify"]
                del written
                verdict = result.verify.verdict if result.verify is not None else None
                if verdict is not None and verdict.level == "failed":
                    # A broken file must not replace a good one: the earlier file stays.
                    raise ExportError(
                        f"verification failed, {out.name} was left as it was: {verdict.reason}; {verdict.advice}"
                    )
                _check_cancel(cancel, out)  # the last point where a cancel keeps the earlier file
                try:
                    staged.commit()
                except OSError as exc:
                    raise UnwritablePathError(out, exc.strerror or str(exc)) from exc
            step(f"verified, wrote {out.name}" if verify else f"wrote {out.name}", check_cancel=False)
    result.seconds = time.perf_counter() - start
    return result


def layout_fingerprint(pixel_position_ids: Any) -> str:
    """Short stable id of an image layout (the first image's pixel_position_ids): equal ids, same file input."""
    positions = torch.as_tensor(pixel_position_ids).detach().cpu().long()
    if positions.dim() == 2:
        positions = positions.unsqueeze(0)
    positions = positions[:1].contiguous()
    digest = hashlib.sha1(str(tuple(positions.shape)).encode() + positions.numpy().tobytes()).hexdigest()
    return f"{positions.shape[1]}:{digest[:16]}"


def verify_circle(
    data: bytes,
    qmodel: Any,
    module: Any,
    pixel_values: torch.Tensor,
    pixel_position_ids: torch.Tensor,
    mode: str = "quant",
    reference: torch.Tensor | None = None,
    forward: torch.Tensor | None = None,
    structural: tuple[Sequence[str], Sequence[str]] | Sequence[str] = (),
) -> VerifyResult:
    """Run the Circle bytes in TICO's reference runtime, compare with forward_export and forward,
    and judge the distance against torch's own rounding noise on this machine (core.export.verdict)."""
    try:
        outputs, name = reference_outputs(data, [pixel_values.detach().cpu().float().numpy()])
    except Exception as exc:
        raise ExportError(f"the written model does not run in TICO's reference runtime: {exception_line(exc)}") from exc
    got = torch.from_numpy(np.asarray(outputs[0], dtype=np.float32))
    with torch.no_grad():
        ref = reference if reference is not None else module(pixel_values).float().cpu()
        if forward is not None:
            fwd = forward
        else:
            fwd = qmodel(pixel_values=pixel_values, pixel_position_ids=pixel_position_ids).last_hidden_state.float().cpu()
    if got.shape != ref.shape:
        got = got.reshape(ref.shape)
    diff = (got - ref).abs()
    max_abs = float(diff.max())
    interval = float(ref.max() - ref.min()) or 1.0
    obs = qmodel.observers()[-1] if qmodel.observers() else None
    step = None
    if mode == "quant" and obs is not None and obs.enabled and bool(obs.frozen):
        step = float(obs.scale.max())
    floor = noise_floor(qmodel, module, pixel_values, ref, step)
    # structural_problems() gives (problems, caveats); a plain list is problems only.
    if isinstance(structural, tuple) and len(structural) == 2 and all(isinstance(x, (list, tuple)) for x in structural):
        problems, caveats = structural
    else:
        problems, caveats = list(structural), []
    # Float exports have no grid: "within one step" then means within the floor's max |diff|.
    tol = step if step is not None else max(floor.max_abs, 1e-30)
    within = within_one_step(diff, tol)
    vs_forward = float((got - fwd).abs().max()) if fwd.shape == got.shape else math.inf
    export_vs_forward = float((ref - fwd).abs().max()) if fwd.shape == ref.shape else math.inf
    onert = check_in_onert(data, pixel_values, ref, got.numpy(), step)
    verdict = judge(
        mode=mode, within=within if step is not None else None, max_steps=max_abs / tol if step is not None else None,
        max_abs=max_abs, floor=floor, structural=list(problems), caveats=list(caveats),
    )
    return VerifyResult(
        max_abs_diff=max_abs,
        peir=max_abs / interval,
        within_one_step=within,
        max_steps=max_abs / tol,
        runtime=name,
        vs_runtime_forward=vs_forward,
        mode=mode,
        step=step,
        output_observer=obs.name if obs is not None else None,
        export_vs_forward=export_vs_forward,
        onert=onert,
        noise_floor=floor,
        verdict=verdict,
    )


# --------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _weight_caches_released(qmodel: Any) -> Iterator[None]:
    """Drop the wrappers' fake-quantized weight copies while exporting (the export graph quantizes
    weights with explicit ops), then rebuild them: the converter's peak memory is the run's peak."""
    released = []
    if qmodel.mode is Mode.QUANT:
        for w in qmodel.quant_modules():
            if getattr(w, "weight_fq", None) is not None:
                w.weight_fq = None
                released.append(w)
        gc.collect()
    try:
        yield
    finally:
        for w in released:
            w.cache_weights()


def export_cancelled(out: Path | None = None) -> CancelledError:
    """The CancelledError of a cancelled export (in this process or in a child), naming the file kept."""
    where = f"{out} was left as it was" if out is not None else "any earlier file was left as it was"
    return CancelledError(f"export cancelled; {where}; export again to write it")


def _check_cancel(cancel: Any, out: Path | None = None) -> None:
    if cancel is not None and getattr(cancel, "cancelled", False):
        raise export_cancelled(out)


def _check_writable(out: Path) -> None:
    folder = out.parent
    if out.is_dir():
        raise UnwritablePathError(out, "this is a folder; give a file name such as model.circle")
    if not folder.is_dir():
        raise UnwritablePathError(out, f"folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UnwritablePathError(out, f"folder {folder} is not writable")
    if out.exists() and not os.access(out, os.W_OK):
        raise UnwritablePathError(out, "the existing file is read-only")


INPUT_DTYPES = ("integer", "float")


def _resolve_input_dtype(input_dtype: str | None) -> str:
    value = "integer" if input_dtype is None else str(input_dtype).lower()
    if value not in INPUT_DTYPES:
        raise ExportError(f"unknown input dtype {input_dtype!r}: use 'integer' (quantized pixels) or 'float' (float32 + QUANTIZE)")
    return value


def _resolve_mode(qmodel: Any, mode: str | None) -> str:
    current = qmodel.mode
    if current is Mode.CALIB:
        raise ExportError("the model is calibrating: convert it (QUANT) or switch to NO_QUANT before export")
    if mode is None:
        return "quant" if current is Mode.QUANT else "float"
    mode = str(mode).lower()
    if mode not in ("quant", "float"):
        raise ExportError(f"unknown export mode {mode!r}: use 'quant' or 'float'")
    if mode == "quant" and current is not Mode.QUANT and not qmodel.is_calibrated:
        missing = [o.name for o in qmodel.observers() if not o.has_stats]
        raise NotCalibratedError(
            f"cannot export a quantized model: {len(missing)} observers have no statistics "
            f"(first: {missing[0] if missing else '?'}); calibrate on at least one image first"
        )
    return mode


def _example_tensors(qmodel, example, image, max_soft_tokens, preprocessor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values (1, P, D), pixel_position_ids (1, P, 2)) for the export profile, validated."""
    cfg = qmodel.config
    dim = 3 * cfg.patch_size * cfg.patch_size
    if example is None:
        example = _preprocess(qmodel, image, max_soft_tokens, preprocessor)
    if isinstance(example, Mapping):
        if "pixel_position_ids" not in example:
            raise ExportError("the example batch has no pixel_position_ids: pass the preprocessor's output")
        positions = torch.as_tensor(example["pixel_position_ids"])
        pixels = example.get("pixel_values")
        pixels = None if pixels is None else torch.as_tensor(pixels)
    elif isinstance(example, torch.Tensor):
        positions, pixels = example, None
    else:
        raise ExportError(f"example must be a preprocessed batch or its pixel_position_ids, not {type(example).__name__}")
    if positions.dim() == 2:
        positions = positions.unsqueeze(0)
    if positions.dim() != 3 or positions.shape[-1] != 2:
        raise ExportError(f"pixel_position_ids must have shape (1, patches, 2), got {tuple(positions.shape)}")
    positions = positions[:1].long()
    if pixels is None:
        pixels = _synthetic_pixels(positions, dim)
    if pixels.dim() == 2:
        pixels = pixels.unsqueeze(0)
    pixels = pixels[:1].float()
    if pixels.shape[-1] != dim:
        raise ExportError(
            f"the image has patches of {pixels.shape[-1]} values but the model expects {dim} "
            f"(3 x {cfg.patch_size} x {cfg.patch_size}): preprocess it with this model's config"
        )
    if pixels.shape[1] != positions.shape[1]:
        raise ExportError(
            f"pixel_values has {pixels.shape[1]} patches but pixel_position_ids {positions.shape[1]}: "
            "pass the preprocessor's output unchanged"
        )
    valid = positions[(positions >= 0).all(dim=-1)]
    if valid.numel() and int(valid.max()) >= cfg.position_embedding_size:
        raise ExportError(
            f"the image is {int(valid.max()) + 1} patches across but the model has only "
            f"{cfg.position_embedding_size} position embeddings: export with fewer soft tokens"
        )
    device = _model_device(qmodel)
    return pixels.to(device), positions.to(device)


def _preprocess(qmodel, image, max_soft_tokens, preprocessor):
    if preprocessor is None or (max_soft_tokens and getattr(preprocessor, "max_soft_tokens", max_soft_tokens) != max_soft_tokens):
        try:
            preprocessor = ImagePreprocessor(qmodel.config, max_soft_tokens=int(max_soft_tokens or DEFAULT_SOFT_TOKENS))
        except ValueError as exc:
            raise ExportError(exception_line(exc).split(": ", 1)[-1]) from exc
    if image is None:
        image = sample_images()[0]
    return preprocessor([image])


def _synthetic_pixels(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Deterministic 8-bit-like pixels for a layout given without an image (padding rows zero)."""
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (1, positions.shape[1], dim), generator=gen).float() / 255.0
    pixels[~(positions >= 0).all(dim=-1)] = 0.0
    return pixels


def _model_device(qmodel) -> torch.device:
    for p in qmodel.parameters():
        return p.device
    return torch.device("cpu")
