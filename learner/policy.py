"""The teaching policy: which signals may change what the model answers.

Whoever reaches the endpoint can send feedback, and a signal that trains changes the answers
every user gets. So a signal teaches only when
- its principal held the `feedback` scope when it was sent and has not been revoked since
  (the store's `signals.teaches`);
- in review mode (`learner.review`), a person approved it (`sdloop review approve`);
- it is within its principal's quota (`learner.principal_quota_per_hour` signals per clock
  hour, the earliest ones), so one client cannot flood a round;
- with `learner.min_principals` > 1, that many distinct principals gave the same signal on the
  same question (over the whole store, not just this round);
and a round takes each distinct signal once (200 copies of one correction weigh as one), at
most `learner.max_signals_per_episode` per answer, each cut to `learner.max_signal_chars`, and
— once two or more principals teach in it — no principal more than `learner.max_principal_share`
of its signals.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from feedback import context_hash, normalise

# Signals over their principal's quota: per principal and clock hour, all but the earliest
# `quota` (from the hour of the round's mark on; earlier hours were decided by earlier rounds).
OVER_QUOTA_SQL = """
SELECT id FROM (
    SELECT id, row_number() OVER (
        PARTITION BY principal, date_trunc('hour', created_at) ORDER BY created_at, id) AS n
    FROM signals
    WHERE teaches AND created_at >= date_trunc('hour', ?::TIMESTAMP)
)
WHERE n > ?
"""

# Every stored signal that may teach, with its question: who agrees with whom (min_principals).
AGREEMENT_SQL = """
SELECT completion_id, created_at, version, messages, response_text, token_ids, feedback,
       followups
FROM episodes WHERE has_signal AND status = 'ok'
"""


@dataclass(frozen=True)
class TeachingPolicy:
    review: bool = False
    min_principals: int = 1
    principal_quota_per_hour: int = 0  # 0: no quota
    max_principal_share: float = 1.0
    max_signal_chars: int = 0  # 0: no cap
    max_signals_per_episode: int = 0  # 0: no cap

    def admits(self, item: dict[str, Any], over_quota: set[str]) -> bool:
        """A stored feedback / follow-up item (from the `episodes` view) may teach."""
        if item.get("teaches") is False or item.get("id") in over_quota:
            return False
        review = item.get("review")
        return review == "approved" if self.review else review != "rejected"

    def cut(self, text: str) -> str:
        return text[: self.max_signal_chars] if self.max_signal_chars else text


def signal_key(messages: list[dict[str, Any]], source: str, text: str) -> tuple[str, str, str]:
    """What makes two signals the same: the question, the kind, the text (case and spacing
    aside)."""
    return context_hash(messages), source, normalise(text).lower()


def agreement(keys: Iterable[tuple[tuple[str, str, str], str | None]]) -> dict[tuple, set]:
    """signal key -> the distinct principals that gave it."""
    found: dict[tuple, set] = defaultdict(set)
    for key, principal in keys:
        found[key].add(principal)
    return found


def apply_policy(episodes: list[Any], policy: TeachingPolicy,
                 agreed: dict[tuple, set] | None) -> list[Any]:
    """Episodes (`learner.episodes.Episode`) with only the signals the policy lets teach, each
    distinct signal once in the round; episodes left with none are dropped."""
    seen: set[tuple[str, str, str]] = set()
    for ep in episodes:
        kept = []
        for s in ep.signals:
            key = signal_key(ep.messages, s.source, s.text)
            if key in seen:
                continue
            if agreed is not None and len(agreed.get(key, ())) < policy.min_principals:
                continue
            seen.add(key)
            kept.append(s)
        if policy.max_signals_per_episode:
            kept = kept[: policy.max_signals_per_episode]
        ep.signals = kept
    episodes = [ep for ep in episodes if ep.signals]
    return _share_capped(episodes, policy.max_principal_share)


def _share_capped(episodes: list[Any], share: float) -> list[Any]:
    """No principal above `share` of the round's signals once two or more teach in it (the
    newest of an over-share principal's signals are left out)."""
    counts: dict[str | None, int] = defaultdict(int)
    for ep in episodes:
        for s in ep.signals:
            counts[s.principal] += 1
    total = sum(counts.values())
    if share >= 1.0 or len(counts) < 2:
        return episodes
    # The largest count c with c <= share * (others + c), for each principal.
    allowed = {p: min(c, math.floor(share * (total - c) / (1 - share))) for p, c in counts.items()}
    taken: dict[str | None, int] = defaultdict(int)
    for ep in sorted(episodes, key=lambda e: e.signal_at):
        kept = []
        for s in ep.signals:
            if taken[s.principal] < allowed[s.principal]:
                taken[s.principal] += 1
                kept.append(s)
        ep.signals = kept
    return [ep for ep in episodes if ep.signals]
