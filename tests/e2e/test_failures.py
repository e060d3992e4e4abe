"""How the running hub behaves when the agent or Evolution fail."""

import json
import time
from collections.abc import Callable

import pytest

from tests.conftest import EVOLUTION_FIXTURES
from tests.e2e.conftest import AGENT_MAX_ATTEMPTS, Tenant
from tests.e2e.harness import wait_until

UNAVAILABLE = (503, {"detail": "Service Unavailable"})


def test_an_agent_503_is_retried_until_it_answers(make_tenant: Callable[..., Tenant]) -> None:
    tenant = make_tenant()
    tenant.agent.answer_next("/run", UNAVAILABLE, UNAVAILABLE)
    message_id, _ = tenant.send_text("are you there?")
    row = tenant.wait_finished(message_id)
    assert row["status"] == "replied"
    assert (row["agent_attempts"], row["used_fallback"]) == (3, 0)
    assert len(tenant.agent.received()) == 3
    [reply] = tenant.evolution.received("/message/sendText/")
    assert reply.body["text"] == "reply: [Maria Souza]: are you there?"


def test_an_agent_that_stays_down_gets_the_fallback_after_the_last_attempt(
    make_tenant: Callable[..., Tenant],
) -> None:
    tenant = make_tenant()
    tenant.agent.failure = UNAVAILABLE
    message_id, _ = tenant.send_text("anyone?")
    row = tenant.wait_finished(message_id)
    assert row["status"] == "replied"
    assert row["used_fallback"] == 1
    assert row["agent_attempts"] == AGENT_MAX_ATTEMPTS
    assert "agent answered 503" in row["last_error"]
    assert len(tenant.agent.received()) == AGENT_MAX_ATTEMPTS
    [reply] = tenant.evolution.received("/message/sendText/")
    assert reply.body == {"number": "5511987654321", "text": f"Sorry from {tenant.name}"}


def test_an_unreachable_agent_is_retried_once_it_is_back(
    make_tenant: Callable[..., Tenant],
) -> None:
    tenant = make_tenant()
    tenant.agent.pause()
    message_id, _ = tenant.send_text("hello again")

    def failed_once() -> bool:
        row = tenant.row(message_id)
        return bool(row and row["agent_attempts"] >= 1)

    wait_until(failed_once, interval=0.01, what="a failed agent call")
    tenant.agent.resume()
    row = tenant.wait_finished(message_id)
    assert row["status"] == "replied"
    assert row["used_fallback"] == 0
    assert row["agent_attempts"] >= 2
    assert len(tenant.agent.received()) == 1  # refused calls never arrived
    [reply] = tenant.evolution.received("/message/sendText/")
    assert reply.body["text"] == "reply: [Maria Souza]: hello again"


def test_an_agent_timeout_is_not_retried_and_the_fallback_is_sent(
    make_tenant: Callable[..., Tenant],
) -> None:
    tenant = make_tenant(agent_timeout=1, agent_delay=2.0)
    message_id, _ = tenant.send_text("slow question")
    row = tenant.wait_finished(message_id)
    assert row["status"] == "replied"
    assert row["used_fallback"] == 1
    assert "timed out" in row["last_error"]
    # The agent may have acted on the first call: a second one could act twice.
    assert len(tenant.agent.received()) == 1
    [reply] = tenant.evolution.received("/message/sendText/")
    assert reply.body["text"] == f"Sorry from {tenant.name}"


def test_replies_wait_out_an_evolution_outage_and_keep_the_chat_order(
    make_tenant: Callable[..., Tenant],
) -> None:
    tenant = make_tenant()
    tenant.evolution.failure = (503, json.loads(
        (EVOLUTION_FIXTURES / "api" / "error-503-license-required-v2.4.json").read_text()
    ))
    outage_started = time.monotonic()
    ids = [tenant.send_text(f"part {n}")[0] for n in range(3)]
    # A few seconds down, with several failed attempts at the first reply.
    tenant.evolution.wait_for("/message/sendText/", 3, timeout=10)
    time.sleep(max(0.0, 2.0 - (time.monotonic() - outage_started)))
    tenant.evolution.failure = None

    rows = [tenant.wait_finished(message_id) for message_id in ids]
    assert [row["status"] for row in rows] == ["replied"] * 3
    assert rows[0]["send_attempts"] >= 3
    sent = [reply.body["text"] for reply in tenant.evolution.sent()]
    assert sent == [f"reply: [Maria Souza]: part {n}" for n in range(3)]
    # The agent was asked once per message: its reply is kept across send retries.
    assert len(tenant.agent.received()) == 3


def test_an_evolution_400_fails_the_message_with_the_error_and_no_retry(
    make_tenant: Callable[..., Tenant],
) -> None:
    tenant = make_tenant()
    error = json.loads((EVOLUTION_FIXTURES / "api" / "error-400-not-on-whatsapp.json").read_text())
    tenant.evolution.failure = (400, error)
    message_id, _ = tenant.send_text("to a number not on WhatsApp")
    row = tenant.wait_finished(message_id)
    assert row["status"] == "failed"
    assert row["send_attempts"] == 1
    assert "Evolution answered 400" in row["last_error"]
    assert '"exists": false' in row["last_error"]
    assert len(tenant.evolution.received("/message/sendText/")) == 1
    assert len(tenant.agent.received()) == 1


@pytest.mark.parametrize("answer", ["AUTOMAGIK: order 42 cancelled", "", "   "])
def test_a_silent_or_empty_agent_answer_sends_nothing(
    make_tenant: Callable[..., Tenant], answer: str
) -> None:
    tenant = make_tenant()
    tenant.agent.on("/run", lambda record: (200, {"message": answer, "success": True}))
    message_id, _ = tenant.send_text("cancel my order")
    row = tenant.wait_finished(message_id)
    assert row["status"] == "replied"
    assert row["reply_text"] == ""
    assert json.loads(row["agent_response"])["message"] == answer
    assert tenant.evolution.received("/message/sendText/") == []


def test_a_reply_whose_connection_dropped_after_the_request_is_not_sent_twice(
    make_tenant: Callable[..., Tenant],
) -> None:
    tenant = make_tenant()
    # Evolution sends the text, then the connection drops before its answer.
    tenant.evolution.drop_sends = 1
    message_id, _ = tenant.send_text("did it go?")
    row = tenant.wait_finished(message_id)
    assert row["status"] == "replied"
    time.sleep(0.3)  # a second send would arrive now
    [reply] = tenant.evolution.sent()
    assert reply.body["text"] == "reply: [Maria Souza]: did it go?"
    # Asked once: the chat's own messages held the reply.
    assert len(tenant.evolution.received("/chat/findMessages/")) == 1
    [outbound] = tenant.hub.query(
        "SELECT status, evolution_id FROM webhooks_outboundmessage WHERE in_reply_to_id = ?",
        [row["id"]],
    )
    [kept] = [m for m in tenant.evolution.stored if m["key"]["fromMe"]]
    assert outbound == {"status": "sent", "evolution_id": kept["key"]["id"]}


def test_an_evolution_that_keeps_no_messages_gets_a_dropped_reply_again_and_the_row_says_so(
    make_tenant: Callable[..., Tenant],
) -> None:
    tenant = make_tenant()
    tenant.evolution.keeps_messages = False  # DATABASE_SAVE_DATA_NEW_MESSAGE=false
    tenant.evolution.drop_sends = 1
    message_id, _ = tenant.send_text("once or twice?")
    row = tenant.wait_finished(message_id)
    assert row["status"] == "replied"
    texts = [reply.body["text"] for reply in tenant.evolution.sent()]
    assert texts == ["reply: [Maria Souza]: once or twice?"] * 2  # at least once
    assert row["last_error"] == "Evolution keeps no messages: sent again, may be a duplicate"
    statuses = tenant.hub.query(
        "SELECT status FROM webhooks_outboundmessage WHERE in_reply_to_id = ? ORDER BY id",
        [row["id"]],
    )
    assert [s["status"] for s in statuses] == ["unconfirmed", "sent"]
