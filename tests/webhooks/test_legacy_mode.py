"""Legacy mode: the single-tenant service's behaviour, without its open relay.

The old service replied through whatever server a delivery named. With no
WEBHOOK_TOKEN anyone who can reach /webhook/evolution could name their own
server and have the tenant's agent answer there. Legacy mode now pins the
first server and answers no delivery naming another one; and it is a property
of its own, so that moving the default renames no session.
"""

import json
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.test import Client

from instances import services
from instances.clients.agents import session_name
from instances.models import InstanceConfig
from tests.webhooks.conftest import PHONE, Upstream, message_body
from webhooks.ingest import record_delivery
from webhooks.models import ConnectionState, InboundMessage, Status
from webhooks.processing import handle_batch
from webhooks.transitions import claim_conversations

REAL_SERVER = "https://evolution.example.com"  # the fixtures' server_url
STRANGER = "https://relay.attacker.test"


def post(client: Client, path: str, body: dict[str, Any]) -> Any:
    return client.post(path, data=json.dumps(body), content_type="application/json")


def naming(server_url: str, *, message_id: str, apikey: str = "stranger-key") -> dict[str, Any]:
    body = message_body()
    body["server_url"] = server_url
    body["apikey"] = apikey
    body["data"]["key"]["id"] = message_id
    return body


@pytest.fixture
def legacy(make_instance) -> InstanceConfig:
    """The instance seeded from an old .env: no token, no Evolution URL."""
    return make_instance(
        name="default",
        is_default=True,
        legacy_mode=True,
        evolution_url="",
        evolution_key="",
        whatsapp_instance="",
        webhook_token="",
    )


@pytest.mark.django_db
def test_the_first_delivery_pins_the_reply_server(client: Client, legacy) -> None:
    response = post(client, "/webhook/evolution", naming(REAL_SERVER, message_id="A1"))

    assert response.json()["status"] == "queued"
    legacy.refresh_from_db()
    assert legacy.legacy_server_url == REAL_SERVER
    assert InboundMessage.objects.get().reply_server_url == REAL_SERVER


@pytest.mark.django_db
def test_an_anonymous_delivery_naming_another_server_is_kept_but_never_answered(
    client: Client, legacy
) -> None:
    post(client, "/webhook/evolution", naming(REAL_SERVER, message_id="A1"))

    response = post(client, "/webhook/evolution", naming(STRANGER, message_id="A2"))

    # 200: a real server that moved must not lose the message for good.
    assert response.status_code == 200
    assert response.json() == {
        "status": "ignored",
        "detail": "server_url is not the pinned legacy reply server",
        "message_id": "A2",
    }
    row = InboundMessage.objects.get(message_id="A2")
    assert (row.status, row.reply_server_url, row.reply_api_key) == (Status.IGNORED, "", "")


@pytest.mark.django_db
def test_the_pinned_server_matches_whatever_its_case_or_trailing_slash(
    client: Client, legacy
) -> None:
    post(client, "/webhook/evolution", naming(REAL_SERVER, message_id="A1"))

    response = post(
        client, "/webhook/evolution", naming("https://EVOLUTION.example.com/", message_id="A2")
    )

    assert response.json()["status"] == "queued"


@pytest.mark.django_db
def test_a_link_local_server_url_is_never_pinned(client: Client, legacy) -> None:
    response = post(client, "/webhook/evolution", naming("http://169.254.169.254", message_id="A1"))

    assert response.json()["status"] == "ignored"
    assert response.json()["detail"].startswith("server_url refused:")
    legacy.refresh_from_db()
    assert legacy.legacy_server_url == ""


@pytest.mark.django_db
def test_a_delivery_without_a_server_to_reply_to_is_kept_unanswered(client: Client, legacy) -> None:
    body = naming(REAL_SERVER, message_id="A1")
    del body["server_url"]

    response = post(client, "/webhook/evolution", body)

    assert response.json()["detail"] == "no server_url and apikey to reply with"
    assert InboundMessage.objects.get().status == Status.IGNORED


@pytest.mark.django_db
def test_a_strangers_connection_update_is_not_the_instances_state(client: Client, legacy) -> None:
    post(client, "/webhook/evolution", naming(REAL_SERVER, message_id="A1"))
    update = {
        "event": "connection.update",
        "instance": "tenant-acme-01",
        "server_url": STRANGER,
        "apikey": "x",
        "data": {"instance": "tenant-acme-01", "state": "close", "statusReason": 401},
    }

    response = post(client, "/webhook/evolution", update)

    assert response.json()["status"] == "ignored"
    assert not ConnectionState.objects.filter(instance=legacy).exists()


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_the_agents_answer_goes_to_the_pinned_server_only(
    make_instance, upstream: Upstream
) -> None:
    legacy = await sync_to_async(make_instance)(
        name="default",
        is_default=True,
        legacy_mode=True,
        evolution_url="",
        evolution_key="",
        whatsapp_instance="",
        webhook_token="",
        legacy_server_url=REAL_SERVER,
    )
    stranger = await sync_to_async(record_delivery)(
        instance=legacy, body=naming(STRANGER, message_id="A2")
    )
    real = await sync_to_async(record_delivery)(
        instance=legacy, body=naming(REAL_SERVER, message_id="A3", apikey="real-key")
    )
    assert (stranger.outcome, real.outcome) == ("ignored", "queued")

    [batch] = await sync_to_async(claim_conversations)(limit=10)
    async with upstream.client() as http:
        await handle_batch(batch=batch, http=http)

    assert len(upstream.agent_calls) == 1
    assert [str(r.url.copy_with(path="/")) for r in upstream.sent] == [f"{REAL_SERVER}/"]
    assert upstream.sent[0].headers["apikey"] == "real-key"
    assert not [r for r in upstream.requests if r.url.host == "relay.attacker.test"]


# --- moving the default ----------------------------------------------------------


@pytest.mark.django_db
def test_moving_the_default_renames_no_session(legacy, make_instance) -> None:
    acme = make_instance(name="acme")

    def names() -> tuple[str, str]:
        return tuple(  # type: ignore[return-value]
            session_name(instance=InstanceConfig.objects.get(pk=i.pk), phone=PHONE, chat_jid="")
            for i in (legacy, acme)
        )

    before = names()
    services.set_default_instance(name="acme")
    after = names()

    assert before == (PHONE, f"acme_{PHONE}")
    assert after == before


@pytest.mark.django_db
def test_the_old_default_still_replies_on_its_own_route_after_the_move(
    client: Client, legacy, make_instance
) -> None:
    post(client, "/webhook/evolution", naming(REAL_SERVER, message_id="A1"))
    make_instance(name="acme")
    services.set_default_instance(name="acme")

    old = InstanceConfig.objects.get(name="default")
    old.full_clean()  # still a valid instance: legacy mode does not depend on the flag
    response = post(client, "/webhook/evolution/default", naming(REAL_SERVER, message_id="A2"))

    assert response.json()["status"] == "queued"
    assert InboundMessage.objects.get(message_id="A2").reply_server_url == REAL_SERVER


@pytest.mark.django_db
def test_the_instance_seeded_from_the_env_is_in_legacy_mode(settings) -> None:
    settings.AGENT_API_KEY = "agent-key"
    settings.EVOLUTION_API_URL = ""
    settings.EVOLUTION_API_KEY = ""

    seeded = services.seed_default_instance().instance

    assert (seeded.is_default, seeded.legacy_mode, seeded.legacy_server_url) == (True, True, "")


@pytest.mark.django_db
def test_storing_leaves_its_instance_argument_as_it_came(legacy) -> None:
    # The database thread runs a failed batch's calls again: the second run
    # must pin again, not trust a pin the first run rolled back.
    record_delivery(instance=legacy, body=naming(REAL_SERVER, message_id="A1"))

    assert legacy.legacy_server_url == ""
    legacy.refresh_from_db()
    assert legacy.legacy_server_url == REAL_SERVER
