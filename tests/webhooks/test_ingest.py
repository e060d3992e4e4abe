"""Recording deliveries: what is stored, as what, and what is only answered."""

import json
from typing import Any

import pytest
from django.db import connection

from tests.conftest import load_fixture
from tests.webhooks.conftest import message_body
from webhooks.ingest import Outcome, Result, accept_delivery, record_delivery
from webhooks.models import ConnectionState, Conversation, InboundMessage, Status

pytestmark = pytest.mark.django_db

CONNECTION_FIXTURES = [
    "connection-update-close.json",
    "connection-update-connecting.json",
    "connection-update-refused.json",
    "connection-update-open.json",
]


def test_twenty_connection_updates_leave_one_row_with_the_last_state(make_instance) -> None:
    acme = make_instance()
    names = [CONNECTION_FIXTURES[i % 4] for i in range(20)]
    assert names[-1] == "connection-update-open.json"

    results = [record_delivery(instance=acme, body=load_fixture(name)) for name in names]

    assert {result.outcome for result in results} == {Outcome.IGNORED}
    state = ConnectionState.objects.get()
    assert (state.instance, state.state, state.status_reason) == (acme, "open", 200)
    assert not InboundMessage.objects.exists()


def test_each_instance_keeps_its_own_connection_state(make_instance) -> None:
    acme = make_instance()
    other = make_instance(name="other")

    record_delivery(instance=acme, body=load_fixture("connection-update-open.json"))
    record_delivery(instance=other, body=load_fixture("connection-update-close.json"))

    assert ConnectionState.objects.get(instance=acme).state == "open"
    assert ConnectionState.objects.get(instance=other).state == "close"


def test_a_connection_update_without_a_state_is_ignored(make_instance) -> None:
    body = load_fixture("connection-update-open.json")
    del body["data"]["state"]

    result = record_delivery(instance=make_instance(), body=body)

    assert result.outcome is Outcome.IGNORED
    assert "data.state is missing" in result.detail
    assert not ConnectionState.objects.exists()


@pytest.mark.parametrize(
    "name",
    [
        "presence-update.json",
        "messages-delete.json",
        "messages-edited.json",
        "contacts-update.json",
        "chats-upsert.json",
        "qrcode-updated.json",
        "send-message.json",
    ],
)
def test_other_events_are_ignored_and_not_stored(make_instance, name: str) -> None:
    body = load_fixture(name)

    result = record_delivery(instance=make_instance(), body=body)

    assert result.outcome is Outcome.IGNORED
    assert result.detail.startswith("event ") and result.detail.endswith(" is not handled")
    assert not InboundMessage.objects.exists()
    assert not ConnectionState.objects.exists()


def test_a_body_without_an_event_is_ignored(make_instance) -> None:
    result = record_delivery(instance=make_instance(), body={"data": {}})

    assert result.outcome is Outcome.IGNORED
    assert result.detail == "event (none) is not handled"


@pytest.mark.parametrize(
    "data",
    [None, {}, {"key": {"remoteJid": "5511987654321@s.whatsapp.net"}}, {"key": {"id": "X1"}}],
    ids=["no-data", "no-key", "no-id", "no-remote-jid"],
)
def test_an_unusable_message_is_ignored_and_not_stored(make_instance, data) -> None:
    result = record_delivery(
        instance=make_instance(), body={"event": "messages.upsert", "data": data}
    )

    assert result.outcome is Outcome.IGNORED
    assert result.detail.startswith("not a usable message: ")
    assert not InboundMessage.objects.exists()


def test_a_stale_message_is_stored_as_ignored(make_instance) -> None:
    body = load_fixture("messages-upsert-text.json", fresh=False)

    result = record_delivery(instance=make_instance(), body=body)

    assert (result.outcome, result.detail) == (Outcome.IGNORED, "stale")
    row = InboundMessage.objects.get()
    assert (row.status, row.ignore_reason) == (Status.IGNORED, "stale")
    assert row.next_attempt_at is None
    assert row.finished_at is not None


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        # Written on the business's phone: a human takes the chat over.
        ("messages-upsert-fromme.json", "human takeover"),
        ("messages-upsert-group.json", "group"),
        ("messages-upsert-status-broadcast.json", "broadcast"),
        ("messages-upsert-reaction.json", "reaction"),
        ("messages-upsert-sticker.json", "sticker"),
    ],
)
def test_messages_it_does_not_answer_are_stored_as_ignored(
    make_instance, name: str, reason: str
) -> None:
    result = record_delivery(instance=make_instance(), body=load_fixture(name))

    assert (result.outcome, result.detail) == (Outcome.IGNORED, reason)
    row = InboundMessage.objects.get()
    assert (row.status, row.ignore_reason) == (Status.IGNORED, reason)
    assert row.next_attempt_at is None


def test_a_message_to_answer_is_queued_due_now(make_instance) -> None:
    acme = make_instance()

    result = record_delivery(instance=acme, body=message_body())

    assert (result.outcome, result.instance_name) == (Outcome.QUEUED, "acme")
    row = InboundMessage.objects.get()
    assert row.status == Status.QUEUED
    assert row.next_attempt_at is not None and row.next_attempt_at <= row.received_at
    assert (row.phone, row.message_type, row.push_name) == ("5511987654321", "text", "Maria Souza")
    assert row.text == "Olá! Qual o horário de atendimento?"
    assert row.content["reply_to"] == "5511987654321"
    assert row.evolution_instance == "tenant-acme-01"


def test_the_same_message_id_is_stored_once_per_instance(make_instance) -> None:
    acme = make_instance()
    other = make_instance(name="other")

    first = record_delivery(instance=acme, body=message_body())
    again = record_delivery(instance=acme, body=message_body())
    elsewhere = record_delivery(instance=other, body=message_body())

    assert [first.outcome, again.outcome, elsewhere.outcome] == [
        Outcome.QUEUED,
        Outcome.DUPLICATE,
        Outcome.QUEUED,
    ]
    assert InboundMessage.objects.count() == 2


def test_an_ignored_message_of_the_legacy_instance_keeps_no_apikey(make_instance) -> None:
    legacy = make_instance(
        name="default", is_default=True, legacy_mode=True, evolution_url="", evolution_key=""
    )

    record_delivery(instance=legacy, body=load_fixture("messages-upsert-fromme.json"))

    row = InboundMessage.objects.get()
    assert (row.reply_server_url, row.reply_api_key) == ("", "")


def test_accept_delivery_checks_the_instance_then_the_token_then_the_body(make_instance) -> None:
    make_instance(webhook_token="right-token")

    def accept(segment: str, token: str) -> Outcome:
        return accept_delivery(segment=segment, event=None, token=token, raw=b"[]").outcome

    assert accept("nobody", "right-token") is Outcome.UNKNOWN_INSTANCE
    assert accept("acme", "wrong") is Outcome.BAD_TOKEN
    assert accept("acme", "right-token") is Outcome.BAD_BODY


def accept(body: dict[str, Any], *, claim: bool) -> Result:
    return accept_delivery(
        segment="acme", event=None, token="acme-token", raw=json.dumps(body).encode(), claim=claim
    )


def test_a_message_is_claimed_as_it_is_stored_on_sqlite_only(make_instance) -> None:
    acme = make_instance(webhook_token="acme-token")

    result = accept(message_body(), claim=True)

    row = InboundMessage.objects.get()
    assert result.outcome is Outcome.QUEUED
    if connection.vendor != "sqlite":
        # Two PostgreSQL servers could each claim a message of the same chat.
        assert result.claimed is None
        assert (row.status, row.claim_token, row.attempts) == (Status.QUEUED, "", 0)
        return
    assert result.claimed is not None
    [claimed] = result.claimed.messages
    assert claimed.pk == row.pk
    assert result.claimed.instance == acme
    assert row.status == Status.PROCESSING
    assert row.claim_token == result.claimed.token != ""
    chat = Conversation.objects.get()
    assert (chat.pk, chat.claim_token) == (result.claimed.conversation.pk, row.claim_token)
    assert row.attempts == 1
    assert row.lease_until > row.received_at


def test_a_message_whose_chat_has_an_open_message_waits_in_the_queue(make_instance) -> None:
    make_instance(webhook_token="acme-token")
    first = accept(message_body(message_id="FIRST"), claim=True)

    second = accept(message_body(message_id="SECOND"), claim=True)
    other_chat = accept(message_body(message_id="OTHER", phone="5521999990000"), claim=True)

    if connection.vendor != "sqlite":
        assert (first.claimed, second.claimed, other_chat.claimed) == (None, None, None)
        return
    assert first.claimed is not None
    assert second.outcome is Outcome.QUEUED and second.claimed is None
    assert InboundMessage.objects.get(message_id="SECOND").status == Status.QUEUED
    assert other_chat.claimed is not None


def test_ignored_duplicate_and_unclaimed_messages_are_not_handed_over(make_instance) -> None:
    make_instance(webhook_token="acme-token")
    from_me = load_fixture("messages-upsert-fromme.json")

    unclaimed = accept(message_body(message_id="PLAIN"), claim=False)
    duplicate = accept(message_body(message_id="PLAIN"), claim=True)
    ignored = accept(from_me, claim=True)

    assert unclaimed.claimed is None
    assert InboundMessage.objects.get(message_id="PLAIN").status == Status.QUEUED
    assert (duplicate.outcome, duplicate.claimed) == (Outcome.DUPLICATE, None)
    assert (ignored.outcome, ignored.claimed) == (Outcome.IGNORED, None)
