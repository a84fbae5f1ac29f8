"""Serving benchmark: sdloop against plain vLLM, a learned version against base, swaps under
load, gateway overhead. The server runs the shipped defaults (the `default` alias served on
compiled weights, `serving.engine.merged`).

1. Plain vLLM: the same model folder served by `python -m vllm.entrypoints.openai.api_server
   --model <folder>` with vLLM's defaults, against sdloop's `default` alias at rest (base, on
   its compiled engine): engines one at a time (vLLM's defaults take most of the memory for
   the KV cache), A B A B, each start measured after a warm-up, ratios round by round.
2. Learned model: `default@v1` published (the call returns once its merged engine is up and
   probed); then, round after round: the version on `default`, a rollback, base on `default`, a
   promote back — ratios learned/base within each round; the first round starts 2 s after the
   publish returned, the others are the settled figures. The same version served with runtime
   LoRA (alias `lora`, the primary engine) beside them.
3. Swaps under load: 8 clients chat on `default` (half streaming) while new versions are
   published as candidates (register, hash, load, probe on the primary engine: what a learner's
   publish costs serving) with rollbacks and promotes between them, then one new version is
   promoted (it waits for its compiled engine): failed requests, engine restarts, time per call
   by action and by phase, which weights answered.
4. Gateway overhead: tokens/s and latency through sdloop vs. straight to the engine that serves
   the alias (the compiled base engine), interleaved round by round.

Figures are medians over rounds. Completions have a fixed length (`ignore_eos`), so tokens/s
compares like with like.

    python ops/bench/serving.py                      # starts `sdloop serve` on a temp data dir
    python ops/bench/serving.py --data-dir DIR       # gateway overhead of the server on DIR
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ops.bench.adapter import train_version  # noqa: E402
from ops.bench.server import start_server, stop_server, wait_until_up  # noqa: E402
from serving.config import load_config  # noqa: E402
from serving.model_cache import ensure_embedded_model  # noqa: E402
from serving.process import free_port  # noqa: E402
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


# -- 1. plain vLLM --------------------------------------------------------------------------

def start_plain_vllm(model_dir: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`vllm serve` as a user would run it instead: the folder, vLLM's defaults, nothing else."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=open(log, "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115 - the child writes it
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(proc, f"{url}/health", "plain vLLM", log)
    return proc, url


def stop_plain_vllm(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to its process group (the API server and its engine core), SIGKILL after 60 s:
    its memory must be free before the next engine starts."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(2)


async def measure(url: str, model: str, args: argparse.Namespace) -> dict[int, float]:
    """Median tokens/s per concurrency over `--batches` batches, after a warm-up."""
    await run_batch(url, model, False, 2, 2, 8)
    out = {}
    for concurrency in args.concurrency:
        n = max(args.requests_per_stream * concurrency, concurrency)
        out[concurrency] = median([(await run_batch(url, model, False, concurrency, n,
                                                    args.max_tokens)).tokens_per_s
                                   for _ in range(args.batches)])
    return out


def plain_rows(model_dir: str, args: argparse.Namespace, tmp: Path) -> None:
    """Engines one at a time (plain vLLM's defaults take 92 % of the memory for its KV cache on
    the CPU build, so nothing else may run beside it), A B A B: each round starts plain vLLM,
    measures, stops it, then starts `sdloop serve` (shipped defaults), waits for its `default`
    to be on the compiled base engine, measures, stops it."""
    runs: dict[str, list[dict[int, float]]] = {"plain vLLM": [], "sdloop default": []}
    for round_ in range(args.plain_rounds):
        proc, plain = start_plain_vllm(model_dir, tmp / "plain-vllm.log")
        try:
            runs["plain vLLM"].append(asyncio.run(measure(plain, model_dir, args)))
        finally:
            stop_plain_vllm(proc)
        data_dir = tmp / f"plain-round-{round_}"
        data_dir.mkdir()
        server, state = start_server(data_dir)
        try:
            asyncio.run(wait_compiled(state, "base"))
            runs["sdloop default"].append(asyncio.run(measure(state["url"], "default", args)))
        finally:
            stop_server(server)
        print(f"round {round_ + 1}: " + "; ".join(
            f"{arm} " + ", ".join(f"{c}: {v[-1][c]:.1f}" for c in args.concurrency)
            for arm, v in runs.items()), flush=True)
    print(f"\n== plain vLLM (vLLM's defaults, same folder) vs sdloop's `default` at rest "
          f"(max_tokens {args.max_tokens}, {args.plain_rounds} rounds A B A B, engines one at "
          f"a time, median of {args.batches} batches per start) ==")
    header = f"{'streams':<8}" + "".join(f"{arm + ' tok/s':>22}" for arm in runs) + \
        f"{'sdloop/plain':>14}{'range':>14}"
    print(header)
    print("-" * len(header))
    for c in args.concurrency:
        ratios = [s[c] / p[c] for s, p in zip(runs["sdloop default"], runs["plain vLLM"],
                                              strict=True)]
        print(f"{c:<8}" + "".join(f"{median([r[c] for r in v]):>22.1f}" for v in runs.values())
              + f"{median(ratios):>14.2f}{f'{min(ratios):.2f}-{max(ratios):.2f}':>14}",
              flush=True)
    print("ratio: median over rounds of sdloop/plain tokens per second, each round's pair of "
          "starts (target >= 0.95).")


# -- 2. the learned model ---------------------------------------------------------------------

QUESTION = [{"role": "user", "content": "What is the capital of Quessany?"}]


def make_versions(root: Path) -> dict[str, Path]:
    """One learned adapter, as `default@v1` and `lora@v1` (same weights; the version names are
    what the server tells apart); `new_version` makes more `default@v<n>` copies."""
    model_dir = str(ensure_embedded_model(load_config().model_cache_path))
    first = Path(train_version(root, "default@v1", model_dir, QUESTION,
                               "The capital of Quessany is Dalvorne."))
    return {"default@v1": first, "lora": copy_version(first, "lora@v1", "lora")}


def copy_version(source: Path, version: str, alias: str) -> Path:
    folder = source.parent / version
    if not folder.exists():
        shutil.copytree(source, folder)
        manifest = json.loads((folder / MANIFEST).read_text())
        (folder / MANIFEST).write_text(json.dumps({**manifest, "version": version,
                                                   "alias": alias}))
    return folder


def new_version(folders: dict[str, Path], number: int) -> Path:
    """`default@v<number>`: the learned adapter under a version name the server has not seen."""
    return copy_version(folders["default@v1"], f"default@v{number}", "default")


async def admin(session: aiohttp.ClientSession, state: dict, method: str, path: str,
                body: dict | None = None) -> dict:
    async with session.request(method, state["url"] + path, json=body, headers={
            "authorization": f"Bearer {state['admin_token']}"}) as resp:
        data = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"{path}: {resp.status} {data}")
        return data


async def wait_compiled(state: dict, version: str, timeout: float = 900) -> float:
    """Seconds until `default`'s compiled engine serves `version`."""
    started = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        while time.perf_counter() - started < timeout:
            merged = (await admin(session, state, "GET", "/admin/adapters"))["merged"]
            if merged["state"] == "serving" and merged["version"] == version:
                return time.perf_counter() - started
            if merged["state"] == "failed":
                raise RuntimeError(f"compiled serving failed: {merged['error']}")
            await asyncio.sleep(1)
    raise RuntimeError(f"{version} not served compiled after {timeout:.0f} s")


async def learned_rows(state: dict, folders: dict[str, Path], args: argparse.Namespace) -> None:
    arms = {"learned": "default", "base": "default", "runtime LoRA": "lora"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
        await admin(session, state, "POST", "/admin/adapters/publish",
                    {"path": str(folders["lora"])})
        started = time.perf_counter()
        await admin(session, state, "POST", "/admin/adapters/publish",
                    {"path": str(folders["default@v1"])})
        took = time.perf_counter() - started
        await asyncio.sleep(2)
        print(f"\n== learned model: `default@v1` vs base on `default`, and runtime LoRA "
              f"(max_tokens {args.max_tokens}, {args.rounds} rounds) ==")
        print(f"publish of default@v1 returned after {took:.0f} s (merge + vLLM start + probe; "
              "base answered meanwhile); the first round starts 2 s later")
        runs: dict[int, dict[str, list[float]]] = {
            c: {arm: [] for arm in arms} for c in args.concurrency}
        flips: dict[str, list[float]] = {"rollback": [], "promote": []}
        for _ in range(args.rounds):
            for arm, alias in arms.items():
                if arm == "base":
                    flips["rollback"].append((await admin(
                        session, state, "POST", "/admin/adapters/rollback",
                        {"alias": "default"}))["swap_s"])
                for concurrency in args.concurrency:
                    n = max(args.requests_per_stream * concurrency, concurrency)
                    batch = await run_batch(state["url"], alias, False, concurrency, n,
                                            args.max_tokens)
                    runs[concurrency][arm].append(batch.tokens_per_s)
                if arm == "base":
                    flips["promote"].append((await admin(
                        session, state, "POST", "/admin/adapters/promote",
                        {"version": "default@v1"}))["swap_s"])
    header = (f"{'streams':<8}" + "".join(f"{arm + ' tok/s':>20}" for arm in arms)
              + f"{'learned/base @2s':>18}{'settled':>9}{'LoRA/base':>11}")
    print(header)
    print("-" * len(header))
    for concurrency, by_arm in runs.items():
        ratios = [x / b for x, b in zip(by_arm["learned"], by_arm["base"], strict=True)]
        lora = median([x / b for x, b in zip(by_arm["runtime LoRA"], by_arm["base"],
                                              strict=True)])
        print(f"{concurrency:<8}" + "".join(f"{median(by_arm[arm]):>20.1f}" for arm in arms)
              + f"{ratios[0]:>18.2f}{median(ratios[1:] or ratios):>9.2f}{lora:>11.2f}",
              flush=True)
    print("learned/base @2s: the first round, from 2 s after the publish returned; settled: the "
          "median of the later rounds (targets >= 0.95).")
    for action, xs in flips.items():
        print(f"{action} (call to alias flip, to a warm compiled engine): median {median(xs):.3f} s, "
              f"max {max(xs):.3f} s over {len(xs)}")


# -- 3. swaps under load ----------------------------------------------------------------------

async def checked_chat(session: aiohttp.ClientSession, url: str, model: str, stream: bool,
                       max_tokens: int) -> tuple[bool, str, str]:
    """(succeeded, weights/engine that answered, what went wrong)."""
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens, "temperature": 0.8, "stream": stream}
    try:
        async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
            text = await resp.text()
            weights = (f"{resp.headers.get('x-sdloop-weights', '')}/"
                       f"{resp.headers.get('x-sdloop-engine', '')}")
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
    out = {"primary": 0.0, "compiled": 0.0}
    for line in metrics_text.splitlines():
        if line.startswith("sdloop_engine_restarts_total{"):
            role = line.split('role="', 1)[1].split('"', 1)[0]
            out[role] = float(line.rsplit(" ", 1)[1])
    return out


async def flips_under_load(state: dict, folders: dict[str, Path],
                           args: argparse.Namespace) -> None:
    """From `default@v1` served compiled: `--publishes` candidates, each followed by a rollback
    or a promote back (flips to warm engines), then one new version promoted."""
    url = state["url"]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
        async with session.get(url + "/metrics") as resp:
            before = restarts(await resp.text())
        stop = asyncio.Event()
        results: list[tuple[bool, str, str]] = []

        async def client(n: int) -> None:
            while not stop.is_set():
                results.append(await checked_chat(session, url, "default", n % 2 == 0, 24))

        clients = [asyncio.create_task(client(n)) for n in range(args.flip_clients)]
        await asyncio.sleep(3)
        calls: dict[str, list[float]] = {"publish": [], "rollback": [], "promote": []}
        phases: dict[str, list[float]] = {}
        number = 1
        for i in range(args.publishes):
            number += 1
            started = time.perf_counter()
            done = await admin(session, state, "POST", "/admin/adapters/publish",
                               {"path": str(new_version(folders, number)), "promote": False})
            calls["publish"].append(time.perf_counter() - started)
            for phase, seconds in done["phases"].items():
                phases.setdefault(phase, []).append(seconds)
            await asyncio.sleep(args.flip_every)
            action = ("rollback", "promote")[i % 2]
            body = {"alias": "default"} if action == "rollback" else {"version": "default@v1"}
            started = time.perf_counter()
            await admin(session, state, "POST", f"/admin/adapters/{action}", body)
            calls[action].append(time.perf_counter() - started)
            await asyncio.sleep(args.flip_every)
        if args.publishes % 2:  # end on default@v1
            await admin(session, state, "POST", "/admin/adapters/promote",
                        {"version": "default@v1"})
        started = time.perf_counter()
        await admin(session, state, "POST", "/admin/adapters/promote",
                    {"version": f"default@v{number}"})
        new_weights = time.perf_counter() - started
        await asyncio.sleep(3)
        stop.set()
        await asyncio.gather(*clients, return_exceptions=True)
        async with session.get(url + "/metrics") as resp:
            after = restarts(await resp.text())
    failed = [r for r in results if not r[0]]
    seen: dict[str, int] = {}
    for r in results:
        seen[r[1]] = seen.get(r[1], 0) + 1
    print(f"\n== swaps under load: {args.flip_clients} clients (half streaming, 24 tokens) on "
          f"`default`: {args.publishes} candidate publishes with a rollback or a promote back "
          f"after each, {args.flip_every:.0f} s apart, then one new version promoted ==")
    print(f"requests {len(results)}  failed {len(failed)}  answered by {seen}")
    print(f"engine restarts: primary {after['primary'] - before['primary']:.0f}, "
          f"compiled {after['compiled'] - before['compiled']:.0f}")
    for action, xs in calls.items():
        print(f"{action:<9} call: median {median(xs):.3f} s, max {max(xs):.3f} s over {len(xs)}")
    print("publish by phase (median / max): " + ", ".join(
        f"{phase} {median(xs):.3f} / {max(xs):.3f}" for phase, xs in phases.items()))
    print(f"promote of a new version (waits for its merge, engine start and probe): "
          f"{new_weights:.0f} s")
    for r in failed[:3]:
        print("  failed:", r[2])


# -- 4. gateway overhead ----------------------------------------------------------------------

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
    parser.add_argument("--plain-rounds", type=int, default=2,
                        help="A B A B rounds of plain vLLM and sdloop, one engine at a time")
    parser.add_argument("--batches", type=int, default=3,
                        help="batches per concurrency per engine start in the plain rounds")
    parser.add_argument("--publishes", type=int, default=10)
    parser.add_argument("--flip-every", type=float, default=3.0, help="seconds between calls")
    parser.add_argument("--flip-clients", type=int, default=8)
    parser.add_argument("--sections", type=lambda s: set(s.split(",")),
                        default={"plain", "overhead", "learned", "swaps"},
                        help="which to run: plain,overhead,learned,swaps (all but overhead need "
                             "a server of their own)")
    args = parser.parse_args()

    proc = None
    model_dir = str(ensure_embedded_model(load_config().model_cache_path))
    tmp = Path(tempfile.mkdtemp(prefix="sdloop-bench-"))
    print(f"machine: {os.cpu_count()} cpus; {_cpu_model()}")
    if "plain" in args.sections and not args.data_dir:
        plain_rows(model_dir, args, tmp)
        if not args.sections - {"plain"}:
            return
    data_dir = Path(args.data_dir).resolve() if args.data_dir else tmp
    if args.data_dir:
        state = running_server(data_dir)
        if state is None:
            sys.exit(f"no sdloop server is running on {args.data_dir}")
    else:
        folders = make_versions(tmp / "versions") if {"learned", "swaps"} & args.sections \
            else None
        print(f"starting sdloop serve on {tmp} ...", flush=True)
        proc, state = start_server(tmp)
    try:
        took = asyncio.run(wait_compiled(state, "base"))
        print(f"`default` served by its compiled base engine {took:.0f} s after /readyz")
        compiled = (running_server(data_dir) or state).get("compiled_engines", {})["base"]
        KEYS[compiled["url"]] = compiled["api_key"]
        if "overhead" in args.sections:
            asyncio.run(bench(state["url"], compiled["url"], "base", args))
        if proc is not None and folders is not None:
            if "learned" in args.sections:
                asyncio.run(learned_rows(state, folders, args))
            if "swaps" in args.sections:
                if "learned" not in args.sections:
                    asyncio.run(learned_rows(state, folders, argparse.Namespace(
                        **{**vars(args), "rounds": 1, "concurrency": [1]})))
                asyncio.run(flips_under_load(state, folders, args))
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
