"""Handling one claimed conversation: its open messages in order, each answer
an agent call and then the reply through Evolution.

A batch of a chat's open messages becomes units: a paused chat's messages are
only noted, a reset keyword starts a new session, and the rest are answered
one by one, or (debounce on) as one burst with one agent call and one reply.

Every write is conditional on the claim token, so a worker that lost its
lease (another worker took the chat) can never overwrite the new owner's work.
"""

from typing import Any

import httpx
from django.conf import settings
from django.utils import timezone

from instances.clients.agents import AgentCall, agent_for, session_name
from instances.clients.evolution import EvolutionClient
from instances.clients.http import OutboundError
from instances.models import Agent, InstanceConfig
from webhooks import metrics
from webhooks.agent_history import session_history
from webhooks.chat_rules import is_opt_out, is_reset
from webhooks.db import run_db
from webhooks.instance_routes import load_routing
from webhooks.media_input import PreparedMedia, evolution_speech, prepare_media
from webhooks.models import Conversation, InboundMessage, Status
from webhooks.opt_out import record_opt_out
from webhooks.reply_sending import (
    in_background,
    parts_of,
    reply_number,
    send_reply,
    show_typing_later,
)
from webhooks.routing import choose_agent
from webhooks.step import Step, evolution_target
from webhooks.transitions import (
    Batch,
    SendStart,
    advance_session,
    bind_agent,
    fold_into,
    release_messages,
    renew_lease,
    settle_conversation,
    take_more_or_settle,
)

NO_TARGET = "No Evolution URL/key to send the reply with: the agent was not asked."


OPT_OUT_REASON = "opt out"


def wants_opt_out(*, instance: InstanceConfig, message: InboundMessage) -> bool:
    """An opt-out keyword from a one-to-one chat (in a group it would be the group's
    message, not a request about the sender's number)."""
    return (
        not message.content.get("is_group")
        and bool(message.phone)
        and is_opt_out(instance=instance, text=message.text)
    )


def plan(batch: Batch) -> list[tuple[str, list[InboundMessage]]]:
    """The batch's messages as units, in order: ("paused" | "reset" | "opt_out" |
    "opt_out_paused" | "answer", messages)."""
    conversation, instance = batch.conversation, batch.instance
    units: list[tuple[str, list[InboundMessage]]] = []
    if conversation.paused_now(now=timezone.now()):
        # Not answered; an opt-out is still recorded (the person asked for it).
        paused: list[InboundMessage] = []
        for message in batch.messages:
            if wants_opt_out(instance=instance, message=message):
                if paused:
                    units.append(("paused", paused))
                    paused = []
                units.append(("opt_out_paused", [message]))
            else:
                paused.append(message)
        if paused:
            units.append(("paused", paused))
        return units
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
        elif wants_opt_out(instance=instance, message=message):
            close_burst()
            units.append(("opt_out", [message]))
        else:
            burst.append(message)
            if not instance.debounce_seconds:
                close_burst()
    close_burst()
    return units


async def handle_batch(*, batch: Batch, http: httpx.AsyncClient) -> None:
    """Handle a held conversation's messages, then those that came meanwhile; let it go."""
    while batch.messages:
        handled, lost, taken = await _handle_units(batch, http=http)
        if lost:
            # Another worker holds the chat now (this one's lease ran out).
            return
        if taken is not None:
            # Taken with the last message's final write (Step.update put them in
            # the batch as it wrote).
            continue
        left = [m for m in batch.messages[handled:] if m.status == Status.PROCESSING]
        if left:
            # Held back by a message waiting for its retry: they wait with it.
            await run_db(release_messages, messages=left)
            await run_db(settle_conversation, conversation=batch.conversation, token=batch.token)
            return
        batch.messages = await run_db(
            take_more_or_settle, conversation=batch.conversation, token=batch.token
        )


async def _handle_units(
    batch: Batch, *, http: httpx.AsyncClient
) -> tuple[int, bool, list[InboundMessage] | None]:
    """Handle the batch's units in order: (how many messages were handled, whether
    the claim was lost on the way, the chat's next messages when the last one's
    write took them)."""
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
                return handled + 1, step.lost, step.taken
        elif kind in ("opt_out", "opt_out_paused"):
            quiet = kind == "opt_out_paused"
            if not await _opt_out(step, message=messages[0], quiet=quiet, http=http):
                return handled + 1, step.lost, step.taken
        elif not await _answer(step, messages=messages, http=http):
            # Requeued for a retry (it holds back the rest of its chat) or lost.
            return handled + len(messages), step.lost, step.taken
        handled += len(messages)
        if step.lost:
            return handled, True, None
    return handled, step.lost, step.taken


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
    return await send_reply(step, message=message, http=http)


async def _opt_out(
    step: Step, *, message: InboundMessage, quiet: bool, http: httpx.AsyncClient
) -> bool:
    """Record the number as opted out and answer opt_out_reply, without an agent call
    (quiet: the chat is paused, so nothing is sent)."""
    instance = step.batch.instance
    await run_db(
        record_opt_out,
        instance_id=instance.pk,
        phone=message.phone,
        keyword=message.text.strip(),
        at=timezone.now(),
    )
    metrics.opt_outs.labels(instance.name).inc()
    if quiet or not instance.opt_out_reply:
        await step.finish(message, Status.IGNORED, ignore_reason=OPT_OUT_REASON)
        return True
    held, _ = await step.update(
        message,
        ignore_reason=OPT_OUT_REASON,
        reply_text=instance.opt_out_reply,
        content={**message.content, "opt_out": True},
    )
    if not held:
        return False
    return await send_reply(step, message=message, http=http)


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
        media_source = next((m for m in reversed(messages) if m.content.get("media")), message)
        if media_source is not message:
            # "a photo, then 'how much?'": the burst's call carries the photo. Its
            # bytes are fetched by its own id (a retry has only this row's payload).
            content.update(
                media=media_source.content["media"],
                message_type=media_source.content.get("message_type", "text"),
                media_message_id=media_source.message_id,
            )
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
    return await send_reply(step, message=message, http=http)


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
    prepared: PreparedMedia | None = None
    if message.content.get("media"):
        attempt = message.agent_attempts + 1
        try:
            media_of = message.content.get("media_message_id")
            prepared = await prepare_media(
                instance=instance,
                content=message.content,
                # A burst's media from an earlier message: fetched by that one's id.
                payload={} if media_of else message.payload,
                message_id=media_of or message.message_id,
                chat_jid=message.chat_jid,
                evolution=evolution,
                http=http,
                agent_kind=agent.kind,
                last_attempt=attempt >= settings.AGENT_MAX_ATTEMPTS,
            )
        except OutboundError as exc:
            # Evolution's file or the transcription may be there on the next try.
            metrics.outbound_errors.labels(instance.name, "media", exc.status or "none").inc()
            await step.retry_later(message, attempt=attempt, error=str(exc), agent_attempts=attempt)
            return False
        if prepared is not None and prepared.voice_unreadable:
            return await _voice_unreadable(
                step, message=message, reason=prepared.voice_unreadable, session=session
            )
    if prepared is not None and prepared.transcript:
        outcome = "speech_to_text" if evolution_speech(message.content) else "transcribed"
        metrics.voice_notes.labels(instance.name, outcome).inc()
    content = with_media(message.content, prepared)
    if instance.mark_read:
        in_background(_mark_read(evolution, message=message))
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
            content=content,
            payload=message.payload,
            session=session,
            conversation_id=conversation.pk,
            history=history,
            media=prepared.media if prepared is not None else None,
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
    # The reply's send is noted in the same write as the agent's answer: one
    # database round trip fewer between the answer and its sendText.
    send_start = (
        SendStart(
            chat_jid=message.chat_jid,
            text=parts_of(instance=instance, text=text, agent_response=reply.body)[0].echo_text,
        )
        if text and target.base_url and target.api_key
        else None
    )
    media_fields = (
        {"content": content, "transcript": prepared.transcript or ""}
        if prepared is not None
        else {}
    )
    held, may_send = await step.update(
        message,
        send_start=send_start,
        **media_fields,
        agent_attempts=message.agent_attempts + 1,
        agent_started_at=started,
        agent_finished_at=timezone.now(),
        agent_request=stored_request,
        agent_response=reply.body,
        reply_text=text,
        session_name=session,
    )
    if held and send_start is not None:
        step.prepared[message.pk] = send_start if may_send else None
    return held


def with_media(content: dict[str, Any], prepared: PreparedMedia | None) -> dict[str, Any]:
    """The content the agent answers and the row keeps: a voice note's transcript as
    its text (so the session's history reads it too), the media's note for the log."""
    if prepared is None:
        return content
    media = dict(content["media"])
    if media.get("size") is None:
        # WhatsApp's declared size stays; the file's own when none was declared.
        media["size"] = prepared.media.size
    if prepared.media.note:
        media["note"] = prepared.media.note
    changed = {**content, "media": media}
    if prepared.transcript:
        changed["text"] = prepared.transcript
        changed["transcribed"] = True
    return changed


async def _voice_unreadable(
    step: Step, *, message: InboundMessage, reason: str, session: str
) -> bool:
    """A voice note with no text to answer: the user is asked to write instead
    (stt_failure_message), the agent is not asked, the row keeps why."""
    instance = step.batch.instance
    metrics.voice_notes.labels(instance.name, "unreadable").inc()
    fields: dict[str, Any] = {
        "agent_attempts": message.agent_attempts + 1,
        "last_error": f"voice note not understood: {reason}",
        "session_name": session,
    }
    if not instance.stt_failure_message:
        await step.finish(message, Status.FAILED, **fields)
        return False
    held, _ = await step.update(
        message, reply_text=instance.stt_failure_message, used_fallback=True, **fields
    )
    return held


def read_receipt_jid(message: InboundMessage) -> str:
    """Evolution 2.3.x skips @lid keys silently: the phone's JID when the delivery has one."""
    if message.chat_jid.endswith("@lid") and message.phone:
        return f"{message.phone}@s.whatsapp.net"
    return message.chat_jid


async def _mark_read(evolution: EvolutionClient, *, message: InboundMessage) -> None:
    is_group = bool(message.content.get("is_group"))
    try:
        await evolution.mark_read(
            remote_jid=read_receipt_jid(message),
            message_id=message.message_id,
            participant=message.sender_jid if is_group else "",
        )
    except OutboundError:
        # Blue ticks are a courtesy: counted, never retried, never in the way.
        metrics.read_receipts_failed.labels(message.instance.name).inc()
