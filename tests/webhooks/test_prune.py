from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from instances.models import InstanceConfig
from tests.webhooks.test_admin_messages import add_message
from webhooks.models import InboundMessage, Status


def run(*args: str) -> str:
    out = StringIO()
    call_command("prune_messages", *args, stdout=out)
    return out.getvalue()


def days_ago(days: float):
    return timezone.now() - timedelta(days=days)


def remaining() -> set[int]:
    return set(InboundMessage.objects.values_list("pk", flat=True))


@pytest.fixture
def acme(make_instance) -> InstanceConfig:
    return make_instance()


def test_it_deletes_finished_messages_older_than_the_given_days(acme):
    old = [
        add_message(acme, status=status, received_at=days_ago(11))
        for status in (Status.REPLIED, Status.IGNORED, Status.FAILED)
    ]
    recent = add_message(acme, status=Status.REPLIED, received_at=days_ago(9))

    output = run("--older-than", "10")

    assert output == "Deleted 3 messages received more than 10 days ago.\n"
    assert remaining() == {recent.pk}
    assert not InboundMessage.objects.filter(pk__in=[m.pk for m in old]).exists()


def test_it_never_deletes_queued_or_processing_messages(acme):
    open_messages = {
        add_message(acme, status=Status.QUEUED, received_at=days_ago(100)).pk,
        add_message(acme, status=Status.PROCESSING, received_at=days_ago(100)).pk,
    }

    output = run("--older-than", "1")

    assert output == "Deleted 0 messages received more than 1 day ago.\n"
    assert remaining() == open_messages


def test_the_default_age_is_message_retention_days(acme):
    at_31 = add_message(acme, received_at=days_ago(31))
    at_29 = add_message(acme, received_at=days_ago(29))
    at_8 = add_message(acme, received_at=days_ago(8))

    assert run() == "Deleted 1 message received more than 30 days ago.\n"
    assert remaining() == {at_29.pk, at_8.pk}
    with override_settings(MESSAGE_RETENTION_DAYS=7):
        assert run() == "Deleted 2 messages received more than 7 days ago.\n"
    assert not InboundMessage.objects.filter(pk=at_31.pk).exists()
    assert remaining() == set()


def test_a_dry_run_counts_by_status_and_deletes_nothing(acme):
    add_message(acme, status=Status.REPLIED, received_at=days_ago(40))
    add_message(acme, status=Status.REPLIED, received_at=days_ago(40))
    add_message(acme, status=Status.FAILED, received_at=days_ago(40))
    add_message(acme, status=Status.QUEUED, received_at=days_ago(40))
    add_message(acme, status=Status.IGNORED, received_at=days_ago(1))

    output = run("--older-than", "30", "--dry-run")

    assert output.startswith("Would delete 3 messages received before ")
    assert output.endswith("(older than 30 days): failed 1, replied 2.\n")
    assert len(remaining()) == 5


def test_a_dry_run_with_nothing_to_delete_says_so(acme):
    add_message(acme, received_at=days_ago(1))

    output = run("--dry-run")

    assert output.startswith("Would delete 0 messages received before ")
    assert output.endswith("(older than 30 days).\n")


def test_it_deletes_in_chunks(acme):
    for _ in range(7):
        add_message(acme, received_at=days_ago(50))
    kept = add_message(acme, status=Status.QUEUED, received_at=days_ago(50))

    with CaptureQueriesContext(connection) as queries:
        output = run("--older-than", "30", "--chunk-size", "3")

    deletes = [q["sql"] for q in queries if q["sql"].startswith("DELETE")]
    assert len(deletes) == 3  # 3 + 3 + 1
    assert output == "Deleted 7 messages received more than 30 days ago.\n"
    assert remaining() == {kept.pk}


@pytest.mark.parametrize("args", [["--older-than", "-1"], ["--chunk-size", "0"]])
def test_it_refuses_a_negative_age_or_an_empty_chunk(acme, args):
    add_message(acme, received_at=days_ago(100))

    with pytest.raises(CommandError):
        run(*args)

    assert len(remaining()) == 1
