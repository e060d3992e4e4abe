"""Handling one claimed conversation: its open messages in order, each answer
an agent call and then the reply through Evolution.

A batch of a chat's open messages becomes units: a paused chat's messages are
only noted, a reset keyword starts a new session, and the rest are answered
one by one, or (debounce on) as one burst with one agent call and one reply.

Every write is conditional on the claim token, so a worker that lost its
lease (another worker took the chat) can never overwrite the new owner's work.
"""

import asyncio
import logging
import random
from datetime import timedelta
from functools import partial
from typing import Any

import httpx
from django.conf import settings
from django.utils import timezone

from instances.clients.agents import AgentCall, agent_for, session_name
from instances.clients.evolution import EvolutionClient, EvolutionTarget
from instances.clients.http import OutboundError
from instances.models import Agent, InstanceConfig
from omnihub.logging import kv
from webhooks import metrics
from webhooks.agent_history import session_history
from webhooks.chat_rules import is_reset
from webhooks.db import run_db
from webhooks.duplicates import SendCheck, Verdict, check_earlier_send
from webhooks.instance_routes import load_routing
from webhooks.models import Conversation, InboundMessage, OutboundStatus, Status
from webhooks.reply_parts import Part, reply_parts, typing_ms
from webhooks.routing import choose_agent
from webhooks.rows import EarlierAttempt, earlier_attempt, recorded_ids, sent_reply_count
from webhooks.transitions import (
    HOLD_REASON,
    Batch,
    SendEnd,
    SendStart,
    advance_session,
    bind_agent,
    fold_into,
    release_messages,
    renew_lease,
    save_claimed,
    settle_conversation,
    take_more_or_settle,
)

logger = logging.getLogger(__name__)


NO_TARGET = "No Evolution URL/key to send the reply with: the agent was not asked."


def backoff(attempt: int) -> timedelta:
    """Exponential, capped, with jitter so a recovering server is not hit in step."""
    delay = min(settings.RETRY_BASE_DELAY * 2 ** max(attempt - 1, 0), settings.RETRY_MAX_DELAY)
    return timedelta(seconds=delay * random.uniform(0.8, 1.2))


def evolution_target(*, message: InboundMessage) -> EvolutionTarget:
    instance: InstanceConfig = message.instance
    if instance.is_legacy:
        return EvolutionTarget(
            base_url=message.reply_server_url,
            api_key=message.reply_api_key,
            instance_name=instance.whatsapp_instance or message.evolution_instance,
        )
    return EvolutionTarget(
        base_url=instance.evolution_url,
        api_key=instance.evolution_key,
        instance_name=instance.whatsapp_instance or instance.name,
    )


# Presence requests in flight, kept so they are not garbage-collected. They are
# never cancelled: cancelling an httpx request mid-flight can leave its pool
# slot taken for good (encode/httpcore#1093), and they end on their timeout.
_typing: set[asyncio.Task[None]] = set()


def show_typing(evolution: EvolutionClient, *, number: str) -> None:
    task = asyncio.create_task(evolution.send_presence(number=number))
    _typing.add(task)
    task.add_done_callback(_typing.discard)


def show_typing_later(evolution: EvolutionClient, *, number: str) -> asyncio.TimerHandle:
    """Start "typing..." after settings.TYPING_AFTER unless cancelled first."""
    return asyncio.get_running_loop().call_later(
        settings.TYPING_AFTER, partial(show_typing, evolution, number=number)
    )


def reply_number(*, message: InboundMessage) -> str:
    reply_to = message.content.get("reply_to")
    return reply_to if isinstance(reply_to, str) and reply_to else message.chat_jid


def quote_of(*, message: InboundMessage) -> dict[str, Any] | None:
    """The reply quotes the message it answers (sendText's `quoted`): always in a
    group, in a one-to-one chat when the instance's quote_replies is on."""
    is_group = bool(message.content.get("is_group"))
    if not is_group and not message.instance.quote_replies:
        return None
    key: dict[str, Any] = {"id": message.message_id, "remoteJid": message.chat_jid, "fromMe": False}
    if is_group:
        key["participant"] = message.sender_jid
    return {"key": key, "message": {"conversation": message.text}}


def parts_of(*, instance: InstanceConfig, text: str, agent_response: Any) -> list[Part]:
    """The messages a reply goes as. A webhook agent that answered an array asked
    for several messages: they were joined with blank lines, and are cut there
    again whatever split_replies says (the answer is kept on the row, so a retry
    cuts the same way)."""
    split = instance.split_replies or isinstance(agent_response, list)
    return reply_parts(text=text, split=split, media_links=instance.send_media_links)


class Step:
    """The writes of one batch, each conditional on its claim.

    The chat's lease covers one message's agent call and send; the worker
    renews it each time it takes the chat's next messages (take_more_or_settle).
    """

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.lost = False
        # Replies whose outbound row was written with the agent's answer: its id,
        # or None when the number is not connected (the reply is held).
        self.prepared: dict[int, int | None] = {}

    async def update(
        self,
        message: InboundMessage,
        *,
        send_start: SendStart | None = None,
        send_end: SendEnd | None = None,
        **fields: Any,
    ) -> tuple[bool, int | None]:
        """Write fields if this worker still holds the chat; False when it lost it.

        The message object changes only once the write is back: the database
        thread may run a call twice (see webhooks/db.py), so what it runs must
        not change its arguments.
        """
        instance = self.batch.instance
        held, outbound_id = await run_db(
            save_claimed,
            message_pk=message.pk,
            token=self.batch.token,
            fields=fields,
            conversation_id=self.batch.conversation.pk,
            send_start=send_start,
            send_end=send_end,
            instance_id=instance.pk,
        )
        for key, value in fields.items():
            setattr(message, key, value)
        self.lost = self.lost or not held
        return held, outbound_id

    async def finish(self, message: InboundMessage, status: str, **fields: Any) -> None:
        now = timezone.now()
        send_end = fields.pop("send_end", None)
        done, _ = await self.update(
            message,
            send_end=send_end,
            status=status,
            finished_at=now,
            lease_until=None,
            claim_token="",
            reply_api_key="",
            **fields,
        )
        if done:
            total = (now - message.received_at).total_seconds()
            name = message.instance.name
            metrics.messages_finished.labels(name, status).inc()
            metrics.processing_seconds.labels(name).observe(total)
            _log(message, status, total_ms=f"{total * 1000:.0f}", error=bool(message.last_error))

    async def retry_later(
        self, message: InboundMessage, *, attempt: int, error: str, **fields: Any
    ) -> None:
        delay = backoff(attempt)
        send_end = fields.pop("send_end", None)
        await self.update(
            message,
            send_end=send_end,
            status=Status.QUEUED,
            next_attempt_at=timezone.now() + delay,
            lease_until=None,
            claim_token="",
            last_error=error,
            **fields,
        )
        _log(message, "queued", retry_in=f"{delay.total_seconds():.1f}s", error=error)


def _log(message: InboundMessage, status: str, **extra: Any) -> None:
    fields = kv(instance=message.instance.name, id=message.message_id, status=status, **extra)
    logger.info("message %s", fields)


def plan(batch: Batch) -> list[tuple[str, list[InboundMessage]]]:
    """The batch's messages as units, in order: ("paused" | "reset" | "answer", messages)."""
    conversation, instance = batch.conversation, batch.instance
    if conversation.paused_now(now=timezone.now()):
        return [("paused", batch.messages)]
    units: list[tuple[str, list[InboundMessage]]] = []
    burst: list[InboundMessage] = []

    def close_burst() -> None:
        if burst:
            units.append(("answer", list(burst)))
            burst.clear()

    for message in batch.messages:
        if message.reply_text is not None:
            # Its agent already answered (a send being retried): on its own.
            close_burst()
            units.append(("answer", [message]))
        elif message.content.get("reset") or is_reset(instance=instance, text=message.text):
            close_burst()
            units.append(("reset", [message]))
        else:
            burst.append(message)
            if not instance.debounce_seconds:
                close_burst()
    close_burst()
    return units


async def handle_batch(*, batch: Batch, http: httpx.AsyncClient) -> None:
    """Handle a held conversation's messages, then those that came meanwhile; let it go."""
    while batch.messages:
        handled, lost = await _handle_units(batch, http=http)
        if lost:
            # Another worker holds the chat now (this one's lease ran out).
            return
        left = [m for m in batch.messages[handled:] if m.status == Status.PROCESSING]
        if left:
            # Held back by a message waiting for its retry: they wait with it.
            await run_db(release_messages, messages=left)
            await run_db(settle_conversation, conversation=batch.conversation, token=batch.token)
            return
        batch.messages = await run_db(
            take_more_or_settle, conversation=batch.conversation, token=batch.token
        )


async def _handle_units(batch: Batch, *, http: httpx.AsyncClient) -> tuple[int, bool]:
    """Handle the batch's units in order: (how many messages were handled, whether
    the claim was lost on the way)."""
    step = Step(batch)
    handled = 0
    for index, (kind, messages) in enumerate(plan(batch)):
        if index:
            await run_db(
                renew_lease,
                conversation_id=batch.conversation.pk,
                token=batch.token,
                agent_timeout=batch.instance.agent_timeout,
            )
        if kind == "paused":
            reason = batch.conversation.pause_reason or "paused"
            for message in messages:
                await step.finish(message, Status.IGNORED, ignore_reason=reason)
        elif kind == "reset":
            if not await _reset(step, message=messages[0], http=http):
                return handled + 1, step.lost
        elif not await _answer(step, messages=messages, http=http):
            # Requeued for a retry (it holds back the rest of its chat) or lost.
            return handled + len(messages), step.lost
        handled += len(messages)
        if step.lost:
            return handled, True
    return handled, step.lost


async def _reset(step: Step, *, message: InboundMessage, http: httpx.AsyncClient) -> bool:
    conversation = step.batch.conversation
    if not message.content.get("reset"):
        # Once per message, also when its reply is retried.
        conversation.session_epoch = await run_db(advance_session, conversation_id=conversation.pk)
        # The reset ended the chat's binding to a routed agent with its session.
        conversation.bound_agent_id = None
    instance = step.batch.instance
    held, _ = await step.update(
        message,
        ignore_reason="reset",
        reply_text=instance.reset_reply,
        content={**message.content, "reset": True},
        session_name=_session(conversation, instance),
    )
    if not held:
        return False
    return await _send_reply(step, message=message, http=http)


def _session(
    conversation: Conversation, instance: InstanceConfig, agent: Agent | None = None
) -> str:
    return session_name(
        instance=instance,
        chat_jid=conversation.chat_jid,
        phone=conversation.phone,
        epoch=conversation.session_epoch,
        agent=agent.session_suffix if agent is not None else "",
    )


async def _routed_agent(step: Step, *, messages: list[InboundMessage]) -> Agent | None:
    """The agent for these messages (None: the instance's own), binding the chat
    to the agent of the last rule they matched (webhooks/routing.py)."""
    batch = step.batch
    conversation = batch.conversation
    # Known from the statement that read the instance; unknown (an instance read
    # elsewhere) means look.
    if not getattr(batch.instance, "has_routes", True) and conversation.bound_agent_id is None:
        return None
    if batch.routing is None:
        batch.routing = await run_db(load_routing, instance_id=batch.instance.pk)
    routing = batch.routing
    bound = conversation.bound_agent_id
    if bound not in routing.agents:
        # Deleted since it was read: the default answers.
        bound = None
    for message in messages:
        choice = choose_agent(
            rules=routing.rules,
            bound=bound,
            text=message.text,
            chat_jid=message.chat_jid,
            phone=message.phone,
            is_group=bool(message.content.get("is_group")),
        )
        bound = choice.agent_id if choice.agent_id in routing.agents else None
    if bound != conversation.bound_agent_id:
        await run_db(
            bind_agent,
            conversation_id=conversation.pk,
            agent_id=bound,
            session_epoch=conversation.session_epoch,
        )
        conversation.bound_agent_id = bound
    agent = routing.agents.get(bound) if bound is not None else None
    if agent is not None and agent.agent_timeout > batch.instance.agent_timeout:
        # The chat's lease was sized for the instance's own agent.
        await run_db(
            renew_lease,
            conversation_id=conversation.pk,
            token=batch.token,
            agent_timeout=agent.agent_timeout,
        )
    return agent


async def _answer(step: Step, *, messages: list[InboundMessage], http: httpx.AsyncClient) -> bool:
    """Answer one message, or a debounced burst with its last message; False to stop."""
    message = messages[-1]
    target = evolution_target(message=message)
    if message.reply_text is None and not (target.base_url and target.api_key):
        # Never ask the agent for an answer that cannot be sent: its session
        # would hold a turn the user never saw.
        for unsendable in messages:
            await step.finish(unsendable, Status.FAILED, last_error=NO_TARGET)
        return True
    if len(messages) > 1:
        texts = [m.text for m in messages if m.text.strip()]
        content = {**message.content, "burst_texts": texts}
        await run_db(
            fold_into,
            folded_pks=[m.pk for m in messages[:-1]],
            answering_pk=message.pk,
            token=step.batch.token,
            burst_content=content,
        )
        message.content = content
        metrics.debounced_bursts.labels(step.batch.instance.name).inc()
    if message.reply_text is None and not await _ask_agent(
        step, message=message, routed=await _routed_agent(step, messages=messages), http=http
    ):
        # Failed for good: the chat goes on; requeued for a retry or lost: stop.
        return message.status == Status.FAILED
    return await _send_reply(step, message=message, http=http)


async def _ask_agent(
    step: Step, *, message: InboundMessage, routed: Agent | None, http: httpx.AsyncClient
) -> bool:
    """Get the reply into message.reply_text from `routed` (None: the instance's own agent);
    False when the row was requeued, failed or lost."""
    instance = step.batch.instance
    evolution = EvolutionClient(target=evolution_target(message=message), http=http)
    conversation = step.batch.conversation
    session = _session(conversation, instance, routed)
    agent = agent_for(instance=instance, http=http, agent=routed)
    history = (
        await run_db(
            session_history,
            instance_id=instance.pk,
            chat_jid=message.chat_jid,
            session=session,
            answering_pk=message.pk,
            limit=agent.history_limit,
        )
        if agent.history_limit
        else ()
    )
    request = agent.build(
        call=AgentCall(
            content=message.content,
            payload=message.payload,
            session=session,
            conversation_id=conversation.pk,
            history=history,
        )
    )
    started = timezone.now()
    typing = show_typing_later(evolution, number=reply_number(message=message))
    try:
        try:
            with metrics.agent_seconds.labels(instance.name).time():
                reply = await agent.run(request=request)
        finally:
            typing.cancel()
    except OutboundError as exc:
        metrics.outbound_errors.labels(instance.name, "agent", exc.status or "none").inc()
        attempt = message.agent_attempts + 1
        if exc.retryable and attempt < settings.AGENT_MAX_ATTEMPTS:
            await step.retry_later(
                message,
                attempt=attempt,
                error=str(exc),
                agent_attempts=attempt,
                agent_started_at=started,
            )
            return False
        fields = {
            "agent_attempts": attempt,
            "agent_started_at": started,
            "agent_finished_at": timezone.now(),
            "last_error": str(exc),
            "session_name": session,
        }
        if not instance.fallback_message:
            await step.finish(message, Status.FAILED, **fields)
            return False
        held, _ = await step.update(
            message, reply_text=instance.fallback_message, used_fallback=True, **fields
        )
        return held
    stored_request = agent.stored(request)
    text = reply.text if reply.should_send else ""
    target = evolution_target(message=message)
    # The reply's outbound row goes in the same write as the agent's answer:
    # one database round trip fewer between the answer and its sendText.
    send_start = (
        SendStart(
            chat_jid=message.chat_jid,
            text=parts_of(instance=instance, text=text, agent_response=reply.body)[0].echo_text,
        )
        if text and target.base_url and target.api_key
        else None
    )
    held, outbound_id = await step.update(
        message,
        send_start=send_start,
        agent_attempts=message.agent_attempts + 1,
        agent_started_at=started,
        agent_finished_at=timezone.now(),
        agent_request=stored_request,
        agent_response=reply.body,
        reply_text=text,
        session_name=session,
    )
    if held and send_start is not None:
        step.prepared[message.pk] = outbound_id
    return held


async def _send_reply(step: Step, *, message: InboundMessage, http: httpx.AsyncClient) -> bool:
    """Send message.reply_text; False when the message was requeued for a retry."""
    if not message.reply_text:
        # Empty or AUTOMAGIK: replies are not sent; the agent's answer is kept.
        await step.finish(message, Status.REPLIED)
        return True
    target = evolution_target(message=message)
    if not target.base_url or not target.api_key:
        await step.finish(
            message, Status.FAILED, last_error="No Evolution URL/key to send the reply with."
        )
        return True
    parts = parts_of(
        instance=step.batch.instance, text=message.reply_text, agent_response=message.agent_response
    )
    index = 0
    # Recorded before the send: its echo may arrive before sendText answers.
    if message.pk in step.prepared:
        # The common path: the row was written with the agent's answer.
        outbound_id = step.prepared.pop(message.pk)
    else:
        if len(parts) > 1 and message.attempts > 1:
            # Sent in parts before: the parts that went out are not sent again.
            sent = await run_db(sent_reply_count, message_pk=message.pk)
            index = min(sent, len(parts) - 1)
        fields: dict[str, Any] = {}
        if message.ignore_reason == HOLD_REASON:
            fields["ignore_reason"] = ""
        settled: SendEnd | None = None
        # Only a message handled before can have an attempt that may have
        # reached Evolution: a first claim costs no extra query.
        earlier = (
            await run_db(earlier_attempt, message_pk=message.pk) if message.attempts > 1 else None
        )
        if earlier is not None:
            check = await _check_earlier_send(
                step,
                message=message,
                target=target,
                earlier=earlier,
                text=parts[index].echo_text,
                http=http,
            )
            if check is None:
                # Requeued (False: it holds back the rest of its chat) or failed.
                return message.status == Status.FAILED
            if check.verdict is Verdict.SENT and index == len(parts) - 1:
                await _confirm_sent(
                    step, message=message, earlier=earlier, evolution_id=check.evolution_id
                )
                return True
            if check.verdict is Verdict.SENT:
                # That part went out: on with the next one.
                index += 1
                settled = SendEnd(
                    outbound_id=earlier.outbound_id, evolution_id=check.evolution_id, ok=True
                )
            else:
                settled = _settle_earlier(check, earlier=earlier, fields=fields, message=message)
            await run_db(
                renew_lease,
                conversation_id=step.batch.conversation.pk,
                token=step.batch.token,
                agent_timeout=step.batch.instance.agent_timeout,
            )
        held, outbound_id = await step.update(
            message,
            send_start=SendStart(chat_jid=message.chat_jid, text=parts[index].echo_text),
            send_end=settled,
            **fields,
        )
        if not held:
            return False
    if outbound_id is None:
        return await _hold(step, message=message)
    # A send that has started finishes, and is recorded, even when the worker is
    # stopped meanwhile: cancelled half-way, its text may be out while the row
    # goes back to the queue, and the next owner would send it again.
    send = asyncio.ensure_future(
        _send_and_record(
            step,
            message=message,
            target=target,
            outbound_id=outbound_id,
            http=http,
            parts=parts,
            index=index,
        )
    )
    _sends.add(send)
    send.add_done_callback(_sends.discard)
    return await asyncio.shield(send)


async def _check_earlier_send(
    step: Step,
    *,
    message: InboundMessage,
    target: EvolutionTarget,
    earlier: EarlierAttempt,
    text: str,
    http: httpx.AsyncClient,
) -> SendCheck | None:
    """Ask Evolution whether the earlier attempt went out; None when the message
    was requeued or failed because Evolution could not be asked."""
    instance = step.batch.instance

    async def recorded(evolution_ids: list[str]) -> set[str]:
        return await run_db(
            recorded_ids,
            instance_id=instance.pk,
            evolution_ids=evolution_ids,
            excluding=earlier.outbound_id,
        )

    try:
        check = await check_earlier_send(
            EvolutionClient(target=target, http=http),
            attempt=earlier,
            chat_jid=message.chat_jid,
            text=text,
            answered_id=message.message_id,
            now=timezone.now(),
            recorded_ids=recorded,
        )
    except OutboundError as exc:
        metrics.outbound_errors.labels(instance.name, "evolution", exc.status or "none").inc()
        if not exc.retryable:
            # Evolution cannot answer the question (a query it refuses, an
            # answer the hub cannot read): the reply goes again, as before.
            note = f"could not ask Evolution ({exc}): sent again, may be a duplicate"
            check = SendCheck(Verdict.UNKNOWN, note=note)
        else:
            error = f"could not ask Evolution whether the reply was sent: {exc}"
            await _retry_or_fail(step, message=message, error=error, attempt=message.send_attempts)
            return None
    metrics.resend_checks.labels(instance.name, check.verdict.value).inc()
    return check


async def _confirm_sent(
    step: Step, *, message: InboundMessage, earlier: EarlierAttempt, evolution_id: str
) -> None:
    """Evolution has the reply: recorded as sent with its id, not sent again."""
    # A worker that died mid-send never counted its attempt.
    attempts = message.send_attempts + (1 if earlier.status == OutboundStatus.SENDING else 0)
    sent = SendEnd(outbound_id=earlier.outbound_id, evolution_id=evolution_id, ok=True)
    _log(message, "found_sent", evolution_id=evolution_id)
    await step.finish(
        message, Status.REPLIED, send_attempts=attempts, sent_at=timezone.now(), send_end=sent
    )


def _settle_earlier(
    check: SendCheck, *, earlier: EarlierAttempt, fields: dict[str, Any], message: InboundMessage
) -> SendEnd:
    """The earlier attempt's row once Evolution was asked (written with the new one)."""
    if check.verdict is Verdict.NOT_SENT:
        return SendEnd(
            outbound_id=earlier.outbound_id,
            evolution_id="",
            ok=False,
            error="not among Evolution's messages: sent again",
        )
    # It may still have gone out: the row stays unconfirmed, and says why.
    fields["last_error"] = check.note
    logger.warning(
        "message %s", kv(instance=message.instance.name, id=message.message_id, note=check.note)
    )
    return SendEnd(
        outbound_id=earlier.outbound_id,
        evolution_id="",
        ok=False,
        unconfirmed=True,
        error=check.note,
    )


async def _retry_or_fail(
    step: Step,
    *,
    message: InboundMessage,
    error: str,
    attempt: int,
    send_end: SendEnd | None = None,
    retryable: bool = True,
) -> bool:
    """A send (or the question before it) failed: retried within the retry window,
    else failed for good. False when the message was requeued."""
    now = timezone.now()
    first_failure = message.first_send_failed_at or now
    window = timedelta(seconds=settings.EVOLUTION_RETRY_WINDOW)
    if retryable and now - first_failure < window:
        await step.retry_later(
            message,
            attempt=max(attempt, 1),
            error=error,
            send_attempts=attempt,
            first_send_failed_at=first_failure,
            send_end=send_end,
        )
        return False
    await step.finish(
        message, Status.FAILED, send_attempts=attempt, last_error=error, send_end=send_end
    )
    return True


async def _hold(step: Step, *, message: InboundMessage) -> bool:
    """The number is not connected: keep the reply queued until it is (within the
    retry window); connection.update "open" makes it due at once."""
    now = timezone.now()
    first = message.first_send_failed_at or now
    error = "WhatsApp number not connected (Evolution's state close/connecting): held"
    if now - first >= timedelta(seconds=settings.EVOLUTION_RETRY_WINDOW):
        await step.finish(message, Status.FAILED, last_error=f"{error} past the retry window")
        return True
    await step.retry_later(
        message,
        attempt=message.send_attempts + 1,
        error=error,
        ignore_reason=HOLD_REASON,
        first_send_failed_at=first,
    )
    return False


# Sends in flight in this process (tasks only, no tenant data): the worker's
# shutdown waits for them (sends_in_flight) before it hands rows back.
_sends: set["asyncio.Future[bool]"] = set()


async def sends_in_flight(*, timeout: float) -> int:
    """Wait up to `timeout` for the sends that have started; how many were waited for."""
    pending = list(_sends)
    if pending:
        await asyncio.wait(pending, timeout=timeout)
    return len(pending)


async def _send_and_record(
    step: Step,
    *,
    message: InboundMessage,
    target: EvolutionTarget,
    outbound_id: int,
    http: httpx.AsyncClient,
    parts: list[Part],
    index: int,
) -> bool:
    """Send the reply's parts from `index` on, each recorded before and after it goes;
    a part failing stops the rest (retried from that part, or failed for good)."""
    evolution = EvolutionClient(target=target, http=http)
    while True:
        attempt = message.send_attempts + 1
        try:
            answer = await _send_part(
                evolution, message=message, part=parts[index], quote=index == 0
            )
        except OutboundError as exc:
            metrics.outbound_errors.labels(
                message.instance.name, "evolution", exc.status or "none"
            ).inc()
            failed = SendEnd(
                outbound_id=outbound_id,
                evolution_id="",
                ok=False,
                error=str(exc),
                # Before this reply goes again, Evolution is asked whether it went.
                unconfirmed=exc.maybe_sent,
            )
            error = str(exc) if len(parts) == 1 else f"part {index + 1} of {len(parts)}: {exc}"
            return await _retry_or_fail(
                step,
                message=message,
                error=error,
                attempt=attempt,
                send_end=failed,
                retryable=exc.retryable,
            )
        sent = SendEnd(outbound_id=outbound_id, evolution_id=_key_id(answer), ok=True)
        index += 1
        if index == len(parts):
            await step.finish(
                message,
                Status.REPLIED,
                send_attempts=attempt,
                sent_at=timezone.now(),
                send_end=sent,
            )
            return True
        # One write: this part sent, the next one about to go.
        held, outbound_id_or_none = await step.update(
            message,
            send_attempts=attempt,
            send_end=sent,
            send_start=SendStart(chat_jid=message.chat_jid, text=parts[index].echo_text),
        )
        if not held:
            return False
        if outbound_id_or_none is None:
            return await _hold(step, message=message)
        outbound_id = outbound_id_or_none


async def _send_part(
    evolution: EvolutionClient, *, message: InboundMessage, part: Part, quote: bool
) -> dict[str, Any]:
    """One part out through Evolution; a quote Evolution refuses (4xx) goes once unquoted."""
    quoted = quote_of(message=message) if quote else None
    try:
        return await _post_part(evolution, message=message, part=part, quoted=quoted)
    except OutboundError as exc:
        if quoted is None or exc.status is None or not 400 <= exc.status < 500:
            raise
        _log(message, "quote_refused", error=str(exc))
        return await _post_part(evolution, message=message, part=part, quoted=None)


async def _post_part(
    evolution: EvolutionClient,
    *,
    message: InboundMessage,
    part: Part,
    quoted: dict[str, Any] | None,
) -> dict[str, Any]:
    number = reply_number(message=message)
    delay = typing_ms(part=part, ms_per_char=message.instance.typing_ms_per_char)
    if part.is_media:
        return await evolution.send_media(
            number=number,
            mediatype=part.mediatype,
            media=part.media_url,
            mimetype=part.mimetype,
            file_name=part.file_name,
            caption=part.text,
            quoted=quoted,
            delay_ms=delay,
        )
    return await evolution.send_text(number=number, text=part.text, quoted=quoted, delay_ms=delay)


def _key_id(answer: dict[str, Any]) -> str:
    key = answer.get("key")
    value = key.get("id") if isinstance(key, dict) else None
    return value if isinstance(value, str) else ""
