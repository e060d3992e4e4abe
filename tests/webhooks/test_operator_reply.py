"""The conversation page's reply box: the operator's text goes through the outbox to
Evolution, recorded with the staff user, pauses the bot in the chat, and shows in
the thread."""

import asyncio
from collections.abc import Iterator

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.contrib.auth.models import Permission
from django.test import Client

from instances.clients.http import new_http_client
from instances.models import InstanceConfig
from tests.fakes import FakeEvolution
from tests.webhooks.conftest import queue_message
from webhooks.dispatcher import Dispatcher
from webhooks.models import Conversation, OutboundMessage, PauseReason

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def evolution() -> Iterator[FakeEvolution]:
    server = FakeEvolution().start()
    yield server
    server.stop()


@pytest.fixture
def acme(make_instance, evolution: FakeEvolution) -> InstanceConfig:
    return make_instance(evolution_url=evolution.url, handoff_minutes=15)


@pytest.fixture
def conversation(acme) -> Conversation:
    queue_message(acme)
    return Conversation.objects.get(instance=acme)


def reply_url(conversation: Conversation) -> str:
    return f"/admin/webhooks/conversation/{conversation.pk}/reply/"


def send_queued() -> None:
    """Run the outbox's dispatcher until nothing is left queued or sending."""

    def pending() -> bool:
        return OutboundMessage.objects.filter(status__in=("queued", "sending")).exists()

    async def run() -> None:
        stop = asyncio.Event()
        async with new_http_client(max_connections=4) as http:
            task = asyncio.create_task(Dispatcher(http=http, poll_interval=0.05).run(stop=stop))
            try:
                async with asyncio.timeout(10):
                    while await sync_to_async(pending)():
                        await asyncio.sleep(0.05)
            finally:
                stop.set()
                await task

    async_to_sync(run)()


def test_the_operator_s_text_goes_through_the_outbox_recorded_and_pauses_the_bot(
    admin_client, admin_user, conversation, evolution
) -> None:
    response = admin_client.post(reply_url(conversation), {"text": "  Olá, aqui é a Ana.  "})

    assert response.status_code == 302
    row = OutboundMessage.objects.get()
    assert (row.text, row.sent_by, row.kind, row.status, row.in_reply_to) == (
        "Olá, aqui é a Ana.",
        admin_user,
        "operator",
        "queued",
        None,
    )
    conversation.refresh_from_db()
    assert conversation.pause_reason == PauseReason.HUMAN
    assert conversation.paused_until is not None

    send_queued()

    [sent] = evolution.sent()
    assert sent.body == {"number": conversation.chat_jid, "text": "Olá, aqui é a Ana."}
    row.refresh_from_db()
    assert (row.status, row.evolution_id) == ("sent", sent.answer["key"]["id"])
    page = admin_client.get(f"/admin/webhooks/conversation/{conversation.pk}/change/")
    html = page.content.decode()
    assert 'class="operator-message"' in html and "Olá, aqui é a Ana." in html
    assert 'id="reply-form"' in html


def test_an_empty_text_is_refused(admin_client, conversation, evolution) -> None:
    admin_client.post(reply_url(conversation), {"text": "   "})

    assert evolution.sent() == [] and not OutboundMessage.objects.exists()


def test_a_user_without_the_permission_cannot_reply(
    client, django_user_model, conversation, evolution
) -> None:
    user = django_user_model.objects.create_user("viewer", password="pw", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_conversation"))
    client.force_login(user)

    client.post(reply_url(conversation), {"text": "oi"})
    page = client.get(f"/admin/webhooks/conversation/{conversation.pk}/change/")

    assert evolution.sent() == [] and not OutboundMessage.objects.exists()
    assert 'id="reply-form"' not in page.content.decode()


def test_the_reply_needs_the_csrf_token(admin_user, conversation, evolution) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)

    assert client.post(reply_url(conversation), {"text": "oi"}).status_code == 403
    assert evolution.sent() == []


def test_a_failed_send_is_kept_with_its_error(admin_client, conversation, evolution) -> None:
    evolution.answer_next("/message/sendText/", (400, {"response": {"message": "bad number"}}))
    admin_client.post(reply_url(conversation), {"text": "oi"})

    send_queued()

    row = OutboundMessage.objects.get()
    assert row.status == "failed" and "bad number" in row.error
    page = admin_client.get(f"/admin/webhooks/conversation/{conversation.pk}/change/")
    assert "bad number" in page.content.decode()
