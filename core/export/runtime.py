"""The one place that reaches into TICO beyond its public API: its converter and its reference runtime.

Everything else in core calls the functions here, so a new tico version breaks (at most) this file.

**Converter** (``tico.utils.convert``, ``tico.circle.export``, ``tico.serialize.circle_serializer``):
``convert_to_circle`` runs ``convert_exported_module_to_circle`` with module functions swapped for
the length of the call, all public names of those modules: ``traced_run_decompositions``,
``build_circle`` and ``optimize_for_export`` are wrapped to time each stage, report progress and check
for a cancel between stages (the converter has no hooks); ``check_unsupported_target`` is replaced so
an unsupported node gives a one-line error naming it (``unconvertible_nodes`` uses the same swap to
stop the converter right after its legalize passes); ``finalise_tensor_names`` is wrapped to see
which FX node each Circle tensor was made from (core.export.tensor_map builds the name map from it).

**Reference runtime** (``tico.circle.runtime.CircleReferenceRuntime``): ``run_keeping`` re-runs the
runtime's own operator loop so every value is freed after its last use and large blockwise
operators run slab by slab (``run()`` holds every dequantized weight and every intermediate for the
whole run: several times the file on e2b). It uses these private members, read-only:
``_last_use`` (the operator index after which a tensor is dead), ``_execute_operator`` (one operator
with the runtime's own kernel and requantization), ``_as_readonly_array`` and ``_validate_value``
(the input and output checks ``run()`` applies), ``_check_quantized_operands`` (the operand check
``_execute_operator`` applies, needed when an operator runs in slabs). A runtime without them raises
AttributeError, and the callers fall back to the public ``run()``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import operator
import time
import warnings
from typing import Any, Callable, Iterator

import numpy as np
import tico.utils.convert as tconv  # free: core.wrappers imports tico, which loads it
import torch
from tico.config import get_default_config

from core.errors import ExportError, PTQStudioError, exception_line

__all__ = [
    "BLOCK_BYTES",
    "BLOCKWISE_OPS",
    "convert_to_circle",
    "execute_in_blocks",
    "patched",
    "reference_outputs",
    "run_circle_tensors",
    "run_keeping",
    "target_name",
    "unconvertible_nodes",
]

# Called with (name, FX node or None): each FX node of the serialised graph as "::<node name>", then
# each Circle tensor under its final name with the node it was made from.
NameHook = Callable[[str, Any], None]

# Operators that compute each index of their leading axes from the same index of their inputs
# (broadcast inputs aside): elementwise maths, SOFTMAX over the last axis, BATCH_MATMUL over the
# last two. Run on a slab of one leading axis at a time, they give the same values bit for bit.
BLOCKWISE_OPS = frozenset({
    "ADD", "SUB", "MUL", "DIV", "MAXIMUM", "MINIMUM", "POW", "SQUARED_DIFFERENCE",
    "SOFTMAX", "BATCH_MATMUL", "EXP", "LOGISTIC", "TANH", "GELU", "RELU", "NEG", "ABS", "SQRT", "RSQRT",
})
# Outputs larger than this run in slabs of about this size (the attention scores of e2b at 280
# soft tokens are 243 MB; whole, SOFTMAX and its requantization held five such copies at once).
BLOCK_BYTES = 32 * 2**20


@contextlib.contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    """`obj.name` is `value` inside the block and what it was afterwards."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def target_name(target: Any) -> str:
    """An FX node target as people read it, e.g. aten.index.Tensor."""
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):  # noqa: SLF001 -- torch has no public name for an ATen op's type
        return str(target)  # e.g. aten.index.Tensor
    return getattr(target, "__name__", str(target))


def _unsupported(ep: Any) -> list[str]:
    """"<node>: <target>" for each call of the legalized program that TICO's serializer cannot write."""
    supported = set(tconv.get_support_targets())
    supported.add(operator.getitem)
    return [f"{n.name}: {target_name(n.target)}" for n in ep.graph.nodes if n.op == "call_function" and n.target not in supported]


def unconvertible_nodes(exported_program: Any) -> list[str]:
    """Nodes left after TICO's decompositions and legalize passes that its serializer has no operator for."""
    found: list[str] = []

    class _Stop(Exception):
        pass

    def capture(ep: Any) -> None:
        found.extend(f"{n} (no Circle operator in tico)" for n in _unsupported(ep))
        raise _Stop

    program = copy.deepcopy(exported_program)
    with patched(tconv, "check_unsupported_target", capture):
        try:
            tconv.convert_exported_module_to_circle(program)
        except _Stop:
            pass
    return found


# --------------------------------------------------------------------------- conversion
def convert_to_circle(
    holder: Any,
    timings: dict[str, float],
    step: Callable[[str], None],
    check_cancel: Callable[[], None] | None = None,
    circle_optimize: bool = False,
    compile_config: Any = None,
    name_hook: NameHook | None = None,
) -> bytes:
    """TICO's convert_exported_module_to_circle with each stage timed and `check_cancel` between them.

    `holder` is a one-element list with the ExportedProgram (or the program itself); it is
    emptied so the converter's rewritten copies are the only ones alive. `name_hook`, when given,
    sees each FX node and each Circle tensor as it is named (see NameHook).
    """
    if not isinstance(holder, list):
        holder = [holder]
    import tico.circle.export as cexport  # noqa: PLC0415 -- tico.circle.* costs ~0.6 s at import (measured); only export and its checks run it

    config = copy.deepcopy(compile_config) if compile_config is not None else get_default_config()
    if not circle_optimize:
        config.set("circle_optimize", False)
    marks: dict[str, float] = {}

    def cancel_point() -> None:
        if check_cancel is not None:
            check_cancel()

    def timed(name: str, fn: Callable, after: str) -> Callable:
        def run(*args: Any, **kwargs: Any) -> Any:
            cancel_point()
            t = time.perf_counter()
            marks.setdefault(name + ":start", t)
            try:
                return fn(*args, **kwargs)
            finally:
                timings[name] = timings.get(name, 0.0) + time.perf_counter() - t
                marks[name + ":end"] = time.perf_counter()
                step(after)

        return run

    def check_unsupported(ep: Any) -> None:
        cancel_point()
        unsupported = _unsupported(ep)
        if unsupported:
            raise ExportError(f"TICO has no Circle operator for {len(unsupported)} nodes (first: {unsupported[0]})")

    t0 = time.perf_counter()
    timings.setdefault("circle optimisation", 0.0)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(
                patched(tconv, "traced_run_decompositions", timed("decompositions", tconv.traced_run_decompositions, "decompositions done"))
            )
            serialise = timed("serialisation", tconv.build_circle, "serialised")

            def build_circle(*args: Any, **kwargs: Any) -> Any:
                step("converter passes done")
                if name_hook is not None and args:
                    # Fallback for a serializer without the hook below: FX node name -> its node.
                    for node in args[0].graph.nodes:
                        name_hook(f"::{node.name}", node)
                return serialise(*args, **kwargs)

            stack.enter_context(patched(tconv, "build_circle", build_circle))
            if name_hook is not None:
                _hook_tensor_names(stack, name_hook)
            stack.enter_context(patched(tconv, "check_unsupported_target", check_unsupported))
            stack.enter_context(
                patched(cexport, "optimize_for_export", timed("circle optimisation", cexport.optimize_for_export, "circle optimised"))
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # pop() inside the call: the converter's frame holds the only reference, so the
                # pre-decomposition program can be freed once it has been rewritten.
                data = tconv.convert_exported_module_to_circle(holder.pop(), config=config)
    except PTQStudioError:
        raise
    except Exception as exc:
        raise ExportError(f"Circle conversion failed: {exception_line(exc)}") from exc
    total = time.perf_counter() - t0
    passes_end = marks.get("serialisation:start", t0 + total)
    timings["converter passes"] = max(0.0, passes_end - t0 - timings.get("decompositions", 0.0))
    if not circle_optimize:
        step("circle optimisation skipped")
    return bytes(data)


def _hook_tensor_names(stack: contextlib.ExitStack, name_hook: NameHook) -> None:
    """Show `name_hook`, as TICO's serializer gives Circle tensors their final names, each one's FX node."""
    try:
        import tico.serialize.circle_serializer as serializer  # noqa: PLC0415 -- optional: older tico has no hook
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
            name_hook(tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name), node)
        return result

    stack.enter_context(patched(serializer, "finalise_tensor_names", record))


# --------------------------------------------------------------------------- reference runtime
def reference_outputs(data: bytes, inputs: list[np.ndarray]) -> tuple[list[np.ndarray], str]:
    """Run the Circle bytes once in TICO's reference runtime, fake-quantized when the file is quantized;
    (graph outputs, runtime name). Values are freed after their last use (see run_keeping)."""
    from tico.circle.runtime import CircleReferenceRuntime, ExecutionMode  # noqa: PLC0415 -- tico.circle.* costs ~0.6 s at import (measured); only export and its checks run it

    runtime = CircleReferenceRuntime(data)
    mode = ExecutionMode.FAKE_QUANTIZE if runtime.has_quantized_activations() else ExecutionMode.NATIVE
    return run_lean(runtime, inputs, mode), f"tico reference runtime ({mode.name})"


def run_lean(runtime: Any, inputs: list[np.ndarray], mode: Any) -> list[np.ndarray]:
    """CircleReferenceRuntime.run, but each constant is dequantized when first used and dropped
    after its last use (run() holds every dequantized weight for the whole run: +4x the file)."""
    try:
        return run_keeping(runtime, inputs, mode)[0]
    except AttributeError:  # another tico version: fall back to the public API
        return list(runtime.run(inputs, mode=mode).outputs)


def run_circle_tensors(
    data: bytes, pixel_values: torch.Tensor, wanted: set[int], on_value: Callable[[int, np.ndarray], None]
) -> tuple[set[int], str, bool]:
    """Run the file once, handing each `wanted` tensor to `on_value` as it is produced;
    (the indices handed over, runtime name, intermediates exposed)."""
    from tico.circle.runtime import CircleReferenceRuntime, ExecutionMode  # noqa: PLC0415 -- tico.circle.* costs ~0.6 s at import (measured); only export and its checks run it

    seen: set[int] = set()

    def take(index: int, value: np.ndarray) -> None:
        seen.add(index)
        on_value(index, value)

    try:
        runtime = CircleReferenceRuntime(data)
        mode = ExecutionMode.FAKE_QUANTIZE if runtime.has_quantized_activations() else ExecutionMode.NATIVE
        name = f"tico reference runtime ({mode.name})"
        inputs = [pixel_values.numpy()]
        try:
            run_keeping(runtime, inputs, mode, wanted, on_value=take)
            return seen, name, True
        except AttributeError:
            if seen:
                raise
        try:  # the public API: trace=True keeps every tensor (constants included)
            result = runtime.run(inputs, mode=mode, trace=True)
            if result.tensor_values is not None:
                for i in sorted(wanted & result.tensor_values.keys()):
                    take(i, np.asarray(result.tensor_values[i]))
                return seen, name, True
        except TypeError:  # a runtime without trace=: the outputs only
            result = runtime.run(inputs, mode=mode)
        for i, v in zip(runtime.program.outputs, result.outputs):
            if i in wanted:
                take(i, np.asarray(v))
        return seen, name, False
    except PTQStudioError:
        raise
    except Exception as exc:
        raise ExportError(f"the Circle model does not run in TICO's reference runtime: {exception_line(exc)}") from exc


def run_keeping(
    runtime: Any,
    inputs: list[np.ndarray],
    mode: Any,
    wanted: set[int] = frozenset(),
    on_value: Callable[[int, np.ndarray], None] | None = None,
) -> tuple[list[np.ndarray], dict[int, np.ndarray]]:
    """The runtime's own operator loop (``_execute_operator`` per operator, as run() does; large
    blockwise operators slab by slab, see execute_in_blocks), with every value dropped after its
    last use; returns (graph outputs, a copy of each `wanted` tensor). With `on_value`, each wanted
    tensor is handed to it (once, as soon as it exists; not to be modified) instead of being copied and
    kept, so a caller that reduces it at once holds no copies. Raises AttributeError when the
    runtime lacks the private pieces it uses."""
    from tico.circle.runtime.quantization import dequantize_array, fake_quantize_array  # noqa: PLC0415 -- tico.circle.* costs ~0.6 s at import (measured); only export and its checks run it

    program = runtime.program
    last_use = runtime._last_use  # noqa: SLF001 -- tico's own liveness table (see the module docstring)
    execute = runtime._execute_operator  # noqa: SLF001 -- tico's own kernel + requantization per operator
    fake = mode.name == "FAKE_QUANTIZE"
    values: dict[int, np.ndarray] = {}
    for position, (index, raw) in enumerate(zip(program.inputs, inputs)):
        tensor = program.tensor(index)
        array = runtime._as_readonly_array(raw, tensor, position)  # noqa: SLF001 -- run()'s own input check
        runtime._validate_value(array, tensor, mode, path=f"graph input {position}")  # noqa: SLF001 -- as run() does
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
        if not execute_in_blocks(runtime, op, values, mode):
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


def execute_in_blocks(runtime: Any, op: Any, values: dict[int, np.ndarray], mode: Any) -> bool:
    """Run one large blockwise operator slab by slab along its first non-singleton leading axis with
    the runtime's own kernel and requantization; False (nothing done) when it does not qualify."""
    if op.name not in BLOCKWISE_OPS or len(op.outputs) != 1 or any(i < 0 for i in op.inputs):
        return False  # checked first: this runs for every operator of the graph
    program = runtime.program
    out = program.tensor(op.outputs[0])
    shape = tuple(int(d) for d in out.shape)
    dtype = runtime.effective_dtype(out, mode)
    total = math.prod(shape) * dtype.itemsize
    quant = out.quantization
    if len(shape) < 3 or total <= BLOCK_BYTES or (quant is not None and len(quant.scale or ()) > 1):
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
    from tico.circle.runtime.kernels import (  # noqa: PLC0415 -- tico.circle.* costs ~0.6 s at import (measured); only export and its checks run it
        KernelContext,
        conversion_builtin_codes,
        value_preserving_builtin_codes,
    )
    from tico.circle.runtime.quantization import fake_quantize_array  # noqa: PLC0415 -- as above

    runtime._check_quantized_operands(op, mode)  # noqa: SLF001 -- the check _execute_operator makes first
    kernel = runtime.registry.get(op.builtin_code)
    requantize = (  # as _execute_operator decides it
        mode.name == "FAKE_QUANTIZE"
        and out.is_quantized_integer
        and op.builtin_code not in value_preserving_builtin_codes()
        and op.builtin_code not in conversion_builtin_codes()
    )
    rows = max(1, int(shape[axis] * BLOCK_BYTES // total))
    result = np.empty(shape, dtype=dtype)
    for start in range(0, shape[axis], rows):
        part = slice(start, start + rows)
        block_inputs = tuple(x if a is None else x[(slice(None),) * a + (part,)] for x, a in zip(inputs, sliced))
        context = KernelContext(program=program, operator=op, inputs=block_inputs, output_dtypes=(dtype,), mode=mode)
        with np.errstate(all="ignore"):
            (block,) = kernel(context)
        block = np.asarray(block)
        result[(slice(None),) * axis + (part,)] = fake_quantize_array(block, out) if requantize else block
    runtime._validate_value(result, out, mode, path=f"operator {op.index} ({op.name}) output 0", operator=op)  # noqa: SLF001 -- run()'s output check
    result.setflags(write=False)
    values[out.index] = result
    return True
