"""Opt-out: an opt-out keyword is answered with opt_out_reply without an agent call and
the number recorded (opted_out says so to the send API); its later messages are answered."""

from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.core.exceptions import ValidationError
from django.utils import timezone

from instances.models import DEFAULT_OPT_OUT_REPLY, InstanceConfig
from tests.webhooks.conftest import AGENT_REPLY, PHONE, Upstream, message_body, queue_message
from tests.webhooks.test_processing import body_of, process
from webhooks.models import Conversation, InboundMessage, OptOut, PauseReason, Status
from webhooks.opt_out import normalized_phone, opted_out, record_opt_out

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.pipeline]


@pytest.fixture
def acme(make_instance) -> InstanceConfig:
    return make_instance()


async def queue(instance: InstanceConfig, *body: Any, **fields: Any) -> InboundMessage:
    return await sync_to_async(queue_message)(instance, *body, **fields)


async def is_opted_out(instance: InstanceConfig, phone: str = PHONE) -> bool:
    return await sync_to_async(opted_out)(instance_id=instance.pk, phone=phone)


@pytest.mark.asyncio
@pytest.mark.parametrize("text", ["STOP", " sair ", "Cancelar"])
async def test_an_opt_out_keyword_is_answered_without_the_agent_and_recorded(
    acme, upstream: Upstream, text: str
) -> None:
    await queue(acme, text=text)

    row = await process(upstream)

    assert upstream.agent_calls == []
    [sent] = upstream.sent
    assert body_of(sent) == {"number": PHONE, "text": DEFAULT_OPT_OUT_REPLY}
    assert (row.status, row.ignore_reason, row.reply_text) == (
        Status.REPLIED,
        "opt out",
        DEFAULT_OPT_OUT_REPLY,
    )
    assert await is_opted_out(acme)
    assert await is_opted_out(acme, phone=f"+{PHONE[:2]} {PHONE[2:4]} {PHONE[4:]}")
    assert (await OptOut.objects.aget()).keyword == text.strip()


@pytest.mark.asyncio
async def test_the_number_s_later_messages_are_still_answered(acme, upstream: Upstream) -> None:
    await queue(acme, text="STOP")
    await process(upstream)
    await queue(acme, message_body(message_id="LATER-1"), text="oi, preciso de ajuda")

    row = await process(upstream)

    assert row.status == Status.REPLIED and row.reply_text == AGENT_REPLY
    assert len(upstream.agent_calls) == 1
    assert await is_opted_out(acme)


@pytest.mark.asyncio
async def test_in_a_paused_chat_the_opt_out_is_recorded_and_nothing_sent(
    acme, upstream: Upstream
) -> None:
    await queue(acme, text="PARAR")
    await Conversation.objects.filter(instance=acme).aupdate(
        pause_reason=PauseReason.HUMAN, paused_until=timezone.now() + timedelta(minutes=5)
    )

    row = await process(upstream)

    assert upstream.sent == [] and upstream.agent_calls == []
    assert (row.status, row.ignore_reason) == (Status.IGNORED, "opt out")
    assert await is_opted_out(acme)


@pytest.mark.asyncio
async def test_a_blank_reply_records_the_opt_out_and_sends_nothing(
    make_instance, upstream: Upstream
) -> None:
    quiet = await sync_to_async(make_instance)(opt_out_reply="")
    await queue(quiet, text="stop")

    row = await process(upstream)

    assert upstream.sent == [] and upstream.agent_calls == []
    assert row.status == Status.IGNORED
    assert await is_opted_out(quiet)


@pytest.mark.asyncio
async def test_without_keywords_stop_is_an_ordinary_message(
    make_instance, upstream: Upstream
) -> None:
    plain = await sync_to_async(make_instance)(opt_out_keywords=[])
    await queue(plain, text="STOP")

    row = await process(upstream)

    assert row.reply_text == AGENT_REPLY
    assert not await is_opted_out(plain)


# --- the function the send API calls, and the settings --------------------------------
def test_opted_out_is_per_instance_and_per_number(make_instance) -> None:
    acme = make_instance(name="acme")
    globex = make_instance(
        name="globex",
        evolution_url="https://evolution.globex.test",
        agent_api_url="https://agent.globex.test",
    )
    record_opt_out(
        instance_id=acme.pk, phone=f"{PHONE}@s.whatsapp.net", keyword="STOP", at=timezone.now()
    )

    assert opted_out(instance_id=acme.pk, phone=PHONE)
    assert not opted_out(instance_id=globex.pk, phone=PHONE)
    assert not opted_out(instance_id=acme.pk, phone="5511900000000")
    assert not opted_out(instance_id=acme.pk, phone="")
    assert normalized_phone("+55 (11) 98765-4321") == "5511987654321"


@pytest.mark.parametrize(
    "keywords", ["STOP", ["STOP", ""], ["STOP", 3], ["x" * 65], ["a\x00b"]], ids=repr
)
def test_bad_opt_out_keywords_get_the_model_s_message(make_instance, keywords) -> None:
    instance = make_instance()
    instance.opt_out_keywords = keywords

    with pytest.raises(ValidationError) as raised:
        instance.full_clean()

    assert "opt_out_keywords" in raised.value.message_dict


def test_the_defaults_are_the_issue_s_keywords(make_instance) -> None:
    assert make_instance().opt_out_keywords == ["STOP", "SAIR", "PARAR", "CANCELAR"]
