"""core.models: seeded built-in models, checkpoint folders, and every load failure."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
    Gemma4VisionModel,
)

import core.models as models
from core.errors import ModelLoadError
from core.models import describe_model, load_model, tiny_config


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _positions(width: int, height: int, pad_to: int) -> torch.Tensor:
    grid = torch.stack(torch.meshgrid(torch.arange(width), torch.arange(height), indexing="xy"), -1).reshape(-1, 2)
    pad = torch.full((pad_to - grid.shape[0], 2), -1)
    return torch.cat([grid, pad]).unsqueeze(0)


@pytest.fixture(scope="module")
def tiny() -> Gemma4VisionModel:
    return load_model("tiny")


def test_tiny_is_deterministic_and_leaves_global_rng_alone(tiny: Gemma4VisionModel) -> None:
    state = torch.random.get_rng_state()
    again = load_model()
    assert torch.equal(state, torch.random.get_rng_state())
    _assert_same_state(tiny, again)


def test_tiny_shape_and_mode(tiny: Gemma4VisionModel) -> None:
    config = tiny.config
    assert not tiny.training
    assert config._attn_implementation == "eager"
    assert (config.patch_size, config.pooling_kernel_size, config.standardize) == (16, 3, True)
    assert config.hidden_size == 64 and config.num_hidden_layers >= 2
    # The widest 1120-soft-token image is 1120*3 patches long; its positions must fit.
    assert config.position_embedding_size >= 1120 * 3
    assert all(t.dtype == torch.float32 for t in tiny.state_dict().values())
    assert describe_model(tiny) == {
        "name": "tiny",
        "parameters": sum(p.numel() for p in tiny.parameters()),
        "layers": config.num_hidden_layers,
        "hidden_size": 64,
    }


def test_every_tensor_is_set_finite_and_non_trivial(tiny: Gemma4VisionModel) -> None:
    for name, tensor in list(tiny.named_parameters()) + list(tiny.named_buffers()):
        assert torch.isfinite(tensor).all(), name
        if tensor.numel() > 1 and "inv_freq" not in name:
            assert tensor.std() > 0, f"{name} is constant"
    # HF allocates these with torch.empty; they must be set, not left as whatever memory held.
    assert tiny.std_bias.abs().max() > 0 and (tiny.std_scale > 0).all()
    assert not torch.equal(tiny.std_scale, torch.ones_like(tiny.std_scale))


def test_rope_buffers_match_transformers(tiny: Gemma4VisionModel) -> None:
    reference = Gemma4VisionModel(tiny.config)
    assert torch.equal(reference.encoder.rotary_emb.inv_freq, tiny.encoder.rotary_emb.inv_freq)
    assert torch.equal(reference.encoder.rotary_emb.original_inv_freq, tiny.encoder.rotary_emb.original_inv_freq)


def test_tiny_forward_is_finite_and_varied(tiny: Gemma4VisionModel) -> None:
    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 630, 768, generator=gen)
    out = tiny(pixel_values=pixels, pixel_position_ids=_positions(12, 12, 630)).last_hidden_state
    assert out.shape == (16, 64)
    assert torch.isfinite(out).all() and out.std() > 0.1


def test_clipped_linear_variant_gets_finite_bounds() -> None:
    model = models.build_seeded_model(tiny_config(use_clipped_linears=True))
    bounds = {n: b for n, b in model.named_buffers() if n.endswith(("_min", "_max"))}
    assert bounds and all(torch.isfinite(b) for b in bounds.values())


def test_e2b_shapes() -> None:
    model = load_model("e2b")
    info = describe_model(model)
    assert info["layers"] == 16 and info["hidden_size"] == 768 and info["name"] == "e2b"
    assert len(model.encoder.layers) == 16
    assert model.config._attn_implementation == "eager"
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())
    assert model.patch_embedder.position_embedding_table.std() > 0


def test_unknown_spec_is_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("tinyy")


# --------------------------------------------------------------------------- checkpoints


def test_vision_checkpoint_round_trip(tmp_path: Path, tiny: Gemma4VisionModel) -> None:
    tiny.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    _assert_same_state(tiny, loaded)
    assert loaded.config._attn_implementation == "eager" and not loaded.training
    assert describe_model(loaded)["name"] == str(tmp_path)


def _tiny_full_model() -> Gemma4ForConditionalGeneration:
    text = Gemma4TextConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size_per_layer_input=128,
        hidden_size_per_layer_input=8,
        layer_types=["full_attention"],
    )
    vision = tiny_config(num_hidden_layers=1, position_embedding_size=64)
    full = Gemma4ForConditionalGeneration(Gemma4Config(text_config=text, vision_config=vision, audio_config=None))
    with torch.no_grad():
        # Distinct values so a wrong tensor mapping cannot pass by accident.
        for i, tensor in enumerate(full.state_dict().values()):
            tensor.copy_(torch.linspace(-1, 1, tensor.numel()).reshape(tensor.shape) * (i + 1))
    return full


@pytest.mark.parametrize("shard", [False, True])
def test_full_checkpoint_reads_only_the_vision_tower(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shard: bool) -> None:
    full = _tiny_full_model()
    full.save_pretrained(tmp_path, max_shard_size="20KB" if shard else "5GB")
    assert (tmp_path / "model.safetensors.index.json").is_file() == shard

    read: list[str] = []
    real_safe_open = models.safe_open

    class SpyHandle:
        def __init__(self, handle: object) -> None:
            self._handle = handle

        def __enter__(self) -> "SpyHandle":
            self._handle.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self._handle.__exit__(*exc)

        def get_tensor(self, key: str) -> torch.Tensor:
            read.append(key)
            return self._handle.get_tensor(key)

        def __getattr__(self, name: str) -> object:
            return getattr(self._handle, name)

    monkeypatch.setattr(models, "safe_open", lambda *a, **k: SpyHandle(real_safe_open(*a, **k)))
    loaded = load_model(tmp_path)

    assert read and all(key.startswith("model.vision_tower.") for key in read)
    _assert_same_state(full.model.vision_tower, loaded)
    assert loaded.config._attn_implementation == "eager"


def _saved_tiny(tmp_path: Path, tiny: Gemma4VisionModel) -> Path:
    folder = tmp_path / "ckpt"
    tiny.save_pretrained(folder)
    return folder


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        load_model(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(info.value)


def test_missing_config(tmp_path: Path, tiny: Gemma4VisionModel) -> None:
    folder = _saved_tiny(tmp_path, tiny)
    (folder / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json") as info:
        load_model(folder)
    assert info.value.path == folder / "config.json"


def test_not_gemma4(tmp_path: Path, tiny: Gemma4VisionModel) -> None:
    folder = _saved_tiny(tmp_path, tiny)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "siglip_vision_model"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="siglip_vision_model.*not a Gemma 4") as info:
        load_model(folder)
    assert "config.json" in str(info.value)


def test_no_weights(tmp_path: Path, tiny: Gemma4VisionModel) -> None:
    folder = _saved_tiny(tmp_path, tiny)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no safetensors") as info:
        load_model(folder)
    assert "model.safetensors" in str(info.value)


def test_pickle_weights_are_refused(tmp_path: Path, tiny: Gemma4VisionModel) -> None:
    folder = _saved_tiny(tmp_path, tiny)
    (folder / "model.safetensors").unlink()
    torch.save(tiny.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle") as info:
        load_model(folder)
    assert "pytorch_model.bin" in str(info.value)


def test_missing_tensor(tmp_path: Path, tiny: Gemma4VisionModel) -> None:
    folder = _saved_tiny(tmp_path, tiny)
    state = {k: v for k, v in tiny.state_dict().items() if k != "std_scale"}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="missing.*std_scale") as info:
        load_model(folder)
    assert "model.safetensors" in str(info.value)


def test_misshaped_tensor(tmp_path: Path, tiny: Gemma4VisionModel) -> None:
    folder = _saved_tiny(tmp_path, tiny)
    state = dict(tiny.state_dict())
    state["std_bias"] = torch.zeros(65)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"std_bias has shape \[65\].*\[64\]") as info:
        load_model(folder)
    assert "model.safetensors" in str(info.value)


def test_unexpected_tensor(tmp_path: Path, tiny: Gemma4VisionModel) -> None:
    folder = _saved_tiny(tmp_path, tiny)
    state = dict(tiny.state_dict())
    state["encoder.layers.9.extra.weight"] = torch.zeros(2)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="unexpected.*layers.9"):
        load_model(folder)


def test_corrupt_safetensors(tmp_path: Path, tiny: Gemma4VisionModel) -> None:
    folder = _saved_tiny(tmp_path, tiny)
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="safetensors") as info:
        load_model(folder)
    assert "model.safetensors" in str(info.value)


def test_missing_shard(tmp_path: Path) -> None:
    full = _tiny_full_model()
    full.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / victim).unlink()
    with pytest.raises(ModelLoadError, match="shard.*missing") as info:
        load_model(tmp_path)
    assert victim in str(info.value)


def test_full_checkpoint_without_vision(tmp_path: Path) -> None:
    full = _tiny_full_model()
    full.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["vision_config"] = None
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="no vision_config"):
        load_model(tmp_path)


def test_a_file_is_not_a_folder(tmp_path: Path) -> None:
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a folder"):
        load_model(file)


def test_copy_of_folder_loads(tmp_path: Path, tiny: Gemma4VisionModel) -> None:
    folder = _saved_tiny(tmp_path, tiny)
    copy = shutil.copytree(folder, tmp_path / "copy")
    _assert_same_state(tiny, load_model(str(copy)))


# --------------------------------------------------------------------------- trained-like behaviour
def _behaviour(model: Gemma4VisionModel, image: Path, tokens: int = 70) -> tuple[float, list[float]]:
    """(input-noise gain, per-layer update/residual norm ratios) on one photo.

    Gain: relative L2 change of the output when the pixel values are multiplied by
    (1 + 1e-3 * N(0, 1)), divided by 1e-3.
    """
    from core.data.images import ImagePreprocessor

    batch = ImagePreprocessor(model.config, max_soft_tokens=tokens)([image])
    ratios: list[float] = []

    def hook(module, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        ratios.append(float((out - x).norm() / x.norm()))

    handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in model.encoder.layers]
    try:
        with torch.no_grad():
            clean = model(**batch).last_hidden_state
    finally:
        for h in handles:
            h.remove()
    gen = torch.Generator().manual_seed(1)
    noisy_pixels = batch["pixel_values"] * (1 + 1e-3 * torch.randn(batch["pixel_values"].shape, generator=gen))
    with torch.no_grad():
        noisy = model(pixel_values=noisy_pixels, pixel_position_ids=batch["pixel_position_ids"]).last_hidden_state
    return float((noisy - clean).norm() / clean.norm()) / 1e-3, ratios


def _assert_trained_like(gain: float, ratios: list[float]) -> None:
    # (a) a 1e-3 input change moves the output by at most 1e-2; (b) every layer updates the
    # residual stream without rewriting it.
    assert gain <= 10.0, gain
    assert all(0.05 <= r <= 0.5 for r in ratios), ratios


def test_tiny_behaves_like_a_trained_network(tiny: Gemma4VisionModel, sample_images) -> None:
    _assert_trained_like(*_behaviour(tiny, sample_images[0]))


@pytest.mark.slow
def test_e2b_behaves_like_a_trained_network_and_the_chaotic_one_is_kept(sample_images) -> None:
    gain, ratios = _behaviour(load_model("e2b"), sample_images[0])
    _assert_trained_like(gain, ratios)
    assert len(ratios) == 16
    chaotic_gain, chaotic_ratios = _behaviour(load_model("e2b-chaotic"), sample_images[0])
    assert chaotic_gain > 100 and max(chaotic_ratios) > 1.0, (chaotic_gain, chaotic_ratios)


def test_chaotic_variants_keep_the_first_release_weights(tiny: Gemma4VisionModel) -> None:
    chaotic = load_model("tiny-chaotic")
    assert chaotic.config._name_or_path == "tiny-chaotic"
    plain = models.build_seeded_model(tiny_config(), calm=False)
    _assert_same_state(chaotic, plain)
    # Only norm scales differ between the two inits; every linear weight is the same draw.
    for (name, a), (_, b) in zip(tiny.state_dict().items(), chaotic.state_dict().items()):
        if name.endswith(("q_norm.weight", "k_norm.weight", "post_attention_layernorm.weight", "post_feedforward_layernorm.weight")):
            assert not torch.equal(a, b), name
        else:
            assert torch.equal(a, b), name


# --------------------------------------------------------------------------- activation outliers
def test_outlier_models_are_offered_and_seeded(tiny: Gemma4VisionModel) -> None:
    assert {"tiny+outliers", "e2b+outliers"} <= set(models.SPECS)
    a, b = load_model("tiny+outliers"), load_model("tiny+outliers")
    _assert_same_state(a, b)
    assert a.config._name_or_path == "tiny+outliers"
    # Only the input/pre-feedforward norm scales and the columns of the linears they feed change.
    fed = tuple(f"{norm}.weight" for norm in models.NORM_CONSUMERS) + tuple(
        f"{linear}.linear.weight" for linears in models.NORM_CONSUMERS.values() for linear in linears
    )
    for (name, x), (_, y) in zip(tiny.state_dict().items(), a.state_dict().items()):
        assert torch.equal(x, y) == (not name.endswith(fed)), name


@pytest.mark.parametrize("size", ["tiny", pytest.param("e2b", marks=pytest.mark.slow)])
def test_outliers_keep_the_float_function_and_grow_the_post_norm_range(size: str, tiny: Gemma4VisionModel, sample_images) -> None:
    from wrappers.wrapper_support import judged_against_noise

    from core.data.images import ImagePreprocessor
    from core.ptq import prepare

    plain = tiny if size == "tiny" else load_model(size)
    outliers = load_model(f"{size}+outliers")
    batch = ImagePreprocessor(plain.config, max_soft_tokens=70)(sample_images[:2])
    absmax: dict[tuple[str, str], float] = {}

    def hook(tag: str, name: str):
        def record(_module, _args, out) -> None:
            absmax[tag, name] = max(absmax.get((tag, name), 0.0), float(out.abs().max()))

        return record

    handles = [
        getattr(layer, norm).register_forward_hook(hook(tag, f"{index}.{norm}"))
        for tag, model in (("plain", plain), ("outliers", outliers))
        for index, layer in enumerate(model.encoder.layers)
        for norm in models.NORM_CONSUMERS
    ]
    try:
        with torch.no_grad():
            reference = plain(**batch).last_hidden_state
            outliers(**batch)
    finally:
        for handle in handles:
            handle.remove()
    # Float output: the wrapped copy in NO_QUANT (HF's maths), judged against torch's own rounding noise.
    qmodel = prepare(outliers)
    rows = int(batch["pixel_values"].shape[1])
    verdict = judged_against_noise(qmodel, lambda: qmodel(**batch).last_hidden_state, reference, rows)
    assert verdict.ok, verdict.summary
    for (tag, name), value in absmax.items():
        if tag == "outliers":
            assert value >= 20.0 * absmax["plain", name], (name, value, absmax["plain", name])


def test_outliers_refuse_a_clamp_before_the_rescaled_linears() -> None:
    from core.errors import ConfigError

    model = models.build_seeded_model(tiny_config(use_clipped_linears=True))
    with pytest.raises(ConfigError, match="input clamp .* one scalar range"):
        models.inject_outliers(model)
