"""webhooks/rows.py's own conversions: they must store exactly what the ORM stores."""

from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from django.db import connection
from django.db.models import DateTimeField

from webhooks.models import ConnectionState, InboundMessage
from webhooks.rows import (
    db_datetime,
    take_first_open,
    update_claimed_row,
    update_claimed_row_before_send,
)

pytestmark = pytest.mark.django_db

AWARE = [
    datetime(2026, 12, 3, 14, 16, 46, 692666, tzinfo=UTC),
    # No microseconds: Django's text then has none either.
    datetime(2026, 12, 3, 14, 16, 46, tzinfo=UTC),
    datetime(2026, 3, 1, 23, 59, 59, 1, tzinfo=ZoneInfo("America/Sao_Paulo")),
    datetime(2026, 6, 30, 0, 0, 0, 500000, tzinfo=timezone(timedelta(hours=5, minutes=30))),
]


@pytest.mark.parametrize("value", AWARE)
def test_db_datetime_gives_what_the_field_gives_the_database(value: datetime) -> None:
    assert db_datetime(value) == DateTimeField().get_db_prep_save(value, connection)


def _held_row(instance, message_id: str = "SEND1") -> InboundMessage:
    """A message this test's worker holds (claim token "t")."""
    return InboundMessage.objects.create(
        instance=instance,
        message_id=message_id,
        chat_jid="5511987654321@s.whatsapp.net",
        status="processing",
        claim_token="t",
        content={},
        payload={},
    )


def test_a_time_written_with_db_datetime_is_found_by_the_orm(make_instance) -> None:
    when = AWARE[2]
    row = _held_row(make_instance(), "DT1")

    assert update_claimed_row(pk=row.pk, claim_token="t", fields={"sent_at": when})

    assert InboundMessage.objects.get(sent_at=when).pk == row.pk
    assert InboundMessage.objects.filter(sent_at__gt=when - timedelta(microseconds=1)).exists()


def _note(row: InboundMessage, *, token: str = "t") -> tuple[bool, bool]:
    return update_claimed_row_before_send(
        pk=row.pk,
        claim_token=token,
        fields={"reply_text": "Olá!"},
        instance_id=row.instance_id,
        not_connected=("close", "connecting"),
        text="Olá!",
        started_at=AWARE[0],
    )


def test_a_send_is_noted_with_the_fields_while_no_connection_state_is_known(
    make_instance,
) -> None:
    row = _held_row(make_instance())

    assert _note(row) == (True, True)

    row.refresh_from_db()
    assert (row.reply_text, row.sending_text, row.send_started_at) == ("Olá!", "Olá!", AWARE[0])


def test_a_send_is_not_noted_while_the_number_is_connecting_but_the_fields_are(
    make_instance,
) -> None:
    instance = make_instance()
    ConnectionState.objects.create(instance=instance, state="connecting")
    row = _held_row(instance)

    assert _note(row) == (True, False)

    row.refresh_from_db()
    assert (row.reply_text, row.sending_text, row.send_started_at) == ("Olá!", None, None)


def test_a_send_is_noted_once_the_number_is_open_again(make_instance) -> None:
    instance = make_instance()
    ConnectionState.objects.create(instance=instance, state="open")

    assert _note(_held_row(instance)) == (True, True)


def test_nothing_is_written_for_a_worker_that_lost_the_claim(make_instance) -> None:
    row = _held_row(make_instance())

    assert _note(row, token="another") == (False, False)

    row.refresh_from_db()
    assert (row.reply_text, row.sending_text) == (None, None)


CHAT = "5511987654321@s.whatsapp.net"
NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def _open_row(instance, message_id: str, **fields) -> InboundMessage:
    defaults = {"status": "queued", "content": {"text": message_id}, "payload": {}}
    return InboundMessage.objects.create(
        instance=instance, message_id=message_id, chat_jid=CHAT, **{**defaults, **fields}
    )


def _take(instance) -> InboundMessage | None:
    return take_first_open(
        instance_id=instance.pk,
        chat_jid=CHAT,
        token="new",
        lease=NOW + timedelta(minutes=2),
        now=NOW,
    )


def test_take_first_open_takes_the_chats_first_open_message_as_the_orm_reads_it(
    make_instance,
) -> None:
    instance = make_instance()
    _open_row(instance, "DONE", status="replied")
    first = _open_row(instance, "FIRST", queued_at=NOW - timedelta(seconds=2))
    _open_row(instance, "SECOND", queued_at=NOW - timedelta(seconds=1))

    taken = _take(instance)

    assert taken is not None and taken.pk == first.pk
    stored = InboundMessage.objects.get(pk=first.pk)
    assert (stored.status, stored.claim_token, stored.attempts) == ("processing", "new", 1)
    assert stored.lease_until == NOW + timedelta(minutes=2)
    for field in InboundMessage._meta.concrete_fields:
        assert getattr(taken, field.attname) == getattr(stored, field.attname), field.name


def test_take_first_open_takes_nothing_while_the_first_waits_for_its_retry(
    make_instance,
) -> None:
    instance = make_instance()
    waiting = _open_row(instance, "RETRY", next_attempt_at=NOW + timedelta(seconds=30))
    _open_row(instance, "LATER")

    assert _take(instance) is None

    assert InboundMessage.objects.filter(status="processing").count() == 0
    waiting.refresh_from_db()
    assert waiting.next_attempt_at == NOW + timedelta(seconds=30)


def test_take_first_open_takes_a_message_left_processing_by_a_worker_whose_lease_ran_out(
    make_instance,
) -> None:
    instance = make_instance()
    left = _open_row(
        instance,
        "LEFT",
        status="processing",
        claim_token="old",
        attempts=1,
        next_attempt_at=NOW + timedelta(hours=1),
    )

    taken = _take(instance)

    assert taken is not None and taken.pk == left.pk
    assert (taken.claim_token, taken.attempts) == ("new", 2)


def test_take_first_open_finds_nothing_in_a_chat_with_nothing_open(make_instance) -> None:
    instance = make_instance()
    _open_row(instance, "DONE", status="replied")

    assert _take(instance) is None
