"""The webhook view and its process's worker: the slot it reserves always comes back,
with the row claimed for it, even when the request is cancelled while storing."""

import asyncio
import json
import time
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from django.test import AsyncRequestFactory

from tests.webhooks.conftest import message_body
from webhooks import views
from webhooks.models import InboundMessage, Status
from webhooks.transitions import Batch

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True), pytest.mark.pipeline]


class LocalWorker:
    """Stands in for the embedded worker: records what it is handed."""

    def __init__(self) -> None:
        self.adopted: list[InboundMessage | None] = []

    def adopt(self, batch: Batch | None) -> None:
        self.adopted.append(batch.messages[0] if batch is not None else None)


def fresh_body(message_id: str) -> bytes:
    body = message_body(message_id=message_id)
    body["data"]["messageTimestamp"] = int(time.time())
    return json.dumps(body).encode()


@pytest.fixture
def local(monkeypatch) -> LocalWorker:
    stand_in = LocalWorker()
    monkeypatch.setattr(views.worker, "local_worker", lambda: stand_in)
    return stand_in


def webhook_request(message_id: str) -> Any:
    return AsyncRequestFactory().post(
        "/webhook/evolution/acme",
        data=fresh_body(message_id),
        content_type="application/json",
        headers={"X-Webhook-Token": "acme-token"},
    )


async def test_the_claimed_row_is_handed_to_the_worker(make_instance, local) -> None:
    await sync_to_async(make_instance)(webhook_token="acme-token")

    response = await views.evolution_webhook(webhook_request("HANDED"), segment="acme")
    await asyncio.sleep(0)  # the hand-over runs as the store's done-callback

    assert response.status_code == 200
    if connection.vendor != "sqlite":
        assert local.adopted == []  # PostgreSQL claims after commit: no slot is taken
        return
    [adopted] = local.adopted
    assert adopted is not None and adopted.message_id == "HANDED"
    assert adopted.status == Status.PROCESSING


async def test_a_request_cancelled_while_storing_still_hands_the_row_over(
    make_instance, local, monkeypatch
) -> None:
    await sync_to_async(make_instance)(webhook_token="acme-token")
    storing = asyncio.Event()
    real_run_db = views.run_db

    async def slow_run_db(fn: Any, /, **kwargs: Any) -> Any:
        storing.set()
        await asyncio.sleep(0.2)
        return await real_run_db(fn, **kwargs)

    monkeypatch.setattr(views, "run_db", slow_run_db)
    view = asyncio.create_task(
        views.evolution_webhook(webhook_request("CANCELLED"), segment="acme")
    )
    await storing.wait()
    view.cancel()  # Evolution hung up: Django cancels the view

    with pytest.raises(asyncio.CancelledError):
        await view
    for _ in range(100):
        if local.adopted or await InboundMessage.objects.filter(message_id="CANCELLED").aexists():
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.05)

    row = await InboundMessage.objects.aget(message_id="CANCELLED")
    if connection.vendor != "sqlite":
        assert local.adopted == []
        assert row.status == Status.QUEUED
        return
    [adopted] = local.adopted
    assert adopted is not None and adopted.pk == row.pk
    assert row.status == Status.PROCESSING
