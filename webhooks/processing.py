"""Processing one claimed message: agent call, then the reply through Evolution.

Every write is conditional on the claim token, so a worker that lost its
lease (another worker took the row) can never overwrite the new owner's work.
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

from instances.models import InstanceConfig
from omnihub.logging import kv
from webhooks import metrics
from webhooks.agent_client import AgentClient, build_agent_request
from webhooks.db import run_db
from webhooks.evolution_client import EvolutionClient, EvolutionTarget
from webhooks.http import OutboundError
from webhooks.models import InboundMessage, Status
from webhooks.rows import update_claimed_row

logger = logging.getLogger(__name__)


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


async def _update(message: InboundMessage, **fields: Any) -> bool:
    """Write fields if this worker still holds the claim; False when it lost it.

    The message object changes only once the write is back: the database thread
    may run a call twice (see webhooks/db.py), so what it runs must not change
    its arguments.
    """
    updated = await run_db(
        update_claimed_row, pk=message.pk, claim_token=message.claim_token, fields=fields
    )
    for key, value in fields.items():
        setattr(message, key, value)
    return updated


def _log(message: InboundMessage, status: str, **extra: Any) -> None:
    fields = kv(instance=message.instance.name, id=message.message_id, status=status, **extra)
    logger.info("message %s", fields)


async def _finish(message: InboundMessage, status: str, **fields: Any) -> None:
    now = timezone.now()
    done = await _update(
        message,
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


async def _retry_later(message: InboundMessage, *, attempt: int, error: str, **fields: Any) -> None:
    delay = backoff(attempt)
    await _update(
        message,
        status=Status.QUEUED,
        next_attempt_at=timezone.now() + delay,
        lease_until=None,
        claim_token="",
        last_error=error,
        **fields,
    )
    _log(message, "queued", retry_in=f"{delay.total_seconds():.1f}s", error=error)


async def process_message(*, message: InboundMessage, http: httpx.AsyncClient) -> None:
    if message.reply_text is None and not await _ask_agent(message=message, http=http):
        return
    await _send_reply(message=message, http=http)


async def _ask_agent(*, message: InboundMessage, http: httpx.AsyncClient) -> bool:
    """Get the reply into message.reply_text; False when the row was requeued or lost."""
    instance = message.instance
    evolution = EvolutionClient(target=evolution_target(message=message), http=http)
    request = build_agent_request(
        instance=instance, content=message.content, payload=message.payload
    )
    started = timezone.now()
    typing = show_typing_later(evolution, number=reply_number(message=message))
    try:
        try:
            with metrics.agent_seconds.labels(instance.name).time():
                reply = await AgentClient(instance=instance, http=http).run(request)
        finally:
            typing.cancel()
    except OutboundError as exc:
        metrics.outbound_errors.labels(instance.name, "agent", exc.status or "none").inc()
        attempt = message.agent_attempts + 1
        if exc.retryable and attempt < settings.AGENT_MAX_ATTEMPTS:
            await _retry_later(
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
        }
        if not instance.fallback_message:
            await _finish(message, Status.FAILED, **fields)
            return False
        return await _update(
            message, reply_text=instance.fallback_message, used_fallback=True, **fields
        )
    stored_request = {k: v for k, v in request.items() if k != "channel_payload"}
    return await _update(
        message,
        agent_attempts=message.agent_attempts + 1,
        agent_started_at=started,
        agent_finished_at=timezone.now(),
        agent_request=stored_request,
        agent_response=reply.body,
        reply_text=reply.text if reply.should_send else "",
    )


async def _send_reply(*, message: InboundMessage, http: httpx.AsyncClient) -> None:
    if not message.reply_text:
        # Empty or AUTOMAGIK: replies are not sent; the agent's answer is kept.
        await _finish(message, Status.REPLIED)
        return
    target = evolution_target(message=message)
    if not target.base_url or not target.api_key:
        await _finish(
            message, Status.FAILED, last_error="No Evolution URL/key to send the reply with."
        )
        return
    attempt = message.send_attempts + 1
    try:
        await EvolutionClient(target=target, http=http).send_text(
            number=reply_number(message=message), text=message.reply_text
        )
    except OutboundError as exc:
        metrics.outbound_errors.labels(
            message.instance.name, "evolution", exc.status or "none"
        ).inc()
        now = timezone.now()
        first_failure = message.first_send_failed_at or now
        window = timedelta(seconds=settings.EVOLUTION_RETRY_WINDOW)
        if exc.retryable and now - first_failure < window:
            await _retry_later(
                message,
                attempt=attempt,
                error=str(exc),
                send_attempts=attempt,
                first_send_failed_at=first_failure,
            )
        else:
            await _finish(message, Status.FAILED, send_attempts=attempt, last_error=str(exc))
        return
    await _finish(message, Status.REPLIED, send_attempts=attempt, sent_at=timezone.now())
