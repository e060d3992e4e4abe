"""The message pipeline end to end: webhook -> inbox -> agent -> Evolution, as processes."""

import copy
import json
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from instances.validators import EVENT_SLUGS
from tests.conftest import EVOLUTION_FIXTURES, load_fixture
from tests.e2e.conftest import PHONE, Tenant
from tests.e2e.harness import Hub, percentile, text_delivery, unique, wait_until
from tests.fakes import FakeAgent, FakeEvolution

CAPTURED = EVOLUTION_FIXTURES / "captured-2.3.7" / "deliveries"
LID = "123456789012345@lid"

# Answered fixtures: the number the reply goes to and the agent's message_type.
ANSWERED = {
    "messages-upsert-text.json": (PHONE, "text"),
    "messages-upsert-extended-text-reply.json": (PHONE, "text"),
    "messages-upsert-extended-text-link.json": (PHONE, "text"),
    "messages-upsert-image-caption.json": (PHONE, "image"),
    "messages-upsert-image-base64.json": (PHONE, "image"),
    "messages-upsert-image-legacy-v2.2.json": (PHONE, "image"),
    "messages-upsert-audio.json": (PHONE, "audio"),
    "messages-upsert-audio-speechtotext.json": (PHONE, "audio"),
    "messages-upsert-video.json": (PHONE, "video"),
    "messages-upsert-document.json": (PHONE, "document"),
    "messages-upsert-location.json": (PHONE, "text"),
    "messages-upsert-contact.json": (PHONE, "text"),
    "messages-upsert-lid-v2.3.6.json": (PHONE, "text"),
    "messages-upsert-lid-v2.3.7.json": (PHONE, "text"),
    "messages-upsert-lid-v2.4.0-rc2.json": (PHONE, "text"),
    "messages-upsert-lid-only.json": (LID, "text"),
    "messages-upsert-text-legacy-v2.2.json": (PHONE, "text"),
    "messages-upsert-v1.8-extended-text.json": (PHONE, "text"),
}
IGNORED = {
    # Written from the business's phone: a human takes the chat over.
    "messages-upsert-fromme.json": "human takeover",
    "messages-upsert-status-broadcast.json": "broadcast",
    "messages-upsert-group.json": "group",
    "messages-upsert-reaction.json": "reaction",
    "messages-upsert-sticker.json": "sticker",
}
OTHER_EVENTS = sorted(
    path.name
    for path in EVOLUTION_FIXTURES.glob("*.json")
    if path.name not in ANSWERED and path.name not in IGNORED
)
CAPTURED_DELIVERIES = sorted(path.name for path in CAPTURED.glob("*.json"))


def with_new_id(body: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """A copy of a messages.upsert body under a fresh key.id (fixtures share ids)."""
    body = copy.deepcopy(body)
    message_id = unique("FX").upper()
    body["data"]["key"]["id"] = message_id
    return body, message_id


# --- tenants -------------------------------------------------------------------
def test_each_tenant_and_the_legacy_route_reach_only_their_own_agent_and_evolution(
    make_tenant: Callable[..., Tenant],
) -> None:
    alpha = make_tenant()
    beta = make_tenant(session_id_prefix="beta-")
    legacy = make_tenant(
        is_default=True, legacy_mode=True, evolution_url="", evolution_key="",
        whatsapp_instance="", webhook_token="", session_id_prefix="",
    )
    # The legacy instance replies through the server named in the delivery (pinned).
    legacy_evolution = FakeEvolution().start()
    stranger = FakeEvolution().start()
    try:
        # One message id on two tenants is two messages: deduplication is per tenant.
        shared_id = unique("SAME").upper()
        alpha_id, alpha_response = alpha.send_text("alpha here", message_id=shared_id)
        beta_id, beta_response = beta.send_text("beta here", message_id=shared_id)
        legacy_body = text_delivery(
            message_id=unique("LEGACY"), text="legacy here", instance="legacy-wa",
            server_url=legacy_evolution.url, apikey="legacy-delivery-key",
        )
        legacy_response = legacy.post(legacy_body, path="/webhook/evolution")
        legacy_id = legacy_body["data"]["key"]["id"]
        for response in (alpha_response, beta_response, legacy_response):
            assert response.status_code == 200 and response.json()["status"] == "queued"

        for tenant, message_id in ((alpha, alpha_id), (beta, beta_id), (legacy, legacy_id)):
            assert tenant.wait_finished(message_id)["status"] == "replied"
        # Anyone can post to the unauthenticated legacy route: naming their own
        # server gets them nothing, neither the agent's answer nor a typing presence.
        relay_body = text_delivery(
            message_id=unique("RELAY"), text="legacy here", instance="legacy-wa",
            server_url=stranger.url, apikey="stranger-key",
        )
        relayed = legacy.post(relay_body, path="/webhook/evolution").json()
        assert relayed["detail"] == "server_url is not the pinned legacy reply server"

        expected = [
            (alpha, alpha.evolution, f"{alpha.name}_{PHONE}", "alpha here"),
            (beta, beta.evolution, f"beta-{PHONE}", "beta here"),
            (legacy, legacy_evolution, PHONE, "legacy here"),
        ]
        for tenant, evolution, session, text in expected:
            fields = tenant.fields
            [call] = tenant.agent.received()
            assert call.path == f"/api/v1/agent/{fields['default_agent']}/run"
            assert call.headers["x-api-key"] == fields["agent_api_key"]
            assert call.body["session_name"] == session
            assert call.body["message_content"] == f"[Maria Souza]: {text}"
            assert "apikey" not in call.body["channel_payload"]
            [reply] = evolution.received("/message/sendText/")
            assert reply.body == {"number": PHONE, "text": f"reply: [Maria Souza]: {text}"}
            # Everything a tenant's Evolution saw (typing included) is that tenant's.
            wa_path = fields["whatsapp_instance"] or "legacy-wa"
            key = fields["evolution_key"] or "legacy-delivery-key"
            for request in evolution.received():
                assert request.path.endswith(f"/{wa_path}"), request.path
                assert request.headers["apikey"] == key
        assert legacy.evolution.received() == []
        assert stranger.received() == []
        # The delivery's apikey is dropped once the reply is sent.
        assert legacy.row(legacy_id)["reply_api_key"] == ""
    finally:
        legacy_evolution.stop()
        stranger.stop()


# --- routing and authentication --------------------------------------------------
def test_an_unknown_instance_is_404_and_nothing_is_called(
    make_tenant: Callable[..., Tenant],
) -> None:
    tenant = make_tenant()
    body = tenant.delivery(text="to nobody")
    response = tenant.post(body, path="/webhook/evolution/no-such-tenant")
    assert response.status_code == 404
    tenant.barrier()
    assert [call.body["message_content"] for call in tenant.agent.received()] == [
        "[Maria Souza]: barrier"
    ]
    assert tenant.row(body["data"]["key"]["id"]) is None


def test_an_inactive_instance_stores_its_messages_unanswered(
    make_tenant: Callable[..., Tenant],
) -> None:
    tenant = make_tenant(is_active=False)
    message_id, response = tenant.send_text()
    assert response.status_code == 200
    assert response.json()["detail"] == "instance inactive"
    row = tenant.row(message_id)
    assert row is not None and row["status"] == "ignored"
    assert tenant.agent.received() == []


def test_a_bad_token_is_401_in_the_header_and_in_the_query(
    make_tenant: Callable[..., Tenant],
) -> None:
    tenant = make_tenant()
    server = tenant.hub.server
    body = tenant.delivery()
    assert server.post_webhook(tenant.path, body, token="wrong").status_code == 401
    assert server.post_webhook(tenant.path, body).status_code == 401
    bad_query = server.post_webhook(tenant.path, body, params={"token": "wrong"})
    assert bad_query.status_code == 401
    good_query = server.post_webhook(tenant.path, body, params={"token": tenant.token})
    assert good_query.status_code == 200
    assert good_query.json()["status"] == "queued"
    assert tenant.wait_finished(body["data"]["key"]["id"])["status"] == "replied"


@pytest.mark.parametrize("raw", [b"[1, 2]", b"not json", b'"text"', b""])
def test_a_body_that_is_not_a_json_object_is_400(
    make_tenant: Callable[..., Tenant], raw: bytes
) -> None:
    tenant = make_tenant()
    response = tenant.post(raw)
    assert response.status_code == 400
    assert tenant.rows() == []


@pytest.mark.parametrize("suffix", ["/", "/messages-upsert", "/messages-upsert/"])
def test_the_trailing_slash_and_the_by_events_suffix_reach_the_instance(
    make_tenant: Callable[..., Tenant], suffix: str
) -> None:
    tenant = make_tenant()
    body = tenant.delivery(text="by events")
    response = tenant.post(body, path=tenant.path + suffix)
    assert response.status_code == 200 and response.json()["status"] == "queued"
    assert tenant.wait_finished(body["data"]["key"]["id"])["status"] == "replied"
    assert len(tenant.evolution.received("/message/sendText/")) == 1


def test_the_by_events_route_without_a_name_reaches_the_default_instance(
    make_tenant: Callable[..., Tenant],
) -> None:
    tenant = make_tenant(is_default=True)
    body = tenant.delivery(text="to the default")
    response = tenant.post(body, path="/webhook/evolution/messages-upsert")
    assert response.status_code == 200 and response.json()["status"] == "queued"
    assert tenant.wait_finished(body["data"]["key"]["id"])["status"] == "replied"
    [reply] = tenant.evolution.received("/message/sendText/")
    assert reply.path == f"/message/sendText/{tenant.fields['whatsapp_instance']}"


# --- every fixture ------------------------------------------------------------------
@pytest.mark.parametrize("fixture", sorted(ANSWERED))
def test_every_answerable_fixture_gets_one_reply_to_the_right_number(
    make_tenant: Callable[..., Tenant], fixture: str
) -> None:
    number, agent_type = ANSWERED[fixture]
    tenant = make_tenant()
    body, message_id = with_new_id(load_fixture(fixture))
    response = tenant.post(body)
    assert response.status_code == 200 and response.json()["status"] == "queued", response.text
    row = tenant.wait_finished(message_id)
    assert row["status"] == "replied", row["last_error"]
    [call] = tenant.agent.received()
    assert call.body["message_type"] == agent_type
    [reply] = tenant.evolution.received("/message/sendText/")
    assert reply.body["number"] == number
    assert reply.body["text"] == f"reply: {call.body['message_content']}"


@pytest.mark.parametrize("fixture", sorted(IGNORED))
def test_fixtures_the_hub_must_not_answer_are_stored_as_ignored(
    make_tenant: Callable[..., Tenant], fixture: str
) -> None:
    tenant = make_tenant()
    body, message_id = with_new_id(load_fixture(fixture))
    response = tenant.post(body)
    assert response.status_code == 200
    assert response.json()["status"] == "ignored"
    row = tenant.row(message_id)
    assert row is not None
    assert (row["status"], row["ignore_reason"]) == ("ignored", IGNORED[fixture])
    tenant.barrier()
    assert len(tenant.agent.received()) == 1  # the barrier's


@pytest.mark.parametrize("fixture", OTHER_EVENTS)
def test_other_events_are_answered_ignored(
    make_tenant: Callable[..., Tenant], fixture: str
) -> None:
    tenant = make_tenant()
    response = tenant.post(load_fixture(fixture))
    assert response.status_code == 200
    assert response.json()["status"] == "ignored"
    assert tenant.rows() == []


@pytest.mark.parametrize("fixture", CAPTURED_DELIVERIES)
def test_deliveries_captured_from_evolution_2_3_7_are_accepted(
    make_tenant: Callable[..., Tenant], fixture: str
) -> None:
    tenant = make_tenant()
    captured = json.loads((CAPTURED / fixture).read_text())
    # With byEvents the event's slug ends the path, as it did when captured.
    slug = Path(captured["path"]).name
    path = f"{tenant.path}/{slug}" if slug in EVENT_SLUGS else tenant.path
    response = tenant.post(captured["body_json"], path=path)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "ignored"
    states = connection_states(tenant.hub, tenant.name)
    if captured["body_json"]["event"] == "connection.update":
        assert states == [captured["body_json"]["data"]["state"]]
    else:
        assert states == []


def test_a_flood_of_connection_updates_leaves_one_row_with_the_last_state(
    make_tenant: Callable[..., Tenant],
) -> None:
    tenant = make_tenant()
    states = ["connecting", "open", "close"] * 6 + ["connecting", "open"]
    for state in states:
        body = load_fixture("connection-update-open.json")
        body["data"]["state"] = state
        response = tenant.post(body)
        assert response.status_code == 200 and response.json()["status"] == "ignored"
    assert len(states) == 20
    assert connection_states(tenant.hub, tenant.name) == ["open"]


def connection_states(hub: Hub, name: str) -> list[str]:
    rows = hub.query(
        "SELECT c.state FROM webhooks_connectionstate c "
        "JOIN instances_instanceconfig i ON i.id = c.instance_id WHERE i.name = ?",
        [name],
    )
    return [row["state"] for row in rows]


# --- duplicates and stale messages ----------------------------------------------------
def test_a_delivery_sent_three_times_is_answered_once(
    make_tenant: Callable[..., Tenant],
) -> None:
    tenant = make_tenant()
    body = tenant.delivery(text="once only")
    statuses = [tenant.post(body).json()["status"] for _ in range(3)]
    assert statuses == ["queued", "duplicate", "duplicate"]
    assert tenant.wait_finished(body["data"]["key"]["id"])["status"] == "replied"
    # Evolution retrying after the reply went out changes nothing either.
    assert tenant.post(body).json()["status"] == "duplicate"
    tenant.barrier()
    contents = [call.body["message_content"] for call in tenant.agent.received()]
    assert contents.count("[Maria Souza]: once only") == 1
    texts = [reply.body["text"] for reply in tenant.evolution.received("/message/sendText/")]
    assert texts.count("reply: [Maria Souza]: once only") == 1
    assert len(tenant.rows()) == 2


def test_concurrent_copies_of_a_delivery_are_queued_once(
    make_tenant: Callable[..., Tenant],
) -> None:
    tenant = make_tenant()
    body = tenant.delivery(text="at the same time")
    server = tenant.hub.server

    def post(_: int) -> str:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            response = client.post(
                tenant.path, json=body, headers={"X-Webhook-Token": tenant.token}
            )
        return response.json()["status"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = Counter(pool.map(post, range(8)))
    assert statuses == {"queued": 1, "duplicate": 7}
    assert tenant.wait_finished(body["data"]["key"]["id"])["status"] == "replied"
    tenant.barrier()
    assert len(tenant.agent.received()) == 2  # this one and the barrier


def test_a_stale_message_is_ignored_without_calling_the_agent(
    make_tenant: Callable[..., Tenant],
) -> None:
    tenant = make_tenant()
    body, message_id = with_new_id(load_fixture("messages-upsert-text.json", fresh=False))
    response = tenant.post(body)
    assert response.status_code == 200
    assert response.json() == {"status": "ignored", "message_id": message_id, "detail": "stale"}
    tenant.barrier()
    assert len(tenant.agent.received()) == 1  # the barrier's
    assert tenant.row(message_id)["ignore_reason"] == "stale"


# --- overhead -----------------------------------------------------------------------
def test_the_hub_adds_little_latency_to_each_message(start_hub: Callable[..., Hub]) -> None:
    """Webhook -> agent request, and agent reply -> sendText, on an idle hub (production
    timings: the worker must be woken by the webhook, not find it at its next poll)."""
    hub = start_hub(fast=False)
    hub.start()
    evolution, agent = FakeEvolution().start(), FakeAgent().start()
    try:
        hub.create_instance(
            name="latency", evolution_url=evolution.url, evolution_key="ek",
            agent_api_url=agent.url, agent_api_key="ak", webhook_token="tok",
        )
        server = hub.server
        to_agent: list[float] = []
        to_evolution: list[float] = []
        webhook: list[float] = []
        count = 200
        for index in range(count):
            body = text_delivery(message_id=f"LAT{index}", text=f"latency {index}")
            started = time.time()
            response = server.post_webhook("/webhook/evolution/latency", body, token="tok")
            webhook.append(time.time() - started)
            assert response.json()["status"] == "queued"
            replies = evolution.wait_for("/message/sendText/", index + 1, timeout=10)
            assert len(replies) == index + 1
            call = agent.received()[index]
            assert call.body["message_content"].endswith(f"latency {index}")
            answered = wait_until(lambda call=call: call.answered_at, timeout=5)
            to_agent.append(call.at - started)
            to_evolution.append(replies[index].at - answered)
    finally:
        evolution.stop()
        agent.stop()

    def ms(values: list[float], fraction: float) -> float:
        return percentile(values, fraction) * 1000

    print(f"\nper-message overhead over {count} sequential messages (ms):")
    for label, values in (
        ("webhook response", webhook),
        ("webhook sent -> agent request", to_agent),
        ("agent reply -> sendText", to_evolution),
    ):
        print(f"  {label:32} p50 {ms(values, 0.5):7.1f}  p99 {ms(values, 0.99):7.1f}")
    # Generous for a loaded 2-core machine; a worker not woken by the webhook
    # (waiting for its 1 s poll) would be far above.
    assert ms(to_agent, 0.5) < 100
    assert ms(to_evolution, 0.5) < 100
    assert ms(to_agent, 0.99) < 1000
    assert ms(to_evolution, 0.99) < 1000
