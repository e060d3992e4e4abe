"""The chat as the unit of work: takeover, keywords, debounce, groups, lists, sessions.

Deliveries are recorded as the webhook does; the worker's claim and handling
run against a mocked agent and Evolution (see conftest's Upstream).
"""

import base64
import json
from datetime import timedelta
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from instances.models import InstanceConfig
from tests.e2e.harness import text_delivery
from tests.webhooks.conftest import AGENT_REPLY, Upstream, message_body
from webhooks import transitions
from webhooks.ingest import Outcome, Result, record_delivery
from webhooks.models import (
    ConnectionState,
    Conversation,
    InboundMessage,
    OutboundMessage,
    OutboundStatus,
    Status,
)
from webhooks.processing import handle_batch

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True), pytest.mark.pipeline]

PHONE = "5511987654321"
OTHER = "5511911112222"
GROUP = "120363025246125888@g.us"
_counter = iter(range(10**6))


def body(text: str = "oi", *, phone: str = PHONE, **fields: Any) -> dict[str, Any]:
    return text_delivery(message_id=f"M{next(_counter):06d}", text=text, phone=phone, **fields)


async def deliver(instance: InstanceConfig, text: str = "oi", **fields: Any) -> Result:
    return await sync_to_async(record_delivery)(instance=instance, body=body(text, **fields))


async def work(upstream: Upstream, *, now_due: bool = False) -> int:
    """Claim and handle due chats until none is left; returns how many batches ran."""
    batches = 0
    async with upstream.client() as http:
        while True:
            if now_due:
                # Time passes: every debounce window has closed.
                past = timezone.now() - timedelta(hours=1)
                await InboundMessage.objects.filter(status=Status.QUEUED).aupdate(queued_at=past)
                await Conversation.objects.exclude(due_at=None).aupdate(due_at=timezone.now())
            claimed = await sync_to_async(transitions.claim_conversations)(limit=10)
            if not claimed:
                return batches
            for batch in claimed:
                await handle_batch(batch=batch, http=http)
                batches += 1


async def row(result: Result) -> InboundMessage:
    return await InboundMessage.objects.aget(message_id=result.message_id)


def sent_bodies(upstream: Upstream) -> list[dict[str, Any]]:
    return [json.loads(r.content) for r in upstream.sent]


def agent_bodies(upstream: Upstream) -> list[dict[str, Any]]:
    return [json.loads(r.content) for r in upstream.agent_calls]


async def chat(instance: InstanceConfig, jid: str = f"{PHONE}@s.whatsapp.net") -> Conversation:
    return await Conversation.objects.aget(instance=instance, chat_jid=jid)


@pytest.fixture
def acme(make_instance) -> InstanceConfig:
    return make_instance()


# --- human takeover and the owner's keywords -----------------------------------
async def test_a_human_s_message_pauses_only_its_own_chat(acme, upstream) -> None:
    owner = await deliver(acme, "Oi, aqui é o Pedro da loja", from_me=True)
    mine = await deliver(acme, "e o preço?")
    elsewhere = await deliver(acme, "olá", phone=OTHER)

    await work(upstream)

    assert (owner.outcome, owner.detail) == (Outcome.IGNORED, "human takeover")
    assert (mine.outcome, mine.detail) == (Outcome.IGNORED, "human takeover")
    assert (await row(elsewhere)).status == Status.REPLIED
    assert [b["number"] for b in sent_bodies(upstream)] == [OTHER]
    paused = await chat(acme)
    assert paused.pause_reason == "human takeover"
    assert paused.paused_until > timezone.now() + timedelta(minutes=29)


async def test_the_bot_answers_again_once_the_takeover_window_is_over(acme, upstream) -> None:
    await deliver(acme, "deixa comigo", from_me=True)
    await Conversation.objects.aupdate(paused_until=timezone.now() - timedelta(seconds=1))

    result = await deliver(acme, "ainda aí?")
    await work(upstream)

    assert (await row(result)).status == Status.REPLIED


async def test_takeover_is_off_with_zero_minutes(make_instance, upstream) -> None:
    acme = await sync_to_async(make_instance)(handoff_minutes=0)
    owner = await deliver(acme, "oi", from_me=True)
    result = await deliver(acme, "oi")
    await work(upstream)

    assert owner.detail == "from_me"
    assert (await row(result)).status == Status.REPLIED


async def test_the_hub_s_own_echo_does_not_pause_the_chat(acme, upstream) -> None:
    upstream.evolution = (201, {"key": {"id": "3EB0SENT"}, "status": "PENDING"})
    await deliver(acme, "oi")
    await work(upstream)
    [outbound] = [o async for o in OutboundMessage.objects.all()]
    assert (outbound.evolution_id, outbound.status) == ("3EB0SENT", OutboundStatus.SENT)

    echo = await sync_to_async(record_delivery)(
        instance=acme, body=text_delivery(message_id="3EB0SENT", text=AGENT_REPLY, from_me=True)
    )

    assert echo.detail == "from_me"
    assert (await chat(acme)).pause_reason == ""


async def test_an_echo_arriving_before_sendtext_answers_is_known_by_its_text(
    acme, upstream
) -> None:
    echoes: list[Result] = []

    async def echo_first(request: Any) -> tuple[int, Any]:
        # Evolution posts the echo while it still holds the sendText request.
        text = json.loads(request.content)["text"]
        echoes.append(
            await sync_to_async(record_delivery)(
                instance=acme, body=text_delivery(message_id="3EB0EARLY", text=text, from_me=True)
            )
        )
        return 201, {"key": {"id": "3EB0EARLY"}}

    upstream.evolution = echo_first
    await deliver(acme, "oi")
    await work(upstream)

    assert [e.detail for e in echoes] == ["from_me"]
    assert (await chat(acme)).pause_reason == ""


async def test_a_human_s_message_during_a_send_still_pauses_the_chat(acme, upstream) -> None:
    seen: list[tuple[str | None, int]] = []
    human: list[Result] = []

    async def human_writes_meanwhile(request: Any) -> tuple[int, Any]:
        # While sendText is held, the reply is noted on its message and has no
        # outbound row yet; the owner writes something else from the phone.
        answering = await InboundMessage.objects.aget(text="oi")
        seen.append((answering.sending_text, await OutboundMessage.objects.acount()))
        typed = text_delivery(message_id="3EB0HUMAN", text="Já vi, deixa comigo", from_me=True)
        human.append(await sync_to_async(record_delivery)(instance=acme, body=typed))
        return 201, {"key": {"id": "3EB0REPLY"}}

    upstream.evolution = human_writes_meanwhile
    result = await deliver(acme, "oi")
    await work(upstream)

    assert seen == [(AGENT_REPLY, 0)]
    assert [h.detail for h in human] == ["human takeover"]
    assert (await chat(acme)).pause_reason == "human takeover"
    answered = await row(result)
    assert (answered.status, answered.sending_text) == (Status.REPLIED, None)
    [sent] = [o async for o in OutboundMessage.objects.all()]
    assert (sent.status, sent.evolution_id, sent.text) == (
        OutboundStatus.SENT,
        "3EB0REPLY",
        AGENT_REPLY,
    )


async def test_bot_off_pauses_until_bot_on_and_neither_is_answered(acme, upstream) -> None:
    off = await deliver(acme, "  /BOT OFF ", from_me=True)
    quiet = await deliver(acme, "alô?")
    await work(upstream)
    assert (await chat(acme)).pause_reason == "bot off"
    assert (await chat(acme)).paused_until is None

    on = await deliver(acme, "/bot on", from_me=True)
    answered = await deliver(acme, "alô??")
    await work(upstream)

    assert (off.detail, quiet.detail, on.detail) == ("bot off", "bot off", "bot on")
    assert (await row(answered)).status == Status.REPLIED
    assert len(upstream.agent_calls) == 1
    assert (await chat(acme)).pause_reason == ""


async def test_bot_on_clears_a_takeover_too(acme, upstream) -> None:
    await deliver(acme, "deixa comigo", from_me=True)
    await deliver(acme, "/bot on", from_me=True)
    result = await deliver(acme, "oi")
    await work(upstream)

    assert (await row(result)).status == Status.REPLIED


async def test_a_pause_set_while_a_burst_waits_keeps_it_unanswered(make_instance, upstream) -> None:
    acme = await sync_to_async(make_instance)(debounce_seconds=30)
    waiting = await deliver(acme, "oi")
    await deliver(acme, "já vi, respondo eu", from_me=True)

    await work(upstream, now_due=True)

    assert (await row(waiting)).ignore_reason == "human takeover"
    assert upstream.agent_calls == []


# --- debounce ----------------------------------------------------------------------
async def test_a_burst_gets_one_agent_call_with_its_texts_in_order(make_instance, upstream) -> None:
    acme = await sync_to_async(make_instance)(debounce_seconds=5)
    results = [await deliver(acme, text) for text in ("oi", "tudo bem?", "quanto custa?")]

    assert await work(upstream) == 0  # inside the window: nothing is due yet
    await work(upstream, now_due=True)

    [asked] = agent_bodies(upstream)
    assert asked["message_content"] == "[Maria Souza]: oi\ntudo bem?\nquanto custa?"
    assert len(upstream.sent) == 1
    first, second, last = [await row(r) for r in results]
    assert last.status == Status.REPLIED
    for folded in (first, second):
        assert (folded.status, folded.ignore_reason) == (Status.IGNORED, "debounced")
        assert folded.answered_by_id == last.pk


async def test_a_photo_then_a_question_in_one_burst_gets_the_photo_with_the_call(
    make_instance, upstream
) -> None:
    acme = await sync_to_async(make_instance)(debounce_seconds=5)
    photo = message_body("messages-upsert-image-caption.json", message_id="PHOTO1", phone=PHONE)
    photo["data"]["messageTimestamp"] = int(timezone.now().timestamp())
    await sync_to_async(record_delivery)(instance=acme, body=photo)
    await deliver(acme, "quanto custa?")
    fetched: list[dict[str, Any]] = []

    async def evolution(request: httpx.Request) -> tuple[int, Any]:
        if "/chat/getBase64FromMediaMessage/" in request.url.path:
            fetched.append(json.loads(request.content))
            return 201, {"mimetype": "image/jpeg", "base64": base64.b64encode(b"jpeg").decode()}
        return 201, {"key": {"id": "3EB0"}, "status": "PENDING"}

    upstream.evolution = evolution
    await work(upstream, now_due=True)

    [asked] = agent_bodies(upstream)
    assert asked["message_content"].endswith("Esse é o defeito no produto\nquanto custa?")
    assert asked["message_type"] == "image"
    assert asked["media_contents"][0]["data"] == base64.b64encode(b"jpeg").decode()
    # Fetched by the photo's own id: the answering row is the question's.
    assert [f["message"]["key"]["id"] for f in fetched] == ["PHOTO1"]


async def test_each_message_restarts_the_window_up_to_its_bound(make_instance) -> None:
    acme = await sync_to_async(make_instance)(debounce_seconds=10)
    start = timezone.now()
    await deliver(acme, "um")
    first_due = (await chat(acme)).due_at
    await deliver(acme, "dois")
    later_due = (await chat(acme)).due_at

    assert start + timedelta(seconds=10) <= first_due <= later_due
    stored = await chat(acme)
    assert stored.due_limit <= start + timedelta(seconds=31)
    assert later_due <= stored.due_limit


# --- groups ----------------------------------------------------------------------------
async def test_group_messages_are_ignored_by_default(acme, upstream) -> None:
    result = await deliver(acme, "alguém?", group=GROUP)

    assert (result.outcome, result.detail) == (Outcome.IGNORED, "group")


async def test_with_mentions_a_group_message_is_answered_when_it_mentions_the_bot(
    make_instance, upstream
) -> None:
    acme = await sync_to_async(make_instance)(
        group_policy="mentions", bot_ids=["123456789012345@lid"]
    )
    await ConnectionState.objects.acreate(
        instance=acme, state="open", wuid="5511900000001@s.whatsapp.net"
    )
    unmentioned = await deliver(acme, "bom dia", group=GROUP)
    by_lid = await deliver(acme, "@bot preço?", group=GROUP, mentions=["123456789012345@lid"])
    by_phone = await deliver(
        acme, "@bot e o frete?", group=GROUP, mentions=["5511900000001@s.whatsapp.net"]
    )
    await work(upstream)

    assert unmentioned.detail == "no mention"
    assert (await row(by_lid)).status == Status.REPLIED
    assert (await row(by_phone)).status == Status.REPLIED


async def test_with_mentions_a_reply_to_the_hub_s_message_is_answered(
    make_instance, upstream
) -> None:
    acme = await sync_to_async(make_instance)(group_policy="mentions")
    await OutboundMessage.objects.acreate(
        instance=acme, chat_jid=GROUP, text="Olá!", evolution_id="3EB0HUB", status="sent"
    )
    quoting = await deliver(acme, "e amanhã?", group=GROUP, quoted_id="3EB0HUB")
    quoting_someone = await deliver(acme, "kkk", group=GROUP, quoted_id="3EB0OTHER")

    assert quoting.outcome is Outcome.QUEUED
    assert quoting_someone.detail == "no mention"


async def test_in_a_group_the_reply_quotes_the_message_and_the_session_is_the_group_s(
    make_instance, upstream
) -> None:
    acme = await sync_to_async(make_instance)(group_policy="all")
    result = await deliver(acme, "vocês abrem domingo?", group=GROUP, phone=OTHER)
    await work(upstream)

    [sent] = sent_bodies(upstream)
    assert sent["number"] == GROUP
    assert sent["quoted"]["key"] == {
        "id": result.message_id,
        "remoteJid": GROUP,
        "fromMe": False,
        "participant": f"{OTHER}@s.whatsapp.net",
    }
    [asked] = agent_bodies(upstream)
    assert asked["session_name"] == "acme_120363025246125888"
    assert asked["user"]["phone_number"] == f"+{OTHER}"
    assert asked["user"]["user_data"]["group_jid"] == GROUP


# --- allow and block lists ---------------------------------------------------------------
async def test_a_blocked_number_is_never_answered(make_instance) -> None:
    acme = await sync_to_async(make_instance)(block_list=["551198765*"])

    blocked = await deliver(acme, "oi")
    fine = await deliver(acme, "oi", phone=OTHER)

    assert (blocked.detail, fine.outcome) == ("blocked", Outcome.QUEUED)


async def test_with_an_allow_list_only_matching_chats_are_answered(make_instance) -> None:
    acme = await sync_to_async(make_instance)(allow_list=["5511911*", GROUP], group_policy="all")

    outsider = await deliver(acme, "oi")
    insider = await deliver(acme, "oi", phone=OTHER)
    group = await deliver(acme, "oi", group=GROUP, phone="5599000000000")

    assert outsider.detail == "not allowed"
    assert (insider.outcome, group.outcome) == (Outcome.QUEUED, Outcome.QUEUED)


async def test_in_a_group_a_blocked_sender_is_not_answered(make_instance) -> None:
    acme = await sync_to_async(make_instance)(block_list=[OTHER], group_policy="all")

    result = await deliver(acme, "oi", group=GROUP, phone=OTHER)

    assert result.detail == "blocked"


# --- sessions ---------------------------------------------------------------------
async def test_reset_starts_a_new_session_and_is_answered_without_the_agent(acme, upstream) -> None:
    await deliver(acme, "oi")
    await work(upstream)
    reset = await deliver(acme, "/Reset ")
    await work(upstream)
    await deliver(acme, "de novo")
    await work(upstream)

    sessions = [b["session_name"] for b in agent_bodies(upstream)]
    assert sessions == [f"acme_{PHONE}", f"acme_{PHONE}-2"]
    assert [b["text"] for b in sent_bodies(upstream)][1] == "Conversation restarted."
    stored = await row(reset)
    assert (stored.status, stored.ignore_reason) == (Status.REPLIED, "reset")


async def test_an_idle_chat_s_next_message_starts_a_new_session(make_instance, upstream) -> None:
    acme = await sync_to_async(make_instance)(session_idle_minutes=60)
    await deliver(acme, "oi")
    await work(upstream)
    await Conversation.objects.aupdate(last_message_at=timezone.now() - timedelta(minutes=61))
    await deliver(acme, "voltei")
    await work(upstream)

    sessions = [b["session_name"] for b in agent_bodies(upstream)]
    assert sessions == [f"acme_{PHONE}", f"acme_{PHONE}-2"]


# --- retries from the console ------------------------------------------------------
async def test_a_retried_message_is_answered_after_what_is_open_in_its_chat(acme, upstream) -> None:
    failed = await deliver(acme, "antiga")
    await InboundMessage.objects.filter(message_id=failed.message_id).aupdate(
        status=Status.FAILED, next_attempt_at=None, queued_at=None
    )
    await Conversation.objects.aupdate(due_at=None)
    newer = await deliver(acme, "nova")

    assert (
        await sync_to_async(transitions.retry_messages)(queryset_or_ids=[(await row(failed)).pk])
        == 1
    )
    await work(upstream)

    contents = [b["message_content"] for b in agent_bodies(upstream)]
    assert contents == ["[Maria Souza]: nova", "[Maria Souza]: antiga"]
    assert (await row(newer)).status == Status.REPLIED


# --- a number that is not connected ---------------------------------------------
async def test_replies_wait_while_the_number_is_not_connected_and_go_out_once_it_is(
    acme, upstream
) -> None:
    await ConnectionState.objects.acreate(instance=acme, state="connecting")
    result = await deliver(acme, "oi")
    await work(upstream)

    held = await row(result)
    assert (held.status, held.ignore_reason) == (Status.QUEUED, "waiting for connection")
    assert held.reply_text == AGENT_REPLY
    assert upstream.sent == []

    open_update = {"event": "connection.update", "data": {"state": "open", "statusReason": 200}}
    await sync_to_async(record_delivery)(instance=acme, body=open_update)
    await work(upstream)

    sent = await row(result)
    assert (sent.status, sent.ignore_reason) == (Status.REPLIED, "")
    assert len(upstream.sent) == 1
    assert len(upstream.agent_calls) == 1
