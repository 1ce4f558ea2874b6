"""Build or load the Gemma 4 vision encoder (``transformers.Gemma4VisionModel``)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil
import torch
from safetensors import safe_open
from transformers import Gemma4VisionConfig, Gemma4VisionModel

from core.errors import ConfigError, ModelLoadError

__all__ = [
    "NORM_CONSUMERS",
    "SPECS",
    "VISION_TOWER_PREFIXES",
    "clamp_reason",
    "describe_model",
    "e2b_config",
    "inject_outliers",
    "load_model",
    "tiny_config",
]

# "tiny" and "e2b" are initialised to behave like a trained network (see _calm); the "-chaotic"
# variants keep the first release's initialisation, a stress model on which any rounding
# difference grows ~500x through the layers. "+outliers" adds trained-like activation outliers
# (inject_outliers) without changing the float function.
SPECS = ("tiny", "e2b", "tiny-chaotic", "e2b-chaotic", "tiny+outliers", "e2b+outliers")

# Where the vision tower's tensors live in a full Gemma 4 checkpoint
# (Gemma4ForConditionalGeneration.save_pretrained writes "model.vision_tower.";
# a bare Gemma4Model writes "vision_tower.").
VISION_TOWER_PREFIXES = ("model.vision_tower.", "vision_tower.")

# The largest soft-token budget the Gemma 4 image processor supports (1120) times the pooling
# kernel (3) is the longest possible side in patches (a 1-patch-high strip), so position ids
# never exceed 3359. The tiny model needs no more rows than that.
_TINY_POSITION_EMBEDDING_SIZE = 1120 * 3

_SEED = 20260401
_FIX_SPEC = f"pass one of {', '.join(SPECS)} or a folder written by save_pretrained()"

# Trained-like scales (see _calm). Attention logits q.k have a standard deviation of about
# _LOGIT_STD; each residual branch adds an update whose RMS is about _BRANCH_SCALE.
_LOGIT_STD = 2.0
_BRANCH_SCALE = 0.2


def tiny_config(**overrides: Any) -> Gemma4VisionConfig:
    """Return the small test configuration (real patch size 16 and pooling kernel 3)."""
    values: dict[str, Any] = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
        patch_size=16,
        pooling_kernel_size=3,
        position_embedding_size=_TINY_POSITION_EMBEDDING_SIZE,
        standardize=True,
    )
    values.update(overrides)
    return _eager(Gemma4VisionConfig(**values))


def e2b_config(**overrides: Any) -> Gemma4VisionConfig:
    """Return the default Gemma4VisionConfig (Gemma 4 E2B vision tower shapes: 16 layers, hidden 768)."""
    return _eager(Gemma4VisionConfig(**overrides))


def _eager(config: Gemma4VisionConfig) -> Gemma4VisionConfig:
    # The quant wrappers observe the attention probabilities, which only the eager path
    # materialises; NO_QUANT parity is measured against exactly this implementation.
    config._attn_implementation = "eager"  # noqa: SLF001 -- transformers reads the attention implementation from this config field
    return config


def load_model(spec: str | Path = "tiny") -> Gemma4VisionModel:
    """Return a float32 Gemma4VisionModel in eval mode with eager attention: a built-in name (SPECS) or a folder."""
    if isinstance(spec, str) and spec in SPECS:
        base, _, option = spec.partition("+")
        size, _, variant = base.partition("-")
        config = tiny_config() if size == "tiny" else e2b_config()
        model = build_seeded_model(config, calm=variant != "chaotic")
        if option == "outliers":
            inject_outliers(model)
        model.config.name_or_path = spec
        return model
    return _load_folder(Path(spec))


def build_seeded_model(config: Gemma4VisionConfig, seed: int = _SEED, calm: bool = True) -> Gemma4VisionModel:
    """Build a model whose every parameter and buffer is set from ``seed`` (global RNG untouched).

    `calm` (default) gives it a trained network's scales; False keeps the chaotic first release.
    """
    model = _empty_model(config)
    _seeded_init(model, torch.Generator().manual_seed(seed))
    if calm:
        _calm(model)
    return model.eval()


def describe_model(model: Gemma4VisionModel) -> dict[str, Any]:
    """Return name, parameter count, layer count and hidden size of a vision model."""
    config = model.config
    return {
        "name": getattr(config, "_name_or_path", "") or type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": int(config.num_hidden_layers),
        "hidden_size": int(config.hidden_size),
    }


# --------------------------------------------------------------------------- construction


def _empty_model(config: Gemma4VisionConfig) -> Gemma4VisionModel:
    """Allocate the model without running any initialiser (they would use the global RNG)."""
    _eager(config)
    with torch.device("meta"):
        model = Gemma4VisionModel(config)
    model = model.to_empty(device="cpu").float()
    # to_empty leaves the non-persistent RoPE buffers as garbage; they are pure functions of
    # the config, so recompute them exactly as transformers does.
    for module in model.modules():
        if hasattr(module, "compute_axial_rope_parameters") and hasattr(module, "inv_freq"):
            inv_freq, _ = module.compute_axial_rope_parameters(module.config)
            with torch.no_grad():
                module.inv_freq.copy_(inv_freq)
                module.original_inv_freq.copy_(inv_freq)
    model.config._attn_implementation = "eager"  # noqa: SLF001 -- transformers reads the attention implementation from this config field
    return model


@torch.no_grad()
def _seeded_init(model: Gemma4VisionModel, gen: torch.Generator) -> None:
    """Fill every tensor so the model is deterministic and numerically non-trivial."""
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("position_embedding_table"):
            param.normal_(0.0, 0.5, generator=gen)
        elif leaf == "weight" and param.dim() == 2:
            # 1/sqrt(fan_in) keeps activations O(1) through the layers, so quantization
            # error is visible instead of drowned in tiny values.
            param.normal_(0.0, 1.0 / math.sqrt(param.shape[1]), generator=gen)
        elif leaf == "weight" and param.dim() == 1:
            # RMSNorm scales: around 1 but not all equal, so per-channel ranges differ.
            param.uniform_(0.5, 1.5, generator=gen)
        else:
            raise RuntimeError(f"no seeded initialiser for parameter {name} {tuple(param.shape)}")
    for name, buf in model.named_buffers():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("inv_freq", "original_inv_freq"):
            continue  # recomputed from the config in _empty_model
        if leaf == "std_bias":
            buf.normal_(0.0, 0.5, generator=gen)
        elif leaf == "std_scale":
            buf.uniform_(0.5, 1.5, generator=gen)
        elif leaf in ("input_min", "output_min"):
            buf.fill_(-float(torch.empty(()).uniform_(4.0, 8.0, generator=gen)))
        elif leaf in ("input_max", "output_max"):
            buf.fill_(float(torch.empty(()).uniform_(4.0, 8.0, generator=gen)))
        else:
            raise RuntimeError(f"no seeded initialiser for buffer {name} {tuple(buf.shape)}")


@torch.no_grad()
def _calm(model: Gemma4VisionModel) -> None:
    """Rescale norm weights so the random network behaves like a trained vision transformer.

    With the raw draw every q/k norm scale is ~1 and attention has no 1/sqrt(d) (Gemma 4's
    scaling is 1.0): logits of std sqrt(head_dim) make softmax nearly one-hot, and each post-branch
    norm (scales ~1) rewrites the residual stream. Such a network amplifies a 1e-3 input change
    ~500x on e2b, so every quantization figure measures chaos. Trained towers have moderate logits
    and small residual updates; here q/k norm scales become ~(_LOGIT_STD^2 / head_dim)^(1/4) and
    post-branch norm scales ~_BRANCH_SCALE, keeping the per-channel variety of the draw. Measured
    figures (input-noise gain, update/residual ratios, uint8 SQNR) are in the README's Models section.
    """
    head_dim = int(model.config.head_dim)
    qk = math.sqrt(_LOGIT_STD) * head_dim**-0.25
    for layer in model.encoder.layers:
        layer.self_attn.q_norm.weight.mul_(qk)
        layer.self_attn.k_norm.weight.mul_(qk)
        layer.post_attention_layernorm.weight.mul_(_BRANCH_SCALE)
        layer.post_feedforward_layernorm.weight.mul_(_BRANCH_SCALE)


# --------------------------------------------------------------------------- activation outliers

# Which norm feeds which linears in a Gemma4VisionEncoderLayer (post_attention_layernorm and
# post_feedforward_layernorm feed the residual sum, not a linear, so they cannot carry a fold).
NORM_CONSUMERS = {
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "pre_feedforward_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
}
# Trained vision transformers carry a handful of "massive activation" channels, the same ones in
# every layer, 20-100x the others (Sun et al. 2024; Darcet et al. 2024).
_OUTLIER_FACTORS = (20.0, 100.0)
_OUTLIER_SHARE = 128  # one outlier channel per this many hidden channels, at least 2


def clamp_reason(linear: torch.nn.Module | None, side: str = "input") -> str | None:
    """Why a per-channel rescale across a Gemma4ClippableLinear's `side` ('input' or 'output') clamp may
    not be function-preserving, or None when there is no finite clamp.

    The clamp is one scalar range for every channel: clamp(k*x_j) != k*clamp(x_j) once it binds, so
    moving a channel's scale across it changes the function.
    """
    if linear is None or not getattr(linear, "use_clipped_linears", False):
        return None
    bounds = (float(getattr(linear, f"{side}_min")), float(getattr(linear, f"{side}_max")))
    if all(math.isinf(b) for b in bounds):
        return None
    return f"its {side} clamp [{bounds[0]:.3g}, {bounds[1]:.3g}] is one scalar range for every channel"


@torch.no_grad()
def inject_outliers(model: Gemma4VisionModel, seed: int = _SEED + 1) -> dict[str, dict[int, float]]:
    """Give a few hidden channels large activations without changing the float function (seeded).

    Each chosen channel j of every layer's input and pre-feedforward RMSNorm scale becomes 20-100 times
    the norm's largest scale (a factor k_j) and column j of every linear that norm feeds is divided by k_j. Gemma 4's
    RMSNorm multiplies by its weight itself (``normed * w``, not ``1 + w``), so the norm output's
    channel j is exactly k_j times larger and the linears see the same product. Returns
    {norm parameter name: {channel: factor}}. Refuses (ModelLoadError) linears with finite input
    clamps, where the rescale would not be function-preserving (ConfigError).
    """
    hidden = int(model.config.hidden_size)
    gen = torch.Generator().manual_seed(seed)
    count = max(2, hidden // _OUTLIER_SHARE)
    channels = sorted(int(c) for c in torch.randperm(hidden, generator=gen)[:count])
    low, high = _OUTLIER_FACTORS
    injected: dict[str, dict[int, float]] = {}
    for index, layer in enumerate(model.encoder.layers):
        for norm_name, consumers in NORM_CONSUMERS.items():
            linears = [layer.get_submodule(c) for c in consumers]
            for name, linear in zip(consumers, linears):
                reason = clamp_reason(linear)
                if reason is not None:
                    raise ConfigError(
                        f"cannot inject outliers before encoder.layers.{index}.{name}: {reason}; use a model without clipped linears"
                    )
            norm = getattr(layer, norm_name).weight
            # Relative to the norm's largest scale, so the outlier stands out whatever the drawn scale was.
            targets = (low + (high - low) * torch.rand(count, generator=gen)) * norm.abs().max()
            scale = torch.ones(hidden)
            scale[channels] = targets / norm[channels].abs()
            norm.mul_(scale)
            for linear in linears:
                linear.linear.weight.div_(scale)
            injected[f"encoder.layers.{index}.{norm_name}.weight"] = {c: float(scale[c]) for c in channels}
    return injected


# --------------------------------------------------------------------------- checkpoints


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(path, f"unreadable JSON ({exc})", "re-save the checkpoint with save_pretrained()") from None
    if not isinstance(data, dict):
        raise ModelLoadError(path, "expected a JSON object", "re-save the checkpoint with save_pretrained()")
    return data


def _vision_config_from(folder: Path) -> tuple[Gemma4VisionConfig, bool]:
    """Return the vision config and whether the folder is a full Gemma 4 checkpoint."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(config_file, "missing config.json", "save the model with save_pretrained()")
    raw = _read_json(config_file)
    model_type = raw.get("model_type")
    if model_type == "gemma4_vision":
        vision, full = raw, False
    elif model_type == "gemma4":
        vision, full = raw.get("vision_config"), True
        if not isinstance(vision, dict):
            raise ModelLoadError(config_file, "this Gemma 4 checkpoint has no vision_config", "use a checkpoint with a vision tower")
    else:
        raise ModelLoadError(
            config_file,
            f"model_type {model_type!r} is not a Gemma 4 model",
            "expected 'gemma4_vision' (Gemma4VisionModel) or 'gemma4' (full Gemma 4 checkpoint)",
        )
    values = {k: v for k, v in vision.items() if k not in ("architectures", "transformers_version", "model_type")}
    try:
        config = Gemma4VisionConfig(**values)
    except Exception as exc:  # transformers validates fields strictly and raises various types
        raise ModelLoadError(config_file, f"invalid vision config ({exc})", "re-save the checkpoint with save_pretrained()") from None
    _check_config_sizes(config, config_file)
    return _eager(config), full


# Size fields of Gemma4VisionConfig that must be positive whole numbers.
_SIZE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "patch_size",
    "pooling_kernel_size",
    "position_embedding_size",
)


def _check_config_sizes(config: Gemma4VisionConfig, config_file: Path) -> None:
    for name in _SIZE_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelLoadError(
                config_file, f"{name} is {value!r}, not a positive whole number", "fix config.json or re-save the checkpoint"
            )


def config_parameter_count(config: Gemma4VisionConfig) -> int:
    """Elements of the vision model's weight matrices and tables (a lower bound of its parameters), from the config alone."""
    h, inter, head = config.hidden_size, config.intermediate_size, config.head_dim
    attention = (2 * config.num_attention_heads + 2 * config.num_key_value_heads) * head * h
    layer = attention + 3 * h * inter
    embed = 2 * config.position_embedding_size * h + 3 * config.patch_size**2 * h
    return config.num_hidden_layers * layer + embed


def _check_fits(config: Gemma4VisionConfig, folder: Path, files: dict[str, Path]) -> None:
    """Refuse a config whose model could not match the weights or fit in memory, before allocating it."""
    elements = config_parameter_count(config)
    on_disk = sum(p.stat().st_size for p in set(files.values()))
    # Every stored element takes at least one byte, whatever its dtype.
    if elements > on_disk:
        raise ModelLoadError(
            folder / "config.json",
            f"the config describes at least {elements:,} vision parameters but the weight files hold only {on_disk:,} bytes",
            "check that config.json matches the weights",
        )
    need, have = 4 * elements, psutil.virtual_memory().total
    if need > have:
        raise ModelLoadError(
            folder / "config.json",
            f"the vision model needs {need / 2**30:.1f} GiB as float32 but this machine has {have / 2**30:.1f} GiB",
            "use a machine with more memory",
        )


def _weight_files(folder: Path) -> dict[str, Path]:
    """Map every tensor key to the safetensors file that holds it."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(index, "no weight_map in the index", "re-save the checkpoint with save_pretrained()")
        root = folder.resolve()
        for name in set(weight_map.values()):
            # Plain names only: a shard elsewhere would be loaded without being in the checkpoint hash.
            if not isinstance(name, str) or Path(name).name != name or (folder / name).resolve().parent != root:
                raise ModelLoadError(
                    index,
                    f"shard {name!r} is not a file of the checkpoint folder",
                    "keep every shard in the folder, listed by file name",
                )
        files = {key: folder / name for key, name in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise ModelLoadError(shard, "shard listed in model.safetensors.index.json is missing", "copy the whole checkpoint folder")
        return files
    single = folder / "model.safetensors"
    if not single.is_file():
        others = sorted(p.name for p in folder.glob("*.safetensors"))
        if len(others) == 1:
            single = folder / others[0]
        else:
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            if pickles:
                raise ModelLoadError(
                    folder / pickles[0],
                    "pickle checkpoints are refused, only safetensors are loaded",
                    "re-save with save_pretrained(..., safe_serialization=True)",
                )
            raise ModelLoadError(folder / "model.safetensors", "no safetensors weights found", "save the model with save_pretrained()")
    try:
        with safe_open(str(single), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ModelLoadError(single, f"not a readable safetensors file ({exc})", "re-save the checkpoint") from None
    return {key: single for key in keys}


def _vision_prefix(keys: Iterable[str], full: bool, folder: Path) -> str:
    if not full:
        return ""
    keys = list(keys)
    for prefix in VISION_TOWER_PREFIXES:
        if any(k.startswith(prefix) for k in keys):
            return prefix
    raise ModelLoadError(folder, "no vision tower tensors in this Gemma 4 checkpoint", "use a checkpoint that includes the vision tower")


def _load_folder(folder: Path) -> Gemma4VisionModel:
    """Load a Gemma4VisionModel, or only the vision tower of a full Gemma 4 checkpoint."""
    if not folder.exists():
        raise ModelLoadError(folder, "folder does not exist", _FIX_SPEC)
    if not folder.is_dir():
        raise ModelLoadError(folder, "not a folder", _FIX_SPEC)
    config, full = _vision_config_from(folder)
    files = _weight_files(folder)
    prefix = _vision_prefix(files, full, folder)
    _check_fits(config, folder, files)

    model = _empty_model(config)
    expected = model.state_dict()
    available = {key[len(prefix):]: (key, path) for key, path in files.items() if key.startswith(prefix)}

    missing = sorted(set(expected) - set(available))
    if missing:
        where = files[next(iter(files))] if files else folder
        raise ModelLoadError(where, f"{len(missing)} vision tensors missing, e.g. {prefix}{missing[0]}", "re-save the complete model")
    unexpected = sorted(set(available) - set(expected))
    if unexpected:
        key, path = available[unexpected[0]]
        raise ModelLoadError(path, f"{len(unexpected)} unexpected vision tensors, e.g. {key}", "check that config.json matches the weights")

    # Group by file so each shard is opened once; only vision keys are ever read, so the
    # language model's weights never reach memory.
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        key, path = available[name]
        by_file.setdefault(path, []).append(name)
    state: dict[str, torch.Tensor] = {}
    for path, names in by_file.items():
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in names:
                    key = prefix + name
                    shape = tuple(handle.get_slice(key).get_shape())
                    if shape != tuple(expected[name].shape):
                        raise ModelLoadError(
                            path,
                            f"tensor {key} has shape {list(shape)}, the config needs {list(expected[name].shape)}",
                            "check that config.json matches the weights",
                        )
                    state[name] = handle.get_tensor(key).to(torch.float32)
        except ModelLoadError:
            raise
        except Exception as exc:  # corrupt or truncated safetensors data
            raise ModelLoadError(path, f"cannot read tensors ({exc})", "re-save the checkpoint") from None

    model.load_state_dict(state, strict=True)
    non_finite = [name for name, tensor in state.items() if not torch.isfinite(tensor).all() and not name.endswith(("_min", "_max"))]
    if non_finite:
        key, path = available[non_finite[0]]
        raise ModelLoadError(path, f"tensor {key} holds NaN or infinite values", "use a valid checkpoint")
    model.config.name_or_path = str(folder)
    return model.eval()
