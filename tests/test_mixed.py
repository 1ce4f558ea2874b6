"""Mixed precision (issue 14 item 3): retargeting without recalibrating, the size estimate against real
exports, and the search against its greedy reference on tiny."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from core.analysis.metrics import sqnr_from_sums
from core.analysis.tap import fp_forward, quant_forward
from core.cancel import CancelToken
from core.config import PTQConfig, build_config, parse_override_lines
from core.data.images import ImagePreprocessor
from core.data.resources import sample_images
from core.errors import CancelledError, ConfigError
from core.models import load_model
from core.ptq import calibrate, convert, prepare, retarget
from core.quant.mode import Mode
from core.remedies.cost import TensorSizes, estimate_bytes
from core.remedies.mixed import (
    ORIGINS,
    MixedPrecisionResult,
    apply_mixed_point,
    pareto_front,
    search_mixed_precision,
)
from core.remedies.mixed_search import (
    Evaluator,
    NoiseModel,
    cheaper_moves,
    local_search,
    search_units,
    unit_costs,
    with_option,
)
from core.remedies.mixed_units import MixedUnit, option_dtypes

CALIB, EVAL = 4, 2
# Every kind of change a point makes: wider and narrower weights, 16-bit activations, a module kept float.
MIXED_LINES = """
encoder.layers.*.mlp.down_proj = int16 / int16
encoder.layers.*.self_attn.q_proj = uint8 / uint4
encoder.layers.1.self_attn = int16
pooler = float
"""


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.fixture(scope="module")
def batches(tiny):
    pre = ImagePreprocessor(tiny.config, max_soft_tokens=70)
    paths = sample_images()[: CALIB + EVAL]
    all_batches = [pre([p]) | {"image_ids": [p.name]} for p in paths]
    return all_batches[:CALIB], all_batches[CALIB:]


def _calibrated(tiny, calib, config):
    q = prepare(tiny, config)
    calibrate(q, calib)
    return convert(q)


def _state(q):
    """Every observer's spec, flag and qparams, and every cached fake-quantized weight."""
    obs = [(o.name, o.spec, o.enabled, o.scale.clone(), o.zero_point.clone()) for o in q.observers()]
    caches = [(n, getattr(m, "weight_fq", None)) for n, m in q.wrappers()]
    return obs, [(n, None if c is None else c.clone()) for n, c in caches]


def _assert_same_state(a, b):
    (obs_a, caches_a), (obs_b, caches_b) = a, b
    assert [x[:3] for x in obs_a] == [x[:3] for x in obs_b]
    for x, y in zip(obs_a, obs_b):
        assert torch.equal(x[3], y[3]) and torch.equal(x[4], y[4]), x[0]
    for (n, x), (_, y) in zip(caches_a, caches_b):
        assert (x is None) == (y is None), n
        assert x is None or torch.equal(x, y), n


def _outputs(q, batches):
    with torch.no_grad(), q.mode_as(Mode.QUANT):
        return [quant_forward(q, {k: b[k] for k in ("pixel_values", "pixel_position_ids")}, []) for b in batches]


def test_retarget_equals_preparing_and_calibrating_again(tiny, batches):
    """Bit-exact, not within noise: CALIB runs the float maths whatever the dtypes, so both models hold
    the same statistics, and qparams and cached weights are the same deterministic functions of them."""
    calib, held_out = batches
    base = PTQConfig()
    target = build_config(base, overrides=parse_override_lines(MIXED_LINES))
    q = _calibrated(tiny, calib, base)
    before = _state(q)
    changed = retarget(q, target)
    assert changed and q.ctx.config is target
    fresh = _calibrated(tiny, calib, target)
    _assert_same_state(_state(q), _state(fresh))
    assert all(torch.equal(a, b) for a, b in zip(_outputs(q, held_out), _outputs(fresh, held_out)))
    assert "pooler" in q.kept_float_modules()
    retarget(q, base)
    _assert_same_state(_state(q), before)


def test_retarget_refuses_what_needs_new_statistics(tiny, batches):
    q = _calibrated(tiny, batches[0], PTQConfig())
    with pytest.raises(ConfigError, match="observer"):
        retarget(q, PTQConfig(observer="ema"))
    per_tensor = {"encoder.layers.0.mlp.down_proj": {"weight": {"dtype": "uint8", "per_channel": False}}}
    with pytest.raises(ConfigError, match="down_proj.weight per-tensor"):
        retarget(q, build_config(overrides=per_tensor))
    assert q.ctx.config == PTQConfig()  # refused before anything changed


def test_size_estimate_orders_configs_as_real_exports_do(tiny, batches, tmp_path, record_property):
    """The estimate leaves out the flatbuffer's own tables: its error is reported, its order must hold."""
    from core.export.pipeline import export_circle  # noqa: PLC0415 -- the exporter imports tico's converter (seconds)

    calib, _ = batches
    q = _calibrated(tiny, calib, PTQConfig())
    sizes = TensorSizes.measure(q, calib[0])
    configs = {
        "uint8/uint4": build_config(weight="uint4"),
        "uint8/uint8": PTQConfig(),
        "mixed": build_config(overrides=parse_override_lines(MIXED_LINES)),
        "int16/int16": build_config(activation="int16", weight="int16"),
    }
    rows = []
    for name, config in configs.items():
        retarget(q, config)
        out = tmp_path / f"{name.replace('/', '_')}.circle"
        export_circle(q, calib[0], out, verify=False)
        rows.append((name, estimate_bytes(q, config, sizes), out.stat().st_size))
    errors = {name: real - est for name, est, real in rows}
    record_property("size_estimate_error_bytes", json.dumps(errors))
    print("estimated vs real bytes:", rows)
    assert [r[0] for r in sorted(rows, key=lambda r: r[1])] == [r[0] for r in sorted(rows, key=lambda r: r[2])]
    # The tables the estimate leaves out are there whatever the dtypes: never negative, below a third.
    assert all(0 <= real - est < real / 3 for _, est, real in rows), rows


@pytest.fixture(scope="module")
def searched(tiny, batches):
    calib, held_out = batches
    q = _calibrated(tiny, calib, PTQConfig())
    before = _state(q)
    seen = []
    result = search_mixed_precision(
        q, PTQConfig(), held_out, within_db_of_int16=3.0, unit="layer", progress=lambda d, t, m: seen.append((d, t, m))
    )
    return q, before, result, seen


def test_search_reaches_the_target_no_dearer_than_greedy(searched):
    q, before, result, seen = searched
    assert not result.reason
    goal = result.target_sqnr_db
    assert result.target["int16_sqnr_db"] - goal == pytest.approx(3.0)
    assert result.chosen is not None and result.chosen.origin == "search"
    assert result.chosen.sqnr_db >= goal
    assert result.greedy is not None and result.greedy.origin == "greedy" and result.greedy.sqnr_db >= goal
    assert result.chosen.cost_bytes <= result.greedy.cost_bytes
    cheapest = min((p for p in result.points if p.origin == "search" and p.sqnr_db >= goal), key=lambda p: p.cost_bytes)
    assert result.chosen.cost_bytes == cheapest.cost_bytes
    assert {p.origin for p in result.points} <= set(ORIGINS)
    # Uniform activations (the default): every point gives all its modules one activation dtype.
    for p in result.points:
        assert len({option_dtypes(v)[0] for v in p.overrides.values() if v != "float"}) == 1, p.overrides
    # Progress once per evaluated configuration, counting up.
    assert [d for d, _, _ in seen] == list(range(1, len(seen) + 1))
    assert len(seen) == len({tuple(p.overrides.values()) for p in result.points})
    # The local search says what it checked around the chosen point.
    checked = result.neighbourhood
    assert checked and 0 <= checked["evaluated"] <= checked["singles"] + checked["exchanges"]
    assert checked["complete"] == (checked["evaluated"] == checked["singles"] + checked["exchanges"])
    # The search leaves the model as it found it.
    _assert_same_state(_state(q), before)
    assert q.ctx.config == PTQConfig() and q.mode is Mode.QUANT


def test_pareto_front_is_non_dominated(searched):
    _, _, result, _ = searched
    front = pareto_front(result.points)
    assert front and front == result.front()
    for p in front:
        assert not any(
            o.cost_bytes <= p.cost_bytes
            and o.sqnr_db >= p.sqnr_db
            and (o.cost_bytes, o.sqnr_db) != (p.cost_bytes, p.sqnr_db)
            for o in result.points
        )
    # Every point off the front is dominated by one on it.
    for p in result.points:
        assert any(f.cost_bytes <= p.cost_bytes and f.sqnr_db >= p.sqnr_db for f in front)


def test_result_json_round_trip(searched):
    _, _, result, _ = searched
    data = json.loads(json.dumps(result.to_json()))
    back = MixedPrecisionResult.from_json(data)
    assert back.to_json() == result.to_json()
    assert back.chosen == result.chosen and back.greedy == result.greedy
    assert back.points.index(back.chosen) == result.points.index(result.chosen)


def test_applied_point_gives_the_sqnr_it_was_evaluated_at(tiny, batches, searched):
    _, _, result, _ = searched
    calib, held_out = batches
    q = _calibrated(tiny, calib, PTQConfig())
    config = apply_mixed_point(q, PTQConfig(), result.chosen)
    assert q.ctx.config is config
    fresh = _calibrated(tiny, calib, config)
    _assert_same_state(_state(q), _state(fresh))
    signal = noise = 0.0
    with torch.no_grad(), q.mode_as(Mode.QUANT):
        for b in held_out:
            inputs = {k: b[k] for k in ("pixel_values", "pixel_position_ids")}
            ref = fp_forward(q, inputs).reshape(-1).double()
            d = quant_forward(q, inputs, []).reshape(-1).double() - ref
            signal, noise = signal + float(torch.dot(ref, ref)), noise + float(torch.dot(d, d))
    # The same sums of the same float64 values: equal, not close.
    assert sqnr_from_sums(signal, noise) == result.chosen.sqnr_db


def test_cancel_leaves_config_and_qparams_unchanged(tiny, batches):
    calib, held_out = batches
    q = _calibrated(tiny, calib, PTQConfig())
    before = _state(q)
    token = CancelToken()

    def progress(done, total, message):
        if done == 4:
            token.cancel()

    with pytest.raises(CancelledError):
        search_mixed_precision(
            q,
            PTQConfig(),
            held_out,
            target_sqnr_db=40.0,
            unit="layer",
            activations="per-unit",
            progress=progress,
            cancel=token,
        )
    _assert_same_state(_state(q), before)
    assert q.ctx.config == PTQConfig() and q.mode is Mode.QUANT


def test_unreachable_target_says_why_and_bad_targets_fail_first(tiny, batches):
    calib, held_out = batches
    q = _calibrated(tiny, calib, PTQConfig())
    result = search_mixed_precision(q, PTQConfig(), held_out, target_sqnr_db=400.0, unit="layer")
    assert result.chosen is None and "out of reach" in result.reason and "\n" not in result.reason
    bad = (
        {},
        {"target_sqnr_db": 30.0, "within_db_of_int16": 1.0},
        {"within_db_of_int16": -1.0},
        {"target_sqnr_db": 30.0, "activations": "mixed"},
        {"target_sqnr_db": 30.0, "unit": "block"},
    )
    for kwargs in bad:
        with pytest.raises(ConfigError):
            search_mixed_precision(q, PTQConfig(), held_out, **kwargs)


# ---------------------------------------------------------------------------------------------
# The search apart from the model: additive noise, where the greedy is provably not optimal
# ---------------------------------------------------------------------------------------------

OPTIONS = ("int16 / uint4", "int16 / uint8", "int16 / int16")
# Per unit: (noise added, bytes) of each option. A is large and sensitive, so the greedy's sensitivity
# order buys it first; the three small units together remove the same noise for far fewer bytes.
ADDITIVE = {
    "A": {"int16 / uint4": (10.0, 0), "int16 / uint8": (2.0, 100), "int16 / int16": (0.0, 300)},
    "B": {"int16 / uint4": (6.0, 0), "int16 / uint8": (1.0, 10), "int16 / int16": (0.0, 30)},
    "C": {"int16 / uint4": (6.0, 0), "int16 / uint8": (1.0, 10), "int16 / int16": (0.0, 30)},
    "D": {"int16 / uint4": (6.0, 0), "int16 / uint8": (1.0, 10), "int16 / int16": (0.0, 30)},
}
FLOOR_NOISE, SIGNAL = 0.5, 1000.0
GOAL_NOISE = 14.0  # the target's noise budget


def _additive_evaluator(points):
    units = [MixedUnit(g, (), True, False, OPTIONS) for g in ADDITIVE]

    def cost(assignment):
        return sum(ADDITIVE[u.glob][o][1] for u, o in zip(units, assignment))

    def measure(assignment):
        noise = FLOOR_NOISE + sum(ADDITIVE[u.glob][o][0] for u, o in zip(units, assignment))
        return noise, cost(assignment), 0

    return Evaluator(units, measure, cost, SIGNAL, points)


def _goal_db():
    return 10 * math.log10(SIGNAL / GOAL_NOISE)


def test_search_beats_a_greedy_that_buys_the_expensive_unit_first():
    """Brute force over all 81 assignments gives the cheapest one that meets the target; the search finds
    it, the greedy pays for A."""
    points = []
    ev = _additive_evaluator(points)
    greedy, reason = search_units(ev, _goal_db())
    assert not reason and greedy is not None
    feasible = [a for a in itertools.product(OPTIONS, repeat=4) if ev.measure(a)[0] <= GOAL_NOISE]
    optimum = min(ev.cost(a) for a in feasible)
    met = [p for p in points if p.origin == "search" and p.sqnr_db >= _goal_db()]
    chosen = min(met, key=lambda p: p.cost_bytes)
    assert chosen.cost_bytes == optimum == 30
    assert greedy.cost_bytes == 120 > chosen.cost_bytes
    assert greedy.overrides["A"] == "int16 / uint8" and chosen.overrides["A"] == "int16 / uint4"


def test_local_search_takes_an_exchange_when_no_single_demotion_keeps_the_target():
    """From the greedy's point (A, B, C on uint8, D on uint4) every single demotion loses the target; only
    the exchange A down, D up keeps it, and is cheaper."""
    points = []
    ev = _additive_evaluator(points)
    goal = _goal_db()
    bottom = tuple(OPTIONS[0] for _ in ADDITIVE)
    top = tuple(OPTIONS[-1] for _ in ADDITIVE)
    n_top = ev.measure(top)[0]
    delta = [{o: ADDITIVE[g][o][0] - ADDITIVE[g][OPTIONS[-1]][0] for o in OPTIONS} for g in ADDITIVE]
    model = NoiseModel(unit_costs(ev, bottom), delta, n_top, GOAL_NOISE)
    start = ("int16 / uint8", "int16 / uint8", "int16 / uint8", "int16 / uint4")
    singles, _ = cheaper_moves(ev.units, model.costs, start)
    for ((i, o),) in singles:
        assert ev.measure(with_option(start, i, o))[0] > GOAL_NOISE
    stop = local_search(ev, model, start, goal, budget=100)
    assert stop == ("int16 / uint4", "int16 / uint8", "int16 / uint8", "int16 / uint8")
    assert ev.cost(stop) == 30 < ev.cost(start)
    # Where it stopped, every cost-lowering single and exchange was evaluated and loses the target.
    checked = ev.checked[stop]
    singles, exchanges = cheaper_moves(ev.units, model.costs, stop)
    assert checked["complete"] and checked["evaluated"] == len(singles) + len(exchanges) == checked["singles"]
    for move in singles + exchanges:
        trial = stop
        for i, o in move:
            trial = with_option(trial, i, o)
        assert ev.met(trial, goal) is False, move
    # The fake is additive: every cheaper assignment is ruled out by the model, or was evaluated.
    assert checked["additive_rules_out_cheaper"] is True
    # With a budget of one evaluation the neighbourhood is not all evaluated, and says so.
    ev2 = _additive_evaluator([])
    stop2 = local_search(ev2, model, start, goal, budget=1)
    assert ev2.checked[stop2]["complete"] is False


def test_additive_model_finds_its_cheapest_point_and_rules_out_the_rest():
    """Branch and bound under the additive model against brute force over all 81 assignments."""
    ev = _additive_evaluator([])
    top = tuple(OPTIONS[-1] for _ in ADDITIVE)
    bottom = tuple(OPTIONS[0] for _ in ADDITIVE)
    delta = [{o: ADDITIVE[g][o][0] - ADDITIVE[g][OPTIONS[-1]][0] for o in OPTIONS} for g in ADDITIVE]
    model = NoiseModel(unit_costs(ev, bottom), delta, ev.measure(top)[0], GOAL_NOISE)
    feasible = sorted((ev.cost(a), a) for a in itertools.product(OPTIONS, repeat=4) if ev.measure(a)[0] <= GOAL_NOISE)
    optimum_cost, optimum = feasible[0]
    assert model.cheapest_not_ruled_out(120) == (optimum, True)
    # Nothing below the optimum; left out, the next cheapest one comes back.
    assert model.cheapest_not_ruled_out(optimum_cost) == (None, True)
    following = min(((c, a) for c, a in feasible if a != optimum))
    assert model.cheapest_not_ruled_out(1000, frozenset({optimum}))[0] in {a for c, a in feasible if c == following[0]}
    # A node limit too small to go through every branch says so.
    assert model.cheapest_not_ruled_out(120, node_limit=3)[1] is False


def test_additive_bound_counts_each_units_own_noise_even_when_another_removes_more():
    """Unit 1's float removes 3 around the widest point, but unit 0's cheap option adds 5 > 4 on its own."""
    costs = [{"a": 0, "b": 10}, {"a": 0, "b": 10, "f": 40}]
    delta = [{"a": 5.0, "b": 0.0}, {"a": 5.0, "b": 0.0, "f": -3.0}]
    assert NoiseModel(costs, delta, n_top=1.0, n_goal=4.0).cheapest_not_ruled_out(20) == (None, True)
    guess, exhaustive = NoiseModel(costs, delta, n_top=1.0, n_goal=6.0).cheapest_not_ruled_out(20)
    assert exhaustive and guess in {("a", "b"), ("b", "a")}  # 1 + 5 <= 6 at 10 bytes


def test_a_target_the_cheapest_point_meets_ends_the_search_there():
    ev = _additive_evaluator([])
    bottom = tuple(OPTIONS[0] for _ in ADDITIVE)
    greedy, reason = search_units(ev, 10 * math.log10(SIGNAL / 100.0))  # 28.5 noise against 100 allowed
    assert not reason and tuple(greedy.overrides.values()) == bottom
    assert ev.checked[bottom]["complete"] and ev.checked[bottom]["additive_rules_out_cheaper"]
    assert len(ev.noise) == 2  # the widest integer and the cheapest baselines, nothing more
