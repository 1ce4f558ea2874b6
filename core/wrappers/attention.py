"""Vision attention, encoder layer and encoder wrappers."""

from __future__ import annotations

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.gemma4 import modeling_gemma4 as hf

from core.wrappers.base import QuantContext, QuantModule
from core.wrappers.registry import register, wrap


def rope_tables(rotary: nn.Module, positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and *signed* sin tables of the 2-D RoPE for `positions` (B, S, 2).

    HF rotates each of the two channel groups with ``cat(-x2, x1)``; folding that sign into
    the sin table (``-sin`` on each group's first half) turns the rotation into a pure channel
    swap, so the graph needs no NEG op and the result is bit-identical.
    """
    cos, sin = rotary(torch.empty(0, dtype=torch.float32, device=positions.device), positions)
    return cos, sin * _rope_sign(head_dim, sin.device)


def _rope_sign(head_dim: int, device: torch.device) -> torch.Tensor:
    group = 2 * (head_dim // 4)
    half = group // 2
    sign = torch.ones(head_dim, device=device)
    for start in range(0, 2 * group, group):
        sign[start : start + half] = -1.0
    return sign


def _rope_swap(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Swap the two halves of each RoPE channel group (slices and a concat: qparams carry through)."""
    group = 2 * (head_dim // 4)
    half = group // 2
    parts = []
    for start in range(0, 2 * group, group):
        parts += [x[..., start + half : start + group], x[..., start : start + half]]
    if 2 * group < head_dim:  # channels beyond the rotated groups pass through unrotated in HF
        parts.append(x[..., 2 * group :])
    return torch.cat(parts, dim=-1)


@register(hf.Gemma4VisionAttention)
class QuantVisionAttention(QuantModule):
    """Gemma4VisionAttention: q/k/v projections and norms, 2-D RoPE, softmax attention, output projection.

    On the static path the sequence holds valid patches only, so no mask is added; HF's
    padded path (NO_QUANT) adds its additive mask exactly as HF does.
    """

    def __init__(self, module: nn.Module, module_name: str, ctx: QuantContext) -> None:
        super().__init__(module_name, ctx)
        cfg = module.config
        self.head_dim = int(module.head_dim)
        self.num_heads = int(cfg.num_attention_heads)
        self.num_kv_heads = int(cfg.num_key_value_heads)
        self.kv_groups = int(module.num_key_value_groups)
        self.scaling = float(module.scaling)
        if self.head_dim % 4:
            raise ValueError(f"{module_name}: head_dim {self.head_dim} must be divisible by 4 for 2-D RoPE")
        n = module_name
        self.q_proj = wrap(module.q_proj, f"{n}.q_proj", ctx)
        self.q_norm = wrap(module.q_norm, f"{n}.q_norm", ctx)
        self.obs_q_cos = self._observer("q_cos")
        self.obs_q_sin = self._observer("q_sin")
        self.obs_q_rope = self._observer("q_rope")
        self.k_proj = wrap(module.k_proj, f"{n}.k_proj", ctx)
        self.k_norm = wrap(module.k_norm, f"{n}.k_norm", ctx)
        self.obs_k_cos = self._observer("k_cos")
        self.obs_k_sin = self._observer("k_sin")
        self.obs_k_rope = self._observer("k_rope")
        self.v_proj = wrap(module.v_proj, f"{n}.v_proj", ctx)
        self.v_norm = wrap(module.v_norm, f"{n}.v_norm", ctx)
        self.v_norm.set_width(self.head_dim)
        self.obs_scores = self._observer("scores")
        self.obs_probs = self._observer("probs")
        self.obs_context = self._observer("context")
        self.o_proj = wrap(module.o_proj, f"{n}.o_proj", ctx)

    def _rope(self, x, cos, sin_signed, obs_cos, obs_sin, obs_rope):
        cos = cos.unsqueeze(2)
        sin_signed = sin_signed.unsqueeze(2)
        x_cos = self.fq(x * cos, obs_cos)
        x_sin = self.fq(_rope_swap(x, self.head_dim) * sin_signed, obs_sin)
        return self.fq(x_cos + x_sin, obs_rope)

    def _repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        if self.kv_groups == 1:
            return x
        b, h, s, d = x.shape
        return x[:, :, None, :, :].expand(b, h, self.kv_groups, s, d).reshape(b, h * self.kv_groups, s, d)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        cos, sin_signed = position_embeddings

        q = self.q_norm(self.q_proj(hidden_states).view(hidden_shape))
        q = self._rope(q, cos, sin_signed, self.obs_q_cos, self.obs_q_sin, self.obs_q_rope).transpose(1, 2)
        k = self.k_norm(self.k_proj(hidden_states).view(hidden_shape))
        k = self._rope(k, cos, sin_signed, self.obs_k_cos, self.obs_k_sin, self.obs_k_rope).transpose(1, 2)
        v = self.v_norm(self.v_proj(hidden_states).view(hidden_shape)).transpose(1, 2)

        scores = torch.matmul(q, self._repeat_kv(k).transpose(2, 3))
        if self.scaling != 1.0:
            scores = scores * self.scaling
        scores = self.fq(scores, self.obs_scores)
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        if probs.dtype != q.dtype:  # a no-op cast would still be a graph node
            probs = probs.to(q.dtype)
        probs = self.fq(probs, self.obs_probs)
        context = self.fq(torch.matmul(probs, self._repeat_kv(v)), self.obs_context)
        context = context.transpose(1, 2).contiguous().reshape(*input_shape, -1).contiguous()
        return self.o_proj(context), None


@register(hf.Gemma4VisionEncoderLayer)
class QuantVisionEncoderLayer(QuantModule):
    """Gemma4VisionEncoderLayer: sandwich-normed attention and MLP blocks with observed residual sums."""

    def __init__(self, module: nn.Module, module_name: str, ctx: QuantContext) -> None:
        super().__init__(module_name, ctx)
        n = module_name
        self.input_layernorm = wrap(module.input_layernorm, f"{n}.input_layernorm", ctx)
        self.self_attn = wrap(module.self_attn, f"{n}.self_attn", ctx)
        self.post_attention_layernorm = wrap(module.post_attention_layernorm, f"{n}.post_attention_layernorm", ctx)
        self.obs_attn_residual = self._observer("attn_residual")
        self.pre_feedforward_layernorm = wrap(module.pre_feedforward_layernorm, f"{n}.pre_feedforward_layernorm", ctx)
        self.mlp = wrap(module.mlp, f"{n}.mlp", ctx)
        self.post_feedforward_layernorm = wrap(
            module.post_feedforward_layernorm, f"{n}.post_feedforward_layernorm", ctx
        )
        self.obs_output = self._observer("output")

    def forward(self, hidden_states, position_embeddings, attention_mask=None):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(hidden_states, position_embeddings, attention_mask)
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.fq(residual + hidden_states, self.obs_attn_residual)
        residual = hidden_states
        hidden_states = self.pre_feedforward_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = self.post_feedforward_layernorm(hidden_states)
        return self.fq(residual + hidden_states, self.obs_output)


@register(hf.Gemma4VisionEncoder)
class QuantVisionEncoder(QuantModule):
    """Gemma4VisionEncoder: the RoPE tables are observed once and shared by every layer."""

    def __init__(self, module: nn.Module, module_name: str, ctx: QuantContext) -> None:
        super().__init__(module_name, ctx)
        self.config = module.config
        self.rotary_emb = module.rotary_emb  # computes tables only; never part of the exported graph
        self.head_dim = int(module.layers[0].self_attn.head_dim)
        self.obs_rope_cos = self._observer("rope_cos")
        self.obs_rope_sin = self._observer("rope_sin")
        self.layers = nn.ModuleList(
            wrap(layer, f"{module_name}.layers.{i}", ctx)
            for i, layer in enumerate(module.layers[: module.config.num_hidden_layers])
        )

    def run_layers(self, hidden, cos, sin_signed, attention_mask=None):
        """Run every layer with the given RoPE tables (observed here) and optional additive mask."""
        tables = (self.fq(cos, self.obs_rope_cos), self.fq(sin_signed, self.obs_rope_sin))
        for layer in self.layers:
            hidden = layer(hidden, tables, attention_mask)
        return hidden

    def forward(self, inputs_embeds, attention_mask, pixel_position_ids):
        """HF's padded path: boolean keep-mask in, additive mask built exactly as HF builds it."""
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask)
        cos, sin_signed = rope_tables(self.rotary_emb, pixel_position_ids, self.head_dim)
        return self.run_layers(inputs_embeds, cos.to(inputs_embeds.dtype), sin_signed.to(inputs_embeds.dtype), mask)
