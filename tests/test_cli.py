"""`ptq-studio` CLI end to end on the bundled photographs, plus the bad-input corpus.

The four commands run as real subprocesses with --json and their documents are checked on
values; the bad inputs run in-process through core.cli.main.main (same code path, much faster)
and a couple of them again as subprocesses to pin the real exit status.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from core.cli import main as cli
from core.cli.commands import report_document
from core.cli.common import Progress
from core.io import json_safe
from core.session import MANIFEST, OBSERVERS, Session

ROOT = Path(__file__).resolve().parents[1]
MST = "70"


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "core.cli.main", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd or ROOT,
        timeout=600,
    )


def digest(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def without_timing(doc):
    if isinstance(doc, dict):
        return {k: without_timing(v) for k, v in doc.items() if k not in ("seconds", "session")}
    if isinstance(doc, list):
        return [without_timing(v) for v in doc]
    return doc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def quantized(workdir, sample_images):
    """`quantize --json` on four photographs plus two bad files."""
    from tests.conftest import make_bad_images

    bad = make_bad_images(workdir / "bad", sample_images[0])
    out = workdir / "tiny.session"
    proc = run_cli(
        "quantize", "--model", "tiny", "--images", *sample_images[:4], bad["empty.jpg"], bad["truncated.jpg"],
        "--out", out, "--max-soft-tokens", MST, "--json",
    )
    assert proc.returncode == 0, proc.stderr
    return out, json.loads(proc.stdout)


# ------------------------------------------------------------------------------ end to end


def test_quantize_json(quantized, sample_images):
    out, doc = quantized
    assert doc["command"] == "quantize" and Path(doc["session"]) == out.absolute()
    assert [Path(i["path"]).name for i in doc["images"]["accepted"]] == [p.name for p in sample_images[:4]]
    rejected = {Path(i["path"]).name: i["reason"] for i in doc["images"]["rejected"]}
    assert set(rejected) == {"empty.jpg", "truncated.jpg"} and all(rejected.values())
    assert doc["calibration"]["images_done"] == 4 and doc["max_soft_tokens"] == 70
    assert doc["observers"]["count"] == doc["observers"]["with_stats"] > 50
    assert doc["model"]["layers"] == 2 and doc["config"]["activation"]["dtype"] == "uint8"
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, OBSERVERS]


def test_report_json_and_plots(quantized, workdir, sample_images):
    out, _ = quantized
    plots = workdir / "plots"
    proc = run_cli("report", out, "--images", *sample_images[4:6], "--json", "--plots", plots)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    observers = doc["observers"]
    loaded = Session.load(out)
    assert [o["name"] for o in observers] == [o.name for o in loaded.qmodel.observers()]
    assert all(o["has_stats"] and o["min"] <= o["max"] for o in observers)
    weights = [o for o in observers if o["kind"] == "weight" and o["per_channel"]]
    assert weights and all(len(o["channel_scale"]) == o["channels"] for o in weights)
    acts = [o for o in observers if o["kind"] == "activation"]
    assert all(o["max_source"].split("#")[0] in {p.name for p in sample_images[:4]} for o in acts)
    errors = doc["errors"]
    assert [m["name"] for m in errors["modules"]] == [n for n, _ in loaded.qmodel.wrappers()]
    assert errors["images"] == [f"{p.name}" for p in sample_images[4:6]] or len(errors["images"]) == 2
    e2e = errors["end_to_end"]
    assert 10 < e2e["sqnr_db"] < 60 and 0 < e2e["peir"] < 0.5 and e2e["cosine"] > 0.95
    assert all(0 <= m["clipped_fraction"] < 0.05 and m["num_samples"] > 0 for m in errors["modules"])
    stems = [p.stem for p in sample_images[4:6]]
    assert [Path(p).name for p in doc["plots"]] == ["ranges.png", "errors.png", "scatter.png"] + [
        f"heatmap_{s}.png" for s in stems
    ]
    for p in doc["plots"]:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.width >= 400 and im.height >= 250
    # one heatmap per evaluated image, of the final output (one value per soft token)
    heat = doc["heatmaps"]
    assert [Path(h["path"]).name for h in heat] == [p.name for p in sample_images[4:6]]
    assert all(h["module"] == "model" and h["level"] == "token" and h["rows"] > 0 for h in heat)
    assert all(0 < h["min_error"] <= h["mean_error"] <= h["max_error"] for h in heat)
    # the first-divergence search: one entry per layer unit, the located one among them
    div = doc["divergence"]
    names = [e["name"] for e in div["entries"]]
    assert div["unit"] == "layer" and names == ["patch_embedder", "encoder.layers.0", "encoder.layers.1", "pooler", "model"]
    assert div["located"]["name"] in names and div["summary"].startswith("first divergence: ")
    assert div["entries"][-1]["output_sqnr_db"] == pytest.approx(e2e["sqnr_db"], abs=1e-3)


def test_report_human_readable(quantized):
    out, _ = quantized
    proc = run_cli("report", out)  # default: the calibration images
    assert proc.returncode == 0, proc.stderr
    assert "End to end: PEIR" in proc.stdout and "encoder.layers.0.self_attn.probs" in proc.stdout
    assert proc.stderr == ""  # stderr is not a terminal here: no progress bar
    first = proc.stdout.splitlines()[0]
    assert first.startswith("first divergence: ") and " dB" in first  # before every table


def test_report_divergence_per_module_and_off(quantized, sample_images, workdir):
    out, _ = quantized
    proc = run_cli("report", out, "--images", sample_images[4], "--divergence", "module", "--json")
    assert proc.returncode == 0, proc.stderr
    div = json.loads(proc.stdout)["divergence"]
    assert div["unit"] == "module" and div["entries"][0]["name"] == "patch_embedder.input_proj"
    assert len(div["entries"]) > 20
    plots = workdir / "plots_off"
    proc = run_cli("report", out, "--images", sample_images[4], "--divergence", "off", "--json", "--plots", plots)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["divergence"] is None
    assert (plots / f"heatmap_{sample_images[4].stem}.png").is_file()  # heatmaps without the search


def test_sensitivity_json(quantized, sample_images):
    out, _ = quantized
    proc = run_cli("sensitivity", out, "--images", sample_images[4], "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    ranking = doc["ranking"]
    assert [r["name"] for r in sorted(ranking, key=lambda r: r["name"])] == ["encoder.layers.0", "encoder.layers.1"]
    gains = [r["improvement_db"] for r in ranking]
    assert gains == sorted(gains, reverse=True)
    base = doc["baseline"]["sqnr_db"]
    for r in ranking:
        assert r["improvement_db"] == pytest.approx(r["sqnr_db"] - base)


def test_export_json(quantized, workdir):
    out, _ = quantized
    circle = workdir / "tiny.circle"
    proc = run_cli("export", out, "--out", circle, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert Path(doc["path"]) == circle.absolute() or Path(doc["path"]) == circle
    assert circle.stat().st_size == doc["bytes"] > 0
    assert doc["tensors_without_qparams"] == []
    verify = doc["verify"]
    assert verify["runtime"] and verify["verdict"]["level"] == "verified", verify
    assert verify["noise_floor"]["rel"] > 0 and 0 <= verify["peir"] < 0.1
    linears = sum(1 for n in Session.load(out).qmodel.wrappers() if n[0].endswith("_proj"))
    assert doc["op_counts"]["FULLY_CONNECTED"] >= linears


def test_reloaded_session_gives_the_same_report_in_a_new_process(workdir, sample_images):
    """The session as calibrated in this process and as reloaded by the CLI report the same."""
    session = Session("tiny", max_soft_tokens=int(MST))
    session.add_images(sample_images[:3])
    session.calibrate()
    folder = workdir / "same.session"
    session.save(folder)
    images = sample_images[6:8]
    here = report_document(session, session.evaluate(images=images))
    proc = run_cli("report", folder, "--images", *images, "--json")
    assert proc.returncode == 0, proc.stderr
    there = json.loads(proc.stdout)
    assert json.loads(json.dumps(json_safe(here["observers"]))) == there["observers"]
    assert json.loads(json.dumps(json_safe(here["errors"]))) == there["errors"]
    again = json.loads(run_cli("report", folder, "--images", *images, "--json").stdout)
    assert without_timing(again) == without_timing(there)


# ------------------------------------------------------------------------------ bad inputs


def main_in_process(capfd, *args) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in args])
    captured = capfd.readouterr()
    return rc, captured.out, captured.err


def assert_error_document(stdout: str, code: int = 2) -> None:
    """With --json a failure still prints exactly one JSON document: the error."""
    doc = json.loads(stdout)
    assert doc["error"]["exit_code"] == code and doc["error"]["message"]


def assert_one_line_error(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ptq-studio: ")
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("name", ["empty.jpg", "text_renamed.jpg", "truncated.jpg", "bomb.png", "unsupported_compression.tif"])
def test_quantize_on_a_bad_image_exits_2(capfd, bad_images, tmp_path, name):
    out = tmp_path / "s"
    rc, stdout, err = main_in_process(capfd, "quantize", "--images", bad_images[name], "--out", out, "--max-soft-tokens", MST, "--json")
    assert rc == 2
    assert_error_document(stdout)
    assert_one_line_error(err, name)
    assert not out.exists()


def test_quantize_on_an_empty_folder_or_missing_path_exits_2(capfd, empty_images_dir, missing_image_path, tmp_path):
    rc, _, err = main_in_process(capfd, "quantize", "--images", empty_images_dir, "--out", tmp_path / "a")
    assert rc == 2
    assert_one_line_error(err, str(empty_images_dir))
    rc, _, err = main_in_process(capfd, "quantize", "--images", missing_image_path, "--out", tmp_path / "b")
    assert rc == 2
    assert_one_line_error(err, missing_image_path.name)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_failed_quantize_leaves_an_existing_session_untouched(capfd, quantized, bad_images):
    out, _ = quantized
    before = digest(out)
    rc, _, err = main_in_process(capfd, "quantize", "--images", bad_images["bomb.png"], "--out", out)
    assert rc == 2
    assert_one_line_error(err, "bomb.png")
    assert digest(out) == before


def test_quantize_refuses_to_overwrite_what_is_not_a_session(capfd, sample_images, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    rc, _, err = main_in_process(capfd, "quantize", "--images", sample_images[0], "--out", folder)
    assert rc == 2
    assert_one_line_error(err, str(folder))
    assert (folder / "notes.txt").read_text() == "keep me" and len(list(folder.iterdir())) == 1
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, _, err = main_in_process(capfd, "quantize", "--images", sample_images[0], "--out", blocker / "s")
    assert rc == 2
    assert_one_line_error(err, "not a writable folder")
    assert blocker.read_text() == "x"


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda f: (f / MANIFEST).write_bytes(b"\x00garbage"), MANIFEST),
        (lambda f: (f / OBSERVERS).write_bytes(b"\x00" * 64), OBSERVERS),
    ],
    ids=["manifest", "observers"],
)
def test_corrupted_session_exits_2_and_is_not_touched(capfd, quantized, tmp_path, damage, needle):
    src, _ = quantized
    folder = tmp_path / "broken.session"
    shutil.copytree(src, folder)
    damage(folder)
    before = digest(folder)
    for args in (["report", folder], ["sensitivity", folder, "--images", src], ["export", folder, "--out", tmp_path / "x.circle"]):
        rc, stdout, err = main_in_process(capfd, *args, "--json")
        assert rc == 2
        assert_error_document(stdout)
        assert_one_line_error(err, needle)
    assert digest(folder) == before
    assert not (tmp_path / "x.circle").exists()


def test_session_whose_checkpoint_changed_exits_2(capfd, tmp_path, sample_images):
    from safetensors.torch import load_file, save_file

    from core.models import load_model

    ckpt = tmp_path / "ckpt"
    load_model("tiny").save_pretrained(ckpt)
    out = tmp_path / "ckpt.session"
    rc, _, err = main_in_process(capfd, "quantize", "--model", ckpt, "--images", sample_images[0], "--out", out, "--max-soft-tokens", MST)
    assert rc == 0, err
    weights = next(ckpt.glob("*.safetensors"))
    tensors = load_file(weights)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] * 1.01
    save_file(tensors, weights, metadata={"format": "pt"})
    before = digest(out)
    rc, _, err = main_in_process(capfd, "report", out)
    assert rc == 2
    assert_one_line_error(err, "changed", str(ckpt.resolve()))
    assert digest(out) == before


def test_bad_arguments_exit_2_with_one_line(capfd, sample_images, tmp_path):
    rc, _, err = main_in_process(capfd, "quantize", "--images", sample_images[0], "--out", tmp_path / "s", "--max-soft-tokens", "71")
    assert rc == 2
    assert_one_line_error(err, "--max-soft-tokens 71")
    rc, _, err = main_in_process(capfd, "quantize", "--images", sample_images[0], "--out", tmp_path / "s", "--bogus")
    assert rc == 2
    assert_one_line_error(err, "--bogus")
    rc, _, err = main_in_process(capfd, "report")
    assert rc == 2
    assert_one_line_error(err, "SESSION")
    rc, _, err = main_in_process(capfd, "report", tmp_path / "nowhere")
    assert rc == 2
    assert_one_line_error(err, "nowhere")


def test_real_process_exit_codes(bad_images, tmp_path):
    proc = run_cli("quantize", "--images", bad_images["text_renamed.jpg"], "--out", tmp_path / "s", "--json")
    assert proc.returncode == 2
    assert_error_document(proc.stdout)
    assert_one_line_error(proc.stderr, "text_renamed.jpg")
    proc = run_cli("report", tmp_path / "missing.session")
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "missing.session")


def test_internal_error_exits_1_with_a_hint(capfd, monkeypatch):
    def boom(args, progress):
        raise RuntimeError("something broke\nover two lines")

    monkeypatch.setitem(cli.COMMANDS, "report", boom)
    rc, _, err = main_in_process(capfd, "report", "x")
    assert rc == 1
    assert_one_line_error(err, "internal error", "RuntimeError", "--debug")
    rc, _, err = main_in_process(capfd, "report", "x", "--debug")
    assert rc == 1 and "Traceback" in err


def test_json_mode_keeps_stray_prints_off_stdout(capfd, monkeypatch):
    def noisy(args, progress):
        print("library chatter")
        os.write(1, b"C-level chatter\n")
        return {"command": "report", "value": float("inf")}, "text"

    monkeypatch.setitem(cli.COMMANDS, "report", noisy)
    rc, out, err = main_in_process(capfd, "report", "x", "--json")
    assert rc == 0
    assert json.loads(out) == {"command": "report", "value": None}  # exactly one document; inf -> null
    assert "library chatter" in err and "C-level chatter" in err


def test_progress_is_drawn_only_on_a_terminal():
    class Stream:
        def __init__(self, tty):
            self.tty, self.text = tty, ""

        def isatty(self):
            return self.tty

        def write(self, s):
            self.text += s

        def flush(self):
            pass

    quiet, loud = Stream(False), Stream(True)
    for stream in (quiet, loud):
        p = Progress(stream)
        p(1, 2, "one")
        p(2, 2, "two")
        p.close()
    assert quiet.text == ""
    assert "2/2" in loud.text and loud.text.endswith("\n")


def test_no_arguments_opens_the_gui(monkeypatch, capsys):
    import types

    from ptq_studio import launcher

    calls = []
    fake = types.ModuleType("app.main")
    fake.main = lambda: calls.append("gui") or 0
    monkeypatch.setitem(sys.modules, "app.main", fake)
    assert launcher.main([]) == 0 and calls == ["gui"]
    # Any argument goes to the headless CLI, never the GUI.
    assert launcher.main(["--version"]) == 0 and calls == ["gui"]
    assert capsys.readouterr().out.startswith("ptq-studio ")


def test_cli_without_a_command_is_a_usage_error(capsys):
    # core.cli.main knows nothing of the GUI (the launcher opens it): no command is exit 2, one line.
    assert cli.main([]) == 2
    assert capsys.readouterr().err.startswith("ptq-studio: choose a command")
