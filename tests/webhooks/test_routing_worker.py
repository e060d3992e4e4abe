"""The worker routes messages to an instance's agents: a matching rule binds the
chat to its agent until a reset or an idle expiry; the rest go to the bound
agent, else to the instance's own. Agent and Evolution are mocked at the transport."""

import json
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from instances.models import Agent, InstanceConfig, Route
from tests.webhooks.conftest import PHONE, Upstream, message_body, queue_message
from webhooks import processing
from webhooks.ingest import Outcome, accept_delivery
from webhooks.models import Conversation, InboundMessage, Status
from webhooks.processing import handle_batch
from webhooks.transitions import Batch, claim_conversations

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True), pytest.mark.pipeline]

DEFAULT_URL = "http://agent.acme.test/api/v1/agent/acme_agent/run"
SALES_URL = "http://sales.acme.test/api/v1/agent/sales_agent/run"


@pytest.fixture
def acme(make_instance) -> InstanceConfig:
    return make_instance()


@pytest.fixture
def sales(acme) -> Agent:
    agent = Agent(
        instance=acme,
        name="sales",
        agent_api_url="http://sales.acme.test",
        agent_api_key="sales-key",
        default_agent="sales_agent",
    )
    agent.full_clean()
    agent.save()
    Route.objects.create(instance=acme, position=1, match="keyword", value="vendas", agent=agent)
    return agent


counter = iter(range(1000, 10**6))


def body(text: str, *, phone: str = PHONE) -> dict[str, Any]:
    data = message_body(message_id=f"RT{next(counter)}", phone=phone)
    data["data"]["message"] = {"conversation": text}
    return data


async def say(instance: InstanceConfig, upstream: Upstream, text: str) -> InboundMessage:
    """Store a message as the webhook does, then let the worker handle its chat."""
    row = await sync_to_async(queue_message)(instance, body(text))
    batches = await sync_to_async(claim_conversations)(limit=10)
    async with upstream.client() as http:
        for batch in batches:
            await handle_batch(batch=batch, http=http)
    return await InboundMessage.objects.aget(pk=row.pk)


def called(upstream: Upstream) -> list[str]:
    return [str(r.url) for r in upstream.agent_calls]


async def bound_agent(instance: InstanceConfig) -> int | None:
    conversation = await Conversation.objects.aget(instance=instance)
    return conversation.bound_agent_id


async def test_a_keyword_binds_the_chat_to_its_agent_until_a_reset(acme, sales, upstream) -> None:
    for text in ("oi", "vendas", "quanto custa?", "/reset", "e agora?"):
        assert (await say(acme, upstream, text)).status == Status.REPLIED

    # The reset is answered by the hub itself: no agent call.
    assert called(upstream) == [DEFAULT_URL, SALES_URL, SALES_URL, DEFAULT_URL]
    assert upstream.agent_calls[1].headers["x-api-key"] == "sales-key"
    assert await bound_agent(acme) is None


async def test_a_routed_agent_has_its_own_session_of_the_chat(acme, sales, upstream) -> None:
    await say(acme, upstream, "oi")
    routed = await say(acme, upstream, "vendas")

    sessions = [json.loads(r.content)["session_name"] for r in upstream.agent_calls]
    assert sessions == [f"acme_{PHONE}", f"acme_{PHONE}-sales"]
    assert routed.session_name == f"acme_{PHONE}-sales"
    assert await bound_agent(acme) == sales.pk


async def test_an_idle_expiry_ends_the_binding(acme, sales, upstream) -> None:
    await InstanceConfig.objects.filter(pk=acme.pk).aupdate(session_idle_minutes=5)
    acme = await InstanceConfig.objects.aget(pk=acme.pk)
    await say(acme, upstream, "vendas")
    assert await bound_agent(acme) == sales.pk
    await Conversation.objects.filter(instance=acme).aupdate(
        last_message_at=timezone.now() - timedelta(minutes=6)
    )

    await say(acme, upstream, "oi de novo")

    assert called(upstream) == [SALES_URL, DEFAULT_URL]
    assert await bound_agent(acme) is None
    assert (await Conversation.objects.aget(instance=acme)).session_epoch == 2


async def test_a_rule_to_the_default_agent_takes_the_chat_back(acme, sales, upstream) -> None:
    await sync_to_async(Route.objects.create)(
        instance=acme, position=2, match="keyword", value="menu", agent=None
    )

    for text in ("vendas", "menu", "oi"):
        await say(acme, upstream, text)

    assert called(upstream) == [SALES_URL, DEFAULT_URL, DEFAULT_URL]
    assert await bound_agent(acme) is None


async def test_a_chat_rule_routes_a_number_from_its_first_message(acme, upstream) -> None:
    agent = await sync_to_async(Agent.objects.create)(
        instance=acme,
        name="support",
        agent_kind="webhook",
        agent_api_url="http://flows.acme.test/api/v1/agent/hook",
    )
    await sync_to_async(Route.objects.create)(
        instance=acme, position=1, match="chat", value="5511*", agent=agent
    )

    await say(acme, upstream, "oi")

    [call] = upstream.agent_calls
    assert str(call.url) == "http://flows.acme.test/api/v1/agent/hook"
    assert json.loads(call.content)["instance"] == "acme"


async def test_a_deleted_bound_agent_leaves_the_chat_to_the_default(acme, sales, upstream) -> None:
    await say(acme, upstream, "vendas")
    await Route.objects.filter(agent=sales).adelete()
    await sales.adelete()

    await say(acme, upstream, "oi")

    assert called(upstream) == [SALES_URL, DEFAULT_URL]


async def test_an_instance_without_rules_never_reads_them(acme, upstream, monkeypatch) -> None:
    def refuse(**kwargs: Any) -> None:
        raise AssertionError("routing read for an instance without rules")

    monkeypatch.setattr(processing, "load_routing", refuse)

    for text in ("oi", "vendas"):
        assert (await say(acme, upstream, text)).status == Status.REPLIED

    assert called(upstream) == [DEFAULT_URL, DEFAULT_URL]


async def test_a_routed_agent_with_a_longer_timeout_gets_a_longer_lease(
    acme, sales, upstream
) -> None:
    await Agent.objects.filter(pk=sales.pk).aupdate(agent_timeout=300)
    leases: list[Any] = []

    async def agent(request: Any) -> tuple[int, dict[str, Any]]:
        conversation = await sync_to_async(Conversation.objects.get)(instance=acme)
        leases.append(conversation.due_at - timezone.now())
        return 200, {"message": "ok"}

    upstream.agent = agent
    await say(acme, upstream, "vendas")

    [lease] = leases
    assert lease > timedelta(seconds=300)


async def deliver_and_handle(upstream: Upstream, text: str, *, instance: str = "acme") -> Batch:
    """As the webhook view does: store with a claim (SQLite hands the chat straight to
    this process's worker), then the worker handles it."""
    raw = json.dumps(body(text)).encode()
    result = await sync_to_async(accept_delivery)(
        segment=instance, event=None, token=f"{instance}-token", raw=raw, claim=True
    )
    assert result.outcome is Outcome.QUEUED, result
    batch = result.claimed
    if batch is None:
        # PostgreSQL: the worker claims committed chats only.
        [batch] = await sync_to_async(claim_conversations)(limit=10)
    async with upstream.client() as http:
        await handle_batch(batch=batch, http=http)
    return batch


async def test_a_chat_the_webhook_hands_over_is_routed_with_what_it_read(
    make_instance, upstream
) -> None:
    acme = await sync_to_async(make_instance)(webhook_token="acme-token")
    sales = await sync_to_async(Agent.objects.create)(
        instance=acme,
        name="sales",
        agent_api_url="http://sales.acme.test",
        agent_api_key="k",
        default_agent="sales_agent",
    )
    await sync_to_async(Route.objects.create)(
        instance=acme, position=1, match="keyword", value="vendas", agent=sales
    )

    batch = await deliver_and_handle(upstream, "vendas")
    bound = await deliver_and_handle(upstream, "e o preço?")

    assert batch.instance.has_routes is True
    assert bound.conversation.bound_agent_id == sales.pk
    assert called(upstream) == [SALES_URL, SALES_URL]


async def test_a_chat_the_webhook_hands_over_without_rules_reads_none(
    make_instance, upstream, monkeypatch
) -> None:
    await sync_to_async(make_instance)(webhook_token="acme-token")

    def refuse(**kwargs: Any) -> None:
        raise AssertionError("routing read for an instance without rules")

    monkeypatch.setattr(processing, "load_routing", refuse)

    batch = await deliver_and_handle(upstream, "vendas")

    assert batch.instance.has_routes is False
    assert called(upstream) == [DEFAULT_URL]
