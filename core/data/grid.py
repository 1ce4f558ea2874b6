"""Where a row of a tensor lies in the image: patch positions, soft-token cells, the resized image.

The static path runs one image's valid patches in the processor's order (row-major over the
resized image). Patch-level tensors (patch embedder, encoder layers) have one row per valid patch;
the pooler and the model output have one row per soft token, each the average of a k x k block of
patches. ``PatchLayout`` maps both back onto the image the model actually saw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PatchLayout:
    """The patch grid of one preprocessed image."""

    positions: np.ndarray  # (n, 2) int: (x, y) patch coordinates of each valid patch, in row order
    token_of_patch: np.ndarray  # (n,) int: the soft token (output row) each patch is pooled into
    num_tokens: int
    patch_size: int

    @property
    def num_patches(self) -> int:
        """Number of valid patches (rows of a patch-level tensor)."""
        return int(self.positions.shape[0])

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of the patch grid."""
        return int(self.positions[:, 1].max()) + 1, int(self.positions[:, 0].max()) + 1

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) in pixels of the resized image the model saw."""
        rows, cols = self.grid
        return rows * self.patch_size, cols * self.patch_size

    def level_of(self, rows: int) -> str | None:
        """"patch" or "token" for a tensor with this many rows, None if it is neither."""
        if rows == self.num_patches:
            return "patch"
        if rows == self.num_tokens:
            return "token"
        return None

    def per_patch(self, values: np.ndarray | torch.Tensor) -> np.ndarray:
        """Per-row values (patch- or token-level) as one value per valid patch."""
        v = _np(values).reshape(-1)
        level = self.level_of(v.shape[0])
        if level == "patch":
            return v.astype(np.float64)
        if level == "token":
            return v[self.token_of_patch].astype(np.float64)
        raise ValueError(f"{v.shape[0]} rows match neither {self.num_patches} patches nor {self.num_tokens} tokens")

    def to_grid(self, values: np.ndarray | torch.Tensor) -> np.ndarray:
        """Per-row values as a (rows, cols) float map over the patch grid; NaN where no patch."""
        per_patch = self.per_patch(values)
        out = np.full(self.grid, np.nan, dtype=np.float64)
        out[self.positions[:, 1], self.positions[:, 0]] = per_patch
        return out

    def patches_of_row(self, row: int, rows: int) -> np.ndarray:
        """Indices of the patches behind row ``row`` of a tensor with ``rows`` rows."""
        level = self.level_of(rows)
        if level == "patch":
            return np.array([row])
        if level == "token":
            return np.flatnonzero(self.token_of_patch == row)
        raise ValueError(f"{rows} rows match neither {self.num_patches} patches nor {self.num_tokens} tokens")

    def patch_box(self, patch: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) pixel box of one patch in the resized image."""
        x, y = (int(v) for v in self.positions[patch])
        p = self.patch_size
        return x * p, y * p, (x + 1) * p, (y + 1) * p

    def image(self, pixel_values: torch.Tensor | np.ndarray) -> np.ndarray:
        """The resized RGB image (uint8, H x W x 3) rebuilt from one image's pixel values."""
        pv = _np(pixel_values)
        pv = pv.reshape(-1, pv.shape[-1])[: self.num_patches]
        p = self.patch_size
        patches = pv.reshape(self.num_patches, p, p, -1)  # the processor's (row, col, channel) order
        h, w = self.image_size
        img = np.zeros((h, w, patches.shape[-1]), dtype=np.float64)
        for i, (x, y) in enumerate(self.positions):
            img[y * p : (y + 1) * p, x * p : (x + 1) * p] = patches[i]
        return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def patch_layout(qmodel, pixel_position_ids: torch.Tensor) -> PatchLayout:
    """The layout of one image (``pixel_position_ids`` of shape (1, patches, 2) or (patches, 2))."""
    ppids = pixel_position_ids if pixel_position_ids.dim() == 3 else pixel_position_ids.unsqueeze(0)
    profile = qmodel.build_profile(ppids[:1])
    n = profile.num_patches
    positions = ppids[0, :n].long().cpu().numpy()
    if profile.pool is None:
        token_of_patch = np.arange(n)
        num_tokens = n
    else:
        pool = profile.pool[0]  # (tokens, n)
        token_of_patch = pool.argmax(dim=0).cpu().numpy()
        num_tokens = int(pool.shape[0])
    return PatchLayout(positions, token_of_patch, num_tokens, int(qmodel.config.patch_size))


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)
