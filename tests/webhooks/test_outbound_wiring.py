"""The outbox's parts together: a send key sends through its own instance only, an
opted-out number gets no API send, and every new status of an API send queues its
signed callback."""

import pytest
from django.test import Client
from django.utils import timezone

from instances.send_keys import create_send_key
from webhooks import outbox
from webhooks.models import OutboundMessage, StatusCallback
from webhooks.opt_out import OPTED_OUT_ERROR, record_opt_out

SEND = {"to": "5511987654321", "text": "Seu pedido saiu."}


def post(client: Client, instance: str, key: str, body: dict | None = None):
    return client.post(
        f"/api/v1/instances/{instance}/messages/",
        body or SEND,
        content_type="application/json",
        HTTP_X_API_KEY=key,
    )


def test_a_send_key_sends_through_its_own_instance_only(client: Client, make_instance) -> None:
    acme = make_instance()
    make_instance(name="other", whatsapp_instance="other-wa")
    _, key = create_send_key(instance=acme, name="crm")

    own = post(client, "acme", key)
    elsewhere = post(client, "other", key)
    listing = client.get("/api/v1/instances/acme/messages/", HTTP_X_API_KEY=key)
    tenant_api = client.get("/api/v1/instances/", HTTP_X_API_KEY=key)

    assert own.status_code == 202, own.content
    assert (elsewhere.status_code, listing.status_code, tenant_api.status_code) == (403, 403, 403)
    assert elsewhere.json()["detail"] == "This send key belongs to another instance."
    assert list(OutboundMessage.objects.values_list("instance__name", flat=True)) == ["acme"]


def test_an_opted_out_number_gets_no_api_send(client: Client, make_instance, api_key_headers):
    acme = make_instance()
    record_opt_out(instance_id=acme.pk, phone="5511987654321", keyword="STOP", at=timezone.now())

    response = client.post(
        "/api/v1/instances/acme/messages/", SEND, content_type="application/json", **api_key_headers
    )

    assert response.status_code == 400
    assert response.json()["to"] == [OPTED_OUT_ERROR]
    assert not OutboundMessage.objects.exists()


@pytest.mark.django_db
def test_each_new_status_of_an_api_send_queues_its_callback(make_instance) -> None:
    acme = make_instance(callback_url="https://crm.acme.test/hook", callback_secret="s3cret")
    row = outbox.queue_send(instance=acme, chat_jid="5511987654321@s.whatsapp.net", text="oi")
    OutboundMessage.objects.filter(pk=row.message.pk).update(
        status="sending", attempts=1, evolution_id=""
    )

    outbox.finish_send(
        row_id=row.message.pk,
        attempt=1,
        instance_id=acme.pk,
        token="",
        outcome=outbox.Outcome.SENT,
        evolution_id="3EB0AAA",
    )
    outbox.record_status_updates(instance_id=acme.pk, updates=[("3EB0AAA", "DELIVERY_ACK")])
    outbox.record_status_updates(instance_id=acme.pk, updates=[("3EB0AAA", "READ")])

    assert list(StatusCallback.objects.order_by("id").values_list("status", flat=True)) == [
        "sent",
        "delivered",
        "read",
    ]


@pytest.mark.django_db
def test_a_replys_receipts_queue_no_callback(make_instance) -> None:
    acme = make_instance(callback_url="https://crm.acme.test/hook")
    OutboundMessage.objects.create(
        instance=acme,
        chat_jid="5511987654321@s.whatsapp.net",
        text="oi",
        status="sent",
        evolution_id="3EB0REPLY",
    )

    moved = outbox.record_status_updates(instance_id=acme.pk, updates=[("3EB0REPLY", "READ")])

    assert moved == 1
    assert not StatusCallback.objects.exists()
