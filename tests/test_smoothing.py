"""core.remedies.smoothing: SmoothQuant and CLE keep the float function, shrink ranges, and help uint8."""

from __future__ import annotations

import pytest
import torch
from wrappers.wrapper_support import judged_against_noise

from core.analysis.metrics import sqnr_db
from core.cancel import CancelToken
from core.config import build_config
from core.data.images import ImagePreprocessor
from core.errors import CancelledError, ConfigError
from core.models import build_seeded_model, load_model, tiny_config
from core.ptq import calibrate, convert, prepare
from core.remedies.smoothing import apply_cle, apply_smoothquant

TOKENS = 70


@pytest.fixture(scope="module")
def photos(sample_images):
    """Calibration and evaluation batches (one photo each), preprocessed for the tiny config."""
    pre = ImagePreprocessor(tiny_config(), max_soft_tokens=TOKENS)
    calib = [dict(pre([p])) for p in sample_images[:4]]
    evals = [dict(pre([p])) for p in sample_images[4:6]]
    return calib, evals


def _uint8(model):
    return prepare(model, build_config(activation="uint8", weight="uint8"))


def _float_output(qmodel, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([qmodel(**b, static=True).last_hidden_state for b in batches])


def _assert_float_function_kept(qmodel, batches, reference: torch.Tensor) -> None:
    rows = sum(int(b["pixel_values"].shape[1]) for b in batches) // len(batches)
    verdict = judged_against_noise(qmodel, lambda: _float_output(qmodel, batches), reference, rows)
    assert verdict.ok, verdict.summary


def _changed_parameters(before: dict[str, torch.Tensor], model) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


def _uint8_sqnr(qmodel, calib, evals) -> float:
    reference = _float_output(qmodel, evals)
    calibrate(qmodel, calib, reset=True)
    convert(qmodel)
    with torch.no_grad():
        quantized = torch.cat([qmodel(**b).last_hidden_state for b in evals])
    return sqnr_db(reference, quantized)


# --------------------------------------------------------------------------- SmoothQuant
def test_smoothquant_keeps_the_float_function_and_reports_exactly_what_it_changed(photos) -> None:
    calib, evals = photos
    qmodel = _uint8(load_model("tiny+outliers"))
    reference = _float_output(qmodel, evals)
    before = {n: p.detach().clone() for n, p in qmodel.source.named_parameters()}
    report = apply_smoothquant(qmodel, calib, {"*": 0.5})
    _assert_float_function_kept(qmodel, evals, reference)
    assert set(report.summary["parameters"]) == _changed_parameters(before, qmodel.source)
    assert report.summary["skipped"] == {}
    assert report.step.kind == "smoothquant" and report.modules
    # q/k/v share input_layernorm, gate/up share pre_feedforward_layernorm: one group per norm.
    assert set(report.summary["groups"]) == {f"encoder.layers.{i}.{n}" for i in range(2) for n in ("input_layernorm", "pre_feedforward_layernorm")}
    for name, figures in report.summary["input_absmax"].items():
        assert figures["after"] < figures["before"] / 10, name  # the injected >= 20x outliers are gone
    assert report.to_json()["summary"]["parameters"] == report.summary["parameters"]


def test_smoothquant_shrinks_the_recalibrated_norm_ranges_and_recovers_uint8(photos) -> None:
    calib, evals = photos
    plain_sqnr = _uint8_sqnr(_uint8(load_model("tiny")), calib, evals)
    outliers = _uint8(load_model("tiny+outliers"))
    outlier_sqnr = _uint8_sqnr(outliers, calib, evals)
    ranges_before = {o.name: float(o.max_val - o.min_val) for o in outliers.observers() if o.role == "output"}

    smoothed = _uint8(load_model("tiny+outliers"))
    report = apply_smoothquant(smoothed, calib, {"*": 0.5})
    smoothed_sqnr = _uint8_sqnr(smoothed, calib, evals)
    ranges_after = {o.name: float(o.max_val - o.min_val) for o in smoothed.observers() if o.role == "output"}
    for norm in report.summary["groups"]:
        # The norm's output is the matched linears' input: its observed range shrinks after recalibration,
        # and by far more than 2x, since the injected outliers made it >= 20x wider (tests/test_models.py).
        assert ranges_after[f"{norm}.output"] < ranges_before[f"{norm}.output"] / 5, norm
    # The outliers cost uint8 a wide gap; SmoothQuant must close at least half of it (the target).
    assert plain_sqnr - outlier_sqnr > 3.0, (plain_sqnr, outlier_sqnr)
    assert smoothed_sqnr - outlier_sqnr >= 0.5 * (plain_sqnr - outlier_sqnr), (plain_sqnr, outlier_sqnr, smoothed_sqnr)


def test_smoothquant_alpha_per_glob(photos) -> None:
    calib, _ = photos
    qmodel = prepare(load_model("tiny+outliers"))
    report = apply_smoothquant(qmodel, calib, {"encoder.layers.0.mlp.up_proj": 0.8, "encoder.layers.1.input_layernorm": 0.3})
    groups = report.summary["groups"]
    assert {n: g["alpha"] for n, g in groups.items()} == {
        "encoder.layers.0.pre_feedforward_layernorm": 0.8,
        "encoder.layers.1.input_layernorm": 0.3,
    }
    # A glob on up_proj alone still rescales gate_proj: both read the norm's one output.
    assert groups["encoder.layers.0.pre_feedforward_layernorm"]["linears"] == [
        "encoder.layers.0.mlp.gate_proj",
        "encoder.layers.0.mlp.up_proj",
    ]


@pytest.mark.parametrize(
    "alphas, message",
    [
        ({"*": 1.5}, "alpha for '\\*' is 1.5"),
        ({"nothing.*": 0.5}, "matches no norm"),
        ({"*.mlp.gate_proj": 0.5, "*.mlp.up_proj": 0.7}, "different alphas"),
    ],
)
def test_smoothquant_refuses_bad_settings_before_any_work(photos, alphas, message) -> None:
    qmodel = prepare(load_model("tiny"))
    before = {n: p.detach().clone() for n, p in qmodel.source.named_parameters()}
    with pytest.raises(ConfigError, match=message):
        apply_smoothquant(qmodel, photos[0], alphas)
    with pytest.raises(ConfigError, match="at least one calibration image"):
        apply_smoothquant(qmodel, [], {"*": 0.5})
    assert _changed_parameters(before, qmodel.source) == set()


def test_smoothquant_cancelled_changes_nothing(photos) -> None:
    qmodel = prepare(load_model("tiny+outliers"))
    before = {n: p.detach().clone() for n, p in qmodel.source.named_parameters()}
    token = CancelToken()
    token.cancel()
    with pytest.raises(CancelledError):
        apply_smoothquant(qmodel, photos[0], {"*": 0.5}, cancel=token)
    assert _changed_parameters(before, qmodel.source) == set()


def test_smoothquant_refuses_groups_behind_a_finite_input_clamp(photos) -> None:
    # Checked on the calibration photos the clamps of this model bind on some groups only, and the
    # held-out photos then bind where those did not: a scalar clamp cannot be crossed by a rescale.
    qmodel = prepare(build_seeded_model(tiny_config(use_clipped_linears=True)))
    before = {n: p.detach().clone() for n, p in qmodel.source.named_parameters()}
    report = apply_smoothquant(qmodel, photos[0], {"*": 0.5})
    assert report.modules == [] and report.summary["parameters"] == [] and len(report.summary["skipped"]) == 4
    assert all("input clamp" in why and "binds" in why for why in report.summary["skipped"].values())
    assert _changed_parameters(before, qmodel.source) == set()


# --------------------------------------------------------------------------- CLE
def test_cle_equalises_up_and_down_and_keeps_the_float_function(photos) -> None:
    _, evals = photos
    qmodel = prepare(load_model("tiny+outliers"))
    reference = _float_output(qmodel, evals)
    before = {n: p.detach().clone() for n, p in qmodel.source.named_parameters()}
    report = apply_cle(qmodel, ["*"])
    _assert_float_function_kept(qmodel, evals, reference)
    assert set(report.summary["parameters"]) == _changed_parameters(before, qmodel.source)
    assert sorted(report.summary["pairs"]) == ["encoder.layers.0.mlp", "encoder.layers.1.mlp"]
    for mlp in qmodel.encoder.layers:
        up = mlp.mlp.up_proj.linear.weight.abs().amax(dim=1)
        down = mlp.mlp.down_proj.linear.weight.abs().amax(dim=0)
        torch.testing.assert_close(up, down)  # each channel's range is the same on both sides
    for figures in report.summary["pairs"].values():
        assert figures["down_column_absmax_spread"]["after"] < figures["down_column_absmax_spread"]["before"]
    # v_proj -> o_proj has v_norm between them: named as skipped, never changed.
    assert all("v_norm" in why for why in report.summary["skipped"].values())
    assert len(report.summary["skipped"]) == 2


def test_cle_refuses_pairs_across_a_finite_clamp_and_unknown_globs() -> None:
    qmodel = prepare(build_seeded_model(tiny_config(use_clipped_linears=True)))
    before = {n: p.detach().clone() for n, p in qmodel.source.named_parameters()}
    report = apply_cle(qmodel, ["*.mlp"])
    assert report.modules == [] and report.summary["parameters"] == []
    assert all("output clamp" in why for why in report.summary["skipped"].values())
    assert _changed_parameters(before, qmodel.source) == set()
    with pytest.raises(ConfigError, match="matches no mlp"):
        apply_cle(qmodel, ["*.q_proj"])
