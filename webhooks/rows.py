"""Plain SQL for the writes every message makes: its insert and its status updates.

These run on the database thread while it holds SQLite's one write lock (or a
PostgreSQL transaction), for every delivery and every step of every message.
Building an ORM insert or update cost about half a millisecond of CPU each,
most of it compiling the same statement again; under the lock that time is
taken from every other writer in every process. The statements here are built
once per set of columns, and values go through each field's own
`get_db_prep_save`, so JSON and dates are stored exactly as the ORM stores them.
"""

from functools import cache
from typing import Any

from django.db import connection

from webhooks.models import InboundMessage, Status

_meta = InboundMessage._meta
_INSERT_FIELDS = [f for f in _meta.concrete_fields if not f.primary_key]


def _table() -> str:
    return connection.ops.quote_name(_meta.db_table)


def _column(name: str) -> str:
    return connection.ops.quote_name(_meta.get_field(name).column)


@cache
def _insert_sql() -> str:
    columns = ", ".join(connection.ops.quote_name(f.column) for f in _INSERT_FIELDS)
    marks = ", ".join(["%s"] * len(_INSERT_FIELDS))
    # A repeated delivery hits the unique (instance, message_id) constraint:
    # no row comes back, and no savepoint rollback is needed to find out.
    return (
        f"INSERT INTO {_table()} ({columns}) VALUES ({marks}) "
        f"ON CONFLICT ({_column('instance')}, {_column('message_id')}) DO NOTHING RETURNING id"
    )


def insert_message(*, row: InboundMessage) -> bool:
    """Store a new row (setting its pk); False when this delivery is already stored."""
    values = [f.get_db_prep_save(getattr(row, f.attname), connection) for f in _INSERT_FIELDS]
    with connection.cursor() as cursor:
        cursor.execute(_insert_sql(), values)
        found = cursor.fetchone()
    if found is None:
        return False
    row.pk = found[0]
    return True


@cache
def _update_sql(names: tuple[str, ...]) -> str:
    assignments = ", ".join(f"{_column(name)} = %s" for name in names)
    return (
        f"UPDATE {_table()} SET {assignments} "
        f"WHERE id = %s AND {_column('claim_token')} = %s AND {_column('status')} = %s"
    )


def update_claimed_row(*, pk: int, claim_token: str, fields: dict[str, Any]) -> bool:
    """Write fields to a row this worker holds; False when its claim was lost."""
    names = tuple(sorted(fields))
    values = [_meta.get_field(n).get_db_prep_save(fields[n], connection) for n in names]
    with connection.cursor() as cursor:
        cursor.execute(_update_sql(names), [*values, pk, claim_token, Status.PROCESSING.value])
        return cursor.rowcount == 1


@cache
def _earlier_open_sql() -> str:
    return (
        f"SELECT 1 FROM {_table()} WHERE {_column('instance')} = %s "
        f"AND {_column('chat_jid')} = %s AND {_column('status')} IN (%s, %s) LIMIT 1"
    )


def chat_has_open_message(*, instance_id: int, chat_jid: str) -> bool:
    """Whether a message of this chat is queued or being processed."""
    with connection.cursor() as cursor:
        cursor.execute(
            _earlier_open_sql(),
            [instance_id, chat_jid, Status.QUEUED.value, Status.PROCESSING.value],
        )
        return cursor.fetchone() is not None
