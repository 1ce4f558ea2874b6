"""PNG charts for `ptq-studio report --plots DIR` and `locate --png`, drawn with matplotlib's Agg
canvas (no pyplot, no Qt: a Figure per chart, so nothing global is touched).

- ranges.png   one row per observer (forward order): its [min, max] on a symlog axis;
               weights grey-blue, activations blue, outlier-dominated ranges red.
- errors.png   per-module SQNR (dB) in forward order, coloured by kind, the lowest five
               numbered and the worst named; the end-to-end SQNR as a dashed line.
- scatter.png  FP vs quantized value samples of the worst modules (lowest SQNR), with the
               y = x diagonal.
- heatmap_<image stem>.png  one per evaluated image: the resized image the model saw with the
               final output's per-soft-token relative error (core.analysis.heatmaps) as a
               semi-transparent overlay, a colour scale, the peak outlined.

Every file is rendered in memory and written atomically (core.io). matplotlib is imported
inside the chart functions: importing it costs ~0.3 s and only the report commands draw.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from core.errors import UnwritablePathError
from core.io import atomic_write_bytes

BLUE = "#346ebe"
WEIGHT = "#8296af"
RED = "#cd3c32"
GREY = "#bebebe"
KIND_COLOURS = ["#346ebe", "#e68c28", "#3c965a", "#8c5aaa", "#5aa0aa", "#aa7850", "#c85a96", "#8296af"]
HEAT_ALPHA = 0.55
HEAT_CMAP = "inferno"  # dark = small error, bright yellow = large; readable over photos
PEAK = (0, 230, 255)  # outline of the peak patch(es): cyan over a black edge shows on any photo
DPI = 100
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")

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


def _figure(width_px: float, height_px: float):
    """A matplotlib Figure of this size in pixels, on an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 -- matplotlib costs ~0.3 s; only the report commands draw
    from matplotlib.figure import Figure  # noqa: PLC0415 -- matplotlib costs ~0.3 s; only the report commands draw

    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _save(path: Path, fig) -> Path:
    # Encoded in memory and written atomically: a reader never sees half a PNG.
    atomic_write_bytes(path, _png(fig))
    return path


def _pixel_axes(fig, left: float, top: float, width: float, height: float):
    """Axes placed in pixels from the figure's top-left corner (images keep their exact size)."""
    w, h = fig.get_size_inches() * DPI
    return fig.add_axes((left / w, 1 - (top + height) / h, width / w, height / h))


def _short(name: str, limit: int = 48) -> str:
    """A module or observer name cut from the left to `limit` characters (the tail says most)."""
    return name if len(name) <= limit else "..." + name[-(limit - 3):]


def _fmt_err(v: float) -> str:
    if not math.isfinite(v):
        return str(v)
    return f"{v:.3g}" if v == 0 or 1e-3 <= abs(v) < 1e4 else f"{v:.2e}"


# ---------------------------------------------------------------------------------------------
# ranges, errors, scatter
# ---------------------------------------------------------------------------------------------


def range_chart(records: Sequence, title: str = "Observer ranges"):
    """One horizontal bar per observer from min to max on a symlog axis (a Figure)."""
    from matplotlib.patches import Patch  # noqa: PLC0415 -- matplotlib costs ~0.3 s; only the report commands draw

    rows = [r for r in records if getattr(r, "has_stats", True)]
    labelled = len(rows) <= 200  # past that the names would overlap: bars only
    row_px = 13 if labelled else 8
    label_px = min(380, 60 + 6 * max([len(r.name) for r in rows] + [10])) if labelled else 60
    fig = _figure(label_px + 700, 150 + max(1, len(rows)) * row_px)
    ax = _pixel_axes(fig, label_px, 84, 660, max(1, len(rows)) * row_px)
    n_out = sum(bool(r.outlier) for r in rows)
    fig.suptitle(
        f"{title}: {len(rows)} observers, {n_out} outlier-dominated", x=0.01, y=1 - 10 / fig.bbox.height,
        ha="left", va="top", fontsize=12,
    )
    if not rows:
        ax.text(0.5, 0.5, "no observer has statistics", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    colours = [GREY if not r.enabled else RED if r.outlier else WEIGHT if r.kind == "weight" else BLUE for r in rows]
    lo = np.array([float(r.range_min) for r in rows])
    hi = np.array([float(r.range_max) for r in rows])
    y = np.arange(len(rows))
    ax.barh(y, hi - lo, left=lo, height=0.7, color=colours)
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # forward order, top to bottom
    ax.axvline(0.0, color="#999999", linewidth=0.8)
    ax.grid(axis="x", color="#e1e4e8")
    ax.set_axisbelow(True)
    if labelled:
        ax.set_yticks(y, [_short(r.name, (label_px - 20) // 6) for r in rows], fontsize=7)
    else:
        ax.set_yticks([])
        ax.set_ylabel(f"{len(rows)} observers in forward order")
    ax.set_xlabel("observed value (symlog axis: linear within ±1, logarithmic beyond)")
    ax.tick_params(axis="x", top=True, labeltop=True)  # a tall chart: the scale at both ends
    widest = int(np.argmax(hi - lo))
    ax.annotate(
        "widest range", (hi[widest], widest), xytext=(6, 0), textcoords="offset points", va="center", fontsize=7,
        color="#444444",
    )
    legend = [Patch(color=BLUE, label="activation"), Patch(color=WEIGHT, label="weight"), Patch(color=RED, label="outlier-dominated")]
    fig.legend(handles=legend, loc="upper left", ncols=3, fontsize=8, frameon=False, bbox_to_anchor=(0.005, 1 - 28 / fig.bbox.height))
    return fig


def _group(name: str) -> str:
    """A short label of the part of the model a module belongs to (L3, embed, pool, ...)."""
    m = _LAYER.search(name)
    if m:
        return f"L{m.group(1)}"
    head = name.split(".")[0]
    return {"patch_embedder": "embed", "encoder": "enc", "pooler": "pool", "": "model"}.get(head, head)


def _group_ticks(names: Sequence[str]) -> tuple[list[int], list[str]]:
    """One x tick at the first module of each layer / part, thinned so labels never collide."""
    ticks: list[int] = []
    labels: list[str] = []
    gap = max(1, len(names) // 30)
    for i, name in enumerate(names):
        g = _group(name)
        if labels and g == labels[-1]:
            continue
        if ticks and i - ticks[-1] < gap:
            continue
        ticks.append(i)
        labels.append(g)
    return ticks, labels


def error_chart(result, title: str = "Per-module SQNR (higher is better)"):
    """Per-module SQNR bars in forward order, the lowest five numbered, the worst named, end to end dashed."""
    from matplotlib.patches import Patch  # noqa: PLC0415 -- matplotlib costs ~0.3 s; only the report commands draw

    mods = list(result.modules)
    fig = _figure(1000, 480)
    ax = fig.add_axes((0.07, 0.2, 0.91, 0.6))
    fig.suptitle(f"{title}: {len(mods)} modules, {len(result.images)} image(s)", x=0.01, y=0.98, ha="left", fontsize=12)
    finite = [m.sqnr_db for m in mods if math.isfinite(m.sqnr_db)]
    e2e = result.end_to_end.sqnr_db
    if not finite and not math.isfinite(e2e):
        ax.text(0.5, 0.5, "no finite SQNR to draw", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    top = max(finite + ([e2e] if math.isfinite(e2e) else [])) * 1.1 + 1
    kinds = sorted({m.kind for m in mods})
    colour = {k: KIND_COLOURS[i % len(KIND_COLOURS)] for i, k in enumerate(kinds)}
    # An infinite SQNR (no error at all) is drawn to the top of the axis.
    heights = [m.sqnr_db if math.isfinite(m.sqnr_db) else top for m in mods]
    ax.bar(range(len(mods)), heights, width=0.8, color=[colour[m.kind] for m in mods])
    ax.set_xlim(-0.6, len(mods) - 0.4)
    ax.set_ylim(min(0.0, min(finite, default=0.0)), top)
    ax.set_ylabel("SQNR (dB)")
    ax.set_xlabel("modules in forward order (ticks: first module of each layer)")
    ax.set_xticks(*_group_ticks([m.name for m in mods]), fontsize=8)
    ax.grid(axis="y", color="#e1e4e8")
    ax.set_axisbelow(True)
    worst = sorted(range(len(mods)), key=lambda i: mods[i].sqnr_db)[:5]
    for rank, i in enumerate(worst, 1):
        ax.annotate(str(rank), (i, heights[i]), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                    color=RED, fontsize=9, fontweight="bold")
    if worst:  # the worst bar outlined in red, so it reads at a glance
        ax.bar([worst[0]], [heights[worst[0]]], width=0.8, fill=False, edgecolor=RED, linewidth=2)
    listing = [f"{r}: {_short(mods[i].name, 44)} ({mods[i].sqnr_db:.1f} dB)" for r, i in enumerate(worst, 1)]
    text = "lowest (outlined: worst): " + "   ".join(listing[:3]) + ("\n" + "   ".join(listing[3:]) if listing[3:] else "")
    fig.text(0.01, 0.925, text, color=RED, fontsize=8, ha="left", va="top", linespacing=1.5)
    if math.isfinite(e2e):
        ax.axhline(e2e, color="#282828", linestyle="--", linewidth=1)
        ax.text(0.99, e2e, f"end to end {e2e:.1f} dB", ha="right", va="bottom", fontsize=8, transform=ax.get_yaxis_transform(),
                bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.85})
    handles = [Patch(color=colour[k], label=k) for k in kinds[:8]]
    fig.legend(handles=handles, loc="lower left", ncols=min(8, max(1, len(handles))), fontsize=8, frameon=False,
               bbox_to_anchor=(0.06, 0.0))
    return fig


def scatter_chart(result, n: int = 6, title: str = "FP vs quantized samples, worst modules"):
    """A grid of FP (x) vs quantized (y) scatter plots for the n lowest-SQNR modules."""
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415 -- matplotlib costs ~0.3 s; only the report commands draw

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
    fig = _figure(cols * 320, 50 + rows * 320)
    fig.suptitle(f"{title} (lowest SQNR first)", x=0.01, y=1 - 10 / fig.bbox.height, ha="left", va="top", fontsize=12)
    if not mods:
        fig.text(0.5, 0.5, "no samples", ha="center", va="center")
        return fig
    grid = fig.add_gridspec(rows, cols, left=0.07, right=0.98, bottom=0.1 / rows, top=1 - 60 / fig.bbox.height,
                            hspace=0.45, wspace=0.35)
    for k, m in enumerate(mods):
        ax = fig.add_subplot(grid[k // cols, k % cols])
        fp, q = np.asarray(m.samples_fp, np.float64), np.asarray(m.samples_q, np.float64)
        lo, hi = float(min(fp.min(), q.min())), float(max(fp.max(), q.max()))
        if hi - lo < 1e-12:
            lo, hi = lo - 1, hi + 1
        pad = (hi - lo) * 0.04
        lo, hi = lo - pad, hi + pad
        ax.plot([lo, hi], [lo, hi], color="#a0a0a0", linewidth=0.8, label="y = x")
        ax.scatter(fp, q, s=1.5, color=BLUE, linewidths=0, rasterized=True)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal", adjustable="box")
        ax.grid(color="#e1e4e8")
        ax.set_axisbelow(True)
        ax.set_title(f"{k + 1}. {_short(m.name, 40)}", fontsize=8, loc="left")
        ax.set_xlabel(f"FP value   (SQNR {m.sqnr_db:.1f} dB, PEIR {m.peir:.3g})", fontsize=8)
        ax.set_ylabel("quantized value", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.yaxis.set_major_locator(MaxNLocator(5))
    return fig


def write_report_plots(folder, records, result) -> list[Path]:
    """Write ranges.png, errors.png and scatter.png into folder; returns their paths."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return [
            _save(folder / "ranges.png", range_chart(records)),
            _save(folder / "errors.png", error_chart(result)),
            _save(folder / "scatter.png", scatter_chart(result)),
        ]
    except OSError as e:
        raise UnwritablePathError(f"{folder}: cannot write plots ({e.strerror or e}); choose another --plots folder") from None


# ---------------------------------------------------------------------------------------------
# images: the error heatmap and the extreme's location
# ---------------------------------------------------------------------------------------------

# Where heatmap_chart puts the image and the colour scale, in pixels from the top-left corner.
HEATMAP_LEFT, HEATMAP_TOP, BAR_GAP, BAR_WIDTH = 12, 74, 20, 18


def _zoomed(image: np.ndarray, target: int) -> tuple[Image.Image, float]:
    """The image scaled up (bilinear) so its longer side is at least `target` pixels, and the zoom."""
    base = Image.fromarray(np.asarray(image, dtype=np.uint8), "RGB")
    zoom = max(1.0, target / max(base.height, base.width))
    size = (int(round(base.width * zoom)), int(round(base.height * zoom)))
    return base.resize(size, Image.BILINEAR), zoom


def _show_image(ax, image: Image.Image) -> None:
    """The image pixel for pixel in axes of its own size, without ticks."""
    ax.imshow(np.asarray(image), extent=(0, image.width, image.height, 0), interpolation="nearest")
    ax.set_xlim(0, image.width)
    ax.set_ylim(image.height, 0)
    ax.set_axis_off()


def _outline(ax, box, zoom: float) -> None:
    """A pixel box of the resized image, drawn at `zoom`: cyan over a black edge, not antialiased."""
    from matplotlib.patches import Rectangle  # noqa: PLC0415 -- matplotlib costs ~0.3 s; only the report commands draw

    x0, y0, x1, y1 = (v * zoom for v in box)
    for colour, width_px in (("black", 6), (tuple(c / 255 for c in PEAK), 3)):
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, antialiased=False,
                               linewidth=width_px * 72 / DPI))


def _heat_norm(values: np.ndarray) -> tuple[Any, float, float, bool]:
    """(matplotlib norm, min, max, log?): logarithmic when the finite values span over 20x."""
    from matplotlib.colors import LogNorm, Normalize  # noqa: PLC0415 -- matplotlib costs ~0.3 s; only the report commands draw

    v = values[np.isfinite(values)]
    if v.size == 0:
        return Normalize(0.0, 1.0), 0.0, 0.0, False
    lo, hi = float(v.min()), float(v.max())
    if lo > 0 and hi / lo > 20:
        return LogNorm(lo, hi), lo, hi, True
    if hi - lo <= 0:
        return Normalize(lo - 1.0, hi + 1.0), lo, hi, False
    return Normalize(lo, hi), lo, hi, False


def heatmap_chart(heatmap, title: str | None = None, target: int = 640):
    """The image with a per-patch error overlay, a colour scale and the peak outlined (a Figure)."""
    from matplotlib import colormaps  # noqa: PLC0415 -- matplotlib costs ~0.3 s; only the report commands draw

    base, zoom = _zoomed(heatmap.image, target)
    W, H = base.width, base.height
    left, top = HEATMAP_LEFT, HEATMAP_TOP
    bar_h = max(120, H - 20)
    fig = _figure(max(left + W + BAR_GAP + BAR_WIDTH + 110, 720), max(top + H + 40, 260))
    ax = _pixel_axes(fig, left, top, W, H)
    _show_image(ax, base)
    grid = np.asarray(heatmap.grid, dtype=np.float64)
    norm, lo, hi, logscale = _heat_norm(grid)
    cmap = colormaps[HEAT_CMAP].with_extremes(bad=(0, 0, 0, 0))  # cells without a patch stay clear
    p = heatmap.layout.patch_size * zoom
    # One grid cell per patch: nearest-neighbour keeps the patch edges sharp.
    ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, alpha=HEAT_ALPHA, interpolation="nearest",
              extent=(0, grid.shape[1] * p, grid.shape[0] * p, 0))
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    _outline(ax, heatmap.peak_box(), zoom)
    bar = _pixel_axes(fig, left + W + BAR_GAP, top, BAR_WIDTH, bar_h)
    scale = fig.colorbar(ax.images[-1], cax=bar)
    scale.solids.set(alpha=1.0)  # the scale shows the colours themselves, not blended with white
    scale.set_label(f"relative error, {_fmt_err(lo)} to {_fmt_err(hi)} ({'log' if logscale else 'linear'} scale)", fontsize=8)
    scale.ax.tick_params(which="both", labelsize=7)
    unit = "soft token" if heatmap.level == "token" else "patch"
    title = title or f"Quantization error per {unit}: image {heatmap.image_id}"
    sq = None if heatmap.row_sqnr_db is None else float(heatmap.row_sqnr_db[heatmap.peak_row])
    peak = float(heatmap.row_error[heatmap.peak_row]) if heatmap.row_error.size else float("nan")
    sub = (
        f"relative error = row noise power / mean signal power; peak {unit} {heatmap.peak_row} at patch "
        f"({heatmap.peak_xy[0]}, {heatmap.peak_xy[1]}): {_fmt_err(peak)}"
        + (f" ({sq:.1f} dB SQNR)" if sq is not None and math.isfinite(sq) else "")
    )
    height = fig.bbox.height
    fig.text(10 / fig.bbox.width, 1 - 8 / height, title, fontsize=11, va="top", ha="left")
    fig.text(10 / fig.bbox.width, 1 - 28 / height, f"module {_short(heatmap.module, 90)}", fontsize=10, va="top", ha="left")
    fig.text(10 / fig.bbox.width, 1 - 50 / height, sub, fontsize=8, va="top", ha="left")
    foot = f"peak outlined in cyan; {heatmap.layout.num_patches} patches, {heatmap.layout.num_tokens} soft tokens"
    fig.text(left / fig.bbox.width, 1 - (top + H + 8) / height, foot, fontsize=8, va="top", ha="left")
    return fig


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
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return _save(path, heatmap_chart(heatmap, title))
    except OSError as e:
        raise UnwritablePathError(path, f"heatmap not written: {e.strerror or e}") from None


def extreme_location_chart(loc, target: int = 640):
    """The image that set an observer's min or max, with the patch(es) where it occurred outlined."""
    base, zoom = _zoomed(loc.image, target)
    left, top = 12, 56
    fig = _figure(max(left + base.width + 12, 520), top + base.height + 36)
    ax = _pixel_axes(fig, left, top, base.width, base.height)
    _show_image(ax, base)
    for box in loc.boxes:
        _outline(ax, box, zoom)
    height = fig.bbox.height
    title = f"{loc.observer}: {loc.which} {_fmt_err(float(loc.value))} set by {loc.image_id}"
    where = f"row {loc.row} ({loc.level}), {len(loc.boxes)} patch(es) outlined in cyan" if loc.level else "no patch-level row"
    fig.text(10 / fig.bbox.width, 1 - 8 / height, title, fontsize=11, va="top", ha="left")
    fig.text(10 / fig.bbox.width, 1 - 30 / height, where, fontsize=9, va="top", ha="left")
    return fig


def write_extreme_location(path, loc) -> Path:
    """Write extreme_location_chart atomically; returns its path."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return _save(path, extreme_location_chart(loc))
    except OSError as e:
        raise UnwritablePathError(path, f"image not written: {e.strerror or e}") from None
