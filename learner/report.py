"""`sdloop report`: the learner's progress as one self-contained HTML page with plots.

The page is for looking instead of writing SQL: how much feedback arrives, what each adapter
version's training and gate measured, which version each alias (and each serving replica)
answered with over time. Everything comes through one read-only `query(sql, params)` function
given by the caller (the CLI passes one that goes through the running server's admin API, or
one that opens the store file read-only when no server holds it); values may arrive as JSON
types (timestamps as strings, JSON columns as text) or as Python values, and both are accepted.

The plots are inline SVG from `learner.svg`, with no plotting dependency: the page is one file
that opens anywhere, offline, and can be attached to a ticket.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from html import escape
from typing import Any

from feedback.events import FEEDBACK_TYPES, utcnow
from learner.svg import MISSING, Key, Marker, Series, Track, bar_chart, fmt_number, line_chart, step_chart
from store import BASE_VERSION, DEFAULT_ALIAS
from store.query import Query

STATUS_COLOURS = {
    "base": "#4e79a7", "promoted": "#2e7d32", "candidate": "#f0a202", "rejected": "#c62828",
    "retired": "#9e9e9e", "failed": "#6a1b9a",
}
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
           "#9c755f", "#bab0ac")
BEFORE_COLOUR, AFTER_COLOUR = "#8a8a8a", "#1f3b5c"


# -- reading the store ------------------------------------------------------------------------


class _Store:
    """The query function plus what the report needs to know about its answers: which tables
    exist (an old or partly migrated store lacks some) and whether any answer was cut short."""

    def __init__(self, query: Query) -> None:
        self._query = query
        self.truncated = False
        self.tables = {str(r["table_name"]) for r in self.rows(
            "SELECT table_name FROM information_schema.tables")}

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        result = self._query(sql, list(params))
        self.truncated = self.truncated or bool(result.truncated)
        return [dict(zip(result.columns, row, strict=True)) for row in result.rows]

    def scalar(self, sql: str) -> Any:
        rows = self.rows(sql)
        return next(iter(rows[0].values())) if rows else None


def _ts(value: Any) -> datetime | None:
    """A naive UTC datetime from what either query path returns (datetime or ISO text)."""
    if value is None or isinstance(value, datetime):
        ts = value
    else:
        try:
            ts = datetime.fromisoformat(str(value).strip())
        except ValueError:
            return None
    if ts is not None and ts.tzinfo is not None:
        ts = ts.astimezone(UTC).replace(tzinfo=None)
    return ts


def _num(value: Any) -> float | None:
    """A finite float, or None for missing, non-numeric, NaN or infinite values."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _as_dict(value: Any) -> dict[str, Any]:
    """A JSON object that may arrive parsed or as text (the admin API path gives text back
    for JSON nested in other types); anything else is treated as absent."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return value if isinstance(value, dict) else {}


@dataclass
class Version:
    """One adapter_versions row with the manifest fields the report shows."""

    version: str
    alias: str | None
    parent: str | None
    status: str
    created_at: datetime | None
    manifest: dict[str, Any]

    @property
    def train(self) -> dict[str, Any]:
        return _as_dict(self.manifest.get("train"))

    @property
    def gate(self) -> dict[str, Any]:
        return _as_dict(self.manifest.get("gate"))

    def metric(self, section: str, key: str) -> float | None:
        return _num((self.train if section == "train" else self.gate).get(key))

    @property
    def reasons(self) -> list[str]:
        reasons = self.gate.get("reasons") or []
        found = [str(r) for r in reasons] if isinstance(reasons, list) else [str(reasons)]
        if self.manifest.get("rejected_because"):
            found.append(f"registry: {self.manifest['rejected_because']}")
        return found


@dataclass
class Volume:
    """Counts per time bucket: explicit feedback by type, follow-ups, and completions."""

    unit: str
    buckets: list[datetime]
    signals: dict[str, list[int]]
    completions: list[int]


@dataclass
class ReportData:
    """What the page shows, read once up front so that rendering never queries the store."""

    completions: int = 0
    feedback: dict[str, int] = field(default_factory=dict)
    followups: int = 0
    answers: dict[str, int] = field(default_factory=dict)
    versions: list[Version] = field(default_factory=list)
    aliases: list[dict[str, Any]] = field(default_factory=list)
    replicas: list[dict[str, Any]] | None = None  # None: the store has no replica_versions table
    volume: Volume | None = None
    truncated: bool = False

    @property
    def trained(self) -> list[Version]:
        return [v for v in self.versions if v.status != BASE_VERSION and v.version != BASE_VERSION]

    @property
    def empty(self) -> bool:
        return not (self.completions or self.feedback or self.followups or self.trained
                    or self.replicas)

    def latest(self) -> datetime | None:
        """The newest time the store mentions: where the timelines end."""
        times = [v.created_at for v in self.versions]
        times += [_ts(a["updated_at"]) for a in self.aliases]
        times += [_ts(r["at"]) for r in self.replicas or []]
        if self.volume and self.volume.buckets:
            times.append(self.volume.buckets[-1] + _unit_step(self.volume.unit))
        found = [t for t in times if t is not None]
        return max(found) if found else None


def _count_by(store: _Store, table: str, column: str) -> dict[str, int]:
    """Row counts per value of `column`; an absent table (older store) counts as empty."""
    if table not in store.tables:
        return {}
    rows = store.rows(f"SELECT {column} AS k, count(*) AS n FROM {table} GROUP BY 1 ORDER BY 1")
    return {str(r["k"]): int(r["n"]) for r in rows}


def _count(store: _Store, table: str) -> int:
    return int(store.scalar(f"SELECT count(*) FROM {table}") or 0) if table in store.tables else 0


def load_report_data(query: Query) -> ReportData:
    """Everything the page shows, in a handful of small aggregate queries."""
    store = _Store(query)
    data = ReportData(
        completions=_count(store, "completions"),
        feedback=_order_types(_count_by(store, "feedback", "type")),
        followups=_count(store, "followups"),
        answers=_count_by(store, "completions", "version"),
    )
    if "adapter_versions" in store.tables:
        data.versions = [
            Version(str(r["version"]), r["alias"], r["parent"], str(r["status"]), _ts(r["created_at"]),
                    _as_dict(r["manifest"]))
            for r in store.rows("SELECT version, alias, parent, status, created_at, manifest "
                                "FROM adapter_versions ORDER BY created_at, version")
        ]
    if "aliases" in store.tables:
        data.aliases = store.rows("SELECT alias, version, previous, updated_at FROM aliases ORDER BY alias")
    if "replica_versions" in store.tables:
        data.replicas = _load_replicas(store)
    data.volume = _load_volume(store)
    data.truncated = store.truncated
    return data


def _load_replicas(store: _Store) -> list[dict[str, Any]]:
    return store.rows("SELECT replica, alias, version, action, status, detail, created_at AS at "
                      "FROM replica_versions ORDER BY created_at, replica")


def _order_types(counts: dict[str, int]) -> dict[str, int]:
    """Feedback types in their documented order, then any others the store holds."""
    known = [t for t in FEEDBACK_TYPES if t in counts]
    return {t: counts[t] for t in known + sorted(set(counts) - set(known))}


_SIGNAL_SOURCES = (("feedback", "type"), ("followups", "'follow-up'"))


def _load_volume(store: _Store) -> Volume | None:
    tables = [t for t in ("completions", "feedback", "followups") if t in store.tables]
    if not tables:
        return None
    union = " UNION ALL ".join(f"SELECT created_at AS t FROM {t}" for t in tables)
    span = store.rows(f"SELECT min(t) AS lo, max(t) AS hi FROM ({union})")
    lo, hi = (_ts(span[0]["lo"]), _ts(span[0]["hi"])) if span else (None, None)
    if lo is None or hi is None:
        return None
    unit = choose_unit(hi - lo)
    buckets = _bucket_range(lo, hi, unit)
    index = {b: i for i, b in enumerate(buckets)}
    signals: dict[str, list[int]] = {}
    for table, kind in _SIGNAL_SOURCES:
        if table not in store.tables:
            continue
        for r in store.rows(f"SELECT date_trunc(?, created_at) AS b, {kind} AS k, count(*) AS n "
                            f"FROM {table} GROUP BY 1, 2 ORDER BY 1, 2", [unit]):
            series = signals.setdefault(str(r["k"]), [0] * len(buckets))
            series[_bucket_index(index, r["b"], unit)] += int(r["n"])
    completions = [0] * len(buckets)
    if "completions" in store.tables:
        for r in store.rows("SELECT date_trunc(?, created_at) AS b, count(*) AS n FROM completions "
                            "GROUP BY 1 ORDER BY 1", [unit]):
            completions[_bucket_index(index, r["b"], unit)] += int(r["n"])
    order = [*_order_types({k: 0 for k in signals if k != "follow-up"}), "follow-up"]
    return Volume(unit, buckets, {k: signals[k] for k in order if k in signals}, completions)


def _bucket_index(index: dict[datetime, int], value: Any, unit: str) -> int:
    """Where a date_trunc bucket from the store falls among the buckets made here (truncated
    again, so a representation difference cannot lose a count)."""
    at = _ts(value)
    return index[_truncate(at, unit)] if at is not None else 0


def choose_unit(span: timedelta) -> str:
    """Bucket size for the volume plot: enough bars to show a trend, few enough to read."""
    if span <= timedelta(days=2):
        return "hour"
    if span <= timedelta(days=120):
        return "day"
    return "week"


def _unit_step(unit: str) -> timedelta:
    return {"hour": timedelta(hours=1), "day": timedelta(days=1), "week": timedelta(weeks=1)}[unit]


def _truncate(ts: datetime, unit: str) -> datetime:
    """The same bucket start as DuckDB's date_trunc (weeks start on Monday)."""
    if unit == "hour":
        return ts.replace(minute=0, second=0, microsecond=0)
    day = ts.replace(hour=0, minute=0, second=0, microsecond=0)
    return day - timedelta(days=day.weekday()) if unit == "week" else day


def _bucket_range(lo: datetime, hi: datetime, unit: str) -> list[datetime]:
    """Every bucket from the first to the last, empty ones included: gaps are information."""
    step, current, last = _unit_step(unit), _truncate(lo, unit), _truncate(hi, unit)
    buckets = []
    while current <= last:
        buckets.append(current)
        current += step
    return buckets


# -- the page ---------------------------------------------------------------------------------


def render_report(query: Query, *, source: str = "", now: datetime | None = None) -> str:
    """The whole report page. `query(sql, params)` runs one read-only statement on the store;
    `source` names the store on the page."""
    data = load_report_data(query)
    sections = [_summary_cards(data)]
    if data.empty:
        sections.append('<section><h2>No data yet</h2><p class="empty">There is no data yet: no '
                        "completions, feedback, follow-ups or trained adapter versions in this store. "
                        "Chat with the server and send feedback; the learner publishes versions "
                        "from it.</p></section>")
    else:
        sections += [_volume_section(data), _versions_section(data), _timeline_section(data)]
        if data.replicas is not None:
            sections.append(_replica_section(data))
    if data.truncated:
        sections.append('<p class="note">Some queries hit the row limit; counts may be incomplete '
                        "(raise server.sql_max_rows).</p>")
    generated = (now or utcnow()).strftime("%Y-%m-%d %H:%M UTC")
    subtitle = f"generated {generated}" + (f" from {source}" if source else "")
    return _page(subtitle, "\n".join(sections))


def _status_keys(statuses: Sequence[str]) -> list[Key]:
    seen = list(dict.fromkeys(statuses))
    return [Key(s, STATUS_COLOURS.get(s, "#555"), "dot") for s in seen]


def _status_colour(status: str) -> str:
    return STATUS_COLOURS.get(status, "#555")


def _summary_cards(data: ReportData) -> str:
    by_status: dict[str, int] = {}
    for v in data.versions:
        by_status[v.status] = by_status.get(v.status, 0) + 1
    cards = [
        ("completions", fmt_number(data.completions), ""),
        ("feedback", fmt_number(sum(data.feedback.values())),
         ", ".join(f"{t} {n}" for t, n in data.feedback.items())),
        ("follow-ups", fmt_number(data.followups), ""),
        ("adapter versions", fmt_number(len(data.trained)),
         ", ".join(f"{s} {n}" for s, n in by_status.items() if s != BASE_VERSION)),
        ("aliases", fmt_number(len(data.aliases)),
         ", ".join(f"{a['alias']} → {a['version']}" for a in data.aliases)),
    ]
    html = "".join(f'<div class="card" data-count="{escape(label)}"><div class="n">{escape(n)}</div>'
                   f'<div class="label">{escape(label)}</div><div class="detail">{escape(detail)}</div></div>'
                   for label, n, detail in cards)
    return f'<section class="cards">{html}</section>'


def _bucket_label(at: datetime, unit: str) -> str:
    return at.strftime("%m-%d %H:00" if unit == "hour" else "%Y-%m-%d")


def _volume_section(data: ReportData) -> str:
    volume = data.volume
    if volume is None or not volume.buckets:
        return "<section><h2>Feedback volume</h2><p class=\"empty\">No traffic recorded yet.</p></section>"
    labels = [_bucket_label(b, volume.unit) for b in volume.buckets]
    stacks = [Series(kind, list(counts), PALETTE[i % len(PALETTE)])
              for i, (kind, counts) in enumerate(volume.signals.items())]
    overlay = Series("completions", list(volume.completions), "#222222", "4 3")
    svg = bar_chart("volume", f"Signals and completions per {volume.unit}", labels, stacks, overlay,
                    y_label="feedback + follow-ups", overlay_label="completions")
    return (f"<section><h2>Feedback volume</h2>{svg}<p class=\"caption\">Bars: explicit feedback by type "
            f"and follow-up messages per {volume.unit} (left axis). Dashed line: completions served "
            f"(right axis).</p></section>")


_METRIC_PLOTS = (
    ("loss", "Training loss", "loss", (("loss first", "train", "loss_first", BEFORE_COLOUR, "5 4"),
                                       ("loss last", "train", "loss_last", AFTER_COLOUR, ""))),
    ("divergence", "Held-out teacher–student divergence", "divergence",
     (("before", "gate", "heldout_divergence_before", BEFORE_COLOUR, "5 4"),
      ("after", "gate", "heldout_divergence_after", AFTER_COLOUR, ""))),
    ("retention", "Retention accuracy (fixed question set)", "accuracy %",
     (("base model", "gate", "retention_base", BEFORE_COLOUR, "5 4"),
      ("candidate", "gate", "retention_candidate", AFTER_COLOUR, ""))),
    ("drift", "Drift: KL(base ‖ candidate) on neutral prompts", "KL per token",
     (("drift", "gate", "drift", AFTER_COLOUR, ""),)),
)


def _versions_section(data: ReportData) -> str:
    trained = data.trained
    if not trained:
        return ('<section><h2>Adapter versions</h2><p class="empty">No trained versions yet: the learner '
                f"has not published one.</p>{_versions_table(data)}</section>")
    names = [v.version for v in trained]
    fills = [_status_colour(v.status) for v in trained]
    keys = _status_keys([v.status for v in trained])
    plots = []
    for plot_id, title, y_label, specs in _METRIC_PLOTS:
        series = [Series(name, [v.metric(section, key) for v in trained], colour, dash)
                  for name, section, key, colour, dash in specs]
        plots.append(line_chart(plot_id, title, names, series, point_fills=fills, extra_keys=keys,
                                y_label=y_label, zero_based=plot_id == "drift"))
    return ('<section><h2>Adapter versions</h2><p class="caption">One dot per version in creation order; '
            "the dot's fill is its status. The gate promotes a version only if held-out divergence "
            "dropped, retention accuracy stayed within bound and drift stayed under its bound.</p>"
            f'<div class="plots">{"".join(plots)}</div>{_versions_table(data)}</section>')


def _arrow(before: float | None, after: float | None, lower_is_better: bool = True) -> str:
    """`before → after`, marked good or bad by the direction the gate wants."""
    if before is None and after is None:
        return MISSING
    cls = ""
    if before is not None and after is not None and before != after:
        cls = "good" if (after < before) == lower_is_better else "bad"
    attr = f' class="{cls}"' if cls else ""
    return f"<span{attr}>{escape(fmt_number(before))} → {escape(fmt_number(after))}</span>"


def _gate_cell(v: Version) -> str:
    gate = v.gate
    if "passed" not in gate:
        return MISSING
    verdict = "passed" if gate.get("passed") else "failed"
    enforced = "" if gate.get("enforced", True) else " (not enforced)"
    return f'<span class="{"good" if gate.get("passed") else "bad"}">{verdict}{escape(enforced)}</span>'


def _versions_table(data: ReportData) -> str:
    head = ("version", "status", "parent", "created (UTC)", "answers", "steps", "loss first → last",
            "divergence before → after", "retention base → candidate", "forgotten", "drift", "gate",
            "reasons")
    rows = []
    for v in data.versions:
        retention = _arrow(v.metric("gate", "retention_base"), v.metric("gate", "retention_candidate"),
                           lower_is_better=False)
        cells = [
            escape(v.version),
            f'<span class="status" style="background:{_status_colour(v.status)}">{escape(v.status)}</span>',
            escape(v.parent or MISSING),
            escape(v.created_at.strftime("%Y-%m-%d %H:%M") if v.created_at else MISSING),
            escape(fmt_number(data.answers.get(v.version, 0))),
            escape(fmt_number(v.metric("train", "steps"))),
            _arrow(v.metric("train", "loss_first"), v.metric("train", "loss_last")),
            _arrow(v.metric("gate", "heldout_divergence_before"),
                   v.metric("gate", "heldout_divergence_after")),
            retention, escape(fmt_number(v.metric("gate", "retention_forgotten"))),
            escape(fmt_number(v.metric("gate", "drift"))), _gate_cell(v),
            escape("; ".join(v.reasons)) or MISSING,
        ]
        rows.append(f'<tr data-version="{escape(v.version)}">' + "".join(f"<td>{c}</td>" for c in cells)
                    + "</tr>")
    header = "".join(f"<th>{escape(h)}</th>" for h in head)
    return (f'<table class="versions"><thead><tr>{header}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def alias_history(data: ReportData) -> dict[str, list[tuple[datetime, str]]]:
    """Which version each alias pointed at, reconstructed: the store keeps only the current
    alias row, so the history is the alias's promoted and retired versions in creation order
    (each was promoted when published), starting at the base model for the seeded alias, and
    ending at the current row when that differs (a rollback or a later manual promote)."""
    base = next((v for v in data.versions if v.version == BASE_VERSION), None)
    names = list(dict.fromkeys([a["alias"] for a in data.aliases]
                               + [v.alias for v in data.trained if v.alias]))
    history: dict[str, list[tuple[datetime, str]]] = {}
    for alias in names:
        changes = [(v.created_at, v.version) for v in data.trained
                   if v.alias == alias and v.status in ("promoted", "retired") and v.created_at]
        if alias == DEFAULT_ALIAS and base is not None and base.created_at is not None:
            changes.insert(0, (base.created_at, BASE_VERSION))
        current = next((a for a in data.aliases if a["alias"] == alias), None)
        updated = _ts(current["updated_at"]) if current else None
        if current and updated and (not changes or changes[-1][1] != current["version"]):
            changes.append((max(updated, changes[-1][0]) if changes else updated, str(current["version"])))
        if changes:
            history[alias] = sorted(changes)
    return history


def _levels(data: ReportData, extra: Sequence[str] = ()) -> list[str]:
    """Versions in creation order (the y rows of the timelines), then unknown names."""
    return list(dict.fromkeys([v.version for v in data.versions] + [str(e) for e in extra]))


def _timeline_section(data: ReportData) -> str:
    history = alias_history(data)
    end = data.latest()
    if not data.versions or end is None:
        return ""
    levels = _levels(data, [v for changes in history.values() for _, v in changes])
    tracks = [Track(f"alias {a}", PALETTE[i % len(PALETTE)], changes)
              for i, (a, changes) in enumerate(history.items())]
    markers = [Marker(v.created_at, v.version, _status_colour(v.status),
                      f"{v.version} created {v.created_at:%Y-%m-%d %H:%M}, now {v.status}")
               for v in data.versions if v.created_at]
    starts = [m.at for m in markers] + [t for changes in history.values() for t, _ in changes]
    svg = step_chart("aliases", "Version each alias pointed at", levels, tracks, markers, min(starts), end,
                     extra_keys=_status_keys([v.status for v in data.versions]))
    rows = "".join(f"<tr><td>{escape(str(a['alias']))}</td><td>{escape(str(a['version']))}</td>"
                   f"<td>{escape(str(a['previous'] or MISSING))}</td>"
                   f"<td>{escape(str(_ts(a['updated_at']) or MISSING))}</td></tr>" for a in data.aliases)
    return ("<section><h2>Version timeline</h2>"
            f"{svg}<p class=\"caption\">Dots: when each version was created, coloured by its status now. "
            "Lines: the version each alias answered with, reconstructed from creation times (the store "
            "keeps only the current alias row, so a rollback shows from its time on).</p>"
            '<table class="aliases"><thead><tr><th>alias</th><th>version</th><th>previous</th>'
            f"<th>updated (UTC)</th></tr></thead><tbody>{rows}</tbody></table></section>")


def replica_history(replicas: Sequence[dict[str, Any]]) -> dict[str, list[tuple[datetime, str]]]:
    """The version each replica served: it changes where a report says `promoted`."""
    history: dict[str, list[tuple[datetime, str]]] = {}
    for r in replicas:
        at = _ts(r["at"])
        if at is not None and r["status"] == "promoted":
            history.setdefault(str(r["replica"]), []).append((at, str(r["version"])))
    return history


def _replica_section(data: ReportData) -> str:
    replicas = data.replicas or []
    reports = [(r, _ts(r["at"])) for r in replicas]
    reports = [(r, at) for r, at in reports if at is not None]
    if not reports:
        return ('<section><h2>Replicas</h2><p class="empty">No replica has reported a version yet.</p>'
                "</section>")
    history = replica_history(replicas)
    names = list(dict.fromkeys(str(r["replica"]) for r, _ in reports))
    colours = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}
    tracks = [Track(f"replica {n}", colours[n], history[n]) for n in names if n in history]
    levels = _levels(data, [str(r["version"]) for r, _ in reports])
    markers = [Marker(at, str(r["version"]), _status_colour(str(r["status"])),
                      f"{r['replica']}: {r['action']} {r['version']} → {r['status']}"
                      + (f" ({r['detail']})" if r["detail"] else ""))
               for r, at in reports]
    end = max([data.latest() or reports[-1][1], reports[-1][1]])
    svg = step_chart("replicas", "Version each replica served", levels, tracks, markers,
                     min(at for _, at in reports), end,
                     extra_keys=_status_keys([str(r["status"]) for r, _ in reports]))
    return ("<section><h2>Replicas</h2>"
            f"{svg}<p class=\"caption\">Lines: the version each replica served (it changes at a "
            "report with status promoted). Dots: every report (publish, promote, rollback), coloured "
            "by its outcome; hover for the detail.</p></section>")


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1580px;
color:#222;padding:0 16px}
h1{margin:0 0 4px}h2{margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.subtitle,.caption,.note{color:#666}.empty{color:#666;font-style:italic}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin-top:16px}
.card{border:1px solid #ddd;border-radius:8px;padding:10px 14px;min-width:150px}
.card .n{font-size:26px;font-weight:600}.card .label{color:#555}.card .detail{color:#777;font-size:12px}
.plots{display:flex;flex-wrap:wrap;gap:8px}
svg.plot{border:1px solid #eee;border-radius:6px;background:#fff;max-width:100%;height:auto}
table{border-collapse:collapse;margin-top:12px;font-size:13px}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}th{background:#f6f6f6}
.status{color:#fff;border-radius:4px;padding:1px 6px}.good{color:#2e7d32}.bad{color:#c62828}
"""


def _page(subtitle: str, body: str) -> str:
    return ('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>sdloop learner report</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f'<h1>sdloop learner report</h1>\n<p class="subtitle">{escape(subtitle)}</p>\n'
            f"{body}\n</body>\n</html>\n")
