"""Serving's subcommands of `sdloop` (`serve`, `ingest`, `sql`, `adapters`, `keys`, `review`,
`setup`), registered under the `sdloop.commands` entry points and run by the command host
(`serving.commands`)."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serving.client import ClientError, admin_call, server_state, store_change, store_query
from serving.commands import Command, CommandError, commands, private_data, tune_gc
from serving.config import Config
from serving.model_cache import ModelError, ensure_embedded_model
from serving.state import AlreadyServing
from store import QueryError, keys, review
from store.versions import list_versions


def _kafka_unreachable(cfg: Config, exc: Exception) -> CommandError:
    return CommandError(f"the Kafka broker at {cfg.kafka.bootstrap_servers} cannot be reached "
                        f"({exc}); check kafka.bootstrap_servers and that the broker runs")


def _listener(parser: argparse.ArgumentParser, what: str, default: str) -> None:
    parser.add_argument("--host", help=f"{what} address ({default.split(':')[0]})")
    parser.add_argument("--port", type=int, help=f"{what} port ({default.split(':')[1]})")


def _serve_arguments(parser: argparse.ArgumentParser, common: Callable[..., None]) -> None:
    common(parser)
    _listener(parser, "listen", "127.0.0.1:8000")
    parser.add_argument("--no-learner", action="store_true",
                        help="do not start the learner daemon (`sdloop learn`) beside the server")


def _serve(cfg: Config, args: argparse.Namespace) -> int:
    from kafka.errors import KafkaError

    from serving.entrypoints.serve import run_server

    private_data(cfg)
    learner = not args.no_learner
    if learner and "learn" not in commands():
        logging.getLogger("sdloop.serve").warning(
            "no `sdloop learn` command is installed: serving without a learner")
        learner = False
    tune_gc()
    try:
        return run_server(cfg, args.config, learner=learner)
    except KafkaError as exc:  # at start: no broker to create topics or fetch metadata from
        raise _kafka_unreachable(cfg, exc) from None


def _ingest_arguments(parser: argparse.ArgumentParser, common: Callable[..., None]) -> None:
    common(parser)
    _listener(parser, "admin API and metrics", "127.0.0.1:8002")


def _ingest(cfg: Config, args: argparse.Namespace) -> int:
    from kafka.errors import KafkaError

    from serving.entrypoints.ingest import run_ingest

    private_data(cfg)
    tune_gc()
    try:
        return run_ingest(cfg)
    except KafkaError as exc:
        raise _kafka_unreachable(cfg, exc) from None


def _sql_arguments(parser: argparse.ArgumentParser, common: Callable[..., None]) -> None:
    common(parser)
    parser.add_argument("query", help='e.g. "SELECT type, count(*) FROM feedback GROUP BY 1"')
    parser.add_argument("--format", choices=["table", "json", "csv"], default="table")
    parser.add_argument("--max-rows", type=int, default=None)


def _sql(cfg: Config, args: argparse.Namespace) -> int:
    limit = args.max_rows if args.max_rows is not None else cfg.server.sql_max_rows
    result = store_query(cfg, args.query, max_rows=limit)
    print_rows(result.columns, result.rows, args.format)
    if result.truncated:
        print(f"(stopped after {limit} rows; use --max-rows)", file=sys.stderr)
    return 0


def _adapters_arguments(parser: argparse.ArgumentParser, common: Callable[..., None]) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    common(actions.add_parser("list", help="aliases and versions"))
    publish = actions.add_parser("publish", help="load, probe and promote a version folder")
    common(publish)
    publish.add_argument("path", help="the version folder (with manifest.json)")
    publish.add_argument("--no-promote", action="store_true", help="load and probe only")
    promote = actions.add_parser("promote", help="point a version's alias at it")
    common(promote)
    promote.add_argument("version")
    rollback = actions.add_parser("rollback", help="flip an alias back to its previous version")
    common(rollback)
    rollback.add_argument("--alias", default="default")


def _adapters(cfg: Config, args: argparse.Namespace) -> int:
    import duckdb

    if args.action != "list":
        state = server_state(cfg)
        if state is None:
            raise ClientError(f"`adapters {args.action}` needs the running server of "
                              f"{cfg.data_path} (start `sdloop serve`)")
        body = {"publish": lambda: {"path": str(Path(args.path).resolve()),
                                    "promote": not args.no_promote},
                "promote": lambda: {"version": args.version},
                "rollback": lambda: {"alias": args.alias}}[args.action]()
        print(json.dumps(admin_call(state, "POST", f"/admin/adapters/{args.action}", body)))
        return 0
    state = server_state(cfg)
    if state is not None:
        listing = admin_call(state, "GET", "/admin/adapters")
    else:
        if not cfg.store_path.exists():
            raise ClientError(f"no feedback store at {cfg.store_path}")
        con = duckdb.connect(str(cfg.store_path), read_only=True)
        try:
            listing = list_versions(con)
        finally:
            con.close()
    print("aliases:")
    print_rows(["alias", "version", "previous"],
               [[a["alias"], a["version"], a["previous"]] for a in listing["aliases"]], "table")
    print("\nversions:")
    print_rows(["version", "status", "parent", "created_at"],
               [[v["version"], v["status"], v["parent"], str(v["created_at"])]
                for v in listing["versions"]], "table")
    if listing.get("merged"):
        merged = listing["merged"]
        print(f"\nmerged serving of alias '{merged['alias']}': {merged['state']}"
              f"{' ' + merged['version'] if merged['version'] else ''}"
              f"{' (' + merged['error'] + ')' if merged['error'] else ''}")
    return 0


def _keys_arguments(parser: argparse.ArgumentParser, common: Callable[..., None]) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="a key for a new principal (printed once)")
    common(add)
    add.add_argument("name", help="the principal: recorded on everything the key sends")
    add.add_argument("--scopes", default="chat",
                     help="comma-separated: chat, feedback (may teach the model), admin "
                          "(default: chat)")
    common(actions.add_parser("list", help="keys, their scopes, and which are revoked"))
    revoke = actions.add_parser("revoke", help="revoke a key: its signals stop teaching")
    common(revoke)
    revoke.add_argument("name")


def _keys(cfg: Config, args: argparse.Namespace) -> int:
    if args.action == "add":
        scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
        made = store_change(cfg, "POST", "/admin/keys", {"name": args.name, "scopes": scopes},
                            lambda con: keys.add_key(con, args.name, scopes))
        print(made["key"])
        print(f"key for '{made['name']}' ({', '.join(made['scopes'])}); it is shown only now",
              file=sys.stderr)
    elif args.action == "revoke":
        print(json.dumps(store_change(cfg, "POST", "/admin/keys/revoke", {"name": args.name},
                                      lambda con: keys.revoke_key(con, args.name))))
    else:
        listed = store_change(cfg, "GET", "/admin/keys", None, keys.list_keys)
        print_rows(["name", "scopes", "created_at", "revoked_at"],
                   [[k["name"], ",".join(k["scopes"]), k["created_at"], k["revoked_at"]]
                    for k in listed], "table")
    return 0


def _review_arguments(parser: argparse.ArgumentParser, common: Callable[..., None]) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="signals waiting for a decision")
    common(listing)
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--format", choices=["table", "json", "csv"], default="table")
    for action, what in (("approve", "may teach"), ("reject", "never teaches")):
        sub = actions.add_parser(action, help=f"the signals {what}")
        common(sub)
        sub.add_argument("ids", nargs="+", help="signal ids (from `review list`)")


def _review(cfg: Config, args: argparse.Namespace) -> int:
    if args.action == "list":
        rows = store_change(cfg, "GET", f"/admin/review?limit={args.limit}", None,
                            lambda con: review.pending(con, args.limit))
        columns = ["id", "origin", "type", "principal", "created_at", "text", "response_text"]
        print_rows(columns, [[r[c] for c in columns] for r in rows], args.format)
        return 0
    decision = {"approve": "approved", "reject": "rejected"}[args.action]
    print(json.dumps(store_change(cfg, "POST", f"/admin/review/{args.action}", {"ids": args.ids},
                                  lambda con: review.decide(con, args.ids, decision, "cli"))))
    return 0


def _setup(cfg: Config, args: argparse.Namespace) -> int:
    print(ensure_embedded_model(cfg.model_cache_path))
    return 0


def print_rows(columns: list[str], rows: list[Any], fmt: str) -> None:
    """Rows as a table, JSON lines or CSV on stdout."""
    out = sys.stdout
    if fmt == "json":
        for row in rows:
            out.write(json.dumps(dict(zip(columns, row, strict=True)), default=str) + "\n")
        return
    if fmt == "csv":
        writer = csv.writer(out)
        writer.writerow(columns)
        writer.writerows(rows)
        return
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    widths = [min(w, 60) for w in widths]
    line = "  ".join(c.ljust(w)[:w] for c, w in zip(columns, widths, strict=True))
    out.write(line.rstrip() + "\n" + "  ".join("-" * w for w in widths) + "\n")
    for r in cells:
        out.write("  ".join(v.ljust(w)[:w] for v, w in zip(r, widths, strict=True)).rstrip() + "\n")
    out.write(f"({len(rows)} row{'s' if len(rows) != 1 else ''})\n")


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, str):
        return value.replace("\n", "\\n")
    return json.dumps(value, default=str)


# What serving's commands report in one line: the store or server cannot be reached or refused,
# another server holds the data dir, a query is refused, the model is missing.
_USER_ERRORS = (ClientError, AlreadyServing, QueryError, ModelError, keys.KeyRefused,
                review.ReviewRefused)

SERVE = Command("engine + gateway + feedback store (+ the learner daemon)", _serve,
                _serve_arguments, lambda a: {"server.host": a.host, "server.port": a.port},
                _USER_ERRORS)
INGEST = Command("Kafka events topic -> feedback store (at scale)", _ingest, _ingest_arguments,
                 lambda a: {"ingest.host": a.host, "ingest.port": a.port}, _USER_ERRORS)
SQL = Command("read-only SQL on the feedback store (works while serving)", _sql, _sql_arguments,
              user_errors=_USER_ERRORS)
ADAPTERS = Command("model versions and the aliases that point at them", _adapters,
                   _adapters_arguments, user_errors=_USER_ERRORS)
KEYS = Command("API keys: who may chat, teach (feedback scope) and administer", _keys,
               _keys_arguments, user_errors=_USER_ERRORS)
REVIEW = Command("review mode: approve or reject signals before they may teach", _review,
                 _review_arguments, user_errors=_USER_ERRORS)
SETUP = Command("convert the embedded model once (make does this)", _setup,
                user_errors=_USER_ERRORS)

