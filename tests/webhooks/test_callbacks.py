"""Status callbacks at the transport: queued in the caller's transaction, posted signed,
retried with backoff after a failure, given up after CALLBACK_MAX_ATTEMPTS with the
error kept."""

import hashlib
import hmac
import json
from datetime import timedelta

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from instances.models import InstanceConfig
from webhooks.callbacks import deliver_due, queue_status_callback, sign
from webhooks.models import CallbackState, OutboundMessage, StatusCallback

pytestmark = [pytest.mark.django_db(transaction=True)]

SECRET = "callback-secret-3f9a1c"
URL = "https://crm.acme.test/omnihub/status"


@pytest.fixture
def acme(make_instance) -> InstanceConfig:
    return make_instance(callback_url=URL, callback_secret=SECRET)


def outbound(instance: InstanceConfig) -> OutboundMessage:
    return OutboundMessage.objects.create(
        instance=instance, chat_jid="5511987654321@s.whatsapp.net", text="oi", evolution_id="3EB0A"
    )


class Receiver:
    """A callback receiver at the transport: answers the queued statuses in order."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.requests: list[httpx.Request] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        status = self.statuses.pop(0) if self.statuses else 200
        if status == 0:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(status, json={})

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handle))


async def deliver_round(receiver: Receiver) -> int:
    async with receiver.client() as http:
        return await deliver_due(http=http)


async def make_due(row_id: int) -> None:
    await StatusCallback.objects.filter(pk=row_id).aupdate(next_attempt_at=timezone.now())


@pytest.mark.asyncio
async def test_a_callback_is_posted_with_the_hmac_of_its_raw_body(acme) -> None:
    sent = await sync_to_async(outbound)(acme)
    at = timezone.now()
    await sync_to_async(queue_status_callback)(outbound_id=sent.pk, status="delivered", at=at)
    receiver = Receiver(200)

    assert await deliver_round(receiver) == 1

    [request] = receiver.requests
    assert str(request.url) == URL
    expected = hmac.new(SECRET.encode(), request.content, hashlib.sha256).hexdigest()
    assert request.headers["x-omnihub-signature"] == f"sha256={expected}"
    assert json.loads(request.content) == {
        "event": "message.status",
        "instance": "acme",
        "id": sent.pk,
        "status": "delivered",
        "at": at.isoformat(),
        "chat_jid": "5511987654321@s.whatsapp.net",
        "evolution_id": "3EB0A",
    }
    row = await StatusCallback.objects.aget()
    assert (row.state, row.attempts, row.next_attempt_at) == (CallbackState.DELIVERED, 1, None)


@pytest.mark.asyncio
async def test_a_failed_post_is_retried_later_with_the_same_body(acme) -> None:
    sent = await sync_to_async(outbound)(acme)
    await sync_to_async(queue_status_callback)(
        outbound_id=sent.pk, status="read", at=timezone.now()
    )
    receiver = Receiver(503, 200)

    await deliver_round(receiver)
    row = await StatusCallback.objects.aget()
    assert (row.state, row.attempts, row.last_error) == (
        CallbackState.PENDING,
        1,
        "the receiver answered 503",
    )
    assert row.next_attempt_at > timezone.now()
    # Not due yet: the next round leaves it alone.
    assert await deliver_round(receiver) == 0

    await make_due(row.pk)
    await deliver_round(receiver)

    first, second = receiver.requests
    assert first.content == second.content
    assert first.headers["x-omnihub-signature"] == second.headers["x-omnihub-signature"]
    row = await StatusCallback.objects.aget()
    assert (row.state, row.attempts, row.last_error) == (CallbackState.DELIVERED, 2, "")


@pytest.mark.asyncio
async def test_it_gives_up_after_the_last_attempt_keeping_the_error(acme, settings) -> None:
    settings.CALLBACK_MAX_ATTEMPTS = 2
    sent = await sync_to_async(outbound)(acme)
    await sync_to_async(queue_status_callback)(
        outbound_id=sent.pk, status="failed", at=timezone.now()
    )
    receiver = Receiver(0, 0, 0)

    await deliver_round(receiver)
    await make_due((await StatusCallback.objects.aget()).pk)
    await deliver_round(receiver)

    row = await StatusCallback.objects.aget()
    assert (row.state, row.attempts, row.next_attempt_at) == (CallbackState.FAILED, 2, None)
    assert "connection refused" in row.last_error
    assert len(receiver.requests) == 2


@pytest.mark.asyncio
async def test_without_a_secret_the_callback_is_not_signed(make_instance) -> None:
    plain = await sync_to_async(make_instance)(callback_url=URL)
    sent = await sync_to_async(outbound)(plain)
    await sync_to_async(queue_status_callback)(
        outbound_id=sent.pk, status="sent", at=timezone.now()
    )
    receiver = Receiver(200)

    await deliver_round(receiver)

    assert "x-omnihub-signature" not in receiver.requests[0].headers


def test_an_instance_without_a_callback_url_queues_nothing(make_instance) -> None:
    sent = outbound(make_instance())

    assert queue_status_callback(outbound_id=sent.pk, status="sent", at=timezone.now()) is None
    assert not StatusCallback.objects.exists()


def test_two_takers_never_post_the_same_callback_twice(acme) -> None:
    from webhooks.callbacks import take_due

    sent = outbound(acme)
    queue_status_callback(outbound_id=sent.pk, status="sent", at=timezone.now())

    first = take_due(limit=5)
    second = take_due(limit=5, now=timezone.now() + timedelta(seconds=1))

    assert len(first) == 1 and second == []


def test_the_signature_is_the_readme_s() -> None:
    body = b'{"event":"message.status"}'
    assert sign(body, "s3cret") == "sha256=" + hmac.new(b"s3cret", body, "sha256").hexdigest()


def test_the_callback_url_is_validated_like_the_other_urls(make_instance) -> None:
    from django.core.exceptions import ValidationError

    instance = make_instance()
    instance.callback_url = "http://169.254.169.254/latest"
    with pytest.raises(ValidationError) as raised:
        instance.full_clean()
    assert "callback_url" in raised.value.message_dict
