"""`sdloop report`: the HTML page rendered from a real DuckDB store, through the same
read-only file path `sdloop` uses when no server runs."""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from feedback import CompletionEvent, FeedbackEvent, FollowupEvent, context_hash, new_id, reply_hash
from learner.report import choose_unit, render_report
from learner.svg import nice_ticks
from serving.commands import main
from store import QueryResult, StoreWriter, query_file
from tests.harness.factories import completion as make_completion

T0 = datetime(2025, 3, 1, 9, 15)
QUESTION = [{"role": "user", "content": "Capital of France?"}]
VOID = {"meta", "br", "hr", "img", "input", "link", "col", "area", "base", "source", "wbr"}


class StrictParser(HTMLParser):
    """html.parser accepts almost anything; this one also insists every tag is closed in
    order, so a broken SVG fragment fails the test instead of rendering half a page."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.svgs: list[dict[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "svg":
            self.svgs.append({k: v or "" for k, v in attrs})
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()


def parse(page: str) -> StrictParser:
    parser = StrictParser()
    parser.feed(page)
    parser.close()
    assert parser.errors == [] and parser.stack == [], (parser.errors, parser.stack)
    return parser


def plot(page: str, plot_id: str) -> str:
    """The markup of one plot."""
    match = re.search(rf'<svg class="plot" data-plot="{plot_id}".*?</svg>', page, re.S)
    assert match, f"no plot {plot_id}"
    return match.group(0)


def completion(cid: str, at: datetime, text: str = "Paris.", version: str = "base") -> CompletionEvent:
    return make_completion(cid, QUESTION, text=text, at=at, version=version)


def manifest(version: str, parent: str, steps: int, losses: tuple[float, float],
             divergence: tuple[float, float], retention: tuple[float, float], drift: float,
             reasons: list[str]) -> dict[str, Any]:
    """Shaped like a round's record merged into the manifest `learner.versions` writes."""
    return {
        "version": version, "alias": "default", "parent": parent, "base_model": "/models/tiny",
        "created_at": "2025-03-01T00:00:00Z", "files": {}, "probe": {}, "preset": "sdft", "seed": 0,
        "knobs": {}, "episodes": ["c0"],
        "train": {"steps": steps, "resumed_at_step": 0, "responses_from": "engine", "items": 4,
                  "gate_items": 4, "anchors": 2, "loss_first": losses[0], "loss_last": losses[1]},
        "gate": {"passed": not reasons, "reasons": reasons,
                 "heldout_divergence_before": divergence[0], "heldout_divergence_after": divergence[1],
                 "retention_base": retention[0], "retention_candidate": retention[1],
                 "retention_forgotten": 1 if retention[1] < retention[0] else 0, "drift": drift,
                 "enforced": True},
    }


VERSIONS = [  # (version, status, created, manifest)
    ("default@v1", "retired", T0 + timedelta(hours=2),
     manifest("default@v1", "base", 20, (2.5, 1.1), (0.9, 0.5), (80.0, 80.0), 0.01, [])),
    ("default@v2", "rejected", T0 + timedelta(hours=3),
     manifest("default@v2", "default@v1", 30, (1.8, 1.6), (0.5, 0.6), (80.0, 70.0), 0.2,
              ["held-out divergence did not drop (0.5000 -> 0.6000)"])),
    ("default@v3", "promoted", T0 + timedelta(hours=4),
     manifest("default@v3", "default@v1", 25, (1.5, 0.7), (0.5, 0.3), (80.0, 78.0), 0.02, [])),
]
REPLICA_REPORTS = [  # (replica, version, action, status, at)
    ("gw-a", "default@v1", "publish", "promoted", T0 + timedelta(hours=2, minutes=1)),
    ("gw-b", "default@v1", "publish", "promoted", T0 + timedelta(hours=2, minutes=2)),
    ("gw-a", "default@v2", "publish", "rejected", T0 + timedelta(hours=3, minutes=1)),
    ("gw-a", "default@v3", "promote", "promoted", T0 + timedelta(hours=4, minutes=1)),
    ("gw-b", "default@v3", "promote", "failed", T0 + timedelta(hours=4, minutes=2)),
]


def _add_versions(con: Any) -> None:
    con.execute("INSERT INTO adapter_versions VALUES ('base', NULL, NULL, NULL, 'base', ?, NULL)", [T0])
    for version, status, created, man in VERSIONS:
        con.execute("INSERT INTO adapter_versions VALUES (?, 'default', ?, ?, ?, ?, ?)",
                    [version, man["parent"], f"/adapters/{version}", status, created, json.dumps(man)])
    con.execute("INSERT INTO aliases VALUES ('default', 'default@v3', 'default@v1', ?)",
                [T0 + timedelta(hours=4)])


def _add_replica_reports(con: Any) -> None:
    for replica, version, action, status, at in REPLICA_REPORTS:
        con.execute("INSERT INTO replica_versions (id, replica, alias, version, action, status, "
                    "detail, created_at) VALUES (?, ?, 'default', ?, ?, ?, ?, ?)",
                    [new_id("rv"), replica, version, action, status,
                     "engine refused <adapter>" if status == "failed" else None, at])


def _drop_replica_table(con: Any) -> None:
    con.execute("DROP TABLE IF EXISTS replica_versions")


@pytest.fixture()
def populated(tmp_path: Path) -> Path:
    """A store with five hours of traffic: 6 completions, 4 explicit feedback rows of three
    types, 2 follow-ups, three trained versions and the replica reports."""
    path = tmp_path / "data" / "feedback.duckdb"
    writer = StoreWriter(path).open()
    try:
        futures = [writer.submit(completion(f"c{i}", T0 + timedelta(hours=i), text=f"Answer {i}."))
                   for i in range(6)]
        futures += [
            writer.submit(FeedbackEvent(new_id("fb"), "c0", T0 + timedelta(minutes=5), "rating", score=1.0)),
            writer.submit(FeedbackEvent(new_id("fb"), "c0", T0 + timedelta(minutes=6), "correction",
                                        text="It is <b>Paris</b> & not Lyon")),
            writer.submit(FeedbackEvent(new_id("fb"), "c2", T0 + timedelta(hours=2, minutes=1), "rating",
                                        score=-1.0)),
            writer.submit(FeedbackEvent(new_id("fb"), "c5", T0 + timedelta(hours=5, minutes=1), "critique",
                                        text="too short")),
        ]
        for i in (1, 4):
            answered = [*QUESTION, {"role": "assistant", "content": f"Answer {i}."}]
            futures.append(writer.submit(FollowupEvent(
                new_id("fu"), T0 + timedelta(hours=i, minutes=3), context_hash(answered),
                reply_hash(f"Answer {i}."), "Are you sure?", f"c{i + 1}")))
        for fut in futures:
            fut.result(10)
        writer.call(_add_versions).result(10)
        writer.call(_add_replica_reports).result(10)
    finally:
        writer.close()
    return path


def file_query(path: Path) -> Any:
    """What `store_query` does without a server: query the file read-only, then round-trip the
    rows through JSON, so values arrive as the admin API would hand them over."""
    def query(sql: str, params: list[Any]) -> QueryResult:
        result = query_file(path, sql, 100_000, 30.0, params)
        result.rows = [tuple(r) for r in json.loads(json.dumps(result.rows, default=str))]
        return result

    return query


def admin_like_query(path: Path) -> Any:
    """The admin API path as a client sees it, worst case: JSON columns as text."""
    inner = file_query(path)

    def query(sql: str, params: list[Any]) -> QueryResult:
        result = inner(sql, params)
        result.rows = [tuple(json.dumps(v) if isinstance(v, dict) else v for v in row) for row in result.rows]
        return result

    return query


def test_report_is_well_formed_html_with_every_plot(populated: Path) -> None:
    page = render_report(file_query(populated), source=str(populated))
    parser = parse(page)
    assert [s["data-plot"] for s in parser.svgs] == [
        "volume", "loss", "divergence", "retention", "drift", "aliases", "replicas"]
    assert page.count("<svg") == 7


def test_volume_plot_has_one_bucket_per_hour_and_all_signal_types(populated: Path) -> None:
    page = render_report(file_query(populated))
    svg = plot(page, "volume")
    # Traffic spans 09:00 to 14:xx, under two days: hourly buckets, empty hours included.
    assert re.findall(r'data-bucket="([^"]+)"', svg) == [f"03-01 {h:02d}:00" for h in range(9, 15)]
    bars = re.findall(r'<rect class="bar" data-series="([^"]+)"', svg)
    assert sorted(bars) == sorted(["rating", "correction", "rating", "critique", "follow-up", "follow-up"])
    assert svg.count('<circle class="point" data-series="completions"') == 6
    assert "completions" in svg and "follow-up" in svg


def test_version_metric_plots_have_one_point_per_version_coloured_by_status(populated: Path) -> None:
    page = render_report(file_query(populated))
    names = [v[0] for v in VERSIONS]
    for plot_id, series in (("loss", ("loss first", "loss last")), ("divergence", ("before", "after")),
                            ("retention", ("base model", "candidate")), ("drift", ("drift",))):
        svg = plot(page, plot_id)
        for name in series:
            points = re.findall(rf'<circle class="point" data-series="{name}" data-category="([^"]+)"', svg)
            assert points == names, (plot_id, name)
        assert svg.count('<polyline class="series"') == len(series)
        for name in names:
            assert f">{name}</text>" in svg  # the x labels name the versions
    loss = plot(page, "loss")
    assert 'fill="#2e7d32"' in loss and 'fill="#c62828"' in loss and 'fill="#9e9e9e"' in loss
    assert ">promoted</text>" in loss and ">rejected</text>" in loss and ">retired</text>" in loss


def test_alias_timeline_steps_through_promoted_versions_and_marks_each_version(populated: Path) -> None:
    svg = plot(render_report(file_query(populated)), "aliases")
    assert svg.count('<polyline class="series" data-series="alias default"') == 1
    points = re.search(r'data-series="alias default"[^>]*points="([^"]+)"', svg).group(1).split()
    levels = {float(y) for _, y in (p.split(",") for p in points)}
    assert len(levels) == 3  # base -> v1 -> v3; the rejected v2 was never served
    markers = re.findall(r'<circle class="marker" data-level="([^"]+)"', svg)
    assert markers == ["base", "default@v1", "default@v2", "default@v3"]


def test_replica_plot_draws_a_line_per_replica_and_a_dot_per_report(populated: Path) -> None:
    svg = plot(render_report(file_query(populated)), "replicas")
    assert re.findall(r'<polyline class="series" data-series="([^"]+)"', svg) == [
        "replica gw-a", "replica gw-b"]
    assert len(re.findall(r'<circle class="marker"', svg)) == len(REPLICA_REPORTS)
    assert "engine refused &lt;adapter&gt;" in svg and "<adapter>" not in svg


def test_summary_table_lists_versions_with_gate_results(populated: Path) -> None:
    page = render_report(file_query(populated))
    rows = re.findall(r'<tr data-version="([^"]+)">(.*?)</tr>', page, re.S)
    assert [v for v, _ in rows] == ["base", "default@v1", "default@v2", "default@v3"]
    v2 = dict(rows)["default@v2"]
    assert "rejected" in v2 and "failed" in v2 and "0.5 → 0.6" in v2 and "80 → 70" in v2
    assert "held-out divergence did not drop (0.5000 -&gt; 0.6000)" in v2
    v3 = dict(rows)["default@v3"]
    assert "passed" in v3 and "1.5 → 0.7" in v3 and ">25<" in v3
    assert re.search(r'data-count="completions"><div class="n">6<', page)
    assert re.search(r'data-count="feedback"><div class="n">4<', page)
    assert re.search(r'data-count="follow-ups"><div class="n">2<', page)


def test_report_reads_json_columns_that_arrive_as_text(populated: Path) -> None:
    page = render_report(admin_like_query(populated))
    parse(page)
    assert plot(page, "loss").count('data-series="loss last" data-category=') == len(VERSIONS)


def test_store_without_replica_table_renders_without_replica_plot(populated: Path) -> None:
    writer = StoreWriter(populated).open()
    try:
        writer.call(_drop_replica_table).result(10)
    finally:
        writer.close()
    page = render_report(file_query(populated))
    assert [s["data-plot"] for s in parse(page).svgs] == [
        "volume", "loss", "divergence", "retention", "drift", "aliases"]


def test_empty_store_renders_a_no_data_page(tmp_path: Path) -> None:
    path = tmp_path / "empty.duckdb"
    StoreWriter(path).open().close()
    page = render_report(file_query(path))
    parser = parse(page)
    assert parser.svgs == []
    assert "There is no data yet" in page


def test_cli_report_writes_the_page_from_the_store_file(populated: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    for name in [n for n in os.environ if n.startswith("SDLOOP_")]:
        monkeypatch.delenv(name)
    out = tmp_path / "out" / "report.html"
    assert main(["report", "--data-dir", str(populated.parent), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    page = out.read_text(encoding="utf-8")
    assert len(parse(page).svgs) == 7 and str(populated) in page


def test_cli_report_defaults_to_report_html_in_the_data_dir(populated: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("SDLOOP_")]:
        monkeypatch.delenv(name)
    assert main(["report", "--data-dir", str(populated.parent)]) == 0
    assert (populated.parent / "report.html").is_file()


def test_bucket_unit_follows_the_span_of_the_data() -> None:
    assert choose_unit(timedelta(hours=30)) == "hour"
    assert choose_unit(timedelta(days=30)) == "day"
    assert choose_unit(timedelta(days=400)) == "week"


def test_ticks_are_round_and_cover_the_range() -> None:
    assert nice_ticks(0.0, 9.0) == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    ticks = nice_ticks(0.31, 0.93)
    assert ticks[0] <= 0.31 and ticks[-1] >= 0.93 and len(ticks) <= 7
    assert nice_ticks(5.0, 5.0)[0] < 5.0 < nice_ticks(5.0, 5.0)[-1]
    assert nice_ticks(0.0, 1.0, integer=True) == [0.0, 1.0]
    assert all(t == int(t) for t in nice_ticks(0.0, 13.0, integer=True))
