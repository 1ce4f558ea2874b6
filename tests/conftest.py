"""Shared fixtures: the bundled sample photos and a corpus of bad inputs built on the fly."""

from __future__ import annotations

import io
import shutil
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from core.data.resources import sample_images as _bundled_samples

# file name -> what BadImageError.reason must mention (lower case substring)
BAD_IMAGE_REASONS: dict[str, str] = {
    "empty.jpg": "empty",
    "text_renamed.jpg": "not an image",
    "truncated.jpg": "decoded",
    "bomb.png": "decompression bomb",
    "unsupported_compression.tif": "decoded",
}


def pytest_report_header(config) -> list[str]:
    """Which CPU kernel path and thread count this run's numbers come from (the suite runs under several)."""
    import os

    import torch

    knobs = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS")
    set_knobs = ", ".join(f"{k}={os.environ[k]}" for k in knobs if k in os.environ) or "none set"
    return [
        f"torch {torch.__version__}: CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} threads ({set_knobs})"
    ]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def make_bomb_png(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """Write a tiny PNG whose header claims width x height pixels (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\x00" * 16)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b""))
    return path


def make_truncated_jpeg(path: Path, source: Path) -> Path:
    """Write the first half of a real JPEG."""
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def make_unsupported_tiff(path: Path) -> Path:
    """Write a TIFF whose compression tag names a scheme Pillow cannot decode."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(buffer, "TIFF")
    data = bytearray(buffer.getvalue())
    # IFD entry: tag 259 (Compression), type SHORT, count 1, value 1 (none) -> 50000 (unknown).
    entry = struct.pack("<HHIH", 259, 3, 1, 1)
    at = data.find(entry)
    assert at >= 0, "Pillow's TIFF layout changed; update make_unsupported_tiff"
    data[at : at + len(entry)] = struct.pack("<HHIH", 259, 3, 1, 50000)
    path.write_bytes(bytes(data))
    return path


def make_bad_images(folder: Path, good_jpeg: Path) -> dict[str, Path]:
    """Write one file per kind of bad input into ``folder``; returns name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "empty.jpg": folder / "empty.jpg",
        "text_renamed.jpg": folder / "text_renamed.jpg",
        "truncated.jpg": folder / "truncated.jpg",
        "bomb.png": folder / "bomb.png",
        "unsupported_compression.tif": folder / "unsupported_compression.tif",
    }
    files["empty.jpg"].write_bytes(b"")
    files["text_renamed.jpg"].write_text("this is a text file, not a JPEG\n")
    make_truncated_jpeg(files["truncated.jpg"], good_jpeg)
    make_bomb_png(files["bomb.png"])
    make_unsupported_tiff(files["unsupported_compression.tif"])
    return files


@pytest.fixture(scope="session")
def sample_images() -> list[Path]:
    """The bundled sample photographs (different aspect ratios)."""
    paths = _bundled_samples()
    assert len(paths) >= 8
    return paths


# Soft tokens per image of the session_dir fixture (and of the CLI tests that quantize): small, so
# a calibration takes about a second.
MST = 70


def calibrated_tiny(images, max_soft_tokens: int = MST):
    """A Session on the tiny model calibrated on `images` (the setup many test modules share)."""
    from core.session import Session

    s = Session("tiny", max_soft_tokens=max_soft_tokens)
    s.add_images(images)
    s.calibrate()
    return s


@pytest.fixture(scope="module")
def session_dir(tmp_path_factory, sample_images) -> Path:
    """A tiny session calibrated on three sample images, saved once per test module."""
    return calibrated_tiny(sample_images[:3]).save(tmp_path_factory.mktemp("cli_diag") / "s")


@pytest.fixture
def bad_images(tmp_path: Path, sample_images: list[Path]) -> dict[str, Path]:
    """One file per kind of bad input (name -> path); see BAD_IMAGE_REASONS."""
    return make_bad_images(tmp_path / "bad", sample_images[0])


@pytest.fixture
def bad_images_dir(bad_images: dict[str, Path]) -> Path:
    """A folder holding only bad inputs."""
    return next(iter(bad_images.values())).parent


@pytest.fixture
def mixed_images_dir(tmp_path: Path, sample_images: list[Path]) -> Path:
    """A folder tree with 3 good photos, one exact duplicate in a subfolder, and every bad input."""
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    for path in sample_images[:3]:
        shutil.copy(path, folder / path.name)
    shutil.copy(sample_images[0], folder / "sub" / f"copy_of_{sample_images[0].name}")
    make_bad_images(folder / "bad", sample_images[0])
    return folder


@pytest.fixture
def empty_images_dir(tmp_path: Path) -> Path:
    """A folder (with a non-image file) that holds no images."""
    folder = tmp_path / "no_images"
    folder.mkdir()
    (folder / "notes.txt").write_text("no images here\n")
    return folder


@pytest.fixture
def missing_image_path(tmp_path: Path) -> Path:
    """A path that does not exist."""
    return tmp_path / "does_not_exist.jpg"


@pytest.fixture
def dead_pid() -> int:
    """The PID of a process that has exited: what a killed writer's temporary names."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid
