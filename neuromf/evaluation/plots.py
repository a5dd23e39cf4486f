"""Small plots drawn with Pillow (matplotlib is not a dependency): line charts with a log axis, histograms.

Only what the reports need: axes with ticks and labels, polylines, step
histograms, vertical markers and a legend. Images are RGB; `save_png` writes
them atomically.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from neuromf.atomic import atomic_write_bytes

__all__ = ["Series", "Axes", "line_chart", "histogram_grid", "save_png", "COLORS"]

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
GREY = (150, 150, 150)


def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


@dataclass
class Series:
    """One line (or, with `fill`, a filled step histogram) of a chart."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    color: tuple[int, int, int] = COLORS[0]
    width: int = 2
    fill: bool = False
    dots: bool = False


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    first = math.ceil(lo / step) * step
    return [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    mults = (1, 2, 5) if b - a <= 2 else (1,)
    return [m * 10.0**e for e in range(a, b + 1) for m in mults if lo <= m * 10.0**e <= hi]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-2:
        return f"{v:.0e}"
    return f"{v:.3g}"


@dataclass
class Axes:
    """A plotting area inside an image: data coordinates -> pixels, with a frame, ticks and labels."""

    draw: ImageDraw.ImageDraw
    box: tuple[int, int, int, int]  # left, top, right, bottom of the plotting area in pixels
    xlim: tuple[float, float]
    ylim: tuple[float, float]
    log_y: bool = False
    font: ImageFont.ImageFont = field(default_factory=_font)

    def _ty(self, y: float) -> float:
        return math.log10(y) if self.log_y else y

    def px(self, x: float, y: float) -> tuple[float, float]:
        left, t, r, b = self.box
        x0, x1 = self.xlim
        y0, y1 = self._ty(self.ylim[0]), self._ty(self.ylim[1])
        fx = (x - x0) / (x1 - x0) if x1 > x0 else 0.5
        fy = (self._ty(y) - y0) / (y1 - y0) if y1 > y0 else 0.5
        return left + fx * (r - left), b - fy * (b - t)

    def frame(self, title: str = "", xlabel: str = "", ylabel: str = "") -> None:
        left, t, r, b = self.box
        d, f = self.draw, self.font
        yt = _log_ticks(*self.ylim) if self.log_y else _nice_ticks(*self.ylim)
        for y in yt:
            _, py = self.px(self.xlim[0], y)
            d.line([(left, py), (r, py)], fill=(232, 232, 232))
            d.text((left - 4, py), _fmt(y), fill=(0, 0, 0), font=f, anchor="rm")
        for x in _nice_ticks(*self.xlim):
            px, _ = self.px(x, self.ylim[0])
            d.line([(px, b), (px, b + 4)], fill=(0, 0, 0))
            d.text((px, b + 6), _fmt(x), fill=(0, 0, 0), font=f, anchor="mt")
        d.rectangle([left, t, r, b], outline=(0, 0, 0))
        if title:
            d.text(((left + r) / 2, t - 4), title, fill=(0, 0, 0), font=f, anchor="md")
        if xlabel:
            d.text(((left + r) / 2, b + 22), xlabel, fill=(0, 0, 0), font=f, anchor="mt")
        if ylabel:
            d.text((left, t - 18), ylabel, fill=(0, 0, 0), font=f, anchor="ld")

    def _visible(self, x: float, y: float) -> bool:
        return math.isfinite(x) and math.isfinite(y) and (y > 0 or not self.log_y)

    def line(self, s: Series) -> None:
        pts = [self.px(x, y) for x, y in zip(s.x, s.y) if self._visible(x, y)]
        if s.fill:
            self._fill_steps(s)
        elif len(pts) > 1:
            self.draw.line(pts, fill=s.color, width=s.width, joint="curve")
        if s.dots or len(pts) == 1:
            for px, py in pts:
                self.draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=s.color)

    def _fill_steps(self, s: Series) -> None:
        """A filled histogram: s.x are the bin edges (len(y) + 1), s.y the heights."""
        light = tuple(int(c + (255 - c) * 0.55) for c in s.color)
        base = self.ylim[0]
        for i, h in enumerate(s.y):
            if h > base and math.isfinite(h):
                x0, y0 = self.px(s.x[i], min(h, self.ylim[1]))
                x1, y1 = self.px(s.x[i + 1], base)
                self.draw.rectangle([x0, y0, x1, y1], fill=light)

    def steps(self, s: Series) -> None:
        """A histogram outline: s.x are the bin edges, s.y the heights."""
        pts = []
        for i, h in enumerate(s.y):
            h = min(max(h, self.ylim[0]), self.ylim[1])
            pts += [self.px(s.x[i], h), self.px(s.x[i + 1], h)]
        if len(pts) > 1:
            self.draw.line(pts, fill=s.color, width=s.width)

    def vline(self, x: float, color: tuple[int, int, int], dash: int = 4) -> None:
        left, t, r, b = self.box
        px, _ = self.px(x, self.ylim[0])
        for y in range(t, b, 2 * dash):
            self.draw.line([(px, y), (px, min(y + dash, b))], fill=color, width=1)

    def legend(self, entries: Sequence[tuple[str, tuple[int, int, int]]]) -> None:
        left, t, r, b = self.box
        y = t + 6
        for label, color in entries:
            w = self.draw.textlength(label, font=self.font)
            self.draw.rectangle([r - w - 30, y + 3, r - w - 16, y + 11], fill=color)
            self.draw.text((r - w - 10, y), label, fill=(0, 0, 0), font=self.font)
            y += 16


def _y_range(values: np.ndarray, log_y: bool) -> tuple[float, float]:
    v = values[np.isfinite(values)]
    if log_y:
        v = v[v > 0]
    if v.size == 0:
        return (0.1, 10.0) if log_y else (0.0, 1.0)
    lo, hi = float(v.min()), float(v.max())
    if log_y:
        if hi / lo < 10:
            mid = math.sqrt(hi * lo)
            lo, hi = min(lo, mid / math.sqrt(10)), max(hi, mid * math.sqrt(10))
        return lo / 1.1, hi * 1.1
    pad = 0.05 * (hi - lo) if hi > lo else 1.0
    return lo - pad, hi + pad


def line_chart(
    series: Sequence[Series],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    log_y: bool = False,
    markers: Sequence[tuple[float, tuple[int, int, int]]] = (),
    size: tuple[int, int] = (900, 520),
) -> Image.Image:
    """An RGB chart of several series; `markers` are dashed vertical lines (x, color)."""
    img = Image.new("RGB", size, "white")
    xs = np.array([x for s in series for x in s.x], dtype=float)
    ys = np.array([y for s in series for y in s.y], dtype=float)
    xlim = (float(np.nanmin(xs)), float(np.nanmax(xs))) if xs.size else (0.0, 1.0)
    if xlim[1] <= xlim[0]:
        xlim = (xlim[0] - 1, xlim[1] + 1)
    ax = Axes(ImageDraw.Draw(img), (80, 40, size[0] - 20, size[1] - 50), xlim, _y_range(ys, log_y), log_y)
    ax.frame(title, xlabel, ylabel)
    for x, color in markers:
        ax.vline(x, color)
    for s in series:
        ax.line(s)
    ax.legend([(s.label, s.color) for s in series])
    return img


def histogram_grid(
    panels: Sequence[Sequence[dict]],
    *,
    title: str = "",
    panel_size: tuple[int, int] = (360, 230),
) -> Image.Image:
    """Rows x columns of histogram panels. A panel: {"title", "edges", "series": [Series with y = densities]};
    a series with fill=True is drawn filled (the reference), the others as outlines."""
    rows, cols = len(panels), max((len(r) for r in panels), default=1)
    pw, ph = panel_size
    top = 30 if title else 0
    img = Image.new("RGB", (cols * pw, top + rows * ph), "white")
    draw = ImageDraw.Draw(img)
    font = _font(14)
    if title:
        draw.text((img.width / 2, 8), title, fill=(0, 0, 0), font=font, anchor="mt")
    for i, row in enumerate(panels):
        for j, panel in enumerate(row):
            edges = np.asarray(panel["edges"], dtype=float)
            heights = np.array([v for s in panel["series"] for v in s.y], dtype=float)
            ymax = float(np.nanmax(heights)) * 1.08 if heights.size and np.nanmax(heights) > 0 else 1.0
            box = (j * pw + 60, top + i * ph + 26, (j + 1) * pw - 12, top + (i + 1) * ph - 40)
            ax = Axes(draw, box, (float(edges[0]), float(edges[-1])), (0.0, ymax))
            ax.frame(panel.get("title", ""))
            for s in panel["series"]:
                (ax.line if s.fill else ax.steps)(s)
            ax.legend([(s.label, s.color) for s in panel["series"]])
    return img


def save_png(img: Image.Image, path: Path) -> Path:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)
