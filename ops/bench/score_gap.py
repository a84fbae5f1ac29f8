"""How far a log-probability read during decoding is from the same one computed by a prefill.

`EngineManager.score` (the probe of a version, `serving.engine.probe`) reads a response's scores from
one greedy generation: step i's log-probability of the response's token i, computed in a decode
step. The reference a test compares it with is one one-token request per position, whose score
comes out of a prefill. In bf16 the two differ by rounding, more the less likely the token; a
tolerance for comparing them is derived from this distribution, not picked after a red run.

Per prompt: a greedy generation of `--tokens` tokens; then the same generation reporting, at every
step, the log-probabilities of a set of tokens (the generated ones and `--random` others drawn
from `OTHER_TOKENS`, so that unlikely tokens are covered too); then one one-token request per
position with the same set.
Each (position, token) gives a pair (prefill b, decode a). Printed: |a - b| by band of b (count,
median, 99th percentile, max), the largest |a - b| / (1 + |b|), and what a score read one
position off gives (the generated token's decode score at the next or the previous position
against its own prefill score).

    python ops/bench/score_gap.py                   # starts `sdloop serve` on a temp data dir
    python ops/bench/score_gap.py --data-dir DIR    # the engine of the server running on DIR
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ops.bench.server import bench_server  # noqa: E402
from serving.state import running_server  # noqa: E402

PROMPTS = [
    "The capital of France is Paris. The capital of Italy is",
    "Water boils at a temperature of",
    "Once upon a time, in a small village by the sea,",
    "To make a cup of tea, first",
    "The three primary colours are",
    "def fibonacci(n):\n    ",
    "The largest planet in the solar system is",
    "In 1492, Christopher Columbus",
    "Photosynthesis is the process by which",
    "My favourite thing about winter is",
    "The quick brown fox",
    "A healthy breakfast usually includes",
    "The square root of 144 is",
    "Shakespeare wrote many plays, including",
    "To install a Python package, you can run",
    "The human heart has four chambers:",
    "Dear customer, thank you for your order. Your package",
    "The speed of light in a vacuum is approximately",
    "Mount Everest is located in",
    "SELECT name, age FROM users WHERE",
    "The main ingredients of bread are",
    "Rain forms when water vapour",
    "The French word for 'thank you' is",
    "An apple a day",
]
# Where the tokens scored beside the generated ones come from: words unlikely after any prompt.
OTHER_TOKENS = ("xylophone quagmire zephyr obfuscate narwhal juxtapose kumquat flabbergast "
                "syzygy gobbledygook 7319 ###} ]]) Ω λ 漢字 сегодня ¿qué")
BANDS = [(0.0, 1.0), (1.0, 3.0), (3.0, 6.0), (6.0, 10.0), (10.0, 20.0), (20.0, 1e9)]


def get(engine: dict[str, str], path: str) -> Any:
    req = urllib.request.Request(engine["url"] + path,
                                 headers={"authorization": f"Bearer {engine['key']}"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def post(engine: dict[str, str], path: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(engine["url"] + path, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json",
                                          "authorization": f"Bearer {engine['key']}"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())


def step_scores(choice: dict[str, Any], wanted: list[int]) -> tuple[list[int], list[dict[int, float]]]:
    """The chosen token ids and, per step, the log-probability of every wanted token."""
    lp = choice["logprobs"]
    chosen = [int(t.split(":")[1]) for t in lp["tokens"]]
    return chosen, [{t: float(top[f"token_id:{t}"]) for t in wanted} for top in lp["top_logprobs"]]


def measure(engine: dict[str, str], model: str, prompt: str, tokens: int, others: list[int],
            ) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """([(prefill b, decode a)] over every position and wanted token, [(b, a read one position
    off)] for the generated tokens)."""
    ids = post(engine, "/tokenize", {"model": model, "prompt": prompt})["tokens"]
    body = {"model": model, "prompt": ids, "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, "return_tokens_as_token_ids": True, "logprobs": 0}
    followed, _ = step_scores(post(engine, "/v1/completions", body)["choices"][0], [])
    wanted = sorted(set(followed) | set(others))
    again, decoded = step_scores(post(engine, "/v1/completions", {
        **body, "logprobs": 1, "logprob_token_ids": wanted})["choices"][0], wanted)
    same = next((i for i, (x, y) in enumerate(zip(followed, again, strict=True)) if x != y),
                len(followed))  # greedy twice: the same path, as far as it is the same
    prefilled = [step_scores(post(engine, "/v1/completions", {
        "model": model, "prompt": ids + followed[:i], "max_tokens": 1, "temperature": 0,
        "logprobs": 1, "logprob_token_ids": wanted, "return_tokens_as_token_ids": True,
    })["choices"][0], wanted)[1][0] for i in range(same)]
    pairs = [(prefilled[i][t], decoded[i][t]) for i in range(1, same) for t in wanted]
    off = [(prefilled[i][followed[i]], decoded[j][followed[i]])
           for i in range(same) for j in (i - 1, i + 1) if 0 <= j < same]
    return pairs, off


def report(pairs: list[tuple[float, float]], off: list[tuple[float, float]]) -> None:
    print(f"\n{len(pairs)} (position, token) pairs, decode steps only (position 0 is a prefill "
          "on both sides)\n|b| band      n    median |a-b|    p99 |a-b|    max |a-b|")
    for lo, hi in BANDS:
        gaps = sorted(abs(a - b) for b, a in pairs if lo <= abs(b) < hi)
        if gaps:
            p99 = gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))]
            print(f"{lo:>4.0f}-{hi if hi < 1e9 else float('inf'):<6.0f} {len(gaps):>5} "
                  f"{statistics.median(gaps):>14.4f} {p99:>12.4f} {gaps[-1]:>12.4f}")
    rel = max(abs(a - b) / (1 + abs(b)) for b, a in pairs)
    print(f"max |a-b| / (1 + |b|): {rel:.4f}")
    gaps = sorted(abs(a - b) for b, a in off)
    print(f"\none position off ({len(gaps)} reads of a generated token at the step before or "
          f"after): median |a-b| {statistics.median(gaps):.3f}, share above 0.15: "
          f"{sum(g > 0.15 for g in gaps) / len(gaps):.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, help="a running server's; default: start one")
    parser.add_argument("--tokens", type=int, default=16, help="generated tokens per prompt")
    parser.add_argument("--random", type=int, default=8, help="other tokens scored per step")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    def run(state: dict[str, Any]) -> None:
        engine = {"url": state["engine_url"], "key": state.get("engine_api_key", "")}
        model = next(m["id"] for m in get(engine, "/v1/models")["data"] if not m.get("parent"))
        others = post(engine, "/tokenize", {"model": model, "prompt": OTHER_TOKENS})["tokens"]
        rng = random.Random(args.seed)
        pairs, off = [], []
        for prompt in PROMPTS:
            p, o = measure(engine, model, prompt, args.tokens, rng.sample(others, args.random))
            pairs += p
            off += o
        report(pairs, off)

    if args.data_dir:
        run(running_server(args.data_dir) or {})
        return
    with bench_server("score-gap", "sdloop-scoregap-", {}, keep=False) as (_, state):
        run(state)


if __name__ == "__main__":
    main()
