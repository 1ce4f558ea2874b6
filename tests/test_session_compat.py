"""Sessions saved before the built-in models got trained-like scales keep the weights they were calibrated on."""

from __future__ import annotations

import json
import shutil

import torch

from core.session import Session


def test_old_builtin_session_loads_the_chaotic_model(sample_images, tmp_path):
    s = Session("tiny", max_soft_tokens=70)
    s.add_images(sample_images[:2])
    s.calibrate()
    saved = s.save(tmp_path / "new")
    manifest = json.loads((saved / "manifest.json").read_text())
    assert manifest["model"]["spec"] == "tiny" and manifest["model"]["init"]
    assert Session.load(saved).model_spec == "tiny"

    # A session written by the first release: same spec, no "init" entry.
    old = tmp_path / "old"
    shutil.copytree(saved, old)
    del manifest["model"]["init"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    loaded = Session.load(old)
    assert loaded.model_spec == "tiny-chaotic"
    chaotic = Session("tiny-chaotic", max_soft_tokens=70).model
    for (name, a), b in zip(loaded.model.state_dict().items(), chaotic.state_dict().values()):
        assert torch.equal(a, b), name
