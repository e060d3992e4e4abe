"""Status callbacks end to end: the hub's worker posts a queued status to a receiver on
127.0.0.1 that fails once then accepts; the callback arrives signed and is retried."""

import hashlib
import hmac
import json
from collections.abc import Callable, Iterator

import pytest

from tests.e2e.conftest import Tenant
from tests.e2e.harness import text_delivery, unique, wait_until
from tests.fakes import FakeServer

SECRET = "e2e-callback-secret-77a1"


@pytest.fixture
def receiver() -> Iterator[FakeServer]:
    server = FakeServer(lambda record: (200, {"ok": True})).start()
    yield server
    server.stop()


def test_a_status_callback_arrives_signed_and_is_retried_after_a_failure(
    make_tenant: Callable[..., Tenant], receiver: FakeServer
) -> None:
    receiver.answer_next("/status", (500, {"error": "busy"}))
    shop = make_tenant(callback_url=f"{receiver.url}/status", callback_secret=SECRET)
    message_id = unique("CB").upper()
    assert shop.post(text_delivery(message_id=message_id, text="oi")).status_code == 200
    shop.wait_finished(message_id)
    [outbound] = shop.hub.query(
        "SELECT o.id FROM webhooks_outboundmessage o JOIN instances_instanceconfig i "
        "ON i.id = o.instance_id WHERE i.name = ?",
        [shop.name],
    )

    # What the outbox's state change does, in the hub's own process and database.
    shop.hub.shell(
        "from django.utils import timezone; "
        "from webhooks.callbacks import queue_status_callback; "
        f"queue_status_callback(outbound_id={outbound['id']}, status='delivered', "
        "at=timezone.now())"
    )
    first, second = receiver.wait_for("/status", 2, timeout=20)[:2]

    assert (first.status, second.status) == (500, 200)
    assert first.raw == second.raw
    expected = hmac.new(SECRET.encode(), second.raw, hashlib.sha256).hexdigest()
    assert second.headers["x-omnihub-signature"] == f"sha256={expected}"
    body = json.loads(second.raw)
    assert (body["id"], body["status"], body["instance"]) == (
        outbound["id"],
        "delivered",
        shop.name,
    )
    [row] = wait_until(
        lambda: shop.hub.query(
            "SELECT state, attempts, last_error FROM webhooks_statuscallback "
            "WHERE outbound_id = ? AND state <> 'pending'",
            [outbound["id"]],
        ),
        what="the callback's outcome",
    )
    assert row == {"state": "delivered", "attempts": 2, "last_error": ""}
