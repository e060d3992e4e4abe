"""Conversations end to end: the hub as processes, the fakes on loopback.

Each row of the conversation settings: human takeover and the hub's own echo,
debounce (also across a killed server), groups, allow and block lists, reset,
and one tenant's slow agent not holding back another tenant.
"""

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.e2e.conftest import Tenant
from tests.e2e.harness import Hub, text_delivery, unique, wait_until

CHAT_A = "5511911110001"
CHAT_B = "5511911110002"
GROUP = "120363025246125888@g.us"


def post(tenant: Tenant, text: str, **fields: Any) -> tuple[str, dict[str, Any]]:
    """Deliver a text; (message id, the hub's answer)."""
    message_id = unique("CV").upper()
    response = tenant.post(text_delivery(message_id=message_id, text=text, **fields))
    assert response.status_code == 200, response.text
    return message_id, response.json()


def agent_texts(tenant: Tenant) -> list[str]:
    return [r.body["message_content"] for r in tenant.agent.received("/api/v1/agent/")]


def sends(tenant: Tenant) -> list[dict[str, Any]]:
    return [r.body for r in tenant.evolution.sent()]


def conversation(tenant: Tenant, phone: str) -> dict[str, Any]:
    [row] = tenant.hub.query(
        "SELECT c.* FROM webhooks_conversation c JOIN instances_instanceconfig i "
        "ON i.id = c.instance_id WHERE i.name = ? AND c.chat_jid = ?",
        [tenant.name, f"{phone}@s.whatsapp.net"],
    )
    return row


def test_a_human_s_message_pauses_only_its_chat_and_the_bot_resumes_after_the_window(
    make_tenant: Callable[..., Tenant],
) -> None:
    shop = make_tenant(handoff_minutes=1)
    _, owner = post(shop, "Oi Maria, aqui é o Pedro", phone=CHAT_A, from_me=True)
    _, quiet = post(shop, "Oi Pedro, e o preço?", phone=CHAT_A)
    other, _ = post(shop, "bom dia", phone=CHAT_B)

    assert (owner["detail"], quiet["detail"]) == ("human takeover", "human takeover")
    assert shop.wait_finished(other)["status"] == "replied"
    assert [s["number"] for s in sends(shop)] == [CHAT_B]

    # The window, shortened to two seconds from now in the database.
    until = datetime.now(UTC) + timedelta(seconds=2)
    shop.hub.execute(
        "UPDATE webhooks_conversation SET paused_until = ? WHERE id = ?",
        [shop.hub.db_time(until), conversation(shop, CHAT_A)["id"]],
    )
    _, still = post(shop, "alô?", phone=CHAT_A)
    assert still["detail"] == "human takeover"
    wait_until(lambda: datetime.now(UTC) > until + timedelta(seconds=0.2), timeout=5)
    again, answer = post(shop, "alguém?", phone=CHAT_A)

    assert answer["status"] == "queued"
    assert shop.wait_finished(again)["status"] == "replied"
    assert [s["number"] for s in sends(shop)] == [CHAT_B, CHAT_A]


def test_the_hub_s_own_echo_does_not_pause_the_chat(make_tenant: Callable[..., Tenant]) -> None:
    shop = make_tenant()
    first, _ = post(shop, "oi", phone=CHAT_A)
    shop.wait_finished(first)
    [sent] = shop.evolution.sent()

    echo = _echo(shop, sent)
    second, answer = post(shop, "e agora?", phone=CHAT_A)

    assert echo["detail"] == "from_me"
    assert answer["status"] == "queued"
    assert shop.wait_finished(second)["status"] == "replied"
    assert conversation(shop, CHAT_A)["pause_reason"] == ""


def _echo(tenant: Tenant, sent: Any) -> dict[str, Any]:
    """Evolution's messages.upsert of the hub's own reply: fromMe, the id sendText gave."""
    body = text_delivery(
        message_id=sent.answer["key"]["id"], text=sent.body["text"], phone=CHAT_A, from_me=True
    )
    return tenant.post(body).json()


def test_three_quick_messages_with_debounce_get_one_agent_call_and_one_reply(
    make_tenant: Callable[..., Tenant],
) -> None:
    shop = make_tenant(debounce_seconds=1)
    ids = [post(shop, text, phone=CHAT_A)[0] for text in ("oi", "tudo bem?", "quanto custa?")]

    last = shop.wait_finished(ids[-1], timeout=10)

    assert agent_texts(shop) == ["[Maria Souza]: oi\ntudo bem?\nquanto custa?"]
    assert len(sends(shop)) == 1
    assert last["status"] == "replied"
    for folded in ids[:-1]:
        row = shop.row(folded)
        assert (row["status"], row["ignore_reason"]) == ("ignored", "debounced")
        assert row["answered_by_id"] == last["id"]


def test_a_burst_is_answered_once_when_the_server_is_killed_inside_the_window(
    start_hub: Callable[..., Hub], tenant_on: Callable[..., Tenant]
) -> None:
    hub = start_hub()
    hub.start(servers=1)
    shop = tenant_on(hub, debounce_seconds=3)
    ids = [post(shop, text, phone=CHAT_A)[0] for text in ("oi", "tudo bem?", "quanto custa?")]

    hub.server.kill()  # inside the window: nothing has gone to the agent yet
    assert agent_texts(shop) == []
    hub.start_server()
    last = hub.wait_for_message(shop.name, ids[-1], timeout=20)

    assert last["status"] == "replied"
    assert agent_texts(shop) == ["[Maria Souza]: oi\ntudo bem?\nquanto custa?"]
    assert len(sends(shop)) == 1


def test_group_messages_are_answered_only_as_the_policy_says_and_the_reply_quotes_them(
    make_tenant: Callable[..., Tenant],
) -> None:
    ignoring = make_tenant()
    mentions = make_tenant(group_policy="mentions", bot_ids=["5511900000001"])
    everything = make_tenant(group_policy="all")

    _, ignored = post(ignoring, "@bot oi", group=GROUP, phone=CHAT_A)
    _, unmentioned = post(mentions, "bom dia pessoal", group=GROUP, phone=CHAT_A)
    mentioned, _ = post(
        mentions,
        "@bot abrem domingo?",
        group=GROUP,
        phone=CHAT_A,
        mentions=["5511900000001@s.whatsapp.net"],
    )
    any_message, _ = post(everything, "alguém?", group=GROUP, phone=CHAT_B)

    assert (ignored["detail"], unmentioned["detail"]) == ("group", "no mention")
    for tenant, message_id, sender in (
        (mentions, mentioned, CHAT_A),
        (everything, any_message, CHAT_B),
    ):
        assert tenant.wait_finished(message_id)["status"] == "replied"
        [sent] = sends(tenant)
        assert sent["number"] == GROUP
        assert sent["quoted"]["key"]["id"] == message_id
        assert sent["quoted"]["key"]["participant"] == f"{sender}@s.whatsapp.net"
        [asked] = [r.body for r in tenant.agent.received("/api/v1/agent/")]
        assert asked["session_name"].endswith("120363025246125888")
        assert asked["user"]["user_data"]["group_jid"] == GROUP
    assert sends(ignoring) == []


def test_block_and_allow_lists_with_a_wildcard(make_tenant: Callable[..., Tenant]) -> None:
    shop = make_tenant(allow_list=["5511911*"], block_list=["5511911119999"])

    allowed, _ = post(shop, "oi", phone="5511911110001")
    _, blocked = post(shop, "oi", phone="5511911119999")
    _, outside = post(shop, "oi", phone="5521988887777")

    assert shop.wait_finished(allowed)["status"] == "replied"
    assert (blocked["detail"], outside["detail"]) == ("blocked", "not allowed")
    assert [s["number"] for s in sends(shop)] == ["5511911110001"]


def test_reset_gives_the_chat_a_new_session_name(make_tenant: Callable[..., Tenant]) -> None:
    shop = make_tenant(session_id_prefix="shop-")
    shop.wait_finished(post(shop, "oi", phone=CHAT_A)[0])
    reset, _ = post(shop, "/reset", phone=CHAT_A)
    shop.wait_finished(reset)
    shop.wait_finished(post(shop, "oi de novo", phone=CHAT_A)[0])

    sessions = [r.body["session_name"] for r in shop.agent.received("/api/v1/agent/")]
    assert sessions == [f"shop-{CHAT_A}", f"shop-{CHAT_A}-2"]
    assert [s["text"] for s in sends(shop)][1] == "Conversation restarted."


def test_a_tenant_with_a_slow_agent_and_many_chats_does_not_delay_another_s_reply(
    start_hub: Callable[..., Hub], tenant_on: Callable[..., Tenant]
) -> None:
    # Four worker slots; the slow tenant may hold two of them.
    hub = start_hub(env={"WORKER_CONCURRENCY": "4"})
    hub.start(servers=1)
    slow = tenant_on(hub, agent_delay=2.0, max_concurrent=2)
    fast = tenant_on(hub)
    for chat in range(8):
        post(slow, f"pedido {chat}", phone=f"55119000000{chat:02d}")
    slow.agent.wait_for("/api/v1/agent/", 2, timeout=10)

    quick, _ = post(fast, "oi", phone=CHAT_A)
    fast.wait_finished(quick, timeout=10)

    [reply] = fast.evolution.sent()
    answered = [r.answered_at for r in slow.agent.received("/api/v1/agent/") if r.answered_at]
    # Answered while the slow tenant's first two calls were still running.
    assert answered == [] or reply.answered_at < min(answered)
    # Never more than its two slots at once.
    calls = slow.agent.received("/api/v1/agent/")
    overlapping = max(
        sum(1 for other in calls if other.at <= call.at < (other.answered_at or float("inf")))
        for call in calls
    )
    assert overlapping <= 2


def test_stop_is_answered_with_the_opt_out_reply_and_the_number_recorded(
    make_tenant: Callable[..., Tenant],
) -> None:
    shop = make_tenant(opt_out_reply="Ok, no more messages.")
    stop, _ = post(shop, "STOP", phone=CHAT_A)
    shop.wait_finished(stop)
    later, _ = post(shop, "quero falar com alguém", phone=CHAT_A)
    shop.wait_finished(later)

    # The agent got only the later message; the opt-out was the hub's answer.
    [asked] = agent_texts(shop)
    assert asked.endswith("quero falar com alguém")
    first, _second = (s["text"] for s in sends(shop))
    assert first == "Ok, no more messages."
    instance_id = shop.hub.query(
        "SELECT id FROM instances_instanceconfig WHERE name = ?", [shop.name]
    )[0]["id"]
    recorded = shop.hub.query(
        "SELECT phone, keyword FROM webhooks_optout WHERE instance_id = ?", [instance_id]
    )
    assert recorded == [{"phone": CHAT_A, "keyword": "STOP"}]
    assert shop.row(stop)["ignore_reason"] == "opt out"
