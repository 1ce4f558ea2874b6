"""core.data.resources resolves bundled files and refuses unknown names."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.data.resources import UnknownResourceError, resource_path, sample_images


def test_samples_are_bundled_with_a_licence() -> None:
    samples = sample_images()
    assert 8 <= len(samples) <= 12
    licence = resource_path("samples/LICENSE.md").read_text()
    for path in samples:
        assert path.name in licence, f"{path.name} has no licence entry"
    assert sum(p.stat().st_size for p in samples) < 3_000_000


@pytest.mark.parametrize("name", ["samples/nope.jpg", "../pyproject.toml", "/etc/passwd"])
def test_unknown_names_raise(name: str) -> None:
    with pytest.raises(UnknownResourceError):
        resource_path(name)
    assert issubclass(UnknownResourceError, KeyError)


def test_resource_path_is_a_path() -> None:
    assert isinstance(resource_path("samples"), Path) and resource_path("samples").is_dir()
