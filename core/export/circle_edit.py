"""Rewrites of a serialised Circle model (TICO's object API): a float graph input bridged by an
explicit QUANTIZE, and integer ops bridged into float for a runtime that lacks their kernels."""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
from circle_schema import circle

_FLOAT32, _INT32 = 0, 2


def quantize_float_input(data: bytes) -> bytes:
    """The same model with a FLOAT32 graph input followed by a QUANTIZE op into the integer tensor
    the graph read before (same qparams); a model whose input is already float is returned as is."""
    from tico.circle.io import model_from_bytes, model_to_bytes  # noqa: PLC0415 -- tico.circle.* costs ~0.6 s at import (measured); only export and its checks run it

    model = model_from_bytes(data)
    graph = model.subgraphs[0]
    index = int(graph.inputs[0])
    integer = graph.tensors[index]
    q = integer.quantization
    if integer.type == _FLOAT32 or q is None or q.scale is None or len(q.scale) == 0:
        return data
    source = circle.Tensor.TensorT()
    source.shape = list(integer.shape)
    source.type = _FLOAT32
    source.buffer = 0
    source.name = integer.name
    # The integer tensor keeps its qparams and readers; only its name says it is now made inside.
    integer.name = _name_bytes(integer.name) + b"/quantized"
    graph.tensors.append(source)
    new_index = len(graph.tensors) - 1
    op = circle.Operator.OperatorT()
    op.opcodeIndex = _opcode(model, circle.BuiltinOperator.BuiltinOperator.QUANTIZE)
    op.inputs = [new_index]
    op.outputs = [index]
    op.builtinOptionsType = circle.BuiltinOptions.BuiltinOptions.QuantizeOptions
    op.builtinOptions = circle.QuantizeOptions.QuantizeOptionsT()
    graph.operators = [op, *graph.operators]
    graph.inputs = [new_index, *[int(i) for i in graph.inputs[1:]]]
    for signature in model.signatureDefs or []:
        for entry in signature.inputs or []:
            if entry.tensorIndex == index:
                entry.tensorIndex = new_index
    return model_to_bytes(model)


def operator_names() -> dict[int, str]:
    """Circle builtin operator code -> name (RMS_NORM and other circle-only codes included)."""

    codes = circle.BuiltinOperator.BuiltinOperator
    return {v: k for k, v in vars(codes).items() if not k.startswith("_") and isinstance(v, int)}


def _name_bytes(name: Any) -> bytes:
    return name if isinstance(name, bytes) else str(name).encode()


def _opcode(model: Any, builtin: int) -> int:
    """Index of `builtin` in the model's operator codes, added when missing."""

    for i, oc in enumerate(model.operatorCodes):
        if _builtin_code(oc) == builtin:
            return i
    oc = circle.OperatorCode.OperatorCodeT()
    oc.builtinCode = builtin
    oc.deprecatedBuiltinCode = min(builtin, 127) if builtin >= 0 else 127
    oc.version = 1
    model.operatorCodes.append(oc)
    return len(model.operatorCodes) - 1


def bridge_float_ops(data: bytes, ops: Iterable[str]) -> tuple[bytes, dict[str, int]]:
    """A copy of the Circle bytes where each integer op named in `ops` runs in float between a
    DEQUANTIZE and a QUANTIZE (its integer constants dequantized); returns (bytes, op name -> count)."""
    from tico.circle.io import model_from_bytes, model_to_bytes  # noqa: PLC0415 -- tico.circle.* costs ~0.6 s at import (measured); only export and its checks run it

    wanted = set(ops)
    codes = circle.BuiltinOperator.BuiltinOperator
    names = operator_names()
    model = model_from_bytes(data)
    graph = model.subgraphs[0]
    tensors = graph.tensors

    def quantized(index: int) -> bool:
        t = tensors[index]
        q = t.quantization
        return t.type != _FLOAT32 and q is not None and q.scale is not None and len(q.scale) > 0

    def float_tensor(like: Any, suffix: str, buffer: int = 0) -> int:
        t = circle.Tensor.TensorT()
        t.shape = list(like.shape) if like.shape is not None else []
        t.type = _FLOAT32
        t.buffer = buffer
        t.name = _name_bytes(like.name) + suffix.encode()
        tensors.append(t)
        return len(tensors) - 1

    def unary(builtin: int, options_type: int, options: Any, src: int, dst: int) -> Any:
        op = circle.Operator.OperatorT()
        op.opcodeIndex = _opcode(model, builtin)
        op.inputs = [src]
        op.outputs = [dst]
        op.builtinOptionsType = options_type
        op.builtinOptions = options
        return op

    opts = circle.BuiltinOptions.BuiltinOptions
    counts: dict[str, int] = {}
    rewritten: list[Any] = []
    for op in graph.operators:
        name = names.get(_builtin_code(model.operatorCodes[op.opcodeIndex]), "?")
        ins = [int(i) for i in op.inputs]
        outs = [int(o) for o in op.outputs]
        if name not in wanted or not any(i >= 0 and quantized(i) for i in ins + outs):
            rewritten.append(op)
            continue
        before, after = [], []
        new_ins = []
        for i in ins:
            if i < 0 or not quantized(i):
                new_ins.append(i)
            elif _is_constant(model, tensors[i]):
                values = _dequantized_constant(model, tensors[i])
                buf = circle.Buffer.BufferT()
                buf.data = np.frombuffer(values.astype(np.float32).tobytes(), dtype=np.uint8)
                model.buffers.append(buf)
                new_ins.append(float_tensor(tensors[i], "/float", len(model.buffers) - 1))
            else:
                f = float_tensor(tensors[i], "/dequantized")
                before.append(unary(codes.DEQUANTIZE, opts.DequantizeOptions, circle.DequantizeOptions.DequantizeOptionsT(), i, f))
                new_ins.append(f)
        new_outs = []
        for o in outs:
            if quantized(o):
                f = float_tensor(tensors[o], "/float")
                after.append(unary(codes.QUANTIZE, opts.QuantizeOptions, circle.QuantizeOptions.QuantizeOptionsT(), f, o))
                new_outs.append(f)
            else:
                new_outs.append(o)
        op.inputs = new_ins
        op.outputs = new_outs
        rewritten += before + [op] + after
        counts[name] = counts.get(name, 0) + 1
    graph.operators = rewritten
    return model_to_bytes(model), counts


def _builtin_code(oc: Any) -> int:
    # Codes above 127 live only in builtinCode; circle's own ops (RMS_NORM) are negative there.
    code = oc.builtinCode
    return code if code != 0 or not oc.deprecatedBuiltinCode else oc.deprecatedBuiltinCode


def _is_constant(model: Any, tensor: Any) -> bool:
    if not tensor.buffer:
        return False
    buf = model.buffers[tensor.buffer]
    return (buf.data is not None and len(buf.data) > 0) or bool(getattr(buf, "size", 0))


def _dequantized_constant(model: Any, tensor: Any) -> np.ndarray:
    from tico.circle.value import TensorValueCodec  # noqa: PLC0415 -- tico.circle.* costs ~0.6 s at import (measured); only export and its checks run it

    buf = model.buffers[tensor.buffer]
    # TICO's codec knows every storage type, the packed 4-bit ones (UINT4 is -1, two codes a byte) included.
    decoded = TensorValueCodec().decode(np.asarray(buf.data, dtype=np.uint8), tensor_type=int(tensor.type), shape=tensor.shape)
    values = np.asarray(decoded.data, dtype=np.float64)
    q = tensor.quantization
    scale = np.asarray(q.scale, dtype=np.float64)
    zp = np.asarray(q.zeroPoint if q.zeroPoint is not None else np.zeros_like(scale), dtype=np.float64)
    if scale.size > 1:  # per channel along quantizedDimension
        shape = [1] * values.ndim
        shape[int(q.quantizedDimension)] = scale.size
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return (values - zp) * scale


def constant_matmul_as_fully_connected(data: bytes) -> bytes:
    """The same model with each BATCH_MATMUL of a constant (1, r, n) left operand and a (1, n, d)
    activation written as RESHAPE, TRANSPOSE, FULLY_CONNECTED (the constant as its weight),
    TRANSPOSE, RESHAPE: (C @ X)^T = FC(X^T, C). ONE's runtime refuses constant BATCH_MATMUL operands;
    torch keeps its matmul, so the runtime forward and the exported graph stay bit-identical."""
    from tico.circle.io import model_from_bytes, model_to_bytes  # noqa: PLC0415 -- tico.circle.* costs ~0.6 s at import (measured); only export and its checks run it

    model = model_from_bytes(data)
    graph = model.subgraphs[0]
    tensors = graph.tensors
    codes = circle.BuiltinOperator.BuiltinOperator
    opts = circle.BuiltinOptions.BuiltinOptions
    bmm = [i for i, oc in enumerate(model.operatorCodes) if _builtin_code(oc) == codes.BATCH_MATMUL]
    if not bmm:
        return data

    def add_tensor(like: Any, shape: list[int], suffix: str, buffer: int = 0, tensor_type: int | None = None) -> int:
        t = circle.Tensor.TensorT()
        t.shape = list(shape)
        t.type = like.type if tensor_type is None else tensor_type
        t.buffer = buffer
        t.name = _name_bytes(like.name) + suffix.encode()
        t.quantization = like.quantization if tensor_type is None else None
        tensors.append(t)
        return len(tensors) - 1

    def int32_constant(like: Any, values: list[int], suffix: str) -> int:
        buf = circle.Buffer.BufferT()
        buf.data = np.frombuffer(np.asarray(values, dtype=np.int32).tobytes(), dtype=np.uint8)
        model.buffers.append(buf)
        return add_tensor(like, [len(values)], suffix, len(model.buffers) - 1, _INT32)

    def operator(builtin: int, inputs: list[int], outputs: list[int], options_type: int, options: Any) -> Any:
        op = circle.Operator.OperatorT()
        op.opcodeIndex = _opcode(model, builtin)
        op.inputs, op.outputs = inputs, outputs
        op.builtinOptionsType, op.builtinOptions = options_type, options
        return op

    def reshape(src: int, dst: int, shape: list[int]) -> Any:
        options = circle.ReshapeOptions.ReshapeOptionsT()
        options.newShape = list(shape)
        shape_tensor = int32_constant(tensors[dst], shape, "/shape")
        return operator(codes.RESHAPE, [src, shape_tensor], [dst], opts.ReshapeOptions, options)

    def transpose(src: int, dst: int) -> Any:
        perm = int32_constant(tensors[dst], [1, 0], "/perm")
        return operator(codes.TRANSPOSE, [src, perm], [dst], opts.TransposeOptions, circle.TransposeOptions.TransposeOptionsT())

    rewritten: list[Any] = []
    for op in graph.operators:
        lhs, rhs = (int(i) for i in op.inputs[:2]) if len(op.inputs) >= 2 else (-1, -1)
        if op.opcodeIndex not in bmm or lhs < 0 or rhs < 0 or not _is_constant(model, tensors[lhs]) or _is_constant(model, tensors[rhs]):
            rewritten.append(op)
            continue
        c, x, out = tensors[lhs], tensors[rhs], tensors[int(op.outputs[0])]
        if len(c.shape) != 3 or len(x.shape) != 3 or c.shape[0] != 1 or x.shape[0] != 1 or (c.quantization and len(c.quantization.scale or []) > 1):
            rewritten.append(op)
            continue
        rows, n, d = int(c.shape[1]), int(c.shape[2]), int(x.shape[2])
        weight = add_tensor(c, [rows, n], "/weight", c.buffer)  # same bytes, 2-D view
        x2 = add_tensor(x, [n, d], "/2d")
        xt = add_tensor(x, [d, n], "/transposed")
        y = add_tensor(out, [d, rows], "/fc")
        yt = add_tensor(out, [rows, d], "/2d")
        fc_options = circle.FullyConnectedOptions.FullyConnectedOptionsT()
        fc_options.fusedActivationFunction = circle.ActivationFunctionType.ActivationFunctionType.NONE
        fc_options.keepNumDims = False
        rewritten += [
            reshape(rhs, x2, [n, d]),
            transpose(x2, xt),
            operator(codes.FULLY_CONNECTED, [xt, weight, -1], [y], opts.FullyConnectedOptions, fc_options),
            transpose(y, yt),
            reshape(yt, int(op.outputs[0]), [1, rows, d]),
        ]
    graph.operators = rewritten
    return model_to_bytes(model)
