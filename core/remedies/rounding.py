"""Weight rounding: GPTQ and AdaRound; a rounded copy of each weight on its grid, the grid pinned.

Which code rounds:
- GPTQ calls TICO's per-layer core, ``tico.quantization.algorithm.gptq.gptq.GPTQ``, on the
  wrapper's own ``nn.Linear``: it takes any linear and a Hessian, and its quantizer accepts a
  preset (scale, zero) instead of finding its own, so it rounds onto exactly the grid our weight
  observer froze (a signed grid is the same grid shifted by ``qmin``: TICO's codes run from 0).
  TICO's model-level driver (``Gemma4GPTQQuantizer``) is not used: it resolves a whole
  ``Gemma4ForConditionalGeneration`` (language model included), replays the float model, and
  chooses its own qparams, which our QUANT path and export would then recompute.
- AdaRound is ours: TICO's ``AdaRoundWeightSet`` binds to the observers of its own wrapq tree and
  its runner optimises that whole tree's loss, so it cannot drive our observers. Ours is the
  per-layer AdaRound of Nagel et al. (2020): a learned up/down choice per weight (rectified
  sigmoid, annealed regulariser) minimising the layer's output reconstruction error on the
  calibration inputs, ``E |x (W - W~)^T|^2 = tr(dW H dW^T) / n`` with ``H = X^T X``.

Which inputs: the Hessian of each linear comes from the model in QUANT mode (activations
fake-quantized, every earlier linear already rounded), i.e. from what the layer sees when the
model runs quantized. So each layer's rounding also absorbs the error the layers before it left
(GPTQ's sequential order). Linears that share an input (q/k/v, gate/up) are still rounded one
after the other, each seeing its predecessors' rounded weights where they feed it. Inside an
encoder layer the layer's input is cached once per image, and so is the input of the attention or
MLP a linear sits in; only that part is replayed. Per image, an encoder layer costs about three
runs of its attention (o_proj's inputs, the MLP's inputs, the layer's output for the next layer).

The float weights are never changed. Each rounded weight is kept beside its float weight as the
wrapper's rounded copy (``QuantLinear.pin_weight``), exactly on the grid (passed through the
observer's fake-quant once more), and that grid is pinned (``Observer.pin_qparams``). Only the
quantized path and the Circle export use the copy; NO_QUANT stays the original model, so every
float reference (compare, the analysis pass, divergence, a fix's after-measurement) measures the
rounding error too. Recalibration, a saved session (``rounded:<name>`` in the remedied weights)
and the export keep copy and pin; a new dtype for the weight drops both, and so does a
rescaled float weight (a later SmoothQuant or CLE) at its recalibration. Each layer's GPTQ starts
from the original float weight (TICO's GPTQ rounds ``linear.weight`` and we put it back), so the
report names no changed float parameter (``summary["parameters"]`` is empty) and lists the
rounded wrappers in ``summary["rounded"]``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from core.analysis.metrics import sqnr_from_sums
from core.config import PTQConfig, check_globs
from core.errors import ConfigError, NotCalibratedError
from core.quant.mode import Mode
from core.remedies.plan import RemedyReport, RemedyStep
from core.wrappers.layers import QuantLinear

METHODS = ("gptq", "adaround")
DEFAULTS: dict[str, dict[str, Any]] = {
    # TICO's GPTQConfig defaults (percdamp 0.01, act-order on, blocks of 128 columns).
    "gptq": {"percdamp": 0.01, "actorder": True, "blocksize": 128},
    # Nagel et al.: lambda 0.01, beta annealed 20 -> 2 after a 20% warm-up, Adam lr 1e-2.
    "adaround": {"iterations": 300, "lr": 1e-2, "reg": 0.01, "beta_start": 20.0, "beta_end": 2.0, "warmup": 0.2, "seed": 0},
}
# AdaRound's rectified sigmoid stretch (zeta, gamma): h(V) reaches exactly 0 and 1.
_ZETA, _GAMMA = 1.1, -0.1


@dataclass
class RoundingTarget:
    """One linear to round: its wrapper, the HF parameter its weight is, and the encoder layer it sits in."""

    name: str
    wrapper: QuantLinear
    parameter: str
    layer: int | None
    folded: bool = False  # the patch embedder's folded projection (2W): `parameter` is HF's W


@dataclass
class LayerFigures:
    """Output reconstruction SQNR of one linear on its calibration inputs: nearest rounding vs the algorithm."""

    samples: int
    nearest_db: float
    rounded_db: float
    changed: float  # fraction of weights whose code differs from nearest rounding


class _Stop(Exception):
    """Raised by a capture hook: the rest of the forward is not needed."""


def linear_targets(qmodel, globs: Sequence[str], method: str = "gptq") -> list[RoundingTarget]:
    """The quantized linears matched by `globs` in forward order; ConfigError for a glob matching none."""
    linears = [(n, w) for n, w in qmodel.wrappers() if isinstance(w, QuantLinear)]
    check_globs(globs, [n for n, _ in linears], "module", source=method)
    params = {id(p): n for n, p in qmodel.source.named_parameters()}
    layer_names = {layer.module_name: i for i, layer in enumerate(qmodel.encoder.layers)}
    out = []
    for name, wrapper in linears:
        if not any(PTQConfig.matches(g, name) for g in globs) or not wrapper.obs_weight.enabled:
            continue
        parameter = params.get(id(wrapper.linear.weight))
        folded = parameter is None and wrapper is qmodel.patch_embedder.input_proj
        if folded:
            parameter = "patch_embedder.input_proj.weight"
        if parameter is None:
            raise ConfigError(f"{name}: its weight is not a parameter of the vision model, so it cannot be rounded")
        layer = next((i for prefix, i in layer_names.items() if name.startswith(prefix + ".")), None)
        out.append(RoundingTarget(name, wrapper, parameter, layer, folded))
    return out


def _options(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    if method not in METHODS:
        raise ConfigError(f"unknown rounding method {method!r}: use one of {', '.join(METHODS)}")
    unknown = sorted(set(options) - set(DEFAULTS[method]))
    if unknown:
        raise ConfigError(f"{method}: unknown option {unknown[0]!r}; use {', '.join(DEFAULTS[method])}")
    return {**DEFAULTS[method], **options}


def _images(batches: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One model call per image, so a capture hook can stop the forward early."""
    out = []
    for batch in batches:
        ids = batch.get("image_ids")
        for b in range(int(batch["pixel_values"].shape[0])):
            out.append(
                {
                    "pixel_values": batch["pixel_values"][b : b + 1],
                    "pixel_position_ids": batch["pixel_position_ids"][b : b + 1],
                    "image_ids": [ids[b]] if ids is not None else None,
                }
            )
    return out


def _capture(module: nn.Module, run: Callable[[], Any]) -> tuple[tuple, dict]:
    """Run `run` until `module` is entered and return its (args, kwargs); the rest is skipped."""
    seen: list[tuple[tuple, dict]] = []

    def hook(_mod, args, kwargs):
        seen.append((args, kwargs))
        raise _Stop

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"{getattr(module, 'module_name', module)} was not reached by the forward")
    return seen[0]


class _Hessian:
    """H = sum x^T x over every input row, in float64 (rows counted)."""

    def __init__(self, columns: int) -> None:
        self.h = torch.zeros(columns, columns, dtype=torch.float64)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double().cpu()
        self.h.addmm_(x.t(), x)
        self.rows += x.shape[0]


def _energy(delta: torch.Tensor, h: torch.Tensor) -> float:
    """tr(delta H delta^T): the summed squared output difference over the inputs H came from."""
    d = delta.double().cpu()
    return float(((d @ h) * d).sum())


def end_to_end_sqnr_db(float_model: nn.Module, qmodel, batches: Sequence[Mapping[str, Any]]) -> float:
    """SQNR (dB) of the wrapped model's output against a separate float model over the batches.

    A check from outside the wrapped tree: core.analysis.compare takes its float reference from
    the wrapped model itself, which a rounding leaves the original (only rounded copies are added),
    so both measure against the same float function.
    """
    signal = noise = 0.0
    with torch.no_grad():
        for b in batches:
            inputs = {"pixel_values": b["pixel_values"], "pixel_position_ids": b["pixel_position_ids"]}
            ref = float_model(**inputs).last_hidden_state.double()
            noise += float(((ref - qmodel(**inputs).last_hidden_state.double()) ** 2).sum())
            signal += float((ref**2).sum())
    return sqnr_from_sums(signal, noise)


def _gptq(linear: nn.Linear, obs, hessian: _Hessian, opts: Mapping[str, Any]) -> torch.Tensor:
    """TICO's GPTQ on this linear with our frozen grid; returns the rounded weight (the linear keeps W)."""
    from tico.quantization.algorithm.gptq.gptq import GPTQ  # noqa: PLC0415 -- tico's algorithm package is heavy; only rounding needs it

    original = linear.weight.detach().clone()
    q = obs.qdtype
    gptq = GPTQ(linear)
    gptq.H = hessian.h.to(linear.weight.device).clone()
    # TICO's codes run 0..maxq; ours qmin..qmax. Shifting the zero point by qmin is the same grid.
    gptq.quantizer.configure(q.bits, perchannel=True, sym=False)  # maxq = 2**bits - 1 = qmax - qmin
    gptq.quantizer.scale = obs.scale.detach().float().reshape(-1, 1).to(linear.weight.device)
    gptq.quantizer.zero = (obs.zero_point.detach().float() - q.qmin).reshape(-1, 1).to(linear.weight.device)
    try:
        gptq.fasterquant(blocksize=int(opts["blocksize"]), percdamp=float(opts["percdamp"]), actorder=bool(opts["actorder"]))
        rounded = linear.weight.detach().clone()
    finally:
        gptq.free()
        linear.weight.data.copy_(original)
    return rounded


def _adaround(weight: torch.Tensor, obs, hessian: _Hessian, opts: Mapping[str, Any]) -> torch.Tensor:
    """Learned rounding of `weight` on the frozen grid, minimising tr(dW H dW^T) / (rows * out)."""
    q = obs.qdtype
    scale = obs.scale.detach().double().reshape(-1, 1).cpu()
    zp = obs.zero_point.detach().double().reshape(-1, 1).cpu()
    w = weight.detach().double().cpu()
    h = hessian.h / max(hessian.rows * w.shape[0], 1)
    base = torch.floor(w / scale)
    rest = (w / scale - base).clamp(1e-4, 1 - 1e-4)
    # V such that h(V) = rest: start from the float weight itself.
    v = (-torch.log((_ZETA - _GAMMA) / (rest - _GAMMA) - 1)).requires_grad_(True)
    iterations = int(opts["iterations"])
    warm = int(float(opts["warmup"]) * iterations)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(int(opts["seed"]))
    optim = torch.optim.Adam([v], lr=float(opts["lr"]))
    lo, hi = q.qmin, q.qmax

    def soft(v_: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(v_) * (_ZETA - _GAMMA) + _GAMMA, 0, 1)

    try:
        with torch.enable_grad():
            for it in range(iterations):
                r = soft(v)
                wq = scale * (torch.clamp(base + r + zp, lo, hi) - zp)
                d = w - wq
                loss = ((d @ h) * d).sum()
                if it >= warm:
                    t = (it - warm) / max(iterations - warm, 1)
                    beta = float(opts["beta_end"]) + 0.5 * (float(opts["beta_start"]) - float(opts["beta_end"])) * (1 + math.cos(math.pi * t))
                    loss = loss + float(opts["reg"]) * (1 - (2 * r - 1).abs().pow(beta)).sum()
                optim.zero_grad()
                loss.backward()
                optim.step()
    finally:
        torch.random.set_rng_state(generator_state)
    up = (v.detach() >= 0).double()
    return (scale * (torch.clamp(base + up + zp, lo, hi) - zp)).to(weight.dtype).to(weight.device)


class _Rounder:
    """Rounds the targets in forward order on one model (QUANT mode), undoing everything on failure."""

    def __init__(self, qmodel, images, method, opts, progress, cancel) -> None:
        self.qmodel = qmodel
        self.images = images
        self.method = method
        self.opts = opts
        self.progress = progress
        self.cancel = cancel
        # (target, its rounded copy before this run or None, its weight observer's state before it)
        self.saved: list[tuple[RoundingTarget, torch.Tensor | None, dict[str, torch.Tensor]]] = []
        self.figures: dict[str, LayerFigures] = {}

    def _check(self) -> None:
        if self.cancel is not None:
            self.cancel.raise_if_cancelled("weight rounding")

    def _full_pass_inputs(self, module: nn.Module) -> list[tuple[tuple, dict]]:
        """`module`'s (args, kwargs) for every image, from a QUANT forward stopped where it is entered."""
        found = []
        for image in self.images:
            self._check()
            found.append(_capture(module, lambda image=image: self.qmodel(**image)))
        return found

    def _hessian_from(self, target: RoundingTarget, runs: list[Callable[[], Any]]) -> _Hessian:
        hessian = _Hessian(target.wrapper.linear.in_features)
        for run in runs:
            self._check()
            args, kwargs = _capture(target.wrapper, run)
            hessian.add(args[0] if args else kwargs["x"])
        return hessian

    def _round(self, target: RoundingTarget, hessian: _Hessian) -> None:
        wrapper = target.wrapper
        obs = wrapper.obs_weight
        weight = wrapper.linear.weight.detach()
        if self.method == "gptq":
            rounded = _gptq(wrapper.linear, obs, hessian, self.opts)
        else:
            rounded = _adaround(weight, obs, hessian, self.opts)
        nearest = obs.fake_quant(weight)
        rounded = obs.fake_quant(rounded)  # exactly on the grid the export stores
        signal = _energy(weight, hessian.h)
        self.figures[target.name] = LayerFigures(
            samples=hessian.rows,
            nearest_db=sqnr_from_sums(signal, _energy(weight - nearest, hessian.h)),
            rounded_db=sqnr_from_sums(signal, _energy(weight - rounded, hessian.h)),
            changed=float((rounded != nearest).float().mean()),
        )
        self.saved.append((target, wrapper.rounded_weight, {k: v.clone() for k, v in obs.state_dict().items()}))
        wrapper.pin_weight(rounded, obs.scale.clone(), obs.zero_point.clone())
        # Wrappers above it may fold its qparams into their constants (the patch embedder's bias grid).
        for wrapper_above in self.qmodel.quant_modules():
            name = wrapper_above.module_name
            if wrapper_above is not wrapper and (not name or target.name.startswith(name + ".")):
                wrapper_above.cache_weights()

    def undo(self) -> None:
        """Put back every rounded copy (an earlier fix's, or none) and observer state changed so far (newest first)."""
        for target, previous, state in reversed(self.saved):
            target.wrapper.obs_weight.load_state_dict(state)
            if previous is None:
                target.wrapper.clear_rounding()
            else:
                target.wrapper.restore_rounding(previous)
        self.saved.clear()
        if self.qmodel.ctx.mode is Mode.QUANT:
            for wrapper in self.qmodel.quant_modules():
                wrapper.cache_weights()

    def _unit_of(self, target: RoundingTarget, block: nn.Module) -> nn.Module:
        """The wrapper to replay for `target`: its parent inside the encoder layer (attention, MLP),
        else the layer itself. A parent's input does not depend on its own linears."""
        parent = target.name.rpartition(".")[0]
        for name, wrapper in block.named_modules(prefix=block.module_name):
            if name == parent and wrapper is not block:
                return wrapper
        return block

    def run(self, targets: list[RoundingTarget]) -> None:
        """Round every target in forward order; each sees the earlier ones rounded."""
        total = len(targets)
        layer_cache: tuple[int, list[tuple[tuple, dict]]] | None = None
        unit_cache: tuple[nn.Module, list[tuple[tuple, dict]]] | None = None
        layers = self.qmodel.encoder.layers
        for done, target in enumerate(targets):
            if target.layer is None:
                runs = [lambda image=image: self.qmodel(**image) for image in self.images]
                layer_cache = unit_cache = None
            else:
                block = layers[target.layer]
                if layer_cache is None or layer_cache[0] != target.layer:
                    previous = layer_cache
                    if previous is not None and previous[0] == target.layer - 1:
                        # The layer before was the last one rounded: its outputs are this layer's inputs.
                        before = layers[previous[0]]
                        entries = [((before(*a, **k),) + tuple(a[1:]), k) for a, k in previous[1]]
                    else:
                        entries = self._full_pass_inputs(block)
                    layer_cache = (target.layer, entries)
                unit = self._unit_of(target, block)
                if unit is block:
                    unit_cache = (block, layer_cache[1])
                elif unit_cache is None or unit_cache[0] is not unit:
                    # Captured once when the unit is entered: every earlier linear is rounded by then,
                    # and the unit's own linears do not feed its input. Saves re-running the
                    # attention for each MLP linear.
                    unit_cache = (unit, [_capture(unit, lambda a=a, k=k: block(*a, **k)) for a, k in layer_cache[1]])
                runs = [lambda a=a, k=k, unit=unit: unit(*a, **k) for a, k in unit_cache[1]]
            hessian = self._hessian_from(target, runs)
            self._round(target, hessian)
            if self.progress is not None:
                self.progress(done + 1, total, f"{self.method}: rounded {target.name}")


def apply_weight_rounding(
    qmodel,
    batches: Sequence[Mapping[str, Any]],
    globs: Sequence[str],
    method: str = "gptq",
    *,
    progress: Callable[..., None] | None = None,
    cancel=None,
    **options: Any,
) -> RemedyReport:
    """Round the weights of the linears matched by the globs with GPTQ or AdaRound on these inputs."""
    opts = _options(method, options)
    globs = tuple(globs)
    targets = linear_targets(qmodel, globs, method)
    images = _images(batches)
    if not images:
        raise ConfigError(f"{method} needs calibration images: add at least one")
    if not qmodel.is_calibrated:
        raise NotCalibratedError(f"{method} rounds onto the calibrated grid and runs the quantized model: calibrate first")
    start = time.perf_counter()
    rounder = _Rounder(qmodel, images, method, opts, progress, cancel)
    try:
        # The static path (RMSNorm's quantized maths) also for an encoder layer replayed on its own.
        with torch.no_grad(), qmodel.mode_as(Mode.QUANT), qmodel.static_path():
            rounder.run(targets)
    except BaseException:
        # A cancelled or failed run leaves the model as it found it.
        rounder.undo()
        raise
    figures = rounder.figures
    summary: dict[str, Any] = {
        "parameters": [],  # the float weights stay the original ones: only rounded copies are added
        "rounded": [t.name for t in targets],
        "method": method,
        "options": dict(opts),
        "images": len(images),
        "layers": {
            name: {"samples": f.samples, "nearest_db": f.nearest_db, "rounded_db": f.rounded_db, "changed": f.changed}
            for name, f in figures.items()
        },
    }
    skipped = [n for n, w in qmodel.wrappers() if isinstance(w, QuantLinear) and not w.obs_weight.enabled and any(PTQConfig.matches(g, n) for g in globs)]
    if skipped:
        summary["skipped_float"] = skipped
    step = RemedyStep(method, globs, {k: v for k, v in opts.items() if k in options})
    return RemedyReport(step, [t.name for t in targets], summary, time.perf_counter() - start)
