"""The health plot: stacked panels of the signals over time, alarm spans shaded, drawn with Pillow
(no matplotlib dependency)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .alarms import Alarm, HealthThresholds

_WIDTH, _PANEL_H, _GAP = 1200, 140, 34
_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 60, 56, 50
_BLUE, _ORANGE, _GREEN, _GREY = (31, 119, 180), (255, 127, 14), (44, 160, 44), (150, 150, 150)
_ALARM_FILL, _ALARM_TEXT, _STOP = (255, 215, 215), (190, 0, 0), (140, 0, 0)

# title, series (key, label, colour, axis), the alarms shaded there, left range (None: from the data).
_PANELS = (
    ("colour: CIE76 dE of the mean L*a*b* vs the baseline",
     (("colour_de_frame", "frame", _BLUE, "left"), ("colour_de_face", "face box", _ORANGE, "left")),
     ("colour_frame", "colour_face"), None),
    ("identity: SSIM of the upper face vs the reference", (("identity_ssim", "SSIM", _GREEN, "left"),),
     ("identity",), (0.0, 1.0)),
    ("face size: width / reference width (gaps: no face found)", (("face_size", "size", _BLUE, "left"),),
     ("face_size", "face_lost"), (0.0, 2.2)),
    ("A/V offset in frames (+ = video lags audio); confidence on the right",
     (("av_offset", "offset", _BLUE, "left"), ("av_confidence", "confidence", _GREY, "right")),
     ("av_offset",), (-10.0, 10.0)),
    ("seams: boundary / within-block difference; motion (8-bit levels); black frames",
     (("seam_ratio", "seam ratio", _ORANGE, "left"), ("motion", "motion", _GREEN, "left"),
      ("black_frames", "black frames", (0, 0, 0), "marks")),
     ("seam", "freeze", "black"), None),
)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        return ImageFont.load_default()


def _ticks(lo: float, hi: float, count: int) -> list[float]:
    raw = (hi - lo) / max(count, 1)
    step = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    step *= next(m for m in (1, 2, 5, 10) if m * step >= raw)
    return [v for v in np.arange(math.ceil(lo / step) * step, hi + step * 1e-6, step)]


def _spans(events: list[Alarm], names: tuple[str, ...], blocks: int) -> list[tuple[int, int, str]]:
    """(first block, last block, alarm name) of every span during which one of `names` was active."""
    spans, opened = [], {}
    for alarm in events:
        if alarm.name not in names:
            continue
        if alarm.state == "raised":
            opened[alarm.name] = alarm.block
        elif alarm.name in opened:
            spans.append((opened.pop(alarm.name), alarm.block - 1, alarm.name))
    spans.extend((start, blocks - 1, name) for name, start in opened.items())
    return spans


def _left_range(panel_series, series, thresholds: list[float]) -> tuple[float, float]:
    """0 to 1.5x the highest threshold, or more if most values are higher: a spike (a black block
    gives a seam ratio of 70) is drawn clipped at the top rather than flattening everything else."""
    values = np.concatenate([np.asarray(series[key]) for key, _, _, axis in panel_series if axis == "left"])
    values = values[np.isfinite(values)]
    top = max([*thresholds, 1.0]) * 1.5
    if values.size:
        top = max(top, float(np.percentile(values, 90)) * 1.2)
    return 0.0, top


def plot_health(series: dict, events: list[Alarm], thresholds: HealthThresholds, path: Path, title: str,
                end_s: float, stopped: bool = False) -> Path:
    """Draw the per-block `series` (HealthMonitor.series) with the alarm `events` to a PNG at `path`;
    `end_s`: where the video measured ends."""
    t = np.asarray(series["time_s"])
    blocks = t.size
    height = _TOP + len(_PANELS) * (_PANEL_H + _GAP) + _BOTTOM - _GAP
    image = Image.new("RGB", (_WIDTH, height), "white")
    draw = ImageDraw.Draw(image)
    font, small, big = _font(13), _font(11), _font(17)
    span_s = end_s if blocks and end_s > 0 else 1.0
    x0, x1 = _LEFT, _WIDTH - _RIGHT

    def x_of(seconds):
        return x0 + (x1 - x0) * np.asarray(seconds, dtype=float) / span_s

    raised = sorted({a.name for a in events if a.state == "raised"})
    head = f"Live Avatar health: {title} - {blocks} blocks, {span_s:.1f} s"
    head += f"; alarms: {', '.join(raised)}" if raised else "; no alarm"
    head += "; STOPPED" if stopped else ""
    draw.text((_LEFT, 14), head, fill="black", font=big)
    limits = thresholds.limits()
    stop_block = next((a.block for a in events if a.state == "raised"), None) if stopped else None

    for i, (name, panel_series, alarm_names, fixed) in enumerate(_PANELS):
        top = _TOP + i * (_PANEL_H + _GAP)
        bottom = top + _PANEL_H
        ons = [limits[a].on for a in alarm_names if a in ("colour_frame", "colour_face", "seam")]
        lo, hi = fixed or _left_range(panel_series, series, ons)

        def y_of(v, lo=lo, hi=hi, top=top, bottom=bottom):
            v = np.clip(np.asarray(v, dtype=float), lo, hi)
            return bottom - (bottom - top) * (v - lo) / (hi - lo)

        spans = _spans(events, alarm_names, blocks)
        for start, end, _ in spans:
            left = float(x_of(t[start]))
            right = float(x_of(t[end + 1] if end + 1 < blocks else span_s))
            draw.rectangle([left, top, max(right, left + 2), bottom], fill=_ALARM_FILL)
        for start, _, alarm in spans:  # one label row per alarm: spans of two alarms often overlap
            draw.text((float(x_of(t[start])) + 2, top + 2 + 13 * alarm_names.index(alarm)), alarm,
                      fill=_ALARM_TEXT, font=small)
        draw.rectangle([x0, top, x1, bottom], outline="black")
        draw.text((x0, top - 17), name, fill="black", font=font)
        for v in _ticks(lo, hi, 4):
            y = float(y_of(v))
            draw.line([x0 - 4, y, x0, y], fill="black")
            draw.text((x0 - 8, y), f"{v:g}", fill="black", font=small, anchor="rm")
        for a in alarm_names:  # the `on` thresholds, dashed (presence and black frames are counts)
            if a in ("face_lost", "black"):
                continue
            on = limits[a].on
            levels = {"face_size": (1 - on, 1 + on), "av_offset": (-on, on)}.get(a, (on,))
            for level in levels if lo <= min(levels) and max(levels) <= hi else ():
                y = float(y_of(level))
                for xs in range(x0, x1, 12):
                    draw.line([xs, y, min(xs + 6, x1), y], fill=_ALARM_TEXT)
        legend_x = x1
        for key, label, colour, axis in reversed(panel_series):
            values = np.asarray(series.get(key, ()), dtype=float)
            if axis == "marks":
                for k in np.nonzero(values > 0)[0]:
                    xm = float(x_of(t[k]))
                    draw.rectangle([xm - 1, bottom - 10, xm + 2, bottom], fill=colour)
            else:
                ys = y_of(values) if axis == "left" else bottom - (bottom - top) * np.clip(values, 0, 1)
                _polyline(draw, x_of(t), ys, colour)
            width = draw.textlength(label, font=small)
            legend_x -= width + 24
            draw.line([legend_x, top - 9, legend_x + 14, top - 9], fill=colour, width=3)
            draw.text((legend_x + 18, top - 16), label, fill=colour, font=small)
        if any(axis == "right" for *_, axis in panel_series):
            for v in (0.0, 0.5, 1.0):
                y = bottom - (bottom - top) * v
                draw.line([x1, y, x1 + 4, y], fill=_GREY)
                draw.text((x1 + 8, y), f"{v:g}", fill=_GREY, font=small, anchor="lm")
        if stop_block is not None:
            xs = float(x_of(t[stop_block]))
            draw.line([xs, top, xs, bottom], fill=_STOP, width=2)
            draw.text((xs + 3, bottom - 16), "stop", fill=_STOP, font=small)

    axis_y = _TOP + len(_PANELS) * (_PANEL_H + _GAP) - _GAP
    for v in _ticks(0.0, span_s, 12):
        x = float(x_of(v))
        draw.line([x, axis_y, x, axis_y + 4], fill="black")
        draw.text((x, axis_y + 6), f"{v:g}", fill="black", font=small, anchor="mt")
    draw.text(((x0 + x1) / 2, axis_y + 24), "time in the video (s)", fill="black", font=font, anchor="mt")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _polyline(draw: ImageDraw.ImageDraw, xs: np.ndarray, ys: np.ndarray, colour) -> None:
    """Lines through the finite points, broken at NaN (not measured); single points as dots."""
    finite = np.isfinite(ys)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], finite.astype(np.int8), [0]])))
    for start, stop in zip(edges[::2], edges[1::2]):
        points = list(zip(xs[start:stop].tolist(), ys[start:stop].tolist()))
        if len(points) == 1:
            x, y = points[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        else:
            draw.line(points, fill=colour, width=2)
