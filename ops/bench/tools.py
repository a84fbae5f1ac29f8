"""Tool-use learning benchmark: does an agent get its tool calls right the first time after the
learner has seen it fail — on task instances it never met — and does it still answer the rest?

The environment (`ops/bench/toolenv.py`) has three tools whose calls can be schema-valid yet
wrong: a weather lookup that knows cities as `city:new-york`, a file reader that wants absolute
paths under `/workspace`, a directory that knows people as `first.last`. An error states the
accepted form by example of another instance, plus "did you mean" when the call named a known
entity in another form. A run draws, with its seed, per tool `--train` instances the agent
meets while deployed and `--heldout` others it is evaluated on.

A run starts a fresh `sdloop serve` with a learner setup, and:
1. deployment: a JSON-mode agent loop (`ops/bench/agent.py`) works the training tasks through
   the gateway, up to `--calls` calls each, sending every tool result back as the next turn
   (the last call's too). In an errors-only arm (`sdloop`, `sft`) nothing else: no feedback
   call — what the learner gets is the failed results the gateway captured (`env_error`
   signals) and any later call that worked. In a demonstration arm (`+demo`: `sdloop+demo`,
   `sft+demo`) an operator then sends, through `POST /v1/feedback`, the working call for the
   first answer of `--demos` training tasks per tool whose first call failed: as a
   `demonstration` carrying `tool_calls`, every other one as a `correction` carrying them;
2. `--rounds` learner rounds (`sdloop learn --once`, again while a round says
   `retry_next_round`, as the daemon does), deployment again before each further round;
3. evaluation of the version `default` serves, asked on the engine directly (nothing logged,
   as in `ops/bench/learning.py`): every held-out task with the same loop, greedy — first-call
   success and calls spent —, the training tasks' first calls, and the general retention
   questions (`data/retention.json`).
Base figures are the same evaluation of the base model, once (greedy).

The headline is the shipped defaults with the gate enforced, taught by demonstrations
(`sdloop+demo`); the errors-only arm (`sdloop`) and the `sft` control on the same
demonstrations (`sft+demo`) run on the same seeds and instances. Figures per seed, then median
[min–max] over seeds.

    python ops/bench/tools.py                               # the three arms, 3 seeds
    python ops/bench/tools.py --arms sdloop+demo --seeds 1  # the headline, one seed
    python ops/bench/tools.py --seeds 1 --max-steps 2 --arms sdloop+demo   # smoke test
    python ops/bench/tools.py --seeds 2 --first-seed 1 --base a.json --out b.json  # later
    python ops/bench/tools.py --report a.json b.json   # one report over the runs of both files
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ops.bench.agent import Episode, run_task, working_call  # noqa: E402
from ops.bench.learning import (  # noqa: E402
    DATA,
    KEYS,
    Setup,
    auth,
    base_model_name,
    check,
    evaluate,
    learn_round,
    load_retention,
    parse_knobs,
    retention_pct,
    served_model,
    spread,
)
from ops.bench.server import bench_server  # noqa: E402
from ops.bench.toolenv import Task, load_tasks, split  # noqa: E402
from store.versions import DEFAULT_ALIAS  # noqa: E402

# Acceptance (issue 34), judged on the headline setup.
TARGET_FIRST_CALL = 50.0  # held-out first-call success %, after one round
TARGET_RETENTION = -2.0  # retention points vs base
DEMO = "+demo"


@dataclass(frozen=True)
class ToolSetup(Setup):
    """A learner preset, and whether an operator demonstrates working calls (`+demo`)."""

    demos: bool = False

    @property
    def label(self) -> str:
        return self.arm + (DEMO if self.demos else "")

    @classmethod
    def parse(cls, name: str) -> ToolSetup:
        return cls(name.removesuffix(DEMO), True, name.endswith(DEMO))


def post_json(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json", **auth(url)})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def demonstrate(url: str, episodes: list[Episode], per_tool: int) -> list[str]:
    """The operator's feedback: the working call on the first answer of up to `per_tool`
    tasks per tool whose first call failed, as a `demonstration`, every other one as a
    `correction`. Returns the tasks it was sent for."""
    sent: list[str] = []
    count: dict[str, int] = {}
    for ep in episodes:
        if ep.first_call_ok or count.get(ep.task.tool, 0) >= per_tool:
            continue
        kind = ("demonstration", "correction")[len(sent) % 2]
        status, body = post_json(f"{url}/v1/feedback", {
            "completion_id": ep.ids[0], "type": kind, "tool_calls": [working_call(ep.task)]})
        if status != 201:
            raise SystemExit(f"the feedback on {ep.task.key} was refused: {status} {body}")
        count[ep.task.tool] = count.get(ep.task.tool, 0) + 1
        sent.append(ep.task.key)
    return sent


def known_entities(tasks: list[Task]) -> dict[str, list[str]]:
    """Per tool, every entity its database has (all instances, held out or not)."""
    out: dict[str, list[str]] = {}
    for t in tasks:
        out.setdefault(t.tool, []).append(t.instance)
    return out


def work(url: str, model: str, tasks: list[Task], known: dict[str, list[str]], calls: int,
         reply: bool, temperature: float, seed: int) -> list[Episode]:
    """The agent loop over `tasks`, one at a time."""
    return [run_task(url, model, t, known[t.tool], calls, auth(url), reply, temperature,
                     seed + n) for n, t in enumerate(tasks)]


def scores(episodes: list[Episode], calls: int) -> dict[str, float]:
    """First-call success %, solved within `calls` %, mean calls spent (a failed task: all)."""
    n = max(len(episodes), 1)
    return {"first %": 100.0 * sum(e.first_call_ok for e in episodes) / n,
            "solved %": 100.0 * sum(e.turns_to_success is not None for e in episodes) / n,
            "calls": statistics.mean(e.turns_to_success or calls for e in episodes)
            if episodes else 0.0}


def evaluate_agent(engine: str, model: str, heldout: list[Task], train: list[Task],
                   known: dict[str, list[str]], calls: int,
                   retention: list[dict[str, Any]]) -> dict[str, Any]:
    """Held-out tasks (the whole loop, greedy), training tasks' first call, retention."""
    held = work(engine, model, heldout, known, calls, False, 0.0, 0)
    seen = work(engine, model, train, known, 1, False, 0.0, 0)
    ret = evaluate(engine, model, [], retention)
    return {"model": model, "heldout": [vars_of(e) for e in held],
            "train": [vars_of(e) for e in seen], "retention": ret["retention"],
            "answers": ret["answers"], "figures": {
                **{f"held {k}": v for k, v in scores(held, calls).items()},
                "train first %": scores(seen, 1)["first %"],
                "retention %": retention_pct(ret)}}


def vars_of(e: Episode) -> dict[str, Any]:
    return {"task": e.task.key, "ask": e.task.ask, "actions": e.actions, "worked": e.worked}


def first_worked(records: list[dict[str, Any]]) -> int:
    """Tasks (saved `vars_of` records) whose first call worked."""
    return sum(bool(e["worked"] and e["worked"][0]) for e in records)


def first_call_pct(records: list[dict[str, Any]]) -> float:
    return 100.0 * first_worked(records) / max(len(records), 1)


def on_tasks(base: dict[str, Any], keys: list[str]) -> list[dict[str, Any]]:
    """The base model's records of these tasks (its evaluation ran every task)."""
    wanted = set(keys)
    return [e for e in base["heldout"] if e["task"] in wanted]


def by_tool(ev: dict[str, Any]) -> dict[str, float]:
    """Held-out first-call success % per tool."""
    out: dict[str, list[bool]] = {}
    for e in ev["heldout"]:
        out.setdefault(e["task"].split(":", 1)[0], []).append(bool(e["worked"] and e["worked"][0]))
    return {tool: 100.0 * sum(v) / len(v) for tool, v in out.items()}


def run(setup: ToolSetup, seed: int, args: argparse.Namespace, tasks: list[Task],
        retention: list[dict[str, Any]], base: dict[str, Any],
        save: Callable[[], None]) -> dict[str, Any]:
    """One arm on one seed; `save` writes what is measured so far (the base evaluation as soon
    as it is made: `--base` reads it back)."""
    tag = f"{setup.label} seed {seed}"
    train, heldout = split(tasks, seed, args.train, args.heldout)
    known = known_entities(tasks)
    env = setup.env(seed, args.knobs)
    print(f"[{tag}] train {[t.key for t in train]}", flush=True)
    rounds, deployed, demonstrated = [], [], []
    with bench_server(tag, f"sdloop-toolbench-{setup.preset}-{seed}-", env,
                      args.keep) as (data_dir, state):
        engine = state["engine_url"]
        KEYS[engine] = state.get("engine_api_key", "")
        if "figures" not in base:  # greedy: the same for every run, asked once over all tasks
            base.update(evaluate_agent(engine, base_model_name(engine), tasks, [], known,
                                       args.calls, retention))
            print(f"[base] first call {base['figures']['held first %']:.1f}% of {len(tasks)} "
                  f"tasks, retention {base['figures']['retention %']:.1f}%", flush=True)
            save()
        for n in range(1, args.rounds + 1):
            eps = work(state["url"], DEFAULT_ALIAS, train, known, args.calls, True,
                       args.agent_temperature, 1000 * seed + 100 * n)
            deployed.append([vars_of(e) for e in eps])
            print(f"[{tag}] deployment {n}: {scores(eps, args.calls)}", flush=True)
            if setup.demos:
                shown = demonstrate(state["url"], eps, args.demos)
                demonstrated.append(shown)
                print(f"[{tag}] demonstrated {len(shown)}: {shown}", flush=True)
            rounds.append(learn_round(data_dir, env, args.max_steps, f"{tag} round {n}"))
        version, model = served_model(state["url"], engine)
        after = evaluate_agent(engine, model, heldout, train, known, args.calls, retention)
    base_first = first_call_pct(on_tasks(base, [t.key for t in heldout]))
    figures = {"base first %": base_first, **after["figures"],
               "base train first %": first_call_pct(on_tasks(base, [t.key for t in train])),
               "retention vs base": after["figures"]["retention %"]
               - base["figures"]["retention %"],
               "promoted": 100.0 * sum(r["promoted"] for r in rounds) / len(rounds),
               "learn s/round": statistics.mean(r["seconds"] for r in rounds)}
    print(f"[{tag}] serving {version}: held-out first call {figures['held first %']:.1f}% "
          f"(base {base_first:.1f}%), solved {figures['held solved %']:.1f}%, retention "
          f"{figures['retention vs base']:+.1f}; per tool {by_tool(after)}", flush=True)
    return {"setup": setup.label, "seed": seed, "version": version,
            "train": [t.key for t in train], "heldout": [t.key for t in heldout],
            "deployed": deployed, "demonstrated": demonstrated, "rounds": rounds,
            "after": after, "figures": figures}


COLUMNS = ["base first %", "held first %", "held solved %", "held calls", "base train first %",
           "train first %", "retention %", "retention vs base", "promoted", "learn s/round"]


def report(runs: list[dict[str, Any]], base: dict[str, Any], smoke: bool) -> list[dict[str, Any]]:
    width = {c: max(len(c), 6) + 2 for c in COLUMNS}
    print(f"\n{'setup':<10}{'seed':>5}" + "".join(f"{c:>{width[c]}}" for c in COLUMNS))
    for r in runs:
        print(f"{r['setup']:<10}{r['seed']:>5}" + "".join(
            f"{r['figures'][c]:>{width[c]}.1f}" for c in COLUMNS))
    labels = list(dict.fromkeys(r["setup"] for r in runs))
    print(f"\nmedian [min–max] over seeds\n{'':<22}" + "".join(f"{lb:>26}" for lb in labels))
    for c in COLUMNS:
        print(f"{c:<22}" + "".join(
            f"{spread([r['figures'][c] for r in runs if r['setup'] == lb]):>26}" for lb in labels))
    print(f"\nbase model over all {len(base['heldout'])} tasks: first call "
          f"{base['figures']['held first %']:.1f}%, solved within the calls "
          f"{base['figures']['held solved %']:.1f}%, retention {base['figures']['retention %']:.1f}%")
    print("held: the held-out tasks after the last round (first call %, solved within --calls %, "
          "calls spent per task, a failed task counting all); train first: the training tasks' "
          "first call; base columns: the base model on the same tasks; promoted: rounds whose "
          "version was promoted (gate enforced).")
    head = [r for r in runs if r["setup"] == runs[0]["setup"]]
    med = {c: statistics.median(r["figures"][c] for r in head) for c in COLUMNS}
    print(f"\nAcceptance, {runs[0]['setup']} (shipped defaults, gate enforced), {len(head)} "
          f"seed(s)" + (" — SMOKE TEST (--max-steps): not a measurement" if smoke else "") + ":")
    worked = sum(first_worked(r["after"]["heldout"]) for r in head)
    asked = sum(len(r["after"]["heldout"]) for r in head)
    base_worked = sum(first_worked(on_tasks(base, r["heldout"])) for r in head)
    pooled = (f"; pooled over seeds {worked} of {asked} held-out first calls worked, base "
              f"{base_worked} of {asked}")
    return [
        check(f"held-out first-call success ≥ {TARGET_FIRST_CALL:.0f} % after one round (median)",
              med["held first %"] >= TARGET_FIRST_CALL,
              f"{med['held first %']:.1f} % vs base {med['base first %']:.1f} %" + pooled),
        check(f"retention ≥ base {TARGET_RETENTION:+.0f} points (median)",
              med["retention vs base"] >= TARGET_RETENTION, f"{med['retention vs base']:+.1f} points"),
    ]


# What a run's figures depend on besides its arm and seed: files that differ in any of these
# (or in the base model's evaluation, which covers the tasks and the retention set) measured
# different things, and are not pooled.
POOLED_ARGS = ("train", "heldout", "calls", "rounds", "agent_temperature", "set", "max_steps",
               "demos")


def poolable(saved: list[dict[str, Any]], paths: list[Path]) -> None:
    """Exit with what differs unless every saved file ran the same tasks, learner and base."""
    first = saved[0]
    for path, other in zip(paths[1:], saved[1:], strict=True):
        differ = [k for k in POOLED_ARGS if other["args"].get(k) != first["args"].get(k)]
        if other["base"].get("figures") != first["base"].get("figures"):
            differ.append("the base model's evaluation")
        if differ:
            raise SystemExit(f"{path} cannot be pooled with {paths[0]}: its "
                             f"{', '.join(differ)} differ")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default="sdloop+demo,sdloop,sft+demo",
                        help="presets, gate enforced, `+demo` for an operator's demonstrations; "
                             "the first is the headline")
    parser.add_argument("--demos", type=int, default=4,
                        help="training tasks per tool given a demonstration (+demo arms)")
    parser.add_argument("--seeds", type=int, default=3, help="how many seeds")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first..first+N-1 (a "
                        "seed draws the instances, the agent's samples and the learner's seed)")
    parser.add_argument("--report", type=Path, nargs="+", metavar="JSON",
                        help="print the report over the runs of earlier --out files; run nothing")
    parser.add_argument("--train", type=int, default=4, help="training instances per tool")
    parser.add_argument("--heldout", type=int, default=6, help="held-out instances per tool")
    parser.add_argument("--calls", type=int, default=2, help="calls the agent makes per task at "
                                                             "most")
    parser.add_argument("--rounds", type=int, default=1, help="deployment + learner rounds")
    parser.add_argument("--agent-temperature", type=float, default=0.7,
                        help="the deployed agent's sampling temperature (evaluation is greedy)")
    parser.add_argument("--set", action="append", default=[], metavar="[ARM.]KEY=VALUE",
                        help="a [learner] knob for every arm or for one (sdloop.lr=1e-3)")
    parser.add_argument("--max-steps", type=int, help="cap training steps per round (smoke tests)")
    parser.add_argument("--retention", type=Path, default=DATA / "retention.json")
    parser.add_argument("--base", type=Path, metavar="JSON",
                        help="the base model's evaluation from an earlier --out file (same "
                             "tasks and retention set), instead of asking it again")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep each run's data dir")
    args = parser.parse_args()
    args.knobs = parse_knobs(args.set, parser.error)
    args.setups = [ToolSetup.parse(a.strip()) for a in args.arms.split(",") if a.strip()]
    if not args.setups or min(args.seeds, args.train, args.heldout, args.calls, args.rounds) < 1:
        parser.error("need an arm, and --seeds, --train, --heldout, --calls, --rounds >= 1")
    args.out = args.out or Path(tempfile.gettempdir()) / f"sdloop-toolbench-{int(time.time())}.json"
    return args


def main() -> None:
    args = parse_args()
    if args.report:
        saved = [json.loads(p.read_text()) for p in args.report]
        poolable(saved, args.report)
        runs = [r for s in saved for r in s["runs"]]
        runs.sort(key=lambda r: ([s.label for s in args.setups] + [r["setup"]]).index(r["setup"]))
        report(runs, saved[0]["base"], any(s["args"]["max_steps"] != "None" for s in saved))
        return
    tasks, retention = load_tasks(), load_retention(args.retention)
    print(f"{len(tasks)} task instances; per run {args.train} training and {args.heldout} "
          f"held-out instances per tool, {args.calls} calls per task, {args.rounds} round(s); "
          f"{args.seeds} seed(s); arms {args.arms}; machine: {os.cpu_count()} cpus; writing "
          f"{args.out}", flush=True)
    # The base model's evaluation is greedy: the same in every run, asked once (or read back).
    base: dict[str, Any] = json.loads(args.base.read_text())["base"] if args.base else {}
    runs: list[dict[str, Any]] = []
    record = {"args": {k: str(v) for k, v in vars(args).items()}, "base": base, "runs": runs}

    def save() -> None:
        args.out.write_text(json.dumps(record, indent=1, default=str))
    for setup in args.setups:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            runs.append(run(setup, seed, args, tasks, retention, base, save))
            save()
    record["acceptance"] = report(runs, base, args.max_steps is not None)
    save()
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
