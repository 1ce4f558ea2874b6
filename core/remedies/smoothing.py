"""Outlier smoothing: SmoothQuant and cross-layer equalisation, folded into the float weights.

Both are rescalings that leave the float function unchanged and move range from where it hurts
quantization (a few activation channels, or uneven weight columns) to where it does not.

SmoothQuant (Xiao et al. 2023), per norm and the linears it feeds, per input channel j:
``s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha)``; the norm's scale is divided by s and every linear it
feeds has column j multiplied by s_j. In a Gemma4VisionEncoderLayer ``input_layernorm`` feeds
q/k/v_proj and ``pre_feedforward_layernorm`` feeds gate/up_proj (core.models.NORM_CONSUMERS); the
post-attention and post-feedforward norms feed the residual sum, not a linear. Gemma 4's RMSNorm
multiplies by its weight itself (``normed * w``, not ``1 + w``), so dividing w by s divides its
output by s exactly. The statistics are ours, not TICO's: TICO's SmoothQuant
(tico.quantization.algorithm.smoothquant) does not fit this model: ``smooth_weights`` accepts
only Llama/Qwen3-VL RMSNorm or LayerNorm fronts and plain nn.Linear backs (Gemma4RMSNorm and
Gemma4ClippableLinear raise), its appliers recognise Llama, Qwen3-VL and fairseq layers only (on
Gemma 4 ``apply_smoothing`` changes nothing), and a Llama-style pairing would fold the MLP's
scale into ``post_attention_layernorm``, which in Gemma 4 does not feed the MLP. Its statistics
hooks sit on nn.Linear, which our wrappers bypass (they call F.linear on the HF weight).

Cross-layer equalisation (Nagel et al. 2019) needs the function to be positively homogeneous
between the pair, per channel:
- MLP ``down(act(gate(x)) * up(x))``: the product is linear in up's output channel i, so up's row
  i times c_i and down's column i divided by c_i is exact. This pair is equalised, with TICO's
  ``equalize_layer_pair`` (plain nn.Linear pairs: it fits the HF linears our wrappers hold).
  gate -> down is not a pair: gelu is not homogeneous.
- v_proj -> o_proj is NOT equalised: Gemma 4 puts ``v_norm`` (a scale-less RMSNorm per head)
  between them. A per-channel scale changes the head's RMS, and a per-head scale is divided out by
  the norm, so nothing can be moved across it. q/k feed q_norm/k_norm and RoPE: not pairs either.

Gemma4ClippableLinear's clamps are one scalar range for all channels, so a per-channel rescale
across a finite clamp is exact only where the clamp does not bind. Checking that on the calibration
images is not enough (held-out photos bind where they did not: measured on the tiny model with
clipped linears), so a group or pair with a finite clamp in between is skipped and its reason
reported (``summary["skipped"]``). The built-in models have no clamps (use_clipped_linears is off).

Both change the float weights in place and leave observer statistics and qparams stale: the
caller recalibrates. Neither changes the model's mode.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from core.analysis.tap import model_device
from core.config import PTQConfig
from core.data.device import batches_to_device
from core.errors import ConfigError
from core.models import NORM_CONSUMERS, clamp_reason
from core.quant.mode import Mode
from core.remedies.plan import RemedyReport, RemedyStep

# Scales never go below this (TICO's and the paper's floor): a dead channel must not blow up a weight.
_MIN_SCALE = 1e-5
_V_O_REASON = (
    "v_proj -> o_proj is not equalised: v_norm (scale-less RMSNorm per head) between them undoes a per-head "
    "scale and is changed by a per-channel one"
)


def _matching(globs: Sequence[str], names: Sequence[str]) -> list[str]:
    return [g for g in globs if any(PTQConfig.matches(g, n) for n in names)]


def _smoothing_groups(qmodel) -> list[tuple[str, Any, list[tuple[str, Any]]]]:
    """(norm name, norm wrapper, [(linear name, linear wrapper)]) for every norm that feeds linears."""
    groups = []
    for layer in qmodel.encoder.layers:
        for norm_attr, consumers in NORM_CONSUMERS.items():
            norm = getattr(layer, norm_attr)
            groups.append((norm.module_name, norm, [(layer.get_submodule(c).module_name, layer.get_submodule(c)) for c in consumers]))
    return groups


def _parameter_names(qmodel) -> dict[int, str]:
    """id(tensor) -> its qualified name in the HF vision model (parameters and buffers)."""
    source = qmodel.source
    named = list(source.named_parameters()) + list(source.named_buffers())
    return {id(t): n for n, t in named}


@torch.no_grad()
def _input_statistics(qmodel, wrappers: Mapping[str, Any], batches, progress, cancel) -> dict[str, torch.Tensor]:
    """Per key: the per-channel absmax of the input of its wrapper."""
    stats: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(_module, args) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            absmax = x.abs().amax(dim=0).cpu()
            seen = stats.get(name)
            stats[name] = absmax if seen is None else torch.maximum(seen, absmax)

        return record

    handles = [w.register_forward_pre_hook(hook(name)) for name, w in wrappers.items()]
    try:
        device = str(model_device(qmodel))
        total = len(batches)
        with qmodel.mode_as(Mode.NO_QUANT):
            for done, batch in enumerate(batches_to_device(batches, device), start=1):
                if cancel is not None:
                    cancel.raise_if_cancelled()
                # The static path sees valid patches only, as calibration does (the padded one adds padding rows).
                qmodel(pixel_values=batch["pixel_values"], pixel_position_ids=batch["pixel_position_ids"], static=True)
                if progress is not None:
                    progress(done, total, f"activation statistics: {done}/{total} images")
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _group_alphas(qmodel, alpha_by_glob: Mapping[str, float]) -> list[tuple[tuple[str, Any, list], float]]:
    """The groups the globs select with their alpha; ConfigError on a bad alpha, an unmatched glob or a conflict."""
    for glob, alpha in alpha_by_glob.items():
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
            raise ConfigError(f"SmoothQuant alpha for {glob!r} is {alpha!r}: use a number from 0 to 1 (0.5 is usual)")
    selected, used = [], set()
    for group in _smoothing_groups(qmodel):
        norm_name, _, linears = group
        globs = _matching(list(alpha_by_glob), [norm_name, *(n for n, _ in linears)])
        used.update(globs)
        alphas = {float(alpha_by_glob[g]) for g in globs}
        if len(alphas) > 1:
            raise ConfigError(
                f"SmoothQuant globs {', '.join(globs)} give {norm_name} and the linears it feeds different alphas: "
                "they share one scale, so give them one alpha"
            )
        if alphas:
            selected.append((group, alphas.pop()))
    unused = [g for g in alpha_by_glob if g not in used]
    if unused:
        raise ConfigError(
            f"SmoothQuant glob {unused[0]!r} matches no norm or the linears it feeds "
            "(input_layernorm -> q/k/v_proj, pre_feedforward_layernorm -> gate/up_proj)"
        )
    return selected


def _clamps_between(sides: Sequence[tuple[Any, str]]) -> str | None:
    """Why a per-channel rescale across these (wrapper, 'input'|'output') clamps is refused, or None."""
    reasons = [
        f"{w.module_name}: {reason}" for w, side in sides if (reason := clamp_reason(getattr(w, "source", None), side)) is not None
    ]
    if not reasons:
        return None
    return "; ".join(reasons) + ": the rescale would change the function wherever the clamp binds"


def apply_smoothquant(
    qmodel,
    batches: Sequence[Mapping[str, Any]],
    alpha_by_glob: Mapping[str, float],
    *,
    progress: Callable[..., None] | None = None,
    cancel=None,
) -> RemedyReport:
    """Rescale the linears matched by each glob (alpha per glob) and fold the inverse into the norm before them."""
    start = time.perf_counter()
    step = RemedyStep("smoothquant", tuple(alpha_by_glob), {"alpha_by_glob": {g: float(a) for g, a in alpha_by_glob.items()}})
    selected = _group_alphas(qmodel, alpha_by_glob)
    batches = list(batches)
    if not batches:
        raise ConfigError("SmoothQuant needs at least one calibration image for its activation statistics")
    skipped: dict[str, str] = {}
    smoothable = []
    for (norm_name, norm, linears), alpha in selected:
        why_not = _clamps_between([(w, "input") for _, w in linears]) if norm.with_scale else "the norm has no scale to fold into"
        if why_not is None:
            smoothable.append((norm_name, norm, linears, alpha))
        else:
            skipped[norm_name] = why_not
    # The linears of a group share one input, the norm's output: the first one's statistics serve all.
    firsts = {norm_name: linears[0][1] for norm_name, _, linears, _ in smoothable}
    stats = _input_statistics(qmodel, firsts, batches, progress, cancel) if smoothable else {}

    names = _parameter_names(qmodel)
    changed: list[str] = []
    parameters: list[str] = []
    groups: dict[str, Any] = {}
    input_absmax: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for norm_name, norm, linears, alpha in smoothable:
            x_max = stats[norm_name]
            weight = norm.source.weight
            w_max = torch.stack([w.linear.weight.detach().abs().amax(dim=0).cpu() for _, w in linears]).amax(dim=0)
            scale = (x_max.clamp(min=_MIN_SCALE).pow(alpha) / w_max.clamp(min=_MIN_SCALE).pow(1.0 - alpha)).clamp(min=_MIN_SCALE)
            scale = torch.where(x_max > 0, scale, torch.ones_like(scale))  # a dead channel keeps its scale
            weight.div_(scale.to(weight))
            parameters.append(names[id(weight)])
            for name, wrapper in linears:
                w = wrapper.linear.weight
                w.mul_(scale.to(w).unsqueeze(0))
                parameters.append(names[id(w)])
                input_absmax[name] = {"before": float(x_max.max()), "after": float((x_max / scale).max())}
            groups[norm_name] = {
                "alpha": alpha,
                "linears": [n for n, _ in linears],
                "scale_min": float(scale.min()),
                "scale_max": float(scale.max()),
                "input_absmax_before": float(x_max.max()),
                "input_absmax_after": float((x_max / scale).max()),
            }
            changed += [norm_name, *(n for n, _ in linears)]
    summary = {"parameters": parameters, "groups": groups, "input_absmax": input_absmax, "skipped": skipped}
    return RemedyReport(step=step, modules=changed, summary=summary, seconds=time.perf_counter() - start)


# --------------------------------------------------------------------------- cross-layer equalisation


def _spread(weight: torch.Tensor, dim: int) -> float:
    """max/min over channels of the weight's per-channel absmax (reduced over `dim`): 1 when equalised."""
    absmax = weight.detach().abs().amax(dim=dim)
    low = float(absmax.min())
    return float(absmax.max()) / low if low > 0 else math.inf


def _cle_pairs(qmodel, globs: Sequence[str]) -> tuple[list[tuple[str, Any]], dict[str, str]]:
    """MLPs whose up/down pair the globs select, and the attention blocks they select with why they are skipped."""
    pairs, skipped, used = [], {}, set()
    for layer in qmodel.encoder.layers:
        mlp, attn = layer.mlp, layer.self_attn
        hit = _matching(globs, [mlp.module_name, mlp.up_proj.module_name, mlp.down_proj.module_name])
        if hit:
            pairs.append((mlp.module_name, mlp))
        attn_hit = _matching(globs, [attn.v_proj.module_name, attn.o_proj.module_name])
        if attn_hit:
            skipped[attn.module_name] = _V_O_REASON
        used.update(hit + attn_hit)
    unused = [g for g in globs if g not in used]
    if unused:
        raise ConfigError(f"CLE glob {unused[0]!r} matches no mlp up_proj/down_proj pair")
    return pairs, skipped


def apply_cle(qmodel, globs: Sequence[str], *, progress: Callable[..., None] | None = None, cancel=None) -> RemedyReport:
    """Equalise weight ranges across consecutive linear pairs matched by the globs (function-preserving)."""
    from tico.quantization.algorithm.cle.cle import equalize_layer_pair  # noqa: PLC0415 -- tico is heavy to import

    start = time.perf_counter()
    globs = tuple(globs)
    step = RemedyStep("cle", globs, {})
    pairs, skipped = _cle_pairs(qmodel, globs)
    if cancel is not None:
        # Checked once, before any weight changes: the equalisation itself is a few tensor ops.
        cancel.raise_if_cancelled()
    names = _parameter_names(qmodel)
    changed: list[str] = []
    parameters: list[str] = []
    summary_pairs: dict[str, Any] = {}
    for done, (mlp_name, mlp) in enumerate(pairs, start=1):
        up, down = mlp.up_proj, mlp.down_proj
        why_not = _clamps_between([(up, "output"), (down, "input")])
        if why_not is not None:
            skipped[mlp_name] = why_not
            continue
        before = (_spread(up.linear.weight, 1), _spread(down.linear.weight, 0))
        scale = equalize_layer_pair(up.linear, down.linear, method="absmax")  # up rows * c, down columns / c
        after = (_spread(up.linear.weight, 1), _spread(down.linear.weight, 0))
        summary_pairs[mlp_name] = {
            "pair": [up.module_name, down.module_name],
            "scale_min": float(scale.min()),
            "scale_max": float(scale.max()),
            "up_row_absmax_spread": {"before": before[0], "after": after[0]},
            "down_column_absmax_spread": {"before": before[1], "after": after[1]},
        }
        parameters += [names[id(up.linear.weight)], names[id(down.linear.weight)]]
        changed += [up.module_name, down.module_name]
        if progress is not None:
            progress(done, len(pairs), f"equalised {mlp_name}")
    summary = {"parameters": parameters, "pairs": summary_pairs, "skipped": skipped}
    return RemedyReport(step=step, modules=changed, summary=summary, seconds=time.perf_counter() - start)
