"""The store's config section, `[store]` (registered under the `sdloop.config` entry points)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StoreConfig:
    """The DuckDB feedback store: where it lives, and how its single writer batches, bounds and
    checkpoints what the gateway (or `sdloop ingest`) hands it."""

    path: str = ""
    """The DuckDB file. Empty: `<data_dir>/feedback.duckdb`. A relative path is taken from the
    working directory, not from `data_dir`."""
    batch_max: int = 8192
    """Most events written in one transaction (group commit). Idle, every event commits alone;
    under load bigger transactions write faster (about 8k events take 0.6 s here)."""
    queue_max: int = 100_000
    """Bound on events waiting for the writer; past it the request path gets 503, not memory."""
    queue_max_bytes: int = 256 * 1024 * 1024
    """The same bound in bytes: what the events waiting for (or being written by) the writer
    hold, counted as their request bodies plus the answers' texts; a flood of large events gets
    503 before memory grows. An event larger than this alone is taken into an empty queue."""
    checkpoint_mb: int = 256
    """MB of write-ahead log at which DuckDB checkpoints (moves the log into the file). Each
    checkpoint rewrites the table's last, partly filled row group, so small ones cost most of the
    write time under load (events/s on the ingest bench, this machine: 16 MB 22k, 64 MB 27k,
    256 MB 30k); a bigger log is replayed on the next open."""
