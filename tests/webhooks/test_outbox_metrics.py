"""The outbox's metrics at scrape time: its depth and the delivered and read ratios.

Not a pipeline test: /metrics reads through the database thread, which under
TEST_GROUP_COMMIT has a connection of its own that cannot see a test's rows."""

import pytest

from webhooks import outbox
from webhooks.models import OutboundMessage

JID = "5511987654321@s.whatsapp.net"


@pytest.mark.django_db
def test_metrics_show_the_outbox_depth_and_the_delivered_and_read_ratios(
    client, make_instance
) -> None:
    acme = make_instance()
    outbox.queue_send(instance=acme, chat_jid=JID, text="waiting")
    for status in ("sent", "delivered", "read", "read"):
        OutboundMessage.objects.create(instance=acme, chat_jid=JID, text="x", status=status)

    text = client.get("/metrics").content.decode()

    assert 'omnihub_outbox_depth{instance="acme"} 1.0' in text
    assert 'omnihub_outbound_delivered_ratio{instance="acme"} 0.75' in text
    assert 'omnihub_outbound_read_ratio{instance="acme"} 0.5' in text
