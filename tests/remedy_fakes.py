"""Stand-ins for the remedy algorithms (being written beside the session work) that really change
the model: rounding gives matched linears rounded copies on their pinned grid, smoothing scales them,
mixed precision widens matched modules' activations without recalibrating. The session, CLI and
GUI tests install them with `install(monkeypatch)`; the real remedies get end-to-end tests."""

from __future__ import annotations

from dataclasses import replace

import torch

from core.config import PTQConfig
from core.quant.dtypes import get_dtype
from core.remedies import mixed, rounding, smoothing
from core.remedies.plan import RemedyReport, RemedyStep

SUFFIX = ".linear.weight"


def matched_linears(qmodel, globs) -> list[tuple[str, str]]:
    """(wrapper module name, qualified weight name) of every linear a glob matches."""
    out = []
    for name, _ in qmodel.source.named_parameters():
        module = name.removesuffix(SUFFIX)
        if name.endswith(SUFFIX) and any(PTQConfig.matches(g, module) for g in globs):
            out.append((module, name))
    return out


def _refresh(qmodel) -> None:
    for wrapper in qmodel.quant_modules():
        wrapper.cache_weights()


def fake_rounding(qmodel, batches, globs, method="gptq", *, progress=None, cancel=None, **options) -> RemedyReport:
    """Round the matched linears' weights DOWN onto their frozen grid and pin it, as GPTQ does through
    QuantLinear.pin_weight: other codes than nearest rounding, float weights untouched."""
    wrappers = dict(qmodel.wrappers())
    hits = matched_linears(qmodel, globs)
    for i, (module, _) in enumerate(hits):
        if cancel is not None:
            cancel.raise_if_cancelled(method)
        wrapper = wrappers[module]
        obs = wrapper.obs_weight
        step = obs.scale.reshape(-1, *([1] * (wrapper.linear.weight.dim() - 1)))
        wrapper.pin_weight(torch.floor(wrapper.linear.weight.detach() / step) * step, obs.scale.clone(), obs.zero_point.clone())
        if progress is not None:
            progress(i + 1, len(hits), module)
    _refresh(qmodel)
    step = RemedyStep(method, tuple(globs), options)
    return RemedyReport(step, [m for m, _ in hits], {"parameters": [], "rounded": [m for m, _ in hits]})


def fake_smoothquant(qmodel, batches, alpha_by_glob, *, progress=None, cancel=None) -> RemedyReport:
    """Scale the matched linears' weights by (1 + alpha)."""
    params = dict(qmodel.source.named_parameters())
    hits = []
    with torch.no_grad():
        for glob, alpha in alpha_by_glob.items():
            for module, name in matched_linears(qmodel, [glob]):
                params[name].mul_(1.0 + alpha)
                hits.append((module, name))
    _refresh(qmodel)
    step = RemedyStep("smoothquant", tuple(alpha_by_glob), {"alphas": dict(alpha_by_glob)})
    return RemedyReport(step, [m for m, _ in hits], {"parameters": [n for _, n in hits]})


def fake_cle(qmodel, globs, *, progress=None, cancel=None) -> RemedyReport:
    """Halve the matched linears' weights."""
    params = dict(qmodel.source.named_parameters())
    hits = matched_linears(qmodel, globs)
    with torch.no_grad():
        for _, name in hits:
            params[name].mul_(0.5)
    _refresh(qmodel)
    return RemedyReport(RemedyStep("cle", tuple(globs)), [m for m, _ in hits], {"parameters": [n for _, n in hits]})


def fake_apply_point(qmodel, config, point) -> PTQConfig:
    """The point's dtypes on the calibrated model, statistics kept, qparams recomputed."""
    new = replace(config, overrides={**dict(config.overrides), **point.overrides})
    qmodel.ctx.config = new
    for obs in qmodel.observers():
        spec = new.spec_for(obs.module_name, "activation")
        if obs.kind == "activation" and spec is not None and spec.dtype != obs.spec.dtype:
            obs.spec = replace(obs.spec, dtype=spec.dtype)
            obs.qdtype = get_dtype(spec.dtype)
            obs.compute_qparams()
    _refresh(qmodel)
    return new


POINTS = [
    mixed.ParetoPoint({"encoder.layers.0.mlp": "int16"}, cost_bytes=1000, wide_ops=3, sqnr_db=30.0),
    mixed.ParetoPoint({"encoder.layers.0": "int16"}, cost_bytes=1500, wide_ops=9, sqnr_db=33.0),
    mixed.ParetoPoint({"encoder.layers.0": "int16"}, cost_bytes=1500, wide_ops=9, sqnr_db=33.0, origin="greedy"),
]


def fake_search(qmodel, config, batches, *, target_sqnr_db=None, within_db_of_int16=None, progress=None, cancel=None):
    """Two points tried; the cheaper one is chosen."""
    target = {"target_sqnr_db": target_sqnr_db, "within_db_of_int16": within_db_of_int16}
    return mixed.MixedPrecisionResult(target=target, points=list(POINTS[:2]), chosen=POINTS[0], greedy=POINTS[2])


def install(monkeypatch) -> None:
    """Replace every remedy algorithm with its fake."""
    monkeypatch.setattr(rounding, "apply_weight_rounding", fake_rounding)
    monkeypatch.setattr(smoothing, "apply_smoothquant", fake_smoothquant)
    monkeypatch.setattr(smoothing, "apply_cle", fake_cle)
    monkeypatch.setattr(mixed, "search_mixed_precision", fake_search)
    monkeypatch.setattr(mixed, "apply_mixed_point", fake_apply_point, raising=False)
