"""Log lines are key=value fields: a value from outside (a message id) cannot forge
a field or a line, in plain logs and in the JSON ones (LOG_FORMAT=json)."""

import json
import logging

import pytest

from omnihub.logging import JsonFormatter, kv, parse_kv
from tests.webhooks.conftest import message_body
from webhooks import step
from webhooks.ingest import record_delivery
from webhooks.models import InboundMessage

FORGED_ID = "ABC status=replied\nmessage instance=other id=XYZ status=failed"


def test_kv_leaves_plain_values_bare():
    assert kv(instance="acme", id="3EB0C767D26A", status="queued") == (
        "instance=acme id=3EB0C767D26A status=queued"
    )


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("a b", '"a b"'),
        ("x status=replied", '"x status=replied"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("line\nbreak", '"line\\nbreak"'),
        ("carriage\rreturn", '"carriage\\rreturn"'),
        ("tab\there", '"tab\\there"'),
        ("back\\slash", '"back\\\\slash"'),
        ("line\u2028separator", '"line\\u2028separator"'),
        ("", '""'),
    ],
)
def test_kv_quotes_a_value_that_could_forge_a_field(value, written):
    line = kv(id=value, status="queued")

    assert line == f"id={written} status=queued"
    assert line.isprintable()
    assert parse_kv(line) == {"id": value, "status": "queued"}


def test_kv_leaves_out_none_and_keeps_non_ascii():
    assert kv(instance="loja-ção", reason=None) == "instance=loja-ção"


@pytest.mark.django_db
def test_a_forged_message_id_cannot_forge_a_field_in_the_ingest_log(make_instance, caplog):
    acme = make_instance()
    caplog.set_level(logging.INFO, logger="webhooks.ingest")

    record_delivery(instance=acme, body=message_body(message_id=FORGED_ID))

    (record,) = [r for r in caplog.records if r.getMessage().startswith("message ")]
    line = record.getMessage()
    assert "\n" not in line
    assert parse_kv(line) == {"instance": "acme", "id": FORGED_ID, "status": "queued"}
    assert InboundMessage.objects.get().message_id == FORGED_ID


@pytest.mark.django_db
def test_a_forged_message_id_cannot_forge_a_field_in_the_processing_log(make_instance, caplog):
    message = InboundMessage(instance=make_instance(), message_id=FORGED_ID)
    caplog.set_level(logging.INFO, logger="webhooks.processing")

    step.log_message(message, "failed", error="agent said: no=yes")

    line = caplog.records[-1].getMessage()
    assert "\n" not in line
    assert parse_kv(line) == {
        "instance": "acme",
        "id": FORGED_ID,
        "status": "failed",
        "error": "agent said: no=yes",
    }


def test_json_logs_lift_quoted_fields_whole():
    record = logging.LogRecord(
        "webhooks.ingest", logging.INFO, __file__, 1, "message %s", (kv(id=FORGED_ID),), None
    )

    line = json.loads(JsonFormatter().format(record))

    assert line["id"] == FORGED_ID
    assert "status" not in line
