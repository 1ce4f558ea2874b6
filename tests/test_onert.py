"""Issue 11: a fully integer Circle file that ONE's runtime (onert) loads and runs.

Integer input with qparams (or float + QUANTIZE), graph I/O covered by the qparam check, dtype
mismatches reported, and the file run in onert beside TICO's reference runtime.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.data.images import ImagePreprocessor
from core.data.resources import sample_images
from core.errors import ExportError
from core.export.checks import dtype_mismatches, summarize_circle
from core.export.circle_edit import bridge_float_ops, quantize_float_input
from core.export.onert import input_qparams, onert_available, quantize_input, run_onert
from core.export.pipeline import export_circle
from core.models import load_model
from core.ptq import calibrate, convert, prepare

CALIB = 4
needs_onert = pytest.mark.skipif(not onert_available(), reason="onert is installed by the test extra on Linux x86_64 only")


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.fixture(scope="module")
def tiny_quant(tiny):
    q = prepare(tiny)
    pre = ImagePreprocessor(tiny.config, max_soft_tokens=70)
    calibrate(q, [pre([p]) | {"image_ids": [p.name]} for p in sample_images()[:CALIB]])
    convert(q)
    return q


@pytest.fixture(scope="module")
def exports(tiny_quant, tmp_path_factory):
    """(mode, input dtype) -> ExportResult, tiny at 70 soft tokens."""
    folder = tmp_path_factory.mktemp("onert")
    out = {}
    for mode, input_dtype in (("quant", "integer"), ("quant", "float"), ("float", "integer")):
        path = folder / f"{mode}_{input_dtype}.circle"
        out[(mode, input_dtype)] = export_circle(tiny_quant, None, path, mode=mode, max_soft_tokens=70, input_dtype=input_dtype)
    return out


def _first_op(data: bytes) -> str:
    from tico.circle.runtime.program import CircleProgram

    return CircleProgram.from_bytes(data).operators[0].name


# ------------------------------------------------------------------ integer end to end
def test_integer_input_has_qparams_and_no_dtype_changes(exports):
    res = exports[("quant", "integer")]
    data = res.path.read_bytes()
    dtype, scale, zp = input_qparams(data)
    assert dtype == "UINT8" and scale is not None and zp is not None
    assert res.input_dtype == "integer"
    assert res.tensors_without_qparams == []  # graph input and output included
    assert res.dtype_mismatches == []
    assert res.io_tensors[0].startswith("input") and "UINT8" in res.io_tensors[0] and "quantized" in res.io_tensors[0]


def test_float_input_is_followed_by_a_quantize_op(exports):
    res = exports[("quant", "float")]
    data = res.path.read_bytes()
    assert input_qparams(data)[0] == "FLOAT32"
    assert _first_op(data) == "QUANTIZE"
    assert res.tensors_without_qparams == []  # a float input read only by QUANTIZE is bridged
    assert res.dtype_mismatches == []
    # Same maths as the integer-input file: the TICO verification agrees to the bit.
    assert res.verify.max_abs_diff == exports[("quant", "integer")].verify.max_abs_diff


def test_float_input_without_quantize_is_a_dtype_mismatch_and_unquantized(exports, tmp_path):
    """The file of the issue: a FLOAT32 input without qparams read by an integer op."""
    from tico.circle.io import model_from_bytes, model_to_bytes

    model = model_from_bytes(exports[("quant", "integer")].path.read_bytes())
    graph = model.subgraphs[0]
    graph.tensors[graph.inputs[0]].type = 0  # FLOAT32
    graph.tensors[graph.inputs[0]].quantization = None
    bad = model_to_bytes(model)
    summary = summarize_circle(bad)
    assert len(summary["dtype_mismatches"]) == 1 and summary["dtype_mismatches"][0].startswith("STRIDED_SLICE#0")
    assert summary["dtype_mismatches"] == dtype_mismatches(bad)
    assert summary["tensors_without_qparams"] == ["tico::pixel_values"]
    assert "graph input" in summary["unquantized_details"]["tico::pixel_values"]
    # The bridge export_circle applies for input_dtype="float" does nothing to a float input.
    assert quantize_float_input(bad) == bad


def test_unknown_input_dtype_is_one_line_error(tiny_quant, tmp_path):
    with pytest.raises(ExportError) as info:
        export_circle(tiny_quant, None, tmp_path / "x.circle", max_soft_tokens=70, input_dtype="int3")
    assert "\n" not in str(info.value) and "'integer'" in str(info.value)
    assert not (tmp_path / "x.circle").exists()


def test_quantize_input_gives_8_bit_pixels_back():
    pixels = np.arange(256, dtype=np.float32).reshape(1, 1, 256) / 255.0
    q = quantize_input(pixels, 1 / 255, 0)
    assert q.dtype == np.uint8 and np.array_equal(q[0, 0], np.arange(256))
    assert np.array_equal(quantize_input(np.array([-1.0, 2.0]), 1 / 255, 0), [0, 255])  # clamped


def test_bridge_float_ops_keeps_tico_results(exports):
    """Bridging integer ops into float (the onert check's copy) changes no value in TICO's runtime."""
    from tico.circle.runtime import CircleReferenceRuntime, ExecutionMode

    from core.export.runtime import run_lean

    data = exports[("quant", "integer")].path.read_bytes()
    bridged, counts = bridge_float_ops(data, ["GELU", "RMS_NORM"])
    assert set(counts) == {"GELU", "RMS_NORM"}
    assert dtype_mismatches(bridged) == []
    pixels = np.random.default_rng(0).random((1, 630, 768), dtype=np.float32)
    outs = [
        run_lean(CircleReferenceRuntime(d), [pixels], ExecutionMode.FAKE_QUANTIZE)[0] for d in (data, bridged)
    ]
    # DEQUANTIZE -> float op -> QUANTIZE is what FAKE_QUANTIZE computes for the op itself.
    assert np.array_equal(outs[0], outs[1])


# ------------------------------------------------------------------ onert
@needs_onert
def test_float_export_runs_in_onert(exports):
    res = exports[("float", "integer")]
    onert = res.verify.onert
    assert onert.ran, onert.error
    assert onert.bridged == {}  # nothing bridged: every op ran as written
    # Float maths in another runtime: within the float verification's own tolerance of both references.
    assert onert.within_one_step == 1.0 and onert.within_one_step_tico == 1.0


@needs_onert
@pytest.mark.parametrize("input_dtype", ["integer", "float"])
def test_quant_export_runs_in_onert_like_tico(exports, input_dtype):
    res = exports[("quant", input_dtype)]
    onert = res.verify.onert
    assert onert.ran, onert.error
    # onert computes the same quantized graph as TICO's runtime, but its integer kernels (ADD, SUB,
    # SOFTMAX, ...) round on their own: a value may land a step away, and the difference travels.
    # Both are roundings of torch's fake-quant graph, so neither may stray from it by more than the
    # other does plus one output step.
    step = res.verify.step
    assert onert.max_abs_diff <= (res.verify.max_abs_diff + step) * (1 + 1e-4)
    assert onert.vs_tico <= (res.verify.max_abs_diff + step) * (1 + 1e-4)
    assert "ADD" not in onert.bridged and "SOFTMAX" not in onert.bridged  # these ran in integer
    assert onert.summary().startswith("onert: ran")


@needs_onert
def test_onert_refusal_names_its_check(exports):
    """Without the exporter's fixes onert refuses the file; the message says which check failed."""
    from tico.circle.io import model_from_bytes, model_to_bytes

    model = model_from_bytes(exports[("quant", "integer")].path.read_bytes())
    graph = model.subgraphs[0]
    graph.tensors[graph.inputs[0]].type = 0
    graph.tensors[graph.inputs[0]].quantization = None
    with pytest.raises(ExportError, match="OperationValidator failed"):
        run_onert(model_to_bytes(model), [np.zeros((1, 630, 768), np.float32)])


def test_onert_missing_is_reported_not_raised(exports, monkeypatch):
    import core.export.onert as co

    monkeypatch.setattr(co, "onert_available", lambda: False)
    res = exports[("quant", "integer")]
    result = co.check_in_onert(res.path.read_bytes(), torch.zeros(1, 630, 768), torch.zeros(64, 64), None, 1.0)
    assert not result.ran and "pip install" in result.error
    assert result.summary().startswith("onert: did not run")


def test_no_batch_matmul_reads_a_constant(exports):
    """onert refuses constant BATCH_MATMUL operands: the pooling matrix is a FULLY_CONNECTED weight."""
    from tico.circle.runtime.program import CircleProgram

    for res in exports.values():
        program = CircleProgram.from_bytes(res.path.read_bytes())
        for op in program.operators:
            if op.name == "BATCH_MATMUL":
                assert not any(program.tensor(i).is_constant for i in op.inputs if i >= 0), f"{res.path.name}: op {op.index}"
        # The pooled rows still come out right: the TICO check is unchanged in kind.
        assert res.verify.within_one_step > 0


def test_dtype_mismatch_is_a_structural_failure(exports):
    import dataclasses

    from core.export.checks import structural_problems

    res = exports[("quant", "integer")]
    assert structural_problems(res) == ([], [])
    bad = dataclasses.replace(res, dtype_mismatches=["STRIDED_SLICE#0: input x is FLOAT32, output y is UINT8"])
    problems, caveats = structural_problems(bad)
    assert any("change dtype silently" in p and "STRIDED_SLICE#0" in p for p in problems) and caveats == []
    # Inside a module the user keeps in float it is a caveat of that choice, not a fault.
    kept = dataclasses.replace(bad, tensor_modules={**res.tensor_modules, "y": "encoder.layers.1.mlp.down_proj"})
    problems, caveats = structural_problems(kept, ["encoder.layers.1.mlp.down_proj"])
    assert problems == [] and caveats and "kept in float" in caveats[0]
