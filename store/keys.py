"""API keys: who may chat, who may teach, who may administer (the `api_keys` table).

A key is a random secret shown once when it is made; the store keeps its sha256 only (a key
is 256 random bits, so a fast hash is as good as a slow one and costs nothing per request).
The key's name is its principal: recorded on every completion, follow-up and feedback it
sends, and what the learner's teaching policy counts by.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Any

import duckdb

SCOPES = ("chat", "feedback", "admin")
KEY_PREFIX = "sdl-"
# Names appear in SQL results, logs and review listings: keep them plain.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
# The principal of every request on a server that has no keys (loopback, single user).
LOCAL_PRINCIPAL = "local"


class KeyRefused(ValueError):
    """A key operation that cannot be done as asked (bad name or scope, name taken)."""


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_scopes(scopes: list[str]) -> list[str]:
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise KeyRefused(f"scopes must be one or more of {', '.join(SCOPES)}"
                        + (f", not {', '.join(unknown)}" if unknown else ""))
    return [s for s in SCOPES if s in scopes]


def add_key(con: duckdb.DuckDBPyConnection, name: str, scopes: list[str]) -> dict[str, Any]:
    """Make a key for a new principal; the answer holds the key, which is not kept."""
    if not _NAME.match(name) or name == LOCAL_PRINCIPAL:
        raise KeyRefused(f"a key name is 1-64 letters, digits and _.@- (not {name!r}; "
                        f"'{LOCAL_PRINCIPAL}' is the keyless principal)")
    scopes = check_scopes(scopes)
    if con.execute("SELECT 1 FROM api_keys WHERE name = ?", [name]).fetchone():
        raise KeyRefused(f"a key named {name!r} exists (revoked keys keep their name, so "
                        "that what a principal sent stays attributable); choose another name")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    con.execute("INSERT INTO api_keys VALUES (?, ?, ?, now()::TIMESTAMP, NULL)",
                [name, key_digest(key), scopes])
    return {"name": name, "scopes": scopes, "key": key}


def revoke_key(con: duckdb.DuckDBPyConnection, name: str) -> dict[str, Any]:
    row = con.execute("UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()::TIMESTAMP) "
                      "WHERE name = ? RETURNING name, revoked_at", [name]).fetchone()
    if row is None:
        raise KeyRefused(f"no key named {name!r}")
    return {"name": row[0], "revoked_at": row[1]}


def list_keys(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    rows = con.execute("SELECT name, scopes, created_at, revoked_at FROM api_keys "
                       "ORDER BY created_at, name").fetchall()
    return [{"name": n, "scopes": s, "created_at": c, "revoked_at": r} for n, s, c, r in rows]


def active_keys(con: duckdb.DuckDBPyConnection) -> dict[str, tuple[str, frozenset[str]]]:
    """key digest -> (principal, scopes), for the keys not revoked."""
    rows = con.execute("SELECT key_hash, name, scopes FROM api_keys "
                       "WHERE revoked_at IS NULL").fetchall()
    return {digest: (name, frozenset(scopes)) for digest, name, scopes in rows}
