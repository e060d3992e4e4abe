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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connection, connections
from django.db.models import DateTimeField, Field, JSONField
from django.utils import timezone

from instances.models import InstanceConfig, Route
from webhooks import statements
from webhooks.models import (
    ConnectionState,
    Conversation,
    InboundMessage,
    OutboundMessage,
    OutboundStatus,
    Status,
    paused_at,
)

_meta = InboundMessage._meta
# Any DateTimeField: their conversion to the database does not depend on the field.
_DATETIME = _meta.get_field("received_at")
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


def _prepare(field: Field, value: Any, db: Any = connection) -> Any:
    # Only dates and JSON change on the way to the database; the other fields
    # (text, numbers, booleans, the instance's id) hold their stored value already.
    # None is NULL for both (JSONField's get_db_prep_save says so too).
    if value is None or not _converts(field):
        return value
    if isinstance(field, DateTimeField):
        return db_datetime(value)
    return field.get_db_prep_save(value, db)


def db_datetime(value: datetime, db: Any = None) -> Any:
    """A datetime as DateTimeField.get_db_prep_save gives it to the database.

    On SQLite with USE_TZ that is the UTC time as text, which this builds
    directly: Django's path (the field's prep, the backend's adaptation, its
    connection's time zone read through the `connection` proxy) was 3-5 µs a
    value, and a message's writes convert a dozen. Elsewhere, Django's own.
    """
    db = connections[DEFAULT_DB_ALIAS] if db is None else db
    if value.tzinfo is not None and db.vendor == "sqlite" and _sqlite_stores_utc(db):
        return str(value.astimezone(UTC).replace(tzinfo=None))
    return _DATETIME.get_db_prep_save(value, db)


def _sqlite_stores_utc(db: Any) -> bool:
    # As DatabaseOperations.adapt_datetimefield_value: aware values are made
    # naive in the connection's time zone (UTC unless DATABASES sets TIME_ZONE).
    return settings.USE_TZ and db.timezone is UTC


def _converts(field: Field) -> bool:
    return isinstance(field, DateTimeField | JSONField)


# Each inserted column's attribute, and the field when its value needs converting.
_INSERT_PLAN = [
    (f.attname, f if _converts(f) else None) for f in _INSERT_FIELDS
]


def insert_message(*, row: InboundMessage) -> bool:
    """Store a new row (setting its pk); False when this delivery is already stored."""
    # The connection itself, looked up once: each attribute read through the
    # `connection` proxy is a context-local lookup, a dozen per row.
    db = connections[DEFAULT_DB_ALIAS]
    # Its times are mostly the same `now`: converted once.
    times: dict[datetime, Any] = {}
    values = []
    fields = row.__dict__
    for attname, field in _INSERT_PLAN:
        value = fields[attname]
        if field is not None and value is not None:
            if isinstance(value, datetime):
                if value not in times:
                    times[value] = db_datetime(value, db)
                value = times[value]
            else:
                value = field.get_db_prep_save(value, db)
        values.append(value)
    found = statements.run(_insert_sql(), values).fetchone()
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
    if not fields:
        # Only asks whether the claim still holds.
        fields = {"claim_token": claim_token}
    names = tuple(sorted(fields))
    values = [_prepare(_meta.get_field(n), fields[n]) for n in names]
    ran = statements.run(_update_sql(names), [*values, pk, claim_token, Status.PROCESSING.value])
    return ran.rowcount == 1


@cache
def _update_before_send_sql(names: tuple[str, ...], states: int) -> str:
    q = connection.ops.quote_name
    state = ConnectionState._meta
    marks = ", ".join(["%s"] * states)
    not_connected = (
        f"EXISTS (SELECT 1 FROM {q(state.db_table)} WHERE "
        f"{q(state.get_field('instance').column)} = %s "
        f"AND {q(state.get_field('state').column)} IN ({marks}))"
    )
    assignments = "".join(f"{_column(name)} = %s, " for name in names)
    return (
        f"UPDATE {_table()} SET {assignments}"
        f"{_column('sending_text')} = CASE WHEN {not_connected} THEN NULL ELSE %s END, "
        f"{_column('send_started_at')} = CASE WHEN {not_connected} THEN NULL ELSE %s END "
        f"WHERE id = %s AND {_column('claim_token')} = %s AND {_column('status')} = %s "
        # The column itself: SQLite 3.40 evaluated `sending_text IS NOT NULL` in this
        # RETURNING as true for a NULL it had just written.
        f"RETURNING {_column('sending_text')}"
    )


def update_claimed_row_before_send(
    *,
    pk: int,
    claim_token: str,
    fields: dict[str, Any],
    instance_id: int,
    not_connected: Sequence[str],
    text: str,
    started_at: datetime,
) -> tuple[bool, bool]:
    """Write fields to a row this worker holds and note the send about to start,
    unless the instance's last connection.update left it in one of
    `not_connected` (none received yet: noted, so the send is tried).

    One statement: it stands between the agent's answer and its sendText, where
    a separate read of the connection state cost one more. Returns (whether the
    claim still held, whether the send was noted and may go).
    """
    names = tuple(sorted(n for n in fields if n not in ("sending_text", "send_started_at")))
    values = [_prepare(_meta.get_field(n), fields[n]) for n in names]
    check = [instance_id, *not_connected]
    params = [
        *values,
        *check,
        text,
        *check,
        db_datetime(started_at),
        pk,
        claim_token,
        Status.PROCESSING.value,
    ]
    found = statements.run(_update_before_send_sql(names, len(not_connected)), params).fetchone()
    if found is None:
        return False, False
    return True, found[0] is not None


_INSTANCE_FIELDS = InstanceConfig._meta.concrete_fields
Converter = Callable[[Any, Any, Any], Any]


@cache
def _instance_reading(vendor: str) -> tuple[str, list[tuple[Field, list[Converter]]]]:
    q = connection.ops.quote_name
    table = q(InstanceConfig._meta.db_table)
    columns = ", ".join(f"{table}.{q(f.column)}" for f in _INSTANCE_FIELDS)
    converters = [
        (f, connection.ops.get_db_converters(f.get_col(table)) + f.get_db_converters(connection))
        for f in _INSTANCE_FIELDS
    ]
    if vendor == "sqlite":
        # Whether it has routing rules, in the same statement: on SQLite the webhook
        # hands the chat to its worker with this instance (ingest.can_claim_on_insert),
        # which reads the rules only then (an index lookup on instances_route_order).
        # Elsewhere the worker's claim says it; each delivery pays nothing for it.
        routes = Route._meta
        columns += (
            f", EXISTS (SELECT 1 FROM {q(routes.db_table)} WHERE "
            f"{q(routes.get_field('instance').column)} = {table}.{q('id')})"
        )
    return f"SELECT {columns} FROM {table} WHERE ", converters


def find_instance(*, name: str | None) -> InstanceConfig | None:
    """The instance of that name, or the default one for None, active or not.

    An inactive instance still authenticates and stores its deliveries (as
    ignored): answering 404 would make Evolution drop them for good.
    """
    select, fields = _instance_reading(connection.vendor)
    sql, params = (select + "is_default", []) if name is None else (select + "name = %s", [name])
    found = statements.run(sql, params).fetchone()
    if found is None:
        return None
    values = _convert(fields, found[: len(fields)])
    instance = InstanceConfig.from_stored(connection.alias, values)
    if len(found) > len(fields):
        instance.has_routes = bool(found[-1])
    return instance


# --- a held chat's open messages, taken by its worker --------------------------
# The claim and take_more_or_settle read and lease these for every message a
# worker takes; through the ORM each of the three statements cost more CPU to
# compile than to run (about 4 ms of database-thread time per message on SQLite).


@cache
def _open_reading(vendor: str) -> tuple[str, list[tuple[Field, list[Converter]]]]:
    table = _table()
    fields = _meta.concrete_fields
    columns = ", ".join(connection.ops.quote_name(f.column) for f in fields)
    converters = [
        (f, connection.ops.get_db_converters(f.get_col(table)) + f.get_db_converters(connection))
        for f in fields
    ]
    return f"SELECT {columns} FROM {table} {_chat_open_in_order()}", converters


def _chat_open_in_order() -> str:
    """A chat's open messages (instance, chat, queued, processing as parameters), in
    the order they are handled: a retried message after what was open (the ones
    queued before queued_at existed first); webhooks_chat_open finds them."""
    return (
        f"WHERE {_column('instance')} = %s AND {_column('chat_jid')} = %s "
        f"AND {_column('status')} IN (%s, %s) "
        f"ORDER BY {_column('queued_at')} ASC NULLS FIRST, id ASC"
    )


def open_messages(*, instance_id: int, chat_jid: str) -> list[InboundMessage]:
    """The chat's queued and processing messages, in the order they are handled."""
    sql, reading = _open_reading(connection.vendor)
    params = [instance_id, chat_jid, Status.QUEUED.value, Status.PROCESSING.value]
    found = statements.run(sql, params).fetchall()
    names = [f.attname for f, _ in reading]
    return [
        InboundMessage.from_db(connection.alias, names, _convert(reading, row)) for row in found
    ]


@cache
def _take_first_sql(vendor: str) -> str:
    table = _table()
    columns = ", ".join(connection.ops.quote_name(f.column) for f, _ in _open_reading(vendor)[1])
    status = _column("status")
    # Due: not waiting for a retry (found `processing`: its worker's lease on
    # the chat ran out).
    due = (
        f"({status} = %s OR {_column('next_attempt_at')} IS NULL "
        f"OR {_column('next_attempt_at')} <= %s)"
    )
    return (
        f"UPDATE {table} SET {status} = %s, {_column('claim_token')} = %s, "
        f"{_column('lease_until')} = %s, {_column('attempts')} = {_column('attempts')} + 1 "
        f"WHERE id = (SELECT id FROM {table} {_chat_open_in_order()} LIMIT 1) AND {due} "
        f"RETURNING {columns}"
    )


def take_first_open(
    *, instance_id: int, chat_jid: str, token: str, lease: datetime, now: datetime
) -> InboundMessage | None:
    """Take a held chat's first open message if it is due, in one statement (what
    open_messages and take_messages do for a chat without debounce); None when
    it has none or the first waits for a retry."""
    processing = Status.PROCESSING.value
    params = [
        processing,
        token,
        db_datetime(lease),
        instance_id,
        chat_jid,
        Status.QUEUED.value,
        processing,
        processing,
        db_datetime(now),
    ]
    found = statements.run(_take_first_sql(connection.vendor), params).fetchone()
    if found is None:
        return None
    reading = _open_reading(connection.vendor)[1]
    names = [f.attname for f, _ in reading]
    return InboundMessage.from_db(connection.alias, names, _convert(reading, found))


def take_messages(*, pks: Sequence[int], token: str, lease: datetime) -> None:
    """Mark messages as being handled under this claim, until `lease`."""
    if not pks:
        return
    marks = ", ".join(["%s"] * len(pks))
    sql = (
        f"UPDATE {_table()} SET {_column('status')} = %s, {_column('claim_token')} = %s, "
        f"{_column('lease_until')} = %s, {_column('attempts')} = {_column('attempts')} + 1 "
        f"WHERE id IN ({marks})"
    )
    statements.run(sql, [Status.PROCESSING.value, token, db_datetime(lease), *pks])


@cache
def _lease_sql(held_only: bool) -> str:
    c = _conv_column
    if held_only:
        return (
            f"UPDATE {_conv_table()} SET {c('due_at')} = %s "
            f"WHERE id = %s AND {c('claim_token')} = %s"
        )
    return (
        f"UPDATE {_conv_table()} SET {c('claim_token')} = %s, {c('due_at')} = %s, "
        f"{c('due_limit')} = NULL WHERE id = %s"
    )


def any_conversation_due(*, now: datetime) -> bool:
    """Whether any chat is due (or its lease ran out): one look at webhooks_conversation_due."""
    sql = f"SELECT 1 FROM {_conv_table()} WHERE {_conv_column('due_at')} <= %s LIMIT 1"
    return statements.run(sql, [db_datetime(now)]).fetchone() is not None


def lease_conversation(*, conversation_id: int, token: str, lease: datetime) -> None:
    """Hold a claimed chat with this token until `lease`."""
    statements.run(_lease_sql(False), [token, db_datetime(lease), conversation_id])


def renew_conversation_lease(*, conversation_id: int, token: str, lease: datetime) -> None:
    """Move a held chat's lease to `lease`, if this token still holds it."""
    statements.run(_lease_sql(True), [db_datetime(lease), conversation_id, token])


# --- conversations: the chat's row, touched by every queued message -------------
_conv = Conversation._meta
_CONV_STATE = (
    "id",
    "pause_reason",
    "paused_until",
    "session_epoch",
    "claim_token",
    "due_at",
    "bound_agent",
)


def _conv_table() -> str:
    return connection.ops.quote_name(_conv.db_table)


def _conv_column(name: str) -> str:
    return connection.ops.quote_name(_conv.get_field(name).column)


@cache
def _conv_state_reading(vendor: str) -> list[tuple[Field, list[Converter]]]:
    table = _conv_table()
    fields = [_conv.get_field(name) for name in _CONV_STATE]
    return [
        (f, connection.ops.get_db_converters(f.get_col(table)) + f.get_db_converters(connection))
        for f in fields
    ]


def _convert(reading: list[tuple[Field, list[Converter]]], found: Sequence[Any]) -> list[Any]:
    values = []
    for (field, converters), value in zip(reading, found, strict=True):
        for convert in converters:
            value = convert(value, field, connection)
        values.append(value)
    return values


@cache
def _touch_sql(vendor: str, queue: bool, debounced: bool, claim: bool) -> str:
    """One statement: the chat's row created or its activity noted and, for a
    queued message, its due time, or its claim for this process's worker.

    SET expressions read the row as it was, so every CASE below sees the old
    claim and pause. Named parameters: several appear more than once.
    """
    t, c = _conv_table(), _conv_column
    least, greatest = ("MIN", "MAX") if vendor == "sqlite" else ("LEAST", "GREATEST")
    columns = (
        "instance",
        "chat_jid",
        "phone",
        "push_name",
        "is_group",
        "pause_reason",
        "session_epoch",
        "last_message_at",
        "claim_token",
        "created_at",
        "due_at",
        "due_limit",
    )
    names = ", ".join(c(name) for name in columns)
    returning = ", ".join(c(name) for name in _CONV_STATE)
    # The chats of this tenant held by a worker now (partial index webhooks_conversation_held).
    room = (
        f"(SELECT COUNT(*) FROM {t} AS held WHERE held.{c('instance')} = %(instance)s "
        f"AND NOT (held.{c('claim_token')} = '') AND held.{c('due_at')} > %(now)s) "
        "< %(max_concurrent)s"
    )
    paused = (
        f"({t}.{c('pause_reason')} <> '' AND ({t}.{c('paused_until')} IS NULL "
        f"OR {t}.{c('paused_until')} > %(now)s))"
    )
    # Without a claim asked for, none of it is in the statement (SQLite would
    # still count the held chats).
    claimable = (
        f"({t}.{c('claim_token')} = '' AND {t}.{c('due_at')} IS NULL AND NOT {paused} AND {room})"
        if claim
        else "FALSE"
    )
    due = f"{greatest}(COALESCE({t}.{c('due_at')}, %(due)s), %(due)s)"
    if debounced:
        due = f"{least}({due}, COALESCE({t}.{c('due_limit')}, %(limit)s))"
    if queue:
        new_claim = f"CASE WHEN {room} THEN %(token)s ELSE '' END" if claim else "''"
        new_due = f"CASE WHEN {room} THEN %(lease)s ELSE %(due)s END" if claim else "%(due)s"
        new_limit = "%(limit)s"
        queued = (
            f", {c('claim_token')} = CASE WHEN {claimable} THEN %(token)s "
            f"ELSE {t}.{c('claim_token')} END, "
            f"{c('due_at')} = CASE WHEN {claimable} THEN %(lease)s "
            # A held chat's holder finds the message when it lets the chat go.
            f"WHEN {t}.{c('claim_token')} <> '' OR {paused} THEN {t}.{c('due_at')} "
            f"ELSE {due} END, "
            f"{c('due_limit')} = CASE WHEN {claimable} OR {t}.{c('claim_token')} <> '' "
            f"OR {paused} THEN {t}.{c('due_limit')} "
            f"ELSE COALESCE({t}.{c('due_limit')}, %(limit)s) END "
        )
    else:
        new_claim, new_due, new_limit, queued = "''", "NULL", "NULL", " "
    return (
        f"INSERT INTO {t} ({names}) VALUES (%(instance)s, %(chat_jid)s, %(phone)s, "
        f"%(push_name)s, %(is_group)s, '', 1, %(now)s, {new_claim}, %(now)s, {new_due}, "
        f"{new_limit}) "
        f"ON CONFLICT ({c('instance')}, {c('chat_jid')}) DO UPDATE SET "
        f"{c('phone')} = CASE WHEN excluded.{c('phone')} <> '' "
        f"THEN excluded.{c('phone')} ELSE {t}.{c('phone')} END, "
        f"{c('push_name')} = CASE WHEN excluded.{c('push_name')} <> '' "
        f"THEN excluded.{c('push_name')} ELSE {t}.{c('push_name')} END, "
        # An idle chat's next user message starts a new agent session.
        f"{c('session_epoch')} = CASE WHEN %(idle)s AND {t}.{c('last_message_at')} < %(cutoff)s "
        f"THEN {t}.{c('session_epoch')} + 1 ELSE {t}.{c('session_epoch')} END, "
        # ...and ends its binding to a routed agent (webhooks/routing.py).
        f"{c('bound_agent')} = CASE WHEN %(idle)s AND {t}.{c('last_message_at')} < %(cutoff)s "
        f"THEN NULL ELSE {t}.{c('bound_agent')} END, "
        f"{c('last_message_at')} = excluded.{c('last_message_at')}"
        f"{queued}"
        f"RETURNING {returning}"
    )


@dataclass(frozen=True)
class Queueing:
    """For a message that will be queued: when its chat is due, or its claim."""

    due: datetime
    limit: datetime | None
    # Set: take the chat for this process's worker when nothing is open in it.
    token: str = ""
    lease_until: datetime | None = None
    max_concurrent: int = 0


@dataclass(frozen=True)
class ChatState:
    """A conversation's state as the message that just touched it found it."""

    id: int
    pause_reason: str
    paused_until: datetime | None
    session_epoch: int
    claim_token: str
    due_at: datetime | None
    bound_agent_id: int | None

    def paused_now(self, *, now: datetime) -> bool:
        return paused_at(pause_reason=self.pause_reason, paused_until=self.paused_until, now=now)


def touch_conversation(
    *,
    instance_id: int,
    chat_jid: str,
    phone: str,
    push_name: str,
    is_group: bool,
    now: datetime,
    idle_cutoff: datetime | None,
    queueing: Queueing | None = None,
) -> ChatState:
    """Create the chat's conversation or note its activity; its state after that.

    With `idle_cutoff`, a conversation quiet since before it starts a new
    session. With `queueing`, the chat is made due (unless a worker holds it or
    it is paused), or claimed with `queueing.token` when that is given, nothing
    is open in it and its tenant has room: the returned claim_token says which.
    """
    q = queueing
    stamp = db_datetime(now)
    params: dict[str, Any] = {
        "instance": instance_id,
        "chat_jid": chat_jid,
        "phone": phone,
        "push_name": push_name,
        "is_group": is_group,
        "now": stamp,
        "idle": idle_cutoff is not None,
        "cutoff": db_datetime(idle_cutoff) if idle_cutoff else stamp,
    }
    if q is not None:
        # Without debounce the chat is due now: that time is converted once.
        due = stamp if q.due == now else db_datetime(q.due)
        params.update(
            due=due,
            limit=db_datetime(q.limit) if q.limit else None,
            token=q.token,
            lease=db_datetime(q.lease_until) if q.lease_until else due,
            max_concurrent=q.max_concurrent,
        )
    sql = _touch_sql(
        connection.vendor,
        q is not None,
        q is not None and q.limit is not None,
        q is not None and bool(q.token),
    )
    found = statements.run(sql, params).fetchone()
    return ChatState(*_convert(_conv_state_reading(connection.vendor), found))


@cache
def _release_idle_sql() -> str:
    c = _conv_column
    return (
        f"UPDATE {_conv_table()} SET {c('claim_token')} = '', {c('due_at')} = NULL "
        f"WHERE id = %s AND {c('claim_token')} = %s"
    )


def unclaim_conversation(*, conversation_id: int, token: str) -> None:
    """Undo a claim made as a message was stored (it turned out to be a repeat)."""
    statements.run(_release_idle_sql(), [conversation_id, token])


# --- the hub's own messages -----------------------------------------------------
_out = OutboundMessage._meta


@cache
def _own_sql() -> str:
    q = connection.ops.quote_name
    t = q(_out.db_table)
    col = {
        name: q(_out.get_field(name).column)
        for name in ("instance", "chat_jid", "text", "evolution_id", "status")
    }
    # A reply part in flight is noted on its message (sending_text); the chat's
    # open messages are found with webhooks_chat_open.
    in_flight = (
        f"SELECT 1 FROM {_table()} WHERE {_column('instance')} = %s "
        f"AND {_column('chat_jid')} = %s AND {_column('status')} IN (%s, %s) "
        f"AND {_column('sending_text')} = %s"
    )
    return (
        f"SELECT 1 FROM {t} WHERE {col['instance']} = %s AND ({col['evolution_id']} = %s "
        # An echo may arrive before sendText has answered with the id (or after
        # it timed out): then the chat's unconfirmed send with the same text.
        f"OR ({col['chat_jid']} = %s AND {col['status']} IN (%s, %s, %s) "
        f"AND {col['evolution_id']} = '' AND {col['text']} = %s)) "
        f"UNION ALL {in_flight} LIMIT 1"
    )


def is_own_message(*, instance_id: int, chat_jid: str, message_id: str, text: str) -> bool:
    """Whether a fromMe message is the echo of one the hub sent or is sending."""
    params = [
        instance_id,
        message_id,
        chat_jid,
        OutboundStatus.SENDING.value,
        OutboundStatus.FAILED.value,
        OutboundStatus.UNCONFIRMED.value,
        text,
        instance_id,
        chat_jid,
        Status.QUEUED.value,
        Status.PROCESSING.value,
        text,
    ]
    return statements.run(_own_sql(), params).fetchone() is not None


@dataclass(frozen=True)
class EarlierAttempt:
    """A send of this reply that may have reached Evolution: a row left `sending`
    (its worker died) or `unconfirmed` (no answer came back)."""

    outbound_id: int
    started_at: datetime
    evolution_id: str
    status: str


def earlier_attempt(*, message_pk: int) -> EarlierAttempt | None:
    """The first such attempt of the message's reply, if any.

    A send the message still notes as in flight (its worker died mid-send) is
    recorded first, as a row left `sending`. Asked only for a message handled
    again (not on the common path), so the ORM's cost does not matter here.
    """
    cut = (
        InboundMessage.objects.filter(pk=message_pk, sending_text__isnull=False)
        .values_list("instance_id", "chat_jid", "sending_text", "send_started_at")
        .first()
    )
    if cut is not None:
        instance_id, chat_jid, text, started_at = cut
        # Dated when the attempt started: Evolution is asked about the messages around it.
        record_send(
            instance_id=instance_id,
            chat_jid=chat_jid,
            text=text,
            in_reply_to=message_pk,
            started_at=started_at or timezone.now(),
            status=OutboundStatus.SENDING,
            evolution_id="",
            error="",
        )
        InboundMessage.objects.filter(pk=message_pk).update(sending_text=None, send_started_at=None)
    found = (
        OutboundMessage.objects.filter(
            in_reply_to_id=message_pk,
            status__in=(OutboundStatus.SENDING, OutboundStatus.UNCONFIRMED),
        )
        .order_by("id")
        .values_list("id", "created_at", "evolution_id", "status")
        .first()
    )
    return None if found is None else EarlierAttempt(*found)


def sent_reply_count(*, message_pk: int) -> int:
    """How many messages of this reply went out (a reply sent in parts, handled
    again after one of them failed)."""
    # Delivered and read (messages.update) were sent too.
    return OutboundMessage.objects.filter(
        in_reply_to_id=message_pk,
        status__in=(OutboundStatus.SENT, OutboundStatus.DELIVERED, OutboundStatus.READ),
    ).count()


def recorded_ids(*, instance_id: int, evolution_ids: list[str], excluding: int) -> set[str]:
    """Which of these Evolution ids are other messages the hub sent, already recorded
    (a reply's or an outbox send's check before it goes again)."""
    return set(
        OutboundMessage.objects.filter(instance_id=instance_id, evolution_id__in=evolution_ids)
        .exclude(pk=excluding)
        .values_list("evolution_id", flat=True)
    )


def hub_sent(*, instance_id: int, message_id: str) -> bool:
    """Whether the hub sent the message with this Evolution id (a quote of it)."""
    return OutboundMessage.objects.filter(instance_id=instance_id, evolution_id=message_id).exists()


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


@cache
def _let_go_sql() -> str:
    t, c = _conv_table(), _conv_column
    # The chat's open messages are found with webhooks_chat_open.
    return (
        f"UPDATE {t} SET {c('claim_token')} = '', {c('due_at')} = NULL, "
        f"{c('due_limit')} = NULL WHERE id = %s AND {c('claim_token')} = %s "
        f"AND NOT EXISTS (SELECT 1 FROM {_table()} WHERE {_column('instance')} = %s "
        f"AND {_column('chat_jid')} = %s AND {_column('status')} IN (%s, %s))"
    )


def holds_conversation(*, conversation_id: int, token: str) -> bool:
    """Whether this claim still holds the chat (its row locked on PostgreSQL)."""
    lock = "" if connection.vendor == "sqlite" else " FOR UPDATE"
    sql = f"SELECT 1 FROM {_conv_table()} WHERE id = %s AND {_conv_column('claim_token')} = %s"
    return statements.run(sql + lock, [conversation_id, token]).fetchone() is not None


def let_go_if_done(*, conversation_id: int, token: str, instance_id: int, chat_jid: str) -> bool:
    """Release a held chat that has nothing open, in one statement; False otherwise
    (it has open messages, or this worker no longer holds it)."""
    params = [
        conversation_id,
        token,
        instance_id,
        chat_jid,
        Status.QUEUED.value,
        Status.PROCESSING.value,
    ]
    # On PostgreSQL a webhook storing a message of this chat holds the row's lock
    # (it touched the conversation first): wait for it, so that the check below,
    # a statement of its own, sees that message. On SQLite every write
    # transaction runs alone.
    locked = connection.vendor == "sqlite" or holds_conversation(
        conversation_id=conversation_id, token=token
    )
    if not locked:
        return False
    return statements.run(_let_go_sql(), params).rowcount == 1


@cache
def _record_send_sql() -> str:
    q = connection.ops.quote_name
    columns = (
        "instance",
        "chat_jid",
        "text",
        "in_reply_to",
        "evolution_id",
        "status",
        "error",
        "created_at",
        "sent_at",
    )
    names = ", ".join(q(_out.get_field(name).column) for name in columns)
    marks = ", ".join(["%s"] * len(columns))
    return f"INSERT INTO {q(_out.db_table)} ({names}) VALUES ({marks})"


def record_send(
    *,
    instance_id: int,
    chat_jid: str,
    text: str,
    in_reply_to: int,
    started_at: datetime,
    status: OutboundStatus,
    evolution_id: str,
    error: str,
) -> None:
    """A reply part's send, with its outcome: the row is written once it is known
    (the message's sending_text stood for it meanwhile). Its created_at is when
    the send started."""
    db = connections[DEFAULT_DB_ALIAS]
    sent_at = timezone.now() if status == OutboundStatus.SENT else None
    params = [
        instance_id,
        chat_jid,
        text,
        in_reply_to,
        evolution_id[:128],
        status.value,
        error,
        db_datetime(started_at, db),
        None if sent_at is None else db_datetime(sent_at, db),
    ]
    statements.run(_record_send_sql(), params)


@cache
def _outbound_update_sql() -> str:
    q = connection.ops.quote_name
    col = {n: q(_out.get_field(n).column) for n in ("status", "evolution_id", "error", "sent_at")}
    return (
        f"UPDATE {q(_out.db_table)} SET {col['status']} = %s, {col['evolution_id']} = %s, "
        f"{col['error']} = %s, {col['sent_at']} = %s WHERE id = %s"
    )


def finish_outbound(
    *, outbound_id: int, status: OutboundStatus, evolution_id: str, error: str
) -> None:
    sent_at = timezone.now() if status == OutboundStatus.SENT else None
    params = [
        status.value,
        evolution_id[:128],
        error,
        None if sent_at is None else db_datetime(sent_at),
        outbound_id,
    ]
    statements.run(_outbound_update_sql(), params)
