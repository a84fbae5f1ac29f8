"""Serving benchmark: what the learned model costs, swaps under load, gateway overhead.

1. Learned model (own server only): tokens/s at 1 and 16 streams through the gateway for the
   base model, a learned version served with runtime LoRA, and the same version served merged
   (`serving.merged`), interleaved round by round, ratios to base within each round. The three
   run side by side on one server: the version is published under two aliases, `lora` (runtime
   LoRA) and `merged` (`engine.merged_alias = "merged"` for this server; the shipped default
   merges `default`'s version), beside `default` on the base model.
2. Swaps under load (own server only): 8 clients chat on `merged` (half streaming) while a new
   version is published, the alias rolled back and the version promoted again, one every few
   seconds: failed requests, engine restarts, swap time (management call to alias flip) by
   action, which weights answered.
3. Gateway overhead: tokens/s and latency through sdloop vs. straight to the same vLLM engine,
   interleaved round by round so that machine noise hits both alike.

Figures are medians over rounds. Completions have a fixed length (`ignore_eos`), so tokens/s
compares like with like.

    python ops/bench/serving.py                      # starts `sdloop serve` on a temp data dir
    python ops/bench/serving.py --data-dir DIR       # gateway overhead of the server on DIR
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ops.bench.adapter import train_version  # noqa: E402
from ops.bench.server import start_server, stop_server  # noqa: E402
from serving.config import load_config  # noqa: E402
from serving.model_cache import ensure_embedded_model  # noqa: E402
from serving.state import running_server  # noqa: E402
from serving.version_folder import MANIFEST  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
# Bearer keys by base URL: the engine answers only requests with its key (the state file's
# `engine_api_key`); the gateway of a bench server has none.
KEYS: dict[str, str] = {}


def auth(url: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[url]}"} if KEYS.get(url) else {}


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
    async with session.post(f"{url}/v1/chat/completions", json=body, headers=auth(url)) as resp:
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


# -- 1. the learned model ---------------------------------------------------------------------

QUESTION = [{"role": "user", "content": "What is the capital of Quessany?"}]
ARMS = {"base": "default", "runtime LoRA": "lora", "merged": "merged"}


def make_versions(root: Path) -> dict[str, Path]:
    """One learned adapter, as `lora@v1`, `merged@v1` and `merged@v2` (same weights; the
    version names are what the server tells apart)."""
    model_dir = str(ensure_embedded_model(load_config().model_cache_path))
    lora = Path(train_version(root, "lora@v1", model_dir, QUESTION,
                              "The capital of Quessany is Dalvorne."))
    folders = {"lora": lora}
    for version in ("merged@v1", "merged@v2"):
        folders[version] = root / version
        shutil.copytree(lora, folders[version])
        manifest = json.loads((folders[version] / MANIFEST).read_text())
        (folders[version] / MANIFEST).write_text(json.dumps({**manifest, "version": version,
                                                             "alias": "merged"}))
    return folders


async def admin(session: aiohttp.ClientSession, state: dict, method: str, path: str,
                body: dict | None = None) -> dict:
    async with session.request(method, state["url"] + path, json=body, headers={
            "authorization": f"Bearer {state['admin_token']}"}) as resp:
        data = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"{path}: {resp.status} {data}")
        return data


async def wait_merged(session: aiohttp.ClientSession, state: dict, timeout: float = 900) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        merged = (await admin(session, state, "GET", "/admin/adapters"))["merged"]
        if merged["state"] == "serving":
            return time.perf_counter() - started
        if merged["state"] == "failed":
            raise RuntimeError(f"merged serving failed: {merged['error']}")
        await asyncio.sleep(1)
    raise RuntimeError(f"not served merged after {timeout:.0f} s")


async def publish_and_wait(state: dict, folders: dict[str, Path]) -> float:
    """Publish `lora@v1` and `merged@v1`; seconds until the latter is served merged."""
    async with aiohttp.ClientSession() as session:
        for name in ("lora", "merged@v1"):
            await admin(session, state, "POST", "/admin/adapters/publish",
                        {"path": str(folders[name])})
        return await wait_merged(session, state)


async def learned_rows(state: dict, folders: dict[str, Path], args: argparse.Namespace) -> None:
    took = await publish_and_wait(state, folders)
    print(f"\n== learned model: base vs the version with runtime LoRA vs merged "
          f"(max_tokens {args.max_tokens}, {args.rounds} rounds) ==")
    print(f"merged engine serving {took:.0f} s after the publish (merge + vLLM start; the "
          "version is served with runtime LoRA meanwhile)")
    for alias in ARMS.values():  # warm each path
        await run_batch(state["url"], alias, False, 2, 2, 8)
    header = (f"{'streams':<8}" + "".join(f"{arm + ' tok/s':>20}" for arm in ARMS)
              + f"{'LoRA/base':>11}{'merged/base':>13}")
    print(header)
    print("-" * len(header))
    for concurrency in args.concurrency:
        n = max(args.requests_per_stream * concurrency, concurrency)
        runs: dict[str, list[float]] = {arm: [] for arm in ARMS}
        for _ in range(args.rounds):
            for arm, alias in ARMS.items():
                batch = await run_batch(state["url"], alias, False, concurrency, n,
                                        args.max_tokens)
                runs[arm].append(batch.tokens_per_s)
        ratio = {arm: median([x / b for x, b in zip(runs[arm], runs["base"], strict=True)])
                 for arm in ARMS}
        print(f"{concurrency:<8}" + "".join(f"{median(runs[arm]):>20.1f}" for arm in ARMS)
              + f"{ratio['runtime LoRA']:>11.2f}{ratio['merged']:>13.2f}", flush=True)
    print("ratios: median over rounds of arm/base tokens per second in the same round.")


# -- 2. swaps under load ----------------------------------------------------------------------

async def checked_chat(session: aiohttp.ClientSession, url: str, model: str, stream: bool,
                       max_tokens: int) -> tuple[bool, str, str]:
    """(succeeded, weights that answered, what went wrong)."""
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens, "temperature": 0.8, "stream": stream}
    try:
        async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
            text = await resp.text()
            weights = resp.headers.get("x-sdloop-weights", "")
            if resp.status != 200:
                return False, weights, f"{resp.status} {text[:200]}"
    except (aiohttp.ClientError, TimeoutError) as exc:
        return False, "", repr(exc)
    if stream:
        events = [ln[6:] for ln in text.splitlines() if ln.startswith("data: ")]
        if not events or events[-1] != "[DONE]" or any('"error"' in e for e in events):
            return False, weights, text[-200:]
    return True, weights, ""


def restarts(metrics_text: str) -> dict[str, float]:
    out = {"primary": 0.0, "merged": 0.0}
    for line in metrics_text.splitlines():
        if line.startswith("sdloop_engine_restarts_total{"):
            role = line.split('role="', 1)[1].split('"', 1)[0]
            out[role] = float(line.rsplit(" ", 1)[1])
    return out


def new_version(folders: dict[str, Path], number: int) -> Path:
    """`merged@v<number>`: the learned adapter under a version name the server has not seen."""
    folder = folders["lora"].parent / f"merged@v{number}"
    if not folder.exists():
        shutil.copytree(folders["lora"], folder)
        manifest = json.loads((folder / MANIFEST).read_text())
        (folder / MANIFEST).write_text(json.dumps({**manifest, "version": folder.name,
                                                   "alias": "merged"}))
    return folder


async def flips_under_load(state: dict, folders: dict[str, Path],
                           args: argparse.Namespace) -> None:
    """From `merged@v2` served merged, every few seconds in turn: publish a new version
    (promoted), roll back, promote it again."""
    url = state["url"]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await admin(session, state, "POST", "/admin/adapters/publish",
                    {"path": str(folders["merged@v2"])})
        await wait_merged(session, state)
        async with session.get(url + "/metrics") as resp:
            before = restarts(await resp.text())
        stop = asyncio.Event()
        results: list[tuple[bool, str, str]] = []

        async def client(n: int) -> None:
            while not stop.is_set():
                results.append(await checked_chat(session, url, "merged", n % 2 == 0, 24))

        clients = [asyncio.create_task(client(n)) for n in range(args.flip_clients)]
        await asyncio.sleep(3)
        swaps: dict[str, list[float]] = {"publish": [], "rollback": [], "promote": []}
        number = 2
        for i in range(args.flips):
            action = ("publish", "rollback", "promote")[i % 3]
            if action == "publish":
                number += 1
                body: dict = {"path": str(new_version(folders, number))}
            else:
                body = {"alias": "merged"} if action == "rollback" else \
                    {"version": f"merged@v{number}"}
            swaps[action].append((await admin(session, state, "POST",
                                              f"/admin/adapters/{action}", body))["swap_s"])
            await asyncio.sleep(args.flip_every)
        if args.flips % 3 == 2:  # end on the newest version
            swaps["promote"].append((await admin(session, state, "POST", "/admin/adapters/promote",
                                                 {"version": f"merged@v{number}"}))["swap_s"])
        stop.set()
        await asyncio.gather(*clients, return_exceptions=True)
        took = await wait_merged(session, state)
        async with session.get(url + "/metrics") as resp:
            after = restarts(await resp.text())
    failed = [r for r in results if not r[0]]
    seen = {w: sum(1 for r in results if r[1] == w) for w in ("merged", "adapter", "base")}
    every = [x for xs in swaps.values() for x in xs]
    print(f"\n== swaps under load: {args.flip_clients} clients (half streaming, 24 tokens) on "
          f"alias 'merged', from a version served merged: publish a new one / roll back / "
          f"promote it again, one every {args.flip_every:.0f} s, {len(every)} swaps ==")
    print(f"requests {len(results)}  failed {len(failed)}  answered by {seen}")
    print(f"engine restarts: primary {after['primary'] - before['primary']:.0f}, "
          f"merged {after['merged'] - before['merged']:.0f}")
    for action, xs in swaps.items():
        print(f"swap time, {action:<8} (call to alias flip): median {median(xs):.3f} s, "
              f"max {max(xs):.3f} s over {len(xs)}")
    print(f"served merged again {took:.0f} s after the last promote")
    for r in failed[:3]:
        print("  failed:", r[2])


async def bench(gateway: str, engine: str, base_model: str, args: argparse.Namespace) -> None:
    # Warm both paths (first requests compile kernels, fill caches).
    await run_batch(engine, base_model, False, 2, 2, 8)
    await run_batch(gateway, "default", True, 2, 2, 8)
    print(f"\n== gateway overhead: gateway {gateway} vs engine {engine} (base model), "
          f"max_tokens {args.max_tokens}, rounds {args.rounds} ==")
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
    parser.add_argument("--flips", type=int, default=12)
    parser.add_argument("--flip-every", type=float, default=3.0, help="seconds between swaps")
    parser.add_argument("--flip-clients", type=int, default=8)
    parser.add_argument("--sections", type=lambda s: set(s.split(",")),
                        default={"learned", "swaps", "overhead"},
                        help="which to run: learned,swaps,overhead (the first two need a server "
                             "of their own)")
    args = parser.parse_args()

    proc = None
    if args.data_dir:
        state = running_server(Path(args.data_dir).resolve())
        if state is None:
            sys.exit(f"no sdloop server is running on {args.data_dir}")
    else:
        tmp = Path(tempfile.mkdtemp(prefix="sdloop-bench-"))
        folders = make_versions(tmp / "versions") if {"learned", "swaps"} & args.sections \
            else None
        print(f"starting sdloop serve on {tmp} ...", flush=True)
        proc, state = start_server(tmp, env={"SDLOOP_ENGINE__MERGED_ALIAS": "merged"})
    KEYS[state["engine_url"]] = state.get("engine_api_key", "")
    try:
        with urllib.request.urlopen(urllib.request.Request(
                state["engine_url"] + "/v1/models", headers=auth(state["engine_url"]))) as resp:
            base_model = next(m["id"] for m in json.loads(resp.read())["data"] if not m.get("parent"))
        print(f"machine: {os.cpu_count()} cpus; {_cpu_model()}")
        if proc is not None and folders is not None:
            if "learned" in args.sections:
                asyncio.run(learned_rows(state, folders, args))
            else:
                asyncio.run(publish_and_wait(state, folders))
            if "swaps" in args.sections:
                asyncio.run(flips_under_load(state, folders, args))
        if "overhead" in args.sections:
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
