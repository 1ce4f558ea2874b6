"""Checks of an export that need no runtime: the torch.export graph before conversion, and the
written Circle file's structure (operator counts, tensors left float, ops that change dtype silently).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from core.export.runtime import target_name, unconvertible_nodes

if TYPE_CHECKING:
    from core.export.pipeline import ExportResult

__all__ = ["check_graph", "dtype_mismatches", "structural_problems", "summarize_circle"]

_FLOAT_TYPES = {"FLOAT32", "FLOAT16", "FLOAT64", "BFLOAT16"}


def structural_problems(result: "ExportResult", kept_float: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """(problems, caveats) of a written file whatever its numbers: tensors a quantized file leaves
    float and ops that change dtype silently (ONE's runtime refuses them; TICO's computes through).
    Those inside modules the user keeps in float (`kept_float`) are caveats of that choice, not faults."""
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


def check_graph(exported_program: Any, convertible: bool = True) -> list[str]:
    """Nodes the static Circle pipeline rejects: boolean/data-dependent ops, dynamic shapes, ops TICO cannot convert."""
    banned = ("bitwise_not", "logical_not", "one_hot", "nonzero", "masked_select", "masked_scatter", "unique")
    problems: list[str] = []
    for node in exported_program.graph.nodes:
        if node.op != "call_function":
            continue
        name = target_name(node.target)
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


def summarize_circle(data: bytes) -> dict[str, Any]:
    """Operator counts, unquantized float tensors and graph I/O of a Circle flatbuffer."""
    from tico.circle.runtime.program import CircleProgram, tensor_type_name  # noqa: PLC0415 -- tico.circle.* costs ~0.6 s at import (measured); only export and its checks run it

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
    from tico.circle.runtime.program import CircleProgram, tensor_type_name  # noqa: PLC0415 -- tico.circle.* costs ~0.6 s at import (measured); only export and its checks run it

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

