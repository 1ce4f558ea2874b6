"""Patch embedder, pooler and vision-model wrappers, plus the static export adapter."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.gemma4 import modeling_gemma4 as hf

from core.errors import ConfigError, ExportError, NotCalibratedError
from core.quant import meta_kernels
from core.quant.mode import Mode
from core.quant.observers import Observer
from core.wrappers.attention import rope_tables
from core.wrappers.base import QuantContext, QuantModule
from core.wrappers.layers import QuantLinear
from core.wrappers.registry import register, wrap


@dataclass
class StaticProfile:
    """Everything that depends on patch positions, precomputed for one image layout."""

    num_patches: int  # valid (leading) patches; the rest of the input is padding
    max_patches: int
    pos_rows: torch.Tensor  # (1, n, hidden): x- plus y-position embedding of each valid patch
    cos: torch.Tensor  # (1, n, head_dim)
    sin_signed: torch.Tensor  # (1, n, head_dim)
    pool: torch.Tensor | None  # (1, rows, n): averaging matrix onto the valid soft tokens
    grid: tuple[int, int]  # patches across, patches down

    @property
    def soft_tokens(self) -> int:
        """Number of output rows (soft tokens) this profile produces."""
        return self.pool.shape[1] if self.pool is not None else self.num_patches


class StaticCarry(NamedTuple):
    """What flows from one static step to the next: the hidden state and, inside the encoder, its RoPE tables."""

    hidden: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class StaticStep:
    """One step of the static path: the wrapper named `name` (with its children when `nested`) maps a carry."""

    name: str  # module name of the wrapper whose observers the step uses
    nested: bool  # the step runs the wrapper's children too (their observers are the step's)
    run: Callable[[StaticCarry], StaticCarry]

    def owns(self, module_name: str) -> bool:
        """Whether an observer of `module_name` is used by this step."""
        return module_name == self.name or (self.nested and module_name.startswith(self.name + "."))


@torch.no_grad()
def _fold_input_affine(linear: nn.Linear) -> nn.Linear:
    """A copy of `linear` that computes linear(2 * (x - 0.5)) from x: weight 2W, bias b - W.1."""
    folded = nn.Linear(linear.in_features, linear.out_features, bias=True, dtype=linear.weight.dtype)
    folded.weight.copy_(2 * linear.weight)
    bias = -linear.weight.sum(dim=1)
    if linear.bias is not None:
        bias = bias + linear.bias
    folded.bias.copy_(bias)
    return folded.requires_grad_(False)


@register(hf.Gemma4VisionPatchEmbedder)
class QuantPatchEmbedder(QuantModule):
    """Gemma4VisionPatchEmbedder: input scaling, projection, position embedding."""

    def __init__(self, module: nn.Module, module_name: str, ctx: QuantContext) -> None:
        super().__init__(module_name, ctx)
        self.source = module
        self.obs_pixels = self._observer("pixels")
        # HF computes input_proj(2 * (pixels - 0.5)). Quantizing that centred tensor puts every
        # 8-bit pixel exactly on a rounding tie ((k - 127.5) steps), and integer runtimes break
        # ties differently from torch, so the exported model drifts by several output steps.
        # Folding the affine map into the projection (W' = 2W, b' = b - W.1) removes the tensor.
        self.input_proj = wrap(_fold_input_affine(module.input_proj), f"{module_name}.input_proj", ctx)
        self.register_buffer("folded_bias", self.input_proj.linear.bias.detach().clone(), persistent=False)
        self.obs_position = self._observer("position")
        self.obs_output = self._observer("output")

    @torch.no_grad()
    def collect_weights(self) -> None:
        self.input_proj.linear.bias.copy_(self.folded_bias)

    @torch.no_grad()
    def cache_weights(self) -> None:
        # The converter stores the folded bias as int32 on the (pixel scale x weight scale) grid;
        # holding it on that grid here makes torch compute what the Circle model computes.
        bias = self.folded_bias
        proj = self.input_proj
        if self.obs_pixels.enabled and proj.obs_weight.enabled:
            step = self.obs_pixels.scale.float().reshape(()) * proj.obs_weight.scale.float()
            # int32 bias for 8-bit inputs, int64 for 16-bit ones (as the Circle kernels store them).
            bits = 31 if self.obs_pixels.qdtype.bits <= 8 else 63
            bias = (torch.round(bias.double() / step.double()).clamp(-(2.0**bits), 2.0**bits - 1) * step.double()).float()
        proj.linear.bias.copy_(bias)

    def forward(self, pixel_values, pixel_position_ids, padding_positions):
        """HF's padded path (NO_QUANT)."""
        pixel_values = 2 * (pixel_values - 0.5)
        hidden = self.source.input_proj(pixel_values.to(self.source.input_proj.weight.dtype))
        return hidden + self.source._position_embeddings(pixel_position_ids, padding_positions)  # noqa: SLF001 -- HF's own position table lookup, for bit-exact parity

    def forward_static(self, pixel_values: torch.Tensor, pos_rows: torch.Tensor) -> torch.Tensor:
        """Valid patches only; every intermediate observed (the input affine folded into input_proj)."""
        if self.mode is Mode.QUANT:
            hidden = self.input_proj(self.fq(pixel_values, self.obs_pixels))
        else:
            # Float: HF's own maths, so forward_export matches the padded path bit for bit.
            hidden = self.source.input_proj(2 * (pixel_values - 0.5))
            if self.mode is Mode.CALIB:
                # The folded projection's observers record what QUANT will run, while the output
                # stays HF's: CALIB must not change the numbers it calibrates on (the folded
                # matmul rounds differently by ~1e-6).
                self.input_proj(self.fq(pixel_values, self.obs_pixels))
        position = self.fq(pos_rows, self.obs_position)
        return self.fq(hidden + position, self.obs_output)


@register(hf.Gemma4VisionPooler)
class QuantPooler(QuantModule):
    """Gemma4VisionPooler: k x k average pooling as a constant matmul, then sqrt(hidden) scaling."""

    def __init__(self, module: nn.Module, module_name: str, ctx: QuantContext) -> None:
        super().__init__(module_name, ctx)
        self.source = module
        self.root_hidden_size = float(module.root_hidden_size)
        # A tensor constant with its own qparams: a bare Python scalar becomes a float Circle tensor.
        self.register_buffer("root_scale", torch.tensor(self.root_hidden_size), persistent=False)
        self.obs_matrix = self._observer("matrix")
        self.obs_pooled = self._observer("pooled")
        self.obs_root_scale = self._observer("root_scale", "weight", per_channel=False, spec_from="activation")
        self.obs_output = self._observer("output")

    def collect_weights(self) -> None:
        self.obs_root_scale.collect(self.root_scale, "weights")

    def forward(self, hidden_states, pixel_position_ids, padding_positions, output_length):
        """HF's padded path (NO_QUANT): the original maths."""
        return self.source(hidden_states, pixel_position_ids, padding_positions, output_length)

    def forward_static(self, hidden: torch.Tensor, pool: torch.Tensor | None) -> torch.Tensor:
        if pool is not None:
            hidden = self.fq(torch.matmul(self.fq(pool, self.obs_matrix), hidden), self.obs_pooled)
        root = self.fq_weight(self.root_scale, self.obs_root_scale, None)
        return self.fq(hidden * root, self.obs_output)


@register(hf.Gemma4VisionModel)
class QuantVisionModel(QuantModule):
    """Gemma4VisionModel wrapper: the root of a wrapped tree and owner of its mode."""

    def __init__(self, model: nn.Module, module_name: str, ctx: QuantContext) -> None:
        super().__init__(module_name, ctx)
        self.config = model.config
        self.source = model
        self.patch_embedder = wrap(model.patch_embedder, "patch_embedder", ctx)
        self.encoder = wrap(model.encoder, "encoder", ctx)
        self.pooler = wrap(model.pooler, "pooler", ctx)
        self.standardize = bool(model.config.standardize)
        if self.standardize:
            self.obs_std_bias = self._observer("std_bias", "weight", per_channel=False, spec_from="activation")
            self.obs_centered = self._observer("centered")
            self.obs_std_scale = self._observer("std_scale", "weight", per_channel=False, spec_from="activation")
            self.obs_output = self._observer("output")

    # ------------------------------------------------------------------ modes
    def set_mode(self, mode: Mode) -> None:
        """Move the whole tree to `mode` (CALIB collects weight statistics at once)."""
        if mode is Mode.QUANT:
            self.freeze()
            return
        if mode is Mode.CALIB and self.ctx.mode is not Mode.CALIB:
            for wrapper in self.quant_modules():
                wrapper.collect_weights()
            self._collect_standardize_weights()
        self.ctx.mode = mode

    def enable_calibration(self, reset: bool = True) -> None:
        """Enter CALIB; `reset` forgets earlier statistics first."""
        if reset:
            self.reset_statistics()
        self.set_mode(Mode.CALIB)

    def reset_statistics(self) -> None:
        """Forget every observer's statistics and return to NO_QUANT: the model is uncalibrated again."""
        for obs in self.observers():
            obs.reset()
        self.ctx.mode = Mode.NO_QUANT

    @contextmanager
    def mode_as(self, mode: Mode) -> Iterator[None]:
        """Run the block in `mode` (entered as set_mode does: QUANT freezes qparams first), then put
        back the earlier mode, also when the block raises. The statistics and qparams are kept."""
        previous = self.ctx.mode
        if mode is not previous:
            self.set_mode(mode)
        try:
            yield
        finally:
            # Back without set_mode's side effects: nothing was recorded or frozen for `previous`.
            self.ctx.mode = previous

    def freeze(self) -> None:
        """Freeze every observer's statistics into qparams and enter QUANT."""
        missing = [o.name for o in self.observers() if not o.has_stats]
        if missing:
            raise NotCalibratedError(
                f"{len(missing)} observers have no statistics (first: {missing[0]}): calibrate on at least one image"
            )
        for obs in self.observers():
            obs.compute_qparams()
        for wrapper in self.quant_modules():
            wrapper.cache_weights()
        self.ctx.mode = Mode.QUANT

    @property
    def is_calibrated(self) -> bool:
        """Whether every observer holds statistics."""
        return all(o.has_stats for o in self.observers())

    def _collect_standardize_weights(self) -> None:
        if self.standardize:
            self.obs_std_bias.collect(self.source.std_bias.float(), "weights")
            self.obs_std_scale.collect(self.source.std_scale.float(), "weights")

    # ---------------------------------------------------------------- listing
    def observers(self) -> list[Observer]:
        """Every observer in forward order."""
        return list(self.ctx.observers)

    def quant_modules(self) -> Iterator[QuantModule]:
        """Every wrapper in the tree (this one included)."""
        return (m for m in self.modules() if isinstance(m, QuantModule))

    def wrappers(self) -> list[tuple[str, QuantModule]]:
        """(dotted module name, wrapper) for every wrapper below the root, in forward order."""
        return [(m.module_name, m) for m in self.modules() if isinstance(m, QuantModule) and m is not self]

    def rounded_weights(self) -> dict[str, torch.Tensor]:
        """Wrapper name -> the weight GPTQ/AdaRound rounded onto its pinned grid (what QUANT and export use)."""
        return {name: w.rounded_weight for name, w in self.wrappers() if isinstance(w, QuantLinear) and w.rounded_weight is not None}

    def load_rounded_weights(self, mapping: Mapping[str, torch.Tensor]) -> None:
        """Put back rounded weights saved by rounded_weights(); their pins come with the observer state.
        ConfigError (one line) for a name that is no quantized linear of this model or a shape that does not fit."""
        linears = {name: w for name, w in self.wrappers() if isinstance(w, QuantLinear)}
        for name, weight in mapping.items():
            wrapper = linears.get(name)
            if wrapper is None:
                raise ConfigError(f"rounded weight for {name!r}, which is no linear of this model")
            if tuple(weight.shape) != tuple(wrapper.linear.weight.shape):
                raise ConfigError(
                    f"rounded weight for {name} has shape {tuple(weight.shape)}, the model's is {tuple(wrapper.linear.weight.shape)}"
                )
        for name, weight in mapping.items():
            linears[name].restore_rounding(weight)

    def set_keep_float(self, globs: Sequence[str]) -> None:
        """Keep modules matching `globs` (and those the config keeps) in float; no recalibration needed."""
        config = self.ctx.config
        self.set_observer_flags(
            [
                not (config.spec_for(obs.module_name, obs.kind) is None or any(config.matches(g, obs.module_name) for g in globs))
                for obs in self.observers()
            ]
        )

    def kept_float_modules(self) -> list[str]:
        """Modules with at least one observer kept float (by the config or set_keep_float), forward order."""
        return list(dict.fromkeys(obs.module_name for obs in self.observers() if not obs.enabled))

    def observer_flags(self) -> list[bool]:
        """Every observer's enabled flag, in forward order (for set_observer_flags)."""
        return [bool(obs.enabled) for obs in self.observers()]

    def set_observer_flags(self, flags: Sequence[bool]) -> None:
        """Enable or disable every observer (forward order) and refresh what that changes."""
        changed: set[str] = set()
        for obs, enabled in zip(self.observers(), flags):
            if enabled != obs.enabled:
                changed.add(obs.module_name)
            obs.enabled = enabled
        if self.ctx.mode is Mode.QUANT and changed:
            # Only wrappers whose own observers flipped need their fake-quantized weights again.
            # (A parent may fold a child's qparams into its own constants, so parents refresh too.)
            for wrapper in self.quant_modules():
                name = wrapper.module_name
                if any(c == name or c.startswith(name + ".") or not name for c in changed):
                    wrapper.cache_weights()

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_position_ids: torch.Tensor,
        image_ids: Sequence[str] | None = None,
        static: bool | None = None,
        **_: object,
    ) -> BaseModelOutputWithPooling:
        """What Gemma4VisionModel returns. NO_QUANT runs HF's padded path; CALIB/QUANT the static one per image."""
        use_static = self.ctx.mode is not Mode.NO_QUANT if static is None else static
        if not use_static:
            return self._forward_padded(pixel_values, pixel_position_ids)
        outputs = []
        for b in range(pixel_values.shape[0]):
            profile = self.build_profile(pixel_position_ids[b : b + 1])
            self.ctx.source = image_ids[b] if image_ids is not None else None
            try:
                outputs.append(self.forward_static(pixel_values[b : b + 1, : profile.num_patches], profile))
            finally:
                self.ctx.source = None
        return BaseModelOutputWithPooling(last_hidden_state=torch.cat(outputs, dim=0))

    def _forward_padded(self, pixel_values, pixel_position_ids) -> BaseModelOutputWithPooling:
        k = self.config.pooling_kernel_size
        output_length = pixel_values.shape[-2] // (k * k)
        padding = (pixel_position_ids == -1).all(dim=-1)
        embeds = self.patch_embedder(pixel_values, pixel_position_ids, padding)
        hidden = self.encoder(embeds, ~padding, pixel_position_ids)
        hidden, pooler_mask = self.pooler(hidden, pixel_position_ids, padding, output_length)
        hidden = hidden[pooler_mask]
        if self.standardize:
            hidden = (hidden - self.source.std_bias.float()) * self.source.std_scale.float()
        return BaseModelOutputWithPooling(last_hidden_state=hidden.to(embeds.dtype))

    @contextmanager
    def static_path(self) -> Iterator[None]:
        """Run the block on the static path (RMSNorm's quantized static maths, as in export), then
        put back the earlier setting, also when the block raises."""
        previous = self.ctx.static
        self.ctx.static = True
        try:
            yield
        finally:
            self.ctx.static = previous

    def forward_static(self, pixel_values: torch.Tensor, profile: StaticProfile) -> torch.Tensor:
        """The static path for one image's valid patches; returns (soft_tokens, hidden)."""
        with self.static_path():
            hidden = self.patch_embedder.forward_static(pixel_values, profile.pos_rows)
            hidden = self.encoder.run_layers(hidden, profile.cos, profile.sin_signed)
            hidden = self.pooler.forward_static(hidden, profile.pool)
            return self.standardize_pooled(hidden)

    def static_steps(self, profile: StaticProfile) -> list[StaticStep]:
        """forward_static cut into its steps, in order (patch embedder, RoPE tables, each encoder layer,
        pooler, standardize), so the analysis can run float and quantized in lockstep, one layer at a
        time. Chained from ``StaticCarry(pixel_values)`` inside ``static_path()`` they compute exactly
        what forward_static computes (same calls, same order; tests/test_analysis_pass.py). forward_static
        keeps calling encoder.run_layers: export records the encoder's scope there (core.export.tensor_map)."""
        pe, enc, pool = self.patch_embedder, self.encoder, self.pooler

        def rope(c: StaticCarry) -> StaticCarry:
            # What encoder.run_layers does first: the tables, observed once and shared by every layer.
            return StaticCarry(c.hidden, (enc.fq(profile.cos, enc.obs_rope_cos), enc.fq(profile.sin_signed, enc.obs_rope_sin)))

        def layer_step(layer: QuantModule) -> StaticStep:
            return StaticStep(layer.module_name, True, lambda c: StaticCarry(layer(c.hidden, c.rope, None), c.rope))

        return [
            StaticStep(pe.module_name, True, lambda c: StaticCarry(pe.forward_static(c.hidden, profile.pos_rows))),
            StaticStep(enc.module_name, False, rope),
            *(layer_step(layer) for layer in enc.layers),
            StaticStep(pool.module_name, True, lambda c: StaticCarry(pool.forward_static(c.hidden, profile.pool))),
            StaticStep(self.module_name, False, lambda c: StaticCarry(self.standardize_pooled(c.hidden))),
        ]

    def standardize_pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        """The static path's last step on a pooler output: (soft_tokens, hidden), then (x - bias) * scale
        fake-quantized when the model standardizes (the identity otherwise)."""
        hidden = hidden.reshape(hidden.shape[-2], hidden.shape[-1])
        if self.standardize:
            bias = self.fq_weight(self.source.std_bias.float(), self.obs_std_bias, None)
            scale = self.fq_weight(self.source.std_scale.float(), self.obs_std_scale, None)
            hidden = self.fq(hidden - bias, self.obs_centered)
            hidden = self.fq(hidden * scale, self.obs_output)
        return hidden

    # ---------------------------------------------------------------- profiles
    @torch.no_grad()
    def build_profile(self, pixel_position_ids: torch.Tensor) -> StaticProfile:
        """Precompute the position-dependent tensors of one image (batch of one)."""
        if pixel_position_ids.dim() != 3 or pixel_position_ids.shape[0] != 1 or pixel_position_ids.shape[-1] != 2:
            raise ExportError(
                f"pixel_position_ids must have shape (1, patches, 2), got {tuple(pixel_position_ids.shape)}"
            )
        positions = pixel_position_ids.long()
        max_patches = positions.shape[1]
        padding = (positions == -1).all(dim=-1)[0]
        n = int((~padding).sum())
        if n == 0 or bool(padding[:n].any()):
            raise ExportError("the image layout must hold its valid patches first and its padding last")
        valid = positions[:, :n]
        cfg = self.config
        if int(valid.max()) >= cfg.position_embedding_size:
            raise ExportError(
                f"image is {int(valid.max()) + 1} patches across, more than the model's "
                f"{cfg.position_embedding_size} position embeddings: use fewer soft tokens"
            )
        pos_rows = self.source.patch_embedder._position_embeddings(valid, torch.zeros_like(valid[..., 0], dtype=torch.bool))  # noqa: SLF001 -- HF's own lookup
        cos, sin_signed = rope_tables(self.encoder.rotary_emb, valid, self.encoder.head_dim)
        k = cfg.pooling_kernel_size
        output_length = max_patches // (k * k)
        pool = None
        if output_length != max_patches:
            # HF's one-hot pooling weights, restricted to valid patches and to the rows HF keeps.
            clamped = positions.clamp(min=0)
            max_x = clamped[..., 0].max(dim=-1, keepdim=True)[0] + 1
            kernel = torch.div(clamped, k, rounding_mode="floor")
            kernel = kernel[..., 0] + (max_x // k) * kernel[..., 1]
            weights = F.one_hot(kernel.long(), output_length).float() / (k * k)  # (1, P, L)
            keep = (weights != 0).any(dim=1)[0]
            pool = weights[:, :n, :][..., keep].transpose(1, 2).contiguous()  # (1, rows, n)
        grid = (int(valid[0, :, 0].max()) + 1, int(valid[0, :, 1].max()) + 1)
        return StaticProfile(n, max_patches, pos_rows, cos, sin_signed, pool, grid)

    @contextmanager
    def exporting(self) -> Iterator[None]:
        """Weights go through explicit fake-quant ops (the converter reads their qparams there)."""
        previous = self.ctx.exporting
        self.ctx.exporting = True
        try:
            yield
        finally:
            self.ctx.exporting = previous

    def as_export_module(self, pixel_position_ids: torch.Tensor | None = None) -> "VisionExportModule":
        """A static module for torch.export: positions fixed, `forward(pixel_values)` only."""
        if pixel_position_ids is None or not isinstance(pixel_position_ids, torch.Tensor):
            raise ExportError(
                "as_export_module needs the pixel positions of the image layout to export: pass "
                "pixel_position_ids from the preprocessor's output, e.g. pre([image])['pixel_position_ids']"
            )
        if self.ctx.mode is Mode.CALIB:
            raise ExportError("the model is calibrating: convert it (QUANT) or switch to NO_QUANT before export")
        return VisionExportModule(self, self.build_profile(pixel_position_ids))


class VisionExportModule(nn.Module):
    """Export adapter beside the runtime wrapper: one profile's constants as buffers, no dynamic shapes."""

    def __init__(self, qmodel: QuantVisionModel, profile: StaticProfile) -> None:
        super().__init__()
        # A plain torch.export of this module must not run the real fake-quantize kernels on
        # zero tensors while tracing (see meta_kernels), whether or not core.export.pipeline was imported.
        meta_kernels.register()
        self.qmodel = qmodel
        self.profile = profile
        self.num_patches = profile.num_patches
        self.register_buffer("pos_rows", profile.pos_rows.clone())
        self.register_buffer("cos", profile.cos.clone())
        self.register_buffer("sin_signed", profile.sin_signed.clone())
        self.register_buffer("pool", None if profile.pool is None else profile.pool.clone())

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """forward_export: pixel values (1, max_patches, 3*p*p) -> soft tokens (rows, hidden)."""
        return self.forward_export(pixel_values)

    def forward_export(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Static forward on the leading valid patches with precomputed positions."""
        profile = StaticProfile(
            self.num_patches,
            self.profile.max_patches,
            self.pos_rows,
            self.cos,
            self.sin_signed,
            self.pool,
            self.profile.grid,
        )
        with self.qmodel.exporting():
            # Quantized where the graph starts, before the slice: the converter then gives the graph
            # input itself the pixels' qparams (an integer input; export_circle may bridge it from
            # float with a QUANTIZE op). Sliced after, the input stays float and feeds an integer
            # STRIDED_SLICE, a dtype change no op may make. Fake-quantizing twice changes nothing.
            embedder = self.qmodel.patch_embedder
            pixel_values = embedder.fq(pixel_values, embedder.obs_pixels)
            return self.qmodel.forward_static(pixel_values[:, : self.num_patches], profile)
