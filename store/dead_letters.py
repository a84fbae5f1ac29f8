"""The `dead_letters` table: messages from the events topic that could not be stored as events.

One row per message (`<topic>:<partition>:<offset>`), so a redelivered poison message is kept
once. Feedback that names a completion not stored yet waits here as `unknown_completion` and
is stored, and its row deleted, when that completion arrives (`store.ingest`). Reason codes:
empty_value (a null or empty record), not_json, invalid_event, undecodable (decoding raised
something unforeseen), unknown_completion, invalid_tool_call (feedback whose call the answered
request's tools refuse), write_failed.
"""

from __future__ import annotations

from typing import Any

import duckdb

_INSERT = (
    'INSERT OR IGNORE INTO dead_letters (id, received_at, topic, "partition", "offset", key, '
    "payload, reason_code, reason, event_id, completion_id) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# Parked feedback whose completion is among those given (no other can be ready).
_PARKED_FOR = (
    "SELECT id, payload FROM dead_letters WHERE reason_code = 'unknown_completion' "
    "AND completion_id IN (SELECT unnest(?::VARCHAR[])) ORDER BY received_at"
)


def record(con: duckdb.DuckDBPyConnection, rows: list[list[Any]]) -> None:
    """Rows of (id, received_at, topic, partition, offset, key, payload, reason_code, reason,
    event_id, completion_id); a row whose id is there already is kept as it was."""
    con.executemany(_INSERT, rows)


def parked_for(con: duckdb.DuckDBPyConnection, completion_ids: list[str]) -> list[tuple[str, str]]:
    """(row id, payload) of the parked feedback naming any of these completions, oldest first."""
    return con.execute(_PARKED_FOR, [completion_ids]).fetchall() if completion_ids else []


def remove(con: duckdb.DuckDBPyConnection, ids: list[str]) -> None:
    con.execute("DELETE FROM dead_letters WHERE id IN (SELECT unnest(?::VARCHAR[]))", [ids])


def refuse(con: duckdb.DuckDBPyConnection, refused: list[tuple[str, str]]) -> None:
    """Parked feedback that its completion, now stored, refuses: (row id, why) — kept, as
    `invalid_tool_call`, no longer waiting."""
    con.executemany("UPDATE dead_letters SET reason_code = 'invalid_tool_call', reason = ? "
                    "WHERE id = ?", [[why, row_id] for row_id, why in refused])
