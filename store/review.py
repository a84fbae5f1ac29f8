"""Review mode (`learner.review`): signals wait for a person before they may teach.

The queue is a view (`review_queue`: signals that may teach, with text, and no decision yet);
a decision is a row in `signal_reviews`, so what was approved, by whom and when stays in SQL.
"""

from __future__ import annotations

from typing import Any

import duckdb

DECISIONS = ("approved", "rejected")


class ReviewRefused(ValueError):
    """A decision on signals that do not exist."""


def pending(con: duckdb.DuckDBPyConnection, limit: int) -> list[dict[str, Any]]:
    cur = con.execute("SELECT id, origin, type, text, principal, created_at, completion_id, "
                      "response_text FROM review_queue LIMIT ?", [limit])
    columns = [d[0] for d in cur.description]
    return [dict(zip(columns, row, strict=True)) for row in cur.fetchall()]


def decide(con: duckdb.DuckDBPyConnection, ids: list[str], decision: str,
           reviewer: str) -> dict[str, Any]:
    """Record `decision` on every signal in `ids` (a later decision replaces an earlier one)."""
    if decision not in DECISIONS:
        raise ReviewRefused(f"decision must be one of {', '.join(DECISIONS)}")
    known = {r[0] for r in con.execute(
        "SELECT id FROM signals WHERE id IN (SELECT unnest(?::VARCHAR[]))", [ids]).fetchall()}
    missing = [i for i in ids if i not in known]
    if missing:
        raise ReviewRefused(f"no signal with id {', '.join(missing[:5])}"
                            f"{' …' if len(missing) > 5 else ''}; nothing was recorded")
    con.execute("INSERT OR REPLACE INTO signal_reviews "
                "SELECT unnest(?::VARCHAR[]), ?, ?, now()::TIMESTAMP", [ids, decision, reviewer])
    return {"decision": decision, "ids": ids}
