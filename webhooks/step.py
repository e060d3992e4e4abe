"""The writes of one claimed batch (Step), each conditional on the claim, and
what the worker's modules share: the retry backoff, where a reply goes, the
message log line.
"""

import logging
import random
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.utils import timezone

from instances.clients.evolution import EvolutionTarget, instance_target
from instances.models import InstanceConfig
from omnihub.logging import kv
from webhooks import metrics
from webhooks.db import run_db
from webhooks.models import InboundMessage, Status
from webhooks.transitions import (
    Batch,
    SendEnd,
    SendStart,
    save_claimed,
    save_claimed_and_take_more,
)

# The worker's message lines keep the one logger name operators filter on.
logger = logging.getLogger("webhooks.processing")


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
    return instance_target(instance)


class Step:
    """The writes of one batch, each conditional on its claim.

    The chat's lease covers one message's agent call and send; the worker
    renews it each time it takes the chat's next messages (take_more_or_settle).
    """

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.lost = False
        # Replies whose send was noted with the agent's answer: that SendStart,
        # or None when the number is not connected (the reply is held).
        self.prepared: dict[int, SendStart | None] = {}
        # Set when the batch's last message was finished: the chat's next messages,
        # taken in the same database call ([]: the chat was let go).
        self.taken: list[InboundMessage] | None = None

    async def update(
        self,
        message: InboundMessage,
        *,
        send_start: SendStart | None = None,
        send_end: SendEnd | None = None,
        take_more: bool = False,
        **fields: Any,
    ) -> tuple[bool, bool]:
        """Write fields if this worker still holds the chat (False when it lost it),
        and whether `send_start`'s send may go (see save_claimed).
        With `take_more` (the batch's last message finished), the chat's next
        messages are taken in the same call, into self.taken.

        The message object changes only once the write is back: the database
        thread may run a call twice (see webhooks/db.py), so what it runs must
        not change its arguments.
        """
        instance = self.batch.instance
        save: dict[str, Any] = {
            "message_pk": message.pk,
            "token": self.batch.token,
            "fields": fields,
            "conversation_id": self.batch.conversation.pk,
            "send_start": send_start,
            "send_end": send_end,
            "instance_id": instance.pk,
        }
        if take_more:
            held, may_send, self.taken = await run_db(
                save_claimed_and_take_more, conversation=self.batch.conversation, **save
            )
            # The batch is what the chat's task holds: stopped right after this
            # write (a shutdown during its send), the worker hands these back.
            self.batch.messages = self.taken
        else:
            held, may_send = await run_db(save_claimed, **save)
        for key, value in fields.items():
            setattr(message, key, value)
        self.lost = self.lost or not held
        return held, may_send

    async def finish(self, message: InboundMessage, status: str, **fields: Any) -> None:
        now = timezone.now()
        send_end = fields.pop("send_end", None)
        done, _ = await self.update(
            message,
            send_end=send_end,
            # Nothing of the batch is left after its last message.
            take_more=message is self.batch.messages[-1],
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
            log_message(
                message, status, total_ms=f"{total * 1000:.0f}", error=bool(message.last_error)
            )

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
        log_message(message, "queued", retry_in=f"{delay.total_seconds():.1f}s", error=error)


def log_message(message: InboundMessage, status: str, **extra: Any) -> None:
    fields = kv(instance=message.instance.name, id=message.message_id, status=status, **extra)
    logger.info("message %s", fields)
