"""Plain SQL for what every delivery and message does: find its tenant, insert
the row, update its status.

These run on the database thread while it holds SQLite's one write lock (or a
PostgreSQL transaction), for every delivery and every step of every message.
Through the ORM each cost 0.3 to 0.5 ms of CPU, most of it compiling the same
statement again; under the lock that time is taken from every other writer in
every process. The statements here are built once per set of columns; values
go through the fields' own conversions (`get_db_prep_save` in, the backend's
converters out), so they are stored and read exactly as the ORM does.
"""

from collections.abc import Callable
from functools import cache
from typing import Any

from django.db import connection
from django.db.models import DateTimeField, Field, JSONField

from instances.models import InstanceConfig
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


def _prepare(field: Field, value: Any) -> Any:
    # Only dates and JSON change on the way to the database; the other fields
    # (text, numbers, booleans, the instance's id) hold their stored value already.
    if isinstance(field, DateTimeField | JSONField):
        return field.get_db_prep_save(value, connection)
    return value


def insert_message(*, row: InboundMessage) -> bool:
    """Store a new row (setting its pk); False when this delivery is already stored."""
    values = [_prepare(f, getattr(row, f.attname)) for f in _INSERT_FIELDS]
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
    values = [_prepare(_meta.get_field(n), fields[n]) for n in names]
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


_INSTANCE_FIELDS = InstanceConfig._meta.concrete_fields
Converter = Callable[[Any, Any, Any], Any]


@cache
def _instance_reading(vendor: str) -> tuple[str, list[tuple[Field, list[Converter]]]]:
    table = connection.ops.quote_name(InstanceConfig._meta.db_table)
    columns = ", ".join(connection.ops.quote_name(f.column) for f in _INSTANCE_FIELDS)
    converters = [
        (f, connection.ops.get_db_converters(f.get_col(table)) + f.get_db_converters(connection))
        for f in _INSTANCE_FIELDS
    ]
    return f"SELECT {columns} FROM {table} WHERE ", converters


def find_instance(*, name: str | None) -> InstanceConfig | None:
    """The instance of that name, or the default one for None, active or not.

    An inactive instance still authenticates and stores its deliveries (as
    ignored): answering 404 would make Evolution drop them for good.
    """
    select, fields = _instance_reading(connection.vendor)
    sql, params = (select + "is_default", []) if name is None else (select + "name = %s", [name])
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        found = cursor.fetchone()
    if found is None:
        return None
    values = []
    for (field, converters), value in zip(fields, found, strict=True):
        for convert in converters:
            value = convert(value, field, connection)
        values.append(value)
    return InstanceConfig.from_db(connection.alias, [f.attname for f in _INSTANCE_FIELDS], values)


def instance_named_in_evolution(*, evolution_name: str, excluding: int) -> str | None:
    """The name of another tenant whose Evolution instance is called `evolution_name`.

    Only asked for a delivery on the legacy route that is not the default's
    own (a global webhook's), so it is not on the hot path.
    """
    table = connection.ops.quote_name(InstanceConfig._meta.db_table)
    sql = (
        f"SELECT name FROM {table} WHERE id <> %s AND (whatsapp_instance = %s "
        "OR (whatsapp_instance = '' AND name = %s)) ORDER BY name LIMIT 1"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [excluding, evolution_name, evolution_name])
        found = cursor.fetchone()
    return None if found is None else str(found[0])
