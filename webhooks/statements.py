"""Running the hot path's prebuilt statements (webhooks/rows.py) at the least cost.

Django's SQLite cursor rewrites each statement's placeholders on every execute:
a regular expression over the whole text, about 40 µs for the 3 KB instance
SELECT, more than SQLite takes to run it, and the same again for the insert of
a message. The statements in rows.py are fixed strings, so on SQLite they are
rewritten once and run on the DB-API connection itself. Wherever Django is
watching statements (DEBUG's query log, CaptureQueriesContext, execute wrappers)
they go through Django's cursor as before, so tests see and plan every one.
On PostgreSQL Django's cursor adds little: it is used as it is.
"""

from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any, Protocol

from django.db import DEFAULT_DB_ALIAS, connections
from django.db.backends.sqlite3.base import FORMAT_QMARK_REGEX


class Ran(Protocol):
    """What the callers read of an executed statement."""

    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


def run(sql: str, params: Sequence[Any] | Mapping[str, Any]) -> Ran:
    """Execute `sql` (Django's %s or %(name)s placeholders) in the current transaction."""
    db = connections[DEFAULT_DB_ALIAS]
    if db.vendor != "sqlite" or db.queries_logged or db.execute_wrappers:
        cursor = db.cursor()
        cursor.execute(sql, params)
        return cursor
    # What Django's cursor checks first, kept: no statement after a failed one
    # inside an atomic block, and a connection opened when there is none.
    db.validate_no_broken_transaction()
    db.ensure_connection()
    names = tuple(params) if isinstance(params, Mapping) else None
    with db.wrap_database_errors:
        return db.connection.execute(_sqlite_form(sql, names), params)


@cache
def _sqlite_form(sql: str, names: tuple[str, ...] | None) -> str:
    # As django.db.backends.sqlite3.base.SQLiteCursorWrapper.convert_query.
    if names is None:
        return FORMAT_QMARK_REGEX.sub("?", sql).replace("%%", "%")
    return sql % {name: f":{name}" for name in names}
