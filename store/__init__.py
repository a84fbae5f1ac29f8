"""The DuckDB feedback store: schema and migrations, the single writer, read-only queries.

Public surface: `StoreWriter` (implements `feedback.Sink`), `UnknownCompletion`,
`StoreClosed`, `run_read_only`, `query_file`, `QueryError`, `QueryResult`.
"""

from store.query import QueryError, QueryResult, query_file, run_read_only
from store.writer import StoreClosed, StoreWriter, UnknownCompletion

__all__ = [
    "QueryError",
    "QueryResult",
    "StoreClosed",
    "StoreWriter",
    "UnknownCompletion",
    "query_file",
    "run_read_only",
]
