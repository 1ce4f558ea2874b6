"""Export a PTQ config (or a set of overrides) for other toolchains.

Two formats:

- TICO ``PTQConfig`` (the installed ``tico`` 0.3 API: ``activation`` / ``weight`` role specs and
  a nested ``overrides`` tree keyed by module path, one leaf per *observer*), written as YAML.
  Leaves use the spec syntax of TICO's recipe configs (``{kind: affine, dtype: int16,
  qscheme: per_tensor_asymm, observer: minmax}``, ``{kind: no_quant}``), so the ``overrides``
  block also reads as a recipe ``raw_overrides`` block. ``tico_ptq_config_from_yaml`` turns the
  document into TICO's real ``PTQConfig`` object.
- ONE's ``one-quantize --quant_config`` / ``circle-quantizer --config`` JSON
  (``default_quantization_dtype``, ``default_granularity``, ``layers: [{names, dtype,
  granularity}]``; Samsung/ONE ``compiler/circle-quantizer/src/CircleQuantizer.cpp``).

Module names: ours mirror Hugging Face's module paths (``encoder.layers.1.self_attn.q_proj``)
and so do TICO's wrappers; what differs is where the observers sit (see ``TICO_OBSERVERS``):
TICO's clippable linears keep theirs one level down (``q_proj.linear.act_out``), TICO
observes module inputs (``act_in``) where we observe only outputs and intermediates, and
TICO's attention splits RoPE into more steps. A module's activation spec goes to every
TICO activation observer of that module (its ``act_in`` included), its weight spec to the
linear's ``weight``; RMSNorm scales take the activation spec per tensor, as in our wrappers.

ONE layer names are Circle tensor names. By default we emit our module names; pass
``name_map`` (our module name -> list of Circle tensor names, built from the exported graph)
to get names ONE can find.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from core.config import PTQConfig, QuantSpec
from core.errors import ConfigError, UnwritablePathError
from core.io import atomic_write_text

__all__ = [
    "TICO_OBSERVERS",
    "ONE_DTYPES",
    "gemma4_module_names",
    "module_kind",
    "tico_module_path",
    "tico_overrides",
    "to_tico_ptq_yaml",
    "write_tico_ptq_yaml",
    "tico_ptq_config_from_yaml",
    "tico_resolved_kwargs",
    "to_one_quant_config",
    "write_one_quant_config",
    "validate_one_quant_config",
]

ONE_DTYPES = ("uint8", "int16")  # what one-quantize / circle-quantizer accept per layer
ONE_GRANULARITIES = ("layer", "channel")

# TICO observer names per module kind (tico 0.3 Gemma 4 vision wrappers), with the role whose
# spec feeds each one: "a" = the module's activation spec, "w" = its weight spec,
# "n" = the activation spec per tensor (RMSNorm scales, as in our wrappers).
_ATTENTION = (
    "hidden cos sin q_x1 q_x2 q_neg q_cat k_x1 k_x2 k_neg k_cat q_cos q_sin q_rot k_cos k_sin k_rot "
    "attn_mask logits_raw scale logits mask_add softmax attn_out attn_weights attn_out_h"
).split()
TICO_OBSERVERS: dict[str, tuple[tuple[str, str], ...]] = {
    "root": tuple((n, "a") for n in ("last_hidden_state", "strip_padding", "minus_bias", "std_bias", "std_scale")),
    "patch_embedder": tuple(
        (n, "a") for n in ("position_embedding_table", "act_in", "hidden_states", "position_embeddings", "output")
    ),
    "linear": (("weight", "w"), ("act_in", "a"), ("act_out", "a")),
    "clippable_linear": (("weight", "w"), ("act_in", "a"), ("act_out", "a")),  # under "<name>.linear"
    "rmsnorm": (("weight", "n"), ("act_in", "a"), ("act_out", "a")),
    "encoder": tuple(
        (n, "a") for n in ("act_in", "attention_mask", "position_embeddings_cos", "position_embeddings_sin", "encoder_out")
    ),
    "layer": tuple((n, "a") for n in ("act_in", "attn_residual_out", "mlp_residual_out")),
    "attention": tuple((n, "a") for n in _ATTENTION),
    "mlp": (("gate_act", "a"), ("mul", "a")),
    "pooler": tuple(
        (n, "a") for n in ("act_in", "pool_in", "pool_weight", "root_hidden_size", "pool_matmul_out", "pool_out")
    ),
}

_PROJ = re.compile(r"(^|\.)(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$")
_NORM = re.compile(r"(_norm|_layernorm)$")
_LAYER = re.compile(r"^encoder\.layers\.\d+$")


def module_kind(name: str) -> str:
    """Our module name -> its kind in TICO_OBSERVERS (ConfigError if TICO has no such module)."""
    if name == "":
        return "root"
    if name in ("patch_embedder", "encoder", "pooler"):
        return name
    if name == "patch_embedder.input_proj":
        return "linear"
    if _PROJ.search(name):
        return "clippable_linear"
    if _NORM.search(name):
        return "rmsnorm"
    if _LAYER.match(name):
        return "layer"
    if name.endswith(".self_attn"):
        return "attention"
    if name.endswith(".mlp"):
        return "mlp"
    raise ConfigError(f"module {name!r} has no known TICO equivalent; export the config without it")


def tico_module_path(name: str) -> tuple[str, ...]:
    """TICO's override path of our module (its observers' parent)."""
    path = tuple(p for p in name.split(".") if p)
    return path + ("linear",) if module_kind(name) == "clippable_linear" else path


def gemma4_module_names(num_layers: int, standardize: bool = True) -> list[str]:
    """Our names of every module that owns observers in a Gemma4VisionModel, root ("") first.

    The root owns observers only when the model standardizes its output. Same set as
    ``{o.module_name for o in qmodel.observers()}``; use it to expand override globs
    without a model at hand.
    """
    names = ([""] if standardize else []) + ["patch_embedder", "patch_embedder.input_proj", "encoder"]
    for i in range(int(num_layers)):
        p = f"encoder.layers.{i}"
        names += [p, f"{p}.input_layernorm", f"{p}.self_attn"]
        for x in ("q", "k", "v"):
            names += [f"{p}.self_attn.{x}_proj", f"{p}.self_attn.{x}_norm"]
        names += [f"{p}.self_attn.o_proj", f"{p}.post_attention_layernorm", f"{p}.pre_feedforward_layernorm", f"{p}.mlp"]
        names += [f"{p}.mlp.{x}_proj" for x in ("gate", "up", "down")]
        names.append(f"{p}.post_feedforward_layernorm")
    names.append("pooler")
    return names


# ---------------------------------------------------------------------------------------------
# Common: config, module list, per-module resolution
# ---------------------------------------------------------------------------------------------


def _as_config(config_or_overrides: PTQConfig | Mapping[str, Any], base: PTQConfig | None) -> PTQConfig:
    if isinstance(config_or_overrides, PTQConfig):
        return config_or_overrides
    if isinstance(config_or_overrides, Mapping):
        base = base or PTQConfig()
        overrides = dict(base.overrides)
        for glob, value in config_or_overrides.items():
            overrides.pop(glob, None)
            overrides[glob] = value
        return replace(base, overrides=overrides)
    raise ConfigError(f"expected a PTQConfig or an overrides mapping, got {type(config_or_overrides).__name__}")


def _module_list(config: PTQConfig, modules: Sequence[str] | None, num_layers: int | None) -> list[str]:
    if modules is not None:
        return list(dict.fromkeys(["", *modules]))
    if num_layers is not None:
        return gemma4_module_names(num_layers)
    if not config.overrides:
        return []
    raise ConfigError(
        "cannot expand the override globs without the model's modules: pass num_layers= "
        "(the model's num_hidden_layers) or modules= (ABResult.module_names)"
    )


def _changed_modules(config: PTQConfig, names: Sequence[str]) -> list[str]:
    """Modules whose resolved specs differ from the config's role defaults."""
    default = (config.activation, config.weight)
    return [n for n in names if (config.spec_for(n, "activation"), config.spec_for(n, "weight")) != default]


# ---------------------------------------------------------------------------------------------
# TICO
# ---------------------------------------------------------------------------------------------

_QSCHEMES = {
    ("affine", False): "per_tensor_asymm",
    ("affine", True): "per_channel_asymm",
    ("symmetric", False): "per_tensor_symm",
    ("symmetric", True): "per_channel_symm",
}


def _tico_observer_fields(config: PTQConfig, role: str) -> dict[str, Any]:
    """Observer class name and its kwargs: activations use the config's observer, weights min-max."""
    if role == "w":
        return {"observer": "minmax"}
    if config.observer == "percentile":
        return {"observer": "percentile", "percentile": float(config.percentile)}
    if config.observer == "ema":
        if not 0.0 < config.ema_momentum < 1.0:
            raise ConfigError(f"ema_momentum {config.ema_momentum:g} cannot be written for TICO: its EMA observer needs 0 < m < 1")
        return {"observer": "ema", "momentum": float(config.ema_momentum)}
    return {"observer": "minmax"}


def _tico_leaf(spec: QuantSpec | None, config: PTQConfig, role: str, where: str) -> dict[str, Any]:
    if spec is None:
        return {"kind": "no_quant"}
    if role == "n":
        spec = replace(spec, per_channel=False)
    elif role == "a" and spec.per_channel:
        raise ConfigError(f"{where}: per-channel activations cannot be written for TICO; use a per-tensor activation spec")
    if spec.scheme == "symmetric" and not spec.dtype.startswith("int"):
        raise ConfigError(f"{where}: TICO rejects unsigned dtype {spec.dtype} with a symmetric scheme; use int8/int16 or affine")
    leaf: dict[str, Any] = {"kind": "affine", "dtype": spec.dtype, "qscheme": _QSCHEMES[(spec.scheme, spec.per_channel)]}
    leaf.update(_tico_observer_fields(config, "w" if role == "w" else "a"))
    return leaf


def tico_overrides(config: PTQConfig, names: Sequence[str]) -> dict[str, Any]:
    """Nested TICO override tree (plain data) for the given modules of ours."""
    tree: dict[str, Any] = {}
    for name in names:
        act = config.spec_for(name, "activation")
        wgt = config.spec_for(name, "weight")
        node = tree
        for part in tico_module_path(name):
            node = node.setdefault(part, {})
        for obs, role in TICO_OBSERVERS[module_kind(name)]:
            spec = wgt if role == "w" else act
            node[obs] = _tico_leaf(spec, config, role, f"{name or '<root>'}.{obs}")
    return tree


def to_tico_ptq_yaml(
    config_or_overrides: PTQConfig | Mapping[str, Any],
    *,
    base: PTQConfig | None = None,
    num_layers: int | None = None,
    modules: Sequence[str] | None = None,
    full: bool = False,
) -> str:
    """A YAML document describing TICO's PTQConfig for this config.

    ``config_or_overrides``: a PTQConfig, or override globs applied on top of ``base`` (default
    PTQConfig()). Globs are expanded against ``modules`` (our module names, e.g.
    ``ABResult.module_names``) or the standard module list of a ``num_layers``-layer model.
    Only modules whose specs differ from the role defaults get overrides unless ``full``
    (every observer written out: exact, but long). Raises ConfigError for what TICO cannot
    express (unsigned symmetric, per-channel activations, EMA momentum 0).
    """
    import yaml  # noqa: PLC0415 -- only the TICO YAML export needs it; kept off the CLI's startup

    config = _as_config(config_or_overrides, base)
    names = _module_list(config, modules, num_layers)
    selected = list(names) if full else _changed_modules(config, names)
    doc: dict[str, Any] = {
        "activation": _tico_leaf(config.activation, config, "a", "activation"),
        "weight": _tico_leaf(config.weight, config, "w", "weight"),
        "overrides": tico_overrides(config, selected),
    }
    kept_float = [n or "<root>" for n in selected if config.spec_for(n, "activation") is None]
    header = [
        "# TICO PTQConfig written by PTQ Studio (tico 0.3 API: activation / weight role specs and a",
        "# nested per-observer overrides tree). Build the object with",
        "# core.export.config_export.tico_ptq_config_from_yaml(text); the overrides block also reads as a",
        "# TICO recipe ptq stage's raw_overrides.",
        "# Module paths are Hugging Face's (= ours); TICO keeps a clippable linear's observers under",
        "# '<module>.linear'. A module's activation spec is given to all its TICO activation observers,",
        "# act_in included (TICO observes inputs, we do not).",
        "# Activation leaves carry the PTQ Studio observer (minmax / ema / percentile); weights use minmax.",
    ]
    if not full:
        header.append(
            "# Only modules that differ from the defaults are listed; TICO quantizes RMSNorm scales of the"
        )
        header.append(
            "# other modules with the weight role (per channel), PTQ Studio with the activation dtype per tensor."
        )
    if kept_float:
        header.append(
            f"# Kept in float (PTQ Studio 'float'): {', '.join(kept_float[:8])}"
            + (" ..." if len(kept_float) > 8 else "")
            + " -> {kind: no_quant} (TICO IdentityObserver) on each of their observers."
        )
    body = yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=120)
    return "\n".join(header) + "\n" + body


def write_tico_ptq_yaml(path: str | os.PathLike, config_or_overrides, **kwargs: Any) -> Path:
    """Write to_tico_ptq_yaml(...) atomically; returns the path."""
    return _write(path, to_tico_ptq_yaml(config_or_overrides, **kwargs))


def tico_ptq_config_from_yaml(text: str):
    """Build TICO's ``PTQConfig`` from a to_tico_ptq_yaml document.

    Adapter: parse the YAML, turn every spec leaf (a mapping with ``kind``) into a TICO
    ``QuantSpec`` with TICO's own recipe parser (``quant_spec_from_config``), stringify numeric
    path keys (YAML reads ``0:`` as an int), and pass ``activation``, ``weight`` and
    ``overrides`` to ``tico.quantization.config.ptq.PTQConfig``.
    """
    import yaml  # noqa: PLC0415 -- as in to_tico_ptq_yaml
    from tico.quantization.config.ptq import PTQConfig as TicoPTQConfig  # noqa: PLC0415 -- tico.quantization is loaded only when a TICO config is asked for
    from tico.quantization.recipes.utils import quant_spec_from_config  # noqa: PLC0415 -- as above

    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"not a YAML document ({' '.join(str(e).split())})") from None
    if not isinstance(data, Mapping):
        raise ConfigError("a TICO PTQ config must be a YAML mapping")
    unknown = set(data) - {"activation", "weight", "overrides"}
    if unknown:
        raise ConfigError(f"unknown TICO PTQ config keys {sorted(map(str, unknown))}; expected activation, weight, overrides")

    def spec(value: Any, where: str):
        try:
            return quant_spec_from_config(value)
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"{where}: {e}") from None

    def tree(node: Any, where: str) -> Any:
        if isinstance(node, Mapping) and "kind" not in node:
            return {str(k): tree(v, f"{where}.{k}") for k, v in node.items()}
        return spec(node, where)

    kwargs: dict[str, Any] = {}
    if "activation" in data:
        kwargs["activation"] = spec(data["activation"], "activation")
    if "weight" in data:
        kwargs["weight"] = spec(data["weight"], "weight")
    if data.get("overrides"):
        kwargs["overrides"] = tree(data["overrides"], "overrides")
    try:
        return TicoPTQConfig(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"TICO rejected the config: {' '.join(str(e).split())}") from None


def tico_resolved_kwargs(tico_config, observer_path: str) -> dict[str, Any]:
    """The override kwargs TICO's wrapper at ``observer_path``'s parent would read for it
    (walks ``PTQConfig.child`` scope by scope, as TICO's wrappers do)."""
    *scopes, leaf = [p for p in observer_path.split(".") if p]
    cfg = tico_config
    for scope in scopes:
        cfg = cfg.child(scope)
    return cfg.get_kwargs(leaf)


# ---------------------------------------------------------------------------------------------
# ONE
# ---------------------------------------------------------------------------------------------


def _one_dtype(spec: QuantSpec | None, where: str) -> str:
    if spec is None:
        raise ConfigError(f"{where}: ONE's quant_config cannot keep a layer in float; drop the 'float' override")
    if spec.dtype not in ONE_DTYPES:
        raise ConfigError(f"{where}: ONE quantizes layers to {' or '.join(ONE_DTYPES)} only, not {spec.dtype}")
    return spec.dtype


def _one_granularity(spec: QuantSpec | None) -> str:
    return "channel" if spec is not None and spec.per_channel else "layer"


def to_one_quant_config(
    config_or_overrides: PTQConfig | Mapping[str, Any],
    name_map: Mapping[str, Sequence[str]] | None = None,
    *,
    base: PTQConfig | None = None,
    num_layers: int | None = None,
    modules: Sequence[str] | None = None,
    model_path: str | None = None,
) -> dict[str, Any]:
    """ONE's ``--quant_config`` JSON (as a dict) for this config.

    The defaults come from the config's activation dtype and the weight granularity; each
    module whose dtype or granularity differs becomes a layer entry (grouped by dtype and
    granularity into ``names`` lists). Layer dtype = the module's activation dtype (ONE picks
    the weight dtype from it). Names: ours, or ``name_map[module]`` (Circle tensor names) when
    given. Raises ConfigError for keep-float, dtypes other than uint8/int16 and modules
    missing from name_map.
    """
    config = _as_config(config_or_overrides, base)
    default_dtype = _one_dtype(config.activation, "default activation")
    default_gran = _one_granularity(config.weight)
    names = _module_list(config, modules, num_layers)
    groups: dict[tuple[str, str], list[str]] = {}
    for name in names:
        act = config.spec_for(name, "activation")
        wgt = config.spec_for(name, "weight")
        dtype = _one_dtype(act, name or "<root>")
        gran = _one_granularity(wgt) if wgt is not None else default_gran
        if (dtype, gran) == (default_dtype, default_gran):
            continue
        if name_map is not None:
            if name not in name_map:
                raise ConfigError(
                    f"module {name or '<root>'!r} is not in name_map; add its Circle tensor names or drop its override"
                )
            tensors = [str(t) for t in name_map[name]]
        else:
            if name == "":
                raise ConfigError("the model root's own tensors differ from the default: pass name_map with key '' for them")
            tensors = [name]
        groups.setdefault((dtype, gran), []).extend(tensors)
    doc: dict[str, Any] = {
        "default_quantization_dtype": default_dtype,
        "default_granularity": default_gran,
        "layers": [
            {"names": list(dict.fromkeys(tensors)), "dtype": dtype, "granularity": gran}
            for (dtype, gran), tensors in groups.items()
        ],
    }
    if model_path is not None:
        doc["model_path"] = str(model_path)
    validate_one_quant_config(doc)
    return doc


def validate_one_quant_config(doc: Mapping[str, Any]) -> None:
    """Check a quant_config against the schema circle-quantizer reads; ConfigError if not."""
    if not isinstance(doc, Mapping):
        raise ConfigError("a ONE quant_config must be a JSON object")
    allowed = {"default_quantization_dtype", "default_granularity", "layers", "model_path"}
    unknown = set(doc) - allowed
    if unknown:
        raise ConfigError(f"unknown ONE quant_config keys {sorted(unknown)}")
    if doc.get("default_quantization_dtype") not in ONE_DTYPES:
        raise ConfigError(f"default_quantization_dtype must be one of {ONE_DTYPES}")
    if doc.get("default_granularity") not in ONE_GRANULARITIES:
        raise ConfigError(f"default_granularity must be one of {ONE_GRANULARITIES}")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise ConfigError("layers must be a list")
    for i, layer in enumerate(layers):
        if not isinstance(layer, Mapping):
            raise ConfigError(f"layers[{i}] must be an object")
        extra = set(layer) - {"name", "names", "dtype", "granularity", "alternate"}
        if extra:
            raise ConfigError(f"layers[{i}] has unknown keys {sorted(extra)}")
        has_name = isinstance(layer.get("name"), str) and layer["name"]
        names = layer.get("names")
        has_names = isinstance(names, list) and names and all(isinstance(n, str) and n for n in names)
        if not (has_name or has_names):
            raise ConfigError(f"layers[{i}] needs a non-empty 'name' or 'names'")
        if layer.get("dtype") not in ONE_DTYPES:
            raise ConfigError(f"layers[{i}].dtype must be one of {ONE_DTYPES}")
        if layer.get("granularity") not in ONE_GRANULARITIES:
            raise ConfigError(f"layers[{i}].granularity must be one of {ONE_GRANULARITIES}")


def one_name_map(tensor_modules: Mapping[str, str], modules: Sequence[str]) -> dict[str, list[str]]:
    """ONE layer names per module from an export's ``tensor_modules`` (Circle tensor -> module).

    Each module gets the Circle tensors produced inside its own scope (its children list their
    own), so a glob that covers a module and its children covers all of their tensors. Every
    module in ``modules`` gets an entry, empty when the export has no tensor of its own for it.
    """
    out: dict[str, list[str]] = {m: [] for m in modules}
    for tensor, module in tensor_modules.items():
        out.setdefault(module, []).append(str(tensor))
    return out


def write_one_quant_config(path: str | os.PathLike, config_or_overrides, name_map=None, **kwargs: Any) -> Path:
    """Write to_one_quant_config(...) as JSON atomically; returns the path."""
    doc = to_one_quant_config(config_or_overrides, name_map, **kwargs)
    return _write(path, json.dumps(doc, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------


def _write(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    if path.is_dir():
        raise UnwritablePathError(path, "a folder is in the way; give a file name")
    if not path.parent.is_dir():
        raise UnwritablePathError(path, f"folder {path.parent} does not exist")
    try:
        atomic_write_text(path, text)
    except OSError as e:
        raise UnwritablePathError(path, e.strerror or str(e)) from None
    return path
