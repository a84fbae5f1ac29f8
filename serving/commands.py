"""The `sdloop` command host: one command whose subcommands each package registers.

Subcommands are `Command` objects registered under the `sdloop.commands` entry points
(pyproject.toml), the way pytest and Flask find their plugins' commands: `serve`, `ingest`,
`sql`, `adapters`, `keys`, `review` and `setup` are serving's (`serving.entrypoints.cli`),
`learn` and `report` the learner's (`learner.cli`). `main` only parses, loads the one config
(`serving.config`) and runs the command, so no package imports one above it to build the CLI.
"""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points

from serving.config import LOG_LEVELS, Config, ConfigError, load_config
from serving.state import keep_private

COMMANDS_GROUP = "sdloop.commands"


class CommandError(RuntimeError):
    """A user-facing failure: printed as `sdloop: <message>`, exit status 2."""


@dataclass(frozen=True)
class Command:
    help: str
    run: Callable[[Config, argparse.Namespace], int]
    # Adds the command's own arguments; the common ones (--config, --data-dir, --log-level)
    # go on the parser(s) it passes to `common`.
    arguments: Callable[[argparse.ArgumentParser, Callable[[argparse.ArgumentParser], None]], None] \
        = lambda parser, common: common(parser)
    # Config keys set by the command's flags (None: not given), e.g. {"server.port": args.port}.
    overrides: Callable[[argparse.Namespace], dict[str, object]] = lambda args: {}
    # Errors the command reports as a one-line message (exit 2) rather than a traceback.
    user_errors: tuple[type[BaseException], ...] = field(default=())


def commands() -> dict[str, Command]:
    """Every installed package's subcommands, by name."""
    return dict(_commands())


@functools.cache
def _commands() -> tuple[tuple[str, Command], ...]:
    return tuple(sorted((ep.name, ep.load()) for ep in entry_points(group=COMMANDS_GROUP)))


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML config file (keys: see docs/reference/configuration.md)")
    parser.add_argument("--data-dir", help="store, adapters, model cache, state (./sdloop-data)")
    parser.add_argument("--log-level", choices=LOG_LEVELS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdloop", description="Serve an LLM that learns from its own deployment."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in commands().items():
        command.arguments(sub.add_parser(name, help=command.help), _common)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = commands()[args.command]
    try:
        cfg = load_config(args.config, overrides={
            "data_dir": args.data_dir, "log_level": getattr(args, "log_level", None),
            **command.overrides(args)})
        logging.basicConfig(
            level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        # kafka-python narrates every connection at INFO; its warnings and errors still show.
        logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLogger().level))
        return command.run(cfg, args)
    except (ConfigError, CommandError, *command.user_errors) as exc:
        print(f"sdloop: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


# Collect young objects every 50,000 allocations instead of 700: serving and ingesting allocate
# a few dozen short-lived containers per event, and at the default every full pass also walks
# the queued events; measured +15-20 % events/s through the ingester (ops/bench/ingest.py).
GC_GEN0_THRESHOLD = 50_000


def tune_gc() -> None:
    """For the long-running event paths, once start-up is done: what is alive now (modules,
    config) is never collected again, and young objects are collected far less often."""
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])


def private_data(cfg: Config) -> None:
    """For the commands that write the data dir (`serve`, `ingest`, `learn`): it and what they
    write there — the store and its WAL above all: every conversation — readable by this user
    only (`serving.state.keep_private`)."""
    store = cfg.store_path
    keep_private(cfg.data_path, store, store.with_name(store.name + ".wal"))


if __name__ == "__main__":
    sys.exit(main())
