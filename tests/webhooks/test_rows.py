"""webhooks/rows.py's own conversions: they must store exactly what the ORM stores."""

from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from django.db import connection
from django.db.models import DateTimeField

from webhooks.models import InboundMessage
from webhooks.rows import db_datetime, update_claimed_row

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
