"""Three-way check (issue 6, part 5): torch FP vs torch fake-quant vs the exported Circle file.

Tiny model, max_soft_tokens=70, calibrated through a Session on bundled photos and exported with
session.export; one export per fixture (exports are the slow part).
"""

from __future__ import annotations

import json
import re

import pytest

from core.analysis.tap import module_output_observers
from core.analysis.threeway import ThreeWayResult, three_way_check, three_way_session
from core.cancel import CancelToken
from core.config import PTQConfig
from core.errors import CancelledError, ExportError
from core.export.pipeline import ROOT_MODULE, ExportResult
from core.export.verdict import STEP_HAIR
from core.session import Session

FLOAT_MODULE = "encoder.layers.1.mlp.down_proj"


def _session(sample_images, config=None) -> Session:
    s = Session(model_spec="tiny", config=config or PTQConfig(), max_soft_tokens=70)
    s.add_images(sample_images[:2])
    s.calibrate()
    return s


@pytest.fixture(scope="module")
def exported(sample_images, tmp_path_factory):
    s = _session(sample_images)
    result = s.export(tmp_path_factory.mktemp("threeway") / "m.circle")
    return s, result, three_way_session(s, result)


@pytest.fixture(scope="module")
def exported_with_float(sample_images, tmp_path_factory):
    """down_proj of the last layer kept float by a config override: its tensors have no qparams."""
    s = _session(sample_images, PTQConfig(overrides={FLOAT_MODULE: "float"}))
    result = s.export(tmp_path_factory.mktemp("threeway_float") / "f.circle")
    return s, result, three_way_session(s, result)


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, f"not one line: {text!r}"
    return text


# ------------------------------------------------------------------ the name map
def test_name_map_covers_every_tensor_and_every_encoder_layer_module(exported):
    s, r, _ = exported
    from tico.circle.runtime.program import CircleProgram

    program = CircleProgram.from_bytes(r.path.read_bytes())
    assert set(r.tensor_modules) == {t.name for t in program.tensors}
    wrappers = [name for name, _ in s.qmodel.wrappers()]
    assert set(r.tensor_modules.values()) <= set(wrappers) | {ROOT_MODULE}
    owners = set(r.tensor_modules.values())
    layer_modules = [n for n in wrappers if re.match(r"encoder\.layers\.\d+", n)]
    assert {n.split(".")[2] for n in layer_modules} == {str(i) for i in range(s.qmodel.config.num_hidden_layers)}
    missing = [n for n in layer_modules if n not in owners]
    assert not missing, missing
    # The parts the parent runs through plain methods are attributed to them, not to the root.
    assert {"patch_embedder", "patch_embedder.input_proj", "pooler"} <= owners
    # A module's own tensors: q_proj's fully connected output belongs to q_proj.
    q = [t for t, m in r.tensor_modules.items() if m == "encoder.layers.0.self_attn.q_proj"]
    assert any("linear" in t for t in q), q


# ------------------------------------------------------------------ the three-way rows
def test_every_module_output_has_a_row_in_forward_order(exported):
    s, r, tw = exported
    assert isinstance(tw, ThreeWayResult)
    assert tw.intermediates_available and "exposed" in tw.note
    assert "FAKE_QUANTIZE" in tw.runtime
    assert tw.unmatched == []
    expected = {name for name, _, _ in module_output_observers(s.qmodel)}
    assert {row.module for row in tw.rows[:-1]} == expected
    assert tw.rows[-1].module == ROOT_MODULE
    ops = [row.operator for row in tw.rows]
    assert ops == sorted(ops)
    for i in range(s.qmodel.config.num_hidden_layers):
        for part in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj", "post_feedforward_layernorm"):
            assert tw.row(f"encoder.layers.{i}.{part}") is not None
    # Containers pair with their last child's output, like core.analysis.tap.module_output_observers.
    assert tw.row("encoder.layers.0.self_attn").tensor == tw.row("encoder.layers.0.self_attn.o_proj").tensor
    assert r.tensor_modules[tw.row("encoder.layers.0.self_attn.q_proj").tensor] == "encoder.layers.0.self_attn.q_proj"


def test_circle_matches_fake_quant_within_a_few_steps_while_fp_differs(exported):
    _, _, tw = exported
    for row in tw.rows:
        assert row.quantized and row.scale and row.scale > 0 and row.dtype.startswith(("UINT", "INT"))
        d = row.fq_vs_circle
        # Each row is judged against torch's own rounding noise for that tensor on this machine.
        n = row.noise_floor
        assert n is not None and n.within_one_step is not None, row
        assert row.verdict == "verified", row
        assert d.max_steps is not None and d.max_steps <= (n.max_steps + 1.0) * (1 + STEP_HAIR), row
        # The quantization error itself is real (not zero) and dominates what the file adds.
        assert row.fp_vs_fq.max_abs > 0, row
        assert row.fp_vs_circle.peir > 0
    mean_q = sum(r.fp_vs_fq.peir for r in tw.rows) / len(tw.rows)
    mean_c = sum(r.fq_vs_circle.peir for r in tw.rows) / len(tw.rows)
    assert mean_c < mean_q


def test_final_row_matches_export_verification(exported):
    _, r, tw = exported
    out = tw.output
    assert out is tw.rows[-1] and out.module == ROOT_MODULE
    v = r.verify
    assert out.scale == pytest.approx(v.step, rel=1e-5)
    assert out.fq_vs_circle.max_abs == pytest.approx(v.max_abs_diff, abs=1e-5)
    assert out.fq_vs_circle.within_one_step == pytest.approx(v.within_one_step, abs=1e-6)
    assert out.fq_vs_circle.max_steps == pytest.approx(v.max_steps, rel=1e-4)
    assert out.fq_vs_circle.peir == pytest.approx(v.peir, rel=1e-4)


def test_result_serialises_and_summarises(exported):
    _, _, tw = exported
    d = json.loads(json.dumps(tw.to_dict()))
    assert len(d["rows"]) == len(tw.rows) and d["intermediates_available"] is True
    assert set(d["rows"][0]) >= {"tensor", "module", "shape", "dtype", "scale", "zero_point", "fp_vs_fq", "fq_vs_circle", "fp_vs_circle"}
    lines = tw.summary_lines()
    assert len(lines) >= len(tw.rows) + 3 and all("\n" not in line for line in lines)
    assert any("encoder.layers.0.self_attn.q_proj" in line for line in lines)


def test_path_with_name_map_gives_the_same_rows_and_without_it_the_output_only(exported):
    s, r, tw = exported
    batch = s.preprocessor([s.usable_images()[0].path])
    again = three_way_check(s.qmodel, r.path, batch, tensor_modules=r.tensor_modules)
    assert [(x.module, x.tensor) for x in again.rows] == [(x.module, x.tensor) for x in tw.rows]
    assert again.output.fq_vs_circle.max_abs == pytest.approx(tw.output.fq_vs_circle.max_abs, abs=1e-6)
    some = three_way_check(s.qmodel, r.path, batch, tensor_modules=r.tensor_modules, modules=["encoder.layers.1.mlp"])
    mlp = "encoder.layers.1.mlp"
    assert [x.module for x in some.rows] == [f"{mlp}.gate_proj", f"{mlp}.up_proj", mlp, f"{mlp}.down_proj", ROOT_MODULE]
    bare = three_way_check(s.qmodel, str(r.path), batch)
    assert [x.module for x in bare.rows] == [ROOT_MODULE]
    assert "only the final output" in bare.note


# ------------------------------------------------------------------ tensors without qparams
def test_float_module_tensors_are_listed_with_their_module(exported_with_float):
    _, r, tw = exported_with_float
    assert r.tensors_without_qparams, "a float override must leave float tensors in the file"
    assert [t for t, _ in r.unquantized] == r.tensors_without_qparams  # same list, with modules
    assert all(m == FLOAT_MODULE for _, m in r.unquantized), r.unquantized
    assert tw.unquantized == r.unquantized
    row = tw.row(FLOAT_MODULE)
    assert row is not None and not row.quantized and row.scale is None and row.dtype.startswith("FLOAT")
    assert row.fq_vs_circle.within_one_step is None
    assert row.tensor in dict(r.unquantized)
    assert any(FLOAT_MODULE in line and "module" in line for line in tw.summary_lines())
    # The export says so: the numbers verify, the kept-float module is a caveat (amber), not a fault.
    assert r.verify.verdict.level == "check" and "kept in float" in r.verify.verdict.reason, r.verify.verdict
    # The rest is still quantized and within torch's own rounding noise, row by row.
    for other in tw.rows:
        if other.module not in (FLOAT_MODULE, "encoder.layers.1.mlp"):
            assert other.quantized and other.verdict == "verified", other


# ------------------------------------------------------------------ failures: one-line core.errors
def test_missing_and_unreadable_files(exported, tmp_path):
    s, _, _ = exported
    batch = s.preprocessor([s.usable_images()[0].path])
    with pytest.raises(ExportError) as e:
        three_way_check(s.qmodel, tmp_path / "nope.circle", batch)
    assert "nope.circle" in _one_line(e.value) and "export" in str(e.value)
    bad = tmp_path / "bad.circle"
    bad.write_bytes(b"this is not a flatbuffer")
    with pytest.raises(ExportError) as e:
        three_way_check(s.qmodel, bad, batch)
    assert "bad.circle" in _one_line(e.value)


def test_another_image_layout_is_refused(exported, sample_images):
    s, r, _ = exported
    used = s.usable_images()[0].path
    other = next(p for p in sample_images if str(p) != str(used) and s.preprocessor([p])["pixel_position_ids"].ne(
        s.preprocessor([used])["pixel_position_ids"]).any())
    with pytest.raises(ExportError) as e:
        three_way_check(s.qmodel, r, s.preprocessor([other]))
    assert "layout" in _one_line(e.value)


def test_cancel(exported):
    s, r, _ = exported
    token = CancelToken()
    token.cancel()
    with pytest.raises(CancelledError) as e:
        three_way_session(s, r, cancel=token)
    _one_line(e.value)


def test_export_result_keeps_old_fields(exported):
    _, r, _ = exported
    assert isinstance(r, ExportResult)
    assert r.tensors_without_qparams == [] and r.unquantized == []
    assert r.layout.startswith(f"{r.max_patches}:")


def test_float_export_compares_float_with_float(sample_images, tmp_path):
    """An uncalibrated (NO_QUANT) model exports a float file; the check runs it NATIVE and every
    row agrees to float rounding, with no steps (no qparams) and no quantization error."""
    from core.data.images import ImagePreprocessor
    from core.export.pipeline import export_circle
    from core.models import load_model
    from core.ptq import prepare

    qmodel = prepare(load_model("tiny"))
    batch = ImagePreprocessor(qmodel.config, max_soft_tokens=70)([sample_images[0]])
    r = export_circle(qmodel, batch, tmp_path / "float.circle")
    assert r.mode == "float"
    tw = three_way_check(qmodel, r, batch)
    assert "NATIVE" in tw.runtime and tw.intermediates_available
    assert len(tw.rows) > 10 and tw.rows[-1].module == ROOT_MODULE
    for row in tw.rows:
        assert not row.quantized and row.fq_vs_circle.max_steps is None
        assert row.fp_vs_fq.max_abs == 0.0
        # Float rows: within two noisy torch copies' distance (core.export.verdict's float rule).
        assert row.noise_floor is not None and row.verdict == "verified", row
        assert row.fq_vs_circle.max_abs <= 2 * max(row.noise_floor.max_abs, 1e-30), row
    assert tw.rows[-1].fq_vs_circle.max_abs == pytest.approx(r.verify.max_abs_diff, abs=1e-6)
