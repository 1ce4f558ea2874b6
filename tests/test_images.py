"""core.data.images: safe opening, mode conversion, folders, duplicates, and parity with transformers."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

from core.data.images import (
    SUPPORTED_SOFT_TOKENS,
    ImagePreprocessor,
    expand_paths,
    open_image,
    to_rgb,
)
from core.errors import BadImageError, NoImagesError
from core.models import load_model, tiny_config
from tests.conftest import BAD_IMAGE_REASONS, make_bomb_png


@pytest.fixture(scope="module")
def pre() -> ImagePreprocessor:
    return ImagePreprocessor(tiny_config(), max_soft_tokens=70)


def test_supported_soft_tokens_come_from_transformers() -> None:
    assert {70, 140, 280} <= set(SUPPORTED_SOFT_TOKENS)
    assert SUPPORTED_SOFT_TOKENS == (70, 140, 280, 560, 1120)
    with pytest.raises(ValueError, match="max_soft_tokens"):
        ImagePreprocessor(tiny_config(), max_soft_tokens=100)


def test_samples_have_different_aspect_ratios(sample_images: list[Path]) -> None:
    ratios = {round(Image.open(p).size[0] / Image.open(p).size[1], 1) for p in sample_images}
    assert len(ratios) >= 5
    assert min(ratios) < 0.6 and max(ratios) > 3


@pytest.mark.parametrize("tokens", [70, 280])
def test_batch_shapes_and_padding(sample_images: list[Path], tokens: int) -> None:
    pre = ImagePreprocessor(tiny_config(), max_soft_tokens=tokens)
    batch = pre(sample_images)
    b = len(sample_images)
    assert batch["pixel_values"].shape == (b, tokens * 9, 3 * 16 * 16)
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_position_ids"].shape == (b, tokens * 9, 2)
    pos = batch["pixel_position_ids"]
    padding = (pos == -1).all(-1)
    assert padding.any(), "some sample should need padding"
    # Padding is a suffix, and padding rows are exactly -1 in both coordinates.
    for row in range(b):
        valid = int((~padding[row]).sum())
        assert padding[row, valid:].all() and not padding[row, :valid].any()
        assert (pos[row, :valid] >= 0).all()


def test_equal_to_transformers_processor(sample_images: list[Path], pre: ImagePreprocessor) -> None:
    batch = pre(sample_images)
    direct = Gemma4ImageProcessorPil(max_soft_tokens=70)(
        images=[Image.open(p).convert("RGB") for p in sample_images], return_tensors="pt"
    )
    assert torch.equal(batch["pixel_values"], direct["pixel_values"])
    assert torch.equal(batch["pixel_position_ids"], direct["image_position_ids"])


def test_model_accepts_batch(sample_images: list[Path], pre: ImagePreprocessor) -> None:
    model = load_model("tiny")
    batch = pre(sample_images[:3])
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    valid = int((batch["pixel_position_ids"] != -1).all(-1).sum()) // 9
    assert out.shape == (valid, 64) and torch.isfinite(out).all()


def test_pil_images_and_paths_agree(sample_images: list[Path], pre: ImagePreprocessor) -> None:
    from_paths = pre(sample_images[:2])
    from_pil = pre([Image.open(p) for p in sample_images[:2]])
    assert torch.equal(from_paths["pixel_values"], from_pil["pixel_values"])


# --------------------------------------------------------------------------- modes


def _save(tmp_path: Path, image: Image.Image, name: str, **kwargs: object) -> Path:
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def _gradient(size: tuple[int, int] = (64, 48)) -> np.ndarray:
    w, h = size
    return np.tile(np.linspace(0, 1, w), (h, 1))


@pytest.mark.parametrize(
    "mode, name",
    [("L", "gray.png"), ("1", "bw.png"), ("P", "palette.png"), ("CMYK", "cmyk.jpg"), ("RGBA", "rgba.png"), ("LA", "la.png"), ("I;16", "gray16.png"), ("I", "int32.tif"), ("F", "float.tif")],
)
def test_mode_conversion(tmp_path: Path, mode: str, name: str) -> None:
    g = _gradient()
    if mode == "I;16":
        source = Image.fromarray((g * 65535).astype(np.uint16))
    elif mode == "I":
        source = Image.fromarray((g * 65535).astype(np.int32))
    elif mode == "F":
        source = Image.fromarray(g.astype(np.float32))
    else:
        source = Image.fromarray((g * 255).astype(np.uint8)).convert(mode)
    path = _save(tmp_path, source, name)
    assert Image.open(path).mode.split(";")[0] == mode.split(";")[0] or mode == "1"
    image = open_image(path)
    assert image.mode == "RGB" and image.size == (64, 48)
    arr = np.asarray(image).astype(int)
    if mode in ("L", "I;16", "I", "F"):
        # High bit depths are rescaled, not clipped to white: the gradient survives.
        assert arr[:, 0].max() <= 2 and arr[:, -1].min() >= 250
        assert 100 < arr[:, 32].mean() < 160


def test_alpha_is_composited_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 10, 10))
    image = open_image(_save(tmp_path, rgba, "alpha.png"))
    assert image.getpixel((15, 5)) == (255, 255, 255)
    assert image.getpixel((5, 5)) == (0, 0, 255)


def test_palette_with_transparency(tmp_path: Path) -> None:
    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.paste(1, (0, 0, 4, 8))
    path = _save(tmp_path, p, "ptrans.png", transparency=0)
    image = open_image(path)
    assert image.getpixel((6, 4)) == (255, 255, 255) and image.getpixel((1, 4)) == (255, 0, 0)


def test_exif_rotation(tmp_path: Path) -> None:
    wide = Image.new("RGB", (60, 20), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW on display
    path = _save(tmp_path, wide, "rotated.jpg", exif=exif.tobytes())
    assert Image.open(path).size == (60, 20)
    assert open_image(path).size == (20, 60)


def test_animated_gif_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 3
    r, g, b = open_image(path).getpixel((8, 8))
    assert r > 200 and g < 50 and b < 50


def test_to_rgb_leaves_input_untouched() -> None:
    source = Image.new("L", (4, 4), 7)
    converted = to_rgb(source)
    assert source.mode == "L" and converted.mode == "RGB"


# --------------------------------------------------------------------------- bad input


def test_loading_truncated_images_stays_disabled() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("name", sorted(BAD_IMAGE_REASONS))
def test_bad_file_raises_naming_the_file(bad_images: dict[str, Path], name: str, pre: ImagePreprocessor) -> None:
    path = bad_images[name]
    with pytest.raises(BadImageError) as info:
        pre([path])
    assert info.value.path == path
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert BAD_IMAGE_REASONS[name] in info.value.reason.lower()


def test_missing_path(missing_image_path: Path, pre: ImagePreprocessor) -> None:
    with pytest.raises(BadImageError, match="does not exist") as info:
        pre([missing_image_path])
    assert info.value.path == missing_image_path


def test_empty_folder(empty_images_dir: Path, pre: ImagePreprocessor) -> None:
    with pytest.raises(NoImagesError) as info:
        pre([empty_images_dir])
    assert info.value.path == empty_images_dir and str(empty_images_dir) in str(info.value)
    with pytest.raises(NoImagesError):
        expand_paths(empty_images_dir)


def test_pixel_limit_is_configurable(tmp_path: Path, sample_images: list[Path]) -> None:
    strict = ImagePreprocessor(tiny_config(), max_soft_tokens=70, max_image_pixels=1000)
    with pytest.raises(BadImageError, match="decompression bomb"):
        strict([sample_images[0]])


def test_bomb_does_not_allocate(tmp_path: Path) -> None:
    # 10^10 pixels: would need 30 GB if decoded.
    path = make_bomb_png(tmp_path / "huge.png")
    with pytest.raises(BadImageError, match="decompression bomb"):
        open_image(path)


@pytest.mark.parametrize("tokens", [70, 1120])
def test_extreme_aspect_ratio_fits_the_tiny_position_table(tmp_path: Path, tokens: int) -> None:
    # A 1-pixel-high sliver becomes a strip 3 patches high and tokens*3 patches wide: the
    # largest position id any image can produce.
    pre = ImagePreprocessor(tiny_config(), max_soft_tokens=tokens)
    path = _save(tmp_path, Image.new("RGB", (100_000, 1), (9, 9, 9)), "sliver.png")
    batch = pre([path])
    assert int(batch["pixel_position_ids"][..., 0].max()) == tokens * 3 - 1
    assert int(batch["pixel_position_ids"].max()) < tiny_config().position_embedding_size


def test_load_reports_good_and_rejected_separately(mixed_images_dir: Path, sample_images: list[Path], pre: ImagePreprocessor) -> None:
    result = pre.load([mixed_images_dir])
    accepted = {item.path.name for item in result.accepted}
    assert accepted == {p.name for p in sample_images[:3]}
    reasons = {item.path.name: item.reason for item in result.rejected}
    assert set(BAD_IMAGE_REASONS) <= set(reasons)
    duplicate = f"copy_of_{sample_images[0].name}"
    assert reasons[duplicate] == f"duplicate of {mixed_images_dir / sample_images[0].name}"
    for item in result.accepted:
        assert item.image.mode == "RGB" and item.size == item.image.size
        assert item.image_id == f"{item.path.name}#{item.sha256[:8]}"
    batch = pre.batch(result.accepted)
    assert batch["pixel_values"].shape[0] == 3


def test_load_missing_and_empty_folder_are_rejected_not_raised(
    missing_image_path: Path, empty_images_dir: Path, sample_images: list[Path], pre: ImagePreprocessor
) -> None:
    result = pre.load([missing_image_path, empty_images_dir, sample_images[1]])
    assert [i.path for i in result.accepted] == [sample_images[1]]
    assert [r.path for r in result.rejected] == [missing_image_path, empty_images_dir]
    assert "does not exist" in result.rejected[0].reason


def test_call_skips_duplicates(tmp_path: Path, sample_images: list[Path], pre: ImagePreprocessor) -> None:
    copy = tmp_path / "same.jpg"
    shutil.copy(sample_images[0], copy)
    batch = pre([sample_images[0], copy, sample_images[1]])
    assert batch["pixel_values"].shape[0] == 2


def test_expand_paths_is_recursive_and_sorted(tmp_path: Path, sample_images: list[Path]) -> None:
    (tmp_path / "b" / "deep").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    shutil.copy(sample_images[0], tmp_path / "b" / "deep" / "z.jpg")
    shutil.copy(sample_images[1], tmp_path / "a.JPG")
    shutil.copy(sample_images[2], tmp_path / ".hidden" / "x.jpg")
    (tmp_path / "readme.txt").write_text("x")
    assert expand_paths([tmp_path]) == [tmp_path / "a.JPG", tmp_path / "b" / "deep" / "z.jpg"]


def test_image_ids_are_stable(sample_images: list[Path], pre: ImagePreprocessor) -> None:
    first = pre.load(sample_images[:2]).image_ids
    assert first == pre.load(sample_images[:2]).image_ids
    assert first[0].startswith(sample_images[0].name + "#")


def test_in_memory_image_bytes(pre: ImagePreprocessor) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (100, 50), (1, 2, 3)).save(buffer, "PNG")
    image = Image.open(io.BytesIO(buffer.getvalue()))
    result = pre.load([image])
    assert result.accepted[0].path is None and result.accepted[0].image_id.startswith("image0#")
