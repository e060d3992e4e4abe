"""Sending a reply: its parts one after another through Evolution, each noted on
its message before it goes (its echo is the hub's own) and recorded as an
outbound row with its outcome; a send that may have reached Evolution is
checked before it goes again (webhooks/duplicates.py).
"""

import asyncio
import logging
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from datetime import timedelta
from functools import partial
from typing import Any

import httpx
from django.conf import settings
from django.utils import timezone

from instances.clients.evolution import EvolutionClient, EvolutionTarget, sent_key_id
from instances.clients.http import OutboundError
from instances.models import InstanceConfig
from omnihub.logging import kv
from webhooks import metrics
from webhooks.db import run_db
from webhooks.duplicates import SendCheck, Verdict, check_earlier_send
from webhooks.models import InboundMessage, OutboundStatus, Status
from webhooks.reply_parts import Part, reply_parts, typing_ms
from webhooks.rows import EarlierAttempt, earlier_attempt, recorded_ids, sent_reply_count
from webhooks.step import Step, evolution_target, log_message
from webhooks.transitions import (
    HOLD_REASON,
    SendEnd,
    SendStart,
    renew_lease,
)

logger = logging.getLogger("webhooks.processing")


# Presence and read-receipt requests in flight, kept so they are not garbage-collected. They are
# never cancelled: cancelling an httpx request mid-flight can leave its pool
# slot taken for good (encode/httpcore#1093), and they end on their timeout.
_background: set[asyncio.Task[None]] = set()


def in_background(call: Coroutine[Any, Any, None]) -> None:
    """Run a call whose outcome nothing waits for (presence, read receipts)."""
    task = asyncio.create_task(call)
    _background.add(task)
    task.add_done_callback(_background.discard)


def show_typing(evolution: EvolutionClient, *, number: str) -> None:
    in_background(evolution.send_presence(number=number))


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


async def send_reply(step: Step, *, message: InboundMessage, http: httpx.AsyncClient) -> bool:
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
    # Noted before the send: its echo may arrive before sendText answers.
    start: SendStart | None
    if message.pk in step.prepared:
        # The common path: noted with the agent's answer.
        start = step.prepared.pop(message.pk)
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
        start = SendStart(chat_jid=message.chat_jid, text=parts[index].echo_text)
        held, may_send = await step.update(message, send_start=start, send_end=settled, **fields)
        if not held:
            return False
        if not may_send:
            start = None
    if start is None:
        return await _hold(step, message=message)
    # A send that has started finishes, and is recorded, even when the worker is
    # stopped meanwhile: cancelled half-way, its text may be out while the row
    # goes back to the queue, and the next owner would send it again. It runs in
    # the chat's own task (a task of its own waited a turn of a busy event loop
    # before its sendText: 4 ms p50 in the bench's 32-sender run); the worker's
    # shutdown stops a task that is sending only once its send is recorded.
    with sending():
        return await _send_and_record(
            step,
            message=message,
            target=target,
            start=start,
            http=http,
            parts=parts,
            index=index,
        )


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
    log_message(message, "found_sent", evolution_id=evolution_id)
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


# The tasks of this process that are sending a reply, each with whether it was
# asked to stop meanwhile (tasks only, no tenant data).
_sending: dict["asyncio.Task[Any]", bool] = {}


@contextmanager
def sending() -> Iterator[None]:
    """Mark the current task as sending: `stop_after_send` waits for the block's end."""
    task = asyncio.current_task()
    assert task is not None
    _sending[task] = False
    try:
        yield
    finally:
        stop = _sending.pop(task, False)
    if stop:
        # Recorded: now the task stops, as if cancelled at the send's end.
        raise asyncio.CancelledError


def stop_after_send(task: "asyncio.Task[Any]") -> bool:
    """Cancel a worker's task at once (True), or, while it is sending a reply, once
    that send is recorded (False; its text may be out: cancelled half-way, it
    would be sent again by the chat's next owner)."""
    if task in _sending:
        _sending[task] = True
        return False
    task.cancel()
    return True


async def _send_and_record(
    step: Step,
    *,
    message: InboundMessage,
    target: EvolutionTarget,
    start: SendStart,
    http: httpx.AsyncClient,
    parts: list[Part],
    index: int,
) -> bool:
    """Send the reply's parts from `index` on (`start`: the first one's, noted),
    each noted before it goes and recorded with its outcome; a part failing stops
    the rest (retried from that part, or failed for good)."""
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
                start=start,
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
        sent = SendEnd(start=start, evolution_id=sent_key_id(answer), ok=True)
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
        start = SendStart(chat_jid=message.chat_jid, text=parts[index].echo_text)
        held, may_send = await step.update(
            message, send_attempts=attempt, send_end=sent, send_start=start
        )
        if not held:
            return False
        if not may_send:
            return await _hold(step, message=message)


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
        log_message(message, "quote_refused", error=str(exc))
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
