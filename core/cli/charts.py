"""PNG charts for `ptq-studio report --plots DIR`, drawn with Pillow (Qt-free, no matplotlib).

- ranges.png   one row per observer (forward order): its [min, max] on a signed-log axis;
               weights grey-blue, activations blue, outlier-dominated ranges red.
- errors.png   per-module SQNR (dB) in forward order, lowest five labelled; the
               end-to-end SQNR as a dashed line.
- scatter.png  FP vs quantized value samples of the worst modules (lowest SQNR), with the
               y = x diagonal.
- heatmap_<image stem>.png  one per evaluated image: the resized image the model saw with the
               final output's per-soft-token relative error (core.analysis.heatmaps) as a
               semi-transparent overlay, a colour bar with its min / max, the peak outlined.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from core.io import atomic_write_bytes

BG = (255, 255, 255)
FG = (40, 40, 40)
GRID = (225, 228, 232)
BLUE = (52, 110, 190)
WEIGHT = (130, 150, 175)
RED = (205, 60, 50)
GREEN = (60, 150, 90)
ORANGE = (230, 140, 40)
KIND_COLOURS = [BLUE, ORANGE, GREEN, (140, 90, 170), (90, 160, 170), (170, 120, 80), (200, 90, 150), WEIGHT]

__all__ = [
    "write_report_plots",
    "range_chart",
    "error_chart",
    "scatter_chart",
    "heatmap_chart",
    "write_heatmap",
    "heatmap_file_name",
    "extreme_location_chart",
    "write_extreme_location",
]


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _text_w(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    b = draw.textbbox((0, 0), text, font=font)
    return b[2] - b[0]


def _clip_text(draw, text: str, font, width: float, left: bool = False) -> str:
    """Shorten text to fit width, dropping characters at the end (or the start when left)."""
    if _text_w(draw, text, font) <= width:
        return text
    while len(text) > 4 and _text_w(draw, "..." + text, font) > width:
        text = text[1:] if left else text[:-1]
    return "..." + text if left else text + "..."


def _nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-2:
        return f"{v:.0e}"
    return f"{v:g}"


def _slog(x):
    """Signed log axis: sign(x) * log10(1 + |x|), so ranges from 1e-3 to 1e3 share one chart."""
    return np.sign(x) * np.log10(1.0 + np.abs(x))


def _save_png(img: Image.Image, path: Path) -> Path:
    # Encoded in memory and written atomically: a reader never sees half a PNG.
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    atomic_write_bytes(path, buf.getvalue())
    return path


def range_chart(records: Sequence, title: str = "Observer ranges") -> Image.Image:
    """One horizontal bar per observer from min to max on a signed-log axis."""
    font, small = _font(13), _font(10)
    rows = [r for r in records if getattr(r, "has_stats", True)]
    row_h = 12 if len(rows) < 200 else 8
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = min(380, max([_text_w(probe, r.name, small) for r in rows] + [80]) + 10)
    plot_w = 620
    top, bottom = 44, 40
    w = label_w + plot_w + 30
    h = top + bottom + max(1, len(rows)) * row_h
    img = Image.new("RGB", (w, h), BG)
    d = ImageDraw.Draw(img)
    d.text((10, 10), f"{title} ({len(rows)} observers, signed-log axis)", fill=FG, font=font)
    if not rows:
        d.text((label_w, top), "no observer has statistics", fill=FG, font=small)
        return img
    lo = float(_slog(min(r.range_min for r in rows)))
    hi = float(_slog(max(r.range_max for r in rows)))
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 1, hi + 1
    x0, x1 = label_w, label_w + plot_w

    def X(v):
        return x0 + (float(_slog(v)) - lo) / (hi - lo) * (x1 - x0)

    ticks = [t for t in (-1e4, -1e3, -100, -10, -1, 0, 1, 10, 100, 1e3, 1e4) if lo <= _slog(t) <= hi]
    for t in ticks:
        x = X(t)
        d.line([(x, top - 4), (x, h - bottom)], fill=GRID if t else (170, 170, 170))
        s = _fmt(t)
        d.text((x - _text_w(d, s, small) / 2, h - bottom + 4), s, fill=FG, font=small)
    for i, r in enumerate(rows):
        y = top + i * row_h
        colour = RED if r.outlier else (WEIGHT if r.kind == "weight" else BLUE)
        if not r.enabled:
            colour = (190, 190, 190)
        if row_h >= 10:
            name = _clip_text(d, r.name, small, label_w - 10, left=True)
            d.text((x0 - 6 - _text_w(d, name, small), y), name, fill=FG, font=small)
        a, b = X(r.range_min), X(r.range_max)
        d.rectangle([a, y + 2, max(b, a + 1), y + row_h - 2], fill=colour)
    legend = [("activation", BLUE), ("weight", WEIGHT), ("outlier-dominated", RED)]
    lx = x0
    for name, c in legend:
        d.rectangle([lx, 30, lx + 10, 38], fill=c)
        d.text((lx + 14, 28), name, fill=FG, font=small)
        lx += 24 + _text_w(d, name, small)
    return img


def error_chart(result, title: str = "Per-module SQNR (higher is better)") -> Image.Image:
    """Per-module SQNR bars in forward order, worst five labelled, end-to-end dashed."""
    font, small = _font(13), _font(10)
    mods = list(result.modules)
    w, h = 960, 420
    left, right, top, bottom = 60, 20, 56, 50
    img = Image.new("RGB", (w, h), BG)
    d = ImageDraw.Draw(img)
    d.text((10, 10), f"{title}: {len(mods)} modules, {len(result.images)} image(s)", fill=FG, font=font)
    finite = [m.sqnr_db for m in mods if math.isfinite(m.sqnr_db)]
    e2e = result.end_to_end.sqnr_db
    if math.isfinite(e2e):
        finite.append(e2e)
    if not finite:
        d.text((left, top), "no finite SQNR to draw", fill=FG, font=small)
        return img
    lo, hi = min(0.0, min(finite)), max(finite) * 1.08 + 1
    ticks = _nice_ticks(lo, hi)
    x0, x1, y0, y1 = left, w - right, top, h - bottom

    def Y(v):
        v = hi if not math.isfinite(v) else v
        return y1 - (v - lo) / (hi - lo) * (y1 - y0)

    for t in ticks:
        y = Y(t)
        d.line([(x0, y), (x1, y)], fill=GRID)
        s = _fmt(t)
        d.text((x0 - 6 - _text_w(d, s, small), y - 6), s, fill=FG, font=small)
    d.text((6, top - 16), "dB", fill=FG, font=small)
    kinds = sorted({m.kind for m in mods})
    colour = {k: KIND_COLOURS[i % len(KIND_COLOURS)] for i, k in enumerate(kinds)}
    n = max(1, len(mods))
    bw = (x1 - x0) / n
    for i, m in enumerate(mods):
        xa = x0 + i * bw
        d.rectangle([xa + bw * 0.1, Y(m.sqnr_db), max(xa + bw * 0.9, xa + bw * 0.1 + 1), Y(lo)], fill=colour[m.kind])
    # The five lowest bars get a number; their names are listed under the title (no overlaps).
    worst = sorted(range(len(mods)), key=lambda i: mods[i].sqnr_db)[:5]
    for rank, i in enumerate(worst, 1):
        xa = x0 + (i + 0.5) * bw
        y = Y(mods[i].sqnr_db)
        d.text((xa - _text_w(d, str(rank), small) / 2, y - 13), str(rank), fill=RED, font=small)
    listing = "   ".join(f"{r}: {mods[i].name} ({mods[i].sqnr_db:.1f} dB)" for r, i in enumerate(worst, 1))
    d.text((left, 28), _clip_text(d, "lowest: " + listing, small, w - left - 10), fill=RED, font=small)
    if math.isfinite(e2e):
        y = Y(e2e)
        for xs in range(int(x0), int(x1), 12):
            d.line([(xs, y), (min(xs + 6, x1), y)], fill=FG, width=1)
        d.text((x1 - 140, y + 2), f"end to end {e2e:.1f} dB", fill=FG, font=small)
    lx = x0
    for k in kinds[:8]:
        d.rectangle([lx, h - 22, lx + 10, h - 12], fill=colour[k])
        d.text((lx + 14, h - 24), k, fill=FG, font=small)
        lx += 24 + _text_w(d, k, small)
    d.text((x0, y1 + 4), "modules in forward order ->", fill=FG, font=small)
    return img


def scatter_chart(result, n: int = 6, title: str = "FP vs quantized samples, worst modules") -> Image.Image:
    """A grid of FP (x) vs quantized (y) scatter plots for the n lowest-SQNR modules."""
    font, small = _font(13), _font(10)
    mods, seen = [], set()
    for m in result.worst(len(result.modules)):
        key = (m.num_values, m.sqnr_db, m.peir)  # attention and its o_proj report one tensor
        if m.samples_fp.size and key not in seen:
            seen.add(key)
            mods.append(m)
        if len(mods) == n:
            break
    cols = 3
    rows = max(1, math.ceil(len(mods) / cols))
    cw, ch = 300, 300
    top = 40
    img = Image.new("RGB", (cols * cw + 20, top + rows * ch), BG)
    d = ImageDraw.Draw(img)
    d.text((10, 10), title, fill=FG, font=font)
    if not mods:
        d.text((20, top), "no samples", fill=FG, font=small)
    for k, m in enumerate(mods):
        ox = 10 + (k % cols) * cw
        oy = top + (k // cols) * ch
        x0, x1, y0, y1 = ox + 46, ox + cw - 12, oy + 22, oy + ch - 34
        fp, q = np.asarray(m.samples_fp, np.float64), np.asarray(m.samples_q, np.float64)
        lo = float(min(fp.min(), q.min()))
        hi = float(max(fp.max(), q.max()))
        if hi - lo < 1e-12:
            lo, hi = lo - 1, hi + 1
        pad = (hi - lo) * 0.04
        lo, hi = lo - pad, hi + pad

        def P(a, b):
            return (x0 + (a - lo) / (hi - lo) * (x1 - x0), y1 - (b - lo) / (hi - lo) * (y1 - y0))

        d.rectangle([x0, y0, x1, y1], outline=GRID)
        for t in _nice_ticks(lo, hi, 5):
            xa, _ = P(t, lo)
            _, ya = P(lo, t)
            d.line([(xa, y0), (xa, y1)], fill=GRID)
            d.line([(x0, ya), (x1, ya)], fill=GRID)
            s = _fmt(round(t, 10))
            d.text((xa - _text_w(d, s, small) / 2, y1 + 3), s, fill=FG, font=small)
            d.text((x0 - 4 - _text_w(d, s, small), ya - 6), s, fill=FG, font=small)
        d.line([P(lo, lo), P(hi, hi)], fill=(160, 160, 160))
        pts = np.stack(P(fp, q), axis=1)
        for x, y in pts:
            d.point((float(x), float(y)), fill=BLUE)
        label = _clip_text(d, m.name, small, cw - 60, left=True)
        d.text((x0, oy + 4), label, fill=FG, font=small)
        d.text((x0, y1 + 16), f"SQNR {m.sqnr_db:.1f} dB  PEIR {m.peir:.3g}   x: FP, y: quantized", fill=FG, font=small)
    return img


def write_report_plots(folder, records, result) -> list[Path]:
    """Write ranges.png, errors.png and scatter.png into folder; returns their paths."""
    from core.errors import UnwritablePathError

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return [
            _save_png(range_chart(records), folder / "ranges.png"),
            _save_png(error_chart(result), folder / "errors.png"),
            _save_png(scatter_chart(result), folder / "scatter.png"),
        ]
    except OSError as e:
        raise UnwritablePathError(f"{folder}: cannot write plots ({e.strerror or e}); choose another --plots folder") from None


# ---------------------------------------------------------------------------------------------
# Error heatmap over the image
# ---------------------------------------------------------------------------------------------

# Inferno-like anchors: dark = small error, bright yellow = large; readable over photos.
_HEAT = np.array(
    [(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21), (250, 193, 39), (252, 255, 164)],
    dtype=np.float64,
)
HEAT_ALPHA = 0.55
PEAK = (0, 230, 255)


def _colormap(t: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB along the heat anchors (linear interpolation)."""
    t = np.clip(np.nan_to_num(t, nan=0.0), 0.0, 1.0) * (len(_HEAT) - 1)
    i = np.minimum(np.floor(t).astype(int), len(_HEAT) - 2)
    f = (t - i)[..., None]
    return np.rint(_HEAT[i] * (1 - f) + _HEAT[i + 1] * f).astype(np.uint8)


def _heat_scale(values: np.ndarray) -> tuple[Callable[[np.ndarray], np.ndarray], float, float, bool]:
    """(normaliser to [0, 1], min, max, log?): log10 when the finite values span over 20x."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return (lambda x: np.zeros_like(x, dtype=np.float64)), 0.0, 0.0, False
    lo, hi = float(v.min()), float(v.max())
    if lo > 0 and hi / lo > 20:
        a, b = math.log10(lo), math.log10(hi)
        return (lambda x: (np.log10(np.maximum(x, lo)) - a) / (b - a)), lo, hi, True
    if hi - lo <= 0:
        return (lambda x: np.full(np.shape(x), 0.5)), lo, hi, False
    return (lambda x: (x - lo) / (hi - lo)), lo, hi, False


def heatmap_chart(heatmap, title: str | None = None, target: int = 640) -> Image.Image:
    """The image with a per-patch error overlay, colour bar (min / max) and the peak outlined."""
    font, small = _font(13), _font(11)
    base = Image.fromarray(np.asarray(heatmap.image, dtype=np.uint8), "RGB")
    h, w = base.height, base.width
    zoom = max(1.0, target / max(h, w))
    W, H = int(round(w * zoom)), int(round(h * zoom))
    base = base.resize((W, H), Image.BILINEAR)
    grid = np.asarray(heatmap.grid, dtype=np.float64)
    norm, lo, hi, logscale = _heat_scale(grid)
    rgb = _colormap(norm(grid))
    alpha = np.where(np.isnan(grid), 0, int(255 * HEAT_ALPHA)).astype(np.uint8)
    overlay = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    # One grid cell per patch: nearest-neighbour keeps patch edges sharp.
    p = heatmap.layout.patch_size
    overlay = overlay.resize((int(round(grid.shape[1] * p * zoom)), int(round(grid.shape[0] * p * zoom))), Image.NEAREST)
    shown = base.convert("RGBA")
    shown.alpha_composite(overlay.crop((0, 0, W, H)))
    left, top, bar_w, right_pad = 12, 74, 18, 110
    canvas = Image.new("RGB", (max(left + W + 20 + bar_w + right_pad, 720), max(top + H + 40, 260)), BG)
    canvas.paste(shown.convert("RGB"), (left, top))
    d = ImageDraw.Draw(canvas)
    # Peak: the patches behind the peak row (a soft token's block), outlined.
    _outline(d, heatmap.peak_box(), left, top, zoom)
    unit = "soft token" if heatmap.level == "token" else "patch"
    title = title or f"Quantization error per {unit}: image {heatmap.image_id}"
    d.text((10, 8), _clip_text(d, title, font, canvas.width - 20), fill=FG, font=font)
    d.text((10, 28), _clip_text(d, f"module {heatmap.module}", font, canvas.width - 20, left=True), fill=FG, font=font)
    sq = None if heatmap.row_sqnr_db is None else float(heatmap.row_sqnr_db[heatmap.peak_row])
    peak = float(heatmap.row_error[heatmap.peak_row]) if heatmap.row_error.size else float("nan")
    sub = (
        f"relative error = row noise power / mean signal power; peak {unit} {heatmap.peak_row} at patch "
        f"({heatmap.peak_xy[0]}, {heatmap.peak_xy[1]}): {_fmt_err(peak)}"
        + (f" ({sq:.1f} dB SQNR)" if sq is not None and math.isfinite(sq) else "")
    )
    d.text((10, 50), _clip_text(d, sub, small, canvas.width - 20), fill=FG, font=small)
    # Colour bar: max at the top, min at the bottom.
    bx = left + W + 20
    bar_h = max(120, H - 20)
    ramp = _colormap(np.linspace(1.0, 0.0, bar_h))[:, None, :].repeat(bar_w, axis=1)
    canvas.paste(Image.fromarray(ramp, "RGB"), (bx, top))
    d.rectangle([bx - 1, top - 1, bx + bar_w, top + bar_h], outline=FG)
    d.text((bx + bar_w + 6, top - 2), "max " + _fmt_err(hi), fill=FG, font=small)
    d.text((bx + bar_w + 6, top + bar_h - 12), "min " + _fmt_err(lo), fill=FG, font=small)
    d.text((bx + bar_w + 6, top + bar_h // 2 - 6), "log scale" if logscale else "linear", fill=FG, font=small)
    foot = f"peak outlined; {heatmap.layout.num_patches} patches, {heatmap.layout.num_tokens} soft tokens"
    d.text((left, top + H + 8), foot, fill=FG, font=small)
    return canvas


def _outline(d: ImageDraw.ImageDraw, box, left: int, top: int, zoom: float) -> None:
    """A pixel box of the resized image, drawn at `zoom` and offset: two bright lines, one dark."""
    x0, y0, x1, y1 = (v * zoom for v in box)
    for k in range(3):
        d.rectangle([left + x0 - k, top + y0 - k, left + x1 + k - 1, top + y1 + k - 1], outline=PEAK if k < 2 else (0, 0, 0))


def _fmt_err(v: float) -> str:
    if not math.isfinite(v):
        return str(v)
    return f"{v:.3g}" if v == 0 or 1e-3 <= abs(v) < 1e4 else f"{v:.2e}"


def heatmap_file_name(path_or_id, used: set[str] | None = None) -> str:
    """heatmap_<image stem>.png, made unique against `used` (which it updates)."""
    stem = Path(str(path_or_id).split("#")[0]).stem or "image"
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)
    name = f"heatmap_{stem}.png"
    if used is not None:
        k = 2
        while name in used:
            name = f"heatmap_{stem}_{k}.png"
            k += 1
        used.add(name)
    return name


def write_heatmap(path, heatmap, title: str | None = None) -> Path:
    """Write one heatmap PNG atomically; returns its path."""
    from core.errors import UnwritablePathError

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return _save_png(heatmap_chart(heatmap, title), path)
    except OSError as e:
        raise UnwritablePathError(path, f"heatmap not written: {e.strerror or e}") from None


def extreme_location_chart(loc, target: int = 640) -> Image.Image:
    """The image that set an observer's min or max, with the patch(es) where it occurred outlined."""
    font, small = _font(13), _font(11)
    base = Image.fromarray(np.asarray(loc.image, dtype=np.uint8), "RGB")
    zoom = max(1.0, target / max(base.height, base.width))
    W, H = int(round(base.width * zoom)), int(round(base.height * zoom))
    left, top = 12, 56
    canvas = Image.new("RGB", (max(left + W + 12, 520), top + H + 36), BG)
    canvas.paste(base.resize((W, H), Image.BILINEAR), (left, top))
    d = ImageDraw.Draw(canvas)
    for box in loc.boxes:
        _outline(d, box, left, top, zoom)
    title = f"{loc.observer}: {loc.which} {_fmt_err(float(loc.value))} set by {loc.image_id}"
    d.text((10, 8), _clip_text(d, title, font, canvas.width - 20), fill=FG, font=font)
    where = f"row {loc.row} ({loc.level}), {len(loc.boxes)} patch(es) outlined" if loc.level else "no patch-level row"
    d.text((10, 30), _clip_text(d, where, small, canvas.width - 20), fill=FG, font=small)
    return canvas


def write_extreme_location(path, loc) -> Path:
    """Write extreme_location_chart atomically; returns its path."""
    from core.errors import UnwritablePathError

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return _save_png(extreme_location_chart(loc), path)
    except OSError as e:
        raise UnwritablePathError(path, f"image not written: {e.strerror or e}") from None
