from datetime import timedelta
from itertools import count
from typing import Any

import pytest
from django.contrib.messages import get_messages
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from instances.models import InstanceConfig
from webhooks.models import InboundMessage, Status

CHANGELIST = "/admin/webhooks/inboundmessage/"
REPLY_KEY = "legacy-reply-KEY-never-shown"
CLAIM_TOKEN = "claimtoken0123456789abcdefabcdef"
BASE64 = "/9j/4AAQSkZJRgABAQEAAQABAAD" * 400
_ids = count(1)


def add_message(instance: InstanceConfig, **fields: Any) -> InboundMessage:
    """A stored message; `fields` override its columns (received_at included)."""
    number = next(_ids)
    values: dict[str, Any] = {
        "message_id": f"MSG{number:04d}",
        "chat_jid": f"55119000{number:05d}@s.whatsapp.net",
        "phone": f"55119000{number:05d}",
        "push_name": "Maria Souza",
        "message_type": "conversation",
        "text": "Qual o horário?",
        "payload": {"event": "messages.upsert", "data": {"message": {"conversation": "Oi"}}},
        "status": Status.REPLIED,
    }
    values.update(fields)
    received_at = values.pop("received_at", None)
    message = InboundMessage.objects.create(instance=instance, **values)
    if received_at is not None:
        InboundMessage.objects.filter(pk=message.pk).update(received_at=received_at)
        message.refresh_from_db()
    return message


def change_url(message: InboundMessage) -> str:
    return f"{CHANGELIST}{message.pk}/change/"


def listed(response: Any) -> list[InboundMessage]:
    return list(response.context["cl"].result_list)


def retry(admin_client: Any, *messages: InboundMessage) -> Any:
    return admin_client.post(
        CHANGELIST,
        {"action": "retry_failed", "_selected_action": [m.pk for m in messages]},
        follow=True,
    )


@pytest.fixture
def acme(make_instance) -> InstanceConfig:
    return make_instance()


def test_the_list_shows_readable_columns_newest_first(admin_client, acme):
    now = timezone.now()
    older = add_message(
        acme,
        push_name="Older Person",
        received_at=now - timedelta(minutes=5),
        finished_at=now - timedelta(minutes=5) + timedelta(milliseconds=850),
    )
    newer = add_message(
        acme,
        push_name="Newer Person",
        received_at=now - timedelta(seconds=10),
        finished_at=now - timedelta(seconds=10) + timedelta(seconds=2.5),
    )

    response = admin_client.get(CHANGELIST)

    assert response.status_code == 200
    assert listed(response) == [newer, older]
    html = response.content.decode()
    for title in ("Received", "Instance", "Chat", "Name", "Type", "Status", "Total time"):
        assert f">{title}<" in html or f">{title}</a>" in html, title
    assert "850 ms" in html
    assert "2.5 s" in html
    assert newer.phone in html


def test_the_list_has_no_add_and_no_bulk_delete(admin_client, acme):
    message = add_message(acme)

    response = admin_client.get(CHANGELIST)

    assert admin_client.get(f"{CHANGELIST}add/").status_code == 403
    assert b"delete_selected" not in response.content
    assert InboundMessage.objects.filter(pk=message.pk).exists()


def test_deleting_an_instance_in_the_admin_deletes_its_messages(admin_client, acme):
    add_message(acme)

    response = admin_client.post(
        f"/admin/instances/instanceconfig/{acme.pk}/delete/", {"post": "yes"}
    )

    assert response.status_code == 302
    assert not InboundMessage.objects.exists()


def test_the_list_joins_the_instance_and_never_loads_payloads(admin_client, make_instance):
    for name in ("one", "two", "three"):
        instance = make_instance(name=name)
        add_message(instance)
        add_message(instance)
    admin_client.get(CHANGELIST)  # session and permission caches

    with CaptureQueriesContext(connection) as queries:
        response = admin_client.get(CHANGELIST)

    assert len(listed(response)) == 6
    rows = [q["sql"] for q in queries if '"webhooks_inboundmessage"."phone"' in q["sql"]]
    assert len(rows) == 1
    assert 'INNER JOIN "instances_instanceconfig"' in rows[0]
    assert '"webhooks_inboundmessage"."payload"' not in rows[0]


def test_the_list_filters_by_status_and_instance(admin_client, make_instance):
    acme = make_instance(name="acme")
    globex = make_instance(name="globex")
    failed = add_message(acme, status=Status.FAILED)
    add_message(acme, status=Status.REPLIED)
    add_message(globex, status=Status.FAILED)

    by_status = admin_client.get(CHANGELIST, {"status__exact": "failed"})
    by_both = admin_client.get(
        CHANGELIST, {"status__exact": "failed", "instance__id__exact": acme.pk}
    )

    assert len(listed(by_status)) == 2
    assert listed(by_both) == [failed]


def test_the_list_filters_by_date(admin_client, acme):
    today = add_message(acme)
    add_message(acme, received_at=timezone.now() - timedelta(days=10))

    page = admin_client.get(CHANGELIST)
    last_7_days = next(
        choice
        for spec in page.context["cl"].filter_specs
        if spec.title == "received at"
        for choice in spec.choices(page.context["cl"])
        if choice["display"] == "Past 7 days"
    )
    response = admin_client.get(CHANGELIST + last_7_days["query_string"])

    assert listed(response) == [today]


@pytest.mark.parametrize(
    ("term", "expected"),
    [("98765", "by phone"), ("horário", "by text"), ("3EB0ABCDEF", "by id")],
)
def test_the_list_searches_by_phone_text_and_message_id(admin_client, acme, term, expected):
    messages = {
        "by phone": add_message(acme, phone="5511987654321", text="ok"),
        "by text": add_message(acme, phone="5521900000000", text="Qual o horário de hoje?"),
        "by id": add_message(acme, phone="5531900000000", text="ok", message_id="3EB0ABCDEF"),
    }

    response = admin_client.get(CHANGELIST, {"q": term})

    assert listed(response) == [messages[expected]]


def test_the_detail_page_shows_the_timeline_attempts_and_agent_exchange(admin_client, acme):
    received = timezone.now() - timedelta(minutes=1)
    message = add_message(
        acme,
        received_at=received,
        agent_started_at=received + timedelta(milliseconds=120),
        agent_finished_at=received + timedelta(milliseconds=1620),
        sent_at=received + timedelta(milliseconds=1900),
        finished_at=received + timedelta(milliseconds=1910),
        attempts=2,
        agent_attempts=3,
        send_attempts=4,
        last_error="Evolution answered 500: boom",
        used_fallback=True,
        agent_request={"message_content": "[Maria Souza]: Qual o horário?"},
        agent_response={"message": "Das 9h às 18h", "success": True},
        reply_text="Das 9h às 18h",
    )

    response = admin_client.get(change_url(message))

    assert response.status_code == 200
    html = response.content.decode()
    for text in (
        "Agent started",
        "+120 ms after receipt",
        "+1.5 s agent time",
        "+280 ms after the answer",
        "+1.9 s in total",
        "2 claimed by a worker, 3 to the agent, 4 to send",
        "Evolution answered 500: boom",
        "&quot;message_content&quot;: &quot;[Maria Souza]: Qual o horário?&quot;",
        "&quot;success&quot;: true",
        "Das 9h às 18h",
        "<pre",
    ):
        assert text in html, text


def test_the_detail_page_cannot_be_saved(admin_client, acme):
    message = add_message(acme, text="original")

    page = admin_client.get(change_url(message))
    response = admin_client.post(change_url(message), {"text": "edited", "_save": "Save"})

    assert b'name="_save"' not in page.content
    assert b"<textarea" not in page.content
    assert response.status_code == 403
    message.refresh_from_db()
    assert message.text == "original"


def test_no_page_shows_the_reply_key_or_the_claim_token(admin_client, make_instance):
    legacy = make_instance(
        name="default", is_default=True, legacy_mode=True, evolution_url="", evolution_key=""
    )
    message = add_message(
        legacy,
        status=Status.PROCESSING,
        reply_api_key=REPLY_KEY,
        claim_token=CLAIM_TOKEN,
        reply_server_url="http://evolution.legacy.test",
    )

    pages = [
        admin_client.get(CHANGELIST),
        admin_client.get(CHANGELIST, {"q": message.phone}),
        admin_client.get(change_url(message)),
        admin_client.get(f"{CHANGELIST}{message.pk}/history/"),
    ]

    for page in pages:
        assert page.status_code == 200
        assert REPLY_KEY.encode() not in page.content
        assert CLAIM_TOKEN.encode() not in page.content
        assert b"reply_api_key" not in page.content
        assert b"claim_token" not in page.content


def test_the_raw_payload_shows_long_base64_cut_short(admin_client, acme):
    payload = {
        "event": "messages.upsert",
        "data": {
            "message": {
                "base64": BASE64,
                "imageMessage": {"caption": "Foto", "jpegThumbnail": list(range(200))},
            }
        },
    }
    message = add_message(acme, payload=payload, agent_request={"media": [{"data": BASE64}]})

    response = admin_client.get(change_url(message))

    html = response.content.decode()
    assert BASE64 not in html
    assert f"{BASE64[:200]}… ({len(BASE64)} chars)" in html
    assert html.count(f"({len(BASE64)} chars)") == 2  # payload and agent request
    assert "[… 200 numbers]" in html
    assert "&quot;caption&quot;: &quot;Foto&quot;" in html


def test_retry_requeues_only_failed_messages_and_says_how_many(
    admin_client, acme, django_capture_on_commit_callbacks
):
    failed = add_message(
        acme,
        status=Status.FAILED,
        finished_at=timezone.now(),
        last_error="Agent answered 500",
        lease_until=timezone.now(),
    )
    replied = add_message(acme, status=Status.REPLIED, finished_at=timezone.now())
    queued = add_message(acme, status=Status.QUEUED, next_attempt_at=None)

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = retry(admin_client, failed, replied, queued)

    assert [str(m) for m in get_messages(response.wsgi_request)] == [
        "Requeued 1 of 3 selected messages. Skipped 2 that are not failed."
    ]
    failed.refresh_from_db()
    assert failed.status == Status.QUEUED
    assert failed.next_attempt_at is not None
    assert failed.finished_at is None
    assert failed.lease_until is None
    assert failed.last_error == "Agent answered 500"  # kept for the operator
    replied.refresh_from_db()
    queued.refresh_from_db()
    assert replied.status == Status.REPLIED
    assert queued.next_attempt_at is None
    assert len(callbacks) == 1  # the worker is woken once the update is committed


def test_retry_keeps_an_unsent_reply_so_the_agent_is_not_asked_again(admin_client, acme):
    first_failure = timezone.now() - timedelta(minutes=20)
    unsent = add_message(
        acme,
        status=Status.FAILED,
        reply_text="Das 9h às 18h",
        agent_attempts=1,
        send_attempts=5,
        first_send_failed_at=first_failure,
        claim_token="",
    )

    retry(admin_client, unsent)

    unsent.refresh_from_db()
    assert unsent.status == Status.QUEUED
    assert unsent.reply_text == "Das 9h às 18h"
    assert unsent.agent_attempts == 1
    assert unsent.first_send_failed_at is None  # a new send window


def test_retry_asks_the_agent_again_when_it_failed_without_a_reply(admin_client, acme):
    no_reply = add_message(acme, status=Status.FAILED, reply_text=None, agent_attempts=4)

    retry(admin_client, no_reply)

    no_reply.refresh_from_db()
    assert no_reply.status == Status.QUEUED
    assert no_reply.reply_text is None
    assert no_reply.agent_attempts == 0


def test_retry_skips_legacy_messages_that_have_no_key_to_send_with(admin_client, make_instance):
    legacy = make_instance(
        name="default", is_default=True, legacy_mode=True, evolution_url="", evolution_key=""
    )
    message = add_message(legacy, status=Status.FAILED, reply_text="Oi", reply_api_key="")

    response = retry(admin_client, message)

    message.refresh_from_db()
    assert message.status == Status.FAILED
    text = next(str(m) for m in get_messages(response.wsgi_request))
    assert text.startswith("Requeued 0 of 1 selected messages. Skipped 1 from the legacy route")
