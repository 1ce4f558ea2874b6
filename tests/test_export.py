"""Static Circle export (issue 3): forward_export parity, verified export, graph hygiene, failures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from core.cancel import CancelToken
from core.data.images import ImagePreprocessor
from core.data.resources import resource_path, sample_images
from core.errors import CancelledError, ExportError, NotCalibratedError, PTQStudioError, UnwritablePathError
from core.export.pipeline import ROOT_MODULE, ExportResult, check_graph, export_circle, layout_fingerprint
from core.export.verdict import STEP_HAIR, noise_floor
from core.models import load_model, tiny_config
from core.ptq import calibrate, convert, prepare
from core.quant.mode import Mode

SQUARE = "samples/astronaut.jpg"
WIDE = "samples/coffee_wide.jpg"
CALIB = 8


def _batches(config, paths, max_soft_tokens=70):
    pre = ImagePreprocessor(config, max_soft_tokens=max_soft_tokens)
    return [pre([p]) | {"image_ids": [p.name]} for p in paths]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.fixture(scope="module")
def tiny_float(tiny):
    """Prepared, never calibrated: NO_QUANT."""
    return prepare(tiny)


@pytest.fixture(scope="module")
def tiny_quant(tiny):
    """Default config, calibrated on the bundled samples, converted (QUANT)."""
    q = prepare(tiny)
    calibrate(q, _batches(tiny.config, sample_images()[:CALIB]))
    convert(q)
    return q


def _batch(config, name, max_soft_tokens):
    return ImagePreprocessor(config, max_soft_tokens=max_soft_tokens)([resource_path(name)])


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, f"not one line: {text!r}"
    return text


# ------------------------------------------------------------------ forward_export == forward
@pytest.mark.parametrize("max_soft_tokens", [70, 140, 280])
@pytest.mark.parametrize("image", [SQUARE, WIDE])
@pytest.mark.parametrize("mode", ["no_quant", "quant"])
def test_forward_export_matches_forward(tiny_float, tiny_quant, mode, image, max_soft_tokens):
    """QUANT: the runtime forward and forward_export run the same static path (same kernels, same
    shapes), so they are equal bit for bit. NO_QUANT: the runtime forward is Hugging Face's padded
    path, whose GEMMs have other shapes, so the CPU sums in another order: the two must agree as
    well as torch agrees with itself under this machine's rounding noise (core.export.verdict)."""
    qmodel = tiny_quant if mode == "quant" else tiny_float
    assert qmodel.mode is (Mode.QUANT if mode == "quant" else Mode.NO_QUANT)
    batch = _batch(qmodel.config, image, max_soft_tokens)
    module = qmodel.as_export_module(batch["pixel_position_ids"])
    with torch.no_grad():
        static = module(batch["pixel_values"])
        runtime = qmodel(pixel_values=batch["pixel_values"], pixel_position_ids=batch["pixel_position_ids"]).last_hidden_state
    assert static.shape == runtime.shape
    if mode == "quant":
        assert torch.equal(static, runtime)
    else:
        floor = noise_floor(qmodel, module, batch["pixel_values"], static, None)
        assert float((static - runtime).abs().max()) <= floor.max_abs, floor


def test_as_export_module_needs_the_layout(tiny_quant):
    for bad in (None, [[0, 0]]):
        with pytest.raises(ExportError) as e:
            tiny_quant.as_export_module(bad)
        assert "pixel_position_ids" in _one_line(e.value)
    with pytest.raises(ExportError):
        tiny_quant.as_export_module()


def test_plain_torch_export_of_the_adapter_registers_meta_kernels(tmp_path):
    """The README's way to export without export_circle (as_export_module + torch.export) must not
    run real fake-quant kernels while tracing, even when core.export.pipeline was never imported."""
    script = tmp_path / "plain_export.py"
    script.write_text(
        "import sys, torch\n"
        "import torch._subclasses.fake_tensor as ft\n"
        "from core.data.images import ImagePreprocessor\n"
        "from core.models import load_model\n"
        "from core.ptq import calibrate, convert, prepare\n"
        "from core.data.resources import resource_path\n"
        "q = prepare(load_model('tiny'))\n"
        "pre = ImagePreprocessor(q.config, max_soft_tokens=70)\n"
        "b = pre([resource_path('samples/astronaut.jpg')])\n"
        "calibrate(q, [b | {'image_ids': ['a']}])\n"
        "convert(q)\n"
        "calls = []\n"
        "real = ft.run_fallback_kernel\n"
        "ft.run_fallback_kernel = lambda *a, **k: (calls.append(str(a[1])), real(*a, **k))[1]\n"
        "m = q.as_export_module(b['pixel_position_ids']).eval()\n"
        "with torch.no_grad():\n"
        "    torch.export.export(m, (b['pixel_values'],), strict=False)\n"
        "assert 'core.export.pipeline' not in sys.modules, 'the test must not import core.export.pipeline'\n"
        "print('fallbacks', len(calls))\n"
    )
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=root, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fallbacks 0" in done.stdout, done.stdout


# ------------------------------------------------------------------ verified exports of tiny
@pytest.fixture(scope="module")
def quant_export(tiny_quant, tmp_path_factory) -> ExportResult:
    out = tmp_path_factory.mktemp("export") / "tiny_q.circle"
    seen = []
    result = export_circle(
        tiny_quant, _batch(tiny_quant.config, SQUARE, 70), out, progress=lambda d, t, m: seen.append((d, t, m))
    )
    result.progress_seen = seen  # type: ignore[attr-defined]
    return result


def test_quant_export_is_fully_quantized_and_verified(quant_export, tiny_quant):
    r = quant_export
    assert r.path.is_file() and r.bytes == r.path.stat().st_size > 0
    assert r.mode == "quant"
    assert r.tensors_without_qparams == [], r.unquantized_details
    assert len(r.io_tensors) == 2 and r.io_tensors[0].startswith("input")
    assert r.op_counts.get("FULLY_CONNECTED", 0) > 0 and "CUSTOM" not in "".join(r.op_counts)
    v = r.verify
    assert v is not None and v.mode == "quant" and "FAKE_QUANTIZE" in v.runtime
    assert v.output_observer == tiny_quant.observers()[-1].name == "output"
    assert v.step == pytest.approx(float(tiny_quant.observers()[-1].scale))
    # Judged against torch's own rounding noise on this machine (core.export.verdict), not a constant.
    floor = v.noise_floor
    assert floor is not None and floor.within_one_step is not None and floor.rel >= 2.0**-24
    assert v.verdict.level == "verified", v.verdict
    assert v.within_one_step >= floor.within_one_step - 3 * (floor.within_one_step * (1 - floor.within_one_step) / floor.elements) ** 0.5
    assert v.max_steps <= (floor.max_steps + 1.0) * (1 + STEP_HAIR), (v, floor)
    # Same static path, same kernels and shapes: forward_export and the runtime forward are equal.
    assert v.export_vs_forward == 0.0
    assert v.vs_runtime_forward == v.max_abs_diff


def _halve_scale(data: bytes, result: ExportResult, module: str) -> tuple[bytes, str]:
    """The file with the scale of one activation tensor of `module` halved in place."""
    import struct

    from tico.circle.runtime.program import CircleProgram

    program = CircleProgram.from_bytes(data)
    for t in program.tensors:
        if t.is_quantized and not t.is_constant and result.tensor_modules.get(t.name) == module:
            pattern = struct.pack("<f", t.quantization.scale[0])
            if data.count(pattern) == 1:
                return data.replace(pattern, struct.pack("<f", t.quantization.scale[0] / 2)), t.name
    raise AssertionError(f"no activation tensor of {module} with a unique scale")


def test_broken_file_reads_failed_with_a_reason(quant_export, tiny_quant):
    """A scale halved in the written file is a broken export: red, with the reason and what to do."""
    from core.export.pipeline import verify_circle

    broken, name = _halve_scale(quant_export.path.read_bytes(), quant_export, "patch_embedder")
    batch = _batch(tiny_quant.config, SQUARE, 70)
    module = tiny_quant.as_export_module(batch["pixel_position_ids"])
    with torch.no_grad():
        v = verify_circle(broken, tiny_quant, module, batch["pixel_values"], batch["pixel_position_ids"])
    assert v.verdict.level == "failed", (name, v.verdict)
    assert "steps" in v.verdict.reason and "three-way" in v.verdict.advice
    assert quant_export.verify.verdict.level == "verified"


def test_lean_runtime_loop_matches_the_runtime_bit_for_bit(quant_export, tiny_quant, monkeypatch):
    """Verification runs TICO's kernels with values freed early and large blockwise ops in slabs;
    every tensor it computes equals what the runtime's own run() computes, exactly."""
    import numpy as np
    from tico.circle.runtime import CircleReferenceRuntime, ExecutionMode

    import core.export.runtime as export

    data = quant_export.path.read_bytes()
    runtime = CircleReferenceRuntime(data)
    pixels = _batch(tiny_quant.config, SQUARE, 70)["pixel_values"].float().numpy()
    expected = runtime.run([pixels], mode=ExecutionMode.FAKE_QUANTIZE, trace=True)

    blocked: list[str] = []
    real = export.execute_in_blocks

    def spy(runtime, op, values, mode):
        done = real(runtime, op, values, mode)
        if done:
            blocked.append(op.name)
        return done

    monkeypatch.setattr(export, "BLOCK_BYTES", 4096)  # tiny's tensors are small: force slabs
    monkeypatch.setattr(export, "execute_in_blocks", spy)
    every = set(expected.tensor_values)
    outputs, kept = export.run_keeping(CircleReferenceRuntime(data), [pixels], ExecutionMode.FAKE_QUANTIZE, every)
    assert {"SOFTMAX", "BATCH_MATMUL", "ADD", "MUL"} <= set(blocked), sorted(set(blocked))
    assert np.array_equal(outputs[0], expected.outputs[0])
    assert kept.keys() == every
    for index in every:
        assert np.array_equal(kept[index], expected.tensor_values[index]), runtime.program.tensor(index).describe()

    # Streaming: each wanted tensor is handed over once, as it is made, and nothing is kept.
    handed: dict[int, np.ndarray] = {}

    def take(index, value):
        assert index not in handed
        handed[index] = value.copy()

    outputs, kept = export.run_keeping(CircleReferenceRuntime(data), [pixels], ExecutionMode.FAKE_QUANTIZE, every, on_value=take)
    assert kept == {} and handed.keys() == every
    assert all(np.array_equal(handed[i], expected.tensor_values[i]) for i in every)


def test_quant_export_maps_every_tensor_to_its_module(quant_export, tiny_quant):
    r = quant_export
    names = {n for n, _ in tiny_quant.wrappers()} | {ROOT_MODULE}
    assert r.tensor_modules and set(r.tensor_modules.values()) <= names
    owners = set(r.tensor_modules.values())
    for module in ("patch_embedder", "encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.down_proj", "pooler"):
        assert module in owners, module
    assert r.unquantized == []  # tensors_without_qparams with their modules: none here
    assert r.layout == layout_fingerprint(_batch(tiny_quant.config, SQUARE, 70)["pixel_position_ids"])
    assert r.layout != layout_fingerprint(_batch(tiny_quant.config, WIDE, 70)["pixel_position_ids"])
    # The scopes routed through nn.Module.__call__ while tracing are gone again.
    for _, wrapper in tiny_quant.wrappers():
        assert not {"forward", "forward_static", "run_layers"} & set(wrapper.__dict__)


def test_quant_export_reports_stages_and_progress(quant_export):
    r = quant_export
    for stage in ("torch.export", "decompositions", "converter passes", "serialisation", "write", "verify"):
        assert r.timings[stage] >= 0.0
    seen = r.progress_seen  # type: ignore[attr-defined]
    assert [d for d, _, _ in seen] == list(range(1, len(seen) + 1))
    assert all(t == seen[-1][1] for _, t, _ in seen) and seen[-1][0] == seen[-1][1]


def test_float_export_of_uncalibrated_model(tiny_float, tmp_path):
    """NO_QUANT without statistics is a float export: allowed, and it matches torch as well as torch
    matches itself under this machine's rounding noise."""
    assert not tiny_float.is_calibrated
    r = export_circle(tiny_float, _batch(tiny_float.config, SQUARE, 70), tmp_path / "f.circle")
    v = r.verify
    assert r.mode == "float" and v.mode == "float" and "NATIVE" in v.runtime
    assert v.verdict.level == "verified", v.verdict
    assert v.noise_floor.within_one_step is None and v.noise_floor.max_abs > 0
    # Two implementations (the file's runtime, torch) each within one noisy copy's distance.
    assert v.max_abs_diff <= 2 * v.noise_floor.max_abs, v
    # forward_export (static) against Hugging Face's padded path: other GEMM shapes, within the floor.
    assert v.export_vs_forward <= v.noise_floor.max_abs, v
    assert tiny_float.mode is Mode.NO_QUANT


def test_export_accepts_position_ids_and_session_argument_order(tiny_quant, tmp_path):
    batch = _batch(tiny_quant.config, WIDE, 70)
    # Session calls export_circle(qmodel, out_path, image=..., max_soft_tokens=...).
    r = export_circle(tiny_quant, tmp_path / "s.circle", image=resource_path(WIDE), max_soft_tokens=70, verify=False)
    assert r.path == tmp_path / "s.circle" and r.verify is None and r.soft_tokens > 0
    r2 = export_circle(tiny_quant, batch["pixel_position_ids"], tmp_path / "p.circle", verify=False)
    assert r2.path.read_bytes() == r.path.read_bytes()
    assert tiny_quant.mode is Mode.QUANT


# ------------------------------------------------------------------ graph hygiene
def test_exported_graph_is_clean(tiny_quant, tiny_float):
    for qmodel in (tiny_quant, tiny_float):
        batch = _batch(qmodel.config, WIDE, 140)
        module = qmodel.as_export_module(batch["pixel_position_ids"]).eval()
        with torch.no_grad():
            program = torch.export.export(module, (batch["pixel_values"],), strict=False)
        assert check_graph(program) == []


def test_tracing_never_runs_real_fake_quant_kernels(tiny_quant, monkeypatch):
    """torch.export of the QUANT export module computes no real tensors: without our Meta kernels
    every fake-quant ran on zero-filled real copies (gigabytes on e2b, see core.quant.meta_kernels)."""
    import torch._subclasses.fake_tensor as fake_tensor

    from core.quant import meta_kernels

    assert set(meta_kernels.register()) >= {"fake_quantize_per_tensor_affine_cachemask", "fake_quantize_per_channel_affine_cachemask"}
    fallbacks: list[str] = []
    real_fallback = fake_tensor.run_fallback_kernel

    def spy(fake_mode, func, *args, **kwargs):
        fallbacks.append(str(func))
        return real_fallback(fake_mode, func, *args, **kwargs)

    monkeypatch.setattr(fake_tensor, "run_fallback_kernel", spy)
    batch = _batch(tiny_quant.config, SQUARE, 70)
    module = tiny_quant.as_export_module(batch["pixel_position_ids"]).eval()
    with torch.no_grad():
        program = torch.export.export(module, (batch["pixel_values"],), strict=False)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "aten.fake_quantize_per_tensor_affine.default" in targets
    assert "aten.fake_quantize_per_channel_affine.default" in targets
    assert fallbacks == []

    # The Meta kernels state what the real ones return.
    x = torch.randn(3, 5)
    scale, zp = torch.full((5,), 0.1), torch.zeros(5, dtype=torch.int32)
    for real, meta in (
        (torch.ops.aten.fake_quantize_per_tensor_affine_cachemask(x, 0.1, 0, -128, 127),
         torch.ops.aten.fake_quantize_per_tensor_affine_cachemask(x.to("meta"), 0.1, 0, -128, 127)),
        (torch.ops.aten.fake_quantize_per_channel_affine_cachemask(x, scale, zp, 1, -128, 127),
         torch.ops.aten.fake_quantize_per_channel_affine_cachemask(x.to("meta"), scale.to("meta"), zp.to("meta"), 1, -128, 127)),
    ):
        assert [(t.shape, t.dtype) for t in real] == [(t.shape, t.dtype) for t in meta]


class _Dirty(torch.nn.Module):
    def forward(self, x):
        keep = ~(x > 0)  # bitwise_not
        picked = x[keep]  # boolean-mask indexing, data-dependent shape
        idx = torch.nonzero(x)
        return picked.sum() + idx.shape[0] + torch.nn.functional.one_hot(x.long().clamp(0, 3), 4).sum()


class _Unconvertible(torch.nn.Module):
    def forward(self, x):
        return torch.erfinv(x.clamp(-0.5, 0.5))


def test_check_graph_flags_offenders():
    program = torch.export.export(_Dirty(), (torch.randn(4, 4),), strict=False)
    problems = " ".join(check_graph(program, convertible=False))
    for word in ("bitwise_not", "nonzero", "boolean mask", "data-dependent", "one_hot"):
        assert word in problems, (word, problems)
    problems = check_graph(torch.export.export(_Unconvertible(), (torch.randn(4, 4),), strict=False))
    assert any("erfinv" in p for p in problems), problems


# ------------------------------------------------------------------ failures: one-line core.errors
def test_missing_folder(tiny_quant, tmp_path):
    with pytest.raises(UnwritablePathError) as e:
        export_circle(tiny_quant, _batch(tiny_quant.config, SQUARE, 70), tmp_path / "nope" / "m.circle")
    assert "does not exist" in _one_line(e.value)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores folder permissions")
def test_unwritable_folder(tiny_quant, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(UnwritablePathError) as e:
            export_circle(tiny_quant, _batch(tiny_quant.config, SQUARE, 70), folder / "m.circle")
        assert "not writable" in _one_line(e.value)
    finally:
        folder.chmod(0o755)


def test_uncalibrated_quant_request(tiny_float, tmp_path):
    with pytest.raises(NotCalibratedError) as e:
        export_circle(tiny_float, _batch(tiny_float.config, SQUARE, 70), tmp_path / "m.circle", mode="quant")
    assert "calibrate" in _one_line(e.value)
    assert not (tmp_path / "m.circle").exists()


def test_profile_that_does_not_fit(tmp_path):
    model = load_model("tiny")
    small = prepare(type(model)(tiny_config(position_embedding_size=16)).eval())
    with pytest.raises(ExportError) as e:
        export_circle(small, _batch(small.config, WIDE, 280), tmp_path / "m.circle")
    assert "position embeddings" in _one_line(e.value)


def test_mismatched_patch_size(tiny_float, tmp_path):
    batch = _batch(tiny_float.config, SQUARE, 70)
    bad = {"pixel_values": batch["pixel_values"][..., :300], "pixel_position_ids": batch["pixel_position_ids"]}
    with pytest.raises(ExportError) as e:
        export_circle(tiny_float, bad, tmp_path / "m.circle")
    assert "patches of 300 values" in _one_line(e.value)


def test_cancel_leaves_earlier_file_untouched(tiny_quant, tmp_path):
    out = tmp_path / "m.circle"
    out.write_bytes(b"earlier model")
    token = CancelToken()

    def progress(done, total, message):
        if done == 2:  # after torch.export
            token.cancel()

    with pytest.raises(CancelledError) as e:
        export_circle(tiny_quant, _batch(tiny_quant.config, SQUARE, 70), out, progress=progress, cancel=token)
    _one_line(e.value)
    assert out.read_bytes() == b"earlier model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.circle"]  # no temp file left
    assert tiny_quant.mode is Mode.QUANT


def test_errors_are_ptqstudio_errors():
    for cls in (ExportError, UnwritablePathError, NotCalibratedError, CancelledError):
        assert issubclass(cls, PTQStudioError)


# ------------------------------------------------------------------ e2b
@pytest.fixture(scope="module")
def e2b_export(tmp_path_factory):
    model = load_model("e2b")
    q = prepare(model)
    del model
    calibrate(q, _batches(q.config, sample_images()[:2], 280))
    convert(q)
    batch = _batch(q.config, SQUARE, 280)
    result = export_circle(q, batch, tmp_path_factory.mktemp("e2b") / "e2b.circle")
    return q, batch, result


@pytest.mark.slow
def test_e2b_export_280_is_fully_quantized_and_verified(e2b_export):
    """e2b at 280 soft tokens, uint8: the file is as close to torch as torch is to itself.

    The issue-3 target of 99% within one step is not reachable on e2b even by torch against
    itself: with ~1,200 uint8 quantizers in a row, float32 rounding noise flips enough ties that
    the floor is itself far below 99% (README, "What the export verdict means", has the figures).
    So the assertion is the verdict's: no further from torch than the noise floor. Time (<= 10
    min) and peak RSS (<= 4 GB) are measured by bench/bench_export.py in a process of its own."""
    _, _, r = e2b_export
    v = r.verify
    assert r.tensors_without_qparams == [], r.unquantized_details
    assert v.export_vs_forward == 0.0  # same static path, same kernels
    assert r.soft_tokens == 256 and r.bytes > 0
    assert v.verdict.level == "verified", v.verdict
    floor = v.noise_floor
    slack = 3 * (floor.within_one_step * (1 - floor.within_one_step) / floor.elements) ** 0.5
    assert v.within_one_step >= floor.within_one_step - slack, (v.within_one_step, floor)
    assert v.max_steps <= (floor.max_steps + 1.0) * (1 + STEP_HAIR), (v.max_steps, floor)


@pytest.fixture(scope="module")
def e2b_float_export(tmp_path_factory):
    # 70 soft tokens: the float file's checks do not depend on the profile's size, and the
    # conversion (the same 1,500 nodes at any size) is what this test costs.
    q = prepare(load_model("e2b"))
    batch = _batch(q.config, SQUARE, 70)
    result = export_circle(q, batch, tmp_path_factory.mktemp("e2b_float") / "e2b_float.circle", mode="float")
    return q, batch, result


@pytest.mark.slow
def test_e2b_float_export_matches_as_well_as_torch_matches_itself(e2b_float_export):
    """Float e2b: the file differs from forward_export by no more than two noisy torch copies do,
    and the static path from the padded one by no more than one (core.export.verdict's floor)."""
    _, _, r = e2b_float_export
    v = r.verify
    assert r.mode == "float" and v.mode == "float" and v.step is None
    assert v.verdict.level == "verified", v.verdict
    assert v.max_abs_diff <= 2 * v.noise_floor.max_abs, v
    assert v.export_vs_forward <= v.noise_floor.max_abs, v


def test_uint4_weights_export_and_verify(tiny, tmp_path):
    """Packed 4-bit weights (Circle's UINT4, two codes a byte) are read back right where the file is
    rewritten for a runtime (a bridged op's constants are dequantized), and the export verifies."""
    from core.config import PTQConfig, QuantSpec

    q = prepare(tiny, PTQConfig(weight=QuantSpec("uint4", per_channel=True)))
    calibrate(q, _batches(tiny.config, sample_images()[:2]))
    convert(q)
    r = export_circle(q, tmp_path / "u4.circle", _batch(tiny.config, SQUARE, 70))
    assert r.tensors_without_qparams == [], r.unquantized_details
    assert r.verify is not None and r.verify.verdict.level == "verified", r.verify.verdict
