"""webhooks/rows.py's own conversions: they must store exactly what the ORM stores."""

from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from django.db import connection
from django.db.models import DateTimeField

from webhooks.models import ConnectionState, InboundMessage
from webhooks.rows import db_datetime, update_claimed_row, update_claimed_row_before_send

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


def test_a_time_written_with_db_datetime_is_found_by_the_orm(make_instance) -> None:
    instance = make_instance()
    when = AWARE[2]
    row = InboundMessage.objects.create(
        instance=instance,
        message_id="DT1",
        chat_jid="5511987654321@s.whatsapp.net",
        status="processing",
        claim_token="t",
        content={},
        payload={},
    )

    assert update_claimed_row(pk=row.pk, claim_token="t", fields={"sent_at": when})

    assert InboundMessage.objects.get(sent_at=when).pk == row.pk
    assert InboundMessage.objects.filter(sent_at__gt=when - timedelta(microseconds=1)).exists()


def _held_row(instance) -> InboundMessage:
    return InboundMessage.objects.create(
        instance=instance,
        message_id="SEND1",
        chat_jid="5511987654321@s.whatsapp.net",
        status="processing",
        claim_token="t",
        content={},
        payload={},
    )


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
