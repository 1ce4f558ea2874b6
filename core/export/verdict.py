"""How far torch is from itself on this machine, and the export verdict judged against it.

Two implementations of the same graph (torch's kernels, a Circle runtime, another CPU's kernels)
sum in different orders and round transcendental functions differently. On a quantized graph
each such difference can move a value across a rounding tie of the next quantizer, and the
flip travels on through the layers. So "within one step on 99% of outputs" cannot be a
constant: it depends on the model, the image and the machine.

The *noise floor* measures it where the verdict is made:

1. ``gemm_rounding_error`` runs the model's own linear layers (their weight shapes, at the
   export profile's row count) in float32 with this machine's kernels and in float64, and takes
   the largest normwise relative error: the size of a summation-order change here.
2. ``rounding_noise`` perturbs every activation tensor the wrappers quantize (the input of each
   ``QuantModule.fq``) by Gaussian noise of that relative size (std ``rel * rms(x)``): torch as
   another, equally valid, implementation would compute it.
3. ``noise_floor`` runs the exported graph's torch forward a few times under independent noise
   and compares each run with the unperturbed output using the same measures as the file check
   (share within one output step, max steps, max |diff|). The worst draw is the floor.

``judge`` then reads an export: *verified* when the file is no further from torch than torch
is from itself (share within one step no lower than the floor's, less the binomial sampling
error of a share of that many elements; max steps no higher than the floor's plus one step for
the file's own requantization), *failed* when something is structurally wrong (a tensor without
qparams, a dtype change without a QUANTIZE/DEQUANTIZE op, a runtime error, or a distance tens of
times the floor), and *check* in between, with what to do next. The same rules run on every CPU,
so the verdict means the same everywhere; its numbers differ as the machines do.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch

__all__ = [
    "STEP_HAIR",
    "NoiseFloor",
    "Verdict",
    "gemm_rounding_error",
    "judge",
    "noise_floor",
    "rounding_noise",
]

# float32 unit roundoff: the smallest relative difference two float32 implementations can have.
FLOAT32_UNIT_ROUNDOFF = 2.0**-24
# Independent noisy runs of the floor; the worst one is kept.
DRAWS = 2
# A file this many times further from torch than the floor is broken, not noisy. Independent
# noise draws differ from each other by well under 2x (measured: 1.1% vs 1.5% of outputs beyond
# one step on tiny); a halved scale or a mis-ordered op reads 10x and more.
BROKEN_FACTOR = 4.0


@dataclass
class NoiseFloor:
    """torch against itself under rounding noise of this machine's size (the worst of `draws`)."""

    rel: float  # relative (normwise) noise injected at every quantized activation
    within_one_step: float | None  # quant exports: share of outputs within one output step
    max_steps: float | None
    max_abs: float  # max |noisy - clean| of the output
    draws: int
    elements: int  # output elements compared (for the sampling error of a share)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


@dataclass
class Verdict:
    """What the verification means, in the same words on every machine."""

    level: str  # "verified" | "check" | "failed"
    summary: str  # one line: the numbers, file and floor side by side
    reason: str  # why this level ("" when verified)
    advice: str  # what to do next ("" when verified)

    @property
    def ok(self) -> bool:
        """True when the file is verified."""
        return self.level == "verified"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


# --------------------------------------------------------------------------- measuring the noise
@torch.no_grad()
def gemm_rounding_error(qmodel: Any, rows: int, seed: int = 0) -> float:
    """Largest normwise relative error of this machine's float32 GEMMs (the model's own weight
    shapes, `rows` rows) against float64; never below float32's unit roundoff."""
    gen = torch.Generator().manual_seed(seed)
    seen: set[tuple[int, int]] = set()
    worst = FLOAT32_UNIT_ROUNDOFF
    for module in qmodel.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        weight = module.weight.detach().float().cpu()
        if tuple(weight.shape) in seen:
            continue
        seen.add(tuple(weight.shape))
        x = torch.randn(max(1, rows), weight.shape[1], generator=gen)
        device = module.weight.device
        y32 = (x.to(device) @ weight.to(device).t()).cpu().double()
        y64 = x.double() @ weight.double().t()
        denom = float(y64.norm())
        if denom > 0:
            worst = max(worst, float((y32 - y64).norm()) / denom)
    return worst


@contextlib.contextmanager
def rounding_noise(qmodel: Any, rel: float, seed: int = 0) -> Iterator[None]:
    """Perturb every quantized activation by N(0, (rel * rms(x))^2) noise while inside."""
    gen = torch.Generator().manual_seed(seed)
    patched = []

    def wrap(orig):
        def fq(x: torch.Tensor, obs: Any) -> torch.Tensor:
            if getattr(obs, "kind", "activation") == "activation" and x.is_floating_point() and x.numel() > 1:
                rms = x.detach().float().pow(2).mean().sqrt()
                noise = torch.randn(x.shape, generator=gen).to(device=x.device, dtype=x.dtype)
                x = x + noise * (rel * rms).to(x.dtype)
            return orig(x, obs)

        return fq

    try:
        for module in qmodel.quant_modules():
            # A tap already in place (core.analysis.tap.FqTap) is wrapped, so it sees the noisy values,
            # and put back on exit.
            patched.append((module, module.__dict__.get("fq")))
            module.fq = wrap(module.fq)
        yield
    finally:
        for module, previous in patched:
            if previous is None:
                module.__dict__.pop("fq", None)
            else:
                module.fq = previous


@torch.no_grad()
def noise_floor(
    qmodel: Any,
    module: Any,
    pixel_values: torch.Tensor,
    reference: torch.Tensor,
    step: float | None,
    draws: int = DRAWS,
    rel: float | None = None,
) -> NoiseFloor:
    """Run `module` (the export module) `draws` times under rounding noise and compare with `reference`."""
    if rel is None:
        rel = gemm_rounding_error(qmodel, int(getattr(module, "num_patches", pixel_values.shape[1])))
    reference = reference.float().cpu()
    worst_within: float | None = None
    worst_steps: float | None = None
    worst_abs = 0.0
    for draw in range(draws):
        with rounding_noise(qmodel, rel, seed=draw + 1):
            noisy = module(pixel_values).float().cpu().reshape(reference.shape)
        diff = (noisy - reference).abs()
        worst_abs = max(worst_abs, float(diff.max()))
        if step is not None:
            within, steps = within_one_step(diff, step), float(diff.max()) / step
            worst_within = within if worst_within is None else min(worst_within, within)
            worst_steps = steps if worst_steps is None else max(worst_steps, steps)
    return NoiseFloor(
        rel=rel, within_one_step=worst_within, max_steps=worst_steps, max_abs=worst_abs,
        draws=draws, elements=int(reference.numel()),
    )


# Two dequantized values k steps apart differ by k * scale only up to float rounding (each side is
# an integer times a float32 scale), so a step count is compared with this relative hair: far below
# the next whole step, far above float32's rounding.
STEP_HAIR = 1e-4


def within_one_step(diff: torch.Tensor, step: float) -> float:
    """Share of `diff` elements no larger than one step (a relative hair over counts: both sides round)."""
    return float((diff <= step * (1 + STEP_HAIR)).float().mean())


# --------------------------------------------------------------------------- the verdict
def judge(
    *,
    mode: str,
    within: float | None,
    max_steps: float | None,
    max_abs: float,
    floor: NoiseFloor | None,
    structural: list[str] | None = None,
    caveats: list[str] | None = None,
) -> Verdict:
    """The verdict of one verification: the file's distance from torch against torch's own noise floor.

    `structural` problems fail the file whatever its numbers; `caveats` (consequences of the user's
    own choices, such as modules kept in float) turn an otherwise verified file into "check"."""
    structural = [s for s in (structural or []) if s]
    caveats = [c for c in (caveats or []) if c]
    if mode == "quant" and within is not None and floor is not None and floor.within_one_step is not None:
        summary = (
            f"{100 * within:.2f}% of outputs within one quantization step (max {max_steps:.1f} steps); "
            f"torch vs itself under rounding noise: {100 * floor.within_one_step:.2f}% (max {floor.max_steps:.1f})"
        )
    else:
        summary = f"max |diff| {max_abs:.3g}; torch vs itself under rounding noise: {floor.max_abs:.3g}" if floor else f"max |diff| {max_abs:.3g}"
    if structural:
        return Verdict(
            "failed", summary, "; ".join(structural),
            "the file is not the model that was inspected: re-export; if it persists, report it with the export's --json output",
        )
    if floor is None:
        return Verdict("check", summary, "no noise floor was measured", "export again with verification on")
    if mode == "quant" and within is not None and floor.within_one_step is not None:
        # A share measured on n elements has a sampling error of sqrt(p(1-p)/n); three of them
        # separate a real shortfall from the luck of one image.
        p = floor.within_one_step
        slack = 3.0 * math.sqrt(max(p * (1 - p), 1.0 / floor.elements) / floor.elements)
        # One more step than the floor: the file requantizes its output independently of torch.
        allowed_steps = (floor.max_steps or 0.0) + 1.0
        steps = max_steps or 0.0
        if within >= p - slack and steps <= allowed_steps * (1 + STEP_HAIR):
            return _verified(summary, caveats)
        beyond, floor_beyond = 1.0 - within, (1.0 - p) + slack
        if beyond > BROKEN_FACTOR * floor_beyond or steps > BROKEN_FACTOR * allowed_steps:
            return Verdict(
                "failed", summary,
                f"{100 * beyond:.1f}% of outputs are more than one step off (rounding noise explains "
                f"{100 * floor_beyond:.1f}%), up to {steps:.0f} steps: a scale, zero point or operator in the "
                "file differs from the model",
                "run the three-way check to find the first module whose Circle tensor departs from torch, then re-export",
            )
        return Verdict(
            "check", summary,
            "the file is further from torch than rounding noise explains, though not by a broken parameter's margin",
            "run the three-way check to see which module departs first; keep that module in float or give it int16",
        )
    allowed = max(floor.max_abs, 1e-30)
    if max_abs <= allowed * 2.0:
        # Float: the file and torch are two implementations, torch-with-noise is one against one
        # noisy copy, so the file may differ by up to the sum of two such distances.
        return _verified(summary, caveats)
    if max_abs > BROKEN_FACTOR * 2.0 * allowed:
        return Verdict(
            "failed", summary,
            f"the output is {max_abs / allowed:.0f}x further from torch than rounding noise explains",
            "run the three-way check to find the first module that departs",
        )
    return Verdict("check", summary, "the file is further from torch than rounding noise explains", "run the three-way check")


def _verified(summary: str, caveats: list[str]) -> Verdict:
    """Numbers within the noise: verified, or check when the user's own choices leave the file not fully integer."""
    if not caveats:
        return Verdict("verified", summary, "", "")
    return Verdict(
        "check", summary,
        "the numbers match, but " + "; ".join(caveats),
        "a device runtime needs QUANTIZE/DEQUANTIZE around float modules (ONE's onert refuses a silent dtype "
        "change): quantize those modules (e.g. int16) for a fully integer file",
    )
