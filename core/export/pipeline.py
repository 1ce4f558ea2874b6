"""Static Circle export of a wrapped Gemma4VisionModel, verified by running the written file.

Pipeline: ``as_export_module`` (one image layout) -> ``torch.export`` -> TICO's converter
(decompositions, FX legalize/quantization passes, serialisation, Circle O1 optimisation) ->
atomic write -> TICO's Python reference runtime on the example input, compared with
``forward_export`` and with the runtime ``forward`` of the same wrapped model.

Name map: every Circle tensor is tied to the module that made it (``ExportResult.tensor_modules``).
TICO names a tensor made from an FX node ``<module class>::<node name>``; the exporter records, as
the serializer names them, each tensor's FX node and that node's ``nn_module_stack``, and
translates the innermost module path (e.g. ``qmodel.encoder.layers.0.self_attn.q_proj``) into our
wrapper name (``encoder.layers.0.self_attn.q_proj``). core.analysis.threeway uses it.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from core.errors import CancelledError, ExportError, NotCalibratedError, PTQStudioError, UnwritablePathError
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

_FLOAT_TYPES = {"FLOAT32", "FLOAT16", "FLOAT64", "BFLOAT16"}

# Module name given to ops of the wrapped model's own forward (standardisation), of the export
# adapter, and to the graph input: they belong to no submodule.
ROOT_MODULE = "model"


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
    # ops and the graph input). Every tensor of the file is mapped; see _tensor_module_map.
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

    with _model_mode(qmodel, export_mode):
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
                with torch.no_grad(), _module_scopes(qmodel):
                    program = torch.export.export(module, (pixel_values,), strict=strict)
            except PTQStudioError:
                raise
            except Exception as exc:  # torch.export errors are long; the first line names the cause
                raise ExportError(f"torch.export failed: {_first_line(exc)}") from exc
            timings["torch.export"] = time.perf_counter() - t
            graph_nodes = sum(1 for n in program.graph.nodes if n.op == "call_function")
            step(f"torch.export done ({graph_nodes} nodes)")

            problems = check_graph(program, convertible=False)
            if problems:
                raise ExportError(f"the static graph has {len(problems)} unsupported nodes (first: {problems[0]})")

            scopes = _module_paths(module)
            holder = [program]
            del program
            origins: dict[str, tuple[str, ...] | None] = {}
            circle_bytes = _convert(holder, timings, step, cancel, circle_optimize, compile_config, origins)
            from core.export.circle_edit import constant_matmul_as_fully_connected, quantize_float_input

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
                tensor_modules = _tensor_module_map(written, origins, scopes)
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


def structural_problems(result: ExportResult, kept_float: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """(problems, caveats) of a written file whatever its numbers: tensors a quantized file leaves
    float and ops that change dtype silently (ONE's runtime refuses them; TICO's computes through).
    Those inside modules the user keeps in float (`kept_float`) are caveats of that choice, not faults."""
    import re

    kept = tuple(kept_float)

    def chosen(tensor: str) -> bool:
        module = result.tensor_modules.get(tensor, "")
        return any(module == k or module.startswith(k + ".") for k in kept)

    problems: list[str] = []
    caveats: list[str] = []
    mismatches = [m for m in result.dtype_mismatches if not any(chosen(t) for t in re.findall(r"(?:input|output) (\S+) is", m))]
    chosen_mismatches = [m for m in result.dtype_mismatches if m not in mismatches]
    if mismatches:
        problems.append(f"{len(mismatches)} ops change dtype silently (first: {mismatches[0]})")
    if result.mode == "quant":
        missing = [t for t in result.tensors_without_qparams if not chosen(t)]
        if missing:
            detail = result.unquantized_details.get(missing[0], "")
            problems.insert(0, f"{len(missing)} float tensors without qparams (first: {missing[0]}{', ' + detail if detail else ''})")
        floats = len(result.tensors_without_qparams) - len(missing)
        if floats or chosen_mismatches:
            caveats.append(
                f"{floats} float tensors and {len(chosen_mismatches)} dtype changes without QUANTIZE/DEQUANTIZE "
                f"come from the modules kept in float ({', '.join(kept[:3])}{'…' if len(kept) > 3 else ''})"
            )
    elif mismatches == [] and chosen_mismatches:
        caveats.append(f"{len(chosen_mismatches)} dtype changes in modules kept in float")
    return problems, caveats


def layout_fingerprint(pixel_position_ids: Any) -> str:
    """Short stable id of an image layout (the first image's pixel_position_ids): equal ids, same file input."""
    import hashlib

    positions = torch.as_tensor(pixel_position_ids).detach().cpu().long()
    if positions.dim() == 2:
        positions = positions.unsqueeze(0)
    positions = positions[:1].contiguous()
    digest = hashlib.sha1(str(tuple(positions.shape)).encode() + positions.numpy().tobytes()).hexdigest()
    return f"{positions.shape[1]}:{digest[:16]}"


def check_graph(exported_program: Any, convertible: bool = True) -> list[str]:
    """Nodes the static Circle pipeline rejects: boolean/data-dependent ops, dynamic shapes, ops TICO cannot convert."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    banned = ("bitwise_not", "logical_not", "one_hot", "nonzero", "masked_select", "masked_scatter", "unique")
    problems: list[str] = []
    for node in exported_program.graph.nodes:
        if node.op != "call_function":
            continue
        name = _target_name(node.target)
        if any(b in name for b in banned):
            problems.append(f"{node.name}: {name}")
            continue
        if name.startswith("aten.index.") or name.startswith("aten.index_put"):
            indices = node.args[1] if len(node.args) > 1 else []
            for idx in indices or []:
                val = getattr(idx, "meta", {}).get("val") if idx is not None else None
                if isinstance(val, torch.Tensor) and val.dtype == torch.bool:
                    problems.append(f"{node.name}: {name} with a boolean mask")
                    break
        val = node.meta.get("val")
        vals = val if isinstance(val, (list, tuple)) else [val]
        for v in vals:
            if isinstance(v, torch.Tensor):
                if free_unbacked_symbols(v):
                    problems.append(f"{node.name}: {name} has a data-dependent shape {tuple(v.shape)}")
                    break
                if any(not isinstance(d, int) for d in v.shape):
                    problems.append(f"{node.name}: {name} has a dynamic shape {tuple(v.shape)}")
                    break
            elif isinstance(v, torch.SymInt) or (v is not None and free_unbacked_symbols(v)):
                problems.append(f"{node.name}: {name} returns a symbolic value")
                break
    if convertible:
        problems += unconvertible_nodes(exported_program)
    return problems


def unconvertible_nodes(exported_program: Any) -> list[str]:
    """Nodes left after TICO's decompositions and legalize passes that its serializer has no operator for."""
    import tico.utils.convert as tconv

    found: list[str] = []

    class _Stop(Exception):
        pass

    def capture(ep: Any) -> None:
        supported = set(tconv.get_support_targets())
        import operator

        supported.add(operator.getitem)
        for n in ep.graph.nodes:
            if n.op == "call_function" and n.target not in supported:
                found.append(f"{n.name}: {_target_name(n.target)} (no Circle operator in tico)")
        raise _Stop

    program = copy.deepcopy(exported_program)
    with _patched(tconv, "check_unsupported_target", capture):
        try:
            tconv.convert_exported_module_to_circle(program)
        except _Stop:
            pass
    return found


def summarize_circle(data: bytes) -> dict[str, Any]:
    """Operator counts, unquantized float tensors and graph I/O of a Circle flatbuffer."""
    from tico.circle.runtime.program import CircleProgram, tensor_type_name

    program = CircleProgram.from_bytes(data)
    ops = Counter(op.name for op in program.operators)
    users: dict[int, list[str]] = {}
    producers: dict[int, str] = {}
    for op in program.operators:
        for i in op.inputs:
            users.setdefault(i, []).append(f"{op.name}#{op.index}")
        for o in op.outputs:
            producers[o] = f"{op.name}#{op.index}"
    # A float graph input read only by QUANTIZE ops, or a float output made by DEQUANTIZE, is bridged
    # explicitly; any other float input or output is an unquantized tensor like any other.
    bridged = {i for i in program.inputs if users.get(i) and all(u.startswith("QUANTIZE#") for u in users[i])}
    bridged |= {o for o in program.outputs if producers.get(o, "").startswith("DEQUANTIZE#")}
    missing: list[str] = []
    details: dict[str, str] = {}
    io_tensors: list[str] = []
    for kind, indices in (("input", program.inputs), ("output", program.outputs)):
        for i in indices:
            t = program.tensor(i)
            q = f"quantized scale={t.quantization.scale[0]:.6g} zp={t.quantization.zero_point[0]}" if t.is_quantized else "float"
            io_tensors.append(f"{kind} {t.name}: {tensor_type_name(t.tensor_type)}{list(t.shape)} ({q})")
    for t in program.tensors:
        if t.index in bridged or t.is_quantized:
            continue
        if tensor_type_name(t.tensor_type) not in _FLOAT_TYPES:
            continue  # shape/index operands (INT32 perms, slice bounds) carry no data to quantize
        if t.is_constant and t.index not in users:
            continue
        missing.append(t.name)
        role = "constant" if t.is_constant else "graph input" if t.index in program.inputs else f"made by {producers.get(t.index, '?')}"
        details[t.name] = (
            f"{tensor_type_name(t.tensor_type)}{list(t.shape)} {role}, used by {', '.join(users.get(t.index, [])) or 'nothing'}"
        )
    return {
        "op_counts": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "tensors_without_qparams": missing,
        "unquantized_details": details,
        "io_tensors": io_tensors,
        "dtype_mismatches": dtype_mismatches(program),
    }


# Ops whose job is to change dtype.
_CONVERSION_OPS = frozenset({"QUANTIZE", "DEQUANTIZE", "CAST"})


def dtype_mismatches(program: Any) -> list[str]:
    """Ops (other than QUANTIZE/DEQUANTIZE/CAST) with a non-constant input whose dtype differs from
    their output's: a dtype changed silently (TICO's reference runtime computes through it, ONE's
    runtime refuses it). `program` is a CircleProgram or the Circle bytes."""
    from tico.circle.runtime.program import CircleProgram, tensor_type_name

    if isinstance(program, (bytes, bytearray)):
        program = CircleProgram.from_bytes(bytes(program))
    found: list[str] = []
    for op in program.operators:
        if op.name in _CONVERSION_OPS or not op.outputs:
            continue
        out = program.tensor(op.outputs[0])
        out_type = tensor_type_name(out.tensor_type)
        for i in op.inputs:
            if i < 0:
                continue
            t = program.tensor(i)
            if t.is_constant:
                continue  # shape/index operands and weights; a float constant is caught as unquantized
            in_type = tensor_type_name(t.tensor_type)
            if in_type != out_type:
                found.append(f"{op.name}#{op.index}: input {t.name} is {in_type}, output {out.name} is {out_type}")
    return found


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
    from tico.circle.runtime import CircleReferenceRuntime, ExecutionMode

    try:
        runtime = CircleReferenceRuntime(data)
        quantized = runtime.has_quantized_activations()
        exec_mode = ExecutionMode.FAKE_QUANTIZE if quantized else ExecutionMode.NATIVE
        outputs = _run_lean(runtime, [pixel_values.detach().cpu().float().numpy()], exec_mode)
        del runtime
    except Exception as exc:
        raise ExportError(f"the written model does not run in TICO's reference runtime: {_first_line(exc)}") from exc
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
    name = f"tico reference runtime ({exec_mode.name})"
    from core.export.onert import check_in_onert

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


def _run_lean(runtime: Any, inputs: list[np.ndarray], mode: Any) -> list[np.ndarray]:
    """CircleReferenceRuntime.run, but each constant is dequantized when first used and dropped
    after its last use (run() holds every dequantized weight for the whole run: +4x the file)."""
    try:
        return run_keeping(runtime, inputs, mode)[0]
    except AttributeError:  # another tico version: fall back to the public API
        return list(runtime.run(inputs, mode=mode).outputs)


def run_keeping(
    runtime: Any,
    inputs: list[np.ndarray],
    mode: Any,
    wanted: set[int] = frozenset(),
    on_value: Callable[[int, np.ndarray], None] | None = None,
) -> tuple[list[np.ndarray], dict[int, np.ndarray]]:
    """The runtime's own operator loop (``_execute_operator`` per operator, as run() does; large
    blockwise operators slab by slab, see _execute_in_blocks), with every value dropped after its
    last use; returns (graph outputs, a copy of each `wanted` tensor). With `on_value`, each wanted
    tensor is handed to it (once, as soon as it exists; not to be modified) instead of being copied and
    kept, so a caller that reduces it at once holds no copies. Raises AttributeError when the
    runtime lacks the private pieces it uses."""
    from tico.circle.runtime.quantization import dequantize_array, fake_quantize_array

    program = runtime.program
    last_use = runtime._last_use
    execute = runtime._execute_operator
    fake = mode.name == "FAKE_QUANTIZE"
    values: dict[int, np.ndarray] = {}
    for position, (index, raw) in enumerate(zip(program.inputs, inputs)):
        tensor = program.tensor(index)
        array = runtime._as_readonly_array(raw, tensor, position)
        runtime._validate_value(array, tensor, mode, path=f"graph input {position}")
        values[index] = fake_quantize_array(array, tensor) if fake and tensor.is_quantized_integer else array
    keep = set(program.inputs) | set(program.outputs)
    kept: dict[int, np.ndarray] = {}
    delivered: set[int] = set()

    def deliver(index: int) -> None:
        if index in wanted and index not in delivered and index in values:
            delivered.add(index)
            if on_value is not None:
                on_value(index, values[index])
            else:
                kept[index] = np.array(values[index], copy=True)

    def constant(index: int) -> None:
        tensor = program.tensor(index)
        if index not in values and tensor.constant is not None:
            value = tensor.constant
            values[index] = dequantize_array(value, tensor) if fake and tensor.is_quantized_integer else value

    for index in list(values):
        deliver(index)
    for op in program.operators:
        for index in op.inputs:
            if index >= 0:
                constant(index)
        if not _execute_in_blocks(runtime, op, values, mode):
            execute(op, values, mode)
        for index in op.outputs:
            deliver(index)
        for index in op.inputs:
            deliver(index)  # a wanted constant
            if index >= 0 and index not in keep and last_use.get(index) == op.index:
                values.pop(index, None)
    for index in program.outputs:
        constant(index)
    for index in wanted:
        if index not in delivered:
            constant(index)
            deliver(index)
    return [np.array(values[index], copy=True) for index in program.outputs], kept


# Operators that compute each index of their leading axes from the same index of their inputs
# (broadcast inputs aside): elementwise maths, SOFTMAX over the last axis, BATCH_MATMUL over the
# last two. Run on a slab of one leading axis at a time, they give the same values bit for bit.
_BLOCKWISE_OPS = frozenset({
    "ADD", "SUB", "MUL", "DIV", "MAXIMUM", "MINIMUM", "POW", "SQUARED_DIFFERENCE",
    "SOFTMAX", "BATCH_MATMUL", "EXP", "LOGISTIC", "TANH", "GELU", "RELU", "NEG", "ABS", "SQRT", "RSQRT",
})
# Outputs larger than this run in slabs of about this size (the attention scores of e2b at 280
# soft tokens are 243 MB; whole, SOFTMAX and its requantization held five such copies at once).
_BLOCK_BYTES = 32 * 2**20


def _execute_in_blocks(runtime: Any, op: Any, values: dict[int, np.ndarray], mode: Any) -> bool:
    """Run one large blockwise operator slab by slab along its first non-singleton leading axis with
    the runtime's own kernel and requantization; False (nothing done) when it does not qualify."""
    if op.name not in _BLOCKWISE_OPS or len(op.outputs) != 1 or any(i < 0 for i in op.inputs):
        return False  # checked first: this runs for every operator of the graph
    program = runtime.program
    out = program.tensor(op.outputs[0])
    shape = tuple(int(d) for d in out.shape)
    dtype = runtime.effective_dtype(out, mode)
    total = math.prod(shape) * dtype.itemsize
    quant = out.quantization
    if len(shape) < 3 or total <= _BLOCK_BYTES or (quant is not None and len(quant.scale or ()) > 1):
        return False  # small, or per-channel qparams (they broadcast over the whole shape)
    axis = next((a for a in range(len(shape) - 2) if shape[a] > 1), None)
    if axis is None:
        return False
    inputs = [values[i] for i in op.inputs]
    sliced: list[int | None] = []  # per input: the axis to slice, None when it broadcasts over it
    for x in inputs:
        own = axis - (len(shape) - x.ndim)
        if own < 0 or x.shape[own] == 1:
            sliced.append(None)
        elif x.shape[own] == shape[axis]:
            sliced.append(own)
        else:
            return False
    from tico.circle.runtime.kernels import KernelContext, conversion_builtin_codes, value_preserving_builtin_codes
    from tico.circle.runtime.quantization import fake_quantize_array

    runtime._check_quantized_operands(op, mode)
    kernel = runtime.registry.get(op.builtin_code)
    requantize = (  # as _execute_operator decides it
        mode.name == "FAKE_QUANTIZE"
        and out.is_quantized_integer
        and op.builtin_code not in value_preserving_builtin_codes()
        and op.builtin_code not in conversion_builtin_codes()
    )
    rows = max(1, int(shape[axis] * _BLOCK_BYTES // total))
    result = np.empty(shape, dtype=dtype)
    for start in range(0, shape[axis], rows):
        part = slice(start, start + rows)
        block_inputs = tuple(x if a is None else x[(slice(None),) * a + (part,)] for x, a in zip(inputs, sliced))
        context = KernelContext(program=program, operator=op, inputs=block_inputs, output_dtypes=(dtype,), mode=mode)
        with np.errstate(all="ignore"):
            (block,) = kernel(context)
        block = np.asarray(block)
        result[(slice(None),) * axis + (part,)] = fake_quantize_array(block, out) if requantize else block
    runtime._validate_value(result, out, mode, path=f"operator {op.index} ({op.name}) output 0", operator=op)
    result.setflags(write=False)
    values[out.index] = result
    return True


# --------------------------------------------------------------------------- conversion
def _convert(holder, timings, step, cancel, circle_optimize, compile_config, origins=None) -> bytes:
    """TICO's convert_exported_module_to_circle with each stage timed and a cancel check between them.

    `holder` is a one-element list with the ExportedProgram (or the program itself); it is
    emptied so the converter's rewritten copies are the only ones alive. `origins`, when given,
    receives {Circle tensor name: its FX node's nn_module_stack paths (None: no node)}.
    """
    if not isinstance(holder, list):
        holder = [holder]
    import tico.circle.export as cexport
    import tico.utils.convert as tconv
    from tico.config import get_default_config

    config = copy.deepcopy(compile_config) if compile_config is not None else get_default_config()
    if not circle_optimize:
        config.set("circle_optimize", False)
    marks: dict[str, float] = {}

    def timed(name: str, fn: Callable, after: str) -> Callable:
        def run(*args: Any, **kwargs: Any) -> Any:
            _check_cancel(cancel)
            t = time.perf_counter()
            marks.setdefault(name + ":start", t)
            try:
                return fn(*args, **kwargs)
            finally:
                timings[name] = timings.get(name, 0.0) + time.perf_counter() - t
                marks[name + ":end"] = time.perf_counter()
                step(after)

        return run

    unsupported: list[str] = []

    def check_unsupported(ep: Any) -> None:
        _check_cancel(cancel)
        supported = set(tconv.get_support_targets())
        import operator

        supported.add(operator.getitem)
        for n in ep.graph.nodes:
            if n.op == "call_function" and n.target not in supported:
                unsupported.append(f"{n.name}: {_target_name(n.target)}")
        if unsupported:
            raise ExportError(f"TICO has no Circle operator for {len(unsupported)} nodes (first: {unsupported[0]})")

    t0 = time.perf_counter()
    timings.setdefault("circle optimisation", 0.0)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(
                _patched(tconv, "traced_run_decompositions", timed("decompositions", tconv.traced_run_decompositions, "decompositions done"))
            )
            serialise = timed("serialisation", tconv.build_circle, "serialised")

            def build_circle(*args: Any, **kwargs: Any) -> Any:
                step("converter passes done")
                if origins is not None and args:
                    # Fallback for a serializer without the hook below: FX node name -> module path.
                    origins.update({f"::{n.name}": _node_module_path(n) for n in args[0].graph.nodes})
                return serialise(*args, **kwargs)

            stack.enter_context(_patched(tconv, "build_circle", build_circle))
            if origins is not None:
                _record_tensor_origins(stack, origins)
            stack.enter_context(_patched(tconv, "check_unsupported_target", check_unsupported))
            stack.enter_context(
                _patched(cexport, "optimize_for_export", timed("circle optimisation", cexport.optimize_for_export, "circle optimised"))
            )
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # pop() inside the call: the converter's frame holds the only reference, so the
                # pre-decomposition program can be freed once it has been rewritten.
                data = tconv.convert_exported_module_to_circle(holder.pop(), config=config)
    except PTQStudioError:
        raise
    except Exception as exc:
        raise ExportError(f"Circle conversion failed: {_first_line(exc)}") from exc
    total = time.perf_counter() - t0
    passes_end = marks.get("serialisation:start", t0 + total)
    timings["converter passes"] = max(0.0, passes_end - t0 - timings.get("decompositions", 0.0))
    if not circle_optimize:
        step("circle optimisation skipped")
    return bytes(data)


# --------------------------------------------------------------------------- name map
@contextlib.contextmanager
def _module_scopes(qmodel: Any) -> Iterator[None]:
    """Route the static-path entry points that the parent calls as plain methods
    (``patch_embedder.forward_static``, ``encoder.run_layers``, ``pooler.forward_static``) through
    ``nn.Module.__call__`` while tracing, so torch.export records the submodule in each node's
    ``nn_module_stack``. The graph is unchanged: only the recorded scope differs."""
    patched: list[tuple[Any, str]] = []
    try:
        for wrapper in qmodel.quant_modules():
            if wrapper is qmodel:
                continue
            for method in ("forward_static", "run_layers"):
                if method in wrapper.__dict__ or not callable(getattr(type(wrapper), method, None)):
                    continue
                wrapper.__dict__[method] = _scoped_call(wrapper, getattr(wrapper, method))
                patched.append((wrapper, method))
        yield
    finally:
        for wrapper, method in patched:
            wrapper.__dict__.pop(method, None)


def _scoped_call(wrapper: torch.nn.Module, method: Callable) -> Callable:
    def call(*args: Any, **kwargs: Any) -> Any:
        if "forward" in wrapper.__dict__:  # already inside this module's scope (re-entrant call)
            return method(*args, **kwargs)
        # An instance attribute `forward` shadows the class's for this one call only.
        wrapper.__dict__["forward"] = method
        try:
            return wrapper(*args, **kwargs)
        finally:
            wrapper.__dict__.pop("forward", None)

    return call


def _module_paths(module: torch.nn.Module) -> dict[str, str]:
    """Every attribute path in the export module -> our name of the innermost wrapper holding it."""
    from core.wrappers.base import QuantModule

    paths: dict[str, str] = {}
    for path, sub in module.named_modules():  # parents come before their children
        if isinstance(sub, QuantModule):
            paths[path] = sub.module_name or ROOT_MODULE
        else:
            parent = path.rsplit(".", 1)[0] if "." in path else ""
            paths[path] = paths.get(parent, ROOT_MODULE) if path else ROOT_MODULE
    return paths


def _node_module_path(node: Any) -> tuple[str, ...] | None:
    """The module paths of an FX node's ``nn_module_stack``, outermost first ("" = the export module)."""
    stack = node.meta.get("nn_module_stack") if hasattr(node, "meta") else None
    if not stack:
        return None
    return tuple(str(entry[0]) for entry in stack.values() if isinstance(entry, (tuple, list)) and entry)


def _record_tensor_origins(stack: contextlib.ExitStack, origins: dict[str, tuple[str, ...] | None]) -> None:
    """Record, as TICO's serializer gives Circle tensors their final names, each one's FX node scope."""
    try:
        import tico.serialize.circle_serializer as serializer
    except ImportError:
        return
    finalise = getattr(serializer, "finalise_tensor_names", None)
    if finalise is None:
        return

    def record(graph: Any) -> Any:
        sources = getattr(graph, "name_to_node", {}) or {}
        before = [(t, sources.get(t.name)) for t in graph.tensors]
        result = finalise(graph)
        for tensor, node in before:
            name = tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)
            origins[name] = _node_module_path(node) if node is not None else None
        return result

    stack.enter_context(_patched(serializer, "finalise_tensor_names", record))


def _our_module(stack: tuple[str, ...] | None, scopes: Mapping[str, str]) -> str | None:
    """An ``nn_module_stack`` -> the innermost wrapper's module name (ROOT_MODULE for the root).

    Entries are absolute attribute paths, except below a module entered through a plain method
    (see _module_scopes), where torch records them relative to that module: each entry is taken
    as it is when the export module has that path, else relative to the nearest enclosing entry.
    """
    if stack is None:
        return None
    resolved: list[str] = []
    for entry in stack:
        if not entry and resolved:  # only the outermost entry may be the export module itself
            continue
        for base in [None, *reversed(resolved)]:
            path = entry if base is None else (f"{base}.{entry}" if base and entry else base or entry)
            if path in scopes:
                resolved.append(path)
                break
    return scopes.get(resolved[-1], ROOT_MODULE) if resolved else ROOT_MODULE


def _tensor_module_map(data: bytes, origins: Mapping[str, tuple[str, ...] | None], scopes: Mapping[str, str]) -> dict[str, str]:
    """Circle tensor name -> our module name, for every tensor of the file.

    A tensor made from an FX node takes the innermost module of that node's ``nn_module_stack``
    (TICO names such tensors ``<module class>::<node name>``). A tensor without a node (a constant
    the serializer created) takes the module of the first operator that reads it; one nobody
    reads, that of its producer; the graph input belongs to ROOT_MODULE.
    """
    from tico.circle.runtime.program import CircleProgram

    program = CircleProgram.from_bytes(data)
    modules: dict[int, str] = {}
    for t in program.tensors:
        if t.name in origins:
            path = origins[t.name]
        else:  # no serializer hook: the FX node name follows "::"
            path = origins.get("::" + t.name.rsplit("::", 1)[-1]) if "::" in t.name else None
        name = _our_module(path, scopes)
        if name is not None:
            modules[t.index] = name
    for index in program.inputs:
        modules.setdefault(index, ROOT_MODULE)
    for op in program.operators:  # constants without a node: their first reader
        owner = next((modules[o] for o in op.outputs if o in modules), None)
        if owner is None:
            continue
        for index in op.inputs:
            if index >= 0:
                modules.setdefault(index, owner)
    for op in program.operators:  # outputs of an op with no known scope: the module of its inputs
        owner = next((modules[i] for i in op.inputs if i >= 0 and i in modules), ROOT_MODULE)
        for index in op.outputs:
            modules.setdefault(index, owner)
    return {t.name: modules.get(t.index, ROOT_MODULE) for t in program.tensors}


# --------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _weight_caches_released(qmodel: Any) -> Iterator[None]:
    """Drop the wrappers' fake-quantized weight copies while exporting (the export graph quantizes
    weights with explicit ops), then rebuild them: the converter's peak memory is the run's peak."""
    released = []
    if qmodel.ctx.mode is Mode.QUANT:
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


def _check_cancel(cancel: Any, out: Path | None = None) -> None:
    if cancel is not None and getattr(cancel, "cancelled", False):
        where = f"{out} was left as it was" if out is not None else "any earlier file was left as it was"
        raise CancelledError(f"export cancelled; {where}; export again to write it")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _target_name(target: Any) -> str:
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)  # e.g. aten.index.Tensor
    return getattr(target, "__name__", str(target))


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


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
    current = qmodel.ctx.mode
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


@contextlib.contextmanager
def _model_mode(qmodel: Any, mode: str) -> Iterator[None]:
    """Run the export in `mode`, then put the model back as it was."""
    previous = qmodel.ctx.mode
    if mode == "quant" and previous is not Mode.QUANT:
        qmodel.freeze()
    elif mode == "float" and previous is not Mode.NO_QUANT:
        qmodel.ctx.mode = Mode.NO_QUANT
    try:
        yield
    finally:
        qmodel.ctx.mode = previous


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
    from core.data.images import ImagePreprocessor

    if preprocessor is None or (max_soft_tokens and getattr(preprocessor, "max_soft_tokens", max_soft_tokens) != max_soft_tokens):
        try:
            preprocessor = ImagePreprocessor(qmodel.config, max_soft_tokens=int(max_soft_tokens or 280))
        except ValueError as exc:
            raise ExportError(_first_line(exc).split(": ", 1)[-1]) from exc
    if image is None:
        from core.data.resources import sample_images

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
