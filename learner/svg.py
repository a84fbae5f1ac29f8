"""Inline SVG charts for the learner report: line, stacked bar and step charts drawn from plain
numbers, labels and datetimes.

They exist so that the report stays one self-contained HTML file, with no plotting dependency: the
page opens anywhere, offline, and can be attached to a ticket. Nothing here knows sdloop's tables
or manifests; the report decides what to plot and passes values, colours and labels in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from html import escape

MISSING = "—"  # what a missing number prints as


# -- SVG primitives ---------------------------------------------------------------------------


@dataclass
class Series:
    """One named line or bar stack; None values are gaps."""

    name: str
    values: list[float | None]
    colour: str
    dash: str = ""


@dataclass
class Key:
    """A legend entry: a line sample (`line`), a filled box (`box`) or a dot (`dot`)."""

    label: str
    colour: str
    shape: str = "line"
    dash: str = ""


@dataclass
class Frame:
    """Pixel layout of one chart: the plot area is inside the margins."""

    width: int = 760
    height: int = 320
    left: int = 64
    right: int = 24
    top: int = 48
    bottom: int = 56

    @property
    def x0(self) -> float:
        return float(self.left)

    @property
    def x1(self) -> float:
        return float(self.width - self.right)

    @property
    def y0(self) -> float:  # the bottom edge of the plot area
        return float(self.height - self.bottom)

    @property
    def y1(self) -> float:
        return float(self.top)


def _f(value: float) -> str:
    return f"{value:.1f}"


def fmt_number(value: float | None) -> str:
    """Short, readable numbers for ticks and cells."""
    if value is None:
        return MISSING
    value = round(value, 10)
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value):,}"
    return f"{value:.4g}"


def nice_ticks(lo: float, hi: float, count: int = 5, integer: bool = False) -> list[float]:
    """Round tick values covering [lo, hi] (1, 2, 2.5 or 5 times a power of ten apart); with
    `integer`, whole numbers only, for counts."""
    if hi <= lo:
        lo, hi = (lo - 1.0, hi + 1.0) if lo == 0 else (lo - abs(lo) * 0.1, hi + abs(hi) * 0.1)
    raw = max((hi - lo) / count, 1.0) if integer else (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    mantissas = (1, 2, 5, 10) if integer and magnitude == 1 else (1, 2, 2.5, 5, 10)
    step = next(m * magnitude for m in mantissas if m * magnitude >= raw)
    start = math.floor(lo / step + 1e-9) * step
    ticks = [start]
    while ticks[-1] < hi - 1e-9 * step:
        ticks.append(start + len(ticks) * step)
    return [round(t, 12) for t in ticks]


# Styles as presentation attributes, not page CSS: an SVG saved from the page looks the same.
_TEXT_STYLE = {"tick": 'font-size="11" fill="#444"', "legend": 'font-size="11" fill="#444"',
               "axis-label": 'font-size="11" fill="#666"', "title": 'font-size="14" font-weight="600"',
               "empty": 'font-size="13" fill="#888" font-style="italic"'}
_RULE_STYLE = {"grid": 'stroke="#e6e6e6"', "axis": 'stroke="#999"'}


def _text(cls: str, x: float, y: float, content: str, anchor: str = "start",
          rotate: float | None = None) -> str:
    """An escaped text label; `rotate` turns it (degrees) about its anchor point."""
    turn = f' transform="rotate({rotate:g} {_f(x)} {_f(y)})"' if rotate is not None else ""
    return (f'<text class="{cls}" {_TEXT_STYLE[cls]} x="{_f(x)}" y="{_f(y)}" text-anchor="{anchor}"{turn}>'
            f"{escape(content)}</text>")


def _rule(cls: str, x1: float, y1: float, x2: float, y2: float) -> str:
    """A grid or axis line."""
    return f'<line class="{cls}" {_RULE_STYLE[cls]} x1="{_f(x1)}" y1="{_f(y1)}" x2="{_f(x2)}" y2="{_f(y2)}"/>'


def _scale(lo: float, hi: float, out_lo: float, out_hi: float) -> Callable[[float], float]:
    span = (hi - lo) or 1.0
    return lambda v: out_lo + (v - lo) / span * (out_hi - out_lo)


def _legend(keys: Sequence[Key], frame: Frame) -> tuple[str, int]:
    """Legend entries laid out left to right under the title; returns the SVG and its height."""
    parts, x, y = [], frame.x0, 38.0
    for key in keys:
        width = 26 + 6.6 * len(key.label) + 14
        if x + width > frame.width - 8 and x > frame.x0:
            x, y = frame.x0, y + 16
        if key.shape == "line":
            dash = f' stroke-dasharray="{key.dash}"' if key.dash else ""
            parts.append(f'<line x1="{_f(x)}" y1="{_f(y - 4)}" x2="{_f(x + 20)}" y2="{_f(y - 4)}" '
                         f'stroke="{key.colour}" stroke-width="2.5"{dash}/>')
        elif key.shape == "dot":
            parts.append(f'<circle cx="{_f(x + 10)}" cy="{_f(y - 4)}" r="5" fill="{key.colour}" '
                         f'stroke="#333" stroke-width="0.8"/>')
        else:
            parts.append(f'<rect x="{_f(x + 4)}" y="{_f(y - 10)}" width="12" height="12" '
                         f'fill="{key.colour}"/>')
        parts.append(_text("legend", x + 26, y, key.label))
        x += width
    return '<g class="legend">' + "".join(parts) + "</g>", int(y - 38 + 16)


def _svg(plot_id: str, title: str, frame: Frame, legend: str, body: Sequence[str]) -> str:
    return (f'<svg class="plot" data-plot="{escape(plot_id)}" xmlns="http://www.w3.org/2000/svg" '
            f'viewBox="0 0 {frame.width} {frame.height}" width="{frame.width}" height="{frame.height}" '
            f'role="img" aria-label="{escape(title)}" font-family="system-ui, sans-serif">'
            + _text("title", frame.x0, 20, title) + legend + "".join(body) + "</svg>")


def _y_axis(frame: Frame, ticks: Sequence[float], y: Callable[[float], float], label: str,
            right: bool = False) -> str:
    """Tick labels and grid lines (left axis) or tick labels only (right axis)."""
    parts = []
    x = frame.x1 + 6 if right else frame.x0 - 6
    anchor = "start" if right else "end"
    for t in ticks:
        if not right:
            parts.append(_rule("grid", frame.x0, y(t), frame.x1, y(t)))
        parts.append(_text("tick", x, y(t) + 4, fmt_number(t), anchor))
    if label:
        lx = frame.width - 8 if right else 14
        parts.append(_text("axis-label", lx, (frame.y0 + frame.y1) / 2, label, "middle", rotate=-90))
    edge = frame.x1 if right else frame.x0
    parts.append(_rule("axis", edge, frame.y1, edge, frame.y0))
    return "".join(parts)


def _category_positions(frame: Frame, n: int) -> list[float]:
    width = (frame.x1 - frame.x0) / max(n, 1)
    return [frame.x0 + (i + 0.5) * width for i in range(n)]


def _category_axis(frame: Frame, labels: Sequence[str], xs: Sequence[float]) -> str:
    """Slanted category labels; only every k-th when there are more than fit."""
    every = max(1, math.ceil(len(labels) / max(1, int((frame.x1 - frame.x0) // 26))))
    parts = [_rule("axis", frame.x0, frame.y0, frame.x1, frame.y0)]
    parts += [_text("tick", x, frame.y0 + 14, label, "end", rotate=-30)
              for i, (label, x) in enumerate(zip(labels, xs, strict=True)) if i % every == 0]
    return "".join(parts)


def _bottom_for(labels: Sequence[str]) -> int:
    """Room under the plot for slanted labels of this length."""
    longest = max((len(label) for label in labels), default=4)
    return min(140, 30 + int(3.6 * longest))


_TIME_STEPS = (60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 2 * 86400,
               7 * 86400, 14 * 86400, 30 * 86400, 91 * 86400, 365 * 86400)
_EPOCH = datetime(1970, 1, 1)


def time_ticks(start: datetime, end: datetime, most: int = 7) -> list[tuple[datetime, str]]:
    """Round instants between start and end, labelled with date or time as the spacing needs."""
    span = max((end - start).total_seconds(), 1.0)
    step = next((s for s in _TIME_STEPS if span / s <= most), _TIME_STEPS[-1])
    first = math.ceil((start - _EPOCH).total_seconds() / step) * step
    fmt = "%m-%d %H:%M" if step < 86400 else "%Y-%m-%d"
    ticks, t = [], first
    while t <= (end - _EPOCH).total_seconds():
        at = _EPOCH + timedelta(seconds=t)
        ticks.append((at, at.strftime(fmt)))
        t += step
    return ticks


def _time_axis(frame: Frame, start: datetime, end: datetime, x: Callable[[datetime], float]) -> str:
    parts = [_rule("axis", frame.x0, frame.y0, frame.x1, frame.y0)]
    for at, label in time_ticks(start, end):
        parts += [_rule("grid", x(at), frame.y1, x(at), frame.y0),
                  _text("tick", x(at), frame.y0 + 16, label, "middle")]
    parts.append(_text("axis-label", (frame.x0 + frame.x1) / 2, frame.height - 6, "time (UTC)", "middle"))
    return "".join(parts)


def _points(pairs: Sequence[tuple[float, float]]) -> str:
    return " ".join(f"{_f(x)},{_f(y)}" for x, y in pairs)


def _segments(values: Sequence[float | None]) -> list[list[int]]:
    """Runs of consecutive indexes with a value: a line is not drawn across a gap."""
    runs: list[list[int]] = []
    for i, v in enumerate(values):
        if v is None:
            continue
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _no_values(frame: Frame) -> str:
    middle = ((frame.x0 + frame.x1) / 2, (frame.y0 + frame.y1) / 2)
    return _text("empty", *middle, "no values recorded", "middle")


# -- charts -----------------------------------------------------------------------------------


def line_chart(plot_id: str, title: str, categories: Sequence[str], series: Sequence[Series], *,
               point_fills: Sequence[str] | None = None, extra_keys: Sequence[Key] = (),
               y_label: str = "", zero_based: bool = False) -> str:
    """Lines over categories (versions in order), one dot per value. The dot's fill can carry
    a second dimension (a version's status) while the line colour tells the series apart."""
    frame = Frame(bottom=_bottom_for(categories))
    legend, legend_h = _legend([Key(s.name, s.colour, "line", s.dash) for s in series] + list(extra_keys),
                               frame)
    frame.top = 38 + legend_h
    xs = _category_positions(frame, len(categories))
    body = [_category_axis(frame, categories, xs)]
    values = [v for s in series for v in s.values if v is not None]
    if not values:
        return _svg(plot_id, title, frame, legend, [*body, _no_values(frame)])
    ticks = nice_ticks(min(min(values), 0.0) if zero_based else min(values), max(values))
    y = _scale(ticks[0], ticks[-1], frame.y0, frame.y1)
    body.insert(0, _y_axis(frame, ticks, y, y_label))
    for s in series:
        dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
        for run in _segments(s.values):
            pairs = [(xs[i], y(v)) for i in run if (v := s.values[i]) is not None]
            body.append(f'<polyline class="series" data-series="{escape(s.name)}" fill="none" '
                        f'stroke="{s.colour}" stroke-width="2"{dash} points="{_points(pairs)}"/>')
        for i, v in enumerate(s.values):
            if v is None:
                continue
            fill = point_fills[i] if point_fills else s.colour
            body.append(f'<circle class="point" data-series="{escape(s.name)}" '
                        f'data-category="{escape(categories[i])}" cx="{_f(xs[i])}" cy="{_f(y(v))}" r="4.5" '
                        f'fill="{fill}" stroke="{s.colour}" stroke-width="1.5">'
                        f"<title>{escape(f'{categories[i]}: {s.name} {fmt_number(v)}')}</title></circle>")
    return _svg(plot_id, title, frame, legend, body)


def bar_chart(plot_id: str, title: str, categories: Sequence[str], stacks: Sequence[Series],
              overlay: Series | None = None, *, y_label: str = "", overlay_label: str = "") -> str:
    """Stacked bars per category (left axis) and an optional line on a right axis of its own,
    so a large count (completions) does not flatten the small ones (feedback)."""
    frame = Frame(bottom=_bottom_for(categories), right=64 if overlay else 24)
    keys = [Key(s.name, s.colour, "box") for s in stacks]
    if overlay:
        keys.append(Key(overlay.name, overlay.colour, "line", overlay.dash))
    legend, legend_h = _legend(keys, frame)
    frame.top = 38 + legend_h
    xs = _category_positions(frame, len(categories))
    totals = [sum(s.values[i] or 0 for s in stacks) for i in range(len(categories))]
    ticks = nice_ticks(0.0, max([*totals, 1.0]), integer=True)
    y = _scale(ticks[0], ticks[-1], frame.y0, frame.y1)
    bar_w = max(1.0, (frame.x1 - frame.x0) / max(len(categories), 1) * 0.7)
    body = [_y_axis(frame, ticks, y, y_label), _category_axis(frame, categories, xs)]
    for i, label in enumerate(categories):
        base, rects = 0.0, []
        for s in stacks:
            v = s.values[i] or 0
            if not v:
                continue
            tip = escape(f"{label}: {s.name} {fmt_number(v)}")
            rects.append(f'<rect class="bar" data-series="{escape(s.name)}" x="{_f(xs[i] - bar_w / 2)}" '
                         f'y="{_f(y(base + v))}" width="{_f(bar_w)}" height="{_f(y(base) - y(base + v))}" '
                         f'fill="{s.colour}"><title>{tip}</title></rect>')
            base += v
        body.append(f'<g class="bucket" data-bucket="{escape(label)}">{"".join(rects)}</g>')
    if overlay:
        body.append(_overlay_line(frame, overlay, xs, categories, overlay_label))
    return _svg(plot_id, title, frame, legend, body)


def _overlay_line(frame: Frame, overlay: Series, xs: Sequence[float], categories: Sequence[str],
                  label: str) -> str:
    values = [v or 0 for v in overlay.values]
    ticks = nice_ticks(0.0, max([*values, 1.0]), integer=True)
    y = _scale(ticks[0], ticks[-1], frame.y0, frame.y1)
    dash = f' stroke-dasharray="{overlay.dash}"' if overlay.dash else ""
    parts = [_y_axis(frame, ticks, y, label, right=True),
             f'<polyline class="series" data-series="{escape(overlay.name)}" fill="none" '
             f'stroke="{overlay.colour}" stroke-width="2"{dash} '
             f'points="{_points([(x, y(v)) for x, v in zip(xs, values, strict=True)])}"/>']
    for x, v, c in zip(xs, values, categories, strict=True):
        parts.append(f'<circle class="point" data-series="{escape(overlay.name)}" cx="{_f(x)}" '
                     f'cy="{_f(y(v))}" r="2.5" fill="{overlay.colour}">'
                     f"<title>{escape(f'{c}: {overlay.name} {fmt_number(v)}')}</title></circle>")
    return "".join(parts)


@dataclass
class Track:
    """One thing that points at a level over time (an alias, a replica): a step line."""

    name: str
    colour: str
    changes: list[tuple[datetime, str]]  # (when, level) in time order


@dataclass
class Marker:
    """One event on a level (a version created, a replica's report), coloured by status."""

    at: datetime
    level: str
    colour: str
    tip: str


def step_chart(plot_id: str, title: str, levels: Sequence[str], tracks: Sequence[Track],
               markers: Sequence[Marker], start: datetime, end: datetime, *,
               extra_keys: Sequence[Key] = ()) -> str:
    """Which level (version) each track pointed at over time, as step lines across a time axis
    with one horizontal row per level; events show as dots on their row."""
    if end <= start:
        start, end = start - timedelta(hours=1), end + timedelta(hours=1)
    pad = (end - start) * 0.02
    start, end = start - pad, end + pad
    frame = Frame(height=max(220, 110 + 26 * len(levels)),
                  left=max(64, 20 + int(6.8 * max((len(v) for v in levels), default=4))), bottom=44)
    legend, legend_h = _legend([Key(t.name, t.colour) for t in tracks] + list(extra_keys), frame)
    frame.top = 38 + legend_h
    row = (frame.y0 - frame.y1) / max(len(levels), 1)
    level_y = {v: frame.y1 + (i + 0.5) * row for i, v in enumerate(levels)}
    span = (end - start).total_seconds()

    def x(at: datetime) -> float:
        return frame.x0 + (at - start).total_seconds() / span * (frame.x1 - frame.x0)

    body = [_time_axis(frame, start, end, x)]
    for v, y in level_y.items():
        body += [_rule("grid", frame.x0, y, frame.x1, y), _text("tick", frame.x0 - 6, y + 4, v, "end")]
    for k, track in enumerate(tracks):
        offset = (k - (len(tracks) - 1) / 2) * 3.0  # overlapping tracks stay visible
        body.append(_step_line(track, x, {v: y + offset for v, y in level_y.items()}, end))
    for m in markers:
        body.append(f'<circle class="marker" data-level="{escape(m.level)}" cx="{_f(x(m.at))}" '
                    f'cy="{_f(level_y[m.level])}" r="5" fill="{m.colour}" stroke="#333" stroke-width="0.8">'
                    f"<title>{escape(m.tip)}</title></circle>")
    return _svg(plot_id, title, frame, legend, body)


def _step_line(track: Track, x: Callable[[datetime], float], level_y: dict[str, float],
               end: datetime) -> str:
    pairs: list[tuple[float, float]] = []
    for i, (at, level) in enumerate(track.changes):
        until = track.changes[i + 1][0] if i + 1 < len(track.changes) else end
        pairs += [(x(at), level_y[level]), (x(until), level_y[level])]
    return (f'<polyline class="series" data-series="{escape(track.name)}" fill="none" '
            f'stroke="{track.colour}" stroke-width="2.5" stroke-linejoin="round" '
            f'points="{_points(pairs)}"/>')
