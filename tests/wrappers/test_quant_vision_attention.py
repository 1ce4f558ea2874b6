"""QuantVisionAttention on its own: the encoder layer's attention of the tiny model.

It can only run with its children wrapped (q/k/v/o projections, q/k/v norms: tested in their own
files) and with the RoPE tables the encoder computes and observes once for every layer, so its
inputs are taken from the model's own calls. The QUANT checks go step by step: every observed
tensor is on its grid and within its own half step of the float op applied to the quantized
tensors before it (RoPE against Hugging Face's own apply_multidimensional_rope).
"""

import pytest
import torch
import torch.nn.functional as F
import wrapper_support as ws
from transformers.models.gemma4.modeling_gemma4 import apply_multidimensional_rope

from core.wrappers.attention import QuantVisionAttention, rope_tables

PREFIX = "encoder.layers.0.self_attn."
ROLES = ["q_cos", "q_sin", "q_rope", "k_cos", "k_sin", "k_rope", "scores", "probs", "context"]


@pytest.fixture
def setup(sample_images):
    qmodel, attn, hf, batches = ws.prepared(sample_images, PREFIX[:-1], QuantVisionAttention)
    assert bool((batches[0]["pixel_position_ids"] == -1).any()), "the first image should leave padding (masked keys)"
    return qmodel, attn, hf, batches


@torch.no_grad()
def test_no_quant_is_bit_exact_with_the_hf_attention_in_the_padded_model(setup):
    qmodel, attn, hf, batches = setup
    call, hf_call = ws.paired_calls(qmodel, attn, hf, batches[0])
    assert torch.equal(call.args[0], hf_call.kwargs["hidden_states"])
    assert torch.equal(call.args[2], hf_call.kwargs["attention_mask"])
    assert torch.equal(call.output[0], hf_call.output[0])
    # Called directly with HF's inputs (the sign of each RoPE group folded into the sin table).
    assert torch.equal(attn(*call.args)[0], hf_call.output[0])


@torch.no_grad()
def test_mode_transitions_through_the_model(setup):
    qmodel, attn, _, batches = setup
    ws.assert_mode_cycle_on_model_input(qmodel, attn, batches, pick=lambda output: output[0])


@torch.no_grad()
def test_calib_records_every_attention_tensor_with_its_image(setup):
    qmodel, attn, _, batches = setup
    per_image = ws.calibrate_per_image(qmodel, batches)
    ws.assert_observers_recorded(attn, ROLES, per_image)
    assert 0.0 <= float(attn.obs_probs.min_val) and float(attn.obs_probs.max_val) <= 1.0


@torch.no_grad()
def test_no_quant_static_path_without_mask_matches_the_padded_one_within_float_noise(setup):
    qmodel, attn, _, batches = setup
    verdict = ws.judge_static_against_padded(qmodel, batches[0], attn, pick=lambda output: output[0])
    assert verdict.ok, verdict.summary
    with ws.calls_of(attn) as calls:
        qmodel(**batches[0], static=True)
    assert calls[0].args[2] is None  # valid patches only: nothing to mask


def _rope(x, cos, sin, positions):
    return apply_multidimensional_rope(x.double(), cos.double(), sin.double(), positions)


@torch.no_grad()
def test_quant_steps_are_on_their_grids_and_within_half_steps(setup):
    qmodel, attn, hf, batches = setup
    seen, _ = ws.quant_run(qmodel, batches)
    n = qmodel.build_profile(batches[1]["pixel_position_ids"]).num_patches
    positions = batches[1]["pixel_position_ids"][:, :n]

    def tensor(name):
        return ws.fq_output(seen, name)

    for role in ROLES:
        ws.assert_on_grid(tensor(PREFIX + role), getattr(attn, f"obs_{role}"))
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
        cos_err = ws.fq_bound(getattr(attn, f"obs_{which}_cos"), cos_term, ws.U * cos_term.abs())
        sin_err = ws.fq_bound(getattr(attn, f"obs_{which}_sin"), sin_term, ws.U * sin_term.abs())
        ref = cos_term + sin_term
        rope_q = tensor(f"{PREFIX}{which}_rope")
        ws.assert_within(rope_q, ref, ws.fq_bound(getattr(attn, f"obs_{which}_rope"), ref, cos_err + sin_err), f"{which} RoPE")
        rotated[which] = rope_q.transpose(1, 2)
    scores_ref = (rotated["q"].double() @ rotated["k"].double().transpose(2, 3)) * attn.scaling
    scores_noise = ws.matmul_noise(rotated["q"], rotated["k"].transpose(2, 3))
    scores = tensor(PREFIX + "scores")
    ws.assert_within(scores, scores_ref, ws.fq_bound(attn.obs_scores, scores_ref, scores_noise), "scores")
    probs_ref = torch.softmax(scores.double(), dim=-1)
    probs_float32 = (torch.softmax(scores, dim=-1).double() - probs_ref).abs()  # float32's own softmax, measured
    probs = tensor(PREFIX + "probs")
    ws.assert_within(probs, probs_ref, ws.fq_bound(attn.obs_probs, probs_ref, probs_float32), "probs")
    values = tensor(PREFIX + "v_norm.output").transpose(1, 2)
    context_ref = probs.double() @ values.double()
    context = tensor(PREFIX + "context")
    ws.assert_within(context, context_ref, ws.fq_bound(attn.obs_context, context_ref, ws.matmul_noise(probs, values)), "context")
    flat = context.transpose(1, 2).reshape(1, n, -1)
    weight = attn.o_proj.linear.weight
    out_ref = F.linear(flat.double(), weight.double())
    out_err = ws.fq_bound(attn.o_proj.obs_output, out_ref, ws.linear_bound(flat, 0.0, weight, ws.weight_error(weight, attn.o_proj.obs_weight)))
    ws.assert_within(tensor(PREFIX + "o_proj.output"), out_ref, out_err, "attention output")
