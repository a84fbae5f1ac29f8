"""The DuckDB feedback store: schema and migrations, the single writer, read-only queries.

Public surface: `StoreWriter` (implements `feedback.Sink`), `UnknownCompletion`,
`StoreClosed`, `run_read_only`, `query_file`, `QueryError`, `QueryResult`, and the names the
adapter registry seeds into its tables.
"""

from store.query import QueryError, QueryResult, query_file, run_read_only
from store.writer import StoreClosed, StoreWriter, UnknownCompletion

# The version name of the model without an adapter, and the alias seeded to point at it.
BASE_VERSION = "base"
DEFAULT_ALIAS = "default"

__all__ = [
    "BASE_VERSION",
    "DEFAULT_ALIAS",
    "QueryError",
    "QueryResult",
    "StoreClosed",
    "StoreWriter",
    "UnknownCompletion",
    "query_file",
    "run_read_only",
]
