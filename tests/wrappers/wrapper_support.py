"""What every per-wrapper test needs: the smallest real model, taps on wrapper tensors, and derived bounds.

The bounds are written from the quantizer's own arithmetic, never tuned: ``fq(z)`` rounds ``z`` to
the nearest point of a grid ``scale * (q - zero_point)``, ``q`` in ``[qmin, qmax]``, so it moves
``z`` by at most half a step plus how far ``z`` lies outside the grid (saturation), and float32
adds one rounding (at most ``U`` relative) to each product or sum it forms.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.data.images import SUPPORTED_SOFT_TOKENS, ImagePreprocessor
from core.export.verdict import FLOAT32_UNIT_ROUNDOFF, NoiseFloor, Verdict, gemm_rounding_error, judge, rounding_noise
from core.models import build_seeded_model, tiny_config
from core.ptq import prepare
from core.quant.mode import Mode
from core.quant.observers import Observer
from core.wrappers import QuantModule, QuantVisionModel

U = FLOAT32_UNIT_ROUNDOFF
# The smallest soft-token budget the preprocessor supports: 630 patches per image, a 0.1 s forward.
SOFT_TOKENS = min(SUPPORTED_SOFT_TOKENS)
# Roundings inside one fake-quant: 1/scale, z * (1/scale), (q - zero_point) * scale.
FQ_ROUNDINGS = 3
# Independent noisy runs behind a float noise floor (as core.export.verdict draws them).
NOISE_DRAWS = 2


def tiny_vision_model(**overrides: Any) -> nn.Module:
    """The tiny Gemma 4 vision config with one encoder layer (every wrapper class still occurs once or more)."""
    values: dict[str, Any] = {"num_hidden_layers": 1}
    values.update(overrides)
    return build_seeded_model(tiny_config(**values))


def prepared(
    sample_images: Sequence[Path], name: str, cls: type[QuantModule], images: int = 3, **overrides: Any
) -> tuple[QuantVisionModel, Any, nn.Module, list[dict[str, Any]]]:
    """(wrapped tiny model, its wrapper `name` checked to be a `cls`, the HF module there, one batch per image)."""
    torch.manual_seed(0)
    qmodel = prepare(tiny_vision_model(**overrides))
    wrapper = qmodel.get_submodule(name) if name else qmodel
    assert type(wrapper) is cls, f"{name} is a {type(wrapper).__name__}"
    hf = qmodel.source.get_submodule(name) if name else qmodel.source
    return qmodel, wrapper, hf, image_batches(qmodel.config, sample_images[:images])


def pixels(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The inputs Gemma4VisionModel itself takes (no image ids)."""
    return {k: batch[k] for k in ("pixel_values", "pixel_position_ids")}


def image_batches(config: Any, paths: Sequence[Path]) -> list[dict[str, Any]]:
    """One preprocessed batch per image, named by its file stem (observer provenance)."""
    pre = ImagePreprocessor(config, max_soft_tokens=SOFT_TOKENS)
    return [pre([p]) | {"image_ids": [p.stem]} for p in paths]


def padded_batch(config: Any, paths: Sequence[Path]) -> dict[str, Any]:
    """All `paths` in one batch: images of different aspect ratios pad each other."""
    pre = ImagePreprocessor(config, max_soft_tokens=SOFT_TOKENS)
    return pre(list(paths)) | {"image_ids": [p.stem for p in paths]}


@torch.no_grad()
def calibrate(qmodel: QuantVisionModel, batches: Sequence[Mapping[str, Any]]) -> None:
    """Enter CALIB through the model's API and run every batch (each observer then holds statistics)."""
    qmodel.enable_calibration()
    for batch in batches:
        qmodel(**batch)


def assert_mode_cycle(
    qmodel: QuantVisionModel, wrapper: QuantModule, batches: Sequence[Mapping[str, Any]],
    run: Callable[[], torch.Tensor], reference: Callable[[], torch.Tensor],
) -> None:
    """NO_QUANT -> CALIB -> QUANT -> NO_QUANT through the model's API; `run()` equals `reference()` in all but QUANT."""
    assert wrapper.mode is Mode.NO_QUANT and torch.equal(run(), reference())
    calibrate(qmodel, batches)
    assert wrapper.mode is Mode.CALIB and torch.equal(run(), reference())
    qmodel.freeze()
    assert wrapper.mode is Mode.QUANT and not torch.equal(run(), reference())
    qmodel.set_mode(Mode.NO_QUANT)
    assert wrapper.mode is Mode.NO_QUANT and torch.equal(run(), reference())


def assert_mode_cycle_on_model_input(
    qmodel: QuantVisionModel, wrapper: QuantModule, batches: Sequence[Mapping[str, Any]],
    pick: Callable[[Any], torch.Tensor] = lambda output: output,
) -> None:
    """assert_mode_cycle with the inputs the model's padded NO_QUANT run gives `wrapper`, against its output there."""
    with torch.no_grad(), calls_of(wrapper) as calls:
        qmodel(**batches[0])
    args, expected = calls[0].args, pick(calls[0].output)
    assert_mode_cycle(qmodel, wrapper, batches, lambda: pick(wrapper(*args)), lambda: expected)


@torch.no_grad()
def paired_calls(qmodel: QuantVisionModel, wrapper: QuantModule, hf: nn.Module, batch: Mapping[str, Any]) -> tuple[Call, Call]:
    """(the wrapper's first call in the wrapped model's run on `batch`, the HF module's in the HF model's run)."""
    with calls_of(hf) as hf_calls:
        qmodel.source(**pixels(batch))
    with calls_of(wrapper) as calls:
        qmodel(**batch)
    return calls[0], hf_calls[0]


@torch.no_grad()
def quant_run(
    qmodel: QuantVisionModel, batches: Sequence[Mapping[str, Any]], *modules: nn.Module
) -> tuple[dict[str, list[tuple[torch.Tensor, torch.Tensor]]], list[list[Call]]]:
    """Calibrate on `batches`, freeze, run the second batch in QUANT: (fq tensors by observer, calls of each module)."""
    calibrate(qmodel, batches)
    qmodel.freeze()
    with ExitStack() as stack:
        seen = stack.enter_context(fq_tensors(qmodel))
        calls = [stack.enter_context(calls_of(m)) for m in modules]
        qmodel(**batches[1])
    return seen, calls


# --------------------------------------------------------------------------- taps
@dataclass
class Call:
    """One call of a module: its positional and keyword inputs and its output."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    return value


@contextmanager
def calls_of(module: nn.Module) -> Iterator[list[Call]]:
    """Record every call of `module` (a forward hook: only calls through ``module(...)`` are seen)."""
    calls: list[Call] = []

    def hook(_module, args, kwargs, output):
        calls.append(Call(_detached(args), _detached(kwargs), _detached(output)))

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


@contextmanager
def fed_with(module: nn.Module, args: tuple[Any, ...]) -> Iterator[None]:
    """Replace the positional inputs of every call of `module` by `args` (to rerun one call in another mode)."""
    handle = module.register_forward_pre_hook(lambda _module, _args: args)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def fq_tensors(qmodel: QuantVisionModel) -> Iterator[dict[str, list[tuple[torch.Tensor, torch.Tensor]]]]:
    """Record (input, output) of every ``fq`` call, by observer name: the tensors the wrappers observe.

    Forward hooks do not see these: they sit inside a wrapper's forward, and the static path calls
    ``forward_static`` / ``run_layers`` directly. ``fq`` is the one place every observed tensor passes.
    """
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
    patched = []

    def tap(original: Callable[[torch.Tensor, Observer], torch.Tensor]):
        def fq(x: torch.Tensor, obs: Observer) -> torch.Tensor:
            y = original(x, obs)
            seen[obs.name].append((x.detach().clone(), y.detach().clone()))
            return y

        return fq

    try:
        for module in qmodel.quant_modules():
            patched.append(module)
            module.fq = tap(module.fq)
        yield seen
    finally:
        for module in patched:
            module.__dict__.pop("fq", None)


def fq_output(seen: Mapping[str, list[tuple[torch.Tensor, torch.Tensor]]], name: str) -> torch.Tensor:
    """What the one fq call of observer `name` returned."""
    ((_, out),) = seen[name]
    return out


# --------------------------------------------------------------------------- grid and bounds
def scale_like(obs: Observer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The observer's (scale, zero_point) in float64, shaped to broadcast against `x`."""
    scale, zp = obs.scale.double(), obs.zero_point.double()
    if obs.per_channel:
        shape = [1] * x.dim()
        shape[obs.channel_axis] = -1
        scale, zp = scale.view(shape), zp.view(shape)
    return scale, zp


def assert_on_grid(x: torch.Tensor, obs: Observer) -> None:
    """Every element of `x` is ``scale * (q - zp)`` with an in-range code q, up to the rounding of that one product."""
    scale, zp = scale_like(obs, x)
    x64 = x.double()
    q = torch.round(x64 / scale) + zp
    q_dtype = obs.qdtype
    assert float(q.min()) >= q_dtype.qmin and float(q.max()) <= q_dtype.qmax, f"{obs.name}: code outside the dtype"
    exact = (q - zp) * scale
    off = (x64 - exact).abs() - U * exact.abs()
    assert float(off.max()) <= 0.0, f"{obs.name}: {float(off.max()):.3g} off the grid"


def saturation(x: torch.Tensor, obs: Observer) -> torch.Tensor:
    """How far each element of `x` lies outside the frozen grid's range (0 inside)."""
    scale, zp = scale_like(obs, x)
    q_dtype = obs.qdtype
    lo, hi = (q_dtype.qmin - zp) * scale, (q_dtype.qmax - zp) * scale
    x64 = x.double()
    return (lo - x64).clamp(min=0) + (x64 - hi).clamp(min=0)


def fq_bound(obs: Observer, ref: torch.Tensor, upstream: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Largest ``|fq(z) - ref|`` for any z within `upstream` of `ref` (elementwise, float64).

    Half a step, plus ref's saturation, plus `upstream` twice (once to reach z, once as z's extra
    saturation), plus the float32 roundings of the fake-quant itself.
    """
    scale, _ = scale_like(obs, ref)
    ref64 = ref.double()
    upstream = torch.as_tensor(upstream, dtype=torch.float64)
    rounding = FQ_ROUNDINGS * U * (ref64.abs() + upstream + scale)
    return scale / 2 + saturation(ref, obs) + 2 * upstream + rounding


def weight_error(weight: torch.Tensor, obs: Observer) -> torch.Tensor:
    """Elementwise bound on the fake-quantized weight's distance from `weight`."""
    return fq_bound(obs, weight.detach())


def matmul_noise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Bound on float32's own error in ``a @ b`` (gamma_K times |a| @ |b|, K the inner size)."""
    k = a.shape[-1]
    gamma = k * U / (1 - k * U)
    return gamma * (a.double().abs() @ b.double().abs())


def linear_bound(x: torch.Tensor, x_err: torch.Tensor | float, weight: torch.Tensor, w_err: torch.Tensor) -> torch.Tensor:
    """Bound on ``|x' W'^T - x W^T|`` when ``|x' - x| <= x_err`` and ``|W' - W| <= w_err`` (both computed in float32)."""
    x64, w64 = x.double(), weight.detach().double()
    x_err = torch.as_tensor(x_err, dtype=torch.float64).expand_as(x64)
    exact = x_err @ (w64.abs() + w_err).t() + x64.abs() @ w_err.t()
    noise = matmul_noise(x64.abs() + x_err, (w64.abs() + w_err).t()) + matmul_noise(x64, w64.t())
    return exact + noise


def assert_within(actual: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """|actual - ref| <= bound elementwise, with the worst element named on failure."""
    excess = (actual.double() - ref.double()).abs() - bound
    worst = int(excess.reshape(-1).argmax())
    assert float(excess.max()) <= 0.0, (
        f"{what}: element {worst} is {float(excess.reshape(-1)[worst]):.3g} beyond its bound "
        f"{float(bound.expand_as(excess).reshape(-1)[worst]):.3g}"
    )


# --------------------------------------------------------------------------- provenance
@torch.no_grad()
def calibrate_per_image(qmodel: QuantVisionModel, batches: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[torch.Tensor]]]:
    """Calibrate on `batches` (one image each) and return what each observer saw: name -> image id -> tensors."""
    qmodel.enable_calibration()
    per_image: dict[str, dict[str, list[torch.Tensor]]] = defaultdict(dict)
    for batch in batches:
        (image_id,) = batch["image_ids"]
        with fq_tensors(qmodel) as seen:
            qmodel(**batch)
        for name, pairs in seen.items():
            per_image[name][image_id] = [x for x, _ in pairs]
    return per_image


def assert_observers_recorded(
    wrapper: QuantModule, roles: Sequence[str], per_image: Mapping[str, Mapping[str, Sequence[torch.Tensor]]]
) -> None:
    """`wrapper` owns exactly `obs_<role>` in forward order, each per-tensor, named after the wrapper, with a
    range (min <= max) that every image's tensors set, as assert_min_max_provenance checks."""
    assert [n for n, _ in wrapper.named_children() if n.startswith("obs_")] == [f"obs_{r}" for r in roles]
    for role in roles:
        obs = getattr(wrapper, f"obs_{role}")
        assert obs.name == (f"{wrapper.module_name}.{role}" if wrapper.module_name else role)
        assert obs.min_val.shape == () and float(obs.min_val) <= float(obs.max_val), obs.name
        if obs.kind == "activation":
            assert_min_max_provenance(obs, per_image[obs.name])


def assert_min_max_provenance(obs: Observer, per_image: Mapping[str, Sequence[torch.Tensor]]) -> None:
    """A min-max observer's range is the extremes of every image's tensors, set by the image that held them.

    Comparisons are strict, so on a tie the earliest image keeps the extreme (`per_image` in run order)
    and the tie is noted.
    """
    mins = {k: min(float(t.min()) for t in ts) for k, ts in per_image.items()}
    maxs = {k: max(float(t.max()) for t in ts) for k, ts in per_image.items()}
    lo, hi = min(mins.values()), max(maxs.values())
    assert float(obs.min_val) == lo and float(obs.max_val) == hi, obs.name
    assert obs.min_source == next(k for k, v in mins.items() if v == lo), obs.name
    assert obs.max_source == next(k for k, v in maxs.items() if v == hi), obs.name
    assert obs.max_tied == (sum(v == hi for v in maxs.values()) > 1), obs.name
    holder = next(t for t in per_image[obs.max_source] if float(t.max()) == hi)
    index, shape = obs.location("max")
    assert shape == tuple(holder.shape) and float(holder.reshape(-1)[index]) == hi, obs.name


# --------------------------------------------------------------------------- float noise floor
def judged_against_noise(
    qmodel: QuantVisionModel, run: Callable[[], torch.Tensor], reference: torch.Tensor, rows: int
) -> Verdict:
    """core.export.verdict's float judgement of `run()` against `reference`: torch vs itself under rounding noise.

    The noise is this machine's GEMM rounding (``gemm_rounding_error``) injected at every observed
    tensor; the verdict is *verified* when the difference is within twice the noisiest draw.
    """
    rel = gemm_rounding_error(qmodel, rows)
    with torch.no_grad():
        clean = run()
        worst = 0.0
        for draw in range(NOISE_DRAWS):
            with rounding_noise(qmodel, rel, seed=draw + 1):
                worst = max(worst, float((run() - clean).abs().max()))
    floor = NoiseFloor(rel, None, None, worst, NOISE_DRAWS, int(clean.numel()))
    max_abs = float((clean - reference).abs().max())
    return judge(mode="no_quant", within=None, max_steps=None, max_abs=max_abs, floor=floor)


def judge_static_against_padded(
    qmodel: QuantVisionModel,
    batch: Mapping[str, Any],
    static_module: nn.Module,
    padded_module: nn.Module | None = None,
    pick: Callable[[Any], torch.Tensor] = lambda output: output,
) -> Verdict:
    """NO_QUANT: `static_module`'s output on the static path against `padded_module`'s (default: the same
    module) on HF's padded one, valid patches only, judged against float noise."""
    n = qmodel.build_profile(batch["pixel_position_ids"]).num_patches

    def static_output() -> torch.Tensor:
        with calls_of(static_module) as calls:
            qmodel(**batch, static=True)
        return pick(calls[0].output)

    with torch.no_grad(), calls_of(padded_module or static_module) as calls:
        qmodel(**batch)
    return judged_against_noise(qmodel, static_output, pick(calls[0].output)[:, :n], n)
