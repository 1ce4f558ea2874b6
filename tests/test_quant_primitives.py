"""Observers, dtypes and config: the maths of one tensor at a time."""

from __future__ import annotations

import pytest
import torch

from core.config import PTQConfig, QuantSpec
from core.errors import ConfigError, NotCalibratedError
from core.quant.dtypes import DTYPES, get_dtype
from core.quant.observers import EMAMinMaxObserver, MinMaxObserver, PercentileObserver, make_observer


def _obs(cls=MinMaxObserver, spec=QuantSpec(), **kw):
    return cls(name="m.out", module_name="m", role="out", kind="activation", spec=spec, **kw)


@pytest.mark.parametrize(
    "name, qmin, qmax", [("uint8", 0, 255), ("int8", -128, 127), ("int16", -32768, 32767), ("uint4", 0, 15), ("int4", -8, 7)]
)
def test_dtype_ranges(name, qmin, qmax):
    d = get_dtype(name)
    assert (d.qmin, d.qmax) == (qmin, qmax)
    assert set(DTYPES) == {"uint8", "int8", "int16", "uint4", "int4"}


def test_unknown_dtype_is_a_config_error():
    with pytest.raises(ConfigError, match="int3"):
        get_dtype("int3")


def test_minmax_affine_qparams_and_fake_quant_match_the_formula():
    torch.manual_seed(0)
    obs = _obs()
    x = torch.randn(4, 10) * 3 + 1
    obs.collect(x, "a.jpg")
    obs.compute_qparams()
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255
    zp = round(0 - lo / scale)
    assert float(obs.scale) == pytest.approx(scale, rel=1e-6)
    assert int(obs.zero_point) == zp
    expected = (torch.clamp(torch.round(x / scale) + zp, 0, 255) - zp) * scale
    assert torch.allclose(obs.fake_quant(x), expected, atol=1e-6)
    # Every fake-quantized value lies on the grid.
    codes = obs.fake_quant(x) / scale + zp
    assert torch.allclose(codes, codes.round(), atol=1e-3)


def test_symmetric_signed_and_unsigned_zero_points():
    x = torch.tensor([-2.0, 1.0])
    signed = _obs(spec=QuantSpec(dtype="int8", scheme="symmetric"))
    signed.collect(x)
    signed.compute_qparams()
    assert int(signed.zero_point) == 0
    assert float(signed.scale) == pytest.approx(2.0 / 127.5)
    unsigned = _obs(spec=QuantSpec(dtype="uint8", scheme="symmetric"))
    unsigned.collect(x)
    unsigned.compute_qparams()
    assert int(unsigned.zero_point) == 128


def test_per_channel_weights():
    w = torch.tensor([[1.0, -1.0], [10.0, 0.0], [0.5, 0.25]])
    obs = MinMaxObserver(
        name="l.weight", module_name="l", role="weight", kind="weight", spec=QuantSpec(per_channel=True), channels=3
    )
    obs.collect(w, "weights")
    obs.compute_qparams()
    assert obs.scale.shape == (3,)
    assert torch.allclose(obs.max_val, torch.tensor([1.0, 10.0, 0.5]))
    err = (obs.fake_quant(w) - w).abs()
    assert bool((err <= obs.scale[:, None] / 2 + 1e-7).all())


def test_provenance_names_the_image_that_set_each_extreme():
    obs = _obs()
    obs.collect(torch.tensor([0.0, 1.0]), "first.jpg")
    obs.collect(torch.tensor([-5.0, 0.5]), "second.jpg")
    obs.collect(torch.tensor([0.0, 9.0]), "third.jpg")
    obs.collect(torch.tensor([-1.0, 2.0]), "fourth.jpg")
    assert (obs.min_source, obs.max_source) == ("second.jpg", "third.jpg")
    assert (float(obs.min_val), float(obs.max_val)) == (-5.0, 9.0)


def test_observers_record_where_each_extreme_sits():
    obs = _obs()
    obs.collect(torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]), "a")
    x = torch.zeros(1, 4, 3)
    x[0, 2, 1] = 7.0
    x[0, 3, 0] = -2.0
    obs.collect(x, "b")
    obs.collect(torch.tensor([[0.0, 6.0]]), "c")  # moves neither extreme: location stays b's
    assert (obs.min_source, obs.max_source) == ("b", "b")
    assert (obs.max_index, obs.max_shape, obs.max_value) == (2 * 3 + 1, (1, 4, 3), 7.0)
    assert (obs.min_index, obs.min_shape, obs.min_value) == (3 * 3 + 0, (1, 4, 3), -2.0)
    assert obs.location("max") == (7, (1, 4, 3)) and not obs.max_tied
    obs.collect(torch.tensor([7.0, -1.0]), "d")  # exactly the max again: b keeps it, flagged tied
    assert obs.max_source == "b" and obs.max_index == 7 and obs.max_tied and not obs.min_tied
    obs.collect(torch.tensor([8.0]), "e")  # a new max clears the tie
    assert (obs.max_source, obs.max_index, obs.max_shape, obs.max_tied) == ("e", 0, (1,), False)

    again = _obs()
    again.set_provenance(obs.provenance())
    assert again.provenance() == obs.provenance()
    old = _obs()
    old.set_provenance({"min_source": "a", "max_source": "b"})  # a session saved before locations
    assert old.location("min") is None and old.max_source == "b" and not old.max_tied
    obs.reset()
    assert obs.location("max") is None and obs.provenance()["max_index"] is None


def test_location_of_ema_percentile_and_per_channel_observers():
    ema = _obs(EMAMinMaxObserver, momentum=0.5)
    ema.collect(torch.tensor([0.0, 9.0, 1.0]), "a")
    ema.collect(torch.tensor([0.0, 1.0, 4.0]), "b")  # moves the average, not the most extreme value
    assert ema.max_source == "a" and (ema.max_index, ema.max_value) == (1, 9.0)
    assert float(ema.max_val) == pytest.approx(6.5)
    pct = _obs(PercentileObserver, percentile=99.0)
    x = torch.zeros(1000)
    x[123] = 50.0
    pct.collect(x, "img")
    assert (pct.max_source, pct.max_index, pct.max_value) == ("img", 123, 50.0)
    per_channel = MinMaxObserver(
        name="l.weight", module_name="l", role="weight", kind="activation", spec=QuantSpec(per_channel=True), channels=2
    )
    per_channel.collect(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "img")
    assert per_channel.max_source == "img" and per_channel.location("max") is None


def test_ema_moves_towards_new_batches():
    obs = _obs(EMAMinMaxObserver, momentum=0.5)
    obs.collect(torch.tensor([0.0, 2.0]), "a")
    obs.collect(torch.tensor([0.0, 4.0]), "b")
    assert float(obs.max_val) == pytest.approx(3.0)
    assert obs.max_source == "b"


def test_percentile_clips_a_lone_outlier():
    torch.manual_seed(0)
    x = torch.randn(200_000)
    x[0] = 1000.0
    pct = _obs(PercentileObserver, percentile=99.9)
    mm = _obs()
    for obs in (pct, mm):
        obs.collect(x, "img")
        obs.compute_qparams()
    assert float(mm.max_val) == 1000.0
    assert float(pct.scale) < float(mm.scale) / 50


def test_histogram_has_fixed_bins_and_counts_everything():
    obs = _obs()
    for scale in (1.0, 5.0, 20.0):
        obs.collect(torch.randn(50_000) * scale, "img")
    counts, edges = obs.histogram()
    assert counts.shape == (obs.hist_bins,)
    assert edges.shape == (obs.hist_bins + 1,)
    assert float(counts.sum()) == pytest.approx(150_000, rel=1e-6)
    assert int(obs.num_seen) == 150_000


def test_uncalibrated_observer_refuses_qparams():
    with pytest.raises(NotCalibratedError, match="m.out"):
        _obs().compute_qparams()


def test_state_dict_round_trip_restores_qparams():
    obs = _obs()
    obs.collect(torch.tensor([-1.0, 3.0]), "img")
    obs.compute_qparams()
    other = _obs()
    other.load_state_dict(obs.state_dict())
    x = torch.linspace(-2, 4, 50)
    assert torch.equal(other.fake_quant(x), obs.fake_quant(x))


def test_make_observer_by_name():
    kinds = {"minmax": MinMaxObserver, "ema": EMAMinMaxObserver, "percentile": PercentileObserver}
    for name, cls in kinds.items():
        obs = make_observer(name, name="a.b", module_name="a", role="b", kind="activation", spec=QuantSpec())
        assert type(obs) is cls


def test_config_overrides_by_glob():
    cfg = PTQConfig(overrides={"encoder.layers.*.mlp.down_proj": "int16", "encoder.layers.1": "float"})
    assert cfg.spec_for("encoder.layers.0.mlp.down_proj", "activation").dtype == "int16"
    assert cfg.spec_for("encoder.layers.0.mlp.down_proj", "weight").dtype == "uint8"  # weights unchanged
    assert cfg.spec_for("encoder.layers.0.mlp.up_proj", "activation").dtype == "uint8"
    assert cfg.spec_for("encoder.layers.1.self_attn.q_proj", "activation") is None
    assert cfg.spec_for("encoder.layers.1.mlp.down_proj", "weight") is None
    again = PTQConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()


def test_config_defaults_match_tico():
    cfg = PTQConfig()
    assert (cfg.activation.dtype, cfg.activation.scheme, cfg.activation.per_channel) == ("uint8", "affine", False)
    assert (cfg.weight.dtype, cfg.weight.scheme, cfg.weight.per_channel) == ("uint8", "affine", True)
    assert cfg.observer == "minmax"


@pytest.mark.parametrize("bad", [{"observer": "kl"}, {"activation": {"dtype": "int3"}}, {"bogus": 1}])
def test_bad_config_is_a_config_error(bad):
    with pytest.raises(ConfigError):
        PTQConfig.from_dict(bad)
