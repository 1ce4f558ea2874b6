"""Issue 11: strict inputs, outputs checked first, exit codes, fast startup, a locked-down loopback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import ConfigError, ModelLoadError, SessionFileError
from tests.conftest import MST
from tests.test_cli_diag import run

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# startup: usage answers without torch or transformers (the time is measured by bench_startup)
# ---------------------------------------------------------------------------------------------

_PROBE = """
import json, sys
from ptq_studio.launcher import main
rc = main(sys.argv[1:]) if len(sys.argv) > 1 else None
heavy = sorted(m for m in ("torch", "transformers", "tico", "PySide6", "numpy", "PIL") if m in sys.modules)
print(json.dumps({"rc": rc, "heavy": heavy}))
"""


@pytest.mark.parametrize(
    "args,rc", [(["--help"], 0), (["--version"], 0), (["quantize", "--bogus"], 2), (["report"], 2), ([], None)]
)
def test_usage_answers_without_heavy_imports(args: list[str], rc: int | None) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"rc": rc, "heavy": []}


# ---------------------------------------------------------------------------------------------
# shared fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def session_copy(session_dir, tmp_path) -> Path:
    return Path(shutil.copytree(session_dir, tmp_path / "copy"))


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def no_work(monkeypatch):
    """Any calibration, evaluation or export fails the test: the command must stop before them."""

    def refuse(*_a, **_k):
        raise AssertionError("work started before the inputs were checked")

    import core.analysis.abtest
    import core.session

    for name in ("calibrate", "evaluate", "export", "recalibrate_without"):
        monkeypatch.setattr(core.session.Session, name, refuse)
    monkeypatch.setattr(core.analysis.abtest.ABComparison, "calibrate_b", refuse)


# ---------------------------------------------------------------------------------------------
# globs
# ---------------------------------------------------------------------------------------------

NAMES = ["", "patch_embedder", "encoder.layers.0.mlp.down_proj", "encoder.layers.0.mlp.up_proj", "pooler"]


def test_check_globs_names_the_glob_and_the_closest_modules() -> None:
    from core.config import PTQConfig, check_globs

    check_globs(["encoder.layers.*", "pooler", "encoder.layers.0"], NAMES)  # parents match their children
    with pytest.raises(ConfigError) as e:
        check_globs(["pooler", "encoder.layers.0.mlp.dwn_proj"], NAMES, source="--keep-float")
    msg = e.value.message
    assert "--keep-float 'encoder.layers.0.mlp.dwn_proj' matches no module" in msg
    assert "encoder.layers.0.mlp.down_proj" in msg.split("closest modules:")[1]
    assert len(msg.split("closest modules:")[1].split(",")) == 3
    with pytest.raises(ConfigError, match="'nosuch"):
        PTQConfig(overrides={"pooler": "int16", "nosuch.*": "float"}).check_globs(NAMES)


def test_one_override_grammar_for_the_gui_box_and_the_cli_flags() -> None:
    from core.config import PTQConfig, override_line, parse_override_lines

    box = "encoder.layers.* = int16\n*.probs : float  # keep\n\n*.mlp.* = int16 / uint4\npooler = - / int8"
    flags = ["encoder.layers.*=int16", "*.probs=float", "*.mlp.*=int16/uint4", "pooler=-/int8"]
    assert parse_override_lines(box) == parse_override_lines(flags, "--b-override")
    config = PTQConfig(overrides=parse_override_lines(box))
    lines = [override_line(g, v) for g, v in config.to_dict()["overrides"].items()]
    assert PTQConfig(overrides=parse_override_lines("\n".join(lines))) == config
    with pytest.raises(ConfigError, match=r"^override line 2 'no equals sign': write GLOB=DTYPE"):
        parse_override_lines("a = int16\nno equals sign")
    with pytest.raises(ConfigError, match=r"^--b-override 'pooler': write GLOB=DTYPE"):
        parse_override_lines(["pooler"], "--b-override")
    with pytest.raises(ConfigError, match="give an activation or a weight dtype"):
        parse_override_lines(["pooler=-/-"], "--b-override")


def test_one_config_builder_keeps_what_is_not_chosen() -> None:
    from core.config import PTQConfig, QuantSpec, build_config

    plain = build_config(activation="int16", weight="uint4", observer="ema", keep_float=["pooler"])
    assert plain == PTQConfig(
        activation=QuantSpec(dtype="int16"), weight=QuantSpec(dtype="uint4", per_channel=True), observer="ema"
    ).with_keep_float(["pooler"])
    base = PTQConfig(activation=QuantSpec(scheme="symmetric"), percentile=99.0, overrides={"pooler": "int16"})
    b = build_config(base, activation="int8")
    assert b.activation == QuantSpec(dtype="int8", scheme="symmetric") and b.percentile == 99.0
    assert b.overrides == base.overrides and b.weight == base.weight and b.observer == base.observer
    assert build_config(base) == base and build_config(base, overrides={}).overrides == {}


def test_quantize_keep_float_typo_is_refused_before_calibrating(capfd, tmp_path, sample_images, no_work):
    out = tmp_path / "s"
    rc, stdout, err = run(
        capfd, "quantize", "--images", sample_images[0], "--out", out, "--max-soft-tokens", MST, "--keep-float", "nosuch.*"
    )
    line = one_error_line(err)
    assert rc == 2 and "'nosuch.*' matches no module" in line and "closest modules:" in line, err
    assert not out.exists()


def test_report_keep_float_typo_is_refused(capfd, session_dir, no_work):
    rc, _, err = run(capfd, "report", session_dir, "--keep-float", "encoder.layer.0")
    assert rc == 2 and "'encoder.layer.0' matches no module" in one_error_line(err)


def test_ab_override_typo_is_refused_before_calibrating_b(capfd, session_dir, no_work):
    rc, _, err = run(capfd, "ab", session_dir, "--b-override", "nonexistent.*=int16")
    assert rc == 2 and "--b-override 'nonexistent.*' matches no module" in one_error_line(err)


def test_calibrate_b_itself_refuses_a_glob_that_matches_nothing(session_dir):
    # The GUI's A/B tab goes through core.analysis.abtest.ABComparison.calibrate_b, not the CLI.
    from dataclasses import replace

    from core.analysis.abtest import ABComparison
    from core.session import Session

    s = Session.load(session_dir)
    with pytest.raises(ConfigError, match="'encoder.layers.9.*' matches no module"):
        ABComparison(s, replace(s.config, overrides={"encoder.layers.9.*": "int16"})).calibrate_b()


def test_recalibrate_exclude_glob(capfd, session_copy, sample_images, monkeypatch):
    from core.session import Session

    rc, _, err = run(capfd, "recalibrate", session_copy, "--exclude", "nosuch*.jpg")
    assert rc == 2 and "--exclude 'nosuch*.jpg' matches no image" in one_error_line(err)
    assert sample_images[0].name in err or sample_images[1].name in err  # the closest names
    seen = {}

    def fake(self, ids, **kwargs):
        seen["ids"] = ids
        raise ConfigError("stopped by the test")

    monkeypatch.setattr(Session, "recalibrate_without", fake)
    rc, _, err = run(capfd, "recalibrate", session_copy, "--exclude", f"*{sample_images[0].name}")
    assert rc == 2 and "stopped by the test" in err
    assert len(seen["ids"]) == 1 and seen["ids"][0].startswith(sample_images[0].name + "#")


# ---------------------------------------------------------------------------------------------
# outputs are checked before the work
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def blocker(tmp_path) -> Path:
    """A plain file: nothing can be written below it."""
    path = tmp_path / "a_file"
    path.write_text("x")
    return path


@pytest.mark.parametrize(
    "args",
    [
        ["export", "{missing}", "--out", "{blocker}/sub/m.circle"],
        ["report", "{missing}", "--plots", "{blocker}/plots"],
        ["locate", "{missing}", "obs", "--png", "{blocker}/x.png"],
        ["ab", "{missing}", "--b-activation", "int16", "--tico-yaml", "{blocker}/x.yaml"],
        ["ab", "{missing}", "--b-activation", "int16", "--one-json", "{blocker}/x.json"],
        ["recalibrate", "{missing}", "--exclude", "x", "--out", "{blocker}/s2"],
        ["quantize", "--images", "{missing}", "--out", "{blocker}/s"],
    ],
)
def test_unwritable_outputs_are_refused_before_loading_anything(capfd, tmp_path, blocker, args):
    missing = tmp_path / "no_such_session"
    argv = [a.format(missing=missing, blocker=blocker) for a in args]
    rc, _, err = run(capfd, *argv)
    line = one_error_line(err)
    # The output is named, not the (also missing) session: it was checked first.
    assert rc == 2 and str(blocker) in line and "cannot write here" in line, line


def test_export_creates_a_missing_folder_like_quantize(capfd, session_dir, tmp_path, monkeypatch):
    from core.errors import ExportError
    from core.session import Session

    seen = {}

    def fake_export(self, out, **kwargs):
        seen["parent_exists"] = Path(out).parent.is_dir()
        raise ExportError("stopped by the test")

    monkeypatch.setattr(Session, "export", fake_export)
    rc, _, err = run(capfd, "export", session_dir, "--out", tmp_path / "new" / "deeper" / "m.circle")
    assert rc == 2 and "stopped by the test" in err and seen == {"parent_exists": True}


def test_one_json_with_a_float_override_is_refused_before_calibrating_b(capfd, session_dir, tmp_path, no_work):
    rc, _, err = run(capfd, "ab", session_dir, "--b-override", "pooler=float", "--one-json", tmp_path / "one.json")
    line = one_error_line(err)
    assert rc == 2 and "--one-json" in line and "float" in line
    assert not (tmp_path / "one.json").exists()


# ---------------------------------------------------------------------------------------------
# exit codes and messages
# ---------------------------------------------------------------------------------------------


def test_manifest_with_unsupported_max_soft_tokens_is_a_session_error(capfd, session_copy):
    from core.session import MANIFEST, Session

    manifest = json.loads((session_copy / MANIFEST).read_text())
    manifest["max_soft_tokens"] = 7
    (session_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SessionFileError, match="max_soft_tokens 7"):
        Session.load(session_copy)
    rc, _, err = run(capfd, "images", session_copy)
    assert rc == 2 and "max_soft_tokens 7" in one_error_line(err)


@pytest.mark.parametrize("top", ["-3", "0", "x"])
def test_report_top_must_be_positive(capfd, session_dir, top):
    rc, out, err = run(capfd, "report", session_dir, "--top", top)
    assert rc == 2 and out == "" and "--top" in one_error_line(err)


def test_images_top_refuses_negative(capfd, session_dir):
    rc, _, err = run(capfd, "images", session_dir, "--top", "-1")
    assert rc == 2 and "--top" in one_error_line(err)


@pytest.mark.parametrize(
    "args,kind",
    [
        (["images", "{missing}", "--json"], "SessionFileError"),
        (["report", "{missing}", "--top", "-3", "--json"], "UsageError"),
        (["quantize", "--json"], "UsageError"),
    ],
)
def test_json_errors_are_one_document_on_stdout(capfd, tmp_path, args, kind):
    rc, out, err = run(capfd, *[a.format(missing=tmp_path / "nope") for a in args])
    doc = json.loads(out)
    assert rc == 2 and doc["error"]["type"] == kind and doc["error"]["exit_code"] == 2
    assert doc["error"]["message"] and doc["error"]["message"] in one_error_line(err)
    assert doc["command"] == args[0]


def test_decompression_bomb_quotes_the_projects_limit(tmp_path):
    from core.data.images import DEFAULT_MAX_IMAGE_PIXELS, open_image
    from core.errors import BadImageError
    from tests.conftest import make_bomb_png

    bomb = make_bomb_png(tmp_path / "huge.png")  # over twice Pillow's limit: Pillow itself refuses
    for limit in (None, 10**9):
        with pytest.raises(BadImageError) as e:
            open_image(bomb, max_pixels=limit)
        quoted = DEFAULT_MAX_IMAGE_PIXELS if limit is None else limit
        assert f"the {quoted} pixel limit" in e.value.message
        assert str(2 * DEFAULT_MAX_IMAGE_PIXELS) not in e.value.message


def test_tiny_image_channel_warning_stays_quiet(capfd, tmp_path):
    from PIL import Image

    Image.new("RGB", (1, 1), (10, 20, 30)).save(tmp_path / "one.png")
    Image.new("RGB", (3, 40), (10, 20, 30)).save(tmp_path / "three.png")
    rc, _, err = run(capfd, "quantize", "--images", tmp_path, "--out", tmp_path / "s", "--max-soft-tokens", MST)
    assert rc == 0, err
    assert "channel dimension" not in err


# ---------------------------------------------------------------------------------------------
# security: files named by a manifest or a shard index stay inside their folder
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["absolute", "parent", "symlink"])
def test_manifest_observer_file_outside_the_session_is_refused(session_copy, tmp_path, where):
    from core.session import MANIFEST, OBSERVERS, Session

    outside = tmp_path / "elsewhere" / OBSERVERS
    outside.parent.mkdir()
    shutil.move(session_copy / OBSERVERS, outside)
    manifest = json.loads((session_copy / MANIFEST).read_text())
    if where == "absolute":
        manifest["observers"]["file"] = str(outside)
    elif where == "parent":
        manifest["observers"]["file"] = f"../elsewhere/{OBSERVERS}"
    else:
        (session_copy / OBSERVERS).symlink_to(outside)
    (session_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SessionFileError, match="session folder"):
        Session.load(session_copy)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from core.models import load_model

    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    load_model("tiny").save_pretrained(folder)
    return folder


def test_shard_index_pointing_outside_the_checkpoint_is_refused(checkpoint, tmp_path):
    from safetensors import safe_open

    from core.models import load_model

    root = tmp_path / "ck"
    shutil.copytree(checkpoint, root / "model")
    (root / "other").mkdir()
    shutil.move(root / "model" / "model.safetensors", root / "other" / "model.safetensors")
    with safe_open(str(root / "other" / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    index = {"metadata": {}, "weight_map": {k: "../other/model.safetensors" for k in keys}}
    (root / "model" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="not a file of the checkpoint folder"):
        load_model(root / "model")


def test_absurd_config_sizes_fail_before_allocating(checkpoint, tmp_path):
    from core.models import load_model

    folder = Path(shutil.copytree(checkpoint, tmp_path / "absurd"))
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] = 2**36  # petabytes as float32
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="config describes at least"):
        load_model(folder)
    config["hidden_size"] = 0
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="hidden_size is 0"):
        load_model(folder)
