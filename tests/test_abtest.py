"""A/B configurations (core.analysis.abtest) and config export (core.export.config_export) on real photos."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from core.analysis.abtest import ABComparison, ab_summary_lines, resolved_specs
from core.cancel import CancelToken
from core.config import ModuleOverride, PTQConfig, QuantSpec
from core.errors import CancelledError, ConfigError
from core.export.config_export import (
    gemma4_module_names,
    tico_ptq_config_from_yaml,
    tico_resolved_kwargs,
    to_one_quant_config,
    to_tico_ptq_yaml,
    validate_one_quant_config,
    write_one_quant_config,
    write_tico_ptq_yaml,
)
from core.session import Session

INT16_LAYERS = PTQConfig(overrides={"encoder.layers.*": "int16"})
# B wins in the encoder layers and loses at the pooler: the merge must take only the former.
MIXED = PTQConfig(overrides={"encoder.layers.*": "int16", "pooler": "uint4"})


@pytest.fixture(scope="module")
def session(sample_images):
    s = Session("tiny", PTQConfig(), max_soft_tokens=70)
    s.add_images(sample_images[:3])
    s.calibrate()
    return s


@pytest.fixture(scope="module")
def eval_images(sample_images):
    return sample_images[3:5]


@pytest.fixture(scope="module")
def int16_result(session, eval_images):
    return _compare(session, INT16_LAYERS, eval_images)


@pytest.fixture(scope="module")
def mixed_result(session, eval_images):
    return _compare(session, MIXED, eval_images)


def _compare(session, config_b, images):
    ab = ABComparison(session, config_b)
    ab.calibrate_b()
    result = ab.compare(images=images)
    ab.release()
    return result


def _observer_snapshot(qmodel):
    return {
        f"{o.name}/{k}": v.detach().clone()
        for o in qmodel.observers()
        for k, v in o.state_dict().items()
    }


def test_int16_layers_win_where_the_config_differs(int16_result):
    r = int16_result
    assert len(r.images) == 2
    layer_modules = [m for m in r.modules if m.name.startswith("encoder.layers.")]
    assert layer_modules
    for m in layer_modules:
        assert m.config_differs, m.name
        assert m.winner == "B" and m.delta_sqnr_db > 0.5, (m.name, m.delta_sqnr_db)
        assert m.delta_sqnr_db == pytest.approx(m.b.sqnr_db - m.a.sqnr_db)
    # Upstream of the change nothing differs: identical errors, a tie.
    for m in r.modules:
        if m.name.startswith("patch_embedder"):
            assert not m.config_differs and m.winner == "tie" and m.delta_sqnr_db == 0.0
    # Downstream modules improve too, but their own config is A's: not credited.
    assert not r.module("pooler").config_differs
    assert r.end_to_end_winner == "B"
    assert r.end_to_end_b.sqnr_db > r.end_to_end_a.sqnr_db


def test_winning_overrides_are_bs_glob(int16_result):
    r = int16_result
    overrides = r.winning_overrides(margin_db=0.5)
    assert list(overrides) == ["encoder.layers.*"]
    assert overrides["encoder.layers.*"] == ModuleOverride(activation=QuantSpec("int16"))
    merged = r.merged_config()
    for name in r.module_names:
        assert resolved_specs(merged, name) == resolved_specs(INT16_LAYERS, name), name
    # A margin larger than every gain takes nothing from B.
    assert r.winning_overrides(margin_db=1e6) == {}
    assert r.merged_config(margin_db=1e6).overrides == {}
    d = r.to_dict()
    json.dumps(d)
    assert d["winning_overrides"] == {"encoder.layers.*": {"activation": QuantSpec("int16").to_dict()}}


def test_merge_takes_only_bs_wins_and_beats_both(session, eval_images, mixed_result):
    r = mixed_result
    pooler = r.module("pooler")
    assert pooler.config_differs and pooler.winner == "A"
    overrides = r.winning_overrides()
    assert "encoder.layers.*" in overrides and not any(g.startswith("pooler") for g in overrides)
    merged = r.merged_config()
    assert resolved_specs(merged, "pooler") == resolved_specs(session.config, "pooler")
    assert resolved_specs(merged, "encoder.layers.1.mlp.down_proj")[0].dtype == "int16"

    merged_result = _compare(session, merged, eval_images)
    a = merged_result.end_to_end_a.sqnr_db
    m = merged_result.end_to_end_b.sqnr_db
    assert merged_result.end_to_end_a.sqnr_db == pytest.approx(r.end_to_end_a.sqnr_db)
    assert m > a  # better than A
    assert m >= r.end_to_end_b.sqnr_db  # and than the mixed B that lost at the pooler


def test_minmax_vs_percentile_runs(session, eval_images):
    ab = ABComparison(session, PTQConfig(observer="percentile", percentile=99.9))
    ab.calibrate_b()
    r = ab.compare(images=eval_images[:1])
    assert r.global_differences == ["observer (minmax vs percentile)"]
    assert not any(m.config_differs for m in r.modules)
    assert r.winning_overrides() == {}
    assert r.merged_config() == session.config
    lines = ab.summary_lines()
    assert any("observer (minmax vs percentile)" in line for line in lines)
    ab.release()
    assert ab.state is None


def test_cancel_of_calibrate_b_leaves_session_a_untouched(session):
    before = _observer_snapshot(session.qmodel)
    config_before, state_before = session.config, session.state
    token = CancelToken()

    def progress(done, total, message):
        token.cancel()  # cancel after the first batch

    with pytest.raises(CancelledError) as exc:
        ABComparison(session, INT16_LAYERS).calibrate_b(progress=progress, cancel=token)
    assert "\n" not in str(exc.value)
    pre = CancelToken()
    pre.cancel()
    with pytest.raises(CancelledError):
        ABComparison(session, INT16_LAYERS).calibrate_b(cancel=pre)
    after = _observer_snapshot(session.qmodel)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert session.config is config_before and session.state == state_before


def test_summary_lines(int16_result):
    lines = ab_summary_lines(int16_result, top=5)
    text = "\n".join(lines)
    assert lines[0].startswith("A: act uint8") and lines[1].startswith("B: ")
    assert "end to end SQNR" in text and "-> B" in text
    assert "encoder.layers.*: act int16" in text
    assert len(lines) < 40


def test_module_names_match_the_wrapped_model(session, int16_result):
    owners = list(dict.fromkeys(o.module_name for o in session.qmodel.observers()))
    assert int16_result.module_names == owners
    n = session.model.config.num_hidden_layers
    assert sorted(gemma4_module_names(n)) == sorted(owners)


# ---------------------------------------------------------------------------------------------
# TICO YAML
# ---------------------------------------------------------------------------------------------


def test_tico_yaml_round_trips_into_ticos_ptqconfig(int16_result):
    from tico.quantization.config.ptq import PTQConfig as TicoPTQConfig
    from tico.quantization.wrapq.dtypes import DType
    from tico.quantization.wrapq.qscheme import QScheme

    r = int16_result
    text = to_tico_ptq_yaml(r.winning_overrides(), base=r.config_a, modules=r.module_names)
    doc = yaml.safe_load(text)
    assert set(doc) == {"activation", "weight", "overrides"}
    assert doc["activation"] == {"kind": "affine", "dtype": "uint8", "qscheme": "per_tensor_asymm", "observer": "minmax"}
    q_proj = doc["overrides"]["encoder"]["layers"]["1"]["self_attn"]["q_proj"]["linear"]
    assert q_proj["act_out"]["dtype"] == "int16" and q_proj["weight"]["dtype"] == "uint8"
    assert "pooler" not in doc["overrides"] and "patch_embedder" not in doc["overrides"]

    cfg = tico_ptq_config_from_yaml(text)
    assert isinstance(cfg, TicoPTQConfig)
    kw = tico_resolved_kwargs(cfg, "encoder.layers.1.self_attn.q_proj.linear.act_out")
    assert kw["dtype"] == DType.int(16) and kw["qscheme"] == QScheme.PER_TENSOR_ASYMM
    assert tico_resolved_kwargs(cfg, "encoder.layers.0.mlp.mul")["dtype"] == DType.int(16)
    assert tico_resolved_kwargs(cfg, "encoder.layers.0.self_attn.q_proj.linear.weight")["dtype"] == DType.uint(8)
    assert tico_resolved_kwargs(cfg, "pooler.pool_out") == {}  # not overridden: TICO's role default
    assert cfg.activation.dtype == DType.uint(8)


def test_tico_yaml_paths_are_ticos_observers(session, tmp_path):
    """Every observer path we write exists in TICO's own wrapped model, with our dtype."""
    import copy

    import tico.quantization
    from tico.quantization.wrapq.dtypes import DType

    config = PTQConfig(overrides={"encoder.layers.1": "int16", "pooler": "float"})
    path = write_tico_ptq_yaml(
        tmp_path / "tico.yaml", config, num_layers=session.model.config.num_hidden_layers, full=True
    )
    text = path.read_text()
    assert "no_quant" in text and "Kept in float" in text
    cfg = tico_ptq_config_from_yaml(text)
    runner = tico.quantization.prepare(copy.deepcopy(session.model), cfg, inplace=True)
    tico_obs = dict(runner.named_observers())

    written = []

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict) and "kind" not in v:
                walk(v, prefix + (str(k),))
            else:
                written.append(".".join(prefix + (str(k),)))

    walk(yaml.safe_load(text)["overrides"], ())
    assert set(written) == set(tico_obs)  # full=True: exactly TICO's observers, no stray path
    assert tico_obs["encoder.layers.1.self_attn.q_proj.linear.act_out"].dtype == DType.int(16)
    assert tico_obs["encoder.layers.0.self_attn.q_proj.linear.act_out"].dtype == DType.uint(8)
    assert type(tico_obs["pooler.pool_out"]).__name__ == "IdentityObserver"


def test_tico_yaml_rejects_what_tico_cannot_express():
    bad = PTQConfig(overrides={"pooler": {"dtype": "uint8", "scheme": "symmetric"}})
    with pytest.raises(ConfigError) as exc:
        to_tico_ptq_yaml(bad, num_layers=2)
    assert "\n" not in str(exc.value) and "symmetric" in str(exc.value)
    with pytest.raises(ConfigError, match="num_layers"):
        to_tico_ptq_yaml({"encoder.layers.*": "int16"})
    with pytest.raises(ConfigError):
        tico_ptq_config_from_yaml("activation: {kind: affine}\nbogus: 1\n")


# ---------------------------------------------------------------------------------------------
# ONE quant_config JSON
# ---------------------------------------------------------------------------------------------


def test_one_quant_config(int16_result, tmp_path):
    r = int16_result
    doc = to_one_quant_config(r.winning_overrides(), base=r.config_a, modules=r.module_names)
    assert set(doc) == {"default_quantization_dtype", "default_granularity", "layers"}
    assert doc["default_quantization_dtype"] == "uint8" and doc["default_granularity"] == "channel"
    assert len(doc["layers"]) == 1
    layer = doc["layers"][0]
    assert layer["dtype"] == "int16" and layer["granularity"] == "channel"
    assert set(layer["names"]) == {n for n in r.module_names if n.startswith("encoder.layers.")}
    validate_one_quant_config(doc)

    # The name_map hook: our module name -> Circle tensor names.
    name_map = {n: [f"circle/{n}/out", f"circle/{n}/mid"] for n in r.module_names}
    mapped = to_one_quant_config(r.merged_config(), name_map, modules=r.module_names, model_path="m.circle")
    assert "circle/encoder.layers.0.mlp.down_proj/out" in mapped["layers"][0]["names"]
    assert mapped["model_path"] == "m.circle"
    with pytest.raises(ConfigError, match="name_map"):
        to_one_quant_config(r.merged_config(), {"encoder.layers.0": ["x"]}, modules=r.module_names)

    out = write_one_quant_config(tmp_path / "q.json", r.merged_config(), modules=r.module_names)
    assert json.loads(out.read_text()) == doc
    assert not list(tmp_path.glob(".*.tmp"))


def test_one_quant_config_rejects_what_one_cannot_express():
    for overrides, word in (({"pooler": "float"}, "float"), ({"pooler": "int8"}, "int8")):
        with pytest.raises(ConfigError) as exc:
            to_one_quant_config(overrides, num_layers=2)
        assert word in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(ConfigError):
        validate_one_quant_config({"default_quantization_dtype": "uint8", "default_granularity": "channel",
                                   "layers": [{"dtype": "int16", "granularity": "channel"}]})


# ---------------------------------------------------------------------------------------------
# Override derivation without a model (fast)
# ---------------------------------------------------------------------------------------------


def _fake_result(config_a, config_b, names, winners):
    from core.analysis.abtest import ABModule, ABResult
    from core.analysis.records import ModuleError

    def err(name, sqnr):
        return ModuleError(name, "x", 0.0, sqnr, 0.0, 0.0, 1.0, 0.0)

    modules = []
    for n in names:
        if not n:
            continue  # the root is never a compared module
        b = 30.0 if n in winners else 20.0
        differs = resolved_specs(config_a, n) != resolved_specs(config_b, n)
        modules.append(ABModule(n, "x", err(n, 20.0), err(n, b), b - 20.0, "B" if b > 20 else "tie", differs))
    return ABResult(config_a, config_b, modules, err("end_to_end", 20.0), err("end_to_end", 21.0), [], list(names))


def test_winning_overrides_reach_their_target_for_any_winner_set():
    import random

    names = gemma4_module_names(3)
    config_a = PTQConfig(overrides={"encoder.layers.2.mlp": "int16", "pooler": "float"})
    config_b = PTQConfig(
        activation=QuantSpec("int16"),
        weight=QuantSpec("int8", "symmetric", per_channel=True),
        overrides={"encoder.layers.*.self_attn": "float", "encoder.layers.1": "uint8", "": "uint8"},
    )
    def is_float(config, n):
        return resolved_specs(config, n)[0] is None

    rng = random.Random(0)
    for trial in range(16):
        winners = {n for n in names if n and rng.random() < (0.1 + 0.06 * trial)}
        r = _fake_result(config_a, config_b, names, winners)
        differs = {m.name for m in r.modules if m.config_differs and m.name in winners}
        blocked = set(r.untakeable_modules())
        taken = differs - blocked
        merged = r.merged_config()
        for n in names:
            want = resolved_specs(config_b if n in taken else config_a, n)
            assert resolved_specs(merged, n) == want, (trial, n)
        # Blocked only where keep-float is absorbing: A keeps it float, or B keeps it float
        # while one of its children stays quantized.
        for n in blocked:
            kids = [m for m in names if m.startswith(n + ".")]
            assert is_float(config_a, n) or (
                is_float(config_b, n) and any(not is_float(config_b if m in taken else config_a, m) for m in kids)
            ), n
        PTQConfig.from_dict(merged.to_dict())  # the merged config survives a JSON round trip
    everything = _fake_result(config_a, config_b, names, set(names))
    assert everything.untakeable_modules() == ["pooler"]  # A keeps it float: cannot be undone
    merged = everything.merged_config()
    for n in names:
        if n and n != "pooler":
            assert resolved_specs(merged, n) == resolved_specs(config_b, n), n
