"""The wrapped model: NO_QUANT parity, calibration, QUANT accuracy against TICO's own wrappers."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image, ImageOps

from core.cancel import CancelToken
from core.config import PTQConfig, QuantSpec
from core.data.images import ImagePreprocessor
from core.errors import NotCalibratedError
from core.models import load_model
from core.ptq import calibrate, convert, prepare
from core.quant.mode import Mode
from core.wrappers import UnsupportedModuleError, wrap
from core.wrappers.base import QuantContext


def _peir(fp: torch.Tensor, q: torch.Tensor) -> float:
    return float((fp - q).abs().max() / (fp.max() - fp.min()))


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.fixture(scope="module")
def pre280(tiny):
    return ImagePreprocessor(tiny.config, max_soft_tokens=280)


def _batches(pre, paths):
    return [pre([p]) | {"image_ids": [p.name]} for p in paths]


def _held_out(paths):
    """Images the model was not calibrated on: the held-out photos, mirrored and cropped too."""
    images = [Image.open(p).convert("RGB") for p in paths]
    return images + [ImageOps.mirror(i) for i in images] + [i.crop((0, 0, i.width // 2, i.height)) for i in images]


@pytest.mark.parametrize("spec", ["tiny", pytest.param("e2b", marks=pytest.mark.slow)])
def test_no_quant_is_bit_exact_single_and_padded_batch(spec, sample_images):
    model = load_model(spec)
    pre = ImagePreprocessor(model.config, max_soft_tokens=70)
    qmodel = prepare(model)
    assert qmodel.mode is Mode.NO_QUANT
    # Square, tall and wide photographs, alone and as one padded batch.
    picks = [p for p in sample_images if p.stem in ("astronaut", "rocket_tall", "coffee_wide")]
    assert len(picks) == 3
    with torch.no_grad():
        for path in picks:
            batch = pre([path])
            assert torch.equal(qmodel(**batch).last_hidden_state, model(**batch).last_hidden_state)
        batch = pre(picks)
        assert (batch["pixel_position_ids"] == -1).any(), "the batch should hold padding"
        expected = model(**batch).last_hidden_state
        assert torch.equal(qmodel(**batch).last_hidden_state, expected)


def test_prepare_leaves_the_original_untouched(tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    qmodel = prepare(tiny)
    for p in qmodel.parameters():
        p.data.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())
    assert not any(isinstance(m, type(qmodel)) for m in tiny.modules())


def test_unknown_module_names_its_class():
    with pytest.raises(UnsupportedModuleError, match="Conv2d"):
        wrap(torch.nn.Conv2d(1, 1, 1), "stem", QuantContext(config=PTQConfig()))


def test_one_batch_gives_every_observer_statistics_and_provenance(tiny, pre280, sample_images):
    qmodel = prepare(tiny)
    result = calibrate(qmodel, _batches(pre280, sample_images[:1]))
    assert (result.batches_done, result.images_done, result.cancelled) == (1, 1, False)
    observers = qmodel.observers()
    assert len(observers) > 50
    for obs in observers:
        assert obs.has_stats, obs.name
        expected = "weights" if obs.kind == "weight" else sample_images[0].name
        assert obs.min_source == expected and obs.max_source == expected, obs.name
    names = [o.name for o in observers]
    assert len(names) == len(set(names))
    # Forward order: the patch embedder first, the last layer's output before the pooler.
    assert names[0] == "patch_embedder.pixels"
    assert names.index("encoder.layers.1.output") < names.index("pooler.output")


def test_provenance_points_at_the_image_that_set_the_extreme(tiny, pre280, sample_images):
    qmodel = prepare(tiny)
    calibrate(qmodel, _batches(pre280, sample_images[:6]))
    for obs in qmodel.observers():
        if obs.kind == "weight":
            continue
        single = {}
        for path in sample_images[:6]:
            probe = prepare(tiny)
            calibrate(probe, _batches(pre280, [path]))
            single[path.name] = {o.name: o for o in probe.observers()}[obs.name]
        lowest = min(single, key=lambda n: float(single[n].min_val))
        highest = max(single, key=lambda n: float(single[n].max_val))
        assert obs.min_source == lowest and obs.max_source == highest
        break  # one activation observer is enough to pin the bookkeeping; the rest share the code


def test_cancel_keeps_completed_batches_and_calibrating_again_works(tiny, pre280, sample_images):
    batches = _batches(pre280, sample_images[:5])
    token = CancelToken()

    def progress(done, total, message):
        if done == 2:
            token.cancel()

    cancelled = prepare(tiny)
    result = calibrate(cancelled, batches, progress=progress, cancel=token)
    assert result.cancelled and result.batches_done == 2
    reference = prepare(tiny)
    calibrate(reference, batches[:2])
    for a, b in zip(cancelled.observers(), reference.observers()):
        assert torch.equal(a.min_val, b.min_val) and torch.equal(a.max_val, b.max_val), a.name
    again = calibrate(cancelled, batches[2:])
    assert not again.cancelled and again.batches_done == 3
    full = prepare(tiny)
    calibrate(full, batches)
    for a, b in zip(cancelled.observers(), full.observers()):
        assert torch.equal(a.min_val, b.min_val) and torch.equal(a.max_val, b.max_val), a.name


def test_convert_before_calibration_is_refused(tiny):
    with pytest.raises(NotCalibratedError, match="calibrate"):
        convert(prepare(tiny))


def test_mode_as_puts_the_earlier_mode_back_also_on_errors(tiny, pre280, sample_images):
    """A temporary mode goes through the model: entered as set_mode does, left as it was found."""
    qmodel = prepare(tiny)
    with pytest.raises(NotCalibratedError), qmodel.mode_as(Mode.QUANT):  # QUANT needs statistics
        pass
    assert qmodel.mode is Mode.NO_QUANT
    calibrate(qmodel, _batches(pre280, sample_images[:1]))
    with qmodel.mode_as(Mode.QUANT):
        assert qmodel.mode is Mode.QUANT
    assert qmodel.mode is Mode.NO_QUANT
    with pytest.raises(RuntimeError, match="boom"), qmodel.mode_as(Mode.QUANT):
        raise RuntimeError("boom")
    assert qmodel.mode is Mode.NO_QUANT and qmodel.is_calibrated
    convert(qmodel)
    with qmodel.mode_as(Mode.NO_QUANT):
        assert qmodel.mode is Mode.NO_QUANT
    assert qmodel.mode is Mode.QUANT
    qmodel.reset_statistics()
    assert qmodel.mode is Mode.NO_QUANT and not qmodel.is_calibrated


def _quant_peir(model, config, cal, held, pre) -> float:
    qmodel = prepare(model, config)
    calibrate(qmodel, cal)
    convert(qmodel)
    with torch.no_grad():
        fp = torch.cat([model(**pre([img])).last_hidden_state for img in held])
        q = torch.cat([qmodel(**pre([img])).last_hidden_state for img in held])
    assert torch.isfinite(q).all()
    return _peir(fp, q)


def _tico_peir(model, cal, held, pre) -> float:
    import tico.quantization
    from tico.quantization.config.ptq import PTQConfig as TicoPTQConfig

    tmodel = tico.quantization.prepare(copy.deepcopy(model), TicoPTQConfig(), inplace=True)
    with torch.no_grad():
        for batch in cal:
            tmodel(pixel_values=batch["pixel_values"], pixel_position_ids=batch["pixel_position_ids"])
    tmodel = tico.quantization.convert(tmodel, inplace=True)
    with torch.no_grad():
        fp = torch.cat([model(**pre([img])).last_hidden_state for img in held])
        q = torch.cat([tmodel(**pre([img])).last_hidden_state for img in held])
    return _peir(fp, q)


def test_quant_peir_is_no_worse_than_ticos_own_wrappers(tiny, pre280, sample_images, record_property):
    cal = _batches(pre280, sample_images[:8])
    held = _held_out(sample_images[8:])
    ours = _quant_peir(tiny, PTQConfig(), cal, held, pre280)
    theirs = _tico_peir(tiny, cal, held, pre280)
    record_property("peir_ours", ours)
    record_property("peir_tico", theirs)
    print(f"end-to-end PEIR on {len(held)} held-out images: ours {ours:.4f}, TICO {theirs:.4f}")
    assert ours <= 1.10 * theirs
    assert ours < 0.25


def _peir_with_weights(qmodel, model, batches, quantize_weights: bool) -> float:
    for obs in qmodel.observers():
        if obs.kind == "weight" and obs.per_channel:
            obs.enabled = quantize_weights
    for wrapper in qmodel.quant_modules():
        wrapper.cache_weights()
    with torch.no_grad():
        fp = torch.cat([model(**b).last_hidden_state for b in batches])
        q = torch.cat([qmodel(**b).last_hidden_state for b in batches])
    return _peir(fp, q)


def test_int16_activations_cut_the_error_tenfold(tiny, sample_images, record_property):
    """int16 activations cut the activation-quantization error >= 10x (measured ~100x).

    End to end, with the default uint8 weights, the gain is bounded by the weights' own error
    (~0.014 PEIR on this model: uint8 weights alone give that much), so the end-to-end ratio is
    reported and bounded separately.
    """
    pre = ImagePreprocessor(tiny.config, max_soft_tokens=140)
    cal = _batches(pre, sample_images[:8])
    held = [pre([img]) for img in _held_out(sample_images[8:])]
    results = {}
    for dtype in ("uint8", "int16"):
        qmodel = prepare(tiny, PTQConfig(activation=QuantSpec(dtype=dtype)))
        calibrate(qmodel, cal)
        convert(qmodel)
        # Activation error alone: float weights, on the calibration images (no range overflow).
        results[dtype, "activations"] = _peir_with_weights(qmodel, tiny, cal, quantize_weights=False)
        results[dtype, "end_to_end"] = _peir_with_weights(qmodel, tiny, held, quantize_weights=True)
    for (dtype, what), value in results.items():
        record_property(f"peir_{dtype}_{what}", value)
    act_gain = results["uint8", "activations"] / results["int16", "activations"]
    e2e_gain = results["uint8", "end_to_end"] / results["int16", "end_to_end"]
    print(f"activation PEIR uint8 {results['uint8', 'activations']:.5f} -> int16 {results['int16', 'activations']:.6f}"
          f" ({act_gain:.0f}x); end to end with uint8 weights on held-out images {e2e_gain:.1f}x")
    assert act_gain >= 10
    assert e2e_gain >= 2


def test_keep_float_override_and_toggle(tiny, pre280, sample_images):
    cal = _batches(pre280, sample_images[:2])
    qmodel = prepare(tiny, PTQConfig(overrides={"encoder.layers.0.mlp": "float"}))
    calibrate(qmodel, cal)
    convert(qmodel)
    by_name = {o.name: o for o in qmodel.observers()}
    assert not by_name["encoder.layers.0.mlp.down_proj.output"].enabled
    assert by_name["encoder.layers.1.mlp.down_proj.output"].enabled
    qmodel.set_keep_float(["encoder.layers.1.*"])
    assert not by_name["encoder.layers.1.mlp.down_proj.output"].enabled
    assert not by_name["encoder.layers.0.mlp.down_proj.output"].enabled  # the config's override stays
    qmodel.set_keep_float([])
    assert by_name["encoder.layers.1.mlp.down_proj.output"].enabled


def test_clipped_linears_are_wrapped_exactly(sample_images):
    from core.models import build_seeded_model, tiny_config

    model = build_seeded_model(tiny_config(use_clipped_linears=True)).eval()
    model.config._attn_implementation = "eager"
    pre = ImagePreprocessor(model.config, max_soft_tokens=70)
    qmodel = prepare(model)
    batch = pre(sample_images[:3])
    with torch.no_grad():
        assert torch.equal(qmodel(**batch).last_hidden_state, model(**batch).last_hidden_state)
    calibrate(qmodel, _batches(pre, sample_images[:2]))
    convert(qmodel)
    names = {o.name for o in qmodel.observers()}
    # Finite clamps get observers of their own: each clamp output is a tensor in the graph.
    assert {"encoder.layers.0.mlp.up_proj.input_clamped", "encoder.layers.0.mlp.up_proj.linear"} <= names
    one = pre([sample_images[4]])
    with torch.no_grad():
        exported = qmodel.as_export_module(one["pixel_position_ids"])(one["pixel_values"])
        assert torch.equal(exported, qmodel(**one).last_hidden_state)
