"""The admin API's SQL against the real server: whatever a statement parses as, it cannot
write, read host files, reach the network or load extensions — a clear 400 each time, and the
store unchanged."""

from __future__ import annotations

import json

import pytest

from tests.harness.server import Server


def _sql(server: Server, sql: str) -> tuple[int, dict]:
    status, _, body = server.request("POST", "/admin/sql", {"sql": sql}, headers={
        "authorization": f"Bearer {server.state()['admin_token']}"})
    return status, json.loads(body)


@pytest.mark.parametrize("sql, says", [
    ("WITH u AS (UPDATE aliases SET version = 'x' RETURNING *) SELECT * FROM u", "UPDATE"),
    ("SELECT (WITH d AS (DELETE FROM completions RETURNING id) SELECT count(*) FROM d)",
     "DELETE"),
    ("SELECT * FROM read_text('/etc/passwd')", "file system operations are disabled"),
    ("SELECT * FROM read_csv('/etc/passwd')", "file system operations are disabled"),
    ("SELECT * FROM read_text('**/state.json')", "file system operations are disabled"),
    ("SELECT * FROM glob('/*')", "file system operations are disabled"),
    ("SELECT * FROM checkpoint()", "checkpoint"),
    ("INSTALL httpfs", "LOAD"),
    ("LOAD httpfs", "LOAD"),
    ("SELECT * FROM read_parquet('https://example.com/x.parquet')", "disabled"),
    ("SET enable_external_access = true", "SET"),
])
def test_sql_escapes_are_refused_with_a_clear_400_and_change_nothing(server: Server, sql, says):
    aliases = server.admin_sql("SELECT * FROM aliases ORDER BY alias")
    completions = server.admin_sql("SELECT count(*) AS n FROM completions")[0]["n"]
    status, body = _sql(server, sql)
    assert status == 400, body
    assert body["error"]["code"] == "invalid_sql" and says in body["error"]["message"]
    assert server.admin_sql("SELECT * FROM aliases ORDER BY alias") == aliases
    assert server.admin_sql("SELECT count(*) AS n FROM completions")[0]["n"] >= completions


def test_an_answer_is_cut_at_the_byte_cap_and_says_so(server: Server):
    # 80 MB of rows, under the row limit: cut by bytes (server.sql_max_bytes, 64 MiB).
    status, body = _sql(server, "SELECT repeat('x', 10000) AS x FROM range(8000)")
    assert status == 200 and body["truncated"]
    assert 0 < len(body["rows"]) < 8000
