"""The learner's subcommands, `sdloop learn` and `sdloop report` (registered under the
`sdloop.commands` entry points), and the wiring of a round to the running server.

Every `sdloop` command loads this module to build its parser: torch and the trainer are
imported only when a round runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving.client import ClientError, admin_call, server_state, store_query
from serving.commands import Command, private_data
from serving.config import Config
from serving.model_cache import ModelError, ensure_embedded_model
from store import QueryError

if TYPE_CHECKING:
    from learner.responses import EnginePolicy
    from learner.round import RoundIO

log = logging.getLogger(__name__)

# Where the learner keeps its progress mark, a round's plan and its checkpoints.
WORKSPACE = "learner"


def round_io(cfg: Config, progress: bool = True) -> RoundIO:
    """A round's reads, publishing and on-policy sampling, through the server that holds the
    data dir (its admin API and its engine), or the store file when none runs."""
    from learner.responses import EnginePolicy
    from learner.round import RoundIO

    def publish(folder: Path, promote: bool) -> str:
        server = server_state(cfg)
        if server is None:
            return "written"  # no server to publish to: `sdloop adapters publish` later
        return admin_call(server, "POST", "/admin/adapters/publish",
                          {"path": str(folder), "promote": promote})["status"]

    def policy(served: str) -> EnginePolicy | None:
        server = server_state(cfg)
        if server is None or not server.get("engine_url"):
            return None
        try:
            return EnginePolicy.of(server["engine_url"], served, server.get("engine_api_key", ""))
        except (OSError, ValueError, KeyError, StopIteration) as exc:
            log.warning("samples from the trainer's model: the engine did not answer (%s)",
                        exc)
            return None

    return RoundIO(
        query=lambda sql, params: store_query(cfg, sql, params),
        publish=publish,
        policy=policy,
        base_model=lambda: cfg.engine.model or str(ensure_embedded_model(cfg.model_cache_path,
                                                                          progress)),
    )


def run_once(cfg: Config, max_steps: int | None = None) -> dict[str, Any]:
    """One round on this data dir; `skipped` when another round holds its workspace."""
    import torch

    from learner.checkpoint import RoundBusy
    from learner.round import run_round

    cores = round_cores(cfg.learner.threads, sorted(os.sched_getaffinity(0)))
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))
    log.info("round on cores %s", cores)
    try:
        summary = run_round(cfg.learner, round_io(cfg), cfg.data_path / WORKSPACE,
                            cfg.adapters_path, max_steps=max_steps,
                            model_cache=cfg.model_cache_path)
    except RoundBusy as exc:  # the daemon's round (or another --once) holds the workspace
        summary = {"preset": cfg.learner.preset, "status": "skipped", "reason": str(exc)}
    return {**summary, "threads": len(cores)}


def round_cores(threads: int, usable: list[int]) -> list[int]:
    """The cores a round computes on: all usable ones (`threads = 0`), or `threads` of them
    counted from the last — the cores a vLLM-CPU engine on the same machine binds last (its
    worker takes every usable core but the last). Two processes whose OpenMP threads share a
    core both stall at every barrier, so beside an engine under steady traffic a round is
    better kept off its cores; beside an idle one that costs it the cores it leaves unused (half
    its speed on the 2-core machine), which is why that is not the default."""
    return usable[-threads:] if threads > 0 else usable


def _learn_arguments(parser: argparse.ArgumentParser, common: Callable[..., None]) -> None:
    common(parser)
    parser.add_argument("--once", action="store_true",
                        help="run one round, print its JSON summary, exit 0 even if rejected")
    parser.add_argument("--max-steps", type=int, default=None, help="cap the training steps")


def _learn(cfg: Config, args: argparse.Namespace) -> int:
    private_data(cfg)
    if args.once:
        print(json.dumps(run_once(cfg, args.max_steps), default=str))
        return 0
    from learner.daemon import run_daemon

    return run_daemon(cfg, args.config, args.max_steps)


def _report_arguments(parser: argparse.ArgumentParser, common: Callable[..., None]) -> None:
    common(parser)
    parser.add_argument("--out", help="the HTML file to write (<data-dir>/report.html)")


def _report(cfg: Config, args: argparse.Namespace) -> int:
    from learner.report import render_report

    out = Path(args.out) if args.out else cfg.data_path / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_report(lambda sql, params: store_query(cfg, sql, params),
                                 source=str(cfg.store_path)), encoding="utf-8")
    print(out)
    return 0


def _export_arguments(parser: argparse.ArgumentParser, common: Callable[..., None]) -> None:
    from learner.export import FORMATS

    common(parser)
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="messages | sft | dpo | kto (TRL's conversational formats), "
                             "openai-dpo (OpenAI preference fine-tuning)")
    parser.add_argument("--since", help="only answers from this UTC time on (ISO, e.g. 2026-12-01)")
    parser.add_argument("--where", help="a condition on the completions table, e.g. "
                                        "\"metadata->>'agent' = 'weather-bot'\"")
    parser.add_argument("--out", help="the JSONL file to write (default: standard output)")
    redact = parser.add_mutually_exclusive_group()
    redact.add_argument("--redact", action="store_true", default=None,
                        help="replace e-mails, phone and card numbers (default: feedback.redact)")
    redact.add_argument("--no-redact", dest="redact", action="store_false")


def _export(cfg: Config, args: argparse.Namespace) -> int:
    from learner.export import count, export

    def query(sql: str, params: list[Any]) -> Any:
        return store_query(cfg, sql, params)

    total = count(query, args.since, args.where)
    redact = cfg.feedback.redact if args.redact is None else args.redact
    with contextlib.ExitStack() as stack:
        out = (stack.enter_context(open(args.out, "w", encoding="utf-8"))  # noqa: SIM115
               if args.out else sys.stdout)
        bar = stack.enter_context(_progress(total, f"export {args.format}"))
        written = export(query, out, args.format, cfg.learner.teaching(), since=args.since,
                         where=args.where, redact=redact, progress=bar)
    print(f"{written} {args.format} records from {total} answers"
          + (f" -> {args.out}" if args.out else ""), file=sys.stderr)
    return 0


@contextlib.contextmanager
def _progress(total: int, what: str) -> Iterator[Callable[[int], object]]:
    """A progress bar on standard error when it is a terminal (tqdm, which transformers
    brings); its value is called with the number of items done since the last call."""
    from tqdm import tqdm

    with tqdm(total=total, desc=what, unit=" answers", file=sys.stderr,
              disable=not sys.stderr.isatty()) as shown:
        yield shown.update


_USER_ERRORS = (ClientError, QueryError, ModelError)

LEARN = Command("the learner daemon: feedback -> LoRA versions", _learn, _learn_arguments,
                user_errors=_USER_ERRORS)
EXPORT = Command("the captured data as JSONL training sets (TRL and OpenAI formats)", _export,
                 _export_arguments, user_errors=_USER_ERRORS)
REPORT = Command("the learner's progress as one HTML page with plots", _report,
                 _report_arguments, user_errors=_USER_ERRORS)
