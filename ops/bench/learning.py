"""Learning benchmark: does the endpoint answer better after users correct it, and still answer
what it knew?

For each arm (a learner preset) it starts a fresh `sdloop serve`, teaches fictional facts
through ordinary chat (the user asks, the model answers, the user replies "No, ... is Y."),
runs `sdloop learn --once` after each batch of facts (one batch per round), then asks, through
the endpoint and without any context, paraphrases of the taught questions (never trained on)
and a retention set of general questions (disjoint from the gate's). Base figures are asked of
the engine directly before anything is taught, so that nothing they log reaches the learner.
The gate's verdict is recorded but not enforced, so that every arm's candidate is served and
measured; the table says whether the default gate would have promoted it.

    python ops/bench/learning.py                              # sdloop vs sft, 2 rounds
    python ops/bench/learning.py --arms sdloop --rounds 1 --set lr=1e-3
    python ops/bench/learning.py --facts ../shared/learning/dev_facts.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ops.bench.server import start_server, stop_server  # noqa: E402
from serving.chat import VERSION_HEADER  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
MAX_TOKENS = 40  # as the defaults were measured (README): greedy, 40 new tokens, substring match


def load_facts(path: Path) -> list[dict[str, Any]]:
    data = json.loads(path.read_text())
    return data["facts"] if isinstance(data, dict) else data


def load_retention(path: Path) -> list[dict[str, Any]]:
    data = json.loads(path.read_text())
    return data["questions"] if isinstance(data, dict) else data


def chat(url: str, model: str, messages: list[dict[str, str]]) -> tuple[str, str | None]:
    body = json.dumps({"model": model, "messages": messages, "max_tokens": MAX_TOKENS,
                       "temperature": 0.0}).encode()
    req = urllib.request.Request(f"{url}/v1/chat/completions", body,
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        answer = json.loads(resp.read())
        return answer["choices"][0]["message"]["content"] or "", resp.headers.get(VERSION_HEADER)


def teach(url: str, facts: list[dict[str, Any]]) -> None:
    """The user asks, the model answers, the user corrects it in the next turn."""
    def one(fact: dict[str, Any]) -> None:
        ask = [{"role": "user", "content": fact["ask"]}]
        reply, _ = chat(url, "default", ask)
        chat(url, "default", ask + [{"role": "assistant", "content": reply},
                                    {"role": "user", "content": fact["correct"]}])

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, facts))


def evaluate(url: str, model: str, facts: list[dict[str, Any]],
             retention: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy (%) on every probe of every fact and on the retention questions."""
    asks = [(p, f["key"]) for f in facts for p in f["probe"]]
    asks += [(q["q"], q["a"]) for q in retention]

    def one(item: tuple[str, list[str]]) -> tuple[bool, str | None, str]:
        text, version = chat(url, model, [{"role": "user", "content": item[0]}])
        return any(k.lower() in text.lower() for k in item[1]), version, text

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, asks))
    n_probes = len(asks) - len(retention)
    probes, kept = results[:n_probes], results[n_probes:]
    return {"facts": 100.0 * sum(r[0] for r in probes) / max(len(probes), 1),
            "retention": 100.0 * sum(r[0] for r in kept) / max(len(kept), 1),
            "versions": sorted({str(r[1]) for r in results}),
            "answers": [{"q": q, "ok": r[0], "answer": r[2]} for (q, _), r in zip(asks, results,
                                                                                 strict=True)]}


def learn_once(data_dir: Path, env: dict[str, str], log: Path) -> dict[str, Any]:
    with open(log, "ab") as err:
        out = subprocess.run(
            [sys.executable, "-m", "serving.cli", "learn", "--once", "--data-dir", str(data_dir)],
            stdout=subprocess.PIPE, stderr=err, env={**os.environ, **env}, check=False)
    if out.returncode != 0:
        sys.exit(f"sdloop learn --once failed ({out.returncode}); see {log}")
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


def run_arm(arm: str, facts: list[dict[str, Any]], retention: list[dict[str, Any]],
            rounds: int, overrides: dict[str, str], keep: bool, base: dict[str, Any] | None,
            ) -> tuple[dict[str, Any], dict[str, Any]]:
    data_dir = Path(tempfile.mkdtemp(prefix=f"sdloop-learnbench-{arm}-"))
    env = {"SDLOOP_LEARNER__PRESET": arm, "SDLOOP_LEARNER__ENFORCE_GATE": "false",
           **{f"SDLOOP_LEARNER__{k.upper()}": v for k, v in overrides.items()}}
    print(f"[{arm}] serving on {data_dir}", flush=True)
    proc, state = start_server(data_dir, env)
    try:
        if base is None:
            with urllib.request.urlopen(state["engine_url"] + "/v1/models") as resp:
                base_model = next(m["id"] for m in json.loads(resp.read())["data"]
                                  if not m.get("parent"))
            base = evaluate(state["engine_url"], base_model, facts, retention)
            print(f"[base] facts {base['facts']:.1f}%  retention {base['retention']:.1f}%", flush=True)
        batches = [facts[i::rounds] for i in range(rounds)]
        summaries, learn_s = [], 0.0
        for n, batch in enumerate(batches, 1):
            teach(state["url"], batch)
            started = time.monotonic()
            summary = learn_once(data_dir, env, data_dir / "learn.err")
            learn_s += time.monotonic() - started
            summaries.append(summary)
            gate = summary.get("gate", {})
            print(f"[{arm}] round {n}: {summary.get('status')} {summary.get('version')} "
                  f"items {summary.get('items')} steps {summary.get('steps')} "
                  f"gate {'pass' if gate.get('passed') else gate.get('reasons')}", flush=True)
        result = evaluate(state["url"], "default", facts, retention)
    finally:
        stop_server(proc)
    if not keep:
        shutil.rmtree(data_dir, ignore_errors=True)
    last_gate = summaries[-1].get("gate", {})
    result.update(arm=arm, rounds=summaries, learn_seconds=learn_s,
                  drift=last_gate.get("drift"), gate=",".join(
                      "pass" if s.get("gate", {}).get("passed") else "fail" for s in summaries),
                  divergence=[(s.get("gate", {}).get("heldout_divergence_before"),
                               s.get("gate", {}).get("heldout_divergence_after"))
                              for s in summaries])
    return result, base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default="sdloop,sft", help="learner presets, comma-separated")
    parser.add_argument("--facts", type=Path, default=DATA / "facts.json")
    parser.add_argument("--retention", type=Path, default=DATA / "retention.json")
    parser.add_argument("--rounds", type=int, default=2,
                        help="facts are taught in this many batches, a learner round after each")
    parser.add_argument("--set", action="append", default=[], metavar="[ARM.]KEY=VALUE",
                        help="a [learner] knob for every arm (lr=1e-3) or for one (sdloop.lr=1e-3)")
    parser.add_argument("--out", type=Path, help="write every figure and answer here (JSON)")
    parser.add_argument("--keep", action="store_true", help="keep each arm's data dir")
    args = parser.parse_args()
    overrides: dict[str, dict[str, str]] = {}
    for kv in args.set:
        key, value = kv.split("=", 1)
        arm, _, knob = key.rpartition(".")
        overrides.setdefault(arm, {})[knob] = value
    facts, retention = load_facts(args.facts), load_retention(args.retention)
    print(f"{len(facts)} facts x {len(facts[0]['probe'])} paraphrases, {len(retention)} retention "
          f"questions, {args.rounds} round(s); machine: {os.cpu_count()} cpus", flush=True)

    base, results = None, []
    for arm in args.arms.split(","):
        arm = arm.strip()
        knobs = {**overrides.get("", {}), **overrides.get(arm, {})}
        result, base = run_arm(arm, facts, retention, args.rounds, knobs, args.keep, base)
        results.append(result)

    assert base is not None
    print(f"\n{'arm':<10}{'facts %':>9}{'retention %':>13}{'vs base':>9}{'drift':>8}"
          f"{'held-out div':>16}{'gate/round':>16}{'learn s':>9}")
    print(f"{'base':<10}{base['facts']:>9.1f}{base['retention']:>13.1f}{'':>9}{'':>8}{'':>16}"
          f"{'':>16}{'':>9}")
    for r in results:
        before, after = r["divergence"][-1]
        div = f"{before:.2f}->{after:.2f}" if before is not None else "-"
        print(f"{r['arm']:<10}{r['facts']:>9.1f}{r['retention']:>13.1f}"
              f"{r['retention'] - base['retention']:>+9.1f}{(r['drift'] or 0):>8.3f}{div:>16}"
              f"{r['gate']:>16}{r['learn_seconds']:>9.0f}")
    print(f"\nfacts: {len(facts) * len(facts[0]['probe'])} paraphrased probes, no context; one probe "
          f"= {100 / (len(facts) * len(facts[0]['probe'])):.1f} points; retention: one question = "
          f"{100 / len(retention):.1f} points; drift and held-out divergence: the gate's, last round; "
          "gate/round: the default gate's verdict on each round (recorded, not enforced here); "
          f"median learn s per round: "
          + ", ".join(f"{r['arm']} {statistics.median(s.get('seconds', 0) for s in r['rounds']):.0f}"
                      for r in results))
    if args.out:
        args.out.write_text(json.dumps({"base": base, "arms": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
