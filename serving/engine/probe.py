"""Checking that an engine serves a version: the version's probe, scored through the engine.

One check for both places that need it — the registry, before a version takes traffic on the
primary engine, and the merged engine, each time it comes up — so that both refuse a version
for the same reasons, in the same words.
"""

from __future__ import annotations

from serving import metrics
from serving.engine.manager import EngineManager, EngineRequestError, EngineUnavailable
from serving.version_folder import RegistryError, VersionFolder, probe_distance


async def probe_version(engine: EngineManager, found: VersionFolder, tolerance: float, *,
                        model: str) -> float:
    """The mean per-token distance between the engine's log-probabilities of the probe's
    response under `model` (the name the engine serves the version under) and the trainer's;
    RegistryError(422) saying why when the engine cannot score it or is further off than
    `tolerance`, (503) when the engine did not answer (a restart: the version may be fine, and
    is not to be rejected for it)."""
    probe = found.manifest["probe"]
    try:
        got = await engine.score(model, probe["prompt_token_ids"],
                                 probe["response_token_ids"])
    except EngineUnavailable as exc:  # the engine went away: says nothing about the version
        raise RegistryError(503, f"probe of {found.version} not done: {exc}") from None
    except (EngineRequestError, KeyError, IndexError, TypeError,
            ValueError) as exc:  # the last four: an answer not in the shape asked for
        raise RegistryError(422, f"probe of {found.version} failed: {exc}") from None
    gap = probe_distance(probe, got)
    if gap > tolerance:
        metrics.PROBE_MISMATCHES.inc()
        raise RegistryError(422, f"probe mismatch for {found.version}: the engine's "
                                 f"log-probabilities differ from the trainer's by {gap:.3f} per "
                                 f"token (tolerance {tolerance})")
    return gap
