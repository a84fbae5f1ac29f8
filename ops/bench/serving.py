"""Gateway overhead: tokens/s and latency through sdloop vs. straight to the same vLLM child.

Both arms run in one process against one engine, interleaved round by round (direct, gateway,
direct, gateway, ...) so that machine noise hits both alike; the figures are medians over
rounds. Completions have a fixed length (`ignore_eos`), so tokens/s compares like with like.

    python ops/bench/serving.py                      # starts `sdloop serve` on a temp data dir
    python ops/bench/serving.py --data-dir DIR       # measures the server running on DIR
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ops.bench.server import start_server, stop_server  # noqa: E402
from serving.state import running_server  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


@dataclass
class Batch:
    tokens: int
    wall_s: float
    latencies_ms: list[float]
    ttfts_ms: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


async def one_request(
    session: aiohttp.ClientSession, url: str, model: str, stream: bool, max_tokens: int
) -> tuple[int, float, float | None]:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens, "temperature": 0.8, "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    started = time.perf_counter()
    ttft = None
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: {resp.status} {await resp.text()}")
        if not stream:
            data = await resp.json()
            return data["usage"]["completion_tokens"], (time.perf_counter() - started) * 1e3, None
        tokens = 0
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if ttft is None and any(c.get("delta", {}).get("content") for c in chunk["choices"]):
                ttft = (time.perf_counter() - started) * 1e3
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
        return tokens, (time.perf_counter() - started) * 1e3, ttft


async def run_batch(url: str, model: str, stream: bool, concurrency: int, n: int,
                    max_tokens: int) -> Batch:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    results: list[tuple[int, float, float | None]] = []
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as s:

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                results.append(await one_request(s, url, model, stream, max_tokens))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return Batch(sum(r[0] for r in results), wall, [r[1] for r in results],
                 [r[2] for r in results if r[2] is not None])


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


async def bench(gateway: str, engine: str, base_model: str, args: argparse.Namespace) -> None:
    # Warm both paths (first requests compile kernels, fill caches).
    await run_batch(engine, base_model, False, 2, 2, 8)
    await run_batch(gateway, "default", True, 2, 2, 8)
    print(f"gateway {gateway}  engine {engine}  max_tokens {args.max_tokens}  rounds {args.rounds}")
    header = (f"{'mode':<11}{'conc':>5}{'direct tok/s':>14}{'gateway tok/s':>15}{'ratio':>7}"
              f"{'direct p50 ms':>15}{'gateway p50 ms':>16}{'added ms':>10}"
              f"{'direct ttft':>13}{'gateway ttft':>14}")
    print(header)
    print("-" * len(header))
    for concurrency in args.concurrency:
        n = max(args.requests_per_stream * concurrency, concurrency)
        for stream in (False, True):
            runs: dict[str, list[Batch]] = {"direct": [], "gateway": []}
            for _ in range(args.rounds):
                runs["direct"].append(await run_batch(engine, base_model, stream, concurrency, n,
                                                      args.max_tokens))
                runs["gateway"].append(await run_batch(gateway, "default", stream, concurrency, n,
                                                       args.max_tokens))
            tps = {k: median([b.tokens_per_s for b in v]) for k, v in runs.items()}
            lat = {k: median([x for b in v for x in b.latencies_ms]) for k, v in runs.items()}
            ttft = {k: median([x for b in v for x in b.ttfts_ms]) for k, v in runs.items()}
            ratios = [g.tokens_per_s / d.tokens_per_s
                      for d, g in zip(runs["direct"], runs["gateway"], strict=True)]
            print(f"{'stream' if stream else 'non-stream':<11}{concurrency:>5}"
                  f"{tps['direct']:>14.1f}{tps['gateway']:>15.1f}{median(ratios):>7.3f}"
                  f"{lat['direct']:>15.1f}{lat['gateway']:>16.1f}{lat['gateway'] - lat['direct']:>10.1f}"
                  f"{ttft['direct']:>13.1f}{ttft['gateway']:>14.1f}", flush=True)
    print("ratio: median over rounds of gateway/direct tokens per second in the same round; "
          "added ms: gateway p50 latency - direct p50 latency.")

    # Fixed cost per request, without generation time to hide it: one-token answers, one at a
    # time, gateway and direct alternating request by request.
    print(f"\nper-request overhead, max_tokens=1, {args.overhead_requests} requests per arm, "
          "sequential, alternating ABBA:")
    print(f"{'mode':<11}{'direct p50 ms':>15}{'gateway p50 ms':>16}{'added p50 ms':>14}"
          f"{'added p90 ms':>14}")
    async with aiohttp.ClientSession() as session:
        for stream in (False, True):
            lat: dict[str, list[float]] = {"direct": [], "gateway": []}
            arms = {"direct": (engine, base_model), "gateway": (gateway, "default")}
            for i in range(args.overhead_requests):
                # ABBA order, so that whatever the first of a pair pays is shared evenly.
                for arm in ("direct", "gateway") if i % 2 == 0 else ("gateway", "direct"):
                    url, model = arms[arm]
                    lat[arm].append((await one_request(session, url, model, stream, 1))[1])
            d, g = sorted(lat["direct"]), sorted(lat["gateway"])
            p90 = int(0.9 * (len(d) - 1))
            print(f"{'stream' if stream else 'non-stream':<11}{median(d):>15.2f}{median(g):>16.2f}"
                  f"{median(g) - median(d):>14.2f}{g[p90] - d[p90]:>14.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="measure the server already running on this data dir")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests-per-stream", type=int, default=4,
                        help="requests per concurrent stream in one batch")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--overhead-requests", type=int, default=100)
    args = parser.parse_args()

    proc = None
    if args.data_dir:
        state = running_server(Path(args.data_dir).resolve())
        if state is None:
            sys.exit(f"no sdloop server is running on {args.data_dir}")
    else:
        tmp = Path(tempfile.mkdtemp(prefix="sdloop-bench-"))
        print(f"starting sdloop serve on {tmp} ...", flush=True)
        proc, state = start_server(tmp)
    try:
        with urllib.request.urlopen(state["engine_url"] + "/v1/models") as resp:
            base_model = next(m["id"] for m in json.loads(resp.read())["data"] if not m.get("parent"))
        print(f"machine: {os.cpu_count()} cpus; {_cpu_model()}")
        asyncio.run(bench(state["url"], state["engine_url"], base_model, args))
    finally:
        if proc is not None:
            stop_server(proc)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown cpu"


if __name__ == "__main__":
    main()
