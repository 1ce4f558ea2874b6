"""Open calibration images safely and turn them into Gemma 4 vision batches."""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from transformers.models.gemma4.image_processing_pil_gemma4 import (
    _SUPPORTED_SOFT_TOKENS,
    Gemma4ImageProcessorPil,
    get_aspect_ratio_preserving_size,
)

from core.config import DEFAULT_SOFT_TOKENS
from core.errors import BadImageError, NoImagesError

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "IMAGE_SUFFIXES",
    "DEFAULT_SOFT_TOKENS",
    "SUPPORTED_SOFT_TOKENS",
    "ImageBatchResult",
    "ImagePreprocessor",
    "LoadedImage",
    "RejectedImage",
    "expand_paths",
    "open_image",
    "to_rgb",
]

# Whatever the installed transformers' Gemma 4 processor accepts (70, 140, 280, 560, 1120).
SUPPORTED_SOFT_TOKENS: tuple[int, ...] = tuple(_SUPPORTED_SOFT_TOKENS)

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".jp2"}
)

# Pillow's own default (about 89 megapixels); larger images are treated as decompression bombs.
DEFAULT_MAX_IMAGE_PIXELS: int = int(Image.MAX_IMAGE_PIXELS or 89_478_485)

class _KnownChannelOrder(logging.Filter):
    """Drops transformers' "channel dimension is ambiguous" warning for tiny images.

    Its resize step re-guesses the channel axis of the (3, H, W) arrays it made itself and warns
    when H or W is 1 or 3; the guess (channels first) is right for every image we pass, and the
    warning would otherwise reach a user's terminal.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "channel dimension is ambiguous" not in record.getMessage()


logging.getLogger("transformers.image_utils").addFilter(_KnownChannelOrder())

# Transparent pixels are composited on white: photos with alpha are usually cut-outs shown on
# white pages, and black would add edges that the model never sees in practice.
ALPHA_BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class LoadedImage:
    """One decoded, RGB-converted image and where it came from."""

    path: Path | None
    image_id: str
    sha256: str
    image: Image.Image = field(repr=False, compare=False)
    size: tuple[int, int]


@dataclass(frozen=True)
class RejectedImage:
    """A file that was not used, and why."""

    path: Path
    reason: str


@dataclass
class ImageBatchResult:
    """Good and rejected files of one load, reported separately."""

    accepted: list[LoadedImage] = field(default_factory=list)
    rejected: list[RejectedImage] = field(default_factory=list)

    @property
    def images(self) -> list[Image.Image]:
        """The accepted images, in order."""
        return [item.image for item in self.accepted]

    @property
    def image_ids(self) -> list[str]:
        """The accepted images' ids, in order."""
        return [item.image_id for item in self.accepted]


# --------------------------------------------------------------------------- paths


def expand_paths(paths: Iterable[str | os.PathLike[str]] | str | os.PathLike[str]) -> list[Path]:
    """Expand folders recursively into sorted image-like files; files are kept as given, in order."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    result: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            found = _images_in(path)
            if not found:
                raise NoImagesError(path, "the folder holds no image files")
            result.extend(found)
        else:
            # Missing paths and odd extensions stay in the list so the caller reports them.
            result.append(path)
    return result


def _images_in(folder: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder):
        # Hidden folders (.git, .thumbnails) hold no calibration images.
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append(Path(root) / name)
    return sorted(found)


# --------------------------------------------------------------------------- decoding


def open_image(path: str | os.PathLike[str], max_pixels: int | None = None) -> Image.Image:
    """Decode the whole file (first frame), apply EXIF rotation and return RGB; BadImageError if unusable."""
    path = Path(path)
    limit = DEFAULT_MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
    if not path.exists():
        raise BadImageError(path, "does not exist")
    if not path.is_file():
        raise BadImageError(path, "is not a file")
    try:
        if path.stat().st_size == 0:
            raise BadImageError(path, "the file is empty")
    except OSError as exc:
        raise BadImageError(path, f"cannot be read ({exc.strerror or exc})") from None
    # A truncated file must be rejected, not silently padded with grey.
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise BadImageError(path, "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; refusing to accept partial images")
    try:
        with Image.open(path) as image:
            width, height = image.size
            # Checked before decoding so a bomb never allocates; also covers sizes where
            # Pillow would only warn (between its limit and twice it).
            if width * height > limit:
                raise BadImageError(path, f"{width}x{height} pixels exceeds the {limit} pixel limit (possible decompression bomb)")
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)
            image.load()
            rotated = _exif_transpose(image)
            return to_rgb(rotated, path)
    except BadImageError:
        raise
    except Image.DecompressionBombError:
        # Pillow refuses at twice its own limit and quotes that figure; ours is the one that applies.
        raise BadImageError(path, f"more pixels than the {limit} pixel limit (possible decompression bomb)") from None
    except UnidentifiedImageError:
        raise BadImageError(path, "not an image file Pillow can read") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, MemoryError) as exc:
        # Pillow reports truncation, unknown TIFF compressions and corrupt data this way.
        raise BadImageError(path, f"cannot be decoded ({_short(exc)})") from None


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _exif_transpose(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a corrupt EXIF block should not cost the user a good photo
        return image


def to_rgb(image: Image.Image, path: str | os.PathLike[str] | None = None) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (alpha composited on white, high bit depths rescaled)."""
    mode = image.mode
    try:
        if mode == "RGB":
            return image.copy()
        if mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            mode = image.mode
        if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "A" in mode:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
            return Image.alpha_composite(background, rgba).convert("RGB")
        if mode.startswith("I;16") or mode in ("I", "F"):
            return Image.fromarray(_to_uint8(np.asarray(image), mode)).convert("RGB")
        return image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise BadImageError(path or "<image>", f"mode {mode} cannot be converted to RGB ({_short(exc)})") from None


def _to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    """Map high-bit-depth grayscale to 0..255 without clipping it to white."""
    data = array.astype(np.float64)
    if mode.startswith("I;16"):
        scaled = data / 257.0  # full 16-bit range -> full 8-bit range
    else:
        finite = data[np.isfinite(data)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if mode == "F" and low >= 0.0 and high <= 1.0:
            scaled = data * 255.0  # float images in [0, 1]
        elif low >= 0.0 and high <= 255.0:
            scaled = data  # already 8-bit values stored wide
        elif low >= 0.0 and high <= 65535.0:
            scaled = data / 257.0  # 16-bit PNGs opened as mode "I"
        else:
            scaled = (data - low) * (255.0 / (high - low)) if high > low else np.zeros_like(data)
    return np.nan_to_num(np.clip(np.rint(scaled), 0, 255)).astype(np.uint8)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_image(image: Image.Image) -> str:
    digest = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def _image_id(name: str, sha256: str) -> str:
    return f"{name}#{sha256[:8]}"


# --------------------------------------------------------------------------- preprocessing


class ImagePreprocessor:
    """Turn paths or PIL images into ``pixel_values``/``pixel_position_ids`` with transformers' Gemma 4 processor."""

    def __init__(self, config: Any, max_soft_tokens: int = DEFAULT_SOFT_TOKENS, max_image_pixels: int | None = None) -> None:
        if max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
            raise ValueError(f"max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}, got {max_soft_tokens}")
        self.patch_size = int(getattr(config, "patch_size", 16))
        self.pooling_kernel_size = int(getattr(config, "pooling_kernel_size", 3))
        self.max_soft_tokens = int(max_soft_tokens)
        self.max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS if max_image_pixels is None else int(max_image_pixels)
        self.processor = Gemma4ImageProcessorPil(
            patch_size=self.patch_size,
            pooling_kernel_size=self.pooling_kernel_size,
            max_soft_tokens=self.max_soft_tokens,
        )

    @property
    def max_patches(self) -> int:
        """Patches per image after padding (max_soft_tokens * pooling_kernel_size**2)."""
        return self.max_soft_tokens * self.pooling_kernel_size**2

    def __call__(self, images: Sequence[str | os.PathLike[str] | Image.Image] | str | os.PathLike[str]) -> dict[str, torch.Tensor]:
        """Return a batch for ``model(**batch)``; raises BadImageError on the first unusable file."""
        loaded = self._load(images, strict=True).accepted
        if not loaded:
            raise NoImagesError(None, "no images were given")
        return self.batch(loaded)

    def load(self, paths: Iterable[str | os.PathLike[str] | Image.Image] | str | os.PathLike[str]) -> ImageBatchResult:
        """Open every file, reporting good and rejected files (duplicates included) separately."""
        return self._load(paths, strict=False)

    def batch(self, images: Sequence[LoadedImage | Image.Image]) -> dict[str, torch.Tensor]:
        """Run the Gemma 4 processor on already opened images."""
        pil = [item.image if isinstance(item, LoadedImage) else to_rgb(item) for item in images]
        if not pil:
            raise NoImagesError(None, "the batch is empty")
        out = self.processor(
            images=pil,
            return_tensors="pt",
            max_soft_tokens=self.max_soft_tokens,
            patch_size=self.patch_size,
            pooling_kernel_size=self.pooling_kernel_size,
        )
        return {"pixel_values": out["pixel_values"], "pixel_position_ids": out["image_position_ids"]}

    def iter_load(
        self, paths: Iterable[str | os.PathLike[str] | Image.Image] | str | os.PathLike[str]
    ) -> Iterator[LoadedImage | RejectedImage]:
        """load() one file at a time: each image is decoded only when the caller asks for it, so a
        caller that keeps only what it needs (path, id, sha256) holds one decoded image at most."""
        return self._iter_load(paths, strict=False)

    def _load(self, items: Any, strict: bool) -> ImageBatchResult:
        result = ImageBatchResult()
        for item in self._iter_load(items, strict):
            (result.accepted if isinstance(item, LoadedImage) else result.rejected).append(item)
        return result

    def _iter_load(self, items: Any, strict: bool) -> Iterator[LoadedImage | RejectedImage]:
        if isinstance(items, (str, os.PathLike, Image.Image)):
            items = [items]
        seen: dict[str, Path] = {}
        for index, item in enumerate(items):
            if isinstance(item, Image.Image):
                # Images handed over in memory are the caller's own; never deduplicated.
                rgb = to_rgb(item)
                try:
                    self._check_resizable(rgb, Path(f"<image {index}>"))
                except BadImageError as exc:
                    if strict:
                        raise
                    yield RejectedImage(exc.path, exc.reason)
                    continue
                sha = _sha256_image(rgb)
                yield LoadedImage(None, _image_id(f"image{index}", sha), sha, rgb, rgb.size)
                continue
            try:
                paths = expand_paths([item])
            except NoImagesError as exc:
                if strict:
                    raise
                yield RejectedImage(Path(item), exc.message)
                continue
            for path in paths:
                try:
                    loaded = self._open(path, seen)
                except BadImageError as exc:
                    if strict:
                        raise
                    yield RejectedImage(path, exc.reason)
                    continue
                yield loaded
                del loaded  # the generator must not keep the last image alive while suspended

    def _open(self, path: Path, seen: dict[str, Path]) -> LoadedImage | RejectedImage:
        image = open_image(path, self.max_image_pixels)
        sha = _sha256_file(path)
        if sha in seen:
            return RejectedImage(path, f"duplicate of {seen[sha]}")
        seen[sha] = path
        self._check_resizable(image, path)
        return LoadedImage(path, _image_id(path.name, sha), sha, image, image.size)

    def _check_resizable(self, image: Image.Image, path: Path) -> None:
        # The processor fails for the whole batch on one impossible shape; check each image first.
        width, height = image.size
        try:
            get_aspect_ratio_preserving_size(
                height=height,
                width=width,
                patch_size=self.patch_size,
                max_patches=self.max_patches,
                pooling_kernel_size=self.pooling_kernel_size,
            )
        except ValueError as exc:
            raise BadImageError(path, f"{width}x{height} cannot be resized for the model ({_short(exc)})") from None
