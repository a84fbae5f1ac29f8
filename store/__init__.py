"""The DuckDB feedback store: schema and migrations, the single writer, read-only queries, the
tables of versions and dead letters, and the Kafka ingester (`store.ingest`, imported on its
own: it pulls in kafka-python).

Imports only `feedback` (the events it writes). Public surface: `StoreWriter` (implements
`feedback.Sink`), `StoreClosed`, `run_read_only`, `query_file`, `QueryError`, `QueryResult`,
and the names the versions tables are seeded with.
"""

from store.query import Query, QueryError, QueryResult, query_file, run_read_only
from store.versions import BASE_VERSION, DEFAULT_ALIAS
from store.writer import StoreClosed, StoreWriter

__all__ = [
    "BASE_VERSION",
    "DEFAULT_ALIAS",
    "Query",
    "QueryError",
    "QueryResult",
    "StoreClosed",
    "StoreWriter",
    "query_file",
    "run_read_only",
]
