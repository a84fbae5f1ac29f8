"""The `sdloop` command line."""

from __future__ import annotations

import argparse
import csv
import gc
import json
import logging
import sys
from pathlib import Path
from typing import Any

import duckdb
from kafka.errors import KafkaError

from serving.client import ClientError, admin_call, server_state, store_query
from serving.config import Config, ConfigError, load_config
from serving.model_cache import ModelError, ensure_embedded_model
from serving.registry import list_versions
from serving.state import AlreadyServing
from store import QueryError


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML config file (keys: see README)")
    parser.add_argument("--data-dir", help="store, adapters, model cache, state (./sdloop-data)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdloop", description="Serve an LLM that learns from its own deployment."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="engine + gateway + feedback store")
    _common(serve)
    serve.add_argument("--host", help="listen address (127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (8000)")
    serve.add_argument("--no-learner", action="store_true",
                       help="do not start the learner daemon (`sdloop learn`) beside the server")

    ingest = sub.add_parser("ingest", help="Kafka events topic -> feedback store (at scale)")
    _common(ingest)
    ingest.add_argument("--host", help="admin API and metrics address (ingest.host, 127.0.0.1)")
    ingest.add_argument("--port", type=int, help="admin API and metrics port (ingest.port, 8002)")

    learn = sub.add_parser("learn", help="the learner daemon: feedback -> LoRA versions")
    _common(learn)
    learn.add_argument("--once", action="store_true",
                       help="run one round, print its JSON summary, exit 0 even if rejected")
    learn.add_argument("--max-steps", type=int, default=None, help="cap the training steps")

    sql = sub.add_parser("sql", help="read-only SQL on the feedback store (works while serving)")
    _common(sql)
    sql.add_argument("query", help='e.g. "SELECT type, count(*) FROM feedback GROUP BY 1"')
    sql.add_argument("--format", choices=["table", "json", "csv"], default="table")
    sql.add_argument("--max-rows", type=int, default=None)

    adapters = sub.add_parser("adapters", help="model versions and the aliases that point at them")
    adapters_sub = adapters.add_subparsers(dest="action", required=True)
    listing = adapters_sub.add_parser("list", help="aliases and versions")
    _common(listing)
    publish = adapters_sub.add_parser("publish", help="load, probe and promote a version folder")
    _common(publish)
    publish.add_argument("path", help="the version folder (with manifest.json)")
    publish.add_argument("--no-promote", action="store_true", help="load and probe only")
    promote = adapters_sub.add_parser("promote", help="point a version's alias at it")
    _common(promote)
    promote.add_argument("version")
    rollback = adapters_sub.add_parser("rollback", help="flip an alias back to its previous version")
    _common(rollback)
    rollback.add_argument("--alias", default="default")

    setup = sub.add_parser("setup", help="convert the embedded model once (make does this)")
    _common(setup)

    report = sub.add_parser("report", help="the learner's progress as one HTML page with plots")
    _common(report)
    report.add_argument("--out", help="the HTML file to write (<data-dir>/report.html)")
    return parser


def _load(args: argparse.Namespace) -> Config:
    overrides: dict[str, object] = {
        "data_dir": args.data_dir,
        "log_level": getattr(args, "log_level", None),
    }
    listener = "ingest" if args.command == "ingest" else "server"
    overrides[f"{listener}.host"] = getattr(args, "host", None)
    overrides[f"{listener}.port"] = getattr(args, "port", None)
    return load_config(args.config, overrides=overrides)


# Collect young objects every 50,000 allocations instead of 700: serving and ingesting allocate
# a few dozen short-lived containers per event, and at the default every full pass also walks
# the queued events; measured +15-20 % events/s through the ingester (ops/bench/ingest.py).
GC_GEN0_THRESHOLD = 50_000


def tune_gc() -> None:
    """For the long-running event paths, once start-up is done: what is alive now (modules,
    config) is never collected again, and young objects are collected far less often."""
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = _load(args)
        logging.basicConfig(
            level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        # kafka-python narrates every connection at INFO; its warnings and errors still show.
        logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLogger().level))
        if args.command == "serve":
            from serving.server import run_server

            tune_gc()
            return run_server(cfg, args.config, learner=not args.no_learner)
        if args.command == "ingest":
            from serving.ingest_service import run_ingest

            tune_gc()
            return run_ingest(cfg)
        if args.command == "learn":
            from learner.daemon import run_daemon, run_once

            if args.once:
                print(json.dumps(run_once(cfg, args.max_steps), default=str))
                return 0
            return run_daemon(cfg, args.config, args.max_steps)
        if args.command == "sql":
            return _sql(cfg, args.query, args.format, args.max_rows)
        if args.command == "adapters":
            return _adapters(cfg, args)
        if args.command == "setup":
            print(ensure_embedded_model(cfg.model_cache_path))
            return 0
        if args.command == "report":
            from store.report import render_report

            out = Path(args.out) if args.out else cfg.data_path / "report.html"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(render_report(lambda sql, params: store_query(cfg, sql, params),
                                         source=str(cfg.store_path)), encoding="utf-8")
            print(out)
            return 0
    except (ConfigError, ClientError, AlreadyServing, QueryError, ModelError) as exc:
        print(f"sdloop: {exc}", file=sys.stderr)
        return 2
    except KafkaError as exc:  # at start: no broker to create topics or fetch metadata from
        print(f"sdloop: the Kafka broker at {cfg.kafka.bootstrap_servers} cannot be reached "
              f"({exc}); check kafka.bootstrap_servers and that the broker runs", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2


# -- reading the store ------------------------------------------------------------------------


def _sql(cfg: Config, query: str, fmt: str, max_rows: int | None) -> int:
    limit = max_rows if max_rows is not None else cfg.server.sql_max_rows
    result = store_query(cfg, query, max_rows=limit)
    _print_rows(result.columns, result.rows, fmt)
    if result.truncated:
        print(f"(stopped after {limit} rows; use --max-rows)", file=sys.stderr)
    return 0


def _adapters(cfg: Config, args: argparse.Namespace) -> int:
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
    _print_rows(["alias", "version", "previous"],
                [[a["alias"], a["version"], a["previous"]] for a in listing["aliases"]], "table")
    print("\nversions:")
    _print_rows(["version", "status", "parent", "created_at"],
                [[v["version"], v["status"], v["parent"], str(v["created_at"])]
                 for v in listing["versions"]], "table")
    return 0


def _print_rows(columns: list[str], rows: list[Any], fmt: str) -> None:
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


if __name__ == "__main__":
    sys.exit(main())

