"""QuantVisionAttention on its own: the encoder layer's attention of the tiny model.

It can only run with its children wrapped (q/k/v/o projections, q/k/v norms: tested in their own
files) and with the RoPE tables the encoder computes and observes once for every layer, so its
inputs are taken from the model's own calls. The QUANT checks go step by step: every observed
tensor is on its grid and within its own half step of the float op applied to the quantized
tensors before it (RoPE against Hugging Face's own apply_multidimensional_rope).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.gemma4.modeling_gemma4 import apply_multidimensional_rope
from wrapper_support import (
    U,
    assert_min_max_provenance,
    assert_on_grid,
    assert_within,
    calibrate,
    calibrate_per_image,
    calls_of,
    fq_bound,
    fq_tensors,
    image_batches,
    judged_against_noise,
    linear_bound,
    matmul_noise,
    tiny_vision_model,
    weight_error,
)

from core.ptq import prepare
from core.quant.mode import Mode
from core.wrappers.attention import QuantVisionAttention, rope_tables

PREFIX = "encoder.layers.0.self_attn."
ROLES = ["q_cos", "q_sin", "q_rope", "k_cos", "k_sin", "k_rope", "scores", "probs", "context"]


@pytest.fixture
def setup(sample_images):
    torch.manual_seed(0)
    qmodel = prepare(tiny_vision_model())
    batches = image_batches(qmodel.config, sample_images[:3])
    attn = qmodel.encoder.layers[0].self_attn
    assert type(attn) is QuantVisionAttention
    return qmodel, attn, qmodel.source.encoder.layers[0].self_attn, batches


def _pixels(batch):
    return {k: batch[k] for k in ("pixel_values", "pixel_position_ids")}


@torch.no_grad()
def test_no_quant_is_bit_exact_with_the_hf_attention_in_the_padded_model(setup):
    qmodel, attn, hf, batches = setup
    assert bool((batches[0]["pixel_position_ids"] == -1).any()), "the image should leave padding (masked keys)"
    with calls_of(hf) as hf_calls:
        qmodel.source(**_pixels(batches[0]))
    with calls_of(attn) as calls:
        qmodel(**batches[0])
    hf_call, call = hf_calls[0], calls[0]
    assert torch.equal(call.args[0], hf_call.kwargs["hidden_states"])
    assert torch.equal(call.args[2], hf_call.kwargs["attention_mask"])
    assert torch.equal(call.output[0], hf_call.output[0])
    # Called directly with HF's inputs (the sign of each RoPE group folded into the sin table).
    assert torch.equal(attn(*call.args)[0], hf_call.output[0])


@torch.no_grad()
def test_mode_transitions_through_the_model(setup):
    qmodel, attn, _, batches = setup
    with calls_of(attn) as calls:
        qmodel(**batches[0])
    args, expected = calls[0].args, calls[0].output[0]
    calibrate(qmodel, batches)
    assert attn.mode is Mode.CALIB and torch.equal(attn(*args)[0], expected)
    qmodel.freeze()
    assert attn.mode is Mode.QUANT and not torch.equal(attn(*args)[0], expected)
    qmodel.set_mode(Mode.NO_QUANT)
    assert attn.mode is Mode.NO_QUANT and torch.equal(attn(*args)[0], expected)


@torch.no_grad()
def test_calib_records_every_attention_tensor_with_its_image(setup):
    qmodel, attn, _, batches = setup
    per_image = calibrate_per_image(qmodel, batches)
    assert [n for n, _ in attn.named_children() if n.startswith("obs_")] == [f"obs_{r}" for r in ROLES]
    for role in ROLES:
        obs = getattr(attn, f"obs_{role}")
        assert obs.name == PREFIX + role and obs.min_val.shape == ()
        assert float(obs.min_val) <= float(obs.max_val)
        assert_min_max_provenance(obs, per_image[obs.name])
    assert 0.0 <= float(attn.obs_probs.min_val) and float(attn.obs_probs.max_val) <= 1.0


@torch.no_grad()
def test_no_quant_static_path_without_mask_matches_the_padded_one_within_float_noise(setup):
    qmodel, attn, _, batches = setup
    n = qmodel.build_profile(batches[0]["pixel_position_ids"]).num_patches

    def static_output() -> torch.Tensor:
        with calls_of(attn) as calls:
            qmodel(**batches[0], static=True)
        assert calls[0].args[2] is None  # valid patches only: nothing to mask
        return calls[0].output[0]

    with calls_of(attn) as calls:
        qmodel(**batches[0])
    padded = calls[0].output[0][:, :n]
    verdict = judged_against_noise(qmodel, static_output, padded, n)
    assert verdict.ok, verdict.summary


def _rope(x, cos, sin, positions):
    return apply_multidimensional_rope(x.double(), cos.double(), sin.double(), positions)


@torch.no_grad()
def test_quant_steps_are_on_their_grids_and_within_half_steps(setup):
    qmodel, attn, hf, batches = setup
    calibrate(qmodel, batches)
    qmodel.freeze()
    batch = batches[1]
    n = qmodel.build_profile(batch["pixel_position_ids"]).num_patches
    positions = batch["pixel_position_ids"][:, :n]
    with fq_tensors(qmodel) as seen:
        qmodel(**batch)

    def tensor(name):
        (_, out), = seen[name]
        return out

    for role in ROLES:
        assert_on_grid(tensor(PREFIX + role), getattr(attn, f"obs_{role}"))
    cos = tensor("encoder.rope_cos")
    sin_signed = tensor("encoder.rope_sin")
    # The wrapper's sin table carries each RoPE group's rotation sign; HF's does not. Per channel,
    # sign = sign(sum(signed * hf)) = sign * sign(sum(hf^2)).
    _, hf_sin = qmodel.encoder.rotary_emb(torch.empty(0), positions)
    _, signed = rope_tables(qmodel.encoder.rotary_emb, positions, attn.head_dim)
    sign = torch.sign((signed * hf_sin).sum(dim=(0, 1)))
    assert bool((sign.abs() == 1).all())
    zeros = torch.zeros_like(cos)
    rotated = {}
    for which in ("q", "k"):
        normed = tensor(f"{PREFIX}{which}_norm.output")
        cos_term = _rope(normed, cos, zeros, positions)
        sin_term = _rope(normed, zeros, sin_signed * sign, positions)
        cos_err = fq_bound(getattr(attn, f"obs_{which}_cos"), cos_term, U * cos_term.abs())
        sin_err = fq_bound(getattr(attn, f"obs_{which}_sin"), sin_term, U * sin_term.abs())
        ref = cos_term + sin_term
        rope_q = tensor(f"{PREFIX}{which}_rope")
        assert_within(rope_q, ref, fq_bound(getattr(attn, f"obs_{which}_rope"), ref, cos_err + sin_err), f"{which} RoPE")
        rotated[which] = rope_q.transpose(1, 2)
    scores_ref = (rotated["q"].double() @ rotated["k"].double().transpose(2, 3)) * attn.scaling
    scores_noise = matmul_noise(rotated["q"], rotated["k"].transpose(2, 3))
    scores = tensor(PREFIX + "scores")
    assert_within(scores, scores_ref, fq_bound(attn.obs_scores, scores_ref, scores_noise), "scores")
    probs_ref = torch.softmax(scores.double(), dim=-1)
    probs_float32 = (torch.softmax(scores, dim=-1).double() - probs_ref).abs()  # float32's own softmax, measured
    probs = tensor(PREFIX + "probs")
    assert_within(probs, probs_ref, fq_bound(attn.obs_probs, probs_ref, probs_float32), "probs")
    values = tensor(PREFIX + "v_norm.output").transpose(1, 2)
    context_ref = probs.double() @ values.double()
    context = tensor(PREFIX + "context")
    assert_within(context, context_ref, fq_bound(attn.obs_context, context_ref, matmul_noise(probs, values)), "context")
    flat = context.transpose(1, 2).reshape(1, n, -1)
    weight = attn.o_proj.linear.weight
    out_ref = F.linear(flat.double(), weight.double())
    out_err = fq_bound(attn.o_proj.obs_output, out_ref, linear_bound(flat, 0.0, weight, weight_error(weight, attn.o_proj.obs_weight)))
    assert_within(tensor(PREFIX + "o_proj.output"), out_ref, out_err, "attention output")
