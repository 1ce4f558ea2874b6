"""GPTQ / AdaRound weight rounding and pinned weight qparams (core.remedies.rounding, Observer.pin_qparams,
QuantLinear's rounded copy: the float model stays the original, only the quantized path is rounded)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from core.cancel import CancelToken
from core.config import PTQConfig, QuantSpec
from core.data.images import ImagePreprocessor
from core.data.resources import sample_images
from core.errors import CancelledError, ConfigError
from core.models import load_model
from core.ptq import calibrate, convert, prepare
from core.quant.dtypes import get_dtype
from core.quant.mode import Mode
from core.remedies.rounding import apply_weight_rounding, end_to_end_sqnr_db, linear_targets
from core.session_store import load_observer_state, observer_state
from core.wrappers.layers import QuantLinear

UINT4 = PTQConfig(weight=QuantSpec("uint4", per_channel=True))
SOFT_TOKENS = 70


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model("tiny")


@pytest.fixture(scope="module")
def images(tiny):
    pre = ImagePreprocessor(tiny.config, max_soft_tokens=SOFT_TOKENS)
    paths = sample_images()
    batches = [pre([p]) | {"image_ids": [p.name]} for p in paths]
    return batches[:4], batches[4:6]  # calibration, evaluation (unseen by the rounding)


def _calibrated(tiny, calib, config=UINT4):
    q = prepare(tiny, config)
    calibrate(q, calib)
    convert(q)
    return q


@pytest.fixture(scope="module")
def minmax(tiny, images):
    return _calibrated(tiny, images[0])


@pytest.fixture(scope="module")
def gptq(minmax, images):
    q = copy.deepcopy(minmax)
    report = apply_weight_rounding(q, images[0], ["*"], "gptq")
    return q, report


def _linears(qmodel):
    return {n: w for n, w in qmodel.wrappers() if isinstance(w, QuantLinear)}


def _outputs(model, batches) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(pixel_values=b["pixel_values"], pixel_position_ids=b["pixel_position_ids"]).last_hidden_state for b in batches]


def test_report_names_every_rounded_linear_and_no_float_parameter(gptq):
    q, report = gptq
    linears = _linears(q)
    assert report.modules == list(linears) and report.step.kind == "gptq"
    assert report.summary["parameters"] == []  # no float weight changed
    assert report.summary["rounded"] == report.modules == sorted(q.rounded_weights(), key=report.modules.index)
    assert q.mode is Mode.QUANT  # the mode it was in


def test_the_float_model_stays_the_original(gptq, tiny, images):
    """NO_QUANT (every float reference) is the untouched float model, bit for bit, after a rounding."""
    q, _ = gptq
    original = dict(tiny.named_parameters())
    assert all(torch.equal(p, original[n]) for n, p in q.source.named_parameters())
    with q.mode_as(Mode.NO_QUANT):
        rounded = _outputs(q, images[1])
    assert all(torch.equal(a, b) for a, b in zip(rounded, _outputs(tiny, images[1])))
    assert q.mode is Mode.QUANT


def test_rounded_weights_are_on_their_pinned_grid_and_quant_uses_them(gptq, minmax, images):
    """(a) every rounded copy equals its own fake-quant, bit for bit, its grid is pinned, and QUANT
    runs on it (the cached fake-quantized weight is the copy; the output differs from min-max's)."""
    q, report = gptq
    for name in report.modules:
        wrapper = _linears(q)[name]
        rounded = wrapper.rounded_weight
        assert rounded is not None and wrapper.obs_weight.is_pinned, name
        assert torch.equal(wrapper.obs_weight.fake_quant(rounded), rounded), name
        assert torch.equal(wrapper.weight_fq, rounded), name
        assert not torch.equal(rounded, wrapper.obs_weight.fake_quant(wrapper.linear.weight)), name
    assert not any(torch.equal(a, b) for a, b in zip(_outputs(q, images[1]), _outputs(minmax, images[1])))


def test_rounding_changes_codes_not_just_copies_nearest(gptq, minmax):
    q, report = gptq
    changed = [f["changed"] for f in report.summary["layers"].values()]
    assert min(changed) > 0, "every layer should move some weights off nearest rounding"
    # Against the grid of the min-max model: the same qparams, other integer codes.
    for name, wrapper in _linears(q).items():
        before = _linears(minmax)[name].obs_weight
        assert torch.equal(before.scale, wrapper.obs_weight.scale) and torch.equal(before.zero_point, wrapper.obs_weight.zero_point)


def test_recalibration_keeps_the_pinned_qparams_and_rounded_copies(gptq, images):
    """(b) recalibrating recomputes min-max statistics but keeps the pinned weight grid and the copy."""
    q = copy.deepcopy(gptq[0])
    rounded = q.rounded_weights()
    # One grid pinned away from min-max, so a recalibration that lost the pin would show.
    up = _linears(q)["encoder.layers.0.mlp.up_proj"]
    wide = up.obs_weight.scale * 1.5
    up.pin_weight(up.linear.weight, wide, up.obs_weight.zero_point)
    rounded[up.module_name] = up.rounded_weight
    pinned = {n: (w.obs_weight.scale.clone(), w.obs_weight.zero_point.clone()) for n, w in _linears(q).items()}
    calibrate(q, images[0], reset=True)
    convert(q)
    for name, wrapper in _linears(q).items():
        obs = wrapper.obs_weight
        assert torch.equal(obs.scale, pinned[name][0]) and torch.equal(obs.zero_point, pinned[name][1]), name
        assert torch.equal(wrapper.rounded_weight, rounded[name]) and torch.equal(wrapper.weight_fq, rounded[name]), name
    lo, hi = up.obs_weight.min_val.clamp(max=0), up.obs_weight.max_val.clamp(min=0)
    assert not torch.equal(((hi.double() - lo.double()) / 15).float(), up.obs_weight.scale)  # min-max gives another grid
    # reset_statistics keeps them too; unpin lets the statistics decide again and drops the copy.
    q.reset_statistics()
    obs = up.obs_weight
    assert obs.is_pinned and torch.equal(obs.scale, wide)
    calibrate(q, images[0][:1])
    obs.unpin()
    convert(q)
    assert not torch.equal(obs.scale, wide)
    assert up.rounded_weight is None and up.weight_rounded is None
    assert torch.equal(up.weight_fq, obs.fake_quant(up.linear.weight))


def test_a_new_dtype_drops_the_pin_and_the_rounded_copy(gptq, images):
    """Mixed precision moving a weight uint4 -> uint8: the uint4 codes mean nothing on the new grid."""
    q = copy.deepcopy(gptq[0])
    up = _linears(q)["encoder.layers.0.mlp.up_proj"]
    up.obs_weight.qdtype = get_dtype("uint8")
    q.freeze()
    assert not up.obs_weight.is_pinned and up.rounded_weight is None and up.weight_rounded is None
    assert torch.equal(up.weight_fq, up.obs_weight.fake_quant(up.linear.weight))
    assert int(up.obs_weight.zero_point.max()) > 15  # min-max on the uint8 grid
    others = {n: w for n, w in _linears(q).items() if w is not up}
    assert all(w.rounded_weight is not None for w in others.values())


def test_a_later_rescaled_float_weight_drops_its_rounding_at_recalibration(gptq, images):
    """SmoothQuant or CLE after a rounding rescale the float weight (then the session recalibrates):
    the rounded copy and its grid belong to the old weight, so they go; the untouched linears keep theirs."""
    q = copy.deepcopy(gptq[0])
    up = _linears(q)["encoder.layers.0.mlp.up_proj"]
    with torch.no_grad():
        up.linear.weight[:, 0].mul_(2.0)  # one input column rescaled, as SmoothQuant does
    calibrate(q, images[0][:1], reset=True)
    convert(q)
    assert up.rounded_weight is None and not up.obs_weight.is_pinned
    assert torch.equal(up.weight_fq, up.obs_weight.fake_quant(up.linear.weight))
    assert all(w.rounded_weight is not None for n, w in _linears(q).items() if w is not up)


def test_session_observer_state_round_trip_keeps_the_pin(gptq, tiny, images):
    """(c) the pin is observer state and the rounded copies are loaded beside it: the reloaded model
    computes the same quantized output bit for bit; older sessions without pins still load."""
    q, report = gptq
    tensors, prov = observer_state(q)
    fresh = prepare(tiny, UINT4)
    assert not any(w.obs_weight.is_pinned for w in _linears(fresh).values())  # a new prepare has no pins
    assert fresh.rounded_weights() == {}
    fresh.load_rounded_weights(q.rounded_weights())
    load_observer_state(fresh, tensors, prov)
    for name, wrapper in _linears(q).items():
        loaded = _linears(fresh)[name].obs_weight
        assert loaded.is_pinned
        assert torch.equal(loaded.scale, wrapper.obs_weight.scale) and torch.equal(loaded.zero_point, wrapper.obs_weight.zero_point)
        assert torch.equal(_linears(fresh)[name].rounded_weight, wrapper.rounded_weight), name
    assert all(torch.equal(a, b) for a, b in zip(_outputs(fresh, images[1]), _outputs(q, images[1])))
    with pytest.raises(ConfigError, match="no linear"):
        fresh.load_rounded_weights({"encoder.layers.0.mlp": torch.zeros(1)})
    with pytest.raises(ConfigError, match="shape"):
        fresh.load_rounded_weights({"encoder.layers.0.mlp.up_proj": torch.zeros(3, 3)})
    old = {k: v for k, v in tensors.items() if not k.endswith("/pinned_grid")}
    older = prepare(tiny, UINT4)
    load_observer_state(older, old, prov)
    assert not any(w.obs_weight.is_pinned for w in _linears(older).values())
    # A pin made for the uint4 grid means nothing on a uint8 one: it is dropped, min-max decides.
    wider = prepare(tiny, PTQConfig())
    load_observer_state(wider, tensors, prov)
    obs = _linears(wider)["encoder.layers.0.mlp.up_proj"].obs_weight
    assert not obs.is_pinned and int(obs.zero_point.max()) > 15


def test_gptq_lowers_the_layer_reconstruction_error(gptq, minmax, images):
    """(e) on the calibration inputs of the first linear (nothing rounded before it), GPTQ's output
    error is at most half min-max rounding's (>= 3 dB), and every layer's own figure improves."""
    q, report = gptq
    proj_min, proj_gptq = minmax.patch_embedder.input_proj, q.patch_embedder.input_proj
    seen: list[torch.Tensor] = []
    handle = proj_min.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            for b in images[0]:
                minmax(pixel_values=b["pixel_values"], pixel_position_ids=b["pixel_position_ids"])
    finally:
        handle.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()
    w = proj_min.linear.weight.double()
    err_nearest = float(((x @ (w - proj_min.weight_fq.double()).t()) ** 2).sum())
    err_gptq = float(((x @ (w - proj_gptq.rounded_weight.double()).t()) ** 2).sum())
    assert err_gptq <= 0.5 * err_nearest, (err_gptq, err_nearest)
    for name, f in report.summary["layers"].items():
        assert f["rounded_db"] > f["nearest_db"], (name, f)


def test_gptq_raises_end_to_end_sqnr_at_uint4(gptq, minmax, tiny, images):
    """(e) end to end on images the rounding never saw: >= 3 dB over min-max (issue 14's target)."""
    before = end_to_end_sqnr_db(tiny, minmax, images[1])
    after = end_to_end_sqnr_db(tiny, gptq[0], images[1])
    assert after >= before + 3.0, (before, after)


def test_export_carries_the_pinned_qparams_and_codes(tiny, images, tmp_path):
    """(d) the Circle file holds exactly the pinned scales / zero points and the rounded integer weights."""
    from tico.circle.runtime.program import CircleProgram

    from core.export.pipeline import export_circle

    q = _calibrated(tiny, images[0], PTQConfig())  # uint8 weights: the verified export path
    report = apply_weight_rounding(q, images[0], ["encoder.layers.0"], "gptq")
    result = export_circle(q, images[0][0], tmp_path / "gptq.circle")
    assert result.tensors_without_qparams == [] and result.verify.verdict.level == "verified"
    program = CircleProgram.from_bytes(result.path.read_bytes())
    found = set()
    for t in program.tensors:
        module = result.tensor_modules.get(t.name)
        if not (t.is_constant and t.is_quantized and module in report.modules and t.constant.ndim == 2):
            continue
        obs = _linears(q)[module].obs_weight
        weight = _linears(q)[module].rounded_weight
        assert not torch.equal(weight, obs.fake_quant(_linears(q)[module].linear.weight)), module  # GPTQ's codes, not nearest
        assert np.array_equal(np.asarray(t.quantization.scale, dtype=np.float32), obs.scale.numpy()), module
        assert np.array_equal(np.asarray(t.quantization.zero_point), obs.zero_point.numpy()), module
        codes = torch.round(weight / obs.scale[:, None]) + obs.zero_point[:, None]
        assert np.array_equal(t.constant.astype(np.int64), codes.to(torch.int64).numpy()), module
        found.add(module)
    assert found == set(report.modules)


def test_adaround_is_seeded_on_the_grid_and_better_than_nearest(minmax, images):
    runs = []
    for _ in range(2):
        q = copy.deepcopy(minmax)
        report = apply_weight_rounding(q, images[0][:2], ["encoder.layers.0.mlp"], "adaround", iterations=120)
        runs.append(q.rounded_weights())
        for name in report.modules:
            wrapper = _linears(q)[name]
            assert wrapper.obs_weight.is_pinned
            assert torch.equal(wrapper.obs_weight.fake_quant(wrapper.rounded_weight), wrapper.rounded_weight)
            f = report.summary["layers"][name]
            assert f["rounded_db"] > f["nearest_db"] and f["changed"] > 0, (name, f)
    assert runs[0].keys() == {"encoder.layers.0.mlp.gate_proj", "encoder.layers.0.mlp.up_proj", "encoder.layers.0.mlp.down_proj"}
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


def test_a_glob_matching_no_linear_is_one_line_naming_the_closest(minmax, images):
    with pytest.raises(ConfigError) as err:
        apply_weight_rounding(minmax, images[0], ["encoder.layers.0.self_attn.q_prj"], "gptq")
    text = str(err.value)
    assert "\n" not in text and "q_prj" in text and "encoder.layers.0.self_attn.q_proj" in text
    with pytest.raises(ConfigError, match="unknown rounding method"):
        apply_weight_rounding(minmax, images[0], ["*"], "nearest")
    with pytest.raises(ConfigError, match="unknown option 'steps'"):
        apply_weight_rounding(minmax, images[0], ["*"], "adaround", steps=3)
    assert [t.name for t in linear_targets(minmax, ["encoder.layers.1.mlp.up_proj"])] == ["encoder.layers.1.mlp.up_proj"]


def test_cancel_restores_weights_and_qparams_exactly(minmax, images):
    q = copy.deepcopy(minmax)
    weights = {n: p.detach().clone() for n, p in q.source.named_parameters()}
    state = {k: v.clone() for k, v in q.state_dict().items()}
    token = CancelToken()
    rounded: list[str] = []

    def progress(done, total, message):
        rounded.append(message)
        if done == 3:
            token.cancel()

    with pytest.raises(CancelledError):
        apply_weight_rounding(q, images[0], ["*"], "gptq", progress=progress, cancel=token)
    assert len(rounded) == 3  # it did change three linears before the cancel was seen
    assert all(torch.equal(p, weights[n]) for n, p in q.source.named_parameters())
    assert all(torch.equal(v, state[k]) for k, v in q.state_dict().items())
    assert not any(w.obs_weight.is_pinned for w in _linears(q).values())
    assert q.rounded_weights() == {}
    assert all(torch.equal(w.weight_fq, w.obs_weight.fake_quant(w.linear.weight)) for w in _linears(q).values())


def test_cancel_puts_back_an_earlier_rounding(gptq, images):
    """A second rounding cancelled part way leaves the first one's copies and pins, not none."""
    q = copy.deepcopy(gptq[0])  # as fix_model copies the session's model: the rounded copies come along
    before = q.rounded_weights()
    assert before.keys() == gptq[0].rounded_weights().keys() and before
    state = {k: v.clone() for k, v in q.state_dict().items()}
    token = CancelToken()

    def progress(done, total, message):
        if done == 2:
            token.cancel()

    with pytest.raises(CancelledError):
        apply_weight_rounding(q, images[0][:1], ["*"], "adaround", iterations=5, progress=progress, cancel=token)
    after = q.rounded_weights()
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    assert all(torch.equal(v, state[k]) for k, v in q.state_dict().items())


def test_a_pin_belongs_to_its_grid():
    """Unit level: kept through reset and compute_qparams; dropped on another grid of the same width."""
    from core.quant.observers import make_observer

    def observer(dtype):
        spec = QuantSpec(dtype, per_channel=True)
        return make_observer("minmax", name="w", module_name="m", role="weight", kind="weight", spec=spec, channels=3)

    torch.manual_seed(0)
    weight = torch.randn(3, 8)
    obs = observer("uint8")
    obs.collect(weight, "weights")
    obs.compute_qparams()
    minmax_scale = obs.scale.clone()
    obs.pin_qparams(minmax_scale * 1.5, torch.tensor([100, 120, 140]))
    obs.reset()
    obs.collect(weight, "weights")
    obs.compute_qparams()
    assert obs.is_pinned and torch.equal(obs.scale, minmax_scale * 1.5) and obs.zero_point.tolist() == [100, 120, 140]
    signed = observer("int8")  # 255 steps as well, but from -128: the uint8 pin means nothing there
    signed.load_state_dict(obs.state_dict())
    signed.compute_qparams()
    assert not signed.is_pinned and int(signed.zero_point.max()) <= 127
    with pytest.raises(ValueError, match="zero points in"):
        obs.pin_qparams(minmax_scale, torch.tensor([0, 300, 0]))
